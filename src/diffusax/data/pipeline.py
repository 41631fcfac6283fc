"""Data sources, augmentations and the grain input pipeline.

Sources are random-access sequences of example dicts (`len`, `__getitems__`,
data/sources.py): TFDS array_record sources read without TensorFlow, image
folders prepared into TFDS (data/prepare.py) and the embedded datasets of
data/registry.py. `TRANSFORMS` holds the batch transforms a registry entry
names (`ImageTransform`: crop, resize, flip, scale to [-1, 1]; `VectorTransform`).

`Loader` feeds training: a grain pipeline (worker processes, read-ahead) over
`BatchSource`, which maps a batch number to this process' rows of that global
batch in an order drawn from (seed, epoch) and augments each example from
(seed, epoch, example index) alone. Its state is the number of batches handed
out, saved with each checkpoint: a resumed run sees exactly the batches an
uninterrupted one would, with any number of workers.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from diffusax import storage
from diffusax.data import registry
from diffusax.data.sources import ArraySource, CachedSource, DataError, read, toy_gmm2d  # noqa: F401 - re-exported

# Names served without TFDS' registry (data/registry.py). Everything else is looked up in TFDS.
EMBEDDED = registry.EMBEDDED


def open_source(name: str, split: str, data_dir: str, *, cache_max_bytes: int = 256 << 20):
  """Opens dataset `name`/`split` from `data_dir`. Raises DataError with what to do.

  DataError says which of these it is: an unknown name (with the nearest
  registered ones), a name TFDS cannot construct (a bad version or config, with
  TFDS' reason), a dataset not prepared in data_dir, a data_dir that is a file,
  or a missing split. Any other failure propagates unchanged, with its cause.
  A split whose decoded examples fit in `cache_max_bytes` is read once into memory (CachedSource:
  no decoding per step; grain's workers each get a copy); larger ones are decoded as they are read.
  """
  data_dir = storage.resolve(data_dir)
  entry = EMBEDDED.get(name)
  if entry is not None and entry.source is not None:
    return entry.source(split)
  _check_data_dir(data_dir)
  if entry is not None:
    builder = entry.builder(data_dir)
  elif (prepared := registry.prepared_builder(name, data_dir)) is not None:  # python -m diffusax.data.prepare
    builder = prepared
  else:
    builder = registry.tfds_builder(name, data_dir)  # DataError: unknown, or TFDS cannot construct it.
    if not builder.is_prepared():
      raise DataError(
          f"dataset {name!r} is not prepared in {data_dir}. Prepare it once (needs network, and TensorFlow "
          f"for most public datasets) in array_record format, e.g.\n"
          f"  pip install tensorflow-cpu && tfds build {name} --data_dir={data_dir} --file_format=array_record\n"
          f"then pass --config.data.data_dir={data_dir}")
  if split not in builder.info.splits:
    raise DataError(f"dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}")
  source = builder.as_data_source(split=split)
  if len(source) and len(source) * _example_bytes(source) <= cache_max_bytes:
    source = _cached_copy(builder, split) if storage.is_remote(str(builder.data_dir)) else CachedSource(source)
  return source


def _cached_copy(builder, split: str) -> CachedSource:
  """A small split on an object store, read into memory from a local copy of its files: one request
  per file instead of one per record (array_record's random access)."""
  import tempfile
  import tensorflow_datasets as tfds
  root = str(builder.data_dir)
  names = [n for n in storage.listdir(root) if n.endswith(".json") and not n.endswith(storage.MARKER_SUFFIX)]
  with tempfile.TemporaryDirectory(prefix="diffusax_split.") as tmp:
    for n in names + list(builder.info.splits[split].filenames):
      with open(os.path.join(tmp, n), "wb") as f:
        f.write(storage.read_bytes(storage.join(root, n)))
    return CachedSource(tfds.builder_from_directory(tmp).as_data_source(split=split))


def _example_bytes(source) -> int:
  """Decoded bytes of one example (the first)."""
  return sum(np.asarray(v).nbytes for v in source[0].values())


def _check_data_dir(data_dir: str) -> None:
  """Refuses a data_dir that is, or lies under, a regular file (TFDS would call it 'not prepared')."""
  if storage.is_remote(data_dir):
    return  # main probes a remote data_dir at start-up (storage.probe_read).
  path = os.path.abspath(data_dir)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise DataError(f"data_dir {data_dir} cannot be used: {path} is a file, not a directory")


def num_classes(name: str, data_dir: str) -> int | None:
  """Number of label classes of a dataset, or None when it has no 'label'."""
  return registry.describe(name, data_dir).num_classes


# --- augmentation: per example, from (seed, epoch, example index) only ----------------------------

def example_rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
  """The generator of one example's augmentation draws: a function of (seed, epoch, index) alone,
  so a batch looks the same whatever the batch size, the number of processes or of workers."""
  return np.random.default_rng([int(seed), int(epoch), int(index), int(stream)])


def _resize(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
  """uint8 [H, W, C] -> the region box = (top, left, height, width) resized to size x size
  (PIL, antialiased bilinear; the region itself when it is already that size)."""
  top, left, h, w = box
  region = image[top:top + h, left:left + w]
  if h == size and w == size:
    return region
  from PIL import Image
  grey = region.shape[-1] == 1
  im = Image.fromarray(region[..., 0] if grey else region)
  out = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR))
  return out[..., None] if grey else out


def centre_box(h: int, w: int) -> tuple[int, int, int, int]:
  """The largest centred square of an h x w image: (top, left, side, side)."""
  side = min(h, w)
  return (h - side) // 2, (w - side) // 2, side, side


def random_box(rng: np.random.Generator, h: int, w: int, min_scale: float) -> tuple[int, int, int, int]:
  """A square whose area is a fraction uniform in [min_scale, 1] of the largest square, placed uniformly."""
  side = min(h, w)
  crop = max(1, int(round(side * np.sqrt(rng.uniform(min_scale, 1.0)))))
  return int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1)), crop, crop


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  """uint8 'image' [B, H, W, C] -> float32 'x' [B, S, S, C] in [-1, 1] (+ int32 'label').

  Training: a random square crop (area fraction in [crop_min_scale, 1]) when random_crop, else the
  centred square, resized to S = image_size (0: as stored); a horizontal flip with probability 1/2
  when random_flip. Evaluation (train=False): the centred square resized to S, never flipped.
  Draws come from `example_rng(seed, epoch, index, 1)`.
  """
  image_size: int = 0
  random_flip: bool = False
  random_crop: bool = False
  crop_min_scale: float = 0.5
  train: bool = True

  def __call__(self, batch: dict, seed: int, epochs: np.ndarray, indices: np.ndarray) -> dict:
    images = batch["image"]
    _, h, w, _ = images.shape
    size = self.image_size or min(h, w)
    crop = self.train and self.random_crop
    flip = self.train and self.random_flip
    if crop or flip or (h, w) != (size, size):
      out = []
      for im, e, i in zip(images, epochs, indices):
        rng = example_rng(seed, e, i, 1) if (crop or flip) else None
        box = random_box(rng, h, w, self.crop_min_scale) if crop else centre_box(h, w)
        im = _resize(im, box, size)
        if flip and rng.random() < 0.5:
          im = im[:, ::-1]
        out.append(im)
      images = np.stack(out)
    result = {"x": images.astype(np.float32) / 127.5 - 1.0}
    if "label" in batch:
      result["label"] = np.asarray(batch["label"]).astype(np.int32)
    return result


