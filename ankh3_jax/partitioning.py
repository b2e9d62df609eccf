"""Device mesh, logical axis rules and sharded placement of state and batches.

Follows t5x's partitioning contract: parameters and activations carry logical axis names
(`batch`, `embed`, `mlp`, ...); an ordered rule list maps them onto the mesh axes
`replica` (optional, pure data parallelism), `data` (batch, and with 2-D parameter
partitioning also the `embed` dimension of parameters: ZeRO-3/FSDP style) and `model`
(tensor parallelism over `vocab`, `mlp`, `heads`, `joined_kv`).
"""
import dataclasses
import logging
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

LogicalRules = Sequence[tuple[str, Any]]
MESH_AXES = ("replica", "data", "model")


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Connects the processes of a multi-host job (call before touching any device).

  With no arguments JAX detects the cluster (Cloud TPU pods, SLURM, ...); on CPU give
  all three, e.g. `localhost:12345`, 2, 0.
  """
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces one -1 entry by whatever makes the product `num_devices`."""
  shape = list(mesh_shape)
  if shape.count(-1) > 1:
    raise ValueError(f"at most one -1 in mesh_shape, got {tuple(mesh_shape)}")
  if -1 in shape:
    known = math.prod(d for d in shape if d != -1)
    if known <= 0 or num_devices % known:
      raise ValueError(f"mesh_shape {tuple(mesh_shape)} does not divide {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh_shape {tuple(shape)} needs {math.prod(shape)} devices, "
                     f"have {num_devices}")
  return tuple(shape)


