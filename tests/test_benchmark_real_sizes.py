"""The real-size benchmark cases' plumbing (benchmarks/real_models.py, cases.py, run.py),
at the `tiny` preset: the cached model, both sides' outputs, the agreement guard."""
import os
import subprocess

import jax
import numpy as np
import pytest

from ankh3_jax import model_io
from benchmarks import cases, real_models, run


def test_real_case_names():
  assert len(cases.REAL_CASES) == 8
  assert cases.parse_real_case("embed_ankh3_large") == ("embed", "ankh3_large", "float32")
  assert cases.parse_real_case("complete_ankh_base_bf16") == ("complete", "ankh_base",
                                                              "bfloat16")
  assert all(cases.is_real_case(c) for c in cases.REAL_CASES)
  assert not cases.is_real_case("embed") and not cases.is_real_case("complete_b16")
  with pytest.raises(ValueError, match="unknown real-size case 'embed_huge'"):
    cases.parse_real_case("embed_huge")


def test_random_params_have_the_model_shapes_and_scales():
  cfg = real_models.config("tiny")
  params = real_models.random_params(cfg)
  shapes = model_io.expected_shapes(cfg)
  model_io.check_params(cfg, params)  # every leaf, right shape
  layer = params["encoder"]["layers_0"]
  assert np.all(layer["pre_mlp_layer_norm"]["scale"] == 1.0)
  # The model's initialiser variances: 1/fan_in, 1/(fan_in * d_kv) for the query.
  np.testing.assert_allclose(np.std(layer["mlp"]["wo"]["kernel"]), cfg.d_ff ** -0.5, rtol=0.05)
  np.testing.assert_allclose(np.std(layer["attention"]["query"]["kernel"]),
                             (cfg.d_model * cfg.d_kv) ** -0.5, rtol=0.05)
  assert np.all(params["decoder"]["logits_dense"]["kernel"][:, 1] == 0.0)  # eos
  encoder = real_models.random_params(cfg, encoder_only=True)
  assert set(encoder) == {"token_embedder", "encoder"}
  np.testing.assert_array_equal(encoder["encoder"]["layers_1"]["mlp"]["wi_0"]["kernel"],
                                params["encoder"]["layers_1"]["mlp"]["wi_0"]["kernel"])
  assert real_models.params_bytes(cfg) == 4 * sum(
      int(np.prod(s)) for s in jax.tree.leaves(
          shapes, is_leaf=lambda x: isinstance(x, tuple)))


def test_prepare_writes_once_and_skips_killed_runs(tmp_path):
  work = str(tmp_path)
  fp = real_models.fingerprint("tiny")
  assert real_models.cached("tiny", work) is None
  # A temporary directory left by a killed run (its process is gone) is removed, never used.
  dead = subprocess.Popen(["true"])
  dead.wait()
  stale = tmp_path / f"tiny-{fp}" / f".ours.tmp-{dead.pid}-abc"
  (stale / "ours").mkdir(parents=True)
  embed_parts = real_models.parts_for("embed")
  paths = real_models.prepare("tiny", work, embed_parts, log=lambda m: None)
  assert not stale.exists()
  assert paths == real_models.cached("tiny", work, embed_parts)
  assert real_models.cached("tiny", work, real_models.parts_for("complete")) is None
  assert not os.path.exists(paths["ours"])  # only the parts asked for
  assert os.path.isfile(os.path.join(paths["ours_encoder"], "config.json"))
  mtime = os.path.getmtime(os.path.join(paths["hf"], "model.safetensors"))
  assert real_models.prepare("tiny", work, embed_parts) == paths  # cached: not rewritten
  assert os.path.getmtime(os.path.join(paths["hf"], "model.safetensors")) == mtime
  # A part without its completion mark is not taken for a model, nor overwritten.
  os.remove(os.path.join(paths["hf"], "BENCHMARK_COMPLETE"))
  assert real_models.cached("tiny", work, embed_parts) is None
  with pytest.raises(RuntimeError, match="exists but holds no BENCHMARK_COMPLETE file"):
    real_models.prepare("tiny", work, embed_parts)


