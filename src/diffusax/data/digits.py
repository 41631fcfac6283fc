"""scikit-learn's bundled digits as a local TFDS dataset (the embedded default).

1797 grey 8x8 handwritten digits, 10 classes (UCI optical digits). The pixel
values 0..16 are scaled to uint8 as round(v * 255 / 16). A fixed permutation
(seed 0) splits them into `train` (first 1437) and `test` (last 360). The
builder writes array_record files into the data dir on first use, with no
network and no TensorFlow; read them with `tfds.data_source("sklearn_digits", data_dir=...)`.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NUM_TRAIN = 1437


def _digits_arrays():
  from sklearn.datasets import load_digits  # Bundled with scikit-learn: no download.
  d = load_digits()
  images = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
  labels = d.target.astype(np.int64)
  perm = np.random.default_rng(0).permutation(len(labels))
  return images[perm], labels[perm]


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn digits, 8x8x1 uint8 images with labels 0-9."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: sklearn load_digits, 1437 train / 360 test."}

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="scikit-learn's bundled 8x8 handwritten digits (UCI optical recognition).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    images, labels = _digits_arrays()
    return {
        "train": self._generate_examples(images[:NUM_TRAIN], labels[:NUM_TRAIN], 0),
        "test": self._generate_examples(images[NUM_TRAIN:], labels[NUM_TRAIN:], NUM_TRAIN),
    }

  def _generate_examples(self, images, labels, offset):
    for i, (im, lb) in enumerate(zip(images, labels)):
      yield offset + i, {"image": _png(im), "label": int(lb)}


def _png(image: np.ndarray) -> bytes:
  """Lossless PNG bytes: TFDS encodes raw arrays with TensorFlow, bytes it stores as given."""
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image[..., 0], mode="L").save(buf, format="PNG")
  return buf.getvalue()


def prepare(data_dir: str) -> "SklearnDigits":
  """Builds the dataset into data_dir if it is not there yet; returns the builder."""
  from diffusax.data import registry
  return registry.build_embedded(lambda d: SklearnDigits(data_dir=d), data_dir)
