"""Our model directory format: config, parameters and vocabulary in one folder.

Layout of a model directory:
  config.json    `config_to_dict(T5Config)`
  params/        orbax StandardCheckpointer tree of plain (unboxed) float arrays, the
                 `params` collection without the {'params': ...} wrapper
  spiece.model   the SentencePiece model whose ids the parameters were trained with
  vocab.json     optional, {"extra_ids": N}: sentinels seqio puts on top of the pieces

Directories are written atomically: everything goes to a temporary sibling, which replaces
the target only once complete, and only a directory `is_model_directory` recognises (or
any, with `overwrite`; never one holding the vocabulary read or the working directory). `stack_layers` / `unstack_layers` move a parameter tree
between the unscanned (`layers_{i}`) and scanned (`layers`, leading layer axis) layouts.
"""
import json
import os
import re
import shutil
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ankh3_jax import cpu_tuning
from ankh3_jax import vocab as vocab_lib
from ankh3_jax.config import T5Config, config_from_dict, config_to_dict
from ankh3_jax.output_paths import atomic_directory
from ankh3_jax.output_paths import check_output_dir

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
SPIECE_FILE = "spiece.model"
VOCAB_FILE = "vocab.json"
# While loading, orbax holds at most this much beyond the largest parameter in flight
# (its default is 96 GB; every array in flight is an extra copy of it in memory).
RESTORE_SLACK_BYTES = 1 << 20
_STACKS = ("encoder", "decoder")
_LAYER_RE = re.compile(r"^layers_(\d+)$")

Params = dict[str, Any]


def as_plain_params(params: Any) -> Params:
  """Unboxes flax metadata (nn.Partitioned) and drops a {'params': ...} wrapper."""
  params = flax.core.unfreeze(nn.meta.unbox(params))
  if isinstance(params, dict) and set(params) == {"params"}:
    params = params["params"]
  if not isinstance(params, dict):
    raise TypeError(f"params must be a nested dict, got {type(params).__name__}")
  return params


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def expected_shapes(config: T5Config) -> Params:
  """Shape tree (tuples) of the parameters of `Transformer(config)`, without allocating."""
  from ankh3_jax.model import abstract_params  # pylint: disable=g-import-not-at-top

  return jax.tree_util.tree_map(lambda x: tuple(x.shape), abstract_params(config))


