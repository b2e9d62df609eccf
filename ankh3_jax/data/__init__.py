"""Pre-training data: FASTA I/O, the shipped corpus and its homology-aware splits, seqio
sources and preprocessors.

`fasta`, `corpus`, `homology`, `cluster_splits` and `blastdb` import without TensorFlow; `sources`, `preprocessors`, `packing`
and `tfds_uniref50` pull it in.
"""
