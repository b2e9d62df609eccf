"""Hugging Face T5 `config.json` <-> our `T5Config` (the checks and the mapping)."""
import json
import os
from typing import Any, Optional

from ankh3_jax import vocab as vocab_lib
from ankh3_jax.config import T5Config

# HF activation names (`dense_act_fn`) -> our `feed_forward_proj` activation. HF's plain
# 'gelu' is the exact (erf) gelu, which our layers do not implement: it is rejected.
_FROM_HF_ACT = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "silu": "silu",
                "swish": "silu", "relu": "relu"}
_TO_HF_ACT = {"gelu": "gelu_new", "silu": "silu", "relu": "relu"}
# config.json keys read by `config_from_hf`: (kind, smallest allowed value).
_HF_INT_FIELDS = {"vocab_size": 1, "d_model": 1, "d_ff": 1, "d_kv": 1, "num_heads": 1,
                  "num_layers": 1, "num_decoder_layers": 0,
                  "relative_attention_num_buckets": 1, "relative_attention_max_distance": 1}


def read_json(path: str) -> Optional[Any]:
  """The JSON value of `path`, None if there is no such file."""
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except ValueError as e:
    raise ValueError(f"corrupt {path}: {e}") from e


def read_hf_config(hf_dir: str) -> dict:
  """`config.json` of a Hugging Face directory; errors unless it describes a T5."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isdir(hf_dir):
    raise FileNotFoundError(f"Hugging Face directory not found: {hf_dir}")
  hf_cfg = read_json(path)
  if hf_cfg is None:
    raise FileNotFoundError(f"{hf_dir}: config.json is missing")
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
