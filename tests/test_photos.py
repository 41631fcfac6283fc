"""The embedded RGB `photos` set (data/photos.py) and its evaluation classifier.

The references are independent of the builder: the photographs are loaded here straight from
scikit-image / scikit-learn, the no-overlap property is checked on the boxes the dataset records,
and a crop's pixels are compared with float64 numpy block means of the recorded window.
"""
import os

import numpy as np
import pytest

# Photo index (the `photo` feature) -> (class, loader), written out here rather than taken from the builder.
def _sk(name):
  import skimage.data
  return lambda: getattr(skimage.data, name)()


def _stereo(view):
  import skimage.data
  return lambda: skimage.data.stereo_motorcycle()[view]


def _sample(file):
  from sklearn.datasets import load_sample_images
  def load():
    s = load_sample_images()
    return s.images[[os.path.basename(f) for f in s.filenames].index(file)]
  return load


PHOTOS = [(0, _sk("astronaut")), (1, _sk("chelsea")), (2, _sk("coffee")), (3, _sk("hubble_deep_field")),
          (4, _sk("immunohistochemistry")), (5, _sk("retina")), (6, _sk("rocket")), (7, _stereo(0)),
          (7, _stereo(1)), (8, _sample("china.jpg")), (9, _sample("flower.jpg"))]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("photos_tfds"))


def _read(name, split, data_dir):
  from diffusax.data import pipeline
  src = pipeline.open_source(name, split, data_dir)
  return {k: np.asarray(v) for k, v in pipeline.read(src, np.arange(len(src))).items()}


@pytest.fixture(scope="module")
def splits(data_dir):
  return {(name, split): _read(name, split, data_dir) for name in ("photos", "photos64") for split in ("train", "test")}


def test_registry_describes_photos_without_building(tmp_path):
  from diffusax.data import registry
  for name, side in (("photos", 32), ("photos64", 64)):
    d = registry.describe(name, str(tmp_path))
    assert (d.shape, d.num_classes, d.transform, d.features) == ((side, side, 3), 10, "image", "photos")
  assert not os.listdir(tmp_path), "describing a dataset must not build it"


@pytest.mark.parametrize("name,side", [("photos", 32), ("photos64", 64)])
def test_counts_shapes_and_labels(splits, name, side):
  for split, per_class in (("train", 400), ("test", 100)):
    b = splits[(name, split)]
    n = 10 * per_class
    assert b["image"].shape == (n, side, side, 3) and b["image"].dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(b["label"], minlength=10), [per_class] * 10)
    # Every photograph gives its class's crops; the motorcycle's two views (photos 7, 8) half each.
    want = [per_class] * 7 + [per_class // 2] * 2 + [per_class] * 2
    np.testing.assert_array_equal(np.bincount(b["photo"], minlength=11), want)
    classes = np.array([c for c, _ in PHOTOS])
    np.testing.assert_array_equal(b["label"], classes[b["photo"]])
    assert b["image"].std() > 20, "crops should not be blank"


@pytest.mark.parametrize("name,side", [("photos", 32), ("photos64", 64)])
def test_no_test_crop_overlaps_a_training_crop(splits, name, side):
  shapes = [load().shape for _, load in PHOTOS]
  tr, te = splits[(name, "train")], splits[(name, "test")]
  for b in (tr, te):  # Windows are squares of side k * S inside their photograph.
    top, left, h, w = b["box"].T
    assert np.all(h == w) and np.all(h % side == 0) and np.all(h >= side)
    hw = np.array(shapes)[b["photo"], :2]
    assert np.all(top >= 0) and np.all(left >= 0) and np.all(top + h <= hw[:, 0]) and np.all(left + w <= hw[:, 1])
  pairs = 0
  for p in range(len(PHOTOS)):
    a, b = tr["box"][tr["photo"] == p][:, None], te["box"][te["photo"] == p][None]
    rows = (a[..., 0] < b[..., 0] + b[..., 2]) & (b[..., 0] < a[..., 0] + a[..., 2])
    cols = (a[..., 1] < b[..., 1] + b[..., 3]) & (b[..., 1] < a[..., 1] + a[..., 3])
    assert not np.any(rows & cols), f"photo {p}: a test crop overlaps a training crop"
    pairs += rows.size
  assert pairs > 10 * 400 * 100 / 2
  # The stereo views share a scene row by row: no test row of one view is a training row of the other.
  for view_a, view_b in ((7, 8), (8, 7)):
    test_rows = {int(r) for t, _, hh, _ in te["box"][te["photo"] == view_a] for r in range(t, t + hh)}
    train_rows = {int(r) for t, _, hh, _ in tr["box"][tr["photo"] == view_b] for r in range(t, t + hh)}
    assert not test_rows & train_rows


def test_crop_pixels_are_block_means_of_the_photo_window(splits):
  photos = [load() for _, load in PHOTOS]
  checked = 0
  for name, side in (("photos", 32), ("photos64", 64)):
    for split in ("train", "test"):
      b = splits[(name, split)]
      for i in range(0, len(b["label"]), 97):  # 53 crops per size over both splits, all photos and scales.
        top, left, h, w = (int(v) for v in b["box"][i])
        window = photos[b["photo"][i]][top:top + h, left:left + w].astype(np.float64)
        k = h // side
        ref = window.reshape(side, k, side, k, 3).mean(axis=(1, 3))
        diff = np.abs(b["image"][i].astype(np.float64) - ref)
        assert diff.max() <= 1.0, (name, split, i, k, diff.max())  # PIL's fixed-point rounding: < 1 level.
        checked += 1
  assert checked > 100


def test_photos_classifier_is_cached_and_accurate(data_dir, splits, monkeypatch):
  """Trained for 100 of its 600 steps (the full training takes ~90 s on 2 cores, too long for the suite;
  its 0.795 test accuracy is the README's measurement): 0.727 measured at 100 steps (chance: 0.1)."""
  import jax
  from diffusax.evaluation import photos_classifier as pc
  monkeypatch.setattr(pc, "TRAIN_STEPS", 100)
  p1, info = pc.load_or_train(data_dir)
  assert info["steps"] == 100 and info["test_accuracy"] > 0.6, info
  assert os.path.exists(pc.cache_path(data_dir))
  p2, _ = pc.load_or_train(data_dir, log=lambda m: pytest.fail(f"retrained: {m}"))
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The recorded accuracy is the share of test crops it labels right, recomputed here.
  te = splits[("photos", "test")]
  logits, feats = pc.apply(p1, te["image"])
  assert logits.shape == (1000, 10) and feats.shape == (1000, pc.FEATURE_DIM)
  assert np.mean(np.argmax(logits, -1) == te["label"]) == pytest.approx(info["test_accuracy"], abs=1e-9)
  # photos64 goes through 2x2 block means: the same as feeding those means by hand.
  big = splits[("photos64", "test")]["image"][:5]
  means = big.astype(np.float64).reshape(5, 32, 2, 32, 2, 3).mean(axis=(2, 4)) / 127.5 - 1.0
  np.testing.assert_allclose(pc.apply(p1, big)[0], pc.apply(p1, means.astype(np.float32))[0], atol=1e-4)
  a, b = pc.real_halves(data_dir)
  assert len(a) == len(b) == 500
  # Disjoint halves of the 1000 test crops: together they are the test split, each crop once.
  assert sorted(im.tobytes() for im in np.concatenate([a, b])) == sorted(im.tobytes() for im in te["image"])
