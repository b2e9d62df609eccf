"""ankh3_jax: Ankh3 protein language models in JAX/Flax (t5x-compatible contracts)."""

__version__ = "0.1.0"
