"""Downstream evaluation of Ankh3 embeddings: shipped labelled data, user benchmark files,
ConvBERT / linear heads, metrics and the fine-tuning command (`python -m
ankh3_jax.downstream.finetune`). Nothing here imports TensorFlow.
"""
