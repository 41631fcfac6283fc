"""Data sources and an exact, checkpointable batch iterator.

Sources are random-access sequences of example dicts (`len`, `__getitems__`,
data/sources.py): TFDS array_record sources read without TensorFlow and the
embedded datasets of data/registry.py (the digits, a generated toy set).
`TRANSFORMS` holds the batch transforms a registry entry names. `BatchIterator` walks a source epoch by epoch in an order
drawn from (seed, epoch) alone, gives each process its slice of every global
batch, and has a two-integer state (epoch, batch index) that is saved with each
checkpoint, so a resumed run sees exactly the batches an uninterrupted one
would.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import numpy as np

from diffusax.data import registry
from diffusax.data.sources import ArraySource, CachedSource, DataError, read, toy_gmm2d  # noqa: F401 - re-exported

# Names served without TFDS' registry (data/registry.py). Everything else is looked up in TFDS.
EMBEDDED = registry.EMBEDDED


def open_source(name: str, split: str, data_dir: str, *, cache_max_examples: int = 200_000):
  """Opens dataset `name`/`split` from `data_dir`. Raises DataError with what to do.

  DataError says which of these it is: an unknown name (with the nearest
  registered ones), a name TFDS cannot construct (a bad version or config, with
  TFDS' reason), a dataset not prepared in data_dir, a data_dir that is a file,
  or a missing split. Any other failure propagates unchanged, with its cause.
  """
  data_dir = os.path.expanduser(data_dir)
  entry = EMBEDDED.get(name)
  if entry is not None and entry.source is not None:
    return entry.source(split)
  _check_data_dir(data_dir)
  if entry is not None:
    builder = entry.builder(data_dir)
  elif (prepared := registry.prepared_builder(name, data_dir)) is not None:  # python -m diffusax.data.prepare
    builder = prepared
  else:
    import tensorflow_datasets as tfds
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      import difflib
      near = difflib.get_close_matches(name.split(":")[0].split("/")[0], list(EMBEDDED) + tfds.list_builders(with_community_datasets=False),
                                       n=3, cutoff=0.6)
      raise DataError(f"unknown dataset {name!r}" + (f"; did you mean {near}?" if near else "")
                      + f" (embedded: {list(EMBEDDED)}; others are looked up in TFDS' registry)") from None
    except (AssertionError, ValueError) as e:  # TFDS: "Failed to construct dataset ...: <reason>".
      text = " ".join(str(e).split())
      if not text.startswith("Failed to construct dataset"):
        raise
      reason = text.split('}": ', 1)[-1]
      raise DataError(f"TFDS cannot construct dataset {name!r}: "
                      + (reason if len(reason) <= 400 else reason[:400] + " ...")) from None
    if not builder.is_prepared():
      raise DataError(
          f"dataset {name!r} is not prepared in {data_dir}. Prepare it once (needs network, and TensorFlow "
          f"for most public datasets) in array_record format, e.g.\n"
          f"  pip install tensorflow-cpu && tfds build {name} --data_dir={data_dir} --file_format=array_record\n"
          f"then pass --config.data.data_dir={data_dir}")
  if split not in builder.info.splits:
    raise DataError(f"dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}")
  source = builder.as_data_source(split=split)
  if len(source) <= cache_max_examples:
    source = CachedSource(source)
  return source


def _check_data_dir(data_dir: str) -> None:
  """Refuses a data_dir that is, or lies under, a regular file (TFDS would call it 'not prepared')."""
  if "://" in data_dir:
    return
  path = os.path.abspath(data_dir)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise DataError(f"data_dir {data_dir} cannot be used: {path} is a file, not a directory")


def num_classes(name: str, data_dir: str) -> int | None:
  """Number of label classes of a dataset, or None when it has no 'label'."""
  return registry.describe(name, data_dir).num_classes


@dataclasses.dataclass
class BatchIterator:
  """Yields this process' part of each global batch, in a seed-determined order.

  Epoch e visits the examples in the order `default_rng([seed, e]).permutation(n)`;
  global batch j of epoch e is entries [j*B, (j+1)*B) of that order (a final
  partial batch is dropped) and process p takes rows [p*B/P, (p+1)*B/P).
  `state()` / `restore(state)` give the exact position.
  """
  source: Any
  global_batch: int
  seed: int
  process_index: int = 0
  process_count: int = 1
  transform: Callable[[dict, np.random.Generator], dict] | None = None
  epoch: int = 0
  batch_index: int = 0

  def __post_init__(self):
    n = len(self.source)
    if self.global_batch < 1 or self.global_batch % self.process_count:
      raise ValueError(f"global batch {self.global_batch} must be >= 1 and divisible by the "
                       f"{self.process_count} processes")
    if self.global_batch > n:
      raise ValueError(f"global batch {self.global_batch} is larger than the dataset ({n} examples)")
    self._perm_epoch = None

  @property
  def batches_per_epoch(self) -> int:
    return len(self.source) // self.global_batch

  def _order(self) -> np.ndarray:
    if self._perm_epoch != self.epoch:
      self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.source))
      self._perm_epoch = self.epoch
    return self._perm

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    b, local = self.global_batch, self.global_batch // self.process_count
    start = self.batch_index * b + self.process_index * local
    batch = read(self.source, self._order()[start:start + local])
    if self.transform is not None:
      rng = np.random.default_rng([self.seed, self.epoch, self.batch_index, self.process_index, 1])
      batch = self.transform(batch, rng)
    self.batch_index += 1
    if self.batch_index >= self.batches_per_epoch:
      self.epoch, self.batch_index = self.epoch + 1, 0
    return batch

  def state(self) -> dict:
    return {"epoch": int(self.epoch), "batch_index": int(self.batch_index), "seed": int(self.seed),
            "global_batch": int(self.global_batch), "num_examples": int(len(self.source))}

  def restore(self, state: dict) -> None:
    for k in ("seed", "global_batch", "num_examples"):
      mine = self.state()[k]
      if k in state and int(state[k]) != mine:
        raise ValueError(f"data iterator state does not match this run: saved {k}={state[k]}, now {mine}")
    self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])


def image_transform(random_flip: bool = False) -> Callable[[dict, np.random.Generator], dict]:
  """uint8 [B,H,W,C] 'image' -> float32 'x' in [-1, 1]; optional horizontal flips from rng."""

  def fn(batch, rng):
    x = batch["image"].astype(np.float32) / 127.5 - 1.0
    if random_flip:
      flip = rng.random(x.shape[0]) < 0.5
      x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
    out = {"x": x}
    if "label" in batch:
      out["label"] = batch["label"].astype(np.int32)
    return out

  return fn


def vector_transform() -> Callable[[dict, np.random.Generator], dict]:
  def fn(batch, rng):
    del rng
    return {"x": batch["x"].astype(np.float32), "label": batch["label"].astype(np.int32)}
  return fn


# Batch transforms by the name a dataset's registry entry gives (data/registry.py).
TRANSFORMS = {"image": image_transform, "vector": lambda random_flip=False: vector_transform()}
