"""ankh3-embed: parity with transformers' T5EncoderModel, shapes, batching, resume, errors."""
import os

import h5py
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import hf_fixtures as hf  # pylint: disable=g-import-not-at-top,wrong-import-position
from ankh3_jax import embed  # pylint: disable=g-import-not-at-top,wrong-import-position
from ankh3_jax import model_io  # pylint: disable=g-import-not-at-top,wrong-import-position
from ankh3_jax import vocab  # pylint: disable=g-import-not-at-top,wrong-import-position
from ankh3_jax.data import fasta  # pylint: disable=g-import-not-at-top,wrong-import-position

NAME = "silu_encoder_b64"  # a T5EncoderModel, as users load for embeddings
RNG = np.random.default_rng(7)
# Lengths cross several power-of-two buckets and the 128-token relative-position limit.
RECORDS = [(f"p{i}|len{n}", "".join(RNG.choice(list("ACDEFGHIKLMNPQRSTVWY"), n)))
           for i, n in enumerate((1, 7, 15, 33, 70, 140, 9, 20))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  config, params, info = hf.imported(NAME)
  path = str(tmp_path_factory.mktemp("embed") / "model")
  model_io.save_model(path, config, params, vocab_path=info.spiece_path,
                      extra_ids=info.extra_ids)
  return path


@pytest.fixture(scope="module")
def embedder(model_dir):
  return embed.Embedder(model_dir, token_budget=256)


@pytest.fixture
def fasta_path(tmp_path):
  path = str(tmp_path / "in.fasta")
  fasta.write_fasta(path, RECORDS)
  return path


def hf_embeddings(sequence: str, prefix: str = vocab.NLU_TOKEN) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top

  ids = torch.tensor([vocab.encode(sequence, prefix)])
  with torch.no_grad():
    out = hf.hf_model(NAME)(input_ids=ids).last_hidden_state[0].numpy()
  return out[1:-1]  # drop the prefix and the eos, as users do


def test_fasta_embeddings_equal_transformers(embedder, fasta_path, tmp_path):
  out = str(tmp_path / "out.h5")
  summary = embed.embed_fasta(embedder, fasta_path, out, progress=False)
  assert summary == {"records": len(RECORDS), "skipped": 0, "written": len(RECORDS),
                     "output": out}
  stored = embed.read_embeddings(out)
  assert set(stored) == {rid for rid, _ in RECORDS}
  worst = 0.0
  for rid, seq in RECORDS:
    emb = stored[rid]
    assert emb.per_residue.shape == (len(seq), embedder.d_model)  # one row per residue
    reference = hf_embeddings(seq)
    worst = max(worst, float(np.abs(emb.per_residue - reference).max()))
    np.testing.assert_allclose(emb.per_protein, reference.mean(axis=0), atol=1e-4)
  print(f"max |ours - transformers| over {len(RECORDS)} records: {worst:.2e}")
  assert worst < 1e-4
  # One compile per bucket shape, whatever the number of batches.
  buckets = {embed.bucket_length(len(s) + 2) for _, s in RECORDS}
  assert len(embedder.traced_shapes) == len(set(embedder.traced_shapes))
  assert {shape[1] for shape in embedder.traced_shapes} == buckets
  with h5py.File(out, "r") as f:  # the id with '|' is kept; attributes name the settings
    assert f.attrs["prefix"] == vocab.NLU_TOKEN and f.attrs["d_model"] == embedder.d_model


def test_s2s_prefix_and_in_memory_api(model_dir):
  seqs = {"a": "MKTAYIAKQR", "b": "GG"}
  out = embed.embed_sequences(model_dir, seqs, prefix="s2s", per_residue=True)
  for rid, seq in seqs.items():
    np.testing.assert_allclose(out[rid].per_residue, hf_embeddings(seq, vocab.S2S_TOKEN),
                               atol=1e-4)
  means_only = embed.embed_sequences(model_dir, list(seqs.values()), per_residue=False)
  assert means_only[0].per_residue is None and means_only[0].per_protein.shape == (32,)
  with pytest.raises(ValueError, match="illegal residue"):
    embed.embed_sequences(model_dir, ["MK1"])


def test_bfloat16_close_to_float32(model_dir):
  seqs = [RECORDS[1][1], RECORDS[6][1]]  # one bucket: one compile per dtype
  full = embed.embed_sequences(model_dir, seqs)
  half = embed.embed_sequences(model_dir, seqs, dtype="bfloat16")
  for a, b in zip(full, half):
    cos = np.sum(a.per_protein * b.per_protein) / (
        np.linalg.norm(a.per_protein) * np.linalg.norm(b.per_protein))
    assert b.per_residue.shape == a.per_residue.shape and cos > 0.99


def _contents(path: str) -> dict:
  return {k: (v.per_residue.tobytes(), v.per_protein.tobytes())
          for k, v in embed.read_embeddings(path).items()}


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
def test_interrupted_job_resumes_to_identical_content(embedder, fasta_path, tmp_path, suffix):
  whole = str(tmp_path / f"whole{suffix}")
  embed.embed_fasta(embedder, fasta_path, whole, progress=False)

  cut = str(tmp_path / f"cut{suffix}")
  batches = []

  def stop_after_two(ids):
    batches.append(ids)
    if len(batches) == 2:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    embed.embed_fasta(embedder, fasta_path, cut, progress=False, on_batch=stop_after_two)
  done = sum(len(b) for b in batches)
  assert 0 < done < len(RECORDS)
  summary = embed.embed_fasta(embedder, fasta_path, cut, progress=False)
  assert summary["skipped"] == done and summary["written"] == len(RECORDS) - done
  assert _contents(cut) == _contents(whole)
  again = embed.embed_fasta(embedder, fasta_path, cut, progress=False)  # nothing left
  assert again["written"] == 0
  assert not [p for p in os.listdir(tmp_path) if p.endswith((".partial.h5", ".tmp"))]


@pytest.mark.parametrize("text, reason", [
    (">ok\nMKT\n>bad\nMK1T\n", "illegal character"),
    (">dup\nMKT\n>other\nAAA\n>dup\nGGG\n", "duplicate record id"),
    (">empty\n>next\nMKT\n", "empty sequence"),
])
def test_bad_input_names_record_and_writes_nothing(embedder, tmp_path, text, reason):
  path = tmp_path / "bad.fasta"
  path.write_text(text)
  out = tmp_path / "out.h5"
  with pytest.raises(fasta.FastaError, match=reason) as info:
    embed.embed_fasta(embedder, str(path), str(out), progress=False)
  assert str(path) in str(info.value) and "record" in str(info.value)
  assert not out.exists()


def test_resume_refuses_other_settings_or_sequences(model_dir, embedder, fasta_path,
                                                    tmp_path):
  out = str(tmp_path / "out.h5")
  embed.embed_fasta(embedder, fasta_path, out, progress=False)
  with pytest.raises(ValueError, match="prefix"):
    embed.embed_fasta(model_dir, fasta_path, out, prefix="s2s", progress=False)
  changed = tmp_path / "changed.fasta"
  fasta.write_fasta(str(changed), [(RECORDS[0][0], "WWWW")] + RECORDS[1:])
  with pytest.raises(ValueError, match="different sequence"):
    embed.embed_fasta(embedder, str(changed), out, progress=False)


def test_bucket_ladder_pads_at_most_a_quarter():
  ladder = sorted({embed.bucket_length(n) for n in range(1, 2049)})
  assert ladder[:10] == [16, 20, 24, 28, 32, 40, 48, 56, 64, 80]
  assert ladder[-5:] == [1024, 1280, 1536, 1792, 2048]
  for n in range(17, 2049):
    assert n <= embed.bucket_length(n) <= 1.25 * n


def test_plan_has_no_empty_rows_and_two_shapes_per_bucket():
  plan = embed.plan_batches([3, 10, 17, 17, 17, 40, 300, 17, 17], token_budget=64)
  assert [(b.bucket, b.size) for b in plan] == [(16, 2), (20, 3), (20, 2), (40, 1),
                                                (320, 1)]
  assert all(b.size == len(b.indices) for b in plan)
  assert sorted(i for b in plan for i in b.indices) == list(range(9))
  fixed = embed.plan_batches([3, 50, 51], buckets=[50, 100], token_budget=1000)
  assert [(b.bucket, b.indices) for b in fixed] == [(50, (0, 1)), (100, (2,))]
  with pytest.raises(ValueError, match="largest bucket"):
    embed.plan_batches([101], buckets=[50, 100])


def test_cli(model_dir, fasta_path, tmp_path, capsys):
  out = str(tmp_path / "cli.npz")
  assert embed.main(["--model_dir", model_dir, "--fasta", fasta_path, "--output", out,
                     "--no-progress", "--buckets", "32,64,160", "--no-per_residue"]) == 0
  stored = embed.read_embeddings(out)
  assert len(stored) == len(RECORDS) and all(e.per_residue is None for e in stored.values())
  assert embed.main(["--model_dir", model_dir, "--fasta", fasta_path, "--output",
                     str(tmp_path / "x.h5"), "--buckets", "32,64", "--no-progress"]) == 2
  assert "exceed the largest bucket" in capsys.readouterr().err
  assert not (tmp_path / "x.h5").exists()
