"""Protein sequence completion with the Ankh3 decoder (`ankh3-complete`).

The encoder reads `[S2S] + prompt + eos` (as `tokenizer("[S2S]" + prompt)` does for the
released models); the decoder continues it (`ankh3_jax.decoding`: the cached decode loop)
until eos or `max_new_tokens` tokens. Strategies: greedy, sampling (temperature, top-k,
top-p) and beam search. With `residues_only=False` (the API default) any token may be generated,
as with transformers' `generate`; `residues_only=True` restricts steps to residues and eos.
"""
import argparse
import dataclasses
import functools
import math
import os
import sys
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ankh3_jax import cli
from ankh3_jax import cpu_tuning
from ankh3_jax import decoding
from ankh3_jax import inference
from ankh3_jax import inference_memory
from ankh3_jax import inference_mesh
from ankh3_jax import output_paths
from ankh3_jax import quiet
from ankh3_jax import vocab
from ankh3_jax.data import fasta
from ankh3_jax.model import Transformer

PROG = "ankh3-complete"
STRATEGIES = decoding.STRATEGIES
MIN_ENCODER_BUCKET = 16
MAX_INT_FLAG = 2 ** 31 - 1
MAX_SEED = 2 ** 32 - 1
MAX_LENGTH_PENALTY = 100.0


@dataclasses.dataclass(frozen=True)
class Completion:
  """One continuation: its text, generated ids (eos included if emitted) and scores."""
  text: str
  token_ids: tuple
  log_prob: float       # sum of the model's log-probabilities of `token_ids`
  score: float          # ranking score (beam: log_prob / length ** length_penalty)
  finished: bool        # True if eos was generated


def _check_prompts(prompts: Sequence[str]) -> list:
  out = []
  for i, prompt in enumerate(prompts):
    bad = set(prompt.upper()) - set(vocab.RESIDUES)
    if bad:
      raise ValueError(f"prompt #{i}: illegal residue(s) {sorted(bad)} (allowed: "
                       f"{vocab.RESIDUES})")
    out.append(prompt.upper())
  return out


def check_options(*, max_new_tokens: int = 64, strategy: str = "greedy",
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  num_beams: int = 4, length_penalty: float = 1.0, seed: int = 0,
                  batch_size: int = 8) -> None:
  """Raises ValueError naming the first option out of range (no model needed)."""
  def need(ok: bool, name: str, rule: str, value) -> None:
    if not ok:
      raise ValueError(f"{name} must be {rule}, got {value!r}")

  need(strategy in STRATEGIES, "strategy", f"one of {STRATEGIES}", strategy)
  need(1 <= max_new_tokens <= MAX_INT_FLAG, "max_new_tokens", f"in [1, {MAX_INT_FLAG}]",
       max_new_tokens)
  need(1 <= batch_size <= MAX_INT_FLAG, "batch_size", f"in [1, {MAX_INT_FLAG}]", batch_size)
  need(1 <= num_beams <= MAX_INT_FLAG, "num_beams", f"in [1, {MAX_INT_FLAG}]", num_beams)
  need(0 <= top_k <= MAX_INT_FLAG, "top_k", f"in [0, {MAX_INT_FLAG}] (0: off)", top_k)
  need(0 <= seed <= MAX_SEED, "seed", f"in [0, {MAX_SEED}]", seed)
  # float32 holds it (the loop computes in float32): finite and in range.
  need(math.isfinite(temperature) and 1e-6 <= temperature <= 1e6, "temperature",
       "a number in [1e-6, 1e6]", temperature)
  need(math.isfinite(top_p) and 0 < top_p <= 1, "top_p", "in (0, 1] (1: off)", top_p)
  need(math.isfinite(length_penalty) and abs(length_penalty) <= MAX_LENGTH_PENALTY,
       "length_penalty", f"a number in [-{MAX_LENGTH_PENALTY:g}, {MAX_LENGTH_PENALTY:g}]",
       length_penalty)


