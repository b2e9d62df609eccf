"""The NumPy objectives make the examples the seqio tasks make (rules, not draws)."""
import json
import os

import numpy as np
import pytest
import seqio

from ankh3_jax import vocab
from ankh3_jax.data import corpus
from ankh3_jax.data import fasta
from ankh3_jax.data import host_objectives as host
from ankh3_jax.data import preprocessors as prep

LENGTHS = {"inputs": 128, "targets": 80}


@pytest.fixture(scope="module")
def layout():
  return host.TokenLayout.from_vocabulary()


@pytest.fixture(scope="module")
def sequences():
  records = fasta.read_fasta(corpus.corpus_path("validation"))
  return [r.sequence for _, r in zip(range(40), records)]


def seqio_examples(preprocessors, sequences):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  features = {k: seqio.Feature(vocab.get_vocabulary(), add_eos=True)
              for k in ("inputs", "targets")}
  ds = tf.data.Dataset.from_tensor_slices({"sequence": list(sequences)})
  with seqio.utils.map_seed_manager(0):
    for fn in preprocessors:
      ds = seqio.utils.add_kwargs_to_transform(
          fn, output_features=features, sequence_length=LENGTHS)(ds)
  return list(ds.as_numpy_iterator())


def test_layout_matches_the_vocabulary(layout):
  assert layout.vocab_size == vocab.get_vocabulary().vocab_size
  assert list(layout.encode("MKv")) == vocab.get_processor().encode("MKV")
  assert layout.nlu_id == vocab.encode("", add_eos=False)[0]


def test_completion_is_identical_to_the_seqio_task(layout, sequences):
  theirs = seqio_examples([prep.tokenize, prep.complete_sequence], sequences)
  limit = min(LENGTHS["inputs"] - 2, LENGTHS["targets"] - 1)
  for sequence, ex in zip(sequences, theirs):
    inputs, targets = host.completion_example(layout.encode(sequence), limit, 0.5, layout)
    np.testing.assert_array_equal(inputs, ex["inputs"])
    np.testing.assert_array_equal(targets, ex["targets"])
  assert any(len(s) > limit for s in sequences)  # crops without eos were compared too


@pytest.mark.parametrize("p", [0.15, 0.30])
def test_mlm_follows_the_seqio_rules(layout, sequences, p):
  mask = lambda ds, output_features, sequence_length: prep.mask_residues(
      ds, probability=p, output_features=output_features, sequence_length=sequence_length)
  theirs = seqio_examples([prep.tokenize, prep.random_crop, mask,
                           seqio.preprocessors.append_eos_after_trim], sequences)
  rng = np.random.default_rng(0)
  objective = host.Objective("mlm", p)
  for sequence, ex in zip(sequences, theirs):
    tokens = layout.encode(sequence)
    inputs, targets = host.make_example(tokens, objective, LENGTHS, rng, layout)
    assert len(inputs) == len(ex["inputs"]) and len(targets) == len(ex["targets"])
    np.testing.assert_array_equal(targets[0:-1:2], ex["targets"][0:-1:2])  # sentinels
    assert inputs[0] == ex["inputs"][0] == layout.nlu_id
    restored = prep.reconstruct_mlm(inputs, targets)  # without the prefix
    window = "".join(vocab.get_processor().id_to_piece(int(i)) for i in restored)
    assert window in sequence and len(window) == min(len(sequence), LENGTHS["inputs"] - 2)


def test_batches_have_the_feature_converter_layout(layout, sequences):
  tokens = [layout.encode(s) for s in sequences]
  batch = next(host.train_batches(tokens, host.MIXTURES["ankh3"], LENGTHS, 8, 0, layout))
  assert batch["encoder_input_tokens"].shape == (8, 128)
  targets, shifted = batch["decoder_target_tokens"], batch["decoder_input_tokens"]
  np.testing.assert_array_equal(shifted[:, 1:] * (targets[:, 1:] > 0), targets[:, :-1]
                                * (targets[:, 1:] > 0))
  assert np.all(shifted[:, 0] == 0)
  np.testing.assert_array_equal(batch["decoder_loss_weights"], targets > 0)
  with pytest.raises(ValueError, match="mlm_p20 at inputs=256 needs targets >= 103"):
    host.check_lengths(host.MIXTURES["ankh3"], {"inputs": 256, "targets": 80})


def test_accelerator_script_trains_and_scores_every_task(tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), "..", "scripts", "pretrain_accelerator.py")
  spec = importlib.util.spec_from_file_location("pretrain_accelerator", path)
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  fasta_path = corpus.corpus_path("validation")
  out = str(tmp_path / "run")
  args = ["--train_fasta", fasta_path, "--validation_fasta", fasta_path, "--out_dir", out,
          "--preset", "tiny", "--dtype", "float32", "--inputs_length", "64",
          "--targets_length", "48", "--batch_size", "4", "--max_steps", "2",
          "--eval_every", "1", "--eval_sequences", "6", "--max_train_sequences", "50"]
  assert script.main(args) == 0
  with open(os.path.join(out, "curve.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [0, 1, 2]
  for task in ("mlm_p15", "mlm_p20", "mlm_p30", "completion"):
    metrics = rows[-1]["eval"][task]
    assert metrics["sequences"] == 6 and np.isfinite(metrics["residue_loss"])
    assert metrics["unigram_loss"] > metrics["composition_loss"] > 2.0
  pointer = rows[0]["eval"]["mlm_p15"]
  assert 0 < pointer["pointer_uniform"] < pointer["pointer_attention"] <= 1
  assert rows[-1]["tokens"] > rows[1]["tokens"] > 0
  saved = np.load(os.path.join(out, "encoder.npz"))
  assert any(k.startswith("encoder/") for k in saved.files)
  assert "token_embedder/embedding" in saved.files
  with pytest.raises(FileExistsError):  # never writes into an existing run
    script.main(args)
