"""data/prepare.py: a folder of the user's images built into a local TFDS dataset, then trained on.

The folder is written here with PIL (3 classes, JPEG/PNG/WebP of varied sizes and modes, one
truncated JPEG, one text file, one hidden file). Every expected example is derived independently
with PIL from the documented rule (EXIF orientation, RGB, short side -> size by bicubic,
centre crop), and every expected split from the documented sha256 formula.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from diffusax.data import pipeline, prepare, registry

SIZE = 16
CLASSES = ("zebra", "apple", "Mango")  # Created in this order; ImageFolder labels sort them by code point.
SHAPES = [(23, 31), (40, 17), (16, 16), (10, 12), (97, 61), (33, 33), (18, 50)]  # (w, h); (10, 12) is upscaled.
EXIF_ROTATED = "apple/rotated.jpg"  # EXIF orientation 6: shown rotated 90 degrees clockwise.
BAD = {"apple/broken.jpg", "zebra/readme.txt", "stray.png"}  # stray.png: outside the class folders.


def _write_folder(root):
  """3 classes x 14 images (+1 EXIF-rotated, +1 nested), the two bad files and a hidden one."""
  rng = np.random.default_rng(0)
  formats = [("png", {}), ("jpg", {"quality": 90}), ("webp", {"lossless": False, "quality": 80})]
  for c in CLASSES:
    os.makedirs(os.path.join(root, c, "nested"))
    for i in range(14):
      w, h = SHAPES[i % len(SHAPES)]
      ext, kw = formats[i % 3]
      im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
      if i == 4:
        im = im.convert("L")        # Grey JPEG/PNG/WebP: converted to RGB.
      if i == 5 and ext == "png":
        im = im.convert("P")        # Palette PNG.
      if i == 6:
        im = im.convert("RGBA")     # Alpha: dropped.
        ext, kw = "png", {}
      im.save(os.path.join(root, c, f"img{i:02d}.{ext}"), **kw)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(os.path.join(root, c, "nested", "deep.png"))
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(rng.integers(0, 256, (19, 41, 3), dtype=np.uint8)).save(os.path.join(root, EXIF_ROTATED),
                                                                         exif=exif.tobytes(), quality=95)
  buf = open(os.path.join(root, "apple", "img01.jpg"), "rb").read()
  open(os.path.join(root, "apple", "broken.jpg"), "wb").write(buf[:len(buf) // 2])  # Truncated JPEG.
  open(os.path.join(root, "zebra", "readme.txt"), "w").write("not an image\n")
  open(os.path.join(root, "Mango", ".DS_Store"), "wb").write(b"\0\1junk")  # Hidden: ignored.
  Image.new("RGB", (20, 20)).save(os.path.join(root, "stray.png"))


def _good_files(root):
  out = []
  for c in sorted(os.listdir(root)):
    for dirpath, _, files in os.walk(os.path.join(root, c)):
      out += [os.path.relpath(os.path.join(dirpath, f), root) for f in files if not f.startswith(".")]
  return sorted(f for f in out if f not in BAD)


def _reference(root, rel, size=SIZE):
  """Independent PIL derivation of one example: uint8 [size, size, 3]."""
  a = np.asarray(Image.open(os.path.join(root, rel)).convert("RGB"))
  if rel == EXIF_ROTATED:
    a = np.rot90(a, k=-1)  # Orientation 6 = rotate 90 degrees clockwise for display.
  h, w = a.shape[:2]
  nw = size if w <= h else round(w * size / h)
  nh = size if h <= w else round(h * size / w)
  r = np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((nw, nh), Image.Resampling.BICUBIC))
  top, left = (nh - size) // 2, (nw - size) // 2
  return r[top:top + size, left:left + size]


def _split(rel, seed, fraction):
  u = int.from_bytes(hashlib.sha256(f"{seed}:{rel}".encode()).digest()[:8], "big") / 2.0 ** 64
  return "test" if u < fraction else "train"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("images"))
  _write_folder(root)
  return root


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory):
  """The folder built with --on_error=skip at 16x16, test fraction 0.3."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  summary = prepare.prepare(folder, "my_pets", SIZE, data_dir, on_error="skip", test_fraction=0.3, seed=0)
  return {"data_dir": data_dir, "summary": summary}


def test_refuse_names_the_bad_files_and_writes_nothing(folder, tmp_path):
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(prepare.PrepareError) as e:
    prepare.prepare(folder, "refused", SIZE, data_dir)
  msg = str(e.value)
  assert all(b in msg for b in BAD) and ".DS_Store" not in msg and "--on_error=skip" in msg
  assert not os.path.exists(data_dir)


