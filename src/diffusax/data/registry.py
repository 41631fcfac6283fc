"""The embedded datasets: served without TFDS' registry, each with what the programs need to know.

    EMBEDDED[name] -> Embedded        "sklearn_digits", "photos", "photos64", "toy_gmm2d"
    prepared_builder(name, data_dir) -> builder | None   a folder of images built by data/prepare.py
    build_embedded(make, data_dir) -> builder            an embedded TFDS set, built on first use (also on gs://)
    tfds_builder(name, data_dir) -> builder   TFDS' builder of a registered name, or DataError saying why not
    describe(name, data_dir) -> Description   shape, classes, transform and eval features of any dataset

An entry gives the dataset's example shape (the model input x of one example),
its number of classes, its batch transform (a `pipeline.TRANSFORMS` name:
"image" maps uint8 [B, H, W, C] to float32 in [-1, 1], "vector" passes float
points through) and its evaluation features for fd/kid ("digits": the digits
classifier of evaluation/digits_classifier.py; "photos": that of
evaluation/photos_classifier.py; None: the FID Inception
network, as for every TFDS image dataset). Shapes and classes come without
opening a split, so sampling and evaluation never read the training data.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from typing import Any, Callable

from diffusax import storage
from diffusax.data import sources


@dataclasses.dataclass(frozen=True)
class Embedded:
  """A dataset that needs no download.

  Exactly one of `source` (split -> an in-memory source, generated) and
  `builder` (data_dir -> a prepared local TFDS builder, built on first use).
  """
  shape: tuple                   # One example's model input x, e.g. (8, 8, 1) or (2,).
  num_classes: int | None        # Label classes (None: unlabelled).
  transform: str                 # pipeline.TRANSFORMS name: "image" or "vector".
  features: str | None           # fd/kid features: "digits"/"photos" (evaluation.CLASSIFIERS) or None (Inception).
  description: str
  source: Callable[[str], Any] | None = None
  builder: Callable[[str], Any] | None = None


def build_embedded(make: Callable[[str], Any], data_dir: str):
  """The prepared TFDS builder `make(data_dir)` of an embedded dataset, built on first use.

  Local data_dir: TFDS builds in place (into an `incomplete.*` folder it renames when done). On an
  object store TFDS cannot rename, so the set is built into a local temporary folder and its files are
  copied up with `dataset_info.json` committed last (storage.commit: then its marker); a copy without
  that marker (a killed upload) is redone. The builds are deterministic, so processes that build the
  same set at once write the same files.
  """
  import tensorflow_datasets as tfds
  mode = tfds.download.DownloadConfig(download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  if not storage.is_remote(data_dir):
    builder = make(data_dir)
    if not builder.is_prepared():
      builder.download_and_prepare(download_config=mode)
    return builder
  with tempfile.TemporaryDirectory(prefix="diffusax_build.") as tmp:
    local = make(tmp)
    rel = os.path.relpath(str(local.data_dir), tmp).replace(os.sep, "/")
    dst = storage.join(data_dir, rel)
    if not storage.committed(storage.join(dst, "dataset_info.json")):
      local.download_and_prepare(download_config=mode)
      storage.copy_tree(str(local.data_dir), dst, last="dataset_info.json")
  return tfds.builder_from_directory(dst)


def _digits_builder(data_dir: str):
  from diffusax.data import digits  # Deferred: imports tensorflow_datasets (seconds).
  return digits.prepare(data_dir)


def _photos_builder(size: int):
  def build(data_dir: str):
    from diffusax.data import photos  # Deferred: imports tensorflow_datasets and scikit-image.
    return photos.prepare(data_dir, size)
  return build


EMBEDDED: dict[str, Embedded] = {
    "sklearn_digits": Embedded(
        shape=(8, 8, 1), num_classes=10, transform="image", features="digits",
        description="scikit-learn's 8x8 grey digits, 1437 train / 360 test (data/digits.py)",
        builder=_digits_builder),
    "photos": Embedded(
        shape=(32, 32, 3), num_classes=10, transform="image", features="photos",
        description="32x32 RGB crops of 11 photographs bundled with scikit-image/scikit-learn, label = photograph, "
                    "4000 train / 1000 test, test crops from a held-out band (data/photos.py)",
        builder=_photos_builder(32)),
    "photos64": Embedded(
        shape=(64, 64, 3), num_classes=10, transform="image", features="photos",
        description="64x64 RGB crops of the same photographs, 4000 train / 1000 test (data/photos.py); "
                    "fd/kid features: the photos classifier on 2x2-mean 32x32 images",
        builder=_photos_builder(64)),
    "toy_gmm2d": Embedded(
        shape=(2,), num_classes=8, transform="vector", features=None,
        description="65536 points of 8 Gaussians (std 0.1) on a circle of radius 2; label = mode",
        source=lambda split: sources.toy_gmm2d(seed={"train": 0, "test": 1}.get(split, 2))),
}


# Written by `python -m diffusax.data.prepare` into DATA_DIR/NAME/VERSION as the build's last step.
PREPARED_MARKER = "diffusax_prepare.json"


def prepared_builder(name: str, data_dir: str):
  """The read-only TFDS builder of dataset `name` made by data/prepare.py in data_dir, or None.

  Looks for data_dir/name/<version>/diffusax_prepare.json (the highest version that has one) and
  opens that directory with `tfds.builder_from_directory`; TFDS' registry is not consulted.
  """
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    return None
  root = storage.path(data_dir) / name
  try:
    found = [d for d in root.iterdir() if re.fullmatch(r"\d+\.\d+\.\d+", d.name) and (d / PREPARED_MARKER).exists()]
  except (FileNotFoundError, NotADirectoryError):
    return None
  if not found:
    return None
  import tensorflow_datasets as tfds
  return tfds.builder_from_directory(max(found, key=lambda d: tuple(int(v) for v in d.name.split("."))))


def tfds_builder(name: str, data_dir: str):
  """TFDS' builder of registered dataset `name` (name[:version], name/config[:version]) in data_dir.

  The builder comes from TFDS' registry (no network; the data may not be prepared). Raises DataError
  saying which failure it is: an unknown name (with the nearest embedded or registered names) or a
  name TFDS cannot construct (a bad version or config, with TFDS' reason). Any other failure
  propagates unchanged.
  """
  import tensorflow_datasets as tfds
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    import difflib
    known = list(EMBEDDED) + tfds.list_builders(with_community_datasets=False)
    near = difflib.get_close_matches(name.split(":")[0].split("/")[0], known, n=3, cutoff=0.6)
    raise sources.DataError(f"unknown dataset {name!r}" + (f"; did you mean {near}?" if near else "")
                            + f" (embedded: {list(EMBEDDED)}; others are looked up in TFDS' registry)") from None
  except (AssertionError, ValueError) as e:  # TFDS: "Failed to construct dataset ...: <reason>".
    text = " ".join(str(e).split())
    if not text.startswith("Failed to construct dataset"):
      raise
    reason = text.split('}": ', 1)[-1]
    raise sources.DataError(f"TFDS cannot construct dataset {name!r}: "
                            + (reason if len(reason) <= 400 else reason[:400] + " ...")) from None


@dataclasses.dataclass(frozen=True)
class Description:
  """What a program needs to know about a dataset before reading any example."""
  name: str
  shape: tuple
  num_classes: int | None
  transform: str
  features: str | None


def describe(name: str, data_dir: str) -> Description:
  """Shape, classes, transform and eval features of an embedded or a TFDS dataset (its info only).

  TFDS datasets must have an 'image' feature of fixed shape; raises DataError otherwise, and for a
  name TFDS does not know or cannot construct (`tfds_builder`).
  """
  entry = EMBEDDED.get(name)
  if entry is not None:
    return Description(name, tuple(entry.shape), entry.num_classes, entry.transform, entry.features)
  builder = prepared_builder(name, data_dir)
  if builder is None:
    builder = tfds_builder(name, storage.resolve(data_dir))
  feats = builder.info.features
  if "image" not in feats or any(d is None for d in feats["image"].shape):
    raise sources.DataError(f"dataset {name!r} has no 'image' feature of fixed shape; its features: {list(feats)}")
  ncls = feats["label"].num_classes if "label" in feats else None
  return Description(name, tuple(int(d) for d in feats["image"].shape), ncls, "image", None)
