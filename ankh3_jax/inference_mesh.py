"""Device layout of the inference commands: the training mesh and rules on local devices.

`choose_layout` builds a mesh over this process's devices with `partitioning.create_mesh`
and `partitioning.standard_logical_axis_rules` (the trainer's code): batches are sharded
over `data`; parameters are replicated unless `--mesh` / `--param_dims` ask otherwise or
they do not fit one device, then they are split over a `model` axis. Each process of a
multi-host job uses only its own devices (it embeds its own share of the records).
One device is the plain path: no mesh, no constraints, as fast as before.
"""
import argparse
import contextlib
import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ankh3_jax import inference_memory
from ankh3_jax import partitioning
from ankh3_jax.config import T5Config
from ankh3_jax.model import Transformer


@dataclasses.dataclass(frozen=True)
class Layout:
  """A mesh with its logical axis rules, and why it was chosen (one line)."""
  mesh: Mesh
  rules: tuple
  reason: str

  @property
  def single(self) -> bool:
    return self.mesh.size == 1

  @functools.cached_property
  def data_size(self) -> int:
    """Ways the batch is split (rows are padded to a multiple of it)."""
    axes = partitioning.batch_axes(self.mesh, self.rules)
    names = axes if isinstance(axes, tuple) else ((axes,) if axes else ())
    return math.prod(self.mesh.shape[n] for n in names)

  def describe(self) -> str:
    shape = " ".join(f"{k}={v}" for k, v in self.mesh.shape.items())
    return f"mesh {shape} over {self.mesh.size} device(s): {self.reason}"


def parse_mesh(text: str) -> tuple:
  """'data=4,model=2' (or '4,2' for data, model) -> (shape, axis names)."""
  names, shape = [], []
  for i, part in enumerate(p.strip() for p in text.split(",") if p.strip()):
    name, _, size = part.rpartition("=")
    if not name:
      name = ("data", "model")[i] if i < 2 else ""
    try:
      value = int(size)
    except ValueError:
      value = 0
    if name not in partitioning.MESH_AXES or not (value >= 1 or value == -1):
      raise ValueError(f"--mesh takes axis=size pairs over {partitioning.MESH_AXES} "
                       f"(one size may be -1), e.g. data=4,model=2; got {text!r}")
    names.append(name)
    shape.append(value)
  if not names:
    raise ValueError(f"--mesh is empty: {text!r}")
  return tuple(shape), tuple(names)


def _size(num_bytes: int) -> str:
  if num_bytes >= 2 ** 30:
    return inference_memory.gigabytes(num_bytes)
  return f"{num_bytes / 2 ** 20:,.1f} MiB"


def params_fit(param_bytes: int, work_bytes: int, limit: int) -> bool:
  """Whether one device holds the parameters and one batch's activations."""
  return param_bytes + work_bytes <= limit


