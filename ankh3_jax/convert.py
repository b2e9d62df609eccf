"""Hugging Face interop: import and export `transformers` T5 checkpoints (see docs/conversion.md).

  ankh3-convert import HF_DIR OUT_MODEL_DIR [--scan_layers] [--overwrite]
  ankh3-convert export MODEL_DIR HF_OUT_DIR [--encoder_only] [--overwrite]

An existing output directory is replaced only if this command wrote it (it holds our
files and nothing else) or with --overwrite; never the input or the working directory.

Import reads local `T5ForConditionalGeneration` / `T5EncoderModel` directories (safetensors,
sharded or not, without torch; `pytorch_model.bin` needs torch). Export writes safetensors
with numpy only. Neither imports TensorFlow, seqio, torch or transformers at module level.
"""
import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
from typing import Any, Optional

import numpy as np

from ankh3_jax import hf_tokenizer
from ankh3_jax import model_io
from ankh3_jax import output_paths
from ankh3_jax import quiet
from ankh3_jax import vocab as vocab_lib
from ankh3_jax.config import T5Config

Params = dict[str, Any]
State = dict[str, np.ndarray]

SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"
SPIECE_FILE = "spiece.model"
_ATTENTION = (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out"))
# HF activation names (`dense_act_fn`) -> our `feed_forward_proj` activation. HF's plain
# 'gelu' is the exact (erf) gelu, which our layers do not implement: it is rejected.
_FROM_HF_ACT = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "silu": "silu",
                "swish": "silu", "relu": "relu"}
