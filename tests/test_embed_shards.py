"""Split embedding jobs: shard selection, `ankh3-embed merge` and its checks, two
jax.distributed processes, and a SIGKILLed shard that resumes only itself."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from ankh3_jax import config as config_lib
from ankh3_jax import embed
from ankh3_jax import embed_shards
from ankh3_jax import model as model_lib
from ankh3_jax import model_io
from ankh3_jax.data import corpus
from ankh3_jax.data import fasta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launch", "local_multiprocess.py")
NUM_RECORDS = 9
BUDGET = 64  # tokens a batch: several batches per shard
# Batches of other shapes sum in another order, and one device's products (numpy's
# OpenBLAS on AVX2 CPUs, `cpu_kernels.blas_matmul`) round unlike a mesh's (XLA's): a few
# float32 ulps.
ATOL, RTOL = 1e-6, 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  config = config_lib.preset("tiny")
  path = str(tmp_path_factory.mktemp("shards") / "model")
  model_io.save_model(path, config, model_lib.init_params(config, seed=1))
  return path


@pytest.fixture(scope="module")
def embedder(model_dir):
  return embed.Embedder(model_dir, token_budget=BUDGET)


@pytest.fixture(scope="module")
def fasta_path(tmp_path_factory):
  records = []
  for record in fasta.read_fasta(corpus.corpus_path("test")):
    if len(record.sequence) <= 60:
      records.append((record.id, "", record.sequence))
    if len(records) == NUM_RECORDS:
      break
  path = str(tmp_path_factory.mktemp("fasta") / "in.fasta")
  fasta.write_fasta(path, records)
  return path


@pytest.fixture(scope="module")
def single(embedder, fasta_path, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("single") / "emb.h5")
  embed.embed_fasta(embedder, fasta_path, out, progress=False)
  return embed.read_embeddings(out)


def _assert_same(got: dict, expected: dict) -> None:
  assert sorted(got) == sorted(expected) and len(got) == NUM_RECORDS
  for rid, emb in expected.items():
    np.testing.assert_allclose(got[rid].per_residue, emb.per_residue, RTOL, ATOL,
                               err_msg=rid)
    np.testing.assert_allclose(got[rid].per_protein, emb.per_protein, RTOL, ATOL,
                               err_msg=rid)


def _embed_shards(embedder, fasta_path, out, count=2, skip=()):
  for index in range(count):
    if index not in skip:
      embed.embed_fasta(embedder, fasta_path, out, progress=False,
                        shard=embed_shards.Shard(index, count))


def test_shard_selection_and_names():
  shard = embed_shards.Shard(1, 3)
  assert shard.path("/d/emb.h5") == "/d/emb-00001-of-00003.h5"
  assert shard.select(list(range(8))) == [1, 4, 7]
  covered = sorted(i for k in range(3) for i in embed_shards.Shard(k, 3).select(range(8)))
  assert covered == list(range(8))
  for index, count in ((3, 3), (-1, 2), (0, 0)):
    with pytest.raises(ValueError, match="shard_index"):
      embed_shards.Shard(index, count)
  with pytest.raises(ValueError, match="needs --shard_index"):
    embed_shards.shard_from_flags(2, None)
  assert embed_shards.shard_from_flags(None, None) is None


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
def test_merged_shards_equal_one_job(embedder, fasta_path, single, tmp_path, suffix):
  out = str(tmp_path / f"emb{suffix}")
  _embed_shards(embedder, fasta_path, out, count=3)
  assert sorted(os.listdir(tmp_path)) == [f"emb-0000{i}-of-00003{suffix}" for i in range(3)]
  _assert_same(embed_shards.read_sharded(out, fasta_path), single)
  summary = embed_shards.merge(out, fasta_path)
  assert summary == {"records": NUM_RECORDS, "shards": 3, "output": out}
  _assert_same(embed.read_embeddings(out), single)
  # The merged file carries a single job's settings: that job resumes it, writing nothing.
  again = embed.embed_fasta(embedder, fasta_path, out, progress=False)
  assert again["written"] == 0 and again["skipped"] == NUM_RECORDS
  with pytest.raises(ValueError, match="already exists"):
    embed_shards.merge(out, fasta_path)


def test_more_shards_than_records(embedder, fasta_path, single, tmp_path):
  out = str(tmp_path / "emb.h5")
  _embed_shards(embedder, fasta_path, out, count=NUM_RECORDS + 1)
  _, empty = embed_shards.read_contents(embed_shards.Shard(NUM_RECORDS, NUM_RECORDS + 1)
                                        .path(out))
  assert empty == {}
  embed_shards.merge(out, fasta_path)
  _assert_same(embed.read_embeddings(out), single)


def test_merge_refuses_incomplete_or_mixed_shards(model_dir, embedder, fasta_path, tmp_path):
  out = str(tmp_path / "emb.h5")
  _embed_shards(embedder, fasta_path, out, skip=(1,))
  with pytest.raises(ValueError, match=r"shard\(s\) \[1\] of 2 are missing"):
    embed_shards.check_shards(out)

  class Stop(Exception):
    pass

  def stop(ids):
    raise Stop(ids)

  with pytest.raises(Stop):
    embed.embed_fasta(embedder, fasta_path, out, progress=False,
                      shard=embed_shards.Shard(1, 2), on_batch=stop)
  with pytest.raises(ValueError, match=r"emb-00001-of-00002.h5: shard 1 holds [123] of "
                     "its 4 records: it is unfinished"):
    embed_shards.check_shards(out)
  # Shard 1 finished by another model: refused by the fingerprint.
  os.remove(embed_shards.Shard(1, 2).path(out))
  other = embed.Embedder((config_lib.preset("tiny"), model_lib.init_params(
      config_lib.preset("tiny"), seed=2)), token_budget=BUDGET)
  embed.embed_fasta(other, fasta_path, out, progress=False, shard=embed_shards.Shard(1, 2))
  with pytest.raises(ValueError, match="model fingerprint .* the shards come from different"):
    embed_shards.check_shards(out)
  assert embed_shards.merge_main(["--output", out]) == 2
  assert not os.path.exists(out)
  # Shards of a 3-way job beside those of the 2-way one.
  _embed_shards(embedder, fasta_path, out, count=3, skip=(1, 2))
  with pytest.raises(ValueError, match=r"split \[2, 3\] ways are mixed"):
    embed_shards.check_shards(out)


def test_merge_checks_the_fasta(embedder, fasta_path, tmp_path):
  out = str(tmp_path / "emb.h5")
  _embed_shards(embedder, fasta_path, out)
  records = list(fasta.read_fasta(fasta_path))
  changed = str(tmp_path / "changed.fasta")
  fasta.write_fasta(changed, [(r.id, "", r.sequence) for r in records[:-1]]
                    + [(records[-1].id, "", "A" + records[-1].sequence)])
  with pytest.raises(ValueError, match=f"record '{records[-1].id}' differs"):
    embed_shards.check_shards(out, changed)
  more = str(tmp_path / "more.fasta")
  fasta.write_fasta(more, [(r.id, "", r.sequence) for r in records] + [("new", "", "MKV")])
  with pytest.raises(ValueError, match="record 'new' is in no shard"):
    embed_shards.check_shards(out, more)
  assert embed_shards.merge_main(["--output", out, "--fasta", fasta_path,
                                  "--check_only"]) == 0
  assert not os.path.exists(out)


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # the launcher sets the device count
  return env


def _cli(*args):
  return [sys.executable, "-m", "ankh3_jax.embed", *args]


@pytest.mark.slow
def test_two_processes_then_merge_equal_one(model_dir, fasta_path, single, tmp_path):
  out = str(tmp_path / "emb.h5")
  proc = subprocess.run(
      [sys.executable, LAUNCHER, "--num_processes", "2", "--devices_per_process", "2",
       "--timeout", "300", "--", *_cli("--model_dir", model_dir, "--fasta", fasta_path,
                                       "--output", out, "--token_budget", str(BUDGET),
                                       "--no-progress")],
      env=_env(), capture_output=True, text=True, timeout=400)
  log = proc.stdout + proc.stderr
  assert proc.returncode == 0, log[-4000:]
  for index in range(2):  # each process embedded its share, on its 2 devices
    assert f"[{index}] ankh3-embed: mesh data=2 model=1 over 2 device(s)" in log
  assert "[0] ankh3-embed: 5 written" in log and "[1] ankh3-embed: 4 written" in log
  # `ankh3-embed merge`, in process (the command's own process runs above).
  assert embed.main(["merge", "--output", out, "--fasta", fasta_path]) == 0
  _assert_same(embed.read_embeddings(out), single)


@pytest.mark.slow
def test_killed_shard_resumes_only_itself(model_dir, fasta_path, single, tmp_path):
  out = str(tmp_path / "emb.h5")
  args = ["--model_dir", model_dir, "--fasta", fasta_path, "--output", out,
          "--token_budget", str(BUDGET), "--num_shards", "2", "--no-progress"]
  assert embed.main([*args, "--shard_index", "0"]) == 0  # in process; shard 1's are real
  shard0 = embed_shards.Shard(0, 2).path(out)
  before = os.stat(shard0).st_mtime_ns, open(shard0, "rb").read()
  # Shard 1 SIGKILLs itself after its first batch is flushed.
  kill = ("import os, signal, sys; from ankh3_jax import embed, embed_shards; "
          "embed.embed_fasta(sys.argv[1], sys.argv[2], sys.argv[3], token_budget=int("
          "sys.argv[4]), progress=False, shard=embed_shards.Shard(1, 2), "
          "on_batch=lambda ids: os.kill(os.getpid(), signal.SIGKILL))")
  killed = subprocess.run([sys.executable, "-c", kill, model_dir, fasta_path, out,
                           str(BUDGET)], env=_env(), capture_output=True, text=True,
                          timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr
  _, done = embed_shards.read_contents(embed_shards.Shard(1, 2).path(out))
  assert 0 < len(done) < 4
  resumed = subprocess.run(_cli(*args, "--shard_index", "1"), env=_env(),
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr
  assert (f"ankh3-embed: {4 - len(done)} written, {len(done)} already present, 4 records"
          in resumed.stdout)
  assert (os.stat(shard0).st_mtime_ns, open(shard0, "rb").read()) == before
  assert embed_shards.merge(out, fasta_path)["records"] == NUM_RECORDS
  _assert_same(embed.read_embeddings(out), single)
