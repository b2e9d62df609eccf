"""Shared by the inference tools: resolving a model argument, tokenising, detokenising.

A "model" argument is either a directory in our format (`model_io.save_model`) or a tuple
`(config, params)` / `(config, params, vocab_path)`. Params may be boxed (logical
partitioning metadata); they are unboxed here.
"""
import dataclasses
import os
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ankh3_jax import config as config_lib
from ankh3_jax import layers
from ankh3_jax import vocab
from ankh3_jax.config import T5Config

ModelArg = Union[str, os.PathLike, tuple]

COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """An unboxed model ready for inference."""
  config: T5Config
  params: Any
  vocab_path: str
  source: str = ""  # the directory it came from, or "" for in-memory params


def compute_dtype(name: str):
  """'float32' or 'bfloat16' -> the jnp dtype; anything else is an error."""
  return config_lib.dtype_named(name, COMPUTE_DTYPES)


def resolve_model(model: ModelArg, dtype: str = "float32",
                  param_dtype: Optional[str] = None) -> LoadedModel:
  """Loads or unpacks `model` and sets its computation dtype.

  The floating-point parameters are stored in `param_dtype` (default: `dtype`), so
  'bfloat16' halves their memory; layers cast them to `dtype` as they use them, and
  layer norms still compute their variance in float32.
  """
  target = compute_dtype(dtype)
  storage = compute_dtype(param_dtype or dtype)
  if isinstance(model, LoadedModel):
    config, params, vocab_path, source = (model.config, model.params, model.vocab_path,
                                          model.source)
  elif isinstance(model, (str, os.PathLike)):
    from ankh3_jax import model_io  # pylint: disable=g-import-not-at-top

    source = os.fspath(model)
    if not os.path.isdir(source):
      raise FileNotFoundError(f"model directory not found: {source}")
    config, params, vocab_path = model_io.load_model(
        source, param_dtype=None if storage == jnp.float32 else storage)
  elif isinstance(model, tuple) and len(model) in (2, 3):
    config, params = model[0], model[1]
    vocab_path = model[2] if len(model) == 3 else None
    source = ""
  else:
    raise TypeError("model must be a model directory, (config, params) or "
                    f"(config, params, vocab_path); got {type(model).__name__}")
  if not isinstance(config, T5Config):
    raise TypeError(f"expected a T5Config, got {type(config).__name__}")
  params = nn.unbox(params)
  if "params" in params and len(params) == 1:  # a variables dict
    params = params["params"]
  if storage != jnp.float32:  # (a directory's parameters were read in `storage` already)
    params = jax.tree.map(lambda x: _as_storage(x, storage), params)
  config = config.replace(dtype=target, dropout_rate=0.0)
  layout = decoder_kernel_layout(config)
  if "decoder" in params and config.decoder_kernels != layout:
    if not source or isinstance(model, LoadedModel):
      params = jax.tree.map(lambda x: x, params)  # swap in our own tree, not the caller's
    from ankh3_jax import model_io  # pylint: disable=g-import-not-at-top
    model_io.swap_decoder_kernels(params, copy=lambda x: aligned_astype(x, x.dtype))
    config = config.replace(decoder_kernels=layout)
  return LoadedModel(config, params, os.fspath(vocab_path or vocab.VOCAB_PATH), source)


def abstract_model(directory: Union[str, os.PathLike], dtype: str = "float32",
                   param_dtype: Optional[str] = None) -> LoadedModel:
  """What `resolve_model(directory, dtype, param_dtype)` returns, with
  `jax.ShapeDtypeStruct`s in place of the parameters, without reading them: enough to
  compile a program before the weights take their memory."""
  from ankh3_jax import model_io  # pylint: disable=g-import-not-at-top

  source = os.fspath(directory)
  if not os.path.isdir(source):
    raise FileNotFoundError(f"model directory not found: {source}")
  storage = compute_dtype(param_dtype or dtype)
  config, stored, vocab_path = model_io.load_abstract_model(
      source, param_dtype=None if storage == jnp.float32 else storage)
  resolved = {}

  def resolve(params):  # the same steps as for the weights, traced on their shapes
    resolved["model"] = resolve_model((config, params, vocab_path), dtype, param_dtype)
    return resolved["model"].params

  params = jax.eval_shape(resolve, stored)
  return dataclasses.replace(resolved["model"], params=params, source=source)