def choose_layout(param_bytes: int, *, mesh: Optional[str] = None,
                  param_dims: Optional[int] = None, work_bytes: int = 0,
                  device_bytes: Optional[int] = None,
                  devices: Optional[Sequence[Any]] = None) -> Layout:
  """The mesh and rules for `param_bytes` of parameters on this process's devices.

  `mesh` ('data=4,model=2') and `param_dims` (1 or 2) are taken as asked; otherwise all
  devices go to `data` with parameters replicated, or, when the parameters and
  `work_bytes` (one batch's activations) exceed `device_bytes` (default: what one device
  has), the smallest `model` axis whose share fits.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  n = len(devices)
  if param_dims not in (None, 1, 2):
    raise ValueError(f"--param_dims must be 1 or 2, got {param_dims}")
  limit = inference_memory.available_bytes() if device_bytes is None else device_bytes
  size = f"{_size(param_bytes)} of parameters"
  if mesh:
    shape, names = parse_mesh(mesh)
    try:
      shape = partitioning.resolve_mesh_shape(shape, n)
    except ValueError as e:
      raise ValueError(f"--mesh {mesh}: {e} on this process") from None
    reason = f"as --mesh {mesh} asks"
  elif param_dims == 2:
    shape, names = (n, 1), ("data", "model")
    reason = f"--param_dims 2: {size} split over the {n} data device(s)"
  elif params_fit(param_bytes, work_bytes, limit):
    shape, names = (n, 1), ("data", "model")
    reason = (f"parameters replicated: {size} fit one device's "
              f"{_size(limit)}")
  else:
    model = next((m for m in range(2, n + 1) if n % m == 0
                  and params_fit(-(-param_bytes // m), work_bytes, limit)), None)
    if model is None:
      raise ValueError(f"{size} do not fit {n} device(s) of "
                       f"{_size(limit)} even when split over all "
                       "of them; use --param_dtype bfloat16 or more devices")
    shape, names = (n // model, model), ("data", "model")
    reason = (f"{size} do not fit one device's {_size(limit)}: "
              f"split over a {model}-way model axis")
  built = partitioning.create_mesh(shape, names, devices=devices)
  rules = partitioning.standard_logical_axis_rules(
      names, parameter_partitioning_dims=param_dims or 1)
  return Layout(built, tuple(rules), reason)


def single_device_layout() -> Layout:
  """The plain path: this process's first device."""
  mesh = partitioning.create_mesh((1, 1), ("data", "model"), devices=jax.local_devices()[:1])
  return Layout(mesh, tuple(partitioning.standard_logical_axis_rules(("data", "model"))),
                "one device")


def shard_params(params, config: T5Config, layout: Layout):
  """Places unboxed `params` (a subset of the model's top-level keys) on the mesh, each
  leaf sharded by its logical axes under the layout's rules."""
  if layout.single:
    return jax.device_put(params, layout.mesh.devices.flat[0])
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  boxed = jax.eval_shape(lambda t: Transformer(config).init(
      jax.random.key(0), t, t, t, enable_dropout=False), tokens)["params"]
  shardings = partitioning.params_shardings(boxed, layout.mesh, layout.rules)
  return jax.device_put(params, {k: shardings[k] for k in params})


def padded_rows(rows: int, layout: Layout) -> int:
  """`rows` rounded up to a multiple of the data axis (padding rows are dropped after)."""
  return -(-rows // layout.data_size) * layout.data_size


def put_batch(array: np.ndarray, layout: Layout):
  """A host array whose first dimension is the batch -> sharded over the batch axes."""
  if layout.single:
    return array
  return jax.device_put(array, partitioning.batch_sharding(layout.mesh, layout.rules,
                                                           np.ndim(array)))


def context(layout: Layout):
  """Mesh and logical-rule context for tracing and running under `layout`."""
  if layout.single:
    return contextlib.nullcontext()
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(layout.mesh))
  stack.enter_context(nn.logical_axis_rules(layout.rules))
  return stack


def add_flags(parser: argparse.ArgumentParser, distributed: bool = True) -> None:
  """--mesh, --param_dims, --param_dtype and (`distributed`) the jax.distributed flags."""
  parser.add_argument("--mesh", default=None,
                      help="device mesh over this process's devices, e.g. data=4,model=2 "
                      "(default: all devices on data, parameters replicated unless they "
                      "do not fit one device)")
  parser.add_argument("--param_dims", type=int, choices=[1, 2], default=None,
                      help="parameter partitioning: 1 (over model) or 2 (also over data)")
  parser.add_argument("--param_dtype", default=None, choices=["float32", "bfloat16"],
                      help="weight storage dtype (default: as --dtype); bfloat16 halves "
                      "the weights' memory")
  if not distributed:
    return
  parser.add_argument("--multihost", action="store_true",
                      help="join a jax.distributed job detected from the environment "
                      "(Cloud TPU pod, SLURM); each process embeds one shard")
  parser.add_argument("--coordinator_address", default=None,
                      help="jax.distributed coordinator host:port (multi-host jobs)")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)


def initialize_from_flags(args: argparse.Namespace) -> None:
  """Joins a jax.distributed job when its flags are given."""
  if (getattr(args, "multihost", False) or getattr(args, "coordinator_address", None)
      or getattr(args, "num_processes", None)):
    partitioning.initialize_distributed(args.coordinator_address, args.num_processes,
                                        args.process_id)
