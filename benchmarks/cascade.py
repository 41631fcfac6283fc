"""Image-conditioned diffusion on `photos`: the cascade (16x16 base, then 16 -> 32 super-resolution) against a
single-stage 32x32 model, the CDM augmentation ablation, super-resolution against bicubic, colourisation
and trained inpainting.

    # the runs (each its own workdir; commands in the README, "Image-conditioned diffusion and cascades"):
    python -m diffusax.main --config=configs/photos_base16.py --workdir=runs/photos_base16
    python -m diffusax.main --config=configs/photos_sr.py --workdir=runs/photos_sr
    python -m diffusax.main --config=configs/photos_sr.py --workdir=runs/photos_sr_noaug \\
        --config.task.aug_max=0 --config.sample.aug_level=0
    python -m diffusax.main --config=configs/photos_colorize.py --workdir=runs/photos_colorize
    python -m diffusax.main --config=configs/photos_inpaint.py --workdir=runs/photos_inpaint
    # the cascade evaluated at each sampling level s (and the model without augmentation at s = 0):
    for s in 0 0.05 0.1 0.2 0.3; do python -m diffusax.main --config=configs/photos_cascade.py \\
        --workdir=runs/photos_sr --mode=eval --config.sample.aug_level=$s; done
    python -m diffusax.main --config=configs/photos_cascade.py --workdir=runs/photos_sr_noaug --mode=eval \\
        --config.task.aug_max=0 --config.sample.aug_level=0
    python benchmarks/cascade.py --runs=runs [--out=benchmarks/cascade.json]

Reads what the runs wrote (metrics.json: the held-out task metrics and the training history; eval/*.json:
fd_photos and class accuracy of each evaluated job) and measures in this process the train FLOPs per step
of each stage and of the single-stage model (XLA's cost analysis of the program's own compiled step, on
random data of each shape), so that compute can be compared.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402

STAGES = {  # name -> (config, data shape): the programs' own steps, on random data of that shape.
    "photos (single stage, 32x32)": ("photos", (32, 32, 3)),
    "photos_base16 (16x16)": ("photos_base16", (16, 16, 3)),
    "photos_sr (16 -> 32)": ("photos_sr", (32, 32, 3)),
}


def train_flops() -> dict:
  """FLOPs of one train step (XLA's cost analysis) of each stage, its batch and FLOPs per image."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from diffusax.programs import train
  from diffusax.training import step as step_lib
  out = {}
  first = True
  for name, (cfg, shape) in STAGES.items():
    c = harness.load_config(cfg)
    if first:
      harness.apply_runtime(c)
      first = False
    s = harness.settings(c)
    u = harness.setup_without_data(s, shape, 10)
    s = u.s
    fn = step_lib.make_train_step(u.module.apply, u.tx, u.lr_fn, u.schedule, s.loss, s.ema_decays, s.ema_warmup,
                                  cond=train.cond_config(u))
    b = s.train.batch_size
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(b,) + shape).astype(np.float32)), "label": jnp.zeros((b,), jnp.int32)}
    if u.cond_shape is not None:
      batch["cond_image"] = jnp.asarray(rng.normal(size=(b,) + tuple(u.cond_shape)).astype(np.float32))
    compiled = jax.jit(fn).lower(u.abstract_state, batch).compile()
    flops = float(compiled.cost_analysis()["flops"])
    out[name] = {"config": f"configs/{cfg}.py", "batch": b, "steps": s.train.num_steps, "flops_per_step": flops,
                 "flops_per_image": flops / b, "train_flops": flops * s.train.num_steps}
  return out


def _evals(wd: str) -> list:
  rows = []
  for path in sorted(glob.glob(os.path.join(wd, "eval", "eval_*.json"))):
    ev = json.load(open(path))
    rows.append({"file": path, "samples_dir": ev.get("samples_dir"), "metrics": ev.get("metrics"),
                 "num_samples": ev.get("num_samples")})
  return rows


def collect(runs: str) -> dict:
  out = {}
  for name in ("photos_base16", "photos_sr", "photos_sr_noaug", "photos_colorize", "photos_inpaint", "photos_pixel",
               "photos"):
    wd = os.path.join(runs, name)
    if not os.path.exists(os.path.join(wd, "metrics.json")):
      continue
    m = json.load(open(os.path.join(wd, "metrics.json")))
    hist = m.get("history", [])
    secs, prev = 0.0, 0
    for h in hist:
      secs += (h["step"] - prev) / max(h["steps_per_s"], 1e-9)
      prev = h["step"]
    out[name] = {"workdir": wd, "step": m["step"], "train_loop_seconds": round(secs, 1), "task": m.get("task"),
                 "evals": _evals(wd)}
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--runs", default="runs", help="the folder holding the runs' workdirs")
  p.add_argument("--out", default=os.path.join(HERE, "cascade.json"))
  a = p.parse_args()
  out = {"runs": collect(a.runs), "train_flops": train_flops()}
  with open(a.out, "w") as f:
    json.dump(out, f, indent=1)
  print(json.dumps(out["train_flops"], indent=1))


if __name__ == "__main__":
  main()
