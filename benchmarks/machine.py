"""Which machine a benchmark ran on: CPU model, the instruction sets that matter, versions.

Timings differ by CPU kind (AVX2 only, AVX-512, AVX512-BF16, AMX), and between CPUs of one
kind (a cloud VM's model name is often just "Intel(R) Xeon(R) Processor", whatever its
generation), so every result and every printed table carries `describe()`'s fields,
including the CPU's family/model/stepping and cache, and `summary_line()` of them.
"""
import importlib.metadata
import os
from typing import Optional

CPUINFO = "/proc/cpuinfo"
# cpuinfo flag -> the name printed in the summary line, in this order.
INSTRUCTION_SETS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16",
                    "amx_tile": "AMX-TILE", "amx_bf16": "AMX-BF16"}
LIBRARIES = ("jax", "jaxlib", "flax", "torch", "transformers", "numpy")


def parse_cpuinfo(text: str, source: str = CPUINFO) -> dict:
  """CPU model, its identity (family, model, stepping, cache), logical core count and the
  `INSTRUCTION_SETS` flags from cpuinfo text.

  The first processor entry's fields count (all cores of a machine share them). Text
  without any 'processor' entry is a ValueError naming `source`.
  """
  model, flags, cores, ident = None, None, 0, {}
  for line in text.splitlines():
    key, sep, value = line.partition(":")
    if not sep:
      continue
    key, value = key.strip(), value.strip()
    if key == "processor":
      cores += 1
    elif key == "model name" and model is None:
      model = value
    elif key == "flags" and flags is None:
      flags = set(value.split())
    elif key in ("cpu family", "model", "stepping", "cache size") and key not in ident:
      ident[key] = value
  if not cores:
    raise ValueError(f"{source}: no 'processor' entry; not a Linux cpuinfo text")
  flags = flags or set()
  return {"cpu_model": model or "unknown",
          "cpu_id": ", ".join(f"{key} {ident[key]}" for key in
                              ("cpu family", "model", "stepping", "cache size")
                              if key in ident),
          "cpu_cores": cores,
          "cpu_flags": [flag for flag in INSTRUCTION_SETS if flag in flags]}


def library_versions() -> dict:
  """Installed version of each of `LIBRARIES` (None when not installed)."""
  versions = {}
  for name in LIBRARIES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def describe(cpuinfo_path: str = CPUINFO) -> dict:
  """This machine: `parse_cpuinfo` of `cpuinfo_path` (where readable) and the versions."""
  try:
    with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
      cpu = parse_cpuinfo(f.read(), cpuinfo_path)
  except OSError:  # not Linux: what Python knows
    cpu = {"cpu_model": "unknown", "cpu_id": "", "cpu_cores": os.cpu_count(),
           "cpu_flags": []}
  return {**cpu, "versions": library_versions()}


def summary_line(machine: Optional[dict] = None) -> str:
  """One line of `describe()`'s fields, e.g. for a table header."""
  machine = machine or describe()
  sets = [INSTRUCTION_SETS[f] for f in machine["cpu_flags"]]
  versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items()
                       if version)
  ident = f" ({machine['cpu_id']})" if machine.get("cpu_id") else ""  # older records: none
  return (f"Machine: {machine['cpu_model']}{ident}, {machine['cpu_cores']} cores, "
          f"{' / '.join(sets) or 'no AVX2'}; {versions}")