_TO_HF_ACT = {"gelu": "gelu_new", "silu": "silu", "relu": "relu"}
# Tensors that transformers itself ignores when loading a T5.
_IGNORED_TENSORS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_SENTINEL_RE = re.compile(r"^<extra_id_(\d+)>$")
# What `export_hf` writes: a directory with these files only may be replaced by an export.
EXPORT_FILES = ("config.json", "generation_config.json", SAFETENSORS_FILE, SPIECE_FILE,
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# config.json keys read by `config_from_hf`: (kind, smallest allowed value).
_HF_INT_FIELDS = {"vocab_size": 1, "d_model": 1, "d_ff": 1, "d_kv": 1, "num_heads": 1,
                  "num_layers": 1, "num_decoder_layers": 0,
                  "relative_attention_num_buckets": 1, "relative_attention_max_distance": 1}


@dataclasses.dataclass(frozen=True)
class VocabInfo:
  """The tokenizer of an imported checkpoint, in seqio terms (pieces + `extra_ids`)."""
  spiece_path: str
  extra_ids: int
  rule: str                               # which source decided `extra_ids`
  num_pieces: int
  unmapped_tokens: tuple[str, ...] = ()   # added tokens seqio cannot represent

  @property
  def size(self) -> int:
    return self.num_pieces + self.extra_ids


# ----------------------------------------------------------------------------- config


def read_hf_config(hf_dir: str) -> dict:
  """`config.json` of a Hugging Face directory; errors unless it describes a T5."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isdir(hf_dir):
    raise FileNotFoundError(f"Hugging Face directory not found: {hf_dir}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{hf_dir}: config.json is missing")
  try:
    with open(path, encoding="utf-8") as f:
      hf_cfg = json.load(f)
  except ValueError as e:
    raise ValueError(f"corrupt {path}: {e}") from e
  if not isinstance(hf_cfg, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(hf_cfg).__name__}")
  if hf_cfg.get("model_type") != "t5":
    raise ValueError(f"not a T5 checkpoint: model_type={hf_cfg.get('model_type')!r}, "
                     f"architectures={hf_cfg.get('architectures')!r} ({path})")
  check_hf_config(hf_cfg, path)
  return hf_cfg


def check_hf_config(hf_cfg: dict, path: str) -> None:
  """Raises ValueError naming the first config.json value of the wrong type or range."""
  def bad(key, expected):
    raise ValueError(f"{path}: {key}={hf_cfg[key]!r}, expected {expected}")

  for key, low in _HF_INT_FIELDS.items():
    value = hf_cfg.get(key)
    if key in hf_cfg and not (value is None and key == "num_decoder_layers"):
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        bad(key, f"an integer >= {low}")
  eps = hf_cfg.get("layer_norm_epsilon", 1e-6)
  if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
    bad("layer_norm_epsilon", "a number in (0, 1)")
  rate = hf_cfg.get("dropout_rate", 0.1)
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
    bad("dropout_rate", "a number in [0, 1)")
  for key in ("feed_forward_proj", "dense_act_fn"):
    if hf_cfg.get(key) is not None and not isinstance(hf_cfg[key], str):
      bad(key, "a string")
  for key in ("tie_word_embeddings", "scale_decoder_outputs"):
    if key in hf_cfg and not isinstance(hf_cfg[key], bool):
      bad(key, "true or false")
  arch = hf_cfg.get("architectures")
  if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
    bad("architectures", "a list of class names")


def _hf_feed_forward(hf_cfg: dict) -> str:
  """Our `feed_forward_proj` for an HF config, resolving `dense_act_fn` as transformers does."""
  proj = hf_cfg.get("feed_forward_proj", "relu")
  parts = proj.split("-")
  if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
    raise ValueError(f"unsupported feed_forward_proj {proj!r}")
  act = hf_cfg.get("dense_act_fn") or ("gelu_new" if proj == "gated-gelu" else parts[-1])
  if act not in _FROM_HF_ACT:
    raise ValueError(f"unsupported activation {act!r} (feed_forward_proj={proj!r}); "
                     f"supported: {sorted(_FROM_HF_ACT)}")
  return ("gated-" if len(parts) == 2 else "") + _FROM_HF_ACT[act]


def scales_decoder_outputs(hf_cfg: dict) -> bool:
  """Whether HF multiplies decoder outputs by d_model**-0.5 before the LM head.

  transformers 5.x stores this as `scale_decoder_outputs`; older configs say it through
  `tie_word_embeddings` (absent = True).
  """
  if "scale_decoder_outputs" in hf_cfg:
    return bool(hf_cfg["scale_decoder_outputs"])
  return hf_cfg.get("tie_word_embeddings", True) is not False


def config_from_hf(hf_cfg: dict, tie_word_embeddings: bool) -> T5Config:
  """Our `T5Config` for an HF T5 config dict (float32)."""
  num_layers = hf_cfg.get("num_layers", 6)
  num_decoder_layers = hf_cfg.get("num_decoder_layers")
  return T5Config(
      vocab_size=hf_cfg.get("vocab_size", 32128),
      d_model=hf_cfg.get("d_model", 512),
      d_ff=hf_cfg.get("d_ff", 2048),
      d_kv=hf_cfg.get("d_kv", 64),
      num_heads=hf_cfg.get("num_heads", 8),
      num_encoder_layers=num_layers,
      num_decoder_layers=num_layers if num_decoder_layers is None else num_decoder_layers,
      feed_forward_proj=_hf_feed_forward(hf_cfg),
      relative_attention_num_buckets=hf_cfg.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf_cfg.get("relative_attention_max_distance", 128),
      layer_norm_epsilon=hf_cfg.get("layer_norm_epsilon", 1e-6),
      dropout_rate=hf_cfg.get("dropout_rate", 0.1),
      tie_word_embeddings=tie_word_embeddings,
  )


def config_to_hf(config: T5Config, encoder_only: bool = False) -> dict:
  """`config.json` contents for transformers (4.x and 5.x read it alike)."""
  act = config.activation
  if act not in _TO_HF_ACT:
    raise ValueError(f"cannot export feed_forward_proj {config.feed_forward_proj!r}")
  if config.feed_forward_proj == "gelu":
    raise ValueError("cannot export non-gated 'gelu': HF's plain 'gelu' is the exact gelu, "
                     "ours the tanh approximation")
  return {
      "architectures": ["T5EncoderModel" if encoder_only else "T5ForConditionalGeneration"],
      "model_type": "t5",
      "vocab_size": config.vocab_size,
      "d_model": config.d_model,
      "d_kv": config.d_kv,
      "d_ff": config.d_ff,
      "num_layers": config.num_encoder_layers,
      "num_decoder_layers": config.num_decoder_layers,
      "num_heads": config.num_heads,
      "relative_attention_num_buckets": config.relative_attention_num_buckets,
      "relative_attention_max_distance": config.relative_attention_max_distance,
      "dropout_rate": config.dropout_rate,
      "layer_norm_epsilon": config.layer_norm_epsilon,
      "initializer_factor": 1.0,
      "feed_forward_proj": config.feed_forward_proj,
      "dense_act_fn": _TO_HF_ACT[act],
      "is_gated_act": config.is_gated,
      "is_encoder_decoder": True,
      "use_cache": True,
      "pad_token_id": vocab_lib.PAD_ID,
      "eos_token_id": vocab_lib.EOS_ID,
      "decoder_start_token_id": vocab_lib.PAD_ID,
      # Tied models scale decoder outputs by d_model**-0.5 (both flags, for 4.x and 5.x).
      "tie_word_embeddings": config.tie_word_embeddings,
      "scale_decoder_outputs": config.tie_word_embeddings,
      "torch_dtype": "float32",
  }


# ---------------------------------------------------------------------------- weights


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


# ---------------------------------------------------------------------------- mapping


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
  scale = scales_decoder_outputs(hf_cfg)
  same_head = head is None or (head.shape == shared.shape and np.array_equal(head, shared))
  config = config_from_hf(hf_cfg, tie_word_embeddings=scale and same_head)
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


def params_to_state(config: T5Config, params: Params, encoder_only: bool = False) -> State:
  """HF tensor dict (float32, [out, in] weights) from our unscanned params."""
  state = {"shared.weight": _f32(params["token_embedder"]["embedding"])}
  for name, path, transpose in param_mapping(config, encoder_only):
    state[name] = _f32(_get(params, path), transpose)
  if not encoder_only and not config.tie_word_embeddings:
    state["lm_head.weight"] = _f32(params["decoder"]["logits_dense"]["kernel"], transpose=True)
  return state


# -------------------------------------------------------------------------- tokenizer


def _read_json(path: str) -> Optional[Any]:
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except ValueError as e:
    raise ValueError(f"corrupt {path}: {e}") from e


def _token_text(token) -> str:
  return token["content"] if isinstance(token, dict) else str(token)


def hf_vocab_info(hf_dir: str, model_vocab_size: int) -> VocabInfo:
  """Reads the checkpoint's tokenizer and finds its `extra_ids` (see docs/conversion.md).

  Rule, first that applies: (1) the ids of `<extra_id_N>` tokens listed with ids in
  tokenizer.json / tokenizer_config.json (`added_tokens_decoder`) / added_tokens.json,
  which must sit on top of the pieces with `<extra_id_0>` highest (seqio's layout);
  (2) `extra_ids` in tokenizer_config.json, else the count of `<extra_id_N>` names in the
  special-token lists; (3) config vocab_size minus the pieces of spiece.model.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  spiece = os.path.join(hf_dir, SPIECE_FILE)
  if not os.path.isfile(spiece):  # transformers 5 saves tokenizer.json only
    spiece = hf_tokenizer.spiece_for_checkpoint(hf_dir)
  try:
    processor = spm.SentencePieceProcessor(model_file=spiece)
  except Exception as e:  # sentencepiece raises RuntimeError / OSError
    raise ValueError(f"corrupt {spiece}: {e}") from e
  pieces = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
  num_pieces = len(pieces)
  tok_cfg = _read_json(os.path.join(hf_dir, "tokenizer_config.json")) or {}
  special_map = _read_json(os.path.join(hf_dir, "special_tokens_map.json")) or {}
  tok_json = _read_json(os.path.join(hf_dir, "tokenizer.json")) or {}
  added_json = _read_json(os.path.join(hf_dir, "added_tokens.json")) or {}

  with_ids: dict[str, int] = {}
  listed = [(t["content"], t["id"]) for t in tok_json.get("added_tokens", [])]
  listed += [(t["content"], int(i)) for i, t in tok_cfg.get("added_tokens_decoder", {}).items()]
  listed += list(added_json.items())
  for text, token_id in listed:
    if with_ids.setdefault(text, int(token_id)) != int(token_id):
      raise ValueError(f"{hf_dir}: token {text} has ids {with_ids[text]} and {token_id} in "
                       "different tokenizer files")
  sentinels, unmapped = {}, []
  for text, token_id in sorted(with_ids.items(), key=lambda kv: kv[1]):
    match = _SENTINEL_RE.match(text)
    if text in pieces:
      if pieces[text] != token_id:
        raise ValueError(f"{hf_dir}: token {text} has id {token_id} in the tokenizer files but "
                         f"{pieces[text]} in {SPIECE_FILE}")
    elif match:
      sentinels[int(match.group(1))] = token_id
    else:
      unmapped.append(f"{text} (id {token_id})")

  if sentinels:
    extra_ids, rule = len(sentinels), "ids of the <extra_id_N> tokens in the tokenizer files"
    for index in range(extra_ids):
      expect = num_pieces + extra_ids - 1 - index
      if sentinels.get(index) != expect:
        raise ValueError(f"{hf_dir}: <extra_id_{index}> has id {sentinels.get(index)}; "
                         f"seqio's layout (pieces, then sentinels with <extra_id_0> highest) "
                         f"needs {expect}")
  else:
    names = {_token_text(t) for key in ("additional_special_tokens", "extra_special_tokens")
             for source in (tok_cfg, special_map) for t in (source.get(key) or [])
             if isinstance(source.get(key), list)}
    named = len([t for t in names if _SENTINEL_RE.match(t) and t not in pieces])
    declared = tok_cfg.get("extra_ids")
    if isinstance(declared, int) and declared > 0:
      if named and named != declared:
        raise ValueError(f"{hf_dir}: tokenizer_config.json says extra_ids={declared} but lists "
                         f"{named} <extra_id_N> tokens")
      extra_ids, rule = declared, "extra_ids in tokenizer_config.json"
    elif named:
      extra_ids, rule = named, "count of <extra_id_N> special tokens"
    else:
      extra_ids = max(model_vocab_size - num_pieces, 0)
      rule = "config vocab_size minus spiece.model pieces (no tokenizer metadata)"
      logging.warning("%s: no sentinel metadata in the tokenizer files; assuming extra_ids=%d",
                      hf_dir, extra_ids)
  if num_pieces + extra_ids > model_vocab_size:
    raise ValueError(f"{hf_dir}: the tokenizer has {num_pieces + extra_ids} ids "
                     f"({num_pieces} pieces + {extra_ids} extra ids) but the model embeds only "
                     f"{model_vocab_size}")
  for text, token_id in pieces.items():  # sentinels that are pieces of the model itself
    match = _SENTINEL_RE.match(text)
    if match and token_id != num_pieces + extra_ids - 1 - int(match.group(1)):
      logging.warning("%s: %s is piece %d of spiece.model, not where seqio's sentinel layout "
                      "puts it; masking preprocessors will use other ids", hf_dir, text, token_id)
  if unmapped:
    logging.warning("%s: added tokens outside spiece.model that seqio cannot encode: %s",
                    hf_dir, ", ".join(unmapped))
  return VocabInfo(spiece, extra_ids, rule, num_pieces, tuple(unmapped))


def build_hf_tokenizer(vocab_path: str, extra_ids: int):
  """A `tokenizers.Tokenizer` giving the ids of seqio's vocabulary(vocab_path, extra_ids).

  It follows the SentencePiece model's own normalizer spec (our vocabulary adds no dummy
  prefix), which transformers 5.x's T5Tokenizer would override.
  """
  try:
    # pylint: disable=g-import-not-at-top,g-multiple-import
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors
    # pylint: enable=g-import-not-at-top,g-multiple-import
  except ImportError as e:
    raise ImportError("writing Hugging Face tokenizer files needs the `tokenizers` package "
                      "(pip install 'ankh3_jax[parity]')") from e
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top

  proto = sentencepiece_model_pb2.ModelProto()
  with open(vocab_path, "rb") as f:
    proto.ParseFromString(f.read())
  trainer, norm = proto.trainer_spec, proto.normalizer_spec
  if trainer.model_type not in (1, 4):  # UNIGRAM, CHAR
    raise ValueError(f"{vocab_path}: only unigram / char SentencePiece models can be exported")
  num_pieces = len(proto.pieces)
  vocab = [(p.piece, p.score) for p in proto.pieces]
  vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(extra_ids))]
  tokenizer = Tokenizer(models.Unigram(vocab, unk_id=trainer.unk_id,
                                       byte_fallback=trainer.byte_fallback))
  steps = []
  if norm.precompiled_charsmap:
    steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
  if norm.remove_extra_whitespaces:
    steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
  if steps:
    tokenizer.normalizer = normalizers.Sequence(steps)
  if norm.escape_whitespaces:
    prepend = "always" if norm.add_dummy_prefix else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme=prepend, split=trainer.split_by_whitespace)
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=prepend,
                                           split=trainer.split_by_whitespace)
  special = [AddedToken(p.piece, special=True, normalized=False)
             for p in proto.pieces if p.type in (2, 3)]  # UNKNOWN, CONTROL
  special += [AddedToken(f"<extra_id_{i}>", special=True, normalized=False)
              for i in range(extra_ids)]
  tokenizer.add_special_tokens(special)
  tokenizer.add_tokens([AddedToken(p.piece, special=False, normalized=True)
                        for p in proto.pieces if p.type == 4])  # USER_DEFINED
  if trainer.eos_id >= 0:
    eos = proto.pieces[trainer.eos_id].piece
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, trainer.eos_id)])
  if tokenizer.get_vocab_size() != num_pieces + extra_ids:
    raise AssertionError("tokenizer size differs from pieces + extra_ids")
  return tokenizer


