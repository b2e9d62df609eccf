"""Logical axis rules, mesh shapes, shardings of params/optimizer state, data layout."""
import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from ankh3_jax import config as config_lib
from ankh3_jax import model as model_lib
from ankh3_jax import partitioning
from ankh3_jax.training import optimizers
from ankh3_jax.training import state as state_lib


def _rules(**kw):
  return dict(partitioning.standard_logical_axis_rules(**kw))


def test_standard_rules_follow_t5x():
  rules = partitioning.standard_logical_axis_rules()
  first = {}
  for name, axis in rules:
    first.setdefault(name, axis)
  assert first["batch"] == "data"
  for name in ("vocab", "mlp", "heads", "joined_kv"):
    assert first[name] == "model"
  for name in ("kv", "embed", "length", "relpos_buckets", "layers"):
    assert first[name] is None
  two_d = partitioning.standard_logical_axis_rules(parameter_partitioning_dims=2)
  assert ("embed", "data") in two_d
  replica = _rules(mesh_axis_names=("replica", "data", "model"))
  assert replica["batch"] == ("replica", "data")
  data_only = _rules(mesh_axis_names=("data",))
  assert data_only["mlp"] is None and data_only["batch"] == "data"


def test_logical_to_mesh_embed_takes_data_only_for_parameters():
  rules = partitioning.standard_logical_axis_rules(parameter_partitioning_dims=2)
  assert nn.logical_to_mesh_axes(("embed", "mlp"), rules) == P("data", "model")
  assert nn.logical_to_mesh_axes(("batch", "length", "embed"), rules) == P("data", None, None)


def test_resolve_and_fit():
  assert partitioning.resolve_mesh_shape((-1, 4), 8) == (2, 4)
  with pytest.raises(ValueError):
    partitioning.resolve_mesh_shape((3, -1), 8)
  with pytest.raises(ValueError):
    partitioning.resolve_mesh_shape((-1, -1), 8)
  mesh = AbstractMesh((2, 8), ("data", "model"))
  assert partitioning.fit_spec(P("data", "model"), (4, 4), mesh) == P("data", None)
  assert partitioning.fit_spec(P(None, "model"), (3, 16), mesh) == P(None, "model")


def test_create_mesh_checks_names():
  mesh = partitioning.create_mesh((1, -1), devices=jax.devices()[:1])
  assert dict(mesh.shape) == {"data": 1, "model": 1}
  with pytest.raises(ValueError, match="axis names"):
    partitioning.create_mesh((1, 1), ("data", "tensor"))


@pytest.mark.parametrize("optimizer", ["adafactor", "adamw"])
def test_state_shardings_on_an_abstract_pod(optimizer):
  """Shardings of params and optimizer state for a 4 x 8 mesh, without devices."""
  cfg = config_lib.preset("tiny", num_heads=8, d_kv=8)
  tx = optimizers.make_optimizer(optimizers.make_schedule("constant", 1e-3, 0),
                                 name=optimizer)
  factory = state_lib.StateFactory(model_lib.Transformer(cfg), tx,
                                   {"inputs": 8, "targets": 8})
  mesh = AbstractMesh((4, 8), ("data", "model"))
  rules = partitioning.standard_logical_axis_rules(parameter_partitioning_dims=2)
  shardings = factory.shardings(mesh, rules)
  wi = shardings.params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
  assert wi.spec == P("data", "model")
  emb = shardings.params["token_embedder"]["embedding"]
  assert emb.spec == P("model", "data")
  flat = jax.tree_util.tree_flatten_with_path(shardings.opt_state)[0]
  specs = {jax.tree_util.keystr(path): s.spec for path, s in flat}
  wi_specs = [spec for path, spec in specs.items()
              if "layers_0']['mlp']['wi_0']['kernel']" in path and "encoder" in path]
  if optimizer == "adamw":  # mu and nu mirror the parameter
    assert wi_specs == [P("data", "model")] * 2
  else:  # d_model 64 < 128: not factored, so `v` mirrors the parameter and the
    # (1,)-shaped v_row / v_col placeholders are replicated
    assert sorted(wi_specs, key=lambda spec: len(spec)) == [P(), P(), P("data", "model")]


def test_data_layout_and_global_batch_single_process():
  mesh = partitioning.create_mesh((1, 1), devices=jax.devices()[:1])
  rules = partitioning.standard_logical_axis_rules()
  layout = partitioning.data_layout(mesh, rules, 6)
  assert (layout.shard_id, layout.num_shards, layout.shard_batch_size) == (0, 1, 6)
  assert layout.rows == slice(0, 6)
  batch = partitioning.to_global_batch({"x": np.arange(12).reshape(6, 2)}, mesh, rules, 6)
  np.testing.assert_array_equal(batch["x"], np.arange(12).reshape(6, 2))
  assert batch["x"].sharding.spec == P("data", None)


def test_data_layout_rejects_undivisible_batch():
  mesh = AbstractMesh((4, 2), ("data", "model"))
  with pytest.raises(ValueError, match="not divisible"):
    partitioning.data_layout(mesh, partitioning.standard_logical_axis_rules(), 6)
