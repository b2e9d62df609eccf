"""Per-residue and per-protein embeddings from the Ankh3 encoder (`ankh3-embed`).

Each sequence is encoded as `prefix + residues + eos` (prefix `[NLU]` by default, as the
released models are used for embeddings); the prefix and eos rows are dropped, so the
per-residue array has exactly `len(sequence)` rows, and the per-protein vector is their
mean. Sequences are padded to length buckets (four per doubling, or fixed lengths) and
batched under a token budget; a bucket compiles at most two programs (its full batch and
its last, which holds only the rows left).

Output files (HDF5 `.h5`/`.hdf5`, or `.npz`) are keyed by record id:
`per_residue/<id>` float [L, d_model] and `per_protein/<id>` float [d_model]. HDF5 ids have
'%', '/' and a leading '.' percent-escaped in the dataset name; the `id` attribute holds the
original. Jobs resume: records already in the output are skipped, the batch plan does not
depend on what is done, so a resumed job writes the same values an uninterrupted one does.
The whole FASTA is validated before anything is written.
"""
import argparse
import dataclasses
import hashlib
import json
import os
import sys
from typing import Callable, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from ankh3_jax import inference
from ankh3_jax import vocab
from ankh3_jax.config import config_to_dict
from ankh3_jax.data import fasta
from ankh3_jax.model import Transformer

FORMAT = "ankh3-embeddings/1"
DEFAULT_TOKEN_BUDGET = 8192
MIN_BUCKET = 16
STEPS_PER_OCTAVE = 4
PREFIXES = {"nlu": vocab.NLU_TOKEN, "s2s": vocab.S2S_TOKEN}
_OUTPUT_DTYPES = ("float32", "float16")


class Embedding(NamedTuple):
  """Embeddings of one sequence (float32 unless another output dtype was asked for)."""
  per_residue: Optional[np.ndarray]  # [len(sequence), d_model], or None if not kept
  per_protein: np.ndarray            # [d_model]: mean of the per-residue rows


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
  """Holds a resolved model and the jitted encoder; `traced_shapes` logs each compile."""

  def __init__(self, model: inference.ModelArg, *, prefix: str = "nlu",
               dtype: str = "float32", buckets: Optional[Sequence[int]] = None,
               token_budget: int = DEFAULT_TOKEN_BUDGET, keep_per_residue: bool = True):
    if token_budget < 1:
      raise ValueError(f"token_budget must be positive, got {token_budget}")
    loaded = inference.resolve_model(model, dtype)
    # Only the encoder is kept, on the device once (not re-sent with every batch).
    self._params = jax.device_put(inference.encoder_params(loaded.params))
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
    """Hash of the config and token embedding table: tells models apart on resume."""
    digest = hashlib.sha1(json.dumps(config_to_dict(self.loaded.config),
                                     sort_keys=True).encode())
    table = np.asarray(self._params["token_embedder"]["embedding"], np.float32)
    digest.update(table.tobytes())
    return digest.hexdigest()

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
    tokens = inference.pad_rows(rows, batch.bucket, batch.size)
    lengths = np.zeros(batch.size, np.int32)
    lengths[:len(rows)] = [len(r) - 2 for r in rows]
    with inference.matmul_precision(self.dtype):
      hidden, mean = self._forward(self._params, tokens, lengths)
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


# ---------------------------------------------------------------------------------------
# Output files.


def dataset_name(record_id: str) -> str:
  """HDF5-safe name of a record id ('%', '/' and a leading '.' percent-escaped)."""
  name = record_id.replace("%", "%25").replace("/", "%2F")
  return "%2E" + name[1:] if name.startswith(".") else name


def _sha1(sequence: str) -> str:
  return hashlib.sha1(sequence.encode("ascii")).hexdigest()


