"""Hugging Face import / export parity (tiny random T5s built in PyTorch on CPU)."""
import copy
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import hf_fixtures as hf  # pylint: disable=g-import-not-at-top,wrong-import-position
from ankh3_jax import convert  # pylint: disable=g-import-not-at-top,wrong-import-position
from ankh3_jax import layers  # pylint: disable=g-import-not-at-top,wrong-import-position
from ankh3_jax import vocab as vocab_lib  # pylint: disable=wrong-import-position
from ankh3_jax.hf import tokenizer as hf_tokenizer  # pylint: disable=wrong-import-position
from ankh3_jax.hf import weights as hf_weights  # pylint: disable=wrong-import-position
from ankh3_jax.model import Transformer  # pylint: disable=g-import-not-at-top,wrong-import-position

TOL = 1e-4
SEQ2SEQ = [n for n, s in hf.SPECS.items() if not s.encoder_only]


def ours(config, params, tokens) -> dict:
  model = Transformer(config)
  out = {"encoded": np.asarray(model.apply(
      {"params": params}, tokens["encoder_input_tokens"], enable_dropout=False,
      method=Transformer.encode))}
  if "decoder" in params:
    out["logits"] = np.asarray(model.apply({"params": params}, **tokens, enable_dropout=False))
  return out


def assert_parity(mine: dict, theirs: dict, tokens: dict, label: str) -> None:
  enc = hf.max_diff(mine["encoded"], theirs["encoded"], tokens["encoder_input_tokens"] > 0)
  msg = f"{label}: encoder max|diff| {enc:.2e}"
  assert enc < TOL, msg
  if "logits" in theirs:
    logits = hf.max_diff(mine["logits"], theirs["logits"], tokens["decoder_target_tokens"] > 0)
    msg += f", logits max|diff| {logits:.2e}"
    assert logits < TOL, msg
  print(msg)


def copy_checkpoint(name: str, dst) -> str:
  dst = str(dst)
  shutil.copytree(hf.checkpoint(name), dst)
  return dst


def edit_tensors(directory: str, edit) -> None:
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top

  path = os.path.join(directory, "model.safetensors")
  state = load_file(path)
  edit(state)
  save_file(state, path, metadata={"format": "pt"})


def edit_json(path: str, edit) -> None:
  with open(path) as f:
    data = json.load(f)
  edit(data)
  with open(path, "w") as f:
    json.dump(data, f)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(8, 16), (32, 128), (64, 128), (16, 20)])
def test_relative_position_buckets_match_hf(num_buckets, max_distance, bidirectional):
  import torch  # pylint: disable=g-import-not-at-top
  from transformers.models.t5.modeling_t5 import T5Attention  # pylint: disable=g-import-not-at-top

  length = 300
  relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
  theirs = T5Attention._relative_position_bucket(  # pylint: disable=protected-access
      relative, bidirectional=bidirectional, num_buckets=num_buckets,
      max_distance=max_distance).numpy()
  mine = layers.relative_position_buckets(length, length, bidirectional, num_buckets,
                                          max_distance)
  np.testing.assert_array_equal(mine, theirs)


@pytest.mark.parametrize("name", list(hf.SPECS))
def test_import_matches_hf(name):
  config, params, vocab = hf.imported(name)
  spec = hf.SPECS[name]
  assert config.relative_attention_num_buckets == spec.num_buckets
  assert config.relative_attention_max_distance == spec.max_distance
  assert config.feed_forward_proj == spec.feed_forward_proj
  assert config.tie_word_embeddings == (spec.head == "tied")
  assert ("decoder" in params) == (not spec.encoder_only)
  assert vocab.extra_ids == vocab_lib.NUM_SENTINELS and vocab.size == hf.VOCAB_SIZE
  tokens = hf.batch()
  assert_parity(ours(config, params, tokens), hf.hf_outputs(hf.hf_model(name), tokens), tokens,
                name)


