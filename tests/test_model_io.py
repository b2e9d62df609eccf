"""Model directory format: round trip, atomic writes, clear errors, scan layouts."""
import functools
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from ankh3_jax import model_io
from ankh3_jax import vocab as vocab_lib
from ankh3_jax.config import preset
from ankh3_jax.model import Transformer

CONFIG = preset("tiny", d_model=32, d_ff=48, d_kv=8, num_encoder_layers=2, num_decoder_layers=3,
                relative_attention_num_buckets=16, relative_attention_max_distance=32)


@functools.lru_cache(maxsize=None)
def _random_params(seed: int):
  """Random params of CONFIG's shapes (numpy: no flax init to compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda shape: (rng.standard_normal(shape) * 0.3).astype(np.float32),
      model_io.expected_shapes(CONFIG), is_leaf=lambda x: isinstance(x, tuple))


def plain(seed: int = 0):
  return jax.tree_util.tree_map(np.copy, _random_params(seed))


def boxed_variables(seed: int = 0):
  """As `Transformer.init` returns them: {'params': tree of nn.Partitioned}."""
  box = lambda x: nn.Partitioned(x, (None,) * x.ndim)  # noqa: E731
  return {"params": jax.tree_util.tree_map(box, plain(seed))}


def flat(tree) -> dict:
  return {model_io._path_str(p): np.asarray(x)  # pylint: disable=protected-access
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same_params(a, b) -> None:
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for key in fa:
    np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


def tokens():
  enc = np.array([[3, 16, 14, 25, 7, 1], [3, 9, 1, 0, 0, 0]], np.int32)
  tgt = np.array([[16, 14, 25, 1], [9, 1, 0, 0]], np.int32)
  inp = np.array([[0, 16, 14, 25], [0, 9, 0, 0]], np.int32)
  return dict(encoder_input_tokens=enc, decoder_input_tokens=inp, decoder_target_tokens=tgt)


def test_roundtrip(tmp_path):
  directory = str(tmp_path / "model")
  model_io.save_model(directory, CONFIG, boxed_variables(), extra_ids=226)  # boxed + wrapper
  assert sorted(os.listdir(directory)) == ["config.json", "params", "spiece.model", "vocab.json"]
  config, params, vocab_path = model_io.load_model(directory)
  assert config == CONFIG
  assert_same_params(params, plain())
  with open(vocab_path, "rb") as f, open(vocab_lib.VOCAB_PATH, "rb") as g:
    assert f.read() == g.read()
  assert model_io.load_extra_ids(directory) == 226
  assert sorted(os.listdir(tmp_path)) == ["model"]  # no temporary siblings left


def test_loaded_weights_are_placed_without_a_copy(tmp_path):
  """`load_model` hands back views of CPU-device buffers: placing them on the CPU device
  shares the memory instead of holding the model twice (numpy's own arrays are only
  16-byte aligned, which `jax.device_put` copies). They are read-only."""
  directory = str(tmp_path / "model")
  model_io.save_model(directory, CONFIG, plain())
  _, params, _ = model_io.load_model(directory)
  assert_same_params(params, plain())
  for leaf in jax.tree_util.tree_leaves(params):
    assert not leaf.flags.writeable
    placed = jax.device_put(leaf, jax.local_devices(backend="cpu")[0])
    assert placed.unsafe_buffer_pointer() == leaf.ctypes.data


def test_save_replaces_only_after_success(tmp_path, monkeypatch):
  directory = str(tmp_path / "model")
  model_io.save_model(directory, CONFIG, plain(0))
  assert model_io.load_extra_ids(directory) == vocab_lib.NUM_SENTINELS  # no vocab.json

  def broken_copy(*args, **kwargs):
    raise OSError("disk full")
  monkeypatch.setattr(model_io.shutil, "copyfile", broken_copy)
  with pytest.raises(OSError, match="disk full"):
    model_io.save_model(directory, CONFIG, plain(1))
  with pytest.raises(OSError, match="disk full"):
    model_io.save_model(str(tmp_path / "new"), CONFIG, plain(1))
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ["model"]
  assert_same_params(model_io.load_model(directory)[1], plain(0))
  model_io.save_model(directory, CONFIG, plain(1))  # a successful save replaces it
  assert_same_params(model_io.load_model(directory)[1], plain(1))
  assert sorted(os.listdir(tmp_path)) == ["model"]


def test_save_rejects_params_not_matching_config(tmp_path):
  params = plain()
  with pytest.raises(ValueError, match=r"decoder/layers_0/mlp/wi_0/kernel has shape \(32, 48\), "
                                       r"expected \(32, 96\)"):
    model_io.save_model(str(tmp_path / "m"), CONFIG.replace(d_ff=96), params)
  assert not os.path.exists(tmp_path / "m")
  with pytest.raises(ValueError, match="missing parameter decoder/layers_3/"):
    model_io.save_model(str(tmp_path / "m"), CONFIG.replace(num_decoder_layers=4), params)
  with pytest.raises(ValueError, match="unexpected parameter decoder/logits_dense/kernel"):
    model_io.save_model(str(tmp_path / "m"), CONFIG.replace(tie_word_embeddings=True), params)


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="model directory not found"):
    model_io.load_model(str(tmp_path / "absent"))
  good = str(tmp_path / "good")
  model_io.save_model(good, CONFIG, plain())

  def broken(name, damage):
    directory = str(tmp_path / name)
    model_io.save_model(directory, CONFIG, plain())
    damage(directory)
    return directory

  d = broken("noconfig", lambda d: os.remove(os.path.join(d, "config.json")))
  with pytest.raises(FileNotFoundError, match=f"{d} is not a model directory: config.json"):
    model_io.load_model(d)
  d = broken("badjson", lambda d: open(os.path.join(d, "config.json"), "w").write("{oops"))
  with pytest.raises(ValueError, match=f"corrupt {d}/config.json"):
    model_io.load_model(d)

  def unknown_field(d):
    path = os.path.join(d, "config.json")
    values = json.load(open(path))
    values["d_modle"] = 3
    json.dump(values, open(path, "w"))
  d = broken("badfield", unknown_field)
  with pytest.raises(ValueError,
                     match=r"corrupt .*config.json: unknown T5Config fields: \['d_modle'\]"):
    model_io.load_model(d)
  d = broken("nospiece", lambda d: os.remove(os.path.join(d, "spiece.model")))
  with pytest.raises(FileNotFoundError, match=f"{d}: spiece.model is missing"):
    model_io.load_model(d)
  d = broken("noparams", lambda d: __import__("shutil").rmtree(os.path.join(d, "params")))
  with pytest.raises(FileNotFoundError, match=f"{d}: params/ is missing"):
    model_io.load_model(d)

  def garble(d):
    for root, _, files in os.walk(os.path.join(d, "params")):
      for name in files:
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"\x00garbage")
  d = broken("garbled", garble)
  with pytest.raises(ValueError, match=f"corrupt or unreadable parameters in {d}/params"):
    model_io.load_model(d)

  def other_config(d):
    path = os.path.join(d, "config.json")
    values = json.load(open(path))
    values["d_ff"] = 96
    json.dump(values, open(path, "w"))
  d = broken("mismatch", other_config)
  with pytest.raises(ValueError,
                     match=r"params: parameter decoder/layers_0/mlp/wi_0/kernel has shape"):
    model_io.load_model(d)
  model_io.load_model(good)  # untouched by the others


def test_stack_unstack_and_scanned_outputs(tmp_path):
  params = plain()
  stacked = model_io.stack_layers(params, CONFIG)
  assert "layers" in stacked["encoder"] and "layers_0" not in stacked["encoder"]
  assert stacked["decoder"]["layers"]["mlp"]["wo"]["kernel"].shape == (3, 48, 32)
  assert_same_params(model_io.unstack_layers(stacked, CONFIG), params)
  assert_same_params(model_io.stack_layers(stacked, CONFIG), stacked)  # already stacked
  scanned = CONFIG.replace(scan_layers=True)
  # The stacked tree is exactly what a scan_layers=True model initialises.
  expected = model_io.expected_shapes(scanned)
  assert jax.tree_util.tree_map(np.shape, stacked) == jax.tree_util.tree_map(
      tuple, expected, is_leaf=lambda x: isinstance(x, tuple))
  batch = tokens()
  outputs = {}
  for config, p in ((CONFIG, params), (scanned, stacked)):
    model = Transformer(config)
    encoded = model.apply({"params": p}, batch["encoder_input_tokens"], enable_dropout=False,
                          method=Transformer.encode)
    logits = model.apply({"params": p}, **batch, enable_dropout=False)
    outputs[config.scan_layers] = (np.asarray(encoded), np.asarray(logits))
  for a, b in zip(outputs[False], outputs[True]):
    np.testing.assert_allclose(a, b, atol=1e-5)  # scan vs unrolled: float rounding only
  # save_model stores the layout the config names; load_model returns it.
  model_io.save_model(str(tmp_path / "s"), scanned, params)
  config, loaded, _ = model_io.load_model(str(tmp_path / "s"))
  assert config.scan_layers
  assert_same_params(loaded, stacked)
  with pytest.raises(ValueError, match="expected exactly layers_0..layers_2"):
    bad = dict(params, decoder={k: v for k, v in params["decoder"].items() if k != "layers_1"})
    model_io.stack_layers(bad, CONFIG)