@gin.configurable
def create_mesh(mesh_shape: Sequence[int] = (-1, 1),
                axis_names: Sequence[str] = ("data", "model"),
                dcn_mesh_shape: Optional[Sequence[int]] = None,
                devices: Optional[Sequence[Any]] = None) -> Mesh:
  """Builds the device mesh.

  Args:
    mesh_shape: size of each axis (one may be -1: all remaining devices). For multi-slice
      TPU jobs this is the shape inside one slice (ICI).
    axis_names: names from `MESH_AXES`, e.g. ('data', 'model') or ('replica', 'data',
      'model').
    dcn_mesh_shape: per-axis number of slices (data-centre network); the full mesh is
      `mesh_shape * dcn_mesh_shape`. None for a single slice.
    devices: defaults to all `jax.devices()`.
  """
  unknown = set(axis_names) - set(MESH_AXES)
  if unknown or len(set(axis_names)) != len(axis_names):
    raise ValueError(f"mesh axis names must be distinct names from {MESH_AXES}, "
                     f"got {tuple(axis_names)}")
  if len(mesh_shape) != len(axis_names):
    raise ValueError(f"mesh_shape {tuple(mesh_shape)} and axis_names {tuple(axis_names)} "
                     "differ in length")
  devices = list(jax.devices() if devices is None else devices)
  if dcn_mesh_shape is not None:
    slices = math.prod(dcn_mesh_shape)
    shape = resolve_mesh_shape(mesh_shape, len(devices) // slices)
    device_array = mesh_utils.create_hybrid_device_mesh(
        shape, tuple(dcn_mesh_shape), devices, allow_split_physical_axes=True)
  else:
    shape = resolve_mesh_shape(mesh_shape, len(devices))
    if devices[0].platform == "tpu":  # Maps mesh axes onto the physical torus.
      device_array = mesh_utils.create_device_mesh(shape, devices,
                                                   allow_split_physical_axes=True)
    else:
      device_array = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(device_array, tuple(axis_names))


@gin.configurable
def standard_logical_axis_rules(
    mesh_axis_names: Sequence[str] = ("data", "model"),
    parameter_partitioning_dims: int = 1,
    activation_partitioning_dims: int = 1,
    additional_rules: LogicalRules = ()) -> tuple[tuple[str, Any], ...]:
  """t5x's standard logical -> mesh axis rules, for the axes present in the mesh.

  1-D parameter partitioning shards parameters over `model` only (replicated over
  `data`); 2-D also shards their `embed` dimension over `data` (parameters, gradients
  and optimizer state are then split across all devices). 2-D activation partitioning
  shards the `embed` dimension of activations over `model`. `additional_rules` come
  first, so they take precedence.
  """
  if parameter_partitioning_dims not in (1, 2) or activation_partitioning_dims not in (1, 2):
    raise ValueError("parameter/activation_partitioning_dims must be 1 or 2")
  has = set(mesh_axis_names)
  batch = tuple(a for a in ("replica", "data") if a in has)
  model = "model" if "model" in has else None
  data = "data" if "data" in has else None
  rules = [("batch", batch if len(batch) > 1 else (batch[0] if batch else None))]
  rules += [("vocab", model), ("mlp", model), ("heads", model), ("kv", None),
            ("joined_kv", model)]
  if activation_partitioning_dims == 2:
    rules.append(("embed", model))
  if parameter_partitioning_dims == 2:
    # An activation's `embed` never gets `data`: `batch` has claimed it first.
    rules.append(("embed", data))
  rules.append(("embed", None))
  rules += [("relpos_buckets", None), ("abspos_buckets", None), ("length", None),
            ("layers", None), ("stack", None), ("mlp_activations", None)]
  return tuple(additional_rules) + tuple(rules)


def _axis_size(mesh: Mesh, entry) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[n] for n in names)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops the sharding of any dimension its mesh axes do not divide evenly.

  (e.g. 4 heads on an 8-way `model` axis stay replicated instead of failing.)
  """
  entries = list(spec) + [None] * (len(shape) - len(spec))
  fitted = [e if dim % _axis_size(mesh, e) == 0 else None for e, dim in zip(entries, shape)]
  if fitted != entries:
    logging.debug("replicating undivisible dims of %s for shape %s", spec, tuple(shape))
  return P(*fitted)


def mesh_sharding(logical_spec: Optional[P], shape: Sequence[int], mesh: Mesh,
                  rules: LogicalRules) -> NamedSharding:
  """NamedSharding of one array from its logical PartitionSpec (None: replicated)."""
  if logical_spec is None:
    return NamedSharding(mesh, P())
  spec = nn.logical_to_mesh_axes(tuple(logical_spec), rules)
  return NamedSharding(mesh, fit_spec(spec, shape, mesh))


def _is_spec(x) -> bool:
  return isinstance(x, P) or x is None


def params_shardings(abstract_boxed_params, mesh: Mesh, rules: LogicalRules):
  """Shardings of a parameter tree from its boxed (LogicallyPartitioned) abstract values."""
  logical = nn.get_partition_spec(abstract_boxed_params)
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  # `.value`, not nn.unbox: unboxing under a mesh context adds a sharding constraint.
  shapes = jax.tree.map(lambda x: x.value if is_box(x) else x, abstract_boxed_params,
                        is_leaf=is_box)
  return jax.tree.map(lambda spec, x: mesh_sharding(spec, x.shape, mesh, rules),
                      logical, shapes, is_leaf=_is_spec)


def _dict_path(path) -> tuple:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def optimizer_state_shardings(abstract_opt_state, abstract_params, param_shardings,
                              mesh: Mesh):
  """Shardings of optimizer state, derived from the parameters they mirror.

  A leaf whose dict-key path and shape match a parameter (Adam moments, unfactored
  Adafactor statistics, momentum) takes that parameter's sharding; everything else
  (step counts, factored row/column statistics, which are O(d)) is replicated.
  """
  by_path = {}
  flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_shardings = jax.tree.leaves(param_shardings)
  for (path, leaf), sharding in zip(flat_params, flat_shardings):
    by_path[_dict_path(path)] = (leaf.shape, sharding)
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    match = by_path.get(_dict_path(path))
    if match is not None and tuple(match[0]) == tuple(leaf.shape):
      return match[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


# ----- batches -----------------------------------------------------------------------

def batch_axes(mesh: Mesh, rules: LogicalRules):
  """The mesh axes the batch dimension is sharded over (from the `batch` rule)."""
  return nn.logical_to_mesh_axes(("batch",), rules)[0]


def batch_sharding(mesh: Mesh, rules: LogicalRules, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, P(batch_axes(mesh, rules), *([None] * (ndim - 1))))


@dataclasses.dataclass(frozen=True)
class DataLayout:
  """Which rows of each global batch this process feeds.

  Processes with the same `shard_id` feed identical rows (their devices hold the same
  batch shard, e.g. when the `model` axis spans hosts).
  """
  global_batch_size: int
  shard_id: int
  num_shards: int

  @property
  def shard_batch_size(self) -> int:
    return self.global_batch_size // self.num_shards

  @property
  def rows(self) -> slice:
    start = self.shard_id * self.shard_batch_size
    return slice(start, start + self.shard_batch_size)


def data_layout(mesh: Mesh, rules: LogicalRules, global_batch_size: int) -> DataLayout:
  """This process's rows of the global batch, from the addressable devices' shards."""
  size = _axis_size(mesh, batch_axes(mesh, rules))
  if global_batch_size % size:
    raise ValueError(f"batch size {global_batch_size} is not divisible by the "
                     f"{size}-way batch sharding of mesh {dict(mesh.shape)}")
  sharding = batch_sharding(mesh, rules, ndim=1)
  index_map = sharding.addressable_devices_indices_map((global_batch_size,))
  starts = sorted({s[0].start or 0 for s in index_map.values()})
  stops = sorted({s[0].stop or global_batch_size for s in index_map.values()})
  start, stop = starts[0], stops[-1]
  covered = sum(b - a for a, b in zip(starts, stops))
  if covered != stop - start or global_batch_size % (stop - start):
    raise ValueError("this process's batch rows are not one contiguous block; use a "
                     "mesh whose batch axes follow the process order")
  return DataLayout(global_batch_size, start // (stop - start),
                    global_batch_size // (stop - start))


def to_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, rules: LogicalRules,
                    global_batch_size: int) -> dict[str, jax.Array]:
  """Per-process rows (see `data_layout`) -> global arrays sharded over the batch axes."""
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    sharding = batch_sharding(mesh, rules, value.ndim)
    out[key] = jax.make_array_from_process_local_data(
        sharding, value, (global_batch_size,) + value.shape[1:])
  return out
