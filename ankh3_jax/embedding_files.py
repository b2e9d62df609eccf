"""The output files of `ankh3-embed`: the HDF5 store it writes, the `.npz` made from it,
reading either back, and the disk checks that keep a full disk from damaging a file.

Layout (both formats), keyed by record id: `per_residue/<id>` float [L, d_model] and
`per_protein/<id>` float [d_model]. HDF5 ids have '%', '/' and a leading '.'
percent-escaped in the dataset name; the `id` attribute holds the original, `sha1` the
sequence's hash. The file's attributes hold the run's settings (model fingerprint, prefix,
dtypes), which a resumed run must match.
"""
import hashlib
import json
import os
from typing import NamedTuple, Optional, Sequence

import h5py
import numpy as np

from ankh3_jax import output_paths

FORMAT = "ankh3-embeddings/1"  # the `format` attribute of every output


class Embedding(NamedTuple):
  """Embeddings of one sequence (float32 unless another output dtype was asked for)."""
  per_residue: Optional[np.ndarray]  # [len(sequence), d_model], or None if not kept
  per_protein: np.ndarray            # [d_model]: mean of the per-residue rows


def dataset_name(record_id: str) -> str:
  """HDF5-safe name of a record id ('%', '/' and a leading '.' percent-escaped)."""
  name = record_id.replace("%", "%25").replace("/", "%2F")
  return "%2E" + name[1:] if name.startswith(".") else name


def sequence_sha1(sequence: str) -> str:
  """Hash stored with each record: a resumed job checks the sequence did not change."""
  return hashlib.sha1(sequence.encode("ascii")).hexdigest()


def _open_h5(path: str, mode: str):
  """h5py.File, with HDF5's "unable to lock file" told as the file being in use."""
  try:
    return h5py.File(path, mode)
  except OSError as e:
    if "lock" in str(e).lower():
      raise output_paths.OutputError(
          f"{path} is in use: another program holds it open (an h5py.File in a notebook "
          "or script?); close it there and run again") from e
    raise


class H5Store:
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
      with _open_h5(self.path, "r") as f:
        self._check_settings(dict(f.attrs))
        return {ds.attrs["id"]: ds.attrs["sha1"] for ds in f.get("per_protein", {}).values()}
    except output_paths.OutputError:
      raise
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

  def open(self) -> None:
    """Opens the file for writing (an error now, not after the first batch, if another
    program holds it)."""
    if self.file is None:
      self.file = _open_h5(self.path, "a")
      if "format" not in self.file.attrs:
        for key, value in self.settings.items():
          self.file.attrs[key] = value

  def write(self, record_id: str, sha1: str, emb: Embedding, out_dtype: str) -> None:
    self.open()
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


def write_npz(path: str, h5_path: str, first: Sequence[str], settings: dict) -> None:
  """Writes the finished HDF5 store as `.npz`, atomically (temporary file, replace)."""
  stored = read_embeddings(h5_path)
  hashes = H5Store(h5_path, settings).existing()
  order = list(first) + sorted(set(stored) - set(first))
  arrays = {"ids": np.array(order), "sha1": np.array([hashes[r] for r in order]),
            "__settings__": np.array(json.dumps(settings))}
  for rid in order:
    emb = stored[rid]
    if emb.per_residue is not None:
      arrays[f"per_residue/{rid}"] = emb.per_residue
    arrays[f"per_protein/{rid}"] = emb.per_protein
  with output_paths.atomic_file(path, "wb") as f:
    np.savez(f, **arrays)


def npz_to_h5(npz_path: str, h5_path: str, settings: dict) -> None:
  """Seeds the working HDF5 store from an existing `.npz` (for resuming)."""
  with np.load(npz_path, allow_pickle=False) as z:
    old = json.loads(str(z["__settings__"])) if "__settings__" in z.files else {}
    hashes = dict(zip(map(str, z["ids"]), map(str, z["sha1"])))
  if old != settings:
    raise ValueError(f"{npz_path}: existing output was written with other settings "
                     f"({old}); use another output path or --overwrite")
  store = H5Store(h5_path, settings)
  try:
    for rid, emb in read_embeddings(npz_path).items():
      store.write(rid, hashes[rid], emb, str(emb.per_protein.dtype))
  finally:
    store.close()


# Room kept free on the output's disk: a batch is written only if twice its arrays plus
# HDF5's per-dataset metadata plus this reserve fit, because an HDF5 write that fails half
# way can leave the file unreadable (h5py then also crashes while closing it).
DISK_RESERVE_BYTES = 256 << 10
_DATASET_OVERHEAD_BYTES = 16 << 10


class DamagedOutputError(output_paths.OutputError):
  """A write failed in the middle of a batch: the HDF5 file must not be closed (closing
  writes more and crashes); the process should exit at once (`main` does)."""


def write_error(output_path: str, error: Exception, kept: str) -> output_paths.OutputError:
  reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
  if "errno = 28" in str(error) or "No space left" in str(error):  # h5py's wording
    reason = os.strerror(28)
  return output_paths.OutputError(f"{output_path}: cannot write ({reason}); {kept}: free "
                                  "space (or fix the cause) and rerun to resume")


def check_free_space(path: str, embs: Sequence[Embedding], out_dtype: str,
                      finished: int) -> None:
  """Raises OutputError, before anything of the batch is written, if it may not fit."""
  data = sum((0 if e.per_residue is None else e.per_residue.size) + e.per_protein.size
             for e in embs) * np.dtype(out_dtype).itemsize
  need = 2 * data + 2 * len(embs) * _DATASET_OVERHEAD_BYTES + DISK_RESERVE_BYTES
  stat = os.statvfs(os.path.dirname(os.path.abspath(path)))
  free = stat.f_bavail * stat.f_frsize
  if free < need:
    raise output_paths.OutputError(
        f"{path}: the disk is nearly full ({free / 2 ** 20:.2f} MiB free, the next batch "
        f"needs about {need / 2 ** 20:.2f} MiB); the {finished} records finished are kept: "
        "free space and rerun to resume")
