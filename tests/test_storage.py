"""The path layer (diffusax.storage) on a local disk and on a GCS emulator, in process.

The commit protocol, the start-up probe, TensorBoard events, checkpoints, the
classifier cache and TFDS array_record datasets (embedded builds and image
folders) on gs://. The programs end to end on gs:// are in tests/test_gcs.py.
"""
import io
import json
import os
import struct
import uuid

import numpy as np
import pytest

from diffusax import storage


def _root(gcs) -> str:
  return f"gs://bkt/{uuid.uuid4().hex[:8]}"


# --- paths and the commit protocol --------------------------------------------------------------

def test_paths_keep_their_scheme_and_local_ones_resolve(tmp_path, monkeypatch):
  assert storage.join("gs://b/run/", "tb", "x") == "gs://b/run/tb/x"
  assert storage.resolve("gs://b/run/") == "gs://b/run"
  assert storage.basename("gs://b/run/shard_000001.npz") == "shard_000001.npz"
  assert storage.dirname("gs://b/run/x.json") == "gs://b/run"
  monkeypatch.chdir(tmp_path)
  assert storage.resolve("a/b") == str(tmp_path / "a" / "b")
  assert storage.resolve("~") == os.path.expanduser("~")
  assert storage.is_remote("s3://b/x") and not storage.is_remote("/x/gs://")


def test_local_commit_is_a_rename_and_a_killed_one_leaves_only_a_temporary(tmp_path):
  p = str(tmp_path / "d" / "shard_000000.npz")
  storage.commit(p, b"abc")
  assert open(p, "rb").read() == b"abc" and storage.committed(p)
  assert sorted(os.listdir(tmp_path / "d")) == ["shard_000000.npz"]  # no marker, no temporary
  # What a killed commit leaves: its temporary, which counts for nothing and is removed.
  open(tmp_path / "d" / ".shard_000001.npz.tmp123", "wb").write(b"half")
  assert not storage.committed(str(tmp_path / "d" / "shard_000001.npz"))
  storage.remove_temporaries(str(tmp_path / "d"), r"shard_\d{6}\.npz")
  assert sorted(os.listdir(tmp_path / "d")) == ["shard_000000.npz"]


def test_remote_commit_needs_its_marker_and_the_recorded_size(gcs):
  root = _root(gcs)
  p = storage.join(root, "shard_000000.npz")
  storage.commit(p, b"abcdef")
  names = set(storage.listdir(root))
  assert names == {"shard_000000.npz", "shard_000000.npz.committed"}
  assert storage.committed(p) and storage.committed(p, names)
  mark = json.loads(storage.read_text(p + ".committed"))
  assert mark["bytes"] == 6 and len(mark["sha256"]) == 64
  # Killed between the file and its marker: written but not committed (the job redoes it).
  q = storage.join(root, "shard_000001.npz")
  storage.path(q).write_bytes(b"abcdef")
  assert not storage.committed(q) and not storage.committed(q, set(storage.listdir(root)))
  # A file replaced by a shorter one after its marker: not what was committed.
  storage.path(p).write_bytes(b"abc")
  assert not storage.committed(p)
  storage.uncommit(p)
  assert storage.listdir(root) == ["shard_000001.npz"]


def test_move_tree_and_rmtree_on_the_object_store(gcs):
  root = _root(gcs)
  for f in ("a/x", "a/b/y"):
    storage.write_bytes(storage.join(root, "20", f), f.encode())
  storage.move_tree(storage.join(root, "20"), storage.join(root, "20.corrupt"))
  assert storage.listdir(root) == ["20.corrupt"]
  assert storage.read_bytes(storage.join(root, "20.corrupt", "a/b/y")) == b"a/b/y"
  storage.rmtree(root)
  assert storage.listdir(root) == []


# --- the start-up probe ---------------------------------------------------------------------------

def test_probe_accepts_a_writable_prefix_and_leaves_nothing(gcs):
  root = _root(gcs)
  assert storage.probe(root + "/run/", "--workdir") == root + "/run"
  assert storage.listdir(root) == []


def test_probe_names_a_missing_bucket_and_creates_none(gcs):
  with pytest.raises(storage.StorageError) as e:
    storage.probe("gs://no-such-bucket-x/run", "--workdir")
  assert str(e.value) == ("--workdir=gs://no-such-bucket-x/run cannot be used: the bucket does not exist "
                          "(or is not visible to these credentials)")
  assert not storage.exists("gs://no-such-bucket-x")
  with pytest.raises(storage.StorageError, match="cannot be read: the bucket does not exist"):
    storage.probe_read("gs://no-such-bucket-x/data", "--config.data.data_dir")
  storage.probe_read(_root(gcs) + "/absent", "--config.data.data_dir")  # an empty prefix is fine
  with pytest.raises(storage.StorageError, match=r"names no bucket \(expected gs://BUCKET/PATH\)"):
    storage.probe("gs:///run", "--workdir")


