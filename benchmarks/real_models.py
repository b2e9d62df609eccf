"""Randomly initialised models of the released shapes, written once per work directory.

The real-size cases (`ankh_base`, `ankh3_large`) load the same weights on both sides: our
model directory (`model_io.save_model`; encoder-only for embedding, full for completion)
and its Hugging Face export (`convert.export_hf`). At `ankh3_large` these are 4-7 GB
each and minutes of writing, so `prepare` writes each part once, in its own process:
into a temporary directory, renamed into place with a `BENCHMARK_COMPLETE` file that
holds the fingerprint of what was written (preset, seed, generator version), also in
the directory's name. A killed run leaves only a temporary directory, which no later
run uses (the next `prepare` removes it once its process is gone).
"""
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import zlib
from typing import Optional

import numpy as np

SEED = 0
# Bump when `random_params` changes: the fingerprint, hence the directory name, follows.
GENERATOR_VERSION = 1
_DONE_FILE = "BENCHMARK_COMPLETE"  # in each part, with the fingerprint
_TMP_MARK = ".tmp-"


def config(preset: str):
  """The float32 `T5Config` of a released shape (a `config.PRESETS` name)."""
  from ankh3_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.preset(preset)


def fingerprint(preset: str) -> str:
  from ankh3_jax.config import config_to_dict  # pylint: disable=g-import-not-at-top
  text = json.dumps({"config": config_to_dict(config(preset)), "seed": SEED,
                     "generator": GENERATOR_VERSION}, sort_keys=True)
  return hashlib.sha1(text.encode()).hexdigest()[:12]


def _leaf_std(names: tuple, shape: tuple, cfg) -> float:
  """Standard deviation of the model's own initialiser for this parameter (`layers.py`)."""
  if names[-1] == "embedding":
    return 1.0
  if names[-1] == "rel_embedding":
    return cfg.d_model ** -0.5
  if names[-1] == "kernel":
    scale = 1.0 / cfg.d_kv if "query" in names else 1.0
    return (scale / shape[0]) ** 0.5
  raise ValueError(f"no initialiser known for parameter {'/'.join(names)}")