def check_memory(config, *, max_new_tokens: int, batch_size: int, num_beams: int,
                 strategy: str) -> None:
  """Raises ValueError if the decode loop's cache cannot fit in memory."""
  rows = batch_size * (num_beams if strategy == "beam" else 1)
  need = inference_memory.decode_bytes(config, rows, max_new_tokens)
  limit = inference_memory.available_bytes()
  if need > limit:
    fits = max(0, limit // max(1, inference_memory.decode_bytes(config, rows, 1)))
    raise ValueError(
        f"max_new_tokens={max_new_tokens} needs about {inference_memory.gigabytes(need)} "
        f"of decoder cache for {rows} row(s) (batch_size x beams), more than the "
        f"{inference_memory.gigabytes(limit)} available; at most about {fits} new tokens "
        "fit (or lower --batch_size / --num_beams)")


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What `complete` runs: one compiled loop, its batches and where they run."""
  generate: Any           # `decoding.compiled_generate`
  knobs: dict             # its traced options, but the per-batch rng
  rng: Any
  layout: inference_mesh.Layout
  batches: list           # (token id lists of the prompts, padded tokens [batch, length])


def _plan(loaded: inference.LoadedModel, prompts: Sequence[str], *, max_new_tokens: int,
          strategy: str, temperature: float, top_k: int, top_p: float, num_beams: int,
          length_penalty: float, seed: int, batch_size: int, residues_only: bool,
          mesh: Optional[str], param_dims: Optional[int],
          layout: Optional[inference_mesh.Layout]) -> _Plan:
  if "decoder" not in loaded.params:
    raise ValueError("the model has no decoder (an encoder-only checkpoint): completion "
                     "needs an encoder-decoder model")
  check_memory(loaded.config, max_new_tokens=max_new_tokens, batch_size=min(
      batch_size, inference.next_power_of_two(max(1, len(prompts)))), num_beams=num_beams,
               strategy=strategy)
  prompts = _check_prompts(prompts)
  vocab_size = loaded.config.vocab_size
  allowed = np.ones(vocab_size, bool)
  if residues_only:
    allowed[:] = False
    allowed[inference.residue_token_ids(loaded.vocab_path) + [vocab.EOS_ID]] = True
  opts = decoding.DecodeOptions(strategy, int(max_new_tokens),
                                int(num_beams) if strategy == "beam" else 1)
  knobs = {"allowed": allowed, "temperature": np.float32(temperature),
           "top_k": np.int32(top_k), "top_p": np.float32(top_p),
           "length_penalty": np.float32(length_penalty)}
  token_lists = [inference.tokenize(p, vocab.S2S_TOKEN, loaded.vocab_path, f"#{i}")
                 for i, p in enumerate(prompts)]
  batch_size = min(batch_size, inference.next_power_of_two(len(prompts)))
  layout = layout or inference_mesh.choose_layout(
      inference_memory.params_bytes(loaded.params), mesh=mesh, param_dims=param_dims,
      work_bytes=inference_memory.decode_bytes(loaded.config, batch_size * opts.num_beams,
                                               max_new_tokens))
  batch_size = inference_mesh.padded_rows(batch_size, layout)
  batches = []
  for start in range(0, len(prompts), batch_size):
    rows = token_lists[start:start + batch_size]
    length = inference.length_bucket(max(len(r) for r in rows), MIN_ENCODER_BUCKET)
    batches.append((rows, inference.pad_rows(rows, length, batch_size)))
  return _Plan(decoding.compiled_generate(loaded.config, opts), knobs,
               jax.random.PRNGKey(seed), layout, batches)


def _checked_options(*, max_new_tokens: int = 64, strategy: str = "greedy",
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     num_beams: int = 4, length_penalty: float = 1.0, seed: int = 0,
                     batch_size: int = 8, residues_only: bool = False,
                     dtype: str = "float32", param_dtype: Optional[str] = None,
                     mesh: Optional[str] = None, param_dims: Optional[int] = None,
                     layout: Optional[inference_mesh.Layout] = None) -> dict:
  """`complete`'s options with their defaults, checked (ValueError naming the first
  one out of range)."""
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
  options = dict(max_new_tokens=max_new_tokens, strategy=strategy, temperature=temperature,
                 top_k=top_k, top_p=top_p, num_beams=num_beams,
                 length_penalty=length_penalty, seed=seed, batch_size=batch_size)
  check_options(**options)
  return dict(options, residues_only=residues_only, dtype=dtype, param_dtype=param_dtype,
              mesh=mesh, param_dims=param_dims, layout=layout)


def precompile(model_dir: Union[str, os.PathLike], prompts: Sequence[str],
               **options) -> bool:
  """Compiles the programs `complete(model_dir, prompts, **options)` runs from the
  directory's config and stored shapes, before its weights are read, and hands the
  compiler's freed working memory back to the OS: the process's peak is then the
  weights plus the programs, not the weights plus the compiler. Bad options and prompts
  fail here, before any weight is read. True if it compiled; False without prompts or on
  a mesh of several devices (those programs compile as they first run)."""
  options = _checked_options(**options)
  dtype, param_dtype = options.pop("dtype"), options.pop("param_dtype")
  abstract = inference.abstract_model(model_dir, dtype, param_dtype)
  plan = _plan(abstract, prompts, **options)
  if not plan.layout.single or not plan.batches:
    return False
  rows = plan.batches[0][1].shape[0]
  with inference.matmul_precision(dtype):
    for length in sorted({tokens.shape[1] for _, tokens in plan.batches}):
      plan.generate.lower(abstract.params, np.zeros((rows, length), np.int32),
                          {**plan.knobs, "rng": jax.random.fold_in(plan.rng, 0)}).compile()
  cpu_tuning.return_freed_memory()
  return True


def complete(model: inference.ModelArg, prompts: Sequence[str], *,
             max_new_tokens: int = 64, strategy: str = "greedy", temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, num_beams: int = 4,
             length_penalty: float = 1.0, seed: int = 0, batch_size: int = 8,
             residues_only: bool = False, dtype: str = "float32",
             param_dtype: Optional[str] = None, mesh: Optional[str] = None,
             param_dims: Optional[int] = None,
             layout: Optional[inference_mesh.Layout] = None, on_layout=None) -> list:
  """Continues each prompt; returns a `Completion` per prompt, in order.

  Args:
    model: a model directory (our format), `(config, params)` or a `LoadedModel`. A
      directory's programs are compiled before its weights are read (`precompile`).
    prompts: residue strings (the part before the cut).
    max_new_tokens: most tokens generated per prompt (eos included).
    strategy: 'greedy', 'sample' or 'beam'.
    temperature, top_k, top_p: sampling filters (top_k 0 and top_p 1.0 are off).
    num_beams, length_penalty: beam search width and score = log_prob / len ** penalty.
    seed: sampling seed; the same seed, prompts and batch size give the same output.
    batch_size: prompts decoded together; a batch is padded to this size, or to the next
      power of two above the number of prompts when that is smaller (one compile each).
    residues_only: allow only residue tokens and eos at each step.
    dtype: 'float32' or 'bfloat16'.
    param_dtype: weight storage dtype (default `dtype`); 'bfloat16' halves the weights.
    mesh, param_dims, layout: device placement (`inference_mesh.choose_layout`); on
      several devices each batch is sharded over `data` and padded to a multiple of it
      (greedy and beam output do not change; sampling depends on the padded batch size).
  """
  options = _checked_options(
      max_new_tokens=max_new_tokens, strategy=strategy, temperature=temperature,
      top_k=top_k, top_p=top_p, num_beams=num_beams, length_penalty=length_penalty,
      seed=seed, batch_size=batch_size, residues_only=residues_only, dtype=dtype,
      param_dtype=param_dtype, mesh=mesh, param_dims=param_dims, layout=layout)
  if isinstance(model, (str, os.PathLike)):
    precompile(model, prompts, **options)
  del options["dtype"], options["param_dtype"]
  loaded = inference.resolve_model(model, dtype, param_dtype)
  plan = _plan(loaded, prompts, **options)
  # Placed once, not with every batch.
  params = (jax.device_put(loaded.params) if plan.layout.single else
            inference_mesh.shard_params(loaded.params, loaded.config, plan.layout))
  if on_layout is not None:
    on_layout(plan.layout)
  results = []
  for b, (rows, tokens) in enumerate(plan.batches):
    with inference.matmul_precision(dtype), inference_mesh.context(plan.layout):
      out = plan.generate(params, inference_mesh.put_batch(tokens, plan.layout),
                          {**plan.knobs, "rng": jax.random.fold_in(plan.rng, b)})
    ids, log_prob, score, finished = (np.asarray(x) for x in out)
    for r in range(len(rows)):
      row = ids[r].tolist()
      if vocab.EOS_ID in row:
        row = row[:row.index(vocab.EOS_ID) + 1]
      results.append(Completion(
          inference.detokenize(row, loaded.vocab_path, loaded.config.vocab_size),
          tuple(row), float(log_prob[r]), float(score[r]), bool(finished[r])))
  return results


@functools.lru_cache(maxsize=8)
def _compiled_scorer(config):
  """Jitted teacher-forced per-token log-probabilities [rows, length]."""
  module = Transformer(config)

  def token_log_probs(params, encoder_tokens, targets):
    inputs = jnp.concatenate([jnp.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
    logits = module.apply({"params": params}, encoder_tokens, inputs, targets,
                          enable_dropout=False)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]

  return jax.jit(token_log_probs)


def score_sequences(model: inference.ModelArg, prompts: Sequence[str],
                    continuations: Sequence[Sequence[int]], dtype: str = "float32") -> list:
  """Teacher-forced sum of log-probabilities of each continuation (ids, eos included if
  wanted) given `[S2S] + prompt + eos`; scores what `complete` returns."""
  return [float(lp.sum()) for lp in token_log_probs(model, prompts, continuations, dtype)]


def token_log_probs(model: inference.ModelArg, prompts: Sequence[str],
                    continuations: Sequence[Sequence[int]], dtype: str = "float32") -> list:
  """Teacher-forced log-probability of each token of each continuation (one float32
  array per continuation), given `[S2S] + prompt + eos`."""
  loaded = inference.resolve_model(model, dtype)
  prompts = _check_prompts(prompts)
  enc = [inference.tokenize(p, vocab.S2S_TOKEN, loaded.vocab_path) for p in prompts]
  enc_tokens = inference.pad_rows(enc, max(len(r) for r in enc))
  targets = inference.pad_rows([list(c) for c in continuations],
                               max(1, max(len(c) for c in continuations)))
  with inference.matmul_precision(dtype):
    picked = np.asarray(_compiled_scorer(loaded.config)(loaded.params, enc_tokens, targets))
  return [picked[r, :len(c)] for r, c in enumerate(continuations)]


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog=PROG, description="Complete protein sequences with an Ankh3 "
      "model: the encoder reads [S2S] + prompt, the decoder writes the continuation.")
  p.add_argument("--model_dir", required=True, help="model directory (our format)")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--fasta", help="FASTA of prompts (or of full sequences with --cut)")
  src.add_argument("--prompt", action="append", help="a prompt sequence (repeatable)")
  p.add_argument("--cut", type=float, default=None,
                 help="use only this leading fraction of each sequence as the prompt "
                 "(e.g. 0.5, as in the model card)")
  p.add_argument("--output", default=None, help="output FASTA (default: stdout)")
  p.add_argument("--max_length", type=int, default=4096,
                 help="refuse prompts longer than this many residues (attention memory "
                 "grows with the square of the length)")
  p.add_argument("--strategy", choices=STRATEGIES, default="greedy")
  p.add_argument("--max_new_tokens", type=int, default=256)
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--num_beams", type=int, default=4)
  p.add_argument("--length_penalty", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  p.add_argument("--residues_only", action=argparse.BooleanOptionalAction, default=True,
                 help="generate only residues and eos (default; --no-residues_only "
                 "reproduces transformers' generate, which may emit any token)")
  p.add_argument("--continuation_only", action="store_true",
                 help="write only the generated part (default: prompt + continuation)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing --output file")
  inference_mesh.add_flags(p, distributed=False)
  quiet.add_flag(p)
  return p


def check_flags(args: argparse.Namespace) -> None:
  """Raises ValueError for a flag out of range, and checks --output can be written: all
  before the model is loaded, so a mistake costs no generation."""
  check_options(max_new_tokens=args.max_new_tokens, strategy=args.strategy,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                num_beams=args.num_beams, length_penalty=args.length_penalty,
                seed=args.seed, batch_size=args.batch_size)
  if not 1 <= args.max_length <= MAX_INT_FLAG:
    raise ValueError(f"--max_length must be in [1, {MAX_INT_FLAG}], got {args.max_length}")
  if args.cut is not None and not (math.isfinite(args.cut) and 0 < args.cut <= 1):
    raise ValueError(f"--cut must be in (0, 1], got {args.cut}")
  if args.output:
    output_paths.check_output_file(args.output, [args.fasta, args.model_dir],
                                   overwrite=args.overwrite, what="--output")


def _prompts_from_args(args) -> list:
  if args.fasta:
    records = [(r.id, r.sequence) for r in fasta.read_fasta(
        args.fasta, check_duplicates=True, max_length=args.max_length)]
  else:
    records = [(f"prompt_{i}", s) for i, s in enumerate(args.prompt)]
    for rid, s in records:
      if len(s) > args.max_length:
        raise ValueError(f"--prompt {rid}: {len(s)} residues, longer than "
                         f"--max_length={args.max_length}")
  if args.cut is not None:
    records = [(rid, s[:max(1, int(len(s) * args.cut))]) for rid, s in records]
  return records


def fasta_rows(records: Sequence[tuple], outs: Sequence[Completion],
               continuation_only: bool = False) -> list:
  """(id, description, sequence) per (id, prompt) record and its completion."""
  rows = []
  for (rid, prompt), out in zip(records, outs):
    text = out.text if continuation_only else prompt + out.text
    desc = (f"prompt_length={len(prompt)} new={len(out.text)} log_prob={out.log_prob:.4f} "
            f"finished={out.finished}")
    rows.append((rid, desc, text))
  return rows


def _write_rows(rows: list, output: Optional[str]) -> None:
  """FASTA to `output` (records with an empty continuation left out, with a warning), or
  to stdout."""
  if not output:
    for rid, desc, text in rows:
      print(f">{rid} {desc}\n{text}")
    return
  empty = [rid for rid, _, text in rows if not text]
  if empty:  # FASTA has no empty records: say which are left out
    shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
    print(f"{PROG}: warning: {len(empty)} of {len(rows)} record(s) have an empty "
          f"continuation (eos came first) and are not in {output}: {shown}",
          file=sys.stderr)
  try:
    fasta.write_fasta(output, [r for r in rows if r[2]])
  except OSError as e:
    raise OSError(f"cannot write {output} ({e.strerror or e})") from e


def _say_layout(layout: inference_mesh.Layout) -> None:
  print(f"{PROG}: {layout.describe()}", file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`ankh3-complete` (see cli.py); 0 done, 2 bad flags, prompts or output."""
  quiet.setup(argv)
  args = build_parser().parse_args(argv)
  try:
    check_flags(args)
    records = _prompts_from_args(args)
    outs = complete(
        args.model_dir, [s for _, s in records], max_new_tokens=args.max_new_tokens,
        strategy=args.strategy, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, num_beams=args.num_beams, length_penalty=args.length_penalty,
        seed=args.seed, batch_size=args.batch_size, residues_only=args.residues_only,
        dtype=args.dtype, param_dtype=args.param_dtype, mesh=args.mesh,
        param_dims=args.param_dims, on_layout=_say_layout)
    _write_rows(fasta_rows(records, outs, args.continuation_only), args.output)
  except (fasta.FastaError, ValueError, OSError) as e:
    return cli.error(PROG, e)
  return 0


if __name__ == "__main__":
  sys.exit(main())
