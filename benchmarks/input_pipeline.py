"""Input pipeline throughput (images/s) against the old hand-written iterator and the train step.

  folder     An image-folder dataset of JPEG crops of the `photos` sources at 256x256 (class
             sub-folders = source photograph), built with `python -m diffusax.data.prepare
             --encoding=jpeg --size=256`, read uncached (every example is decoded from JPEG, as on
             ImageNet-scale data), random crop + flip, resized to 64x64: the grain `Loader` with
             workers 0, 1, 2 against `old`, the former `BatchIterator` (main thread, read + the
             same transform, no read-ahead), written out here as the baseline.
  consumer   Images/s the train step consumes on this CPU: configs/cifar10.py (35.7M U-Net, batch 8)
             and its base-32 variant (batch 16), random data, after compile.
  digits     Seconds per digits README train step (configs/digits.py: batch 64) fed by the Loader
             (workers 0, prefetch 2) against the old iterator, alternating, same compiled step.

    .venv/bin/python benchmarks/input_pipeline.py [--images 2048] [--batches 30] [--repeats 3]

Writes benchmarks/input_pipeline.json and prints a table. The machine may be shared: ratios are
within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import harness


def photo_crops_folder(root: str, n: int, size: int = 256) -> str:
  """n JPEG crops (size x size, quality 90) of the photographs shipped in scikit-image and scikit-learn."""
  import numpy as np
  from PIL import Image
  from skimage import data as skd
  from sklearn.datasets import load_sample_images
  photos = {k: getattr(skd, k)() for k in ("astronaut", "chelsea", "coffee", "hubble_deep_field",
                                           "immunohistochemistry", "retina", "rocket")}
  left, right, _ = skd.stereo_motorcycle()
  photos["motorcycle_left"], photos["motorcycle_right"] = left, right
  for name, im in zip(("china", "flower"), load_sample_images().images):
    photos[name] = im
  rng = np.random.default_rng(0)
  names = sorted(photos)
  for i in range(n):
    name = names[i % len(names)]
    im = photos[name]
    h, w = im.shape[:2]
    side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
    top, lft = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(np.ascontiguousarray(im[top:top + side, lft:lft + side, :3]))
    os.makedirs(os.path.join(root, name), exist_ok=True)
    crop.resize((size, size), Image.Resampling.BILINEAR).save(os.path.join(root, name, f"{i:05d}.jpg"), quality=90)
  return root


class OldIterator:
  """The former main-thread iterator: read the batch's rows, then transform them."""

  def __init__(self, source, batch, seed, transform):
    import numpy as np
    self.source, self.batch, self.seed, self.transform, self.b = source, batch, seed, transform, 0
    self.n = len(source) // batch
    self.np = np

  def __next__(self):
    from diffusax.data import pipeline
    e, j = divmod(self.b, self.n)
    idx = self.np.random.default_rng([self.seed, e]).permutation(len(self.source))[j * self.batch:(j + 1) * self.batch]
    self.b += 1
    return self.transform(pipeline.read(self.source, idx), self.seed, self.np.full(len(idx), e), idx)


def rate(it, batches: int, batch: int) -> float:
  next(it)  # start-up (workers, first read) excluded
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch / (time.perf_counter() - t)


def folder_case(args, tmp: str) -> dict:
  from diffusax.data import pipeline, registry
  folder = photo_crops_folder(os.path.join(tmp, "images"), args.images)
  data_dir = os.path.join(tmp, "tfds")
  t = time.perf_counter()
  subprocess.run([sys.executable, "-m", "diffusax.data.prepare", f"--images={folder}", "--name=bench_photos256",
                  "--size=256", f"--data_dir={data_dir}", "--encoding=jpeg"], check=True, stdout=subprocess.DEVNULL)
  build_s = time.perf_counter() - t
  source = registry.prepared_builder("bench_photos256", data_dir).as_data_source(split="train")  # uncached
  tf = pipeline.ImageTransform(image_size=64, random_flip=True, random_crop=True, crop_min_scale=0.35)
  out = {"examples": len(source), "build_s": build_s, "batch": args.batch, "images_per_s": {}}
  for rep in range(args.repeats):
    for name in ("old", "workers_0", "workers_1", "workers_2"):
      if name == "old":
        r = rate(OldIterator(source, args.batch, 0, tf), args.batches, args.batch)
      else:
        it = pipeline.Loader(source, args.batch, 0, transform=tf, workers=int(name[-1]), prefetch=4)
        r = rate(it, args.batches, args.batch)
        it.close()
      out["images_per_s"].setdefault(name, []).append(r)
  out["median_images_per_s"] = {k: statistics.median(v) for k, v in out["images_per_s"].items()}
  return out