def check_params(config: T5Config, params: Params, where: str = "params") -> None:
  """Raises ValueError naming the first missing, unexpected or mis-shaped parameter.

  A tree without `decoder` (an encoder-only model) is accepted.
  """
  expected = expected_shapes(config)
  if "decoder" not in params:
    expected.pop("decoder", None)
  want = {_path_str(p): s for p, s in
          jax.tree_util.tree_flatten_with_path(expected, is_leaf=lambda x: isinstance(x, tuple))[0]}
  got = {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  missing = sorted(set(want) - set(got))
  if missing:
    raise ValueError(f"{where}: missing parameter {missing[0]} (expected shape {want[missing[0]]})"
                     + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
  unexpected = sorted(set(got) - set(want))
  if unexpected:
    raise ValueError(f"{where}: unexpected parameter {unexpected[0]}"
                     + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
  for name, shape in want.items():
    if tuple(np.shape(got[name])) != shape:
      raise ValueError(f"{where}: parameter {name} has shape {tuple(np.shape(got[name]))}, "
                       f"expected {shape}")
    dtype = np.asarray(got[name]).dtype if not hasattr(got[name], "dtype") else got[name].dtype
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"{where}: parameter {name} has non-float dtype {dtype}")


def _num_layers(config: T5Config, stack: str) -> int:
  return config.num_encoder_layers if stack == "encoder" else config.num_decoder_layers


def stack_layers(params: Params, config: T5Config) -> Params:
  """`layers_{i}` subtrees -> one `layers` subtree with a leading layer axis (scan layout).

  Stacks already in the scanned layout are left as they are.
  """
  params = as_plain_params(params)
  out = dict(params)
  for stack in _STACKS:
    if stack not in params:
      continue
    tree = dict(params[stack])
    if "layers" in tree and not any(_LAYER_RE.match(k) for k in tree):
      continue
    n = _num_layers(config, stack)
    names = [f"layers_{i}" for i in range(n)]
    missing = [k for k in names if k not in tree]
    extra = [k for k in tree if _LAYER_RE.match(k) and k not in names]
    if "layers" in tree:
      extra.append("layers")
    if missing or extra:
      raise ValueError(f"{stack}: expected exactly layers_0..layers_{n - 1} to stack; "
                       f"missing {missing}, unexpected {extra}")
    layer_trees = [tree.pop(k) for k in names]
    tree["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                            *layer_trees)
    out[stack] = tree
  return out


def unstack_layers(params: Params, config: T5Config) -> Params:
  """Inverse of `stack_layers`: `layers` [L, ...] -> `layers_{i}`. Unscanned stacks pass."""
  params = as_plain_params(params)
  out = dict(params)
  for stack in _STACKS:
    if stack not in params or "layers" not in params[stack]:
      continue
    tree = dict(params[stack])
    stacked = tree.pop("layers")
    n = _num_layers(config, stack)
    for path, leaf in jax.tree_util.tree_flatten_with_path(stacked)[0]:
      if np.shape(leaf)[:1] != (n,):
        raise ValueError(f"{stack}/layers/{_path_str(path)} has shape {np.shape(leaf)}; "
                         f"expected a leading layer axis of {n}")
    for i in range(n):
      tree[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: np.asarray(x[i]), stacked)
    out[stack] = tree
  return out


def layout_for(params: Params, config: T5Config) -> Params:
  """`params` in the layout `config.scan_layers` asks for."""
  return stack_layers(params, config) if config.scan_layers else unstack_layers(params, config)


def swap_decoder_kernels(params: Params, copy=np.ascontiguousarray) -> None:
  """Swaps the last two axes of the decoder layers' kernels ('in_out' <-> 'out_in',
  `T5Config.decoder_kernels`; the output layer's stays), in place: each new array, made by
  `copy` from the swapped view, replaces its source at once, so the decoder is not held
  twice when nothing else holds the old arrays."""
  def swap(tree: dict, top: bool) -> None:
    for key, value in tree.items():
      if isinstance(value, dict):
        if not (top and key == "logits_dense"):
          swap(value, False)
      elif key == "kernel" and not top:
        tree[key] = (copy(value.swapaxes(-1, -2)) if isinstance(value, np.ndarray)
                     else jnp.swapaxes(value, -1, -2))

  swap(params.get("decoder", {}), True)


def is_model_directory(directory: str) -> bool:
  """Whether `directory` holds a model directory of ours and nothing else."""
  entries = set(os.listdir(directory))
  if CONFIG_FILE not in entries or not entries <= {CONFIG_FILE, PARAMS_DIR, SPIECE_FILE,
                                                   VOCAB_FILE}:
    return False
  try:
    load_config(directory)
  except (OSError, ValueError):
    return False
  return True


def save_model(directory: str, config: T5Config, params: Any,
               vocab_path: Optional[str] = None, extra_ids: Optional[int] = None,
               overwrite: bool = False) -> None:
  """Writes a model directory (atomically). `vocab_path` defaults to our vocabulary.

  An existing `directory` is replaced only if it is a model directory of ours and holds
  nothing else (`is_model_directory`), or with `overwrite`; never when it holds
  `vocab_path` or the working directory (`output_paths.OutputError`).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  vocab_path = vocab_lib.VOCAB_PATH if vocab_path is None else vocab_path
  if not os.path.isfile(vocab_path):
    raise FileNotFoundError(f"vocabulary file not found: {vocab_path}")
  check_output_dir(directory, [vocab_path], overwrite=overwrite, is_ours=is_model_directory,
                   what="model directory")
  params = layout_for(jax.device_get(as_plain_params(params)), config)
  params = jax.tree_util.tree_map(np.asarray, params)
  if config.decoder_kernels != "in_out":  # laid out for inference: store as checkpoints do
    swap_decoder_kernels(params)
    config = config.replace(decoder_kernels="in_out")
  check_params(config, params, where=f"params for {directory}")
  with atomic_directory(directory) as tmp:
    with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
      json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
    shutil.copyfile(vocab_path, os.path.join(tmp, SPIECE_FILE))
    if extra_ids is not None:
      with open(os.path.join(tmp, VOCAB_FILE), "w", encoding="utf-8") as f:
        json.dump({"extra_ids": int(extra_ids)}, f)
    # A save by this process alone (multi-host trainers export from process 0 only).
    checkpointer = ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=jax.process_index(), active_processes={jax.process_index()}))
    try:
      checkpointer.save(os.path.join(tmp, PARAMS_DIR), params)
      checkpointer.wait_until_finished()
    finally:
      checkpointer.close()


def load_config(directory: str) -> T5Config:
  """The `T5Config` of a model directory."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"model directory not found: {directory}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory} is not a model directory: {CONFIG_FILE} is missing")
  try:
    with open(path, encoding="utf-8") as f:
      return config_from_dict(json.load(f))
  except (ValueError, TypeError) as e:
    raise ValueError(f"corrupt {path}: {e}") from e


def load_extra_ids(directory: str) -> int:
  """Sentinel count of the directory's vocabulary (vocab.json; else our default)."""
  path = os.path.join(directory, VOCAB_FILE)
  if not os.path.isfile(path):
    return vocab_lib.NUM_SENTINELS
  try:
    with open(path, encoding="utf-8") as f:
      return int(json.load(f)["extra_ids"])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"corrupt {path}: expected {{\"extra_ids\": N}} ({e})") from e


def _stored_tree(ocp, params_dir: str) -> Params:
  """The parameter tree as stored, as `jax.ShapeDtypeStruct`s from the checkpoint's
  metadata (no array is read)."""
  probe = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  try:
    metadata = probe.metadata(params_dir).item_metadata.tree
  finally:
    probe.close()
  return jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)), metadata)


