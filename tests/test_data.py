"""Data: the embedded digits TFDS dataset, the grain loader (exact, checkpointable) and the augmentations."""
import numpy as np
import pytest
from sklearn.datasets import load_digits

from diffusax.data import pipeline


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def digits_train(data_dir):
  return pipeline.open_source("sklearn_digits", "train", data_dir)


def test_digits_builds_offline_and_matches_sklearn(data_dir, digits_train):
  test = pipeline.open_source("sklearn_digits", "test", data_dir)
  assert len(digits_train) == 1437 and len(test) == 360
  d = load_digits()
  want = {}
  for im, lb in zip(np.round(d.images * 255 / 16).astype(np.uint8), d.target):
    want.setdefault(im.tobytes(), set()).add(int(lb))
  seen = []
  for src in (digits_train, test):
    batch = src.__getitems__(np.arange(len(src)))
    assert batch["image"].shape[1:] == (8, 8, 1) and batch["image"].dtype == np.uint8
    for im, lb in zip(batch["image"], batch["label"]):
      assert int(lb) in want[im[..., 0].tobytes()], "an image/label pair that sklearn's digits do not contain"
      seen.append(im.tobytes())
  assert len(seen) == 1797  # Every sklearn digit in exactly one split (duplicates in sklearn are allowed).


def test_digits_readable_through_tfds_data_source(data_dir, digits_train):
  import tensorflow_datasets as tfds
  src = tfds.data_source("sklearn_digits", split="train", data_dir=data_dir)
  assert len(src) == 1437
  rec = src[0]
  assert rec["image"].shape == (8, 8, 1)
  assert 0 <= int(rec["label"]) < 10


def test_unknown_and_unprepared_datasets_are_clear(data_dir):
  with pytest.raises(pipeline.DataError, match="unknown dataset 'no_such_dataset_xyz'"):
    pipeline.open_source("no_such_dataset_xyz", "train", data_dir)
  with pytest.raises(pipeline.DataError, match=r"(?s)not prepared.*tfds build mnist"):
    pipeline.open_source("mnist", "train", data_dir)
  with pytest.raises(pipeline.DataError, match="has no split 'validation'"):
    pipeline.open_source("sklearn_digits", "validation", data_dir)


def _ids(batch):
  return list(batch["id"])


def _id_source(n):
  return pipeline.ArraySource({"id": np.arange(n), "label": np.arange(n) % 3})


class _Tag:
  """A picklable transform that records each example's draw from example_rng (for the worker tests)."""

  def __call__(self, batch, seed, epochs, indices):
    r = [pipeline.example_rng(seed, e, i, 1).random() for e, i in zip(epochs, indices)]
    return {**batch, "r": np.asarray(r), "epoch": np.asarray(epochs)}


def test_each_epoch_visits_every_example_once_in_a_seeded_order():
  src = _id_source(50)
  it = pipeline.Loader(src, 10, seed=7)
  ep0 = sum((_ids(next(it)) for _ in range(5)), [])
  ep1 = sum((_ids(next(it)) for _ in range(5)), [])
  assert sorted(ep0) == list(range(50)) and sorted(ep1) == list(range(50))
  assert ep0 != ep1, "epochs should be reshuffled"
  # The order is numpy's permutation from (seed, epoch), as the former hand-written iterator drew it:
  # the digits run sees the same batches as before grain.
  assert ep0 == list(np.random.default_rng([7, 0]).permutation(50))
  assert ep1 == list(np.random.default_rng([7, 1]).permutation(50))
  other = pipeline.Loader(src, 10, seed=8, prefetch=0)
  assert sum((_ids(next(other)) for _ in range(5)), []) != ep0
  again = pipeline.Loader(src, 10, seed=7, prefetch=0)
  assert sum((_ids(next(again)) for _ in range(5)), []) == ep0


def test_partial_final_batch_is_dropped():
  it = pipeline.Loader(_id_source(23), 10, seed=0)
  assert it.batches_per_epoch == 2
  a, b, c = next(it), next(it), next(it)
  assert it.state()["epoch"] == 1 and len(set(_ids(a)) | set(_ids(b))) == 20
  assert len(c["id"]) == 10


def test_processes_split_the_global_batch():
  src = _id_source(64)
  whole = pipeline.Loader(src, 16, seed=3)
  parts = [pipeline.Loader(src, 16, seed=3, process_index=p, process_count=4) for p in range(4)]
  for _ in range(6):
    glob = _ids(next(whole))
    assert sum((_ids(next(p)) for p in parts), []) == glob


def test_restore_continues_exactly_with_any_number_of_workers():
  """Saved at batch 7 (epoch 1 of 5 batches) by an in-process loader; continued by 2 worker processes
  and from the {epoch, batch_index} state of the former iterator: the same batches and draws,
  across the epoch boundary at batch 10."""
  src = _id_source(40)
  a = pipeline.Loader(src, 8, seed=1, transform=_Tag())
  for _ in range(7):
    next(a)
  saved = a.state()
  assert (saved["batches"], saved["epoch"]) == (7, 1)
  rest_a = [next(a) for _ in range(6)]
  assert [int(b["epoch"][0]) for b in rest_a] == [1, 1, 1, 2, 2, 2]
  for workers, state in ((2, saved), (0, {"epoch": 1, "batch_index": 2, "seed": 1})):
    b = pipeline.Loader(src, 8, seed=1, transform=_Tag(), workers=workers, prefetch=2)
    b.restore(state)
    rest_b = [next(b) for _ in range(6)]
    b.close()
    for x, y in zip(rest_a, rest_b):
      np.testing.assert_array_equal(x["id"], y["id"])
      np.testing.assert_array_equal(x["r"], y["r"])  # Augmentation draws are positional too.


