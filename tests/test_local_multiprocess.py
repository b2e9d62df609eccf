"""launch/local_multiprocess.py: the host device count it gives each process."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launcher():
  spec = importlib.util.spec_from_file_location(
      "local_multiprocess", os.path.join(ROOT, "launch", "local_multiprocess.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_device_count_replaces_the_callers_and_keeps_other_flags():
  flags = _launcher().device_count_flags
  assert flags("", 4) == "--xla_force_host_platform_device_count=4"
  # the caller's count (what a multi-device test session exports) is replaced, not left
  # as a dangling '=8' that XLA refuses
  assert flags("--xla_force_host_platform_device_count=8 --xla_cpu_a=1", 2) == (
      "--xla_cpu_a=1 --xla_force_host_platform_device_count=2")
  assert flags("--xla_b=2 --xla_force_host_platform_device_count", 3) == (
      "--xla_b=2 --xla_force_host_platform_device_count=3")