def test_import_formats_agree(tmp_path):
  """Sharded safetensors, bfloat16 safetensors, .bin and sharded .bin import alike."""
  import torch  # pylint: disable=g-import-not-at-top

  name = "gelu_untied_b8"
  _, reference, _ = hf.imported(name)
  model = hf.hf_model(name)

  def same(directory, rtol=0.0):
    shutil.copy(os.path.join(hf.checkpoint(name), "spiece.model"), directory)
    shutil.copy(os.path.join(hf.checkpoint(name), "tokenizer_config.json"), directory)
    _, params, _ = convert.import_hf(directory)
    a, b = ({"/".join(k): v for k, v in _flatten(p)} for p in (reference, params))
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_allclose(b[key], a[key], rtol=rtol, err_msg=key)

  sharded = str(tmp_path / "sharded")
  model.save_pretrained(sharded, max_shard_size="20KB")
  assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
  same(sharded)
  bf16 = str(tmp_path / "bf16")
  copy.deepcopy(model).to(torch.bfloat16).save_pretrained(bf16)
  same(bf16, rtol=2.0 ** -7)  # bfloat16 rounding
  for shards in (1, 2):
    directory = str(tmp_path / f"bin{shards}")
    hf.write_torch_bin(model, directory, num_shards=shards)
    same(directory)


