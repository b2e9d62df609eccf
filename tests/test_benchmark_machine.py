"""The machine line every benchmark result carries (benchmarks/machine.py, run.py)."""
import pytest

from benchmarks import machine, run

FAKE_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_parse_cpuinfo_reads_model_cores_and_instruction_sets():
  cpu = machine.parse_cpuinfo(FAKE_CPUINFO)
  assert cpu == {"cpu_model": "Intel(R) Xeon(R) Platinum 8480+", "cpu_cores": 2,
                 "cpu_flags": ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]}


def test_parse_cpuinfo_avx2_only_machine():
  text = "processor : 0\nmodel name : AMD EPYC 7B13\nflags : sse2 avx avx2 fma\n"
  cpu = machine.parse_cpuinfo(text)
  assert cpu["cpu_flags"] == ["avx2"] and cpu["cpu_model"] == "AMD EPYC 7B13"


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
  assert line.startswith("Machine: Intel(R) Xeon(R) Platinum 8480+, 2 cores, "
                         "AVX2 / AVX-512 / AVX512-BF16 / AMX-TILE / AMX-BF16; ")
  assert f"numpy {described['versions']['numpy']}" in line
  assert run.table({}, "cpu", described).splitlines()[0] == line


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
