"""`python -m ankh3_jax.ablation`: the same as `ankh3-ablation`."""
import sys

from ankh3_jax.ablation.run import main

if __name__ == "__main__":
  sys.exit(main())
