"""The pmap strategy's layout: a replica of the state on every local device.

The program keeps one canonical form of the state, the global array laid out
on the (data, fsdp) mesh (replicated when fsdp = 1), for checkpoints, eval and
sampling. The pmap step wants instead a leading device axis:

    replicate(tree, devices)     [*shape] replicated  ->  [n, *shape], row i on device i
    unreplicate(tree, sharding)  [n, *shape]          ->  [*shape] with `sharding`

Both only rearrange device buffers already in place (no host transfer). Batches
go in as host arrays [n, B / n, ...] (`split_batch`). Single-process: in a
multi-process run use the mesh strategy.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "devices"  # pmap axis name inside the step (gradients are pmean'd over it).


def _by_device(x) -> dict:
  return {s.device: s.data for s in x.addressable_shards}


def replicate(tree, devices: Sequence):
  """Replicated global arrays -> arrays [n, ...] with row i on devices[i]."""
  devices = list(devices)
  sh = NamedSharding(Mesh(np.asarray(devices, dtype=object), (AXIS,)), P(AXIS))

  def one(x):
    if not x.is_fully_replicated:
      raise ValueError(f"pmap strategy needs replicated arrays, got sharding {x.sharding}")
    parts = _by_device(x)
    return jax.make_array_from_single_device_arrays((len(devices),) + x.shape, sh,
                                                    [parts[d][None] for d in devices])

  return jax.tree.map(one, tree)


def unreplicate(tree, shardings):
  """Arrays [n, ...] (one replica per device) -> global arrays [...] laid out by `shardings` (replicated)."""

  def one(x, sh):
    parts = _by_device(x)
    return jax.make_array_from_single_device_arrays(x.shape[1:], sh, [parts[d][0] for d in sh.addressable_devices])

  return jax.tree.map(one, tree, shardings)


def split_batch(batch: dict, n: int) -> dict:
  """Host arrays [B, ...] -> [n, B / n, ...] (device i gets rows [i B/n, (i+1) B/n))."""
  return {k: v.reshape((n, v.shape[0] // n) + v.shape[1:]) for k, v in batch.items()}
