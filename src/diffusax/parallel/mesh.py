"""The device mesh, its axis names, and how arrays are laid out on it.

The mesh has two named axes: `data` (pure data parallelism) and `fsdp` (data
parallelism whose parameters and optimizer state are also sharded). The batch
is split over both; a parameter dimension is split over `fsdp` when its logical
axis name maps to `fsdp` in the rules and its size divides by the fsdp size
(else it is replicated on that dimension). A one-device run is a (1, 1) mesh.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
FSDP = "fsdp"
AXES = (DATA, FSDP)
BATCH_AXES = (DATA, FSDP)

# Logical parameter axes (see diffusax.nn.LOGICAL_AXES) -> mesh axis. Axes not
# named here stay replicated.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("conv_out", FSDP),
    ("mlp", FSDP),
    ("embed", FSDP),
    ("vocab", None),
    ("heads", None),
    ("kv", None),
    ("conv_in", None),
    ("norm", None),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int]:
  """Fills one -1 in (data, fsdp) and checks the product equals num_devices."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != 2:
    raise ValueError(f"mesh shape must have 2 entries (data, fsdp), got {shape}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape {shape}: entries must be positive, with at most one -1")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known:
      raise ValueError(f"mesh shape {shape} does not fit {num_devices} devices: {num_devices} is not "
                       f"divisible by {known}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices but {num_devices} are available")
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1), devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp) mesh over `devices` (default: all) with automatic axis types."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape, len(devices))
  arr = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(arr, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_size_per_axis(mesh: Mesh) -> int:
  return mesh.shape[DATA] * mesh.shape[FSDP]


def check_batch(global_batch: int, mesh: Mesh, process_count: int = 1) -> None:
  n = batch_size_per_axis(mesh)
  if global_batch % n:
    raise ValueError(f"batch size {global_batch} does not divide over the {n} data-parallel devices "
                     f"(mesh {dict(mesh.shape)}); use a multiple of {n}")
  if global_batch % process_count:
    raise ValueError(f"batch size {global_batch} does not divide over {process_count} processes")


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading dimension split over (data, fsdp); the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def spec_for(shape: Sequence[int], names: Sequence[str | None] | None, mesh: Mesh,
             rules=DEFAULT_RULES) -> P:
  """PartitionSpec for one parameter from its logical axis names.

  The first dimension (largest first when several qualify) whose logical name
  maps to a mesh axis of size > 1 that divides it is sharded; others replicated.
  """
  if not names:
    return P()
  rule = dict(rules)
  out: list[str | None] = [None] * len(shape)
  used = set()
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in order:
    axis = rule.get(names[i]) if i < len(names) and names[i] is not None else None
    if axis is None or axis in used:
      continue
    size = mesh.shape[axis]
    if size > 1 and shape[i] % size == 0:
      out[i] = axis
      used.add(axis)
  return P(*out)


def _is_boxed(x) -> bool:
  return hasattr(x, "names") and hasattr(x, "unbox")


def param_shardings(boxed_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a (possibly abstract) tree of Flax LogicallyPartitioned boxes.

  Unboxed leaves (no logical names) are replicated. Returns an unboxed tree.
  """

  def one(x):
    if _is_boxed(x):
      v = x.unbox()
      return NamedSharding(mesh, spec_for(v.shape, x.names, mesh, rules))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, boxed_tree, is_leaf=_is_boxed)


def unbox(tree):
  """Strips Flax LogicallyPartitioned boxes (and any other `unbox`-able metadata)."""
  return jax.tree.map(lambda x: x.unbox() if _is_boxed(x) else x, tree, is_leaf=_is_boxed)
