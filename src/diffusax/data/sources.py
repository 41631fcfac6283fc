"""Random-access sources: sequences of example dicts with `len` and `__getitems__`.

`ArraySource` serves dict-of-arrays held in memory (the toy sets, cached small
TFDS splits); `read` stacks the records at some indices of any source
(TFDS' `__getitems__` returns a list of dicts) into a dict of arrays.
"""
from __future__ import annotations

import numpy as np


class DataError(ValueError):
  """A dataset that cannot be opened: unknown, not prepared, or a bad split."""


class ArraySource:
  """An in-memory source over dict-of-arrays with equal first dimension."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"ArraySource arrays differ in length: {sizes}")
    self.arrays = arrays
    self._n = next(iter(sizes.values()))

  def __len__(self):
    return self._n

  def __getitems__(self, idx):
    idx = np.asarray(idx)
    return {k: v[idx] for k, v in self.arrays.items()}


def _as_arrays(records) -> dict[str, np.ndarray]:
  """TFDS `__getitems__` returns a list of dicts; stack them into arrays."""
  if isinstance(records, dict):
    return records
  return {k: np.stack([r[k] for r in records]) for k in records[0]}


def read(source, indices) -> dict[str, np.ndarray]:
  """Records at `indices` of any source as a dict of stacked arrays (TFDS sources take a list of ints)."""
  idx = np.asarray(indices)
  return _as_arrays(source.__getitems__(idx if isinstance(source, ArraySource) else idx.tolist()))


class CachedSource(ArraySource):
  """Reads a (small) source once, decoded, into memory."""

  def __init__(self, source):
    super().__init__(read(source, np.arange(len(source))))


def toy_gmm2d(num_points: int = 65536, num_modes: int = 8, radius: float = 2.0, std: float = 0.1,
              seed: int = 0) -> ArraySource:
  """Points of a 2-D mixture of `num_modes` equal Gaussians on a circle; label = mode."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_modes, num_points)
  angle = 2 * np.pi * labels / num_modes
  centres = radius * np.stack([np.cos(angle), np.sin(angle)], axis=1)
  x = centres + std * rng.standard_normal((num_points, 2))
  return ArraySource({"x": x.astype(np.float32), "label": labels.astype(np.int32)})