def write_hf_tokenizer(out_dir: str, vocab_path: str, extra_ids: int) -> None:
  """spiece.model + tokenizer.json + tokenizer_config.json + special_tokens_map.json.

  `tokenizer_class` is PreTrainedTokenizerFast so AutoTokenizer uses tokenizer.json as is.
  """
  tokenizer = build_hf_tokenizer(vocab_path, extra_ids)
  shutil.copyfile(vocab_path, os.path.join(out_dir, SPIECE_FILE))
  tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
  pad, eos, unk = (tokenizer.id_to_token(i) for i in
                   (vocab_lib.PAD_ID, vocab_lib.EOS_ID, vocab_lib.UNK_ID))
  sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
  special = {"pad_token": pad, "eos_token": eos, "unk_token": unk,
             "additional_special_tokens": sentinels}
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
    json.dump(special, f, indent=2)
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "extra_ids": extra_ids,
               **special}, f, indent=2)


# --------------------------------------------------------------------------- entry points


def import_hf(hf_dir: str) -> tuple[T5Config, Params, VocabInfo]:
  """Reads a local HF T5 directory: (our config, unscanned float32 params, vocab info).

  A `T5EncoderModel` checkpoint gives params without `decoder`.
  """
  hf_cfg = read_hf_config(hf_dir)
  encoder_only = "T5EncoderModel" in (hf_cfg.get("architectures") or [])
  try:
    config, params = state_to_params(load_hf_weights(hf_dir), hf_cfg, encoder_only)
  except ValueError as e:
    raise ValueError(f"{hf_dir}: {e}") from e
  return config, params, hf_vocab_info(hf_dir, config.vocab_size)