def test_skip_builds_every_good_file_once_with_its_label_pixels_and_split(folder, built):
  s, data_dir = built["summary"], built["data_dir"]
  good = _good_files(folder)
  assert len(good) == 3 * 15 + 1
  names = sorted(CLASSES)
  assert s["class_names"] == names and sorted(f for f, _ in s["skipped"]) == sorted(BAD)
  b = registry.prepared_builder("my_pets", data_dir)
  assert b.info.features["label"].names == names
  with open(os.path.join(data_dir, "my_pets", "1.0.0", registry.PREPARED_MARKER)) as f:
    assert json.load(f)["skipped"] == s["skipped"]
  want = {_reference(folder, f).tobytes(): f for f in good}
  assert len(want) == len(good)  # Distinct images: each example identifies its file.
  seen = {}
  for split in ("train", "test"):
    src = pipeline.open_source("my_pets", split, data_dir)
    batch = pipeline.read(src, np.arange(len(src)))
    assert batch["image"].shape == (len(src), SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
    for im, lb in zip(batch["image"], batch["label"]):
      f = want.get(im.tobytes())
      assert f is not None, "an example that equals no independently resized file"
      assert f not in seen, f"{f} stored twice"
      seen[f] = split
      assert names[int(lb)] == f.split("/")[0]
  assert sorted(seen) == good
  assert seen == {f: _split(f, 0, 0.3) for f in good}
  assert s["num_examples"] == {k: sum(v == k for v in seen.values()) for k in ("train", "test")}
  assert s["num_examples"]["test"] >= 8 and s["num_examples"]["train"] >= 8  # Enough for batch 8 below.


def test_describe_and_an_unlabelled_jpeg_build(folder, built, tmp_path):
  d = registry.describe("my_pets", built["data_dir"])
  assert (d.shape, d.num_classes, d.transform) == ((SIZE, SIZE, 3), 3, "image")
  flat = tmp_path / "flat"
  flat.mkdir()
  rng = np.random.default_rng(1)
  yy, xx = np.mgrid[0:30, 0:40]
  for i in range(12):  # Smooth images: JPEG q95 keeps them close to the reference.
    f = rng.uniform(0.3, 1.2, (3, 2))
    a = np.stack([127.5 + 120 * np.sin(2 * np.pi * (xx / 40 * f[c, 0] + yy / 30 * f[c, 1]) + i) for c in range(3)],
                 -1).round().astype(np.uint8)
    Image.fromarray(a[:, :30 + i] if i % 2 else a).save(flat / f"{i}.{['png', 'jpg', 'webp'][i % 3]}", quality=95)
  s = prepare.prepare(str(flat), "flat", 24, str(tmp_path / "tfds"), encoding="jpeg", test_fraction=0.5, seed=1)
  assert s["class_names"] is None
  d = registry.describe("flat", str(tmp_path / "tfds"))
  assert (d.shape, d.num_classes) == ((24, 24, 3), None)
  refs = {f"{i}.{['png', 'jpg', 'webp'][i % 3]}": _reference(str(flat), f"{i}.{['png', 'jpg', 'webp'][i % 3]}", 24)
          for i in range(12)}
  for split in ("train", "test"):
    src = pipeline.open_source("flat", split, str(tmp_path / "tfds"))
    batch = pipeline.read(src, np.arange(len(src)))
    assert "label" not in batch
    for im in batch["image"]:
      err = {f: np.abs(im.astype(float) - r).mean() for f, r in refs.items()}
      f = min(err, key=err.get)
      assert err[f] < 3.0 and sorted(err.values())[1] > 10 * err[f]  # Close to one file, far from the rest.
      assert _split(f, 1, 0.5) == split


def test_cli_refuses_in_one_line_with_status_2(folder, tmp_path):
  data_dir = tmp_path / "tfds"
  p = subprocess.run([sys.executable, "-m", "diffusax.data.prepare", f"--images={folder}", "--name=cli",
                      "--size=16", f"--data_dir={data_dir}"], capture_output=True, text=True, timeout=120)
  lines = p.stderr.strip().splitlines()
  assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("diffusax: error: "), p.stderr
  assert all(b in lines[0] for b in BAD) and not data_dir.exists() and p.stdout == ""


@pytest.mark.parametrize("args, needle", [
    (["--name=x"], "--images is required"),
    (["--images={folder}"], "--name is required"),
    (["--images={missing}", "--name=x"], "does not exist"),
    (["--images={empty}", "--name=x"], "holds no files"),
    (["--images={folder}", "--name=x", "--size=4"], "must be >= 8"),
    (["--images={folder}", "--name=sklearn_digits"], "embedded dataset"),
    (["--images={folder}", "--name=Bad-Name"], "lower case"),
    (["--images={folder}", "--name=my_pets", "--data_dir={data_dir}"], "already exists"),
    (["--images={folder}", "--name=foreign", "--data_dir={data_dir}", "--overwrite"], "not made by"),
    (["--images={folder}", "--name=x", "--on_error=maybe"], "--on_error=maybe"),
    (["--images={folder}", "--name=x", "--test_fraction=1"], "[0, 1)"),
    (["--images={folder}", "--name=x", "--sizee=3"], "sizee"),
])
def test_bad_flags_one_line_status_2(args, needle, folder, built, tmp_path, capsys):
  os.makedirs(tmp_path / "empty")
  os.makedirs(os.path.join(built["data_dir"], "foreign", "1.0.0"), exist_ok=True)  # A dataset of someone else.
  fill = {"folder": folder, "missing": str(tmp_path / "nope"), "empty": str(tmp_path / "empty"),
          "data_dir": built["data_dir"]}
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    prepare.main(["prepare"] + [a.format(**fill) for a in args])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1 and err[0].startswith("diffusax: error: ") and needle in err[0], err
  assert os.path.isdir(os.path.join(built["data_dir"], "foreign", "1.0.0"))  # Never replaced.


def _nothing_opens(name, data_dir):
  assert registry.prepared_builder(name, data_dir) is None
  with pytest.raises(pipeline.DataError):
    pipeline.open_source(name, "train", data_dir)


def test_a_failed_build_leaves_nothing(folder, tmp_path):
  data_dir = str(tmp_path / "tfds")
  calls = []

  def interrupted(path, size):
    calls.append(path)
    if len(calls) == 10:
      raise KeyboardInterrupt  # Ctrl-C half-way through the conversion.
    return prepare.load(path, size)

  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(folder, "failed", SIZE, data_dir, on_error="skip", test_fraction=0.3, convert=interrupted)
  assert os.listdir(data_dir) == []
  _nothing_opens("failed", data_dir)

  def fails_once(path, size):
    if path.endswith("img03.png"):
      raise OSError(28, "No space left on device")
    return prepare.load(path, size)

  no_bad = tmp_path / "no_bad"
  os.makedirs(no_bad / "a")
  for f in ("img03.png", "img00.png", "img01.jpg"):
    os.link(os.path.join(folder, "zebra", f), no_bad / "a" / f)
  with pytest.raises(prepare.PrepareError, match="img03.png failed to convert: No space left"):
    prepare.prepare(str(no_bad), "failed", SIZE, data_dir, convert=fails_once, test_fraction=0.0)
  assert os.listdir(data_dir) == []
  _nothing_opens("failed", data_dir)


_KILLED = """
import os, sys, time
from diffusax.data import prepare
def stuck(path, size):
  if path.endswith("img07.jpg"):
    open(sys.argv[3], "w").close()
    time.sleep(600)
  return prepare.load(path, size)
prepare.prepare(sys.argv[1], "killed", 16, sys.argv[2], on_error="skip", test_fraction=0.3, workers=1,
                convert=stuck)
"""


def test_a_killed_build_leaves_nothing_that_opens_and_is_cleaned_by_the_next(folder, tmp_path):
  data_dir, flag = str(tmp_path / "tfds"), str(tmp_path / "stuck")
  p = subprocess.Popen([sys.executable, "-c", _KILLED, folder, data_dir, flag])
  try:
    deadline = time.time() + 120
    while not os.path.exists(flag) and p.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    assert os.path.exists(flag), "the build never reached the conversion"
  finally:
    p.send_signal(signal.SIGKILL)
    p.wait()
  left = os.listdir(data_dir)
  assert len(left) == 1 and left[0].startswith(".prepare-killed."), left  # Only the temporary folder.
  _nothing_opens("killed", data_dir)
  no_bad = tmp_path / "small"
  os.makedirs(no_bad)
  for f in ("img00.png", "img01.jpg", "img02.webp"):
    os.link(os.path.join(folder, "zebra", f), no_bad / f)
  s = prepare.prepare(str(no_bad), "killed", SIZE, data_dir, test_fraction=0.0)
  assert os.listdir(data_dir) == ["killed"] and s["num_examples"] == {"train": 3}
  os.remove(no_bad / "img00.png")
  s = prepare.prepare(str(no_bad), "killed", SIZE, data_dir, test_fraction=0.0, overwrite=True)
  assert os.listdir(data_dir) == ["killed"] and len(pipeline.open_source("killed", "train", data_dir)) == 2


def test_trains_end_to_end_on_the_built_dataset(built, tmp_path):
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
  import digits as digits_config
  from diffusax.programs import settings as settings_lib
  from diffusax.programs import train
  c = digits_config.get_config()
  over = {"data.name": "my_pets", "data.data_dir": built["data_dir"], "model.unet.base_channels": 8,
          "model.unet.channel_mult": (1,), "model.unet.attn_resolutions": (), "model.unet.num_res_blocks": 1,
          "model.unet.num_groups": 4, "train.batch_size": 8, "train.num_steps": 3, "train.log_every": 1,
          "train.eval_batches": 1,
          "sample.num_steps": 2, "sample.per_class": 1, "sample.guidance_scale": 2.0}
  for k, v in over.items():
    a, b = k.rsplit(".", 1)
    node = c
    for part in a.split("."):
      node = node[part]
    node[b] = v
  wd = str(tmp_path / "run")
  result = train.train_and_evaluate(settings_lib.parse(c), wd)
  assert result["step"] == 3 and np.isfinite(result["eval_loss_ema"]) and np.isfinite(result["train_loss_last"])
  with Image.open(result["samples"]) as grid:
    assert grid.mode in ("RGB", "RGBA") and min(grid.size) >= SIZE
  with open(os.path.join(wd, "metrics.json")) as f:
    assert json.load(f)["step"] == 3
