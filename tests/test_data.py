"""Data: the embedded digits TFDS dataset and the exact, checkpointable batch iterator."""
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


def test_each_epoch_visits_every_example_once_in_a_seeded_order():
  src = _id_source(50)
  it = pipeline.BatchIterator(src, 10, seed=7)
  ep0 = sum((_ids(next(it)) for _ in range(5)), [])
  ep1 = sum((_ids(next(it)) for _ in range(5)), [])
  assert sorted(ep0) == list(range(50)) and sorted(ep1) == list(range(50))
  assert ep0 != ep1, "epochs should be reshuffled"
  other = pipeline.BatchIterator(src, 10, seed=8)
  assert sum((_ids(next(other)) for _ in range(5)), []) != ep0
  again = pipeline.BatchIterator(src, 10, seed=7)
  assert sum((_ids(next(again)) for _ in range(5)), []) == ep0


def test_partial_final_batch_is_dropped():
  it = pipeline.BatchIterator(_id_source(23), 10, seed=0)
  assert it.batches_per_epoch == 2
  a, b, c = next(it), next(it), next(it)
  assert it.state()["epoch"] == 1 and len(set(_ids(a)) | set(_ids(b))) == 20
  assert len(c["id"]) == 10


def test_processes_split_the_global_batch():
  src = _id_source(64)
  whole = pipeline.BatchIterator(src, 16, seed=3)
  parts = [pipeline.BatchIterator(src, 16, seed=3, process_index=p, process_count=4) for p in range(4)]
  for _ in range(6):
    glob = _ids(next(whole))
    assert sum((_ids(next(p)) for p in parts), []) == glob


def test_restore_continues_exactly():
  src = _id_source(40)
  a = pipeline.BatchIterator(src, 8, seed=1, transform=lambda b, rng: {**b, "r": rng.random(len(b["id"]))})
  for _ in range(7):
    next(a)
  saved = a.state()
  rest_a = [next(a) for _ in range(6)]
  b = pipeline.BatchIterator(src, 8, seed=1, transform=lambda b, rng: {**b, "r": rng.random(len(b["id"]))})
  b.restore(saved)
  rest_b = [next(b) for _ in range(6)]
  for x, y in zip(rest_a, rest_b):
    np.testing.assert_array_equal(x["id"], y["id"])
    np.testing.assert_array_equal(x["r"], y["r"])  # Augmentation draws are positional too.


def test_restore_refuses_a_different_stream():
  it = pipeline.BatchIterator(_id_source(40), 8, seed=1)
  with pytest.raises(ValueError, match="global_batch=16"):
    it.restore({"epoch": 0, "batch_index": 1, "seed": 1, "global_batch": 16, "num_examples": 40})


def test_bad_batch_sizes():
  with pytest.raises(ValueError, match="divisible by the 3 processes"):
    pipeline.BatchIterator(_id_source(40), 8, seed=0, process_count=3)
  with pytest.raises(ValueError, match="larger than the dataset"):
    pipeline.BatchIterator(_id_source(4), 8, seed=0)


def test_image_transform_scales_to_unit_interval_and_flips_from_rng():
  img = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8, 1) * 2
  img[:, 0, 0, 0], img[:, 0, 1, 0] = 0, 255
  out = pipeline.image_transform()({"image": img, "label": np.array([1, 2])}, None)
  assert out["x"].dtype == np.float32 and out["x"].min() == -1.0 and out["x"].max() == 1.0
  flipped = pipeline.image_transform(random_flip=True)({"image": img, "label": np.array([1, 2])},
                                                       np.random.default_rng(0))
  for i in range(2):
    same = np.array_equal(flipped["x"][i], out["x"][i])
    mirrored = np.array_equal(flipped["x"][i], out["x"][i][:, ::-1])
    assert same or mirrored