def random_params(cfg, encoder_only: bool = False, seed: int = SEED,
                  scratch_dir: Optional[str] = None) -> dict:
  """Float32 numpy parameters with the variances of the model's initialisers (normal,
  not truncated), one leaf at a time (no second copy of the model in memory). Each leaf
  is drawn from its own seed, so its values do not depend on the others.

  The eos column of the output layer is zero: its logit is then 0, below the maximum of
  the other random logits, so greedy decoding never stops early and both implementations
  generate exactly the tokens asked for.

  With `scratch_dir`, each leaf is a memory map of a file there, flushed once drawn: its
  pages can then be dropped by the kernel, so saving it (orbax copies every array) needs
  one copy of the weights in memory, not two.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from ankh3_jax import model_io, vocab  # pylint: disable=g-import-not-at-top

  def draw(path, shape):
    names = tuple(str(getattr(k, "key", k)) for k in path)
    if names[-1] == "scale":
      return np.ones(shape, np.float32)
    rng = np.random.default_rng([seed, zlib.crc32("/".join(names).encode())])
    if scratch_dir is None:
      leaf = np.empty(shape, np.float32)
    else:
      leaf = np.lib.format.open_memmap(os.path.join(scratch_dir, "-".join(names) + ".npy"),
                                       mode="w+", dtype=np.float32, shape=shape)
    rng.standard_normal(dtype=np.float32, out=leaf)
    leaf *= np.float32(_leaf_std(names, shape, cfg))
    if names[-2:] == ("logits_dense", "kernel"):
      leaf[:, vocab.EOS_ID] = 0.0
    if scratch_dir is not None:
      leaf.flush()
    return leaf

  shapes = model_io.expected_shapes(cfg)
  if encoder_only:
    shapes = {k: shapes[k] for k in ("token_embedder", "encoder")}
  return jax.tree_util.tree_map_with_path(draw, shapes, is_leaf=lambda x: isinstance(x, tuple))


@functools.lru_cache(maxsize=16)
def params_bytes(cfg, encoder_only: bool = False) -> int:
  """Float32 bytes of the parameters (the whole model, or the encoder and embeddings)."""
  import jax  # pylint: disable=g-import-not-at-top
  from ankh3_jax import model_io  # pylint: disable=g-import-not-at-top
  shapes = model_io.expected_shapes(cfg)
  if encoder_only:
    shapes = {k: shapes[k] for k in ("token_embedder", "encoder")}
  leaves = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
  return 4 * sum(int(np.prod(s)) for s in leaves)


def paths(directory: str) -> dict:
  return {"ours": os.path.join(directory, "ours"),
          "ours_encoder": os.path.join(directory, "ours_encoder"),
          "hf": os.path.join(directory, "hf")}


def _is_complete(directory: str, fp: str) -> bool:
  try:
    with open(os.path.join(directory, _DONE_FILE), encoding="utf-8") as f:
      return f.read().strip() == fp
  except OSError:
    return False


def _remove_stale_temporaries(directory: str, log) -> None:
  """Temporary directories in `directory` whose writing process is gone (a killed run)."""
  for name in os.listdir(directory):
    if _TMP_MARK not in name:
      continue
    pid = name.split(_TMP_MARK, 1)[1].split("-", 1)[0]
    try:
      os.kill(int(pid), 0)
      continue  # still being written
    except ProcessLookupError:
      pass
    except (ValueError, PermissionError):
      continue
    log(f"removing {os.path.join(directory, name)}: left by a killed run (process {pid})")
    shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def parts_for(kind: str) -> tuple:
  """The parts a case kind loads: the HF export, and ours encoder-only or full."""
  return ("hf", "ours_encoder") if kind == "embed" else ("hf", "ours")


def cached(preset: str, work_dir: str, parts=None):
  """`paths` of the cached model of `preset` if all of `parts` (default all) are complete."""
  fp = fingerprint(preset)
  found = paths(os.path.join(work_dir, f"{preset}-{fp}"))
  return found if all(_is_complete(found[p], fp) for p in parts or PARTS) else None


def prepare(preset: str, work_dir: str, parts=None, log=print) -> dict:
  """Paths of the cached model of `preset` (`paths`), writing the missing `parts` first
  (default all), each in its own process, into a temporary directory renamed into place."""
  fp = fingerprint(preset)
  final = os.path.join(work_dir, f"{preset}-{fp}")
  targets = paths(final)
  os.makedirs(final, exist_ok=True)
  _remove_stale_temporaries(final, log)
  cfg = config(preset)
  for part in parts or PARTS:
    if _is_complete(targets[part], fp):
      continue
    if os.path.exists(targets[part]):
      raise RuntimeError(f"{targets[part]}: exists but holds no {_DONE_FILE} file with "
                         f"fingerprint {fp} (not written by this benchmark); move it away")
    size = params_bytes(cfg, encoder_only=part == "ours_encoder")
    free = shutil.disk_usage(final).free
    if size > free:
      raise RuntimeError(f"{final}: the {part} part of {preset} needs {size / 2**30:.1f} GiB "
                         f"of disk, {free / 2**30:.1f} GiB free; pass another --work_dir")
    # Orbax's copy of the weights while it saves ours (they are memory maps).
    memory = (0 if part == "hf" else 1) * size + 2 ** 30  # weights in memory maps
    available = available_memory()
    if memory > available:
      raise MemoryError(f"writing the {part} part of {preset} needs about "
                        f"{memory / 2**30:.1f} GiB of memory, {available / 2**30:.1f} GiB "
                        "available (MemAvailable)")
    log(f"writing {targets[part]} (random {preset}, {size / 2**30:.1f} GiB of float32)")
    tmp = tempfile.mkdtemp(prefix=f".{part}{_TMP_MARK}{os.getpid()}-", dir=final)
    try:
      # Its own process: the peak is that of one part, and each part draws the same
      # weights (every leaf has its own seed).
      process = multiprocessing.get_context("spawn").Process(
          target=write_part, args=(preset, part, os.path.join(tmp, part)))
      process.start()
      process.join()
      if process.exitcode != 0:
        killed = " (killed: out of memory?)" if process.exitcode == -9 else ""
        raise RuntimeError(f"writing {targets[part]} failed: exit code "
                           f"{process.exitcode}{killed}")
      with open(os.path.join(tmp, part, _DONE_FILE), "w", encoding="utf-8") as f:
        f.write(fp + "\n")
      os.rename(os.path.join(tmp, part), targets[part])
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return targets


PARTS = ("hf", "ours_encoder", "ours")


def write_part(preset: str, part: str, out: str) -> None:
  """Writes one part to `out`: the HF export, or our model directory (full or encoder).
  The weights are drawn into memory-mapped files beside `out` (`random_params`)."""
  from ankh3_jax import convert, model_io  # pylint: disable=g-import-not-at-top
  cfg = config(preset)
  scratch = out + ".scratch"
  os.makedirs(scratch)
  params = random_params(cfg, encoder_only=part == "ours_encoder", scratch_dir=scratch)
  if part == "hf":
    convert.export_hf(cfg, params, out)
  else:
    model_io.save_model(out, cfg, params)


def available_memory() -> int:
  try:
    with open("/proc/meminfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
