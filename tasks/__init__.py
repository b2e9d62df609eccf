"""seqio Tasks and Mixtures of ankh3_jax (installed as `ankh3_jax.tasks`).

Importing this package registers the pre-training tasks (`pretrain`) and the downstream
tasks (`downstream`); it pulls in
TensorFlow and seqio.
"""
from ankh3_jax.tasks import pretrain  # pylint: disable=unused-import
from ankh3_jax.tasks import downstream  # pylint: disable=unused-import
