"""Per-device parameter and optimizer-state bytes of a model on a TPU pod mesh.

Nothing is allocated: shapes come from `jax.eval_shape`, shardings from the same
logical axis rules the trainer uses, laid over a `jax.sharding.AbstractMesh`.

  ankh3-train --memory_report [--pod v4-256]
  python -m ankh3_jax.train_memory --preset ankh3_xl --mesh 32x4 --optimizer adamw
"""
import argparse
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh

from ankh3_jax import config as config_lib
from ankh3_jax import model as model_lib
from ankh3_jax import partitioning
from ankh3_jax.training import optimizers
from ankh3_jax.training import state as state_lib

# JAX devices (= chips on v4 / v5p, which fuse two TensorCores) and HBM per device.
POD_CHIPS = {f"v4-{n}": n // 2 for n in (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)}
POD_CHIPS.update({f"v5p-{n}": n // 2 for n in (8, 16, 32, 64, 128, 256, 512, 1024, 2048)})
POD_CHIPS.update({f"v5litepod-{n}": n for n in (1, 4, 8, 16, 32, 64, 128, 256)})
HBM_GIB = {"v4": 32, "v5p": 95, "v5litepod": 16}
GIB = 1024 ** 3


def _shard_bytes(leaf, sharding) -> int:
  return math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize


def per_device_bytes(cfg: config_lib.T5Config, mesh_shape: Sequence[int],
                     axis_names: Sequence[str] = ("data", "model"),
                     parameter_partitioning_dims: int = 2,
                     optimizer: str = "adafactor") -> dict:
  """Bytes one device holds for parameters, gradients and optimizer state."""
  mesh = AbstractMesh(tuple(mesh_shape), tuple(axis_names))
  rules = partitioning.standard_logical_axis_rules(
      axis_names, parameter_partitioning_dims=parameter_partitioning_dims)
  tx = optimizers.make_optimizer(optimizers.make_schedule("constant", 1e-3, 0),
                                 name=optimizer)
  factory = state_lib.StateFactory(model_lib.Transformer(cfg), tx,
                                   {"inputs": 8, "targets": 8})
  abstract = factory.abstract_state()
  shardings = factory.shardings(mesh, rules)
  total = lambda tree, shard: sum(
      jax.tree.leaves(jax.tree.map(_shard_bytes, tree, shard)))
  params = total(abstract.params, shardings.params)
  opt = total(abstract.opt_state, shardings.opt_state)
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
  return {"num_params": num_params, "params": params, "grads": params,
          "optimizer": opt, "params_and_optimizer": params + opt}


DEFAULT_LAYOUTS = (((128, 1), 1), ((128, 1), 2), ((32, 4), 1), ((32, 4), 2), ((16, 8), 2))


def _scaled_layouts(chips: int):
  """DEFAULT_LAYOUTS (written for 128 chips) rescaled to `chips` devices."""
  out = []
  for (data, model), dims in DEFAULT_LAYOUTS:
    if chips % model == 0:
      out.append(((chips // model, model), dims))
  return list(dict.fromkeys(out))


def report(presets: Sequence[str], layouts, optimizers_: Sequence[str],
           hbm_gib: float = None) -> str:
  """Plain-text table, one row per preset x optimizer x mesh x partitioning."""
  head = (f"{'model':<12} {'params':>7} {'optimizer':<9} {'mesh (data x model)':<19} "
          f"{'param dims':>10} {'params/dev':>11} {'opt/dev':>9} {'p+opt/dev':>10} "
          f"{'+grads':>9}")
  lines = [head, "-" * len(head)]
  for name in presets:
    cfg = config_lib.preset(name, scan_layers=True)  # same bytes, faster to trace
    for opt in optimizers_:
      for shape, dims in layouts:
        b = per_device_bytes(cfg, shape, parameter_partitioning_dims=dims, optimizer=opt)
        gib = lambda x: f"{x / GIB:.3f}G"
        lines.append(
            f"{name:<12} {b['num_params'] / 1e9:>6.2f}B {opt:<9} "
            f"{f'{shape[0]} x {shape[1]}':<19} {f'{dims}-D':>10} {gib(b['params']):>11} "
            f"{gib(b['optimizer']):>9} {gib(b['params_and_optimizer']):>10} "
            f"{gib(b['params_and_optimizer'] + b['grads']):>9}")
  if hbm_gib:
    lines.append(f"(HBM per device: {hbm_gib} GiB; activations, remat buffers and XLA "
                 "scratch come on top)")
  return "\n".join(lines)


def pod_report(pod: str = "v4-256",
               presets: Sequence[str] = ("ankh3_large", "ankh3_xl"),
               optimizers_: Sequence[str] = ("adafactor", "adamw")) -> str:
  """The report for the stated pod (e.g. v4-256 = 128 chips, one JAX device each)."""
  if pod not in POD_CHIPS:
    raise ValueError(f"unknown pod {pod!r}; choose from {sorted(POD_CHIPS)}")
  chips = POD_CHIPS[pod]
  title = (f"Per-device bytes on a {pod} ({chips} chips = {chips} JAX devices), "
           "float32 parameters, 1 GiB = 2^30 bytes; params/dev also = gradients/dev")
  return title + "\n" + report(presets, _scaled_layouts(chips), optimizers_,
                               HBM_GIB.get(pod.split("-")[0]))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pod", default="v4-256")
  parser.add_argument("--preset", action="append", default=None,
                      help="model preset (repeatable); default ankh3_large and ankh3_xl")
  parser.add_argument("--mesh", default=None,
                      help="DATAxMODEL, e.g. 32x4 (default: a set of layouts for the pod)")
  parser.add_argument("--param_dims", type=int, default=2, choices=(1, 2))
  parser.add_argument("--optimizer", action="append", default=None,
                      choices=("adafactor", "adamw"))
  args = parser.parse_args(argv)
  presets = args.preset or ["ankh3_large", "ankh3_xl"]
  opts = args.optimizer or ["adafactor", "adamw"]
  if args.mesh:
    shape = tuple(int(x) for x in args.mesh.lower().split("x"))
    print(report(presets, [(shape, args.param_dims)], opts))
  else:
    print(pod_report(args.pod, presets, opts))


if __name__ == "__main__":
  main()
