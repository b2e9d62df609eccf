"""The machine line every benchmark result carries (benchmarks/machine.py, run.py)."""
import pytest

from benchmarks import machine, run

FAKE_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
stepping\t: 8
cache size\t: 107520 KB
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_parse_cpuinfo_reads_model_cores_and_instruction_sets():
  cpu = machine.parse_cpuinfo(FAKE_CPUINFO)
  assert cpu == {"cpu_model": "Intel(R) Xeon(R) Platinum 8480+",
                 "cpu_id": "cpu family 6, model 143, stepping 8, cache size 107520 KB",
                 "cpu_cores": 2,
                 "cpu_flags": ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]}


def test_parse_cpuinfo_avx2_only_machine():
  text = "processor : 0\nmodel name : AMD EPYC 7B13\nflags : sse2 avx avx2 fma\n"
  cpu = machine.parse_cpuinfo(text)
  assert cpu["cpu_flags"] == ["avx2"] and cpu["cpu_model"] == "AMD EPYC 7B13"
  assert cpu["cpu_id"] == ""  # cpuinfo without those fields: nothing invented


def test_parse_cpuinfo_rejects_other_text():
  with pytest.raises(ValueError, match="fake.txt: no 'processor' entry"):
    machine.parse_cpuinfo("hello: world\n", "fake.txt")


def test_summary_line_and_table_header(tmp_path):
  path = tmp_path / "cpuinfo"
  path.write_text(FAKE_CPUINFO)
  described = machine.describe(str(path))
  assert described["cpu_cores"] == 2
  assert described["versions"]["numpy"]  # installed in every environment of the tests
  line = machine.summary_line(described)
  assert line.startswith("Machine: Intel(R) Xeon(R) Platinum 8480+ (cpu family 6, model 143, "
                         "stepping 8, cache size 107520 KB), 2 cores, "
                         "AVX2 / AVX-512 / AVX512-BF16 / AMX-TILE / AMX-BF16; ")
  assert f"numpy {described['versions']['numpy']}" in line
  assert run.table({}, "cpu", described).splitlines()[0] == line
  older = {k: v for k, v in described.items() if k != "cpu_id"}  # records before cpu_id
  assert machine.summary_line(older).startswith("Machine: Intel(R) Xeon(R) Platinum 8480+, 2 ")


def test_describe_this_machine():
  described = machine.describe()
  assert described["cpu_cores"] >= 1
  assert set(described["versions"]) == set(machine.LIBRARIES)


def test_bf16_cases_route_and_print(monkeypatch):
  from benchmarks import cases  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(cases, "train", lambda preset, impl, device, **kw: calls.append(
      (preset, impl, device, kw)) or {"value": 1.0})
  result = cases.run_case("train_small_bf16", "peer", "cpu")
  assert calls == [("small", "peer", "cpu", {"mixed_bf16": True})]
  assert result["precision"] == "bfloat16 mixed"
  row = lambda value, unit: {"value": value, "unit": unit, "peak_rss_mb": 100.0}
  text = run.table({("train_small_bf16", "ours"): row(300.0, "tokens/s"),
                    ("train_small_bf16", "peer"): row(200.0, "tokens/s"),
                    ("matmul_bf16", "ours"): row(30.0, "GFLOP/s bf16"),
                    ("matmul_bf16", "peer"): row(10.0, "GFLOP/s bf16")}, "cpu")
  assert "| train_small_bf16 (tokens/s) | 300 | 200 | 1.50x | >= 1.5x | 100 | 100 |" in text
  assert "| matmul_bf16 (GFLOP/s bf16) | 30 | 10 | 3.00x |  | 100 | 100 |" in text


