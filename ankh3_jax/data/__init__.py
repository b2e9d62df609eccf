"""Pre-training data: FASTA I/O, the shipped corpus, seqio sources and preprocessors.

`fasta` and `corpus` import without TensorFlow; `sources`, `preprocessors`, `packing`
and `tfds_uniref50` pull it in.
"""
