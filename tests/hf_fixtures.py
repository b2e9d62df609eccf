"""Tiny random Hugging Face T5 checkpoints (PyTorch, CPU) for the conversion tests.

Checkpoints are built once per test session (cached here, in a temporary folder removed at
exit) and written with `save_pretrained` plus tokenizer files made from our vocabulary, in
the layout transformers 4.x wrote for the released Ankh checkpoints.
"""
import atexit
import dataclasses
import functools
import json
import os
import shutil
import tempfile

import numpy as np

from ankh3_jax import vocab as vocab_lib

VOCAB_SIZE = 256  # 30 pieces + 226 sentinels, as our vocabulary
_ROOT = tempfile.mkdtemp(prefix="ankh3_hf_fixtures_")
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class TinySpec:
  """One tiny HF T5. `head`: 'untied' (own lm_head), 'tied' (shared, scaled logits) or
  'shared_unscaled' (transformers 5.x default for tie_word_embeddings=False)."""
  feed_forward_proj: str = "gated-silu"
  head: str = "untied"
  num_buckets: int = 32
  max_distance: int = 128
  num_layers: int = 2
  num_decoder_layers: int = 2
  encoder_only: bool = False
  d_model: int = 32
  d_ff: int = 48
  d_kv: int = 8
  num_heads: int = 4


SPECS = {
    "gelu_untied_b8": TinySpec("gated-gelu", "untied", num_buckets=8, max_distance=16),
    "silu_tied_b32": TinySpec("gated-silu", "tied", num_buckets=32, max_distance=128),
    "relu_shared_b16": TinySpec("relu", "shared_unscaled", num_buckets=16, max_distance=32,
                                num_decoder_layers=1),
    "silu_encoder_b64": TinySpec("gated-silu", "untied", num_buckets=64, max_distance=128,
                                 encoder_only=True),
}


def hf_config(spec: TinySpec):
  import transformers  # pylint: disable=g-import-not-at-top

  return transformers.T5Config(
      vocab_size=VOCAB_SIZE, d_model=spec.d_model, d_ff=spec.d_ff, d_kv=spec.d_kv,
      num_heads=spec.num_heads, num_layers=spec.num_layers,
      num_decoder_layers=spec.num_decoder_layers, feed_forward_proj=spec.feed_forward_proj,
      relative_attention_num_buckets=spec.num_buckets,
      relative_attention_max_distance=spec.max_distance, dropout_rate=0.0,
      tie_word_embeddings=spec.head == "tied", decoder_start_token_id=0, pad_token_id=0,
      eos_token_id=1)


