"""Cached autoregressive decoding of the Ankh3 decoder: greedy, sampling, beam search.

The decoder starts from pad (id 0) and extends one token per step with its key/value
cache inside compiled `jax.lax.while_loop`s, one per segment of `decode_segments` (the
self-attention cache grows segment by segment), until every row has emitted eos or
`max_new_tokens` tokens. `compiled_generate` is the whole jitted program (encoder
included); `ankh3_jax.complete` turns prompts into its inputs and its outputs into text.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from ankh3_jax import cpu_tuning
from ankh3_jax import inference
from ankh3_jax import vocab
from ankh3_jax.model import Transformer

STRATEGIES = ("greedy", "sample", "beam")
NEG_INF = -1.0e9  # finite, so sums and comparisons stay well defined


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """Static (compile-time) settings of the decode loop; the rest are traced inputs."""
  strategy: str
  max_new_tokens: int
  num_beams: int


def _model_step(module, params, cache, encoded, encoder_tokens, last, max_len):
  """One cached decoder step: [rows] previous tokens -> [rows, vocab] float32 logits."""
  logits, variables = module.apply(
      {"params": params, "cache": cache}, encoded, encoder_tokens, last[:, None],
      last[:, None], enable_dropout=False, decode=True, max_decode_length=max_len,
      method=Transformer.decode, mutable=["cache"])
  return logits[:, 0].astype(jnp.float32), variables["cache"]


def _init_cache(module, params, encoded, encoder_tokens, max_len):
  zeros = jnp.zeros((encoded.shape[0], max_len), jnp.int32)
  _, variables = module.apply(
      {"params": params}, encoded, encoder_tokens, zeros, zeros, enable_dropout=False,
      decode=True, max_decode_length=max_len, cache_encoder_kv=True,
      method=Transformer.decode, mutable=["cache"])
  return variables["cache"]


def decode_segments(steps: int) -> list:
  """Ends of the decode loop's segments: 16, 24, 32, 48, 64, 96, ... up to `steps`.

  The self-attention cache grows to each end in turn (`grow_cache`), so a step reads at
  most 1.5x the positions it attends to instead of the whole `max_new_tokens` cache.
  """
  ends = []
  while not ends or ends[-1] < steps:
    ends.append(min(inference.length_bucket((ends[-1] if ends else 0) + 1, 16, 2), steps))
  return ends


def grow_cache(cache, length: int):
  """Pads the self-attention keys and values ([..., length, d_kv]) to `length` positions."""
  def grow(path, x):
    if "self_attention" not in jax.tree_util.keystr(path) or x.ndim < 4:
      return x
    pad = [(0, 0)] * (x.ndim - 2) + [(0, length - x.shape[-2]), (0, 0)]
    return jnp.pad(x, pad)
  return jax.tree_util.tree_map_with_path(grow, cache)


def _segmented_loop(make_cond, make_body, state, steps: int):
  """`jax.lax.while_loop` over `decode_segments(steps)`; state[3] is the cache."""
  for end in decode_segments(steps):
    state = state[:3] + (grow_cache(state[3], end),) + state[4:]
    state = jax.lax.while_loop(make_cond(end), make_body(end), state)
  return state


def filter_logits(logits, temperature, top_k, top_p):
  """Temperature, then top-k (0 = off), then nucleus top-p (1.0 = off); [rows, vocab].

  All three may be traced values, so changing them does not recompile.
  """
  logits = logits / jnp.maximum(temperature, 1e-6)
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  vocab_size = logits.shape[-1]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab_size), vocab_size)
  kth = jax.lax.dynamic_slice_in_dim(sorted_logits, k - 1, 1, axis=logits.ndim - 1)
  sorted_logits = jnp.where(sorted_logits < kth, NEG_INF, sorted_logits)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  # Keep a token if the mass strictly before it is below top_p (the first always stays).
  before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = (before < top_p) & (sorted_logits > NEG_INF / 2)
  keep = jnp.zeros_like(keep_sorted).at[
      jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
  return jnp.where(keep, logits, NEG_INF)


def _sample_loop(module, opts: DecodeOptions, knobs, params, encoded, encoder_tokens, valid):
  """Greedy or sampling; returns (tokens [B, T], log_prob [B], finished [B])."""
  rows, steps = encoded.shape[0], opts.max_new_tokens
  cache = _init_cache(module, params, encoded, encoder_tokens, decode_segments(steps)[0])

  def make_cond(end):
    def cond(state):
      i, _, _, _, done, _ = state
      return (i < end) & ~jnp.all(done)
    return cond

  def make_body(end):
    return functools.partial(body, end)

  def body(end, state):
    i, tokens, last, cache, done, total = state
    logits, cache = _model_step(module, params, cache, encoded, encoder_tokens, last, end)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    masked = jnp.where(knobs["allowed"], logits, NEG_INF)
    if opts.strategy == "greedy":
      nxt = jnp.argmax(masked, axis=-1)
    else:
      filtered = filter_logits(masked, knobs["temperature"], knobs["top_k"], knobs["top_p"])
      nxt = jax.random.categorical(jax.random.fold_in(knobs["rng"], i), filtered, axis=-1)
    nxt = jnp.where(done, vocab.PAD_ID, nxt).astype(jnp.int32)
    step_lp = jnp.take_along_axis(log_probs, nxt[:, None], axis=-1)[:, 0]
    total = total + jnp.where(done, 0.0, step_lp)
    tokens = tokens.at[:, i].set(nxt)
    done = done | (nxt == vocab.EOS_ID)
    return i + 1, tokens, nxt, cache, done, total

  state = (jnp.int32(0), jnp.zeros((rows, steps), jnp.int32),
           jnp.zeros((rows,), jnp.int32), cache, ~valid,
           jnp.zeros((rows,), jnp.float32))
  _, tokens, _, _, done, total = _segmented_loop(make_cond, make_body, state, steps)
  return tokens, total, total, done


def _gather_cache(cache, index, batch_axis: int):
  """Reorders the cache rows (beam search); scalars such as the cache index stay."""
  def take(x):
    return jnp.take(x, index, axis=batch_axis) if x.ndim > batch_axis else x
  return jax.tree.map(take, cache)


def _beam_loop(module, opts: DecodeOptions, knobs, params, encoded, encoder_tokens, valid):
  """Beam search; returns the best finished hypothesis of each row.

  Hypotheses end when eos is among the top `num_beams` candidates of a step (as in
  transformers); at `max_new_tokens` the alive beams are closed. Scores are
  log_prob / length ** length_penalty. A row stops early once its worst kept finished
  score beats the best score an alive beam could still reach.
  """
  batch, beams, steps = encoded.shape[0], opts.num_beams, opts.max_new_tokens
  vocab_size = module.config.vocab_size
  alpha = knobs["length_penalty"]
  batch_axis = 1 if module.config.scan_layers else 0
  encoded = jnp.repeat(encoded, beams, axis=0)
  encoder_tokens = jnp.repeat(encoder_tokens, beams, axis=0)
  cache = _init_cache(module, params, encoded, encoder_tokens, decode_segments(steps)[0])

  def penalty(length):
    return jnp.asarray(length, jnp.float32) ** alpha

  def make_cond(end):
    def cond(state):
      i, alive_lp, fin_scores = state[0], state[2], state[5]
      # Log-probs only fall as a beam grows; with alpha > 0 the longest length divides most.
      best_possible = alive_lp[:, 0] / jnp.where(alpha > 0, penalty(steps), penalty(i + 1))
      settled = (fin_scores[:, -1] >= best_possible) | ~valid
      return (i < end) & ~jnp.all(settled)
    return cond

  def make_body(end):
    return functools.partial(body, end)

  def body(end, state):
    i, alive, alive_lp, cache, fin, fin_scores, fin_lp, fin_done = state
    last = jnp.where(i > 0, alive[:, :, jnp.maximum(i - 1, 0)], vocab.PAD_ID)
    logits, cache = _model_step(module, params, cache, encoded, encoder_tokens,
                                last.reshape(-1), end)
    log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(batch, beams, vocab_size)
    log_probs = jnp.where(knobs["allowed"], log_probs, NEG_INF)
    cand = (alive_lp[:, :, None] + log_probs).reshape(batch, beams * vocab_size)
    cand_lp, cand_idx = jax.lax.top_k(cand, 2 * beams)
    cand_beam, cand_tok = cand_idx // vocab_size, (cand_idx % vocab_size).astype(jnp.int32)
    cand_seq = jnp.take_along_axis(alive, cand_beam[:, :, None], axis=1)
    cand_seq = cand_seq.at[:, :, i].set(cand_tok)
    is_eos = cand_tok == vocab.EOS_ID
    # Alive: the best `beams` candidates that did not end.
    alive_score = jnp.where(is_eos, NEG_INF, cand_lp)
    new_alive_lp, pick = jax.lax.top_k(alive_score, beams)
    new_alive = jnp.take_along_axis(cand_seq, pick[:, :, None], axis=1)
    src_beam = jnp.take_along_axis(cand_beam, pick, axis=1)
    flat = (jnp.arange(batch)[:, None] * beams + src_beam).reshape(-1)
    cache = _gather_cache(cache, flat, batch_axis)
    # Finished: eos candidates ranked within the top `beams`, or every top candidate at
    # the last step.
    rank_ok = jnp.arange(2 * beams)[None, :] < beams
    last_step = i == steps - 1
    ends = rank_ok & (is_eos | last_step) & (cand_lp > NEG_INF / 2)
    length = i + 1
    new_scores = jnp.where(ends, cand_lp / penalty(length), NEG_INF)
    all_seq = jnp.concatenate([fin, cand_seq], axis=1)
    all_scores = jnp.concatenate([fin_scores, new_scores], axis=1)
    all_lp = jnp.concatenate([fin_lp, cand_lp], axis=1)
    all_done = jnp.concatenate([fin_done, is_eos], axis=1)
    fin_scores, keep = jax.lax.top_k(all_scores, beams)
    fin = jnp.take_along_axis(all_seq, keep[:, :, None], axis=1)
    fin_lp = jnp.take_along_axis(all_lp, keep, axis=1)
    fin_done = jnp.take_along_axis(all_done, keep, axis=1)
    return i + 1, new_alive, new_alive_lp, cache, fin, fin_scores, fin_lp, fin_done

  start_lp = jnp.full((batch, beams), NEG_INF).at[:, 0].set(0.0)
  state = (jnp.int32(0), jnp.zeros((batch, beams, steps), jnp.int32), start_lp, cache,
           jnp.zeros((batch, beams, steps), jnp.int32), jnp.full((batch, beams), NEG_INF),
           jnp.zeros((batch, beams), jnp.float32), jnp.zeros((batch, beams), bool))
  state = _segmented_loop(make_cond, make_body, state, steps)
  fin, fin_scores, fin_lp, fin_done = state[4:]
  return fin[:, 0], fin_lp[:, 0], fin_scores[:, 0], fin_done[:, 0]


@functools.lru_cache(maxsize=32)
def compiled_generate(config, opts: DecodeOptions):
  """Jitted `generate(params, encoder_tokens [B, L], knobs)` -> (tokens [B, T], log_prob,
  score, finished [B]), one per (config, static options).

  `knobs`: `allowed` [vocab] bool, `temperature`, `top_k`, `top_p`, `length_penalty` and
  `rng` (traced: changing them does not recompile). Encoder rows whose first token is pad
  are batch padding and finish at once.

  Matmuls use Eigen's kernels (`cpu_tuning.eigen_dot_options`: less overhead per call,
  what small decoders' steps are made of), except with the decoder's kernels held
  'out_in' (`inference.decoder_kernel_layout`): XLA's default streams those faster.
  """
  module = Transformer(config)

  def generate(params, encoder_tokens, knobs):
    encoded = module.apply({"params": params}, encoder_tokens, enable_dropout=False,
                           method=Transformer.encode)
    valid = encoder_tokens[:, 0] > 0  # rows padding the batch are empty
    loop = _beam_loop if opts.strategy == "beam" else _sample_loop
    return loop(module, opts, knobs, params, encoded, encoder_tokens, valid)

  options = cpu_tuning.eigen_dot_options() if config.decoder_kernels == "in_out" else None
  return jax.jit(generate, compiler_options=options)
