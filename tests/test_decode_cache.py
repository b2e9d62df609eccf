"""Incremental decoding with the attention cache: equal to teacher forcing, and greedy
decoding equal to transformers' `generate` on an imported checkpoint."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import hf_fixtures as hf  # pylint: disable=g-import-not-at-top,wrong-import-position
from ankh3_jax import config as config_lib  # pylint: disable=wrong-import-position
from ankh3_jax import layers  # pylint: disable=wrong-import-position
from ankh3_jax import model_io  # pylint: disable=g-import-not-at-top,wrong-import-position
from ankh3_jax import vocab as vocab_lib  # pylint: disable=wrong-import-position
from ankh3_jax.model import Transformer  # pylint: disable=g-import-not-at-top,wrong-import-position

NAME = "gelu_untied_b8"  # 8 buckets, max distance 16: steps past it use the log buckets
STEPS = 20


ENCODER_LENGTHS = (11, 6, 3)


@functools.lru_cache(maxsize=None)
def compiled(name: str, scan: bool):
  """(model, params, encode, init_cache, step) for one imported model, jitted once.

  init_cache(encoded, encoder_tokens) runs the decode=True call on full-shape zeros that
  creates the cache; step(cache, encoded, encoder_tokens, token [B, 1]) -> (logits, cache).
  """
  config, params, _ = hf.imported(name)
  config = config.replace(scan_layers=scan)
  model, params = Transformer(config), model_io.layout_for(params, config)
  kwargs = dict(enable_dropout=False, decode=True, max_decode_length=STEPS, mutable=["cache"],
                method=Transformer.decode)

  @jax.jit
  def encode(encoder_tokens):
    return model.apply({"params": params}, encoder_tokens, enable_dropout=False,
                       method=Transformer.encode)

  @functools.partial(jax.jit, static_argnames="store")
  def init_cache(encoded, encoder_tokens, store=False):
    zeros = jnp.zeros((encoder_tokens.shape[0], STEPS), jnp.int32)
    return model.apply({"params": params}, encoded, encoder_tokens, zeros, zeros,
                       cache_encoder_kv=store, **kwargs)[1]["cache"]

  @jax.jit
  def step(cache, encoded, encoder_tokens, token):
    logits, state = model.apply({"params": params, "cache": cache}, encoded, encoder_tokens,
                                token, token, **kwargs)
    return logits, state["cache"]

  return model, params, encode, init_cache, step


@pytest.mark.parametrize("name,scan,init", [
    (NAME, False, "real"), (NAME, True, "real"), ("silu_tied_b32", False, "real"),
    (NAME, False, "dummy"), (NAME, False, "stored"), (NAME, True, "stored")],
    ids=["unscanned", "scanned", "tied-unscanned", "t5x-dummy-init", "stored-kv",
         "stored-kv-scanned"])
def test_cached_steps_equal_teacher_forcing(name, scan, init):
  """init 'dummy' creates the cache from all-ones encoder inputs, as t5x does (steps
  project the encoder output); 'stored' keeps the cross-attention keys and values."""
  model, params, encode, init_cache, step = compiled(name, scan)
  tokens = hf.batch(seed=3, lengths=ENCODER_LENGTHS, target_lengths=(STEPS,) * 3)
  full = np.asarray(model.apply({"params": params}, **tokens, enable_dropout=False))
  encoder_tokens = tokens["encoder_input_tokens"]
  encoded = encode(encoder_tokens)
  if init == "dummy":
    cache = init_cache(jnp.ones_like(encoded), jnp.ones_like(encoder_tokens))
  else:
    cache = init_cache(encoded, encoder_tokens, store=init == "stored")
  cross = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(cache)
           if "encoder_decoder_attention" in jax.tree_util.keystr(p)]
  assert bool(cross) == (init == "stored"), cross
  stepped = []
  for t in range(STEPS):
    logits, cache = step(cache, encoded, encoder_tokens,
                         tokens["decoder_input_tokens"][:, t:t + 1])
    stepped.append(np.asarray(logits[:, 0]))
  diff = float(np.abs(np.stack(stepped, axis=1) - full).max())
  print(f"{name} scan={scan}: cached vs teacher forcing max|diff| {diff:.2e} "
        f"(max|logit| {np.abs(full).max():.1f})")
  assert diff < 1e-5


def greedy(name: str, scan: bool, encoder_tokens: np.ndarray) -> np.ndarray:
  """Greedy decoding with the cache; positions after a row's eos are pad (0), as HF does."""
  _, _, encode, init_cache, step = compiled(name, scan)
  encoded = encode(encoder_tokens)
  cache = init_cache(encoded, encoder_tokens)
  token = jnp.zeros((encoder_tokens.shape[0], 1), jnp.int32)
  done = np.zeros(encoder_tokens.shape[0], bool)
  out = []
  for _ in range(STEPS):
    logits, cache = step(cache, encoded, encoder_tokens, token)
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    emitted = np.where(done, vocab_lib.PAD_ID, np.asarray(token[:, 0]))
    done |= emitted == vocab_lib.EOS_ID
    out.append(emitted)
  return np.stack(out, axis=1)


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_greedy_equals_hf_generate(scan):
  import torch  # pylint: disable=g-import-not-at-top

  encoder_tokens = hf.batch(seed=4, lengths=ENCODER_LENGTHS)["encoder_input_tokens"]
  ids = torch.tensor(encoder_tokens, dtype=torch.long)
  with torch.no_grad():
    theirs = hf.hf_model(NAME).generate(
        input_ids=ids, attention_mask=(ids > 0).long(), do_sample=False, num_beams=1,
        max_new_tokens=STEPS).numpy()
  assert (theirs[:, 0] == vocab_lib.PAD_ID).all()  # decoder start token
  theirs = theirs[:, 1:]
  mine = greedy(NAME, scan, encoder_tokens)
  assert len(set(mine[0].tolist())) > 1  # not a degenerate sequence
  np.testing.assert_array_equal(mine[:, :theirs.shape[1]], theirs)
  assert (mine[:, theirs.shape[1]:] == vocab_lib.PAD_ID).all()