def test_probe_turns_backend_failures_into_their_cause(monkeypatch, tmp_path):
  """The causes the emulator cannot produce (it grants everything), from the exceptions the clients raise."""
  class HttpError(Exception):
    def __init__(self, code, msg):
      super().__init__(msg)
      self.code = code

  class DefaultCredentialsError(Exception):
    pass

  cases = [(PermissionError("Forbidden"), "permission denied (Forbidden); the account needs object read/write"),
           (HttpError(403, "x@y does not have storage.objects.create access"), "permission denied (x@y does not"),
           (DefaultCredentialsError("Your default credentials were not found."),
            "no usable credentials (Your default credentials were not found.); on a TPU or GCE VM"),
           (ModuleNotFoundError("No module named 'gcsfs'"), "No module named 'gcsfs'; install it (pip install 'diffusax[gcs]'")]
  for exc, want in cases:
    class Failing:
      def write_bytes(self, data, exc=exc):
        raise exc
    monkeypatch.setattr(storage, "path", lambda p: Failing())
    with pytest.raises(storage.StorageError) as e:
      storage.probe("gs://bucket/run", "--workdir")
    assert str(e.value).startswith("--workdir=gs://bucket/run cannot be used: " + want), str(e.value)
  monkeypatch.undo()
  f = tmp_path / "file"
  f.write_text("x")
  with pytest.raises(storage.StorageError, match=r"is a file, not a directory"):
    storage.probe(str(f), "--workdir")
  with pytest.raises(storage.StorageError, match=r"cannot be created: .* is a file, not a directory"):
    storage.probe(str(f / "run"), "--workdir")


# --- what the programs write ----------------------------------------------------------------------

def _events(data: bytes) -> list:
  """TFRecord framing (length, masked crc, data, masked crc) parsed independently of tensorboardX'
  writer; each record is an Event proto."""
  from tensorboardX.proto import event_pb2
  out, i = [], 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    ev = event_pb2.Event()
    ev.ParseFromString(data[i + 12:i + 12 + n])
    out.append(ev)
    i += 12 + n + 4
  assert i == len(data)
  return out


def _parts(folder: str) -> list[bytes]:
  names = storage.listdir(folder)
  base = min(names, key=len)
  assert set(names) == {base, *(f"{base}.{k}" for k in range(1, len(names)))}, names
  return [storage.read_bytes(storage.join(folder, base if k == 0 else f"{base}.{k}")) for k in range(len(names))]


def test_tensorboard_events_on_gs_are_readable(gcs):
  from diffusax.programs import logs
  root = _root(gcs)
  lg = logs.Logger(root)
  for step in range(12):
    lg.scalars({"loss": 1.0 / (step + 1)}, step)
  lg.close()
  (name,) = storage.listdir(storage.join(root, "tb"))
  assert name.startswith("events.out.tfevents.")  # the name TensorBoard looks for
  evs = _events(b"".join(_parts(storage.join(root, "tb"))))
  scalars = [(e.step, v.tag, v.simple_value) for e in evs for v in e.summary.value]
  assert [s for s, _, _ in scalars] == list(range(12)) and {t for _, t, _ in scalars} == {"loss"}
  np.testing.assert_allclose([v for _, _, v in scalars], [1.0 / (s + 1) for s in range(12)], rtol=1e-6)


def test_an_events_file_on_gs_rolls_over_into_parts_of_bounded_size(gcs, monkeypatch):
  """An object cannot be appended to: each flush rewrites the current part, and a new part starts once
  one reaches PART_BYTES, so the parts concatenate to the stream and no flush uploads more than a part."""
  from diffusax.programs import logs
  monkeypatch.setattr(logs, "PART_BYTES", 300)
  folder = storage.join(_root(gcs), "tb")
  w = logs._ObjectEventsFactory().open(storage.join(folder, "events.out.tfevents.1.host"))
  chunks = [bytes([k]) * 70 for k in range(10)]
  for c in chunks:
    w.write(c)
    w.flush()
  w.close()
  parts = _parts(folder)
  assert b"".join(parts) == b"".join(chunks)
  # A part closes at the first flush at which it holds >= 300 bytes: 5 chunks of 70.
  assert [len(p) for p in parts] == [350, 350]