def is_hf_export(directory: str) -> bool:
  """Whether `directory` holds what `export_hf` writes and nothing else.

  A directory from the Hub holds the same files, but its config.json names the
  transformers version that wrote it; ours does not.
  """
  entries = set(os.listdir(directory))
  if "config.json" not in entries or not entries <= set(EXPORT_FILES):
    return False
  try:
    hf_cfg = _read_json(os.path.join(directory, "config.json"))
  except ValueError:
    return False
  return (isinstance(hf_cfg, dict) and hf_cfg.get("model_type") == "t5"
          and "transformers_version" not in hf_cfg)


def export_hf(config: T5Config, params: Any, out_dir: str,
              vocab_path: str = vocab_lib.VOCAB_PATH,
              extra_ids: int = vocab_lib.NUM_SENTINELS, encoder_only: bool = False,
              overwrite: bool = False) -> None:
  """Writes an HF directory (atomically): T5ForConditionalGeneration, or with `encoder_only`
  T5EncoderModel (required for params without a decoder). Scanned params are unstacked.

  An existing `out_dir` is replaced only if an export wrote it (`is_hf_export`) or with
  `overwrite`, never when it holds `vocab_path` or the working directory.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  output_paths.check_output_dir(out_dir, [vocab_path], overwrite=overwrite,
                                is_ours=is_hf_export, what="output directory")
  config = config.replace(scan_layers=False)
  params = model_io.unstack_layers(model_io.as_plain_params(params), config)
  model_io.check_params(config, params, where="params to export")
  if not encoder_only and "decoder" not in params:
    raise ValueError("params have no decoder (an encoder-only model): export with "
                     "encoder_only=True (--encoder_only)")
  hf_cfg = config_to_hf(config, encoder_only)
  state = params_to_state(config, params, encoder_only)
  with output_paths.atomic_directory(out_dir) as tmp:
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
      json.dump(hf_cfg, f, indent=2)
    if not encoder_only:
      with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"decoder_start_token_id": vocab_lib.PAD_ID, "eos_token_id": vocab_lib.EOS_ID,
                   "pad_token_id": vocab_lib.PAD_ID}, f, indent=2)
    save_file(state, os.path.join(tmp, SAFETENSORS_FILE), metadata={"format": "pt"})
    write_hf_tokenizer(tmp, vocab_path, extra_ids)


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="ankh3-convert", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="Hugging Face T5 directory -> our model directory")
  imp.add_argument("hf_dir")
  imp.add_argument("out_model_dir")
  imp.add_argument("--scan_layers", action="store_true",
                   help="store the layers stacked, for scan_layers=True models")
  imp.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT_MODEL_DIR this command did not write")
  exp = sub.add_parser("export", help="our model directory -> Hugging Face T5 directory")
  exp.add_argument("model_dir")
  exp.add_argument("hf_out_dir")
  exp.add_argument("--encoder_only", action="store_true", help="write a T5EncoderModel")
  exp.add_argument("--overwrite", action="store_true",
                   help="replace an existing HF_OUT_DIR this command did not write")
  quiet.add_flag(imp)
  quiet.add_flag(exp)
  quiet.setup(argv)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    if args.command == "import":
      # Checked before the (possibly long) import; save_model checks again.
      output_paths.check_output_dir(args.out_model_dir, [args.hf_dir],
                                    overwrite=args.overwrite,
                                    is_ours=model_io.is_model_directory,
                                    what="output directory")
      config, params, vocab = import_hf(args.hf_dir)
      config = config.replace(scan_layers=args.scan_layers)
      model_io.save_model(args.out_model_dir, config, params, vocab_path=vocab.spiece_path,
                          extra_ids=vocab.extra_ids, overwrite=args.overwrite)
      logging.info("wrote %s (%s; extra_ids=%d from %s)", args.out_model_dir,
                   "encoder only" if "decoder" not in params else "encoder-decoder",
                   vocab.extra_ids, vocab.rule)
    else:
      output_paths.check_output_dir(args.hf_out_dir, [args.model_dir],
                                    overwrite=args.overwrite, is_ours=is_hf_export,
                                    what="output directory")
      config, params, vocab_path = model_io.load_model(args.model_dir)
      export_hf(config, params, args.hf_out_dir, vocab_path=vocab_path,
                extra_ids=model_io.load_extra_ids(args.model_dir),
                encoder_only=args.encoder_only or "decoder" not in params,
                overwrite=args.overwrite)
      logging.info("wrote %s", args.hf_out_dir)
  except (OSError, ValueError, ImportError) as e:
    print(f"ankh3-convert: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
