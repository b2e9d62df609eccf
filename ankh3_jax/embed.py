"""Per-residue and per-protein embeddings from the Ankh3 encoder (`ankh3-embed`).

Each sequence is encoded as `prefix + residues + eos` (prefix `[NLU]` by default, as the
released models are used for embeddings); the prefix and eos rows are dropped, so the
per-residue array has exactly `len(sequence)` rows, and the per-protein vector is their
mean. Sequences are padded to length buckets (four per doubling, or fixed lengths) and
batched under a token budget; a bucket compiles at most two programs (its full batch and
its last, which holds only the rows left).

Output files (HDF5 `.h5`/`.hdf5`, or `.npz`; layout in `embedding_files`) are keyed by
record id: `per_residue/<id>` float [L, d_model] and `per_protein/<id>` float [d_model].
Jobs resume: records already in the output are skipped, the batch plan does not
depend on what is done, so a resumed job writes the same values an uninterrupted one does;
the output records a fingerprint of every encoder parameter, so only the same model
resumes it. The whole FASTA is validated (and sequences are capped at `max_length`,
4096 residues unless raised) before anything is written; a writer holds
`.<output>.lock`, so a second job on the same output is told it is in use.
"""
import argparse
import dataclasses
import hashlib
import json
import os
import sys
from typing import Callable, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ankh3_jax import cli
from ankh3_jax import embedding_files
from ankh3_jax import inference
from ankh3_jax import inference_memory
from ankh3_jax import inference_mesh
from ankh3_jax import output_paths
from ankh3_jax import quiet
from ankh3_jax import vocab
from ankh3_jax.config import config_to_dict
from ankh3_jax.data import fasta
# Re-exported: reading outputs back is part of this module's API.
from ankh3_jax.embedding_files import (  # pylint: disable=unused-import
    DamagedOutputError, Embedding, dataset_name, read_embeddings)
from ankh3_jax.model import Transformer

PROG = "ankh3-embed"
DEFAULT_TOKEN_BUDGET = 8192
DEFAULT_MAX_LENGTH = 4096  # residues; attention memory grows with the square of it
MAX_INT_FLAG = 2 ** 31 - 1
MIN_BUCKET = 16
STEPS_PER_OCTAVE = 4
PREFIXES = {"nlu": vocab.NLU_TOKEN, "s2s": vocab.S2S_TOKEN}
_OUTPUT_DTYPES = ("float32", "float16")


class Batch(NamedTuple):
  bucket: int          # padded token length
  size: int            # rows of the compiled batch (fixed per bucket)
  indices: tuple       # positions in the input list (<= size of them)


def _prefix_token(prefix: str) -> str:
  token = PREFIXES.get(prefix.lower(), prefix)
  if token not in vocab.CONTROL_TOKENS:
    raise ValueError(f"unknown prefix {prefix!r}; choose from {sorted(PREFIXES)} "
                     f"or {list(vocab.CONTROL_TOKENS)}")
  return token


def bucket_length(num_tokens: int, buckets: Optional[Sequence[int]] = None) -> int:
  """Smallest bucket holding `num_tokens`.

  Without a list: the ladder 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, ... (four steps per
  doubling, each a multiple of a power of two), so padding adds at most 25% of a sequence.
  """
  if not buckets:
    return inference.length_bucket(num_tokens, MIN_BUCKET, STEPS_PER_OCTAVE)
  for size in sorted(buckets):
    if size >= num_tokens:
      return size
  raise ValueError(f"{num_tokens} tokens exceed the largest bucket {max(buckets)}")