def decoder_kernel_layout(config: T5Config) -> str:
  """How inference holds the decoder's kernels (`T5Config.decoder_kernels`): 'out_in' on
  the CPU when a decode step streams its weights from memory (decoders beyond
  `layers.FUSED_COPY_LIMIT_BYTES`: `ankh_base` and larger), else 'in_out'."""
  streams = layers.fused_copy_bytes(config) > layers.FUSED_COPY_LIMIT_BYTES
  return "out_in" if streams and jax.default_backend() == "cpu" else "in_out"


def _as_storage(x, dtype):
  """A floating parameter in `dtype` (numpy ones in a buffer `jax.device_put` shares)."""
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
    return x
  return aligned_astype(x, dtype) if isinstance(x, np.ndarray) else x.astype(dtype)


CPU_ALIGNMENT = 64  # bytes: a numpy array aligned so is adopted by `jax.device_put` on CPU


def aligned_astype(array: np.ndarray, dtype) -> np.ndarray:
  """`array.astype(dtype)` in a buffer aligned to `CPU_ALIGNMENT`, so that placing it on
  the CPU device shares it instead of copying it (numpy aligns large arrays to 16)."""
  dtype = np.dtype(dtype)
  buffer = np.empty(array.size * dtype.itemsize + CPU_ALIGNMENT, np.uint8)
  start = -buffer.ctypes.data % CPU_ALIGNMENT
  out = buffer[start:start + array.size * dtype.itemsize].view(dtype).reshape(array.shape)
  np.copyto(out, array, casting="unsafe")
  return out


def matmul_precision(dtype: str):
  """Context for running compiled inference: full float32 matmuls when dtype is float32
  (GPUs otherwise use TF32 and drift ~1e-3 from the reference), the default for bf16."""
  return jax.default_matmul_precision("highest" if dtype == "float32" else "default")


def encoder_params(params) -> dict:
  """The subset of `params` that `Transformer.encode` reads."""
  return {k: params[k] for k in ("token_embedder", "encoder")}


def tokenize(sequence: str, prefix: str, vocab_path: str, record: str = "") -> list:
  """`prefix + sequence + eos` ids, checked to hold exactly one id per residue."""
  ids = vocab.encode(sequence, prefix, add_eos=True, path=vocab_path)
  if len(ids) != len(sequence) + 2:
    name = f"record {record!r}: " if record else ""
    raise ValueError(f"{name}the vocabulary {vocab_path} encodes {len(sequence)} residues "
                     f"with prefix {prefix!r} to {len(ids)} ids; expected one per residue "
                     "plus prefix and eos")
  return ids


def residue_token_ids(vocab_path: str, letters: str = vocab.RESIDUES) -> list:
  """Ids of the single-residue pieces (those the vocabulary has)."""
  sp = vocab.get_processor(vocab_path)
  ids = [sp.piece_to_id(letter) for letter in letters]
  return sorted({i for i in ids if i != sp.unk_id()})


def detokenize(ids: Sequence[int], vocab_path: str, vocab_size: int) -> str:
  """Text of generated ids up to the first eos; pad is skipped and ids above the
  SentencePiece vocabulary are written as seqio sentinels `<extra_id_N>`."""
  sp = vocab.get_processor(vocab_path)
  pieces = []
  for i in ids:
    i = int(i)
    if i == vocab.EOS_ID:
      break
    if i == vocab.PAD_ID:
      continue
    if i >= sp.get_piece_size():
      pieces.append(f"<extra_id_{vocab_size - 1 - i}>")
    else:
      pieces.append(sp.id_to_piece(i))
  return "".join(pieces)


def next_power_of_two(n: int, minimum: int = 1) -> int:
  n = max(int(n), minimum, 1)
  return 1 << (n - 1).bit_length()


def length_bucket(n: int, minimum: int = 16, steps_per_octave: int = 4) -> int:
  """Smallest padded length >= n on the ladder minimum, ..., 16, 20, 24, 28, 32, 40, 48,
  ... (`steps_per_octave` equal steps per doubling): padding adds at most
  1 / steps_per_octave of n, and the number of distinct lengths (compiles) stays small."""
  octave = next_power_of_two(n, minimum)
  step = max(octave // (2 * steps_per_octave), 1)
  return max(-(-int(n) // step) * step, minimum)


def pad_rows(rows: Sequence[Sequence[int]], length: int, num_rows: Optional[int] = None):
  """Right-pads id lists with 0 into an int32 [num_rows, length] numpy array."""
  out = np.zeros((num_rows or len(rows), length), np.int32)
  for r, ids in enumerate(rows):
    out[r, :len(ids)] = ids
  return out