@dataclasses.dataclass(frozen=True)
class VectorTransform:
  """float 'x' [B, D] (+ 'label') passed through as float32 / int32."""
  train: bool = True

  def __call__(self, batch: dict, seed: int, epochs: np.ndarray, indices: np.ndarray) -> dict:
    del seed, epochs, indices
    return {"x": np.asarray(batch["x"], np.float32), "label": np.asarray(batch["label"]).astype(np.int32)}


def make_transform(kind: str, data, *, train: bool):
  """The batch transform of a registry kind ("image" / "vector") from DataSettings-like `data`."""
  if kind == "vector":
    return VectorTransform(train=train)
  return ImageTransform(image_size=data.image_size, random_flip=data.random_flip, random_crop=data.random_crop,
                        crop_min_scale=data.crop_min_scale, train=train)


def eval_images(source, n: int, image_size: int = 0) -> np.ndarray:
  """The first n examples of a source in the evaluation view: uint8 images, the centred square
  resized to image_size (0 = as stored); vectors as they are. E.g. the real-data reference of fd/kid."""
  batch = read(source, np.arange(n))
  images = np.asarray(batch["image"] if "image" in batch else batch["x"])
  if images.ndim != 4:
    return images
  _, h, w, _ = images.shape
  size = image_size or min(h, w)
  if (h, w) == (size, size):
    return images
  return np.stack([_resize(im, centre_box(h, w), size) for im in images])


# --- the batch stream and its grain loader ---------------------------------------------------------

# A practically endless stream: the loader's dataset has this many epochs.
MAX_EPOCHS = 1 << 20


@dataclasses.dataclass(frozen=True)
class BatchSource:
  """This process' batches as a random-access source: b -> its rows of global batch b.

  Global batch b is batch j = b mod batches_per_epoch of epoch e = b // batches_per_epoch: entries
  [j B, (j+1) B) of the order `default_rng([seed, e]).permutation(n)` (a final partial batch is dropped);
  process p takes rows [p B/P, (p+1) B/P). A pure function of (seed, b): grain's workers can read
  any batch in any order, and a resumed run starts at its saved b.
  """
  source: Any
  global_batch: int
  seed: int
  process_index: int = 0
  process_count: int = 1
  transform: Any = None

  @property
  def num_examples(self) -> int:
    return len(self.source)

  @property
  def batches_per_epoch(self) -> int:
    return self.num_examples // self.global_batch

  def __len__(self) -> int:
    return self.batches_per_epoch * MAX_EPOCHS

  def _order(self, epoch: int) -> np.ndarray:
    cache = self.__dict__.setdefault("_orders", {})
    if epoch not in cache:
      if len(cache) > 1:
        cache.pop(min(cache))
      cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
    return cache[epoch]

  def indices(self, b: int) -> tuple[int, np.ndarray]:
    """(epoch, example indices) of this process' rows of global batch b."""
    epoch, j = divmod(int(b), self.batches_per_epoch)
    local = self.global_batch // self.process_count
    start = j * self.global_batch + self.process_index * local
    return epoch, self._order(epoch)[start:start + local]

  def __getitem__(self, b: int) -> dict:
    epoch, idx = self.indices(b)
    batch = read(self.source, idx)
    if self.transform is None:
      return batch
    return self.transform(batch, self.seed, np.full(len(idx), epoch), idx)

  def __getstate__(self):  # Sent to grain's workers without the order cache.
    return {k: v for k, v in self.__dict__.items() if k != "_orders"}

  def __setstate__(self, state):
    self.__dict__.update(state)