def plan_batches(num_tokens: Sequence[int], buckets: Optional[Sequence[int]] = None,
                 token_budget: int = DEFAULT_TOKEN_BUDGET) -> list:
  """Groups items by bucket (ascending, input order inside) into batches.

  A bucket's batches have `token_budget // bucket` rows (at least 1), except its last,
  which has exactly the rows left: no empty rows are computed, and a bucket compiles at
  most two programs. The plan depends only on the whole input, never on which items are
  already done.
  """
  by_bucket = {}
  for i, n in enumerate(num_tokens):
    by_bucket.setdefault(bucket_length(n, buckets), []).append(i)
  plan = []
  for bucket in sorted(by_bucket):
    items = by_bucket[bucket]
    size = max(1, token_budget // bucket)
    for start in range(0, len(items), size):
      chunk = tuple(items[start:start + size])
      plan.append(Batch(bucket, len(chunk), chunk))
  return plan


class Embedder:
  """Holds a resolved model and the jitted encoder; `traced_shapes` logs each compile.

  On several devices (`layout`, or one chosen by `inference_mesh.choose_layout` from
  `mesh` / `param_dims`) batches are sharded over `data`, their rows padded to a multiple
  of it, and the parameters placed by the training rules.
  """

  def __init__(self, model: inference.ModelArg, *, prefix: str = "nlu",
               dtype: str = "float32", buckets: Optional[Sequence[int]] = None,
               token_budget: int = DEFAULT_TOKEN_BUDGET, keep_per_residue: bool = True,
               param_dtype: Optional[str] = None, mesh: Optional[str] = None,
               param_dims: Optional[int] = None,
               layout: Optional[inference_mesh.Layout] = None):
    if token_budget < 1:
      raise ValueError(f"token_budget must be positive, got {token_budget}")
    loaded = inference.resolve_model(model, dtype, param_dtype)
    params = inference.encoder_params(loaded.params)
    self.layout = layout or inference_mesh.choose_layout(
        inference_memory.params_bytes(params), mesh=mesh, param_dims=param_dims,
        work_bytes=inference_memory.encoder_batch_bytes(loaded.config, 1, 1) * token_budget)
    # Only the encoder is kept, on the device(s) once (not re-sent with every batch).
    self._params = (jax.device_put(params) if self.layout.single else
                    inference_mesh.shard_params(params, loaded.config, self.layout))
    self.loaded = dataclasses.replace(loaded, params=self._params)
    self.prefix = _prefix_token(prefix)
    self.dtype = dtype
    self.buckets = sorted(buckets) if buckets else None
    self.token_budget = token_budget
    self.keep_per_residue = keep_per_residue
    self.traced_shapes = []
    self._module = Transformer(self.loaded.config)
    self._forward = jax.jit(self._encode)

  @property
  def d_model(self) -> int:
    return self.loaded.config.d_model

  def fingerprint(self) -> str:
    """Hash of the config and of every parameter the embeddings depend on (the token
    embedding and the whole encoder, as float32): tells models apart on resume."""
    digest = hashlib.sha1(json.dumps(config_to_dict(self.loaded.config),
                                     sort_keys=True).encode())
    leaves = jax.tree_util.tree_flatten_with_path(self._params)[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
      array = np.asarray(leaf, np.float32)
      digest.update(f"{jax.tree_util.keystr(path)}{array.shape}".encode())
      digest.update(array.tobytes())
    return digest.hexdigest()

  def check_memory(self, plan: Sequence[Batch], token_lists: Sequence[Sequence[int]],
                   ids: Sequence[str], where: str) -> None:
    """Raises ValueError if a planned batch needs more memory than there is."""
    limit = inference_memory.available_bytes()
    for batch in plan:
      rows = inference_mesh.padded_rows(batch.size, self.layout) // self.layout.data_size
      need = inference_memory.encoder_batch_bytes(self.loaded.config, rows, batch.bucket)
      if need > limit:
        longest = max(batch.indices, key=lambda i: len(token_lists[i]))
        raise ValueError(
            f"{where}: record {ids[longest]!r} ({len(token_lists[longest]) - 2} residues) "
            f"needs about {inference_memory.gigabytes(need)} in a batch of {batch.size} x "
            f"{batch.bucket} tokens, more than the {inference_memory.gigabytes(limit)} "
            "available; lower --max_length (or --token_budget, or the --buckets)")

  def _encode(self, params, tokens, lengths):
    self.traced_shapes.append(tuple(tokens.shape))  # runs once per compile
    hidden = self._module.apply({"params": params}, tokens, enable_dropout=False,
                                method=Transformer.encode).astype(jnp.float32)
    positions = jnp.arange(tokens.shape[1])[None, :]
    residue = (positions >= 1) & (positions <= lengths[:, None])
    total = jnp.sum(hidden * residue[..., None], axis=1)
    mean = total / jnp.maximum(lengths, 1)[:, None].astype(jnp.float32)
    return (hidden if self.keep_per_residue else None), mean

  def tokenize(self, sequences: Sequence[str], ids: Optional[Sequence[str]] = None) -> list:
    ids = ids or [str(i) for i in range(len(sequences))]
    return [inference.tokenize(seq, self.prefix, self.loaded.vocab_path, rid)
            for rid, seq in zip(ids, sequences)]

  def plan(self, token_lists: Sequence[Sequence[int]]) -> list:
    return plan_batches([len(t) for t in token_lists], self.buckets, self.token_budget)

  def run(self, batch: Batch, token_lists: Sequence[Sequence[int]]) -> list:
    """Embeds one planned batch; returns an `Embedding` per index of the batch."""
    rows = [token_lists[i] for i in batch.indices]
    size = inference_mesh.padded_rows(batch.size, self.layout)
    tokens = inference.pad_rows(rows, batch.bucket, size)
    lengths = np.zeros(size, np.int32)
    lengths[:len(rows)] = [len(r) - 2 for r in rows]
    with inference.matmul_precision(self.dtype), inference_mesh.context(self.layout):
      hidden, mean = self._forward(self._params, inference_mesh.put_batch(tokens, self.layout),
                                   inference_mesh.put_batch(lengths, self.layout))
    mean = np.asarray(mean)
    hidden = None if hidden is None else np.asarray(hidden)
    out = []
    for r, n in enumerate(lengths[:len(rows)]):
      per_residue = None if hidden is None else hidden[r, 1:n + 1].copy()
      out.append(Embedding(per_residue, mean[r].copy()))
    return out


def embed_sequences(model: inference.ModelArg,
                    sequences: Union[Sequence[str], Mapping[str, str]], *,
                    prefix: str = "nlu", dtype: str = "float32",
                    buckets: Optional[Sequence[int]] = None,
                    token_budget: int = DEFAULT_TOKEN_BUDGET,
                    per_residue: bool = True, progress: bool = False):
  """Embeds sequences in memory.

  Args:
    model: a model directory (our format), `(config, params)`, or an `Embedder` (whose
      prefix, dtype, buckets and budget are then used; it keeps its compiled buckets).
    sequences: a list of residue strings, or a mapping id -> sequence.
    prefix: 'nlu' (default) or 's2s'.
    dtype: computation dtype, 'float32' or 'bfloat16'.
    buckets: fixed padded lengths (tokens, including prefix and eos); default the ladder of
      `bucket_length` (16, 20, 24, 28, 32, 40, ...).
    token_budget: padded tokens per batch.
    per_residue: keep the per-residue arrays (else only the means).
    progress: show a tqdm bar.

  Returns:
    A list of `Embedding` in input order, or a dict id -> `Embedding` for a mapping.
  """
  embedder = model if isinstance(model, Embedder) else Embedder(
      model, prefix=prefix, dtype=dtype, buckets=buckets, token_budget=token_budget,
      keep_per_residue=per_residue)
  if isinstance(sequences, Mapping):
    ids, seqs = list(sequences), [sequences[k] for k in sequences]
  else:
    ids, seqs = None, list(sequences)
  for i, seq in enumerate(seqs):
    bad = set(seq.upper()) - set(vocab.RESIDUES)
    if not seq or bad:
      name = ids[i] if ids else f"#{i}"
      reason = "empty sequence" if not seq else f"illegal residue(s) {sorted(bad)}"
      raise ValueError(f"sequence {name}: {reason} (allowed: {vocab.RESIDUES})")
  seqs = [s.upper() for s in seqs]
  token_lists = embedder.tokenize(seqs, ids)
  results = [None] * len(seqs)
  for batch in _progress(embedder.plan(token_lists), progress, len(seqs)):
    for i, emb in zip(batch.indices, embedder.run(batch, token_lists)):
      results[i] = emb
  return dict(zip(ids, results)) if ids is not None else results


def _progress(plan: list, enabled: bool, total: int) -> Iterable[Batch]:
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  with tqdm(total=total, unit="seq", disable=not enabled, desc="embedding") as bar:
    for batch in plan:
      yield batch
      bar.update(len(batch.indices))


def embed_fasta(model: inference.ModelArg, fasta_path: str, output_path: str, *,
                prefix: str = "nlu", dtype: str = "float32",
                buckets: Optional[Sequence[int]] = None,
                token_budget: int = DEFAULT_TOKEN_BUDGET, per_residue: bool = True,
                output_dtype: str = "float32",
                max_length: Optional[int] = DEFAULT_MAX_LENGTH,
                overwrite: bool = False, progress: bool = True,
                on_batch: Optional[Callable[[Sequence[str]], None]] = None,
                param_dtype: Optional[str] = None, mesh: Optional[str] = None,
                param_dims: Optional[int] = None, shard=None) -> dict:
  """Embeds every record of a FASTA file into `output_path` (.h5, .hdf5 or .npz).

  The FASTA file is read and validated in full (bad records, duplicate ids, sequences
  over `max_length` residues (None: no cap) raise `fasta.FastaError` naming file, record
  and reason), and the largest batch's memory is checked, before any output is created.
  Records already complete in the output are skipped (resume). `on_batch` is called with
  the ids of each batch after it is flushed. `model` may be an `Embedder`, as in
  `embed_sequences`. The output is never an input or the working directory; while it is
  written `.<name>.lock` is held next to it (`output_paths.OutputLock`). A failed write
  (a full disk) raises `output_paths.OutputError`; the records flushed before are kept.
  `param_dtype`, `mesh`, `param_dims` place the model (`inference_mesh`); with `shard`
  (`embed_shards.Shard`) only its share of the records is embedded, into its own file
  (`OUT-00001-of-00004.h5`), which `embed_shards.merge` joins.

  Returns:
    {"records", "skipped", "written", "output"}.
  """
  output_path = os.fspath(output_path)
  if shard is not None:
    output_path = shard.path(output_path)
  kind = os.path.splitext(output_path)[1].lower()
  if kind not in (".h5", ".hdf5", ".npz"):
    raise ValueError(f"output must end in .h5, .hdf5 or .npz, got {output_path!r}")
  if output_dtype not in _OUTPUT_DTYPES:
    raise ValueError(f"output_dtype must be one of {_OUTPUT_DTYPES}, got {output_dtype!r}")
  model_inputs = [model] if isinstance(model, (str, os.PathLike)) else []
  output_paths.check_not_input(output_path, [fasta_path, *model_inputs], "output")
  if os.path.isdir(output_path):
    raise output_paths.OutputError(f"output {output_path} is a directory; name a file")
  output_paths.check_writable_dir(os.path.dirname(os.path.abspath(output_path)),
                                  f"output {output_path}")
  records = list(fasta.read_fasta(fasta_path, check_duplicates=True, max_length=max_length))
  num_records = len(records)
  if shard is not None:
    records = shard.select(records)
  embedder = model if isinstance(model, Embedder) else Embedder(
      model, prefix=prefix, dtype=dtype, buckets=buckets, token_budget=token_budget,
      keep_per_residue=per_residue, param_dtype=param_dtype, mesh=mesh,
      param_dims=param_dims)
  if progress or not embedder.layout.single:
    print(f"{PROG}: {embedder.layout.describe()}", file=sys.stderr, flush=True)
  ids = [r.id for r in records]
  seqs = [r.sequence for r in records]
  token_lists = embedder.tokenize(seqs, ids)
  if embedder.buckets:
    for rid, tokens in zip(ids, token_lists):
      if len(tokens) > embedder.buckets[-1]:
        raise ValueError(f"{fasta_path}: record {rid!r}: {len(tokens) - 2} residues "
                         f"(+ prefix and eos) exceed the largest bucket "
                         f"{embedder.buckets[-1]}; add a bucket or pass max_length")
  plan = embedder.plan(token_lists)
  embedder.check_memory(plan, token_lists, ids, fasta_path)

  settings = {"format": embedding_files.FORMAT, "prefix": embedder.prefix, "dtype": embedder.dtype,
              "d_model": int(embedder.d_model),
              "per_residue": bool(embedder.keep_per_residue),
              "output_dtype": output_dtype, "model": embedder.fingerprint()}
  if shard is not None:
    settings.update(shard.settings(num_records, len(records)))
  work_path = output_path if kind != ".npz" else output_path + ".partial.h5"
  with output_paths.OutputLock(output_path, "ankh3-embed"):
    if overwrite:
      for path in {output_path, work_path}:
        if os.path.exists(path):
          os.remove(path)
    if kind == ".npz" and os.path.exists(output_path) and not os.path.exists(work_path):
      embedding_files.npz_to_h5(output_path, work_path, settings)
    store = embedding_files.H5Store(work_path, settings)
    done = store.existing()
    for rid, seq in zip(ids, seqs):
      if rid in done and done[rid] != embedding_files.sequence_sha1(seq):
        raise ValueError(f"{output_path}: record {rid!r} is already stored with a different "
                         f"sequence than in {fasta_path}; use another output path or "
                         "--overwrite")
    todo = [b for b in plan if any(ids[i] not in done for i in b.indices)]
    if todo or shard is not None:  # a shard's file exists even when it has no records
      try:
        store.open()
      except output_paths.OutputError:
        raise
      except OSError as e:
        raise embedding_files.write_error(work_path, e, "nothing was changed") from e
    written = _write_batches(embedder, store, todo, done, ids, seqs, token_lists,
                             output_dtype, progress, on_batch)
    if kind == ".npz":  # the work store exists: every record is in it by now
      try:
        embedding_files.write_npz(output_path, work_path, ids, settings)
      except OSError as e:
        raise embedding_files.write_error(
            output_path, e, f"all {len(ids)} records are kept in {work_path}") from e
      os.remove(work_path)
  return {"records": len(ids), "skipped": len(ids) - written, "written": written,
          "output": output_path}


def _write_batches(embedder: Embedder, store: embedding_files.H5Store,
                   todo: Sequence[Batch], done: dict, ids: Sequence[str],
                   seqs: Sequence[str], token_lists, output_dtype: str, progress: bool,
                   on_batch) -> int:
  """Embeds and stores the batches of `todo`, flushing after each; returns records written.

  A batch that may not fit on the disk stops the job with `OutputError` before it is
  written; the batches flushed before stay in the store, and a rerun resumes after them.
  A write that fails anyway raises `DamagedOutputError` and leaves the file unclosed.
  """
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  written = 0
  damaged = False
  remaining = sum(ids[i] not in done for b in todo for i in b.indices)
  try:
    with tqdm(total=remaining, unit="seq", disable=not progress, desc="embedding") as bar:
      for batch in todo:
        embs = embedder.run(batch, token_lists)
        new = [i for i in batch.indices if ids[i] not in done]
        fresh = [emb for i, emb in zip(batch.indices, embs) if ids[i] not in done]
        embedding_files.check_free_space(store.path, fresh, output_dtype, len(done) + written)
        try:
          for i, emb in zip(batch.indices, embs):
            if ids[i] not in done:
              store.write(ids[i], embedding_files.sequence_sha1(seqs[i]), emb, output_dtype)
          store.flush()
        except output_paths.OutputError:
          raise
        except (OSError, RuntimeError) as e:  # h5py reports failed writes as RuntimeError
          damaged = True
          error = embedding_files.write_error(
              store.path, e, f"the {len(done) + written} records finished before were "
              "flushed to it, but HDF5 cannot undo a failed write: if the file no longer "
              "opens, move it aside")
          raise DamagedOutputError(str(error)) from e
        written += len(new)
        bar.update(len(new))
        if on_batch is not None:
          on_batch([ids[i] for i in new])
  finally:
    if not damaged:
      store.close()
  return written


def check_flags(args: argparse.Namespace) -> None:
  """Raises ValueError for a numeric flag out of range (before anything is loaded)."""
  if not 1 <= args.token_budget <= MAX_INT_FLAG:
    raise ValueError(f"--token_budget must be in [1, {MAX_INT_FLAG}], got {args.token_budget}")
  if args.max_length is not None and not 1 <= args.max_length <= MAX_INT_FLAG:
    raise ValueError(f"--max_length must be in [1, {MAX_INT_FLAG}], got {args.max_length}")
  if args.buckets and args.buckets[-1] > MAX_INT_FLAG:
    raise ValueError(f"--buckets must be at most {MAX_INT_FLAG}, got {args.buckets[-1]}")


def _parse_buckets(text: Optional[str]) -> Optional[list]:
  if not text:
    return None
  try:
    sizes = sorted({int(x) for x in text.split(",") if x.strip()})
  except ValueError:
    raise argparse.ArgumentTypeError(f"--buckets takes comma-separated integers, got {text!r}")
  if not sizes or sizes[0] < 3:
    raise argparse.ArgumentTypeError(f"--buckets must be integers >= 3, got {text!r}")
  return sizes


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog=PROG, description="Embed the records of a FASTA file with an Ankh3 "
      "encoder: per-residue arrays (prefix and eos dropped) and per-protein means.")
  p.add_argument("--model_dir", required=True, help="model directory (our format)")
  p.add_argument("--fasta", required=True, help="input FASTA (plain or gzip)")
  p.add_argument("--output", required=True, help="output .h5/.hdf5 or .npz (resumed if "
                 "it exists)")
  p.add_argument("--prefix", default="nlu", choices=sorted(PREFIXES),
                 help="mode token prepended to each sequence (default nlu)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="computation dtype (bfloat16 also casts the weights)")
  p.add_argument("--output_dtype", default="float32", choices=list(_OUTPUT_DTYPES))
  p.add_argument("--buckets", type=_parse_buckets, default=None,
                 help="comma-separated padded lengths in tokens (incl. prefix and eos); "
                 "default: 16, 20, 24, 28, 32, 40, ... (at most 25%% padding)")
  p.add_argument("--token_budget", type=int, default=DEFAULT_TOKEN_BUDGET,
                 help="padded tokens per batch (default %(default)s)")
  p.add_argument("--max_length", type=int, default=None,
                 help="reject records with more residues than this (default "
                 f"{DEFAULT_MAX_LENGTH}; attention memory grows with its square)")
  p.add_argument("--per_residue", action=argparse.BooleanOptionalAction, default=True,
                 help="store per-residue arrays (default) or only the per-protein means")
  p.add_argument("--overwrite", action="store_true",
                 help="start afresh instead of resuming (deletes the existing output)")
  p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--num_shards", type=int, default=None,
                 help="split the job N ways (e.g. a job array); this job embeds shard "
                 "--shard_index into OUT-0000i-of-0000N (join with `ankh3-embed merge`); "
                 "under jax.distributed each process is a shard")
  p.add_argument("--shard_index", type=int, default=None)
  inference_mesh.add_flags(p)
  quiet.add_flag(p)
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`ankh3-embed` (see cli.py); 0 done, 2 bad flags, input or output.
  `ankh3-embed merge ...` joins the shards of a split job (embed_shards.py)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  quiet.setup(argv)
  from ankh3_jax import embed_shards  # pylint: disable=g-import-not-at-top

  if argv[:1] == ["merge"]:
    return embed_shards.merge_main(argv[1:])
  args = build_parser().parse_args(argv)
  max_length = DEFAULT_MAX_LENGTH if args.max_length is None else args.max_length
  try:
    check_flags(args)
    inference_mesh.initialize_from_flags(args)
    shard = embed_shards.shard_from_flags(args.num_shards, args.shard_index)
    summary = embed_fasta(
        args.model_dir, args.fasta, args.output, prefix=args.prefix, dtype=args.dtype,
        buckets=args.buckets, token_budget=args.token_budget, per_residue=args.per_residue,
        output_dtype=args.output_dtype, max_length=max_length,
        overwrite=args.overwrite, progress=args.progress, param_dtype=args.param_dtype,
        mesh=args.mesh, param_dims=args.param_dims, shard=shard)
  except DamagedOutputError as e:
    # Exit without closing the HDF5 file: closing writes more and crashes (segfault).
    cli.error(PROG, cli.one_line(e))
    os._exit(2)  # pylint: disable=protected-access
  except (fasta.FastaError, ValueError, OSError, MemoryError) as e:
    message = cli.one_line(e)
    if (isinstance(e, fasta.FastaError) and args.max_length is None
        and "max_length" in message):
      message += " (the default cap; raise it with --max_length N)"
    return cli.error(PROG, message)
  print(f"{PROG}: {summary['written']} written, {summary['skipped']} already present, "
        f"{summary['records']} records -> {summary['output']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