def _read_as(stored: Params, float_dtype=None, sharding=None) -> Params:
  """`stored` with its floating leaves in `float_dtype` (if given), on `sharding`."""
  def target_of(t):
    floating = float_dtype is not None and np.issubdtype(t.dtype, np.floating)
    return jax.ShapeDtypeStruct(t.shape, float_dtype if floating else t.dtype,
                                sharding=sharding)

  return jax.tree_util.tree_map(target_of, stored)


def _abstract_params(ocp, params_dir: str, float_dtype=None) -> Params:
  return _read_as(_stored_tree(ocp, params_dir), float_dtype)


def _restore_params(ocp, params_dir: str, float_dtype=None) -> Params:
  """The parameter tree as read-only numpy views of CPU-device arrays; floating ones are
  cast to `float_dtype` (if given) as they are read.

  Restoring into the CPU device's own buffers (64-byte aligned) lets a later
  `jax.device_put` onto that device adopt them without a copy; from plain numpy arrays
  (16-byte aligned) it copies, and the process held the parameters twice. Only the
  largest array plus `RESTORE_SLACK_BYTES` is in flight at once, and the buffers read
  and dropped on the way go back to the OS (`cpu_tuning.large_frees_returned`).
  """
  stored = _stored_tree(ocp, params_dir)
  largest = max((int(np.prod(t.shape)) * t.dtype.itemsize
                 for t in jax.tree_util.tree_leaves(stored)), default=0)
  cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
  target = _read_as(stored, float_dtype, sharding=cpu)
  checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler(
      restore_concurrent_gb=(largest + RESTORE_SLACK_BYTES) / 1e9))
  try:
    with cpu_tuning.large_frees_returned():
      params = checkpointer.restore(params_dir, args=ocp.args.StandardRestore(target))
  finally:
    checkpointer.close()
  return jax.tree_util.tree_map(np.asarray, params)


def load_model(directory: str, param_dtype=None) -> tuple[T5Config, Params, str]:
  """Reads a model directory: (config, params as read-only numpy arrays, path of its
  spiece.model). With `param_dtype` (e.g. bfloat16), floating parameters are cast as
  they are read, so the stored float32 tree is never held whole.

  Params come back in the layout `config.scan_layers` names (`layout_for` converts).
  """
  return _read_model(directory, _restore_params, param_dtype, check=True)


def load_abstract_model(directory: str, param_dtype=None) -> tuple[T5Config, Params, str]:
  """What `load_model` returns, with `jax.ShapeDtypeStruct`s in place of the parameters:
  their shapes and dtypes as stored, from the checkpoint's metadata (no array is read)."""
  return _read_model(directory, _abstract_params, param_dtype, check=False)


def _read_model(directory: str, read_params, param_dtype, check: bool):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  directory = os.path.abspath(directory)
  config = load_config(directory)
  vocab_path = os.path.join(directory, SPIECE_FILE)
  if not os.path.isfile(vocab_path):
    raise FileNotFoundError(f"{directory}: {SPIECE_FILE} is missing")
  params_dir = os.path.join(directory, PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f"{directory}: {PARAMS_DIR}/ is missing")
  try:
    params = read_params(ocp, params_dir, param_dtype)
  except Exception as e:  # orbax raises many types for unreadable trees
    raise ValueError(f"corrupt or unreadable parameters in {params_dir}: {e}") from e
  if check:
    check_params(config, params, where=params_dir)
  return config, params, vocab_path
