"""Post-hoc EMA and autoguidance, measured (issue #20).

  digits_phema  configs/digits.py trained with four power-function EMAs (sigma_rel 0.05, 0.10 used for
                the reconstruction; 0.075 and 0.15 trained as checks) and a snapshot every 100 steps;
                then the sweep: fd_digits of 900 samples for 8 sigma_rel reconstructed from the 0.05/0.10
                snapshots, with the trained 0.075/0.15 EMAs evaluated beside their reconstructions and
                the relative parameter distance of the two (= --mode=phema_sweep).
  digits_guide  fd_digits and class accuracy over w for no guidance (w = 0), CFG, and autoguidance by
                configs/digits_small.py (8x fewer parameters, 4x fewer steps), each best w marked.
  toy2d_guide   class-conditional toy2d (8 Gaussians, std 0.1, radius 2): main MLP 256x3, 3000 steps;
                guide MLP 64x2, 300 steps; over w: FD of the raw points against 4096 test points, class
                accuracy (nearest mode = label), and the fraction of samples outside every mode's
                3-sigma disk (|x - mu_k| > 0.3 for all k: the low-density "outliers" of EDM2's toy);
                a PNG of the three sample clouds at their best w.

    .venv/bin/python benchmarks/phema_autoguidance.py --workdir=runs/bench20 [--parts digits_phema,...]

Writes benchmarks/phema_autoguidance.json, WORKDIR/digits/phema/sweep.png and
benchmarks/toy2d_guidance.png. Everything runs through the programs' APIs (the same code as the
--mode=train / phema_sweep / eval commands in the README).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "configs"))

W_GRID = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)


def _parse(c):
  from diffusax.programs import settings as settings_lib
  return settings_lib.parse(c)


def digits_phema(wd: str, data_dir: str) -> dict:
  import digits
  from diffusax.programs import evaluate, phema, train
  c = digits.get_config()
  c.data.data_dir = data_dir
  c.ema.sigma_rels = (0.05, 0.1, 0.075, 0.15)
  c.ema.snapshot_every = 100
  c.eval.metrics = ("fd", "class_accuracy")
  t0 = time.perf_counter()
  out = train.train_and_evaluate(_parse(c), wd)
  train_s = time.perf_counter() - t0
  c.ema.reconstruct_from = (0.05, 0.1)
  c.ema.sweep = (0.03, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25)
  t0 = time.perf_counter()
  res = phema.sweep(_parse(c), wd, evaluate.Evaluator)
  return {"train_seconds": round(train_s, 1), "snapshots": out["ema_snapshots"], "sweep": res,
          "sweep_seconds": round(time.perf_counter() - t0, 1)}


def _best(rows, key, lower=True):
  """The guided row (w > 0) with the best `key`; w = 0, the unguided model, is reported as "none"."""
  rows = [r for r in rows if r["w"] > 0]
  vals = [r[key] for r in rows]
  i = min(range(len(vals)), key=lambda j: vals[j] if lower else -vals[j])
  return rows[i]


def digits_guide(wd: str, data_dir: str) -> dict:
  import dataclasses
  import digits
  import digits_small
  from diffusax.programs import evaluate, setup as setup_lib, train
  from diffusax.programs.logs import Logger
  small_wd = wd + "_small"
  c = digits_small.get_config()
  c.data.data_dir = data_dir
  t0 = time.perf_counter()
  train.train_and_evaluate(_parse(c), small_wd)
  guide_train_s = time.perf_counter() - t0
  c = digits.get_config()
  c.data.data_dir = data_dir
  c.eval.metrics = ("fd", "class_accuracy")
  s = _parse(c)
  u = setup_lib.model_setup(s)
  logger = Logger(wd, enabled=False)
  params, step = setup_lib.restore_ema(u, wd)
  out = {"guide_train_seconds": round(guide_train_s, 1), "cfg": [], "auto": []}
  sg = dataclasses.replace(s, sample=dataclasses.replace(s.sample, guide_workdir=small_wd))
  guide = setup_lib.restore_guide(setup_lib.model_setup(sg), logger)
  for kind in ("cfg", "auto"):
    for w in W_GRID:
      if kind == "auto" and w == 0.0:
        continue  # w = 0 is the unguided model either way (measured under cfg)
      sw = dataclasses.replace(sg if kind == "auto" else s,
                               sample=dataclasses.replace((sg if kind == "auto" else s).sample, guidance_scale=w))
      uw = dataclasses.replace(u, s=setup_lib.settings_lib.with_null_class(sw, u.num_classes))
      ev = evaluate.Evaluator(uw, guide=guide if kind == "auto" else None)
      m = ev.evaluate(params, step, os.path.join(wd, "guidance", kind), logger)["metrics"]
      out[kind].append({"w": w, **m})
      print(kind, w, m, flush=True)
  key = "fd_digits"
  out["best"] = {k: _best(out[k], key) for k in ("cfg", "auto")}
  out["none"] = out["cfg"][0]
  return out


def _toy_config(data_dir, hidden, depth, steps):
  import toy2d
  c = toy2d.get_config()
  c.data.data_dir = data_dir
  c.model.class_conditional = True
  c.guidance.label_dropout = 0.1
  c.model.mlp.hidden, c.model.mlp.depth = hidden, depth
  c.train.num_steps = steps
  c.train.ckpt_every = steps
  return c


def toy2d_guide(wd: str, data_dir: str) -> dict:
  import dataclasses
  import numpy as np
  from diffusax.data import sources
  from diffusax.evaluation import distances
  from diffusax.programs import setup as setup_lib, train
  from diffusax.programs.logs import Logger
  from diffusax.sampling import generate, job as job_lib
  main_wd, guide_wd = wd + "_main", wd + "_guide"
  t0 = time.perf_counter()
  train.train_and_evaluate(_parse(_toy_config(data_dir, 256, 3, 3000)), main_wd)
  train.train_and_evaluate(_parse(_toy_config(data_dir, 64, 2, 300)), guide_wd)
  train_s = time.perf_counter() - t0
  c = _toy_config(data_dir, 256, 3, 3000)
  c.sample.num_samples = c.sample.shard_size = 4096
  s = _parse(c)
  u = setup_lib.model_setup(s)
  logger = Logger(wd, enabled=False)
  params, step = setup_lib.restore_ema(u, main_wd)
  sg = dataclasses.replace(s, sample=dataclasses.replace(s.sample, guide_workdir=guide_wd))
  guide = setup_lib.restore_guide(setup_lib.model_setup(sg), logger)
  test = sources.toy_gmm2d(seed=1)
  real = test.arrays["x"][:4096].astype(np.float64)
  angles = 2 * np.pi * np.arange(8) / 8
  modes = 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1)
  # Which label is which mode: the data's own (nearest mode of each real point, majority per label).
  lab_real = test.arrays["label"][:4096]
  near_real = np.argmin(((real[:, None] - modes[None]) ** 2).sum(-1), 1)
  mode_of = {k: int(np.bincount(near_real[lab_real == k], minlength=8).argmax()) for k in range(8)}
  out = {"train_seconds": round(train_s, 1), "cfg": [], "auto": []}
  clouds = {}
  for kind in ("cfg", "auto"):
    for w in W_GRID:
      if kind == "auto" and w == 0.0:
        continue
      base = sg if kind == "auto" else s
      sw = dataclasses.replace(base, sample=dataclasses.replace(base.sample, guidance_scale=w))
      uw = dataclasses.replace(u, s=setup_lib.settings_lib.with_null_class(sw, u.num_classes))
      spec = setup_lib.job_spec(uw, step, guide=guide if kind == "auto" else None)
      d = os.path.join(wd, "samples", f"{kind}_w{w:g}")
      setup_lib.run_sample_job(uw, params, spec, d, logger, guide=guide if kind == "auto" else None)
      got = job_lib.load(d)
      x = got["samples"].astype(np.float64)
      dist = np.sqrt(((x[:, None] - modes[None]) ** 2).sum(-1))
      row = {"w": w, "fd": distances.frechet_distance_from_features(x, real),
             "class_accuracy": float(np.mean(np.argmin(dist, 1) == np.vectorize(mode_of.get)(got["labels"]))),
             "outlier_fraction": float(np.mean(dist.min(1) > 0.3))}
      out[kind].append(row)
      clouds[(kind, w)] = x
      print(kind, row, flush=True)
  out["best"] = {k: _best(out[k], "fd") for k in ("cfg", "auto")}
  out["none"] = out["cfg"][0]
  panels = [("no guidance", clouds[("cfg", 0.0)]), (f"CFG w={out['best']['cfg']['w']:g}",
            clouds[("cfg", out["best"]["cfg"]["w"])]), (f"autoguidance w={out['best']['auto']['w']:g}",
            clouds[("auto", out["best"]["auto"]["w"])])]
  from PIL import Image, ImageDraw
  imgs = []
  for title, x in panels:
    im = Image.fromarray(np.repeat(generate.scatter_image(x.astype(np.float32)), 3, -1))
    ImageDraw.Draw(im).text((6, 4), title, fill=(200, 0, 0))
    imgs.append(np.asarray(im))
  path = os.path.join(HERE, "toy2d_guidance.png")
  generate.save_png(path, np.concatenate(imgs, 1))
  out["png"] = os.path.relpath(path, ROOT)
  return out


PARTS = {"digits_phema": digits_phema, "digits_guide": digits_guide, "toy2d_guide": toy2d_guide}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", default="runs/bench20")
  ap.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
  ap.add_argument("--parts", default=",".join(PARTS))
  a = ap.parse_args()
  from diffusax import main as diffusax_main  # noqa: F401 - sets the CPU conv flag like the CLI does
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + diffusax_main._CPU_EIGEN_FLAG).strip()
  path = os.path.join(HERE, "phema_autoguidance.json")
  result = json.load(open(path)) if os.path.exists(path) else {}
  for name in a.parts.split(","):
    wd = os.path.join(a.workdir, "digits" if name.startswith("digits") else "toy2d")
    t0 = time.perf_counter()
    result[name] = PARTS[name](wd, a.data_dir)
    result[name]["seconds"] = round(time.perf_counter() - t0, 1)
    result[name]["date"] = time.strftime("%Y-%m-%d")
    json.dump(result, open(path, "w"), indent=1, default=float)
  print(json.dumps({k: v.get("best", v.get("sweep", {}).get("best")) for k, v in result.items()}, indent=1,
                   default=float))


if __name__ == "__main__":
  main()
