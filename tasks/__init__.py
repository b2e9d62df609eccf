"""seqio Tasks and Mixtures of ankh3_jax (installed as `ankh3_jax.tasks`).

Importing this package registers, once, the built-in pre-training family `ankh3_*`
(`pretrain`) and the downstream tasks (`downstream`); it reads no data file (the sources
open them when a dataset is requested) and pulls in TensorFlow and seqio.
"""
from ankh3_jax.tasks import pretrain  # pylint: disable=unused-import
from ankh3_jax.tasks import downstream  # pylint: disable=unused-import
