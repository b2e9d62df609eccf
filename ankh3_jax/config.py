"""Model hyper-parameters and the named size presets (bound by gin)."""
import dataclasses
from typing import Any, Sequence

import gin
import jax.numpy as jnp

ATTENTION_IMPLS = ("auto", "custom", "xla", "cudnn")
KERNEL_LAYOUTS = ("in_out", "out_in")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of an Ankh3 (T5 encoder-decoder) model.

  `feed_forward_proj` follows Hugging Face's T5Config: 'gated-gelu' (tanh-approximate gelu,
  as HF's `gelu_new`), 'gated-silu', 'relu' or 'gated-relu'.
  """
  vocab_size: int = 256
  d_model: int = 64
  d_ff: int = 128
  d_kv: int = 16
  num_heads: int = 4
  num_encoder_layers: int = 2
  num_decoder_layers: int = 2
  feed_forward_proj: str = "gated-silu"
  relative_attention_num_buckets: int = 64
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  tie_word_embeddings: bool = False
  dtype: Any = jnp.float32          # activation / computation dtype (bf16 on TPU)
  param_dtype: Any = jnp.float32    # parameter storage dtype
  remat_policy: str = "none"        # 'none', 'full' or 'dots' (save matmul outputs)
  scan_layers: bool = False         # nn.scan over the layers of each stack
  # 'auto' (per backend), 'custom' (hand-written gradient, fast on CPU), 'xla' (plain
  # jnp, autodiff) or 'cudnn' (jax.nn.dot_product_attention on a GPU); see layers.attention.
  attention_impl: str = "auto"
  # How the decoder's projection kernels are held in memory: 'in_out' ([in, out], what
  # checkpoints store) or 'out_in' ([out, in], as PyTorch's Linear): inference only, set
  # by `inference.resolve_model` where a decode step streams its weights (layers.Dense).
  decoder_kernels: str = "in_out"

  def __post_init__(self):
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"unknown attention_impl {self.attention_impl!r}; "
                       f"choose from {list(ATTENTION_IMPLS)}")
    if self.decoder_kernels not in KERNEL_LAYOUTS:
      raise ValueError(f"unknown decoder_kernels {self.decoder_kernels!r}; "
                       f"choose from {list(KERNEL_LAYOUTS)}")

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def activation(self) -> str:
    return self.feed_forward_proj.split("-")[-1]

  def replace(self, **kwargs) -> "T5Config":
    return dataclasses.replace(self, **kwargs)


# Sizes from ../shared/reference/ANKH3_FACTS.md. [I] marks inferred values.
PRESETS = {
    # CPU-sized, for tests, notebooks and the demo run.
    "tiny": dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_encoder_layers=2,
                 num_decoder_layers=2, feed_forward_proj="gated-silu"),
    "small": dict(d_model=256, d_ff=640, d_kv=32, num_heads=8, num_encoder_layers=6,
                  num_decoder_layers=3, feed_forward_proj="gated-silu"),
    "ankh_base": dict(vocab_size=144, d_model=768, d_ff=3072, d_kv=64, num_heads=12,
                      num_encoder_layers=48, num_decoder_layers=24,
                      feed_forward_proj="gated-gelu"),
    "ankh3_large": dict(vocab_size=256, d_model=1536, d_ff=3840, d_kv=64, num_heads=16,
                        num_encoder_layers=48, num_decoder_layers=24,  # decoder depth [I]
                        feed_forward_proj="gated-silu"),
    "ankh3_xl": dict(vocab_size=256, d_model=2560, d_ff=6720, d_kv=64, num_heads=32,  # d_ff, d_kv [I]
                     num_encoder_layers=48, num_decoder_layers=24,  # decoder depth [I]
                     feed_forward_proj="gated-silu"),
}

# Published encoder parameter counts (ANKH3_FACTS.md), for the preset check.
PUBLISHED_ENCODER_PARAMS = {"ankh3_large": 1.15e9, "ankh3_xl": 3.49e9}


@gin.configurable
def preset(name: str = "tiny", **overrides) -> T5Config:
  """Returns the named size preset, with `overrides` applied (e.g. dtype, dropout_rate)."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
  return T5Config(**{**PRESETS[name], **overrides})


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_named(name: str, choices: Sequence[str] = tuple(DTYPES), what: str = "dtype"):
  """The jnp dtype called `name`, one of `choices`; anything else is a ValueError."""
  if name not in choices:
    raise ValueError(f"unsupported {what} {name!r}; choose from {sorted(choices)}")
  return DTYPES[name]


def config_to_dict(cfg: T5Config) -> dict:
  """JSON-ready dict of `cfg` (dtypes as their names).

  `attention_impl` and `decoder_kernels` are left out at their defaults (what a missing
  key means), so config files, run settings and embedding fingerprints of default configs
  are the same as before the fields existed (older runs resume, older embeddings stay
  valid).
  """
  out = dataclasses.asdict(cfg)
  for key, default in (("attention_impl", "auto"), ("decoder_kernels", "in_out")):
    if out[key] == default:
      del out[key]
  for key in ("dtype", "param_dtype"):
    out[key] = jnp.dtype(out[key]).name
  return out


def config_from_dict(values: dict) -> T5Config:
  """Inverse of `config_to_dict`; unknown keys are an error naming them."""
  known = {f.name for f in dataclasses.fields(T5Config)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"unknown T5Config fields: {unknown}")
  values = dict(values)
  for key in ("dtype", "param_dtype"):
    if key in values and isinstance(values[key], str):
      values[key] = dtype_named(values[key], what=key)
  return T5Config(**values)