class Loader:
  """Yields this process' part of each global batch, read ahead by grain.

  workers = 0: batches are read and transformed in this process, `prefetch` of them ahead by one
  thread (prefetch = 0: on demand); workers > 0: by that many grain worker processes, each holding up
  to `prefetch` batches. The position (`state()`) is the number of batches handed out, and the
  stream is a pure function of it (BatchSource), so `restore` continues exactly, whatever the
  number of workers before and after.
  """

  def __init__(self, source, global_batch: int, seed: int, *, process_index: int = 0, process_count: int = 1,
               transform=None, workers: int = 0, prefetch: int = 2):
    n = len(source)
    if global_batch < 1 or global_batch % process_count:
      raise ValueError(f"global batch {global_batch} must be >= 1 and divisible by the {process_count} processes")
    if global_batch > n:
      raise ValueError(f"global batch {global_batch} is larger than the dataset ({n} examples)")
    if workers < 0 or prefetch < 0:
      raise ValueError(f"workers and prefetch must be >= 0, got workers={workers}, prefetch={prefetch}")
    self.batches = BatchSource(source, global_batch, seed, process_index, process_count, transform)
    self.workers, self.prefetch = int(workers), int(prefetch)
    self.position = 0
    self._it = None

  @property
  def batches_per_epoch(self) -> int:
    return self.batches.batches_per_epoch

  @property
  def epoch(self) -> int:
    return self.position // self.batches_per_epoch

  def _start(self):
    import grain
    ds = grain.MapDataset.source(self.batches)[self.position:]
    if self.workers == 0:
      opts = grain.ReadOptions(num_threads=1 if self.prefetch else 0, prefetch_buffer_size=self.prefetch)
      return iter(ds.to_iter_dataset(opts))
    _absl_flags_for_grain()
    mp = grain.MultiprocessingOptions(num_workers=self.workers, per_worker_buffer_size=max(1, self.prefetch))
    flat = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    return iter(flat.mp_prefetch(mp, worker_init_fn=_exit_with_parent))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._it is None:
      self._it = self._start()
    batch = next(self._it)
    self.position += 1
    if self.workers:  # Workers hand over shared-memory arrays: copy them out and free the segments now.
      batch = {k: np.array(v) for k, v in batch.items()}
    return batch

  def state(self) -> dict:
    b = self.batches
    return {"batches": int(self.position), "epoch": int(self.epoch), "seed": int(b.seed),
            "global_batch": int(b.global_batch), "num_examples": int(b.num_examples)}

  def restore(self, state: dict) -> None:
    """Continues from a saved `state()` (or the {epoch, batch_index} of the former BatchIterator)."""
    mine = self.state()
    for k in ("seed", "global_batch", "num_examples"):
      if k in state and int(state[k]) != mine[k]:
        raise ValueError(f"data iterator state does not match this run: saved {k}={state[k]}, now {mine[k]}")
    if "batches" in state:
      position = int(state["batches"])
    else:
      position = int(state["epoch"]) * self.batches_per_epoch + int(state["batch_index"])
    self.close()
    self.position = position

  def close(self) -> None:
    """Stops grain's workers and threads (at interpreter exit grain's own finaliser is noisy)."""
    it, self._it = self._it, None
    if it is not None:
      if hasattr(it, "close"):
        it.close()
      del it
      # Batches the workers had prepared live in shared memory until collected: free them now,
      # not at interpreter exit (where their finalisers print ignored errors and leak warnings).
      import gc
      gc.collect()

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001 - interpreter shutdown.
      pass


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
  """grain worker start-up: exit when the training process is gone (a kill -9 or an OOM kill leaves
  grain's workers running otherwise, each holding its memory, forever)."""
  del worker_index, worker_count
  import threading
  import time
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(0)

  threading.Thread(target=watch, name="diffusax-exit-with-parent", daemon=True).start()


def _absl_flags_for_grain() -> None:
  """grain's worker start reads absl flags; outside an absl app (tests, notebooks) none are parsed."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# Batch transforms by the name a dataset's registry entry gives (data/registry.py).
TRANSFORMS = {"image": ImageTransform, "vector": VectorTransform}
