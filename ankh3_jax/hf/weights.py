"""Hugging Face T5 weights: reading safetensors / PyTorch files (sharded or not) and the
tensor-by-tensor mapping to our parameter tree and back."""
import json
import os
from typing import Any

import numpy as np

from ankh3_jax import model_io
from ankh3_jax.config import T5Config
from ankh3_jax.hf import config as hf_config

Params = dict[str, Any]
State = dict[str, np.ndarray]

SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"
_ATTENTION = (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out"))
# Tensors that transformers itself ignores when loading a T5.
_IGNORED_TENSORS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _read_safetensors_raw(path: str) -> State:
  """Reads a safetensors file with numpy memory maps (for bfloat16, which numpy lacks)."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top

  dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
            "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
            "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
  with open(path, "rb") as f:
    size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(size))
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
  state = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in dtypes:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    state[name] = np.frombuffer(data[begin:end], dtype=dtypes[info["dtype"]]).reshape(
        info["shape"])
  return state


def _load_safetensors(path: str) -> State:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  try:
    return load_file(path)
  except TypeError:  # a dtype numpy does not know (bfloat16)
    return _read_safetensors_raw(path)
  except Exception as e:  # safetensors raises its own error type for corrupt files
    raise ValueError(f"cannot read {path}: {e}") from e


def _load_torch(path: str) -> State:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"{path} is a PyTorch pickle: reading it needs torch "
                      "(pip install torch), or convert the checkpoint to safetensors") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}


def load_hf_weights(hf_dir: str) -> State:
  """All tensors of an HF directory by name, from safetensors or `.bin`, sharded or not."""
  for single, loader in ((SAFETENSORS_FILE, _load_safetensors), (TORCH_FILE, _load_torch)):
    path = os.path.join(hf_dir, single)
    if os.path.isfile(path):
      return loader(path)
    index = path + ".index.json"
    if os.path.isfile(index):
      try:
        with open(index, encoding="utf-8") as f:
          weight_map = json.load(f)["weight_map"]
      except (ValueError, KeyError) as e:
        raise ValueError(f"corrupt {index}: {e}") from e
      state = {}
      for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(hf_dir, shard)
        if not os.path.isfile(shard_path):
          raise FileNotFoundError(f"{hf_dir}: shard {shard} named in {os.path.basename(index)} "
                                  "is missing")
        state.update(loader(shard_path))
      absent = sorted(set(weight_map) - set(state))
      if absent:
        raise ValueError(f"{index}: tensor {absent[0]} is not in its shard {weight_map[absent[0]]}")
      return state
  raise FileNotFoundError(f"{hf_dir}: no weights found (expected {SAFETENSORS_FILE}, "
                          f"{SAFETENSORS_FILE}.index.json, {TORCH_FILE} or "
                          f"{TORCH_FILE}.index.json)")


def param_mapping(config: T5Config, encoder_only: bool = False
                  ) -> list[tuple[str, tuple[str, ...], bool]]:
  """(HF tensor, our parameter path, transpose?) for every tensor but embeddings / LM head."""
  mlp = ("wi_0", "wi_1", "wo") if config.is_gated else ("wi", "wo")
  bias = "layer.0.SelfAttention.relative_attention_bias.weight"
  rows = [(f"encoder.block.0.{bias}", ("encoder", "relpos_bias", "rel_embedding"), True),
          ("encoder.final_layer_norm.weight", ("encoder", "encoder_norm", "scale"), False)]
  for i in range(config.num_encoder_layers):
    hf, ours = f"encoder.block.{i}.layer", ("encoder", f"layers_{i}")
    rows.append((f"{hf}.0.layer_norm.weight", ours + ("pre_attention_layer_norm", "scale"), False))
    rows += [(f"{hf}.0.SelfAttention.{a}.weight", ours + ("attention", b, "kernel"), True)
             for a, b in _ATTENTION]
    rows.append((f"{hf}.1.layer_norm.weight", ours + ("pre_mlp_layer_norm", "scale"), False))
    rows += [(f"{hf}.1.DenseReluDense.{w}.weight", ours + ("mlp", w, "kernel"), True)
             for w in mlp]
  if encoder_only:
    return rows
  rows += [(f"decoder.block.0.{bias}", ("decoder", "relpos_bias", "rel_embedding"), True),
           ("decoder.final_layer_norm.weight", ("decoder", "decoder_norm", "scale"), False)]
  for i in range(config.num_decoder_layers):
    hf, ours = f"decoder.block.{i}.layer", ("decoder", f"layers_{i}")
    rows.append((f"{hf}.0.layer_norm.weight",
                 ours + ("pre_self_attention_layer_norm", "scale"), False))
    rows += [(f"{hf}.0.SelfAttention.{a}.weight", ours + ("self_attention", b, "kernel"), True)
             for a, b in _ATTENTION]
    rows.append((f"{hf}.1.layer_norm.weight",
                 ours + ("pre_cross_attention_layer_norm", "scale"), False))
    rows += [(f"{hf}.1.EncDecAttention.{a}.weight",
              ours + ("encoder_decoder_attention", b, "kernel"), True) for a, b in _ATTENTION]
    rows.append((f"{hf}.2.layer_norm.weight", ours + ("pre_mlp_layer_norm", "scale"), False))
    rows += [(f"{hf}.2.DenseReluDense.{w}.weight", ours + ("mlp", w, "kernel"), True)
             for w in mlp]
  return rows


def _get(tree: Params, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: Params, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _f32(x: np.ndarray, transpose: bool = False) -> np.ndarray:
  x = np.asarray(x, dtype=np.float32)
  return np.ascontiguousarray(x.T if transpose else x)


def _check_shape(name: str, tensor: np.ndarray, shape: tuple[int, ...]) -> None:
  if tuple(tensor.shape) != tuple(shape):
    raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")


def check_finite(state: State) -> None:
  """Raises ValueError naming the tensors that hold NaN or infinite values."""
  bad = []
  for name in sorted(state):
    tensor = np.asarray(state[name])
    if np.issubdtype(tensor.dtype, np.inexact) or tensor.dtype.kind == "V":
      values = tensor.astype(np.float32) if tensor.dtype.kind == "V" else tensor
      if not np.all(np.isfinite(values)):
        count = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        bad.append(f"{name} ({count} of {np.size(values)} values)")
  if bad:
    raise ValueError("non-finite (NaN or infinite) weights in tensor "
                     + ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""))


def state_to_params(state: State, hf_cfg: dict, encoder_only: bool
                    ) -> tuple[T5Config, Params]:
  """Our (config, unscanned float32 params) from an HF state dict and config."""
  state = dict(state)
  if encoder_only:  # as transformers does for T5EncoderModel
    state = {k: v for k, v in state.items()
             if not k.startswith("decoder.") and k != "lm_head.weight"}
  for name in _IGNORED_TENSORS:
    state.pop(name, None)
  check_finite(state)
  present = [n for n in _EMBEDDINGS if n in state]
  if not present:
    raise ValueError("missing tensor shared.weight (the token embedding)")
  shared = state.pop(present[0])
  for name in present[1:]:
    other = state.pop(name)
    if other.shape != shared.shape or not np.array_equal(other, shared):
      raise ValueError(f"tensor {name} differs from {present[0]}: separate input embeddings "
                       "per stack are not supported")
  head = state.pop("lm_head.weight", None)
  scale = hf_config.scales_decoder_outputs(hf_cfg)
  same_head = head is None or (head.shape == shared.shape and np.array_equal(head, shared))
  config = hf_config.config_from_hf(hf_cfg, tie_word_embeddings=scale and same_head)
  expected = model_io.expected_shapes(config)

  params: Params = {}
  _check_shape(present[0], shared, expected["token_embedder"]["embedding"])
  _set(params, ("token_embedder", "embedding"), _f32(shared))
  for name, path, transpose in param_mapping(config, encoder_only):
    if name not in state:
      raise ValueError(f"missing tensor {name}")
    want = _get(expected, path)
    _check_shape(name, state[name], want[::-1] if transpose else want)
    _set(params, path, _f32(state.pop(name), transpose))
  if not encoder_only and not config.tie_word_embeddings:
    # HF's head is `lm_head(x * d_model**-0.5)` when scaling: fold the factor into the kernel.
    kernel = _f32(shared if head is None else head, transpose=True)
    _check_shape("lm_head.weight", kernel.T, expected["decoder"]["logits_dense"]["kernel"][::-1])
    if scale:
      kernel = kernel * np.float32(config.d_model ** -0.5)
    _set(params, ("decoder", "logits_dense", "kernel"), kernel)
  if state:
    extra = sorted(state)
    raise ValueError(f"unexpected tensor {extra[0]}"
                     + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
  return config, params


def _state_sources(config: T5Config, params: Params, encoder_only: bool
                   ) -> list[tuple[str, Any, bool]]:
  """(HF tensor, our array, transpose?) for every tensor of the HF state, in file order."""
  sources = [("shared.weight", params["token_embedder"]["embedding"], False)]
  sources += [(name, _get(params, path), transpose)
              for name, path, transpose in param_mapping(config, encoder_only)]
  if not encoder_only and not config.tie_word_embeddings:
    sources.append(("lm_head.weight", params["decoder"]["logits_dense"]["kernel"], True))
  return sources


def params_to_state(config: T5Config, params: Params, encoder_only: bool = False) -> State:
  """HF tensor dict (float32, [out, in] weights) from our unscanned params."""
  return {name: _f32(array, transpose)
          for name, array, transpose in _state_sources(config, params, encoder_only)}


def write_safetensors(path: str, config: T5Config, params: Params,
                      encoder_only: bool = False) -> None:
  """Writes `params_to_state`'s tensors to a safetensors file one tensor at a time, so
  the export holds one converted tensor in memory beside `params`, not a copy of all."""
  sources = _state_sources(config, params, encoder_only)
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, array, transpose in sources:
    shape = list(np.shape(array)[::-1] if transpose else np.shape(array))
    size = int(np.prod(shape)) * 4
    header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
    offset += size
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes
  with open(path, "wb") as f:
    f.write(len(text).to_bytes(8, "little"))
    f.write(text)
    for name, array, transpose in sources:
      f.write(_f32(array, transpose).tobytes())
