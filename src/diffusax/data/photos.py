"""`photos`: RGB crops of the photographs shipped inside scikit-image and scikit-learn, as a local TFDS dataset.

Ten classes, label = source photograph (no network: the files are read from the installed wheels):

    0 astronaut  1 chelsea  2 coffee  3 hubble_deep_field  4 immunohistochemistry  5 retina
    6 rocket     7 stereo_motorcycle (both views)  8 china  9 flower     (skimage.data; sklearn load_sample_images)

The two views of `stereo_motorcycle` are one class (the same scene; as two classes they would be
nearly indistinguishable). Two builder configs: `size32` (32x32x3, registry name `photos`) and
`size64` (64x64x3, `photos64`), each 400 train and 100 test crops per class (4000 / 1000).

Split (no test crop overlaps any training crop): each photograph of H rows is cut into three
horizontal bands, a test band of b = ceil(H / 4) rows in the middle, rows [r0, r0 + b) with
r0 = (H - b) // 2, and the two training bands above and below it. Every crop lies inside one band.
Horizontal bands (rather than vertical ones) keep the rectified stereo views honest too: a scene
point appears in the same rows of both views, so the left view's test band shows nothing that
the right view's training bands show (up to the calibration's sub-pixel row error).

A crop is a square window of side k * S (S the crop size, k drawn uniformly from 1..min(4, b // S))
at a uniformly drawn position inside its band, reduced to S x S by PIL's BOX (area) filter, which for
the integer factor k is the mean of each k x k block. Positions and scales come from
`numpy.random.default_rng([SEED, S, photo, split])`; images are stored as PNG (lossless). Each
example records its source `photo` (0..10, the motorcycle's views are 7 and 8) and `box`
(top, left, height, width) of the window in that photograph, so the split can be checked from the data.
"""
from __future__ import annotations

import io
import math

import numpy as np
import tensorflow_datasets as tfds

SEED = 15
CLASSES = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina",
           "rocket", "stereo_motorcycle", "china", "flower")
PER_CLASS = {"train": 400, "test": 100}
MAX_FACTOR = 4
SPLIT_IDS = {"train": 0, "test": 1}


def photographs() -> list[tuple[str, int, np.ndarray]]:
  """(photo name, class, uint8 [H, W, 3]) of the 11 photographs, in photo-index order."""
  import skimage.data
  from sklearn.datasets import load_sample_images
  out = [(n, CLASSES.index(n), getattr(skimage.data, n)()) for n in CLASSES[:7]]
  left, right, _ = skimage.data.stereo_motorcycle()
  out += [("stereo_motorcycle_left", 7, left), ("stereo_motorcycle_right", 7, right)]
  sample = load_sample_images()
  by_file = dict(zip([f.rsplit("/", 1)[-1] for f in sample.filenames], sample.images))
  out += [("china", 8, by_file["china.jpg"]), ("flower", 9, by_file["flower.jpg"])]
  return [(n, c, np.ascontiguousarray(a, np.uint8)) for n, c, a in out]


def test_band(height: int) -> tuple[int, int]:
  """Rows [r0, r1) of a photograph's test band: b = ceil(H / 4) rows in the middle."""
  b = math.ceil(height / 4)
  r0 = (height - b) // 2
  return r0, r0 + b


def crop_boxes(shape: tuple, size: int, split: str, count: int, photo: int) -> np.ndarray:
  """int32 [count, 4] windows (top, left, height, width) of `split` in a photograph of `shape`.

  Test windows lie inside the test band; training windows inside the band above or below it
  (chosen with probability proportional to the band's number of window positions).
  """
  h, w = shape[:2]
  r0, r1 = test_band(h)
  kmax = min(MAX_FACTOR, (r1 - r0) // size)
  if kmax < 1:
    raise ValueError(f"photograph {photo} of {h} rows is too small for {size}x{size} crops")
  rng = np.random.default_rng([SEED, size, photo, SPLIT_IDS[split]])
  bands = [(r0, r1)] if split == "test" else [(0, r0), (r1, h)]
  boxes = np.zeros((count, 4), np.int32)
  for i in range(count):
    win = size * int(rng.integers(1, kmax + 1))
    pos = np.array([max(0, (hi - lo) - win + 1) for lo, hi in bands], np.float64)  # Window tops per band.
    j = int(rng.choice(len(bands), p=pos / pos.sum()))
    top = bands[j][0] + int(rng.integers(0, int(pos[j])))
    left = int(rng.integers(0, w - win + 1))
    boxes[i] = (top, left, win, win)
  return boxes


def crop(photo: np.ndarray, box, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: the window `box` = (top, left, height, width) reduced by PIL's BOX filter."""
  from PIL import Image
  top, left, hh, ww = (int(v) for v in box)
  window = Image.fromarray(photo[top:top + hh, left:left + ww])
  return np.asarray(window.resize((size, size), Image.Resampling.BOX))


def examples(size: int, split: str):
  """Yields (key, example) of a split: PNG image, label, photo index, box; classes in order."""
  key = 0
  photos = photographs()
  for p, (name, cls, image) in enumerate(photos):
    views = sum(1 for _, c, _ in photos if c == cls)
    count = PER_CLASS[split] // views
    for box in crop_boxes(image.shape, size, split, count, p):
      yield key, {"image": _png(crop(image, box, size)), "label": cls, "photo": p, "box": box}
      key += 1


def _png(image: np.ndarray) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image, mode="RGB").save(buf, format="PNG")
  return buf.getvalue()


class PhotosConfig(tfds.core.BuilderConfig):
  def __init__(self, *, size: int, **kwargs):
    super().__init__(**kwargs)
    self.size = size


class DiffusaxPhotos(tfds.core.GeneratorBasedBuilder):
  """RGB crops of 11 bundled photographs, 10 classes; configs size32 and size64."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: 400 train / 100 test crops per class, horizontal test band."}
  BUILDER_CONFIGS = [PhotosConfig(name=f"size{s}", size=s, description=f"{s}x{s}x3 crops") for s in (32, 64)]

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.size
    return tfds.core.DatasetInfo(
        builder=self,
        description="RGB crops of the photographs bundled with scikit-image and scikit-learn; label = photograph.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(s, s, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=list(CLASSES)),
            "photo": tfds.features.Scalar(dtype=np.int32),
            "box": tfds.features.Tensor(shape=(4,), dtype=np.int32),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-image.org/docs/stable/api/skimage.data.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: examples(self.builder_config.size, split) for split in ("train", "test")}

  def _generate_examples(self):  # Unused: _split_generators returns the generators.
    raise NotImplementedError


def prepare(data_dir: str, size: int = 32) -> DiffusaxPhotos:
  """Builds the `size` config into data_dir if it is not there yet; returns the builder."""
  from diffusax.data import registry
  return registry.build_embedded(lambda d: DiffusaxPhotos(config=f"size{size}", data_dir=d), data_dir)