def test_matmul_peak_is_printed_with_or_without_train_small():
  peak = {"value": 250e9, "unit": "FLOP/s", "n": 2048, "dtype": "float32",
          "peak_rss_mb": 300.0, "tuning": "none"}
  alone = run.table({("matmul_peak", "ours"): peak}, "cpu")
  assert "| matmul peak (float32 2048^3, ours, GFLOP/s, tuning none) | 250 |" in alone
  assert "MFU" not in alone
  train = {"value": 5000.0, "unit": "tokens/s", "peak_rss_mb": 2000.0, "flops_per_s": 125e9}
  with_train = run.table({("matmul_peak", "ours"): peak, ("train_small", "ours"): train,
                          ("train_small", "peer"): dict(train, value=4000.0)}, "cpu")
  assert "| MFU train_small (XLA FLOPs / float32 matmul peak 250 GFLOP/s, tuning none) " \
         "| 50.0% |" in with_train
  assert "matmul peak (" not in with_train


def test_note_says_whether_products_took_the_sgemm_route():
  row = {"value": 1.0, "unit": "tokens/s", "peak_rss_mb": 1.0}
  text = run.table({("train_tiny", "ours"): dict(row, blas_products=True),
                    ("train_tiny", "peer"): row}, "cpu")
  assert "float32 products through numpy's OpenBLAS (ANKH3_JAX_BLAS, per CPU kind): True" \
      in text
  assert "OpenBLAS" not in run.table({("train_tiny", "peer"): row}, "cpu")


def test_train_parts_table_compares_the_best_setting_with_the_peer():
  from benchmarks import train_parts  # pylint: disable=g-import-not-at-top
  best = {"ours eigen": {"attention core fwd+bwd (ms)": 60.0, "x @ W (GFLOP/s)": 300.0},
          "ours xla_default": {"attention core fwd+bwd (ms)": 66.0, "x @ W (GFLOP/s)": 240.0},
          "peer": {"attention core fwd+bwd (ms)": 75.0, "x @ W (GFLOP/s)": 400.0}}
  text = train_parts.table(best)
  assert "| attention core fwd+bwd (ms) | 60.0 | 66.0 | 75.0 | 1.25x |" in text  # time: less
  assert "| x @ W (GFLOP/s) | 300.0 | 240.0 | 400.0 | 0.75x |" in text  # speed: more
  assert train_parts._best([3.0, 2.0], "a (ms)") == 2.0  # pylint: disable=protected-access
  assert train_parts._best([3.0, 2.0], "a (GFLOP/s)") == 3.0  # pylint: disable=protected-access


def test_train_parts_measure_every_part_on_both_sides():
  from benchmarks import train_parts  # pylint: disable=g-import-not-at-top
  ours = train_parts.ours("tiny", "xla_default")  # in this process: no process-wide flag
  peer = train_parts.peer("tiny")
  assert set(ours) == set(peer) and len(ours) == 2 + 2 * len(train_parts._matmuls("tiny"))  # pylint: disable=protected-access
  assert "kernel gradient x^T dy [64, 4096] @ [4096, 128] (GFLOP/s)" in ours
  assert all(v > 0 for v in [*ours.values(), *peer.values()])
  best = {"ours eigen": ours, "ours xla_default": ours, "peer": peer}
  assert len(train_parts.table(best).splitlines()) == 2 + len(ours)


def test_step_profile_counts_the_products_of_a_step():
  """`benchmarks.step_profile` on `tiny`: every kind of product of the step is counted,
  their work is most of the step's FLOP count (which, for the MFU, counts the products
  the sgemm route takes: XLA's count of the compiled step leaves them out), and the
  table prints each shape."""
  from ankh3_jax import cpu_kernels  # pylint: disable=g-import-not-at-top
  from benchmarks import step_profile  # pylint: disable=g-import-not-at-top
  if not cpu_kernels.blas_available():
    pytest.skip("the sgemm route is off on this CPU kind")
  result = step_profile.profile("tiny", steps=2)
  products = result["products"]
  kinds = {r["kind"] for r in products}
  assert {"forward x W", "kernel gradient x^T dy", "input gradient dy W^T",
          "attention forward, fused (2 products a head)",
          "attention backward, fused (4 products a head)"} <= kinds
  counted = sum(r["flops"] for r in products)
  assert 0.5 * result["xla_flops"] < counted < result["xla_flops"]
  assert result["step_s"] > 0 and 0 < result["cpu_over_wall"] <= result["threads"] + 0.5
  text = step_profile.table(result)
  assert len(text.splitlines()) == 2 + len(products) + 2

