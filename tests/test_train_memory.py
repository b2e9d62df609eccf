"""Per-device parameter/optimizer bytes from abstract shardings (nothing allocated)."""
import pytest

from ankh3_jax import config as config_lib
from ankh3_jax import main as main_lib
from ankh3_jax import train_memory

LARGE = config_lib.preset("ankh3_large", scan_layers=True)


@pytest.fixture(scope="module")
def large_bytes():
  return {
      (shape, dims, opt): train_memory.per_device_bytes(
          LARGE, shape, parameter_partitioning_dims=dims, optimizer=opt)
      for shape, dims in (((128, 1), 1), ((128, 1), 2), ((32, 4), 1))
      for opt in ("adafactor", "adamw")}


def test_ankh3_large_on_v4_256(large_bytes):
  n = large_bytes[((128, 1), 1, "adamw")]["num_params"]
  assert 1.85e9 < n < 1.92e9  # 1.15B encoder (published) + decoder stack
  full = 4 * n  # float32
  # Data parallel only: every device holds everything; AdamW doubles it.
  assert large_bytes[((128, 1), 1, "adamw")]["params"] == full
  assert large_bytes[((128, 1), 1, "adamw")]["optimizer"] == pytest.approx(2 * full, rel=1e-6)
  # 2-D (FSDP over the 128-way data axis): ~1/128 of the parameters per device.
  two_d = large_bytes[((128, 1), 2, "adafactor")]["params"]
  assert full / 128 <= two_d < 1.05 * full / 128
  # 4-way tensor parallelism with 1-D partitioning: ~1/4 (norm scales stay replicated).
  assert full / 4 <= large_bytes[((32, 4), 1, "adafactor")]["params"] < 1.01 * full / 4
  # Adafactor's factored statistics are tiny next to Adam's two moments.
  for key, b in large_bytes.items():
    if key[2] == "adafactor":
      assert b["optimizer"] < 0.2 * b["params"]


@pytest.mark.slow
def test_memory_report_command(capsys):
  assert main_lib.run(["--memory_report", "--pod", "v4-256"]) == 0
  out = capsys.readouterr().out
  assert "v4-256 (128 chips" in out
  rows = [line for line in out.splitlines() if line.startswith(("ankh3_large", "ankh3_xl"))]
  assert len(rows) == 20
  large_fsdp = [r for r in rows if r.startswith("ankh3_large") and "adafactor" in r
                and "128 x 1" in r and "2-D" in r]
  assert len(large_fsdp) == 1 and "0.055G" in large_fsdp[0]