def test_restore_refuses_a_different_stream():
  it = pipeline.Loader(_id_source(40), 8, seed=1)
  with pytest.raises(ValueError, match="global_batch=16"):
    it.restore({"batches": 1, "seed": 1, "global_batch": 16, "num_examples": 40})


def test_bad_loader_arguments():
  with pytest.raises(ValueError, match="divisible by the 3 processes"):
    pipeline.Loader(_id_source(40), 8, seed=0, process_count=3)
  with pytest.raises(ValueError, match="larger than the dataset"):
    pipeline.Loader(_id_source(4), 8, seed=0)
  with pytest.raises(ValueError, match="workers and prefetch must be >= 0"):
    pipeline.Loader(_id_source(40), 8, seed=0, workers=-1)


# --- augmentations -----------------------------------------------------------------------------

def _photo_source(n, h=16, w=16):
  """n random RGB images (content seeded by the id) with a white left column, so flips show."""
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
  img[:, :, 0] = 255
  return pipeline.ArraySource({"image": img, "label": np.arange(n) % 3, "id": np.arange(n)})


def _by_id(loader, steps):
  out = {}
  for _ in range(steps):
    b = next(loader)
    ids = loader.batches.indices(loader.position - 1)[1]
    for i, x in zip(ids, b["x"]):
      out[int(i)] = x
  return out


def test_image_transform_scales_to_unit_interval():
  img = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8, 1) * 2
  img[:, 0, 0, 0], img[:, 0, 1, 0] = 0, 255
  out = pipeline.ImageTransform()({"image": img, "label": np.array([1, 2])}, 0, np.zeros(2), np.arange(2))
  assert out["x"].dtype == np.float32 and out["x"].min() == -1.0 and out["x"].max() == 1.0
  np.testing.assert_allclose(out["x"], img / 127.5 - 1.0, rtol=0, atol=1e-6)
  assert out["label"].dtype == np.int32


def test_flips_depend_on_seed_epoch_and_index_only():
  """The same example in epoch 0 comes out identically with global batch 8 in one process and
  global batch 16 over 2 processes; about half are mirrored (200 draws: 70..130 fails w.p. ~1e-5)."""
  src = _photo_source(200)
  t = pipeline.ImageTransform(random_flip=True)
  one = _by_id(pipeline.Loader(src, 8, seed=5, transform=t), 25)
  two = {}
  for p in range(2):
    two.update(_by_id(pipeline.Loader(src, 16, seed=5, transform=t, process_index=p, process_count=2), 12))
  common = sorted(set(one) & set(two))
  assert len(common) >= 150
  raw = src.arrays["image"].astype(np.float32) / 127.5 - 1.0  # the [-1, 1] scaling in float32
  flipped = 0
  for i in common:
    np.testing.assert_array_equal(one[i], two[i])
    same, mirrored = np.array_equal(one[i], raw[i]), np.array_equal(one[i], raw[i][:, ::-1])
    assert same != mirrored
    flipped += mirrored
  assert 0.35 * len(common) <= flipped <= 0.65 * len(common)


def test_random_crop_is_a_resized_square_of_the_allowed_area():
  """Each output equals PIL's bilinear resize of some square crop of area fraction in [0.5, 1]
  (found by trying every side and position); evaluation is the centred square."""
  from PIL import Image
  src = _photo_source(12, 12, 14)
  t = pipeline.ImageTransform(image_size=8, random_crop=True, crop_min_scale=0.5)
  got = _by_id(pipeline.Loader(src, 4, seed=2, transform=t), 3)
  sides = set()
  for i, x in got.items():
    im = src.arrays["image"][i]
    hits = [(side, top, left) for side in range(8, 13) for top in range(13 - side) for left in range(15 - side)
            if np.array_equal(np.asarray(Image.fromarray(im[top:top + side, left:left + side]).resize(
                (8, 8), Image.Resampling.BILINEAR)).astype(np.float32) / 127.5 - 1.0, x)]
    assert hits, f"example {i}: not a resized square crop"
    assert all(side * side >= 0.5 * 144 - 1e-9 for side, _, _ in hits)
    sides.add(hits[0][0])
  assert len(sides) >= 2, "crop sizes should vary"
  ev = pipeline.ImageTransform(image_size=8, random_crop=True, random_flip=True, train=False)
  x = ev({"image": src.arrays["image"][:2]}, 0, np.zeros(2), np.arange(2))["x"]
  for k in range(2):
    want = np.asarray(Image.fromarray(src.arrays["image"][k][:, 1:13]).resize((8, 8), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(x[k], want.astype(np.float32) / 127.5 - 1.0)
  np.testing.assert_allclose(pipeline.eval_images(src, 2, 8), (x + 1.0) * 127.5, rtol=0, atol=1e-4)