def _flatten(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


@pytest.mark.parametrize("name", list(hf.SPECS))
def test_export_reloads_in_transformers(name, tmp_path):
  import transformers  # pylint: disable=g-import-not-at-top

  config, params, vocab = hf.imported(name)
  encoder_only = hf.SPECS[name].encoder_only
  out = str(tmp_path / "hf")
  convert.export_hf(config, params, out, vocab_path=vocab.spiece_path, extra_ids=vocab.extra_ids,
                    encoder_only=encoder_only)
  cls = transformers.T5EncoderModel if encoder_only else transformers.T5ForConditionalGeneration
  reloaded = cls.from_pretrained(out).eval()
  tokens = hf.batch(seed=1)
  assert_parity(ours(config, params, tokens), hf.hf_outputs(reloaded, tokens), tokens,
                f"export {name}")
  # And the exported directory imports back to the same parameters.
  config2, params2, vocab2 = convert.import_hf(out)
  assert config2 == config and vocab2.extra_ids == vocab.extra_ids
  for (path, a), (_, b) in zip(sorted(_flatten(params)), sorted(_flatten(params2))):
    np.testing.assert_array_equal(a, b, err_msg="/".join(path))


def test_exported_tokenizer_matches_our_vocab(tmp_path):
  import transformers  # pylint: disable=g-import-not-at-top

  config, params, _ = hf.imported("silu_tied_b32")
  out = str(tmp_path / "hf")
  convert.export_hf(config, params, out)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  for text in ["MKV", "mkvLA", "ACDEFGHIKLMNPQRSTVWYXBZUO"]:
    for prefix in vocab_lib.CONTROL_TOKENS:
      assert tok(prefix + text).input_ids == vocab_lib.encode(text, prefix=prefix), prefix + text
  assert tok("[NLU]MKV").input_ids == [3, 16, 14, 25, 1]
  sentinel = vocab_lib.sentinel_id(0, hf.VOCAB_SIZE)
  assert tok.convert_tokens_to_ids("<extra_id_0>") == sentinel == 255
  assert tok.convert_tokens_to_ids("<extra_id_225>") == 30
  assert tok("M<extra_id_0>V").input_ids == [16, sentinel, 25, 1]
  assert tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.unk_token_id == 2
  assert tok.decode([16, 14, 25]) == "MKV"


def test_vocab_rules(tmp_path):
  name = "silu_tied_b32"
  # (2) extra_ids declared without ids.
  d = copy_checkpoint(name, tmp_path / "declared")
  edit_json(os.path.join(d, "tokenizer_config.json"), lambda c: c.pop("added_tokens_decoder"))
  info = hf_tokenizer.hf_vocab_info(d, hf.VOCAB_SIZE)
  assert (info.extra_ids, info.rule) == (226, "extra_ids in tokenizer_config.json")
  # (3) no tokenizer metadata: vocab_size minus pieces.
  for f in ("tokenizer_config.json", "special_tokens_map.json"):
    os.remove(os.path.join(d, f))
  info = hf_tokenizer.hf_vocab_info(d, hf.VOCAB_SIZE)
  assert info.extra_ids == 226 and info.rule.startswith("config vocab_size")
  # Sentinel ids that do not follow seqio's layout are an error naming the token.
  d = copy_checkpoint(name, tmp_path / "reversed")

  def reverse(c):
    c["added_tokens_decoder"] = {str(30 + i): {"content": f"<extra_id_{i}>"} for i in range(226)}
  edit_json(os.path.join(d, "tokenizer_config.json"), reverse)
  with pytest.raises(ValueError, match=r"<extra_id_0> has id 30"):
    hf_tokenizer.hf_vocab_info(d, hf.VOCAB_SIZE)
  # A tokenizer larger than the embedding is an error.
  with pytest.raises(ValueError, match="embeds only 200"):
    hf_tokenizer.hf_vocab_info(hf.checkpoint(name), 200)


def test_import_errors(tmp_path, monkeypatch):
  name = "gelu_untied_b8"
  missing = "encoder.block.1.layer.0.SelfAttention.k.weight"
  d = copy_checkpoint(name, tmp_path / "missing")
  edit_tensors(d, lambda s: s.pop(missing))
  with pytest.raises(ValueError, match=f"missing tensor {missing}"):
    convert.import_hf(d)

  wrong = "decoder.block.0.layer.2.DenseReluDense.wo.weight"
  d = copy_checkpoint(name, tmp_path / "shape")
  edit_tensors(d, lambda s: s.__setitem__(wrong, np.zeros((3, 3), np.float32)))
  with pytest.raises(ValueError, match=rf"tensor {wrong} has shape \(3, 3\), expected \(32, 48\)"):
    convert.import_hf(d)

  d = copy_checkpoint(name, tmp_path / "unexpected")
  edit_tensors(d, lambda s: s.__setitem__("encoder.block.9.extra.weight", np.zeros(2, np.float32)))
  with pytest.raises(ValueError, match="unexpected tensor encoder.block.9.extra.weight"):
    convert.import_hf(d)

  d = copy_checkpoint(name, tmp_path / "embed")
  edit_tensors(d, lambda s: s.__setitem__("encoder.embed_tokens.weight", s["shared.weight"] + 1))
  with pytest.raises(ValueError, match="encoder.embed_tokens.weight differs from shared.weight"):
    convert.import_hf(d)

  d = str(tmp_path / "bert")
  os.makedirs(d)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, f)
  with pytest.raises(ValueError, match=r"not a T5 checkpoint: model_type='bert', "
                                       r"architectures=\['BertForMaskedLM'\]"):
    convert.import_hf(d)

  d = copy_checkpoint(name, tmp_path / "gelu_exact")
  edit_json(os.path.join(d, "config.json"),
            lambda c: c.update(feed_forward_proj="gelu", dense_act_fn="gelu"))
  with pytest.raises(ValueError, match="unsupported activation 'gelu'"):
    convert.import_hf(d)

  d = copy_checkpoint(name, tmp_path / "noweights")
  os.remove(os.path.join(d, "model.safetensors"))
  with pytest.raises(FileNotFoundError, match="no weights found"):
    convert.import_hf(d)

  d = copy_checkpoint(name, tmp_path / "nospiece")
  os.remove(os.path.join(d, "spiece.model"))
  with pytest.raises(FileNotFoundError, match="spiece.model is missing"):
    convert.import_hf(d)

  d = str(tmp_path / "bin")
  hf.write_torch_bin(hf.hf_model(name), d)
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match="needs torch"):
    hf_weights.load_hf_weights(d)