@pytest.mark.slow  # ~30 s at low load: two compiles and two transformers loads
def test_tiny_cases_agree_and_the_table_guards(tmp_path):
  work = str(tmp_path)
  cases.real_size("embed_tiny", "prepare", work)
  cases.real_size("complete_tiny_bf16", "prepare", work)  # adds the full model
  results = {}
  for case, kw in (("embed_tiny", {"count": 1}), ("complete_tiny_bf16", {"batch": 1})):
    for impl in ("ours", "peer"):
      result = cases.real_size(case, impl, work, **kw)
      # The peak before the agreement check is the workflow's; the check's comes apart.
      assert 0 < result["peak_rss_mb"] <= result.get("peak_with_check_mb", float("inf"))
      assert ("peak_with_check_mb" in result) == case.startswith("complete")
      results[(case, impl)] = result
  for case in ("embed_tiny", "complete_tiny_bf16"):
    ours, peer = results[(case, "ours")], results[(case, "peer")]
    assert ours["value"] > 0 and peer["value"] > 0
    check = run.agreement(case, ours, peer)
    assert check["ok"], check
  # The first outputs: a per-residue embedding of the first sequence, the greedy tokens.
  emb = np.load(results[("embed_tiny", "ours")]["first_output"])
  assert emb.shape == (96, 64)  # the first sequence has 96 residues; tiny d_model 64
  tokens = np.load(results[("complete_tiny_bf16", "peer")]["first_output"])
  assert tokens.shape == (cases.REAL_COMPLETE_NEW,)
  # A fast but wrong side gets no ratio.
  wrong = tmp_path / "wrong.npy"
  np.save(wrong, emb + 1.0)
  bad = dict(results[("embed_tiny", "peer")], first_output=str(wrong))
  assert not run.agreement("embed_tiny", results[("embed_tiny", "ours")], bad)["ok"]
  # Completion also compares the decoder's log-probabilities of the greedy tokens.
  ours, peer = results[("complete_tiny_bf16", "ours")], results[("complete_tiny_bf16", "peer")]
  log_probs = np.load(ours["first_log_probs"])
  assert log_probs.shape == tokens.shape and np.all(log_probs < 0)
  assert "log-probabilities within" in run.agreement("complete_tiny_bf16", ours, peer)["detail"]
  np.save(wrong, log_probs - 0.5)  # same argmax, other probabilities
  bad = dict(peer, first_log_probs=str(wrong))
  check = run.agreement("complete_tiny_bf16", ours, bad)
  assert not check["ok"] and "within 5.0e-01 nats" in check["detail"], check


def test_real_table_prints_a_ratio_only_when_outputs_agree(tmp_path):
  a, b = tmp_path / "a.npy", tmp_path / "b.npy"
  np.save(a, np.array([5, 6, 7] + [8] * 13))
  np.save(b, np.array([5, 6, 9] + [8] * 13))
  lp = tmp_path / "lp.npy"
  np.save(lp, np.full(16, -3.0))
  side = {"unit": "tokens/s", "peak_rss_mb": 1000.0, "first_log_probs": str(lp)}
  results = {("complete_ankh_base", "ours"): dict(side, value=30.0, first_output=str(a)),
             ("complete_ankh_base", "peer"): dict(side, value=10.0, first_output=str(b)),
             ("complete_ankh_base_bf16", "ours"): dict(side, value=30.0, first_output=str(a)),
             ("complete_ankh_base_bf16", "peer"): dict(side, value=10.0, first_output=str(a)),
             ("embed_ankh3_large", "ours"): {"error": "Traceback\nMemoryError: too big"}}
  rows = run.real_table(results).splitlines()
  assert len(rows) == 5  # header, rule, the three cases in `REAL_CASES` order
  assert "failed: MemoryError: too big" in rows[2]
  assert "outputs differ: no ratio" in rows[3] and "first 2 of 16" in rows[3]
  assert "3.00x" in rows[4] and "agree" in rows[4]


def test_a_case_that_cannot_fit_says_so(monkeypatch):
  monkeypatch.setattr(cases, "available_memory_bytes", lambda: 2 ** 29)  # 0.5 GiB
  need = cases.real_memory_need("embed_small_bf16", "ours")
  assert need > 2 ** 29
  with pytest.raises(MemoryError, match=rf"embed_small_bf16 ours: needs about "
                                        rf"{need / 2**30:.1f} GiB, only 0\.5 GiB available"):
    cases.check_fits("embed_small_bf16", "ours")
  monkeypatch.setattr(cases, "available_memory_bytes", lambda: 2 ** 40)
  cases.check_fits("embed_small_bf16", "ours")  # fits


def test_measure_names_a_kill(monkeypatch):
  killed = subprocess.CompletedProcess([], -9, stdout="", stderr="loading...\n")
  monkeypatch.setattr(run.subprocess, "run", lambda *a, **k: killed)
  result = run.measure("embed_ankh3_large", "ours", "cpu")
  assert "killed by SIGKILL (out of memory?" in result["error"]