class _H5Store:
  """Incremental HDF5 writer; a record is complete once its per_protein entry exists."""

  def __init__(self, path: str, settings: dict):
    self.path = path
    self.settings = settings
    self.file = None

  def existing(self) -> dict:
    """id -> sequence sha1 of the complete records; checks the settings match."""
    if not os.path.exists(self.path):
      return {}
    try:
      with h5py.File(self.path, "r") as f:
        self._check_settings(dict(f.attrs))
        return {ds.attrs["id"]: ds.attrs["sha1"] for ds in f.get("per_protein", {}).values()}
    except OSError as e:
      raise OSError(f"{self.path}: cannot read the existing output ({e}); it may have been "
                    "cut off in the middle of a write: delete it (or pass --overwrite) and "
                    "run again") from e

  def _check_settings(self, attrs: dict) -> None:
    for key, value in self.settings.items():
      old = attrs.get(key)
      if isinstance(old, bytes):
        old = old.decode()
      if isinstance(old, np.generic):
        old = old.item()
      if old != value:
        raise ValueError(f"{self.path}: existing output was written with {key}={old!r}, "
                         f"this run has {key}={value!r}; use another output path or "
                         "--overwrite")

  def write(self, record_id: str, sha1: str, emb: Embedding, out_dtype: str) -> None:
    if self.file is None:
      self.file = h5py.File(self.path, "a")
      if "format" not in self.file.attrs:
        for key, value in self.settings.items():
          self.file.attrs[key] = value
    name = dataset_name(record_id)
    for group in ("per_residue", "per_protein"):
      grp = self.file.require_group(group)
      if name in grp:  # left over from an interrupted write
        del grp[name]
    if emb.per_residue is not None:
      ds = self.file["per_residue"].create_dataset(
          name, data=emb.per_residue.astype(out_dtype))
      ds.attrs["id"] = record_id
    ds = self.file["per_protein"].create_dataset(name, data=emb.per_protein.astype(out_dtype))
    ds.attrs["id"] = record_id
    ds.attrs["sha1"] = sha1

  def flush(self) -> None:
    if self.file is not None:
      self.file.flush()

  def close(self) -> None:
    if self.file is not None:
      self.file.close()
      self.file = None


def read_embeddings(path: str) -> dict:
  """Reads an output file back: id -> `Embedding` (per_residue None if not stored)."""
  out = {}
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as z:
      for rid in z["ids"]:
        rid = str(rid)
        key = f"per_residue/{rid}"
        out[rid] = Embedding(z[key] if key in z.files else None, z[f"per_protein/{rid}"])
    return out
  with h5py.File(path, "r") as f:
    residues = f.get("per_residue", {})
    for name, ds in f.get("per_protein", {}).items():
      per_residue = residues[name][()] if name in residues else None
      out[ds.attrs["id"]] = Embedding(per_residue, ds[()])
  return out


def _write_npz(path: str, h5_path: str, first: Sequence[str], settings: dict) -> None:
  """Writes the finished HDF5 store as `.npz`, atomically (temporary file, replace)."""
  stored = read_embeddings(h5_path)
  hashes = _H5Store(h5_path, settings).existing()
  order = list(first) + sorted(set(stored) - set(first))
  arrays = {"ids": np.array(order), "sha1": np.array([hashes[r] for r in order]),
            "__settings__": np.array(json.dumps(settings))}
  for rid in order:
    emb = stored[rid]
    if emb.per_residue is not None:
      arrays[f"per_residue/{rid}"] = emb.per_residue
    arrays[f"per_protein/{rid}"] = emb.per_protein
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def _npz_to_h5(npz_path: str, h5_path: str, settings: dict) -> None:
  """Seeds the working HDF5 store from an existing `.npz` (for resuming)."""
  with np.load(npz_path, allow_pickle=False) as z:
    old = json.loads(str(z["__settings__"])) if "__settings__" in z.files else {}
    hashes = dict(zip(map(str, z["ids"]), map(str, z["sha1"])))
  if old != settings:
    raise ValueError(f"{npz_path}: existing output was written with other settings "
                     f"({old}); use another output path or --overwrite")
  store = _H5Store(h5_path, settings)
  try:
    for rid, emb in read_embeddings(npz_path).items():
      store.write(rid, hashes[rid], emb, str(emb.per_protein.dtype))
  finally:
    store.close()