def make_hf_model(spec: TinySpec, seed: int = 0):
  """A random HF model; layer norm scales are randomised too, so the mapping shows."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  cls = (transformers.T5EncoderModel if spec.encoder_only
         else transformers.T5ForConditionalGeneration)
  model = cls(hf_config(spec)).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "layer_norm" in name:
        param.uniform_(0.5, 1.5)
    if spec.head == "untied" and not spec.encoder_only:
      # A separate head at the scale of a trained one (logits of order 1-10).
      head = torch.randn_like(model.lm_head.weight) * spec.d_model ** -0.5
      model.lm_head.weight = torch.nn.Parameter(head)
  return model


def write_tokenizer_files(directory: str, extra_ids: int = vocab_lib.NUM_SENTINELS,
                          with_ids: bool = True) -> None:
  """spiece.model (ours) and T5Tokenizer configs as transformers 4.x saved them."""
  shutil.copyfile(vocab_lib.VOCAB_PATH, os.path.join(directory, "spiece.model"))
  num_pieces = vocab_lib.get_processor().get_piece_size()
  sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
  config = {"tokenizer_class": "T5Tokenizer", "extra_ids": extra_ids, "eos_token": "</s>",
            "unk_token": "<unk>", "pad_token": "<pad>",
            "additional_special_tokens": sentinels}
  if with_ids:
    config["added_tokens_decoder"] = {
        str(num_pieces + extra_ids - 1 - i): {"content": t, "special": True}
        for i, t in enumerate(sentinels)}
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
    json.dump({k: v for k, v in config.items() if k.endswith("_token")
               or k == "additional_special_tokens"}, f)


@functools.lru_cache(maxsize=None)
def checkpoint(name: str, **save_kwargs) -> str:
  """Directory of the saved tiny HF model `SPECS[name]` (built once per session)."""
  directory = os.path.join(_ROOT, name + "".join(f"-{k}={v}" for k, v in
                                                 sorted(save_kwargs.items())))
  model = make_hf_model(SPECS[name])
  model.save_pretrained(directory, **save_kwargs)
  write_tokenizer_files(directory)
  return directory


@functools.lru_cache(maxsize=None)
def hf_model(name: str):
  """The HF model saved at `checkpoint(name)` (reloaded, as users would)."""
  import transformers  # pylint: disable=g-import-not-at-top

  spec = SPECS[name]
  cls = (transformers.T5EncoderModel if spec.encoder_only
         else transformers.T5ForConditionalGeneration)
  return cls.from_pretrained(checkpoint(name)).eval()


def batch(seed: int = 0, lengths=(24, 13, 5), target_lengths=(9, 4, 7)) -> dict:
  """Encoder / decoder token batches with padding (different lengths per row)."""
  rng = np.random.default_rng(seed)
  num_pieces = vocab_lib.get_processor().get_piece_size()

  def rows(lengths, low):
    out = np.zeros((len(lengths), max(lengths)), np.int32)
    for r, n in enumerate(lengths):
      out[r, :n - 1] = rng.integers(low, num_pieces, n - 1)
      out[r, n - 1] = vocab_lib.EOS_ID
    return out

  encoder = rows(lengths, 3)
  encoder[0, 3] = vocab_lib.sentinel_id(0, VOCAB_SIZE)  # a sentinel in the input
  targets = rows(target_lengths, 5)
  inputs = np.zeros_like(targets)
  inputs[:, 1:] = targets[:, :-1]
  inputs[targets == 0] = 0
  return {"encoder_input_tokens": encoder, "decoder_input_tokens": inputs,
          "decoder_target_tokens": targets}


def hf_outputs(model, tokens: dict) -> dict:
  """HF encoder outputs and (if a seq2seq model) decoder logits, as numpy."""
  import torch  # pylint: disable=g-import-not-at-top

  ids = torch.tensor(tokens["encoder_input_tokens"], dtype=torch.long)
  mask = (ids > 0).long()
  with torch.no_grad():
    encoder = model.get_encoder() if hasattr(model, "lm_head") else model
    out = {"encoded": encoder(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()}
    if hasattr(model, "lm_head"):
      targets = torch.tensor(tokens["decoder_target_tokens"], dtype=torch.long)
      logits = model(input_ids=ids, attention_mask=mask,
                     decoder_input_ids=torch.tensor(tokens["decoder_input_tokens"],
                                                    dtype=torch.long),
                     decoder_attention_mask=(targets > 0).long()).logits
      out["logits"] = logits.numpy()
  return out


def write_torch_bin(model, directory: str, num_shards: int = 1) -> None:
  """The model as `pytorch_model.bin` (sharded with an index when num_shards > 1), with the
  tied duplicates (`*.embed_tokens.weight`) that old checkpoints carry."""
  import torch  # pylint: disable=g-import-not-at-top

  os.makedirs(directory, exist_ok=True)
  model.config.save_pretrained(directory)
  state = {k: v.detach().clone() for k, v in model.state_dict().items()}
  if num_shards == 1:
    torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    return
  names, weight_map = sorted(state), {}
  for s in range(num_shards):
    shard = f"pytorch_model-{s + 1:05d}-of-{num_shards:05d}.bin"
    part = {k: state[k] for k in names[s::num_shards]}
    torch.save(part, os.path.join(directory, shard))
    weight_map.update({k: shard for k in part})
  with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


@functools.lru_cache(maxsize=None)
def imported(name: str):
  """`convert.import_hf(checkpoint(name))`, once per session."""
  from ankh3_jax import convert  # pylint: disable=g-import-not-at-top

  return convert.import_hf(checkpoint(name))


def max_diff(ours, theirs, valid) -> float:
  """Largest absolute difference over the valid (non-pad) positions."""
  return float(np.abs(np.asarray(ours, np.float32) - np.asarray(theirs, np.float32))[valid].max())