def test_checkpoints_on_gs_save_restore_verify_and_set_aside(gcs):
  import jax
  import jax.numpy as jnp
  from diffusax import checkpoint
  d = storage.join(_root(gcs), "checkpoints")
  ck = checkpoint.Checkpointer(d, keep=3, async_save=False, log=lambda m: None)
  state = {"w": jnp.arange(6.0), "b": jnp.ones((2, 3), jnp.int32)}
  for step in (1, 2):
    ck.save(step, jax.tree.map(lambda x: x * step, state), {"step": step})
  ck.wait()
  assert ck.all_steps() == [1, 2]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  got, meta = ck.restore(abstract)
  assert meta["step"] == 2
  np.testing.assert_array_equal(np.asarray(got["w"]), np.arange(6.0) * 2)
  # Damage step 2's meta (its recorded checksums): refused, then set aside with fallback to step 1.
  meta_file = storage.join(d, "2", "meta", "metadata")
  rec = storage.read_json(meta_file)
  rec["checksums"] = {k: "0" * len(v) for k, v in rec["checksums"].items()}
  storage.write_text(meta_file, json.dumps(rec))
  with pytest.raises(checkpoint.CheckpointCorrupted, match="is corrupted"):
    ck.restore(abstract)
  got, meta = ck.restore(abstract, fallback=True)
  assert meta["step"] == 1 and ck.all_steps() == [1]
  assert "2.corrupt" in storage.listdir(d)
  ck.close()


def test_classifier_cache_on_gs(gcs):
  from diffusax.evaluation import classifier_cache
  path = storage.join(_root(gcs), "cls", "v1_seed0.msgpack")
  calls = []

  def train():
    calls.append(1)
    return {"w": np.arange(3, dtype=np.float32)}, 0.9

  want = {"version": "v1", "seed": 0, "steps": 5}
  for _ in range(2):
    params, info = classifier_cache.load_or_train(path, want, {"w": np.zeros(3, np.float32)}, train,
                                                  lambda m: None, "test")
    np.testing.assert_array_equal(params["w"], np.arange(3))
    assert info["test_accuracy"] == 0.9 and info["path"] == path
  assert calls == [1]  # trained once, then read from the bucket


def test_an_embedded_tfds_set_built_on_gs_reads_like_the_local_one(gcs, tmp_path):
  """sklearn_digits built into data_dir=gs://...: array_record read through array_record's own GCS
  client; a copy killed before its marker is built again."""
  from diffusax.data import pipeline
  root = _root(gcs)
  local = pipeline.open_source("sklearn_digits", "test", str(tmp_path / "tfds"))
  remote = pipeline.open_source("sklearn_digits", "test", root)
  info = storage.join(root, "sklearn_digits", "1.0.0", "dataset_info.json")
  assert storage.committed(info)
  a, b = pipeline.read(local, np.arange(len(local))), pipeline.read(remote, np.arange(len(remote)))
  assert len(local) == len(remote) == 360
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["label"], b["label"])
  # An upload killed before its marker: the set is copied again (the marker comes back).
  storage.remove(info + storage.MARKER_SUFFIX)
  pipeline.open_source("sklearn_digits", "train", root)
  assert storage.committed(info)


def test_an_image_folder_prepared_into_gs_opens_whole(gcs, tmp_path):
  from PIL import Image
  from diffusax.data import pipeline, prepare
  images = tmp_path / "imgs"
  rng = np.random.default_rng(0)
  for cls in ("cat", "dog"):
    (images / cls).mkdir(parents=True)
    for i in range(6):
      Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / cls / f"{i}.png")
  root = _root(gcs)
  summary = prepare.prepare(str(images), "pets", 16, root, test_fraction=0.3, workers=1)
  marker = storage.join(root, "pets", "1.0.0", "diffusax_prepare.json")
  assert storage.committed(marker) and storage.read_json(marker)["num_examples"] == summary["num_examples"]
  src = pipeline.open_source("pets", "train", root)
  x = pipeline.read(src, np.arange(len(src)))
  assert x["image"].shape == (summary["num_examples"]["train"], 16, 16, 3) and set(x["label"]) == {0, 1}
  with pytest.raises(prepare.PrepareError, match="already exists"):
    prepare.prepare(str(images), "pets", 16, root, test_fraction=0.3, workers=1)
  with pytest.raises(prepare.PrepareError, match="bucket does not exist"):
    prepare.prepare(str(images), "pets", 16, "gs://no-such-bucket-x/d", test_fraction=0.3, workers=1)


def test_main_refuses_a_data_dir_in_a_missing_bucket_before_any_work(gcs, capsys):
  import ml_collections
  from diffusax import main
  c = ml_collections.ConfigDict({"data": {"data_dir": "gs://no-such-bucket-x/data"}})
  with pytest.raises(SystemExit) as e:
    main._check_data_dir(c)
  assert e.value.code == 2
  assert capsys.readouterr().err.strip() == ("diffusax: error: --config.data.data_dir=gs://no-such-bucket-x/data "
                                             "cannot be read: the bucket does not exist (or is not visible to "
                                             "these credentials)")
  c.data.data_dir = "gs://bkt/empty-prefix"
  main._check_data_dir(c)  # an existing bucket: fine, even where nothing is prepared yet