def embed_fasta(model: inference.ModelArg, fasta_path: str, output_path: str, *,
                prefix: str = "nlu", dtype: str = "float32",
                buckets: Optional[Sequence[int]] = None,
                token_budget: int = DEFAULT_TOKEN_BUDGET, per_residue: bool = True,
                output_dtype: str = "float32", max_length: Optional[int] = None,
                overwrite: bool = False, progress: bool = True,
                on_batch: Optional[Callable[[Sequence[str]], None]] = None) -> dict:
  """Embeds every record of a FASTA file into `output_path` (.h5, .hdf5 or .npz).

  The FASTA file is read and validated in full (bad records, duplicate ids, over-long
  sequences raise `fasta.FastaError` naming file, record and reason) before any output is
  created. Records already complete in the output are skipped (resume). `on_batch` is
  called with the ids of each batch after it is flushed. `model` may be an `Embedder`, as
  in `embed_sequences`.

  Returns:
    {"records", "skipped", "written", "output"}.
  """
  output_path = os.fspath(output_path)
  kind = os.path.splitext(output_path)[1].lower()
  if kind not in (".h5", ".hdf5", ".npz"):
    raise ValueError(f"output must end in .h5, .hdf5 or .npz, got {output_path!r}")
  if output_dtype not in _OUTPUT_DTYPES:
    raise ValueError(f"output_dtype must be one of {_OUTPUT_DTYPES}, got {output_dtype!r}")
  records = list(fasta.read_fasta(fasta_path, check_duplicates=True, max_length=max_length))
  embedder = model if isinstance(model, Embedder) else Embedder(
      model, prefix=prefix, dtype=dtype, buckets=buckets, token_budget=token_budget,
      keep_per_residue=per_residue)
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

  settings = {"format": FORMAT, "prefix": embedder.prefix, "dtype": embedder.dtype,
              "d_model": int(embedder.d_model),
              "per_residue": bool(embedder.keep_per_residue),
              "output_dtype": output_dtype, "model": embedder.fingerprint()}
  work_path = output_path if kind != ".npz" else output_path + ".partial.h5"
  if overwrite:
    for path in {output_path, work_path}:
      if os.path.exists(path):
        os.remove(path)
  if kind == ".npz" and os.path.exists(output_path) and not os.path.exists(work_path):
    _npz_to_h5(output_path, work_path, settings)
  store = _H5Store(work_path, settings)
  done = store.existing()
  for rid, seq in zip(ids, seqs):
    if rid in done and done[rid] != _sha1(seq):
      raise ValueError(f"{output_path}: record {rid!r} is already stored with a different "
                       f"sequence than in {fasta_path}; use another output path or "
                       "--overwrite")

  todo = [b for b in plan if any(ids[i] not in done for i in b.indices)]
  written = 0
  try:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

    remaining = sum(ids[i] not in done for b in todo for i in b.indices)
    with tqdm(total=remaining, unit="seq", disable=not progress, desc="embedding") as bar:
      for batch in todo:
        embs = embedder.run(batch, token_lists)
        new = [i for i in batch.indices if ids[i] not in done]
        for i, emb in zip(batch.indices, embs):
          if ids[i] not in done:
            store.write(ids[i], _sha1(seqs[i]), emb, output_dtype)
        store.flush()
        written += len(new)
        bar.update(len(new))
        if on_batch is not None:
          on_batch([ids[i] for i in new])
  finally:
    store.close()
  if kind == ".npz":  # the work store exists: every record is in it by now
    _write_npz(output_path, work_path, ids, settings)
    os.remove(work_path)
  return {"records": len(ids), "skipped": len(ids) - written, "written": written,
          "output": output_path}


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
      prog="ankh3-embed", description="Embed the records of a FASTA file with an Ankh3 "
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
                 help="reject records with more residues than this")
  p.add_argument("--per_residue", action=argparse.BooleanOptionalAction, default=True,
                 help="store per-residue arrays (default) or only the per-protein means")
  p.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming")
  p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    summary = embed_fasta(
        args.model_dir, args.fasta, args.output, prefix=args.prefix, dtype=args.dtype,
        buckets=args.buckets, token_budget=args.token_budget, per_residue=args.per_residue,
        output_dtype=args.output_dtype, max_length=args.max_length,
        overwrite=args.overwrite, progress=args.progress)
  except (fasta.FastaError, ValueError, OSError) as e:
    print(f"ankh3-embed: error: {e}", file=sys.stderr)
    return 2
  print(f"ankh3-embed: {summary['written']} written, {summary['skipped']} already present, "
        f"{summary['records']} records -> {summary['output']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