def _step_matmuls(model_step) -> int:
  """dot_general operations in one decode step of `compiled(...)`'s model."""
  model, params, encode, init_cache, step = model_step
  tokens = hf.batch(seed=3, lengths=ENCODER_LENGTHS, target_lengths=(STEPS,) * 3)
  encoder_tokens = tokens["encoder_input_tokens"]
  encoded = encode(encoder_tokens)
  cache = init_cache(encoded, encoder_tokens, store=True)
  jaxpr = jax.make_jaxpr(step)(cache, encoded, encoder_tokens,
                               tokens["decoder_input_tokens"][:, :1])

  def count(eqns):
    n = 0
    for eqn in eqns:
      n += eqn.primitive.name == "dot_general"
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        n += count(sub.eqns)
    return n

  return count(jaxpr.eqns)


def test_decode_steps_fuse_the_projections():
  """A step makes one matmul for the self-attention query, key and value, and one for the
  gated MLP's two inputs: per layer 2 (self) + 2 (cross) + 2 (MLP) projections and 4
  attention products, plus the position bias table and the logits (unfused: 13 per
  layer)."""
  model_step = compiled(NAME, False)
  config = model_step[0].config
  assert config.is_gated
  assert _step_matmuls(model_step) == 10 * config.num_decoder_layers + 2


def test_large_decoders_do_not_fuse(monkeypatch):
  """Above `FUSED_COPY_LIMIT_BYTES` the kernels stay apart (XLA would hold their
  concatenation for the whole program): 13 matmuls per layer, the same tokens. The
  released shapes are above it, the small presets below."""
  assert layers.fused_copy_bytes(config_lib.preset("small")) <= layers.FUSED_COPY_LIMIT_BYTES
  for name in ("ankh_base", "ankh3_large"):
    assert layers.fused_copy_bytes(config_lib.preset(name)) > layers.FUSED_COPY_LIMIT_BYTES
  encoder_tokens = hf.batch(seed=4, lengths=ENCODER_LENGTHS)["encoder_input_tokens"]
  fused = greedy(NAME, False, encoder_tokens)
  monkeypatch.setattr(layers, "FUSED_COPY_LIMIT_BYTES", 0)
  compiled.cache_clear()  # traced afresh under the new limit
  try:
    model_step = compiled(NAME, False)
    assert _step_matmuls(model_step) == 13 * model_step[0].config.num_decoder_layers + 2
    np.testing.assert_array_equal(greedy(NAME, False, encoder_tokens), fused)
  finally:
    compiled.cache_clear()