def consumer_case(args) -> dict:
  import jax
  import numpy as np

  from diffusax.programs import train
  out = {}
  for name, over, batch in (("cifar10", {}, 8), ("cifar10_base32", {"model.unet.base_channels": 32}, 16)):
    c = harness.load_config("cifar10", {**over, "train.batch_size": batch, "mesh.shape": (1, 1),
                                        "model.dtype": "float32"})
    harness.apply_runtime(c)
    u = harness.setup_without_data(harness.settings(c), (32, 32, 3), 10, devices=jax.devices()[:1])
    runner = train.make_runner(u)
    state = runner.to_run(train.init_state(u))
    rng = np.random.default_rng(0)
    host = {"x": rng.uniform(-1, 1, (batch, 32, 32, 3)).astype(np.float32),
            "label": rng.integers(0, 10, batch).astype(np.int32)}
    state, m = runner.step(state, host)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.consumer_steps):
      t = time.perf_counter()
      state, m = runner.step(state, host)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
    s = statistics.median(times)
    out[name] = {"batch": batch, "step_s": s, "images_per_s": batch / s}
  return out


def digits_case(args) -> dict:
  import jax

  from diffusax.data import pipeline
  from diffusax.programs import train
  c = harness.load_config("digits", {"mesh.shape": (1, 1)})
  c.data.data_dir = args.data_dir
  harness.apply_runtime(c)
  u = train.setup(harness.settings(c), devices=jax.devices()[:1])
  runner = train.make_runner(u)
  box = {"state": runner.to_run(train.init_state(u))}
  tf = pipeline.make_transform(u.data.transform, u.s.data, train=True)
  feeds = {"old": lambda: OldIterator(u.source, u.s.train.batch_size, u.s.seed, tf),
           "grain": lambda: train.make_iterator(u)}
  per_step = {k: [] for k in feeds}
  for _ in range(args.repeats):
    for name, make in feeds.items():
      it = make()
      box["state"], m = runner.step(box["state"], next(it))
      jax.block_until_ready(m)
      t = time.perf_counter()
      for _ in range(args.digits_steps):
        box["state"], m = runner.step(box["state"], next(it))
      jax.block_until_ready(m)
      per_step[name].append((time.perf_counter() - t) / args.digits_steps)
      if hasattr(it, "close"):
        it.close()
  med = {k: statistics.median(v) for k, v in per_step.items()}
  return {"steps": args.digits_steps, "step_s": per_step, "median_step_s": med,
          "grain_over_old": med["grain"] / med["old"]}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--images", type=int, default=2048)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--consumer_steps", type=int, default=5)
  p.add_argument("--digits_steps", type=int, default=200)
  p.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
  p.add_argument("--cases", default="folder,consumer,digits")
  args = p.parse_args()
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  result = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": harness.cpu_model(), "cores": os.cpu_count(),
            "args": vars(args)}
  with tempfile.TemporaryDirectory() as tmp:
    if "folder" in args.cases:
      result["folder"] = folder_case(args, tmp)
  if "consumer" in args.cases:
    result["consumer"] = consumer_case(args)
  if "digits" in args.cases:
    result["digits"] = digits_case(args)
  if "folder" in result and "consumer" in result:
    med = result["folder"]["median_images_per_s"]
    result["ratios"] = {f"{k}_over_old": v / med["old"] for k, v in med.items()}
    for c, v in result["consumer"].items():
      result["ratios"].update({f"{k}_over_{c}_step": r / v["images_per_s"] for k, r in med.items()})
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "input_pipeline.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps({k: result[k] for k in result if k in ("ratios", "digits", "consumer")}, indent=1))
  if "folder" in result:
    print("folder images/s (median):", {k: round(v, 1) for k, v in result["folder"]["median_images_per_s"].items()})


if __name__ == "__main__":
  main()
