"""Downstream evaluation of Ankh3 embeddings: the task table (`tasks`), shipped labelled
data, user CSVs, ConvBERT / linear heads, the one training loop (`training`), metrics,
the fine-tuning library (`finetune`) and command (`ankh3-finetune`, `cli`). Nothing here
imports TensorFlow.
"""
