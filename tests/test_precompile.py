"""Completion from a model directory compiles before the weights are read
(`complete.precompile`, `inference.abstract_model`): the same tokens, no compile once the
weights are in memory, and bad input refused before any weight is read."""
import contextlib

import flax.linen as nn
import jax
import numpy as np
import pytest

from ankh3_jax import complete
from ankh3_jax import config as config_lib
from ankh3_jax import inference
from ankh3_jax import layers
from ankh3_jax import model as model_lib
from ankh3_jax import model_io

# Two length buckets in batches of 2: 16 and 40 tokens.
PROMPTS = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "GSHMKK", "MVLSPADKTNVKAAWG", "WPEL"]
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  config = config_lib.preset("tiny")
  params = jax.tree.map(np.asarray, nn.unbox(model_lib.init_params(config, seed=5)))
  directory = str(tmp_path_factory.mktemp("precompile") / "model")
  model_io.save_model(directory, config, params)
  return directory


@contextlib.contextmanager
def compiles():
  """Names of the programs XLA compiles within (a list filled as they compile)."""
  names = []

  def listen(event, _, **meta):
    if event == BACKEND_COMPILE:
      names.append(meta.get("fun_name", "?"))

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


def same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert (tuple(x.shape), np.dtype(x.dtype)) == (tuple(y.shape), np.dtype(y.dtype))


@pytest.mark.parametrize("param_dtype", [None, "bfloat16"])
@pytest.mark.parametrize("large", [False, True])
def test_abstract_model_is_what_loading_gives(model_dir, param_dtype, large, monkeypatch):
  if large:  # decoder kernels held [out, in], as at ankh_base and larger
    monkeypatch.setattr(layers, "FUSED_COPY_LIMIT_BYTES", 0)
  abstract = inference.abstract_model(model_dir, param_dtype=param_dtype)
  loaded = inference.resolve_model(model_dir, param_dtype=param_dtype)
  assert abstract.config == loaded.config
  assert loaded.config.decoder_kernels == ("out_in" if large else "in_out")
  assert abstract.vocab_path == loaded.vocab_path and abstract.source == loaded.source
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract.params))
  same_tree(abstract.params, loaded.params)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_directory_compiles_before_its_weights_are_read(model_dir, strategy, monkeypatch):
  options = dict(max_new_tokens=6, strategy=strategy, num_beams=2, batch_size=2)
  load = model_io.load_model
  with compiles() as names:
    before_weights = []
    monkeypatch.setattr(model_io, "load_model", lambda *a, **k: (
        before_weights.append(list(names)), load(*a, **k))[1])
    from_dir = complete.complete(model_dir, PROMPTS, **options)
  assert len(before_weights) == 1
  generate = [n for n in before_weights[0] if "generate" in n]
  assert len(generate) == 2  # one program per length bucket, both before the weights
  assert not [n for n in names[len(before_weights[0]):] if "generate" in n]
  from_memory = complete.complete(inference.resolve_model(model_dir), PROMPTS, **options)
  assert [c.token_ids for c in from_dir] == [c.token_ids for c in from_memory]
  np.testing.assert_allclose([c.log_prob for c in from_dir],
                             [c.log_prob for c in from_memory], rtol=1e-6)


def test_precompiled_programs_serve_weights_loaded_later(model_dir):
  options = dict(max_new_tokens=5, batch_size=4, strategy="sample", seed=7,
                 residues_only=True)
  assert complete.precompile(model_dir, PROMPTS, **options)
  loaded = inference.resolve_model(model_dir)
  with compiles() as names:
    out = complete.complete(loaded, PROMPTS, **options)
  assert not [n for n in names if "generate" in n]
  assert len(out) == len(PROMPTS) and all(len(c.token_ids) <= 5 for c in out)


def test_bad_input_fails_before_any_weight_is_read(model_dir, tmp_path, monkeypatch):
  def no_weights(*_, **__):
    raise AssertionError("weights read")

  monkeypatch.setattr(model_io, "load_model", no_weights)
  with pytest.raises(ValueError, match="illegal residue"):
    complete.complete(model_dir, ["MK1"])
  with pytest.raises(ValueError, match="top_p"):
    complete.complete(model_dir, PROMPTS, strategy="sample", top_p=0.0)
  config, stored, _ = model_io.load_abstract_model(model_dir)
  encoder_only = str(tmp_path / "encoder_only")
  model_io.save_model(encoder_only, config, {
      k: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), v) for k, v in stored.items()
      if k != "decoder"})
  with pytest.raises(ValueError, match="no decoder"):
    complete.complete(encoder_only, PROMPTS)
  with pytest.raises(FileNotFoundError, match="model directory not found"):
    complete.complete(str(tmp_path / "missing"), PROMPTS)


def test_no_prompts_compile_nothing(model_dir):
  with compiles() as names:
    assert complete.complete(model_dir, []) == []
  assert not [n for n in names if "generate" in n]