def test_cli_import_export(tmp_path):
  import transformers  # pylint: disable=g-import-not-at-top
  from ankh3_jax import model_io  # pylint: disable=g-import-not-at-top

  model_dir, hf_out = str(tmp_path / "ours"), str(tmp_path / "hf")
  assert convert.main(["import", hf.checkpoint("silu_encoder_b64"), model_dir,
                       "--scan_layers"]) == 0
  config, params, _ = model_io.load_model(model_dir)
  assert config.scan_layers and "layers" in params["encoder"] and "decoder" not in params
  assert model_io.load_extra_ids(model_dir) == 226
  assert convert.main(["export", model_dir, hf_out]) == 0  # encoder-only: T5EncoderModel
  reloaded = transformers.T5EncoderModel.from_pretrained(hf_out).eval()
  tokens = hf.batch(seed=2)
  theirs = hf.hf_outputs(hf.hf_model("silu_encoder_b64"), tokens)
  assert_parity(hf.hf_outputs(reloaded, tokens), theirs, tokens, "cli round trip")
  assert convert.main(["import", str(tmp_path / "absent"), str(tmp_path / "x")]) == 1


def test_import_has_no_heavy_module_imports():
  code = ("import sys, ankh3_jax.convert, ankh3_jax.model_io; "
          "print(sorted(m for m in ('tensorflow', 'seqio', 'torch', 'transformers') "
          "if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_import_save_load_same(tmp_path):
  from ankh3_jax import model_io  # pylint: disable=g-import-not-at-top

  config, params, vocab = hf.imported("relu_shared_b16")
  directory = str(tmp_path / "ours")
  model_io.save_model(directory, config, params, vocab_path=vocab.spiece_path,
                      extra_ids=vocab.extra_ids)
  config2, params2, vocab_path = model_io.load_model(directory)
  assert config2 == config and model_io.load_extra_ids(directory) == vocab.extra_ids
  with open(vocab_path, "rb") as f, open(vocab.spiece_path, "rb") as g:
    assert f.read() == g.read()
  for (path, a), (path2, b) in zip(sorted(_flatten(params)), sorted(_flatten(params2))):
    assert path == path2
    np.testing.assert_array_equal(a, b, err_msg="/".join(path))


def test_import_scaled_untied_head(tmp_path):
  """A separate lm_head with scaled decoder outputs: the factor is folded into the kernel."""
  import transformers  # pylint: disable=g-import-not-at-top

  d = copy_checkpoint("gelu_untied_b8", tmp_path / "scaled")
  edit_json(os.path.join(d, "config.json"), lambda c: c.update(scale_decoder_outputs=True))
  reference = transformers.T5ForConditionalGeneration.from_pretrained(d).eval()
  assert reference.config.scale_decoder_outputs
  config, params, _ = convert.import_hf(d)
  assert not config.tie_word_embeddings
  tokens = hf.batch(seed=5)
  assert_parity(ours(config, params, tokens), hf.hf_outputs(reference, tokens), tokens,
                "scaled untied head")


@pytest.mark.parametrize("name", ["gelu_untied_b8", "silu_encoder_b64"])
def test_streamed_safetensors_equal_the_state_dict(name, tmp_path):
  """`export_hf` writes tensor by tensor; the file is what safetensors would write."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  config, params, _ = hf.imported(name)
  encoder_only = hf.SPECS[name].encoder_only
  path = str(tmp_path / "model.safetensors")
  hf_weights.write_safetensors(path, config, params, encoder_only)
  expected = hf_weights.params_to_state(config, params, encoder_only)
  loaded = load_file(path)
  assert sorted(loaded) == sorted(expected)
  for key, value in expected.items():
    assert loaded[key].dtype == np.float32
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)
