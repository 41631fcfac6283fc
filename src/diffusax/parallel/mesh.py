"""The device mesh, its axis names, and how arrays are laid out on it.

The mesh has two named axes: `data` (pure data parallelism) and `fsdp` (data
parallelism whose parameters and optimizer state are also sharded). The batch
is split over both; a parameter dimension is split over `fsdp` when its logical
axis name maps to `fsdp` in the rules and its size divides by the fsdp size.

Rules are (logical name, mesh axis or None) pairs, or triples (name, axis,
required). A parameter whose rules ask for a mesh axis of size > 1 that none of
its dimensions divides by is replicated over that axis, unless the rule is
required (or `strict=True`): then `ShardingError` names the parameter, its shape
and the axis. `placements` lists where every parameter went and
`sharding_summary` says it in one line (the training program logs it once per
run), counting the arrays and bytes sharded, replicated by the rules, and
replicated because no dimension divides. A one-device run is a (1, 1) mesh.
"""
from __future__ import annotations

import dataclasses
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


class ShardingError(ValueError):
  """A parameter that a required rule (or strict mode) wants sharded cannot be: no dimension divides."""


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where one parameter goes: its PartitionSpec, and the mesh axes (size > 1) its rules asked for but
  that no dimension divides by (`missed`: it is replicated over them)."""
  path: str
  shape: tuple
  nbytes: int
  spec: P
  missed: tuple = ()

  @property
  def sharded(self) -> bool:
    return any(a is not None for a in self.spec)


def _rule_table(rules) -> dict[str, tuple[str | None, bool]]:
  out = {}
  for r in rules:
    if len(r) not in (2, 3):
      raise ValueError(f"a sharding rule is (logical name, mesh axis) or (name, axis, required), got {r!r}")
    out[r[0]] = (r[1], bool(r[2]) if len(r) == 3 else False)
  return out


def _place(shape, names, mesh: Mesh, rules, strict: bool, path: str = "a parameter") -> tuple[P, tuple]:
  """(spec, missed axes). The first dimension (largest first when several qualify) whose logical name
  maps to a mesh axis of size > 1 that divides it is sharded over that axis; others replicated."""
  if not names:
    return P(), ()
  rule = _rule_table(rules)
  out: list[str | None] = [None] * len(shape)
  used, wanted = set(), {}
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in order:
    axis, required = rule.get(names[i], (None, False)) if i < len(names) and names[i] is not None else (None, False)
    if axis is None or mesh.shape[axis] == 1:
      continue
    wanted.setdefault(axis, []).append((i, required or strict))
    if axis in used:
      continue
    if shape[i] % mesh.shape[axis] == 0:
      out[i] = axis
      used.add(axis)
  missed = tuple(a for a in wanted if a not in used)
  for a in missed:
    if any(req for _, req in wanted[a]):
      dims = [i for i, _ in wanted[a]]
      raise ShardingError(f"parameter {path} of shape {tuple(shape)} (logical axes {tuple(names)}) must be "
                          f"sharded over mesh axis {a!r} of size {mesh.shape[a]}, but none of its dimensions "
                          f"{dims} divides by {mesh.shape[a]}")
  return P(*out), missed


def spec_for(shape: Sequence[int], names: Sequence[str | None] | None, mesh: Mesh,
             rules=DEFAULT_RULES, strict: bool = False) -> P:
  """PartitionSpec for one parameter from its logical axis names (see `_place`)."""
  return _place(shape, names, mesh, rules, strict)[0]


def _is_boxed(x) -> bool:
  return hasattr(x, "names") and hasattr(x, "unbox")


def placements(boxed_tree, mesh: Mesh, rules=DEFAULT_RULES, strict: bool = False) -> list[Placement]:
  """Every leaf's Placement, in tree order. Unboxed leaves (no logical names) are replicated."""
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(boxed_tree, is_leaf=_is_boxed)[0]:
    name = jax.tree_util.keystr(path)
    v = x.unbox() if _is_boxed(x) else x
    spec, missed = _place(v.shape, x.names if _is_boxed(x) else None, mesh, rules, strict, name)
    nbytes = math.prod(v.shape) * np.dtype(v.dtype).itemsize
    out.append(Placement(name, tuple(v.shape), int(nbytes), spec, missed))
  return out


def param_shardings(boxed_tree, mesh: Mesh, rules=DEFAULT_RULES, strict: bool = False):
  """NamedShardings for a (possibly abstract) tree of Flax LogicallyPartitioned boxes.

  Unboxed leaves (no logical names) are replicated. Returns an unboxed tree.
  `strict`: every rule is required (ShardingError instead of replicating).
  """
  specs = iter(p.spec for p in placements(boxed_tree, mesh, rules, strict))
  return jax.tree.map(lambda x: NamedSharding(mesh, next(specs)), boxed_tree, is_leaf=_is_boxed)


def _fmt_bytes(n: int) -> str:
  for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if n >= size:
      return f"{n / size:.1f} {unit}"
  return f"{n} B"


def sharding_summary(places: Sequence[Placement], mesh: Mesh, limit: int = 3) -> str:
  """One line: how many parameter arrays (and bytes) are sharded, replicated by the rules, and
  replicated because no dimension divides by the axis their rules asked for (named, up to `limit`)."""
  sharded = [p for p in places if p.sharded]
  missed = [p for p in places if p.missed]
  by_rule = [p for p in places if not p.sharded and not p.missed]
  size = lambda ps: _fmt_bytes(sum(p.nbytes for p in ps))  # noqa: E731
  line = (f"parameter sharding on mesh {dict(mesh.shape)}: {len(sharded)} arrays sharded ({size(sharded)}), "
          f"{len(by_rule)} replicated by the rules ({size(by_rule)}), {len(missed)} replicated because no "
          f"dimension divides by the mesh axis their rules ask for ({size(missed)})")
  if missed:
    named = ", ".join(f"{p.path} {p.shape} over {'/'.join(p.missed)}" for p in missed[:limit])
    line += f": {named}" + (f" and {len(missed) - limit} more" if len(missed) > limit else "")
  return line


def unbox(tree):
  """Strips Flax LogicallyPartitioned boxes (and any other `unbox`-able metadata)."""
  return jax.tree.map(lambda x: x.unbox() if _is_boxed(x) else x, tree, is_leaf=_is_boxed)
