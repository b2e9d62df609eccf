"""Train state and its sharded creation (`jax.jit(init, out_shardings=...)`)."""
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ankh3_jax import partitioning


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint must hold to continue training (besides the data position).

  `step` counts train steps taken, which is also the number of global batches consumed.
  """
  step: jax.Array
  params: Any
  opt_state: Any


def dummy_inputs(feature_lengths: Mapping[str, int], batch_size: int = 1) -> dict:
  """Shape-only model inputs used to trace `init`."""
  enc = jax.ShapeDtypeStruct((batch_size, feature_lengths["inputs"]), jnp.int32)
  dec = jax.ShapeDtypeStruct((batch_size, feature_lengths["targets"]), jnp.int32)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
          "decoder_target_tokens": dec}


class StateFactory:
  """Creates, shape-evaluates and shards the train state of `model` under `tx`."""

  def __init__(self, model: nn.Module, tx: optax.GradientTransformation,
               feature_lengths: Mapping[str, int]):
    self.model = model
    self.tx = tx
    self.feature_lengths = dict(feature_lengths)

  def _boxed_params(self, rng):
    inputs = {k: jnp.ones(v.shape, v.dtype)
              for k, v in dummy_inputs(self.feature_lengths).items()}
    return self.model.init(rng, **inputs, enable_dropout=False)["params"]

  def init(self, rng) -> TrainState:
    params = nn.unbox(self._boxed_params(rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params))

  def abstract_state(self) -> TrainState:
    return jax.eval_shape(self.init, jax.random.key(0))

  def shardings(self, mesh, rules) -> TrainState:
    """NamedShardings of every leaf of the state on `mesh` under `rules`."""
    boxed = jax.eval_shape(self._boxed_params, jax.random.key(0))
    abstract = self.abstract_state()
    params = partitioning.params_shardings(boxed, mesh, rules)
    opt = partitioning.optimizer_state_shardings(abstract.opt_state, abstract.params,
                                                 params, mesh)
    return TrainState(step=NamedSharding(mesh, P()), params=params, opt_state=opt)

  def abstract_sharded_state(self, mesh, rules) -> TrainState:
    """ShapeDtypeStructs carrying target shardings (for restoring a checkpoint)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        self.abstract_state(), self.shardings(mesh, rules))

  def create(self, rng, mesh, rules) -> TrainState:
    """Initialises the state directly in its sharded layout (never whole on one device)."""
    shardings = self.shardings(mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jax.jit(self.init, out_shardings=shardings)(rng)
