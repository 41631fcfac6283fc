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
    # single-stage 32x32 models: the cascade's compute (1132 steps) and the inpainting model's (900 steps)
    python -m diffusax.main --config=configs/photos.py --workdir=runs/photos_pixel1132 --config.train.num_steps=1132
    python -m diffusax.main --config=configs/photos.py --workdir=runs/photos_pixel
    # the cascade evaluated at each sampling level s (and the model without augmentation at s = 0):
    for s in 0 0.05 0.1 0.2 0.3; do python -m diffusax.main --config=configs/photos_cascade.py \\
        --workdir=runs/photos_sr --mode=eval --config.sample.aug_level=$s; done
    python -m diffusax.main --config=configs/photos_cascade.py --workdir=runs/photos_sr_noaug --mode=eval \\
        --config.task.aug_max=0 --config.sample.aug_level=0
    python benchmarks/cascade.py --runs=runs --skip=task_metrics [--repaint_runs=photos_pixel,photos_pixel1132] [--out=...]

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

import numpy as np

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
  """Every evaluated sampler setting of a run: the eval.json beside each samples directory (one per setting;
  WORKDIR/eval/eval_<step>.json holds only the latest evaluation of a step)."""
  rows = []
  for path in sorted(glob.glob(os.path.join(wd, "eval", "*", "eval.json"))):
    ev = json.load(open(path))
    rows.append({"file": path, "samples_dir": ev.get("samples_dir"), "metrics": ev.get("metrics"),
                 "num_samples": ev.get("num_samples"), "seconds": ev.get("seconds")})
  return rows


def collect(runs: str) -> dict:
  out = {}
  for name in ("photos_base16", "photos_sr", "photos_sr_noaug", "photos_colorize", "photos_inpaint", "photos_pixel",
               "photos_pixel1132", "photos"):
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


def _features():
  from diffusax.evaluation import photos_classifier as mod
  from diffusax.programs import settings as settings_lib
  data_dir = os.path.expanduser(settings_lib.parse(harness.load_config("photos")).data.data_dir)
  params, _ = mod.load_or_train(data_dir)
  return lambda images: np.asarray(mod.apply(params, images)[1])


def _restore(cfg: str, wd: str, overrides: dict | None = None):
  from diffusax.programs import setup as setup_lib
  s = harness.settings(harness.load_config(cfg, overrides))
  u = setup_lib.model_setup(s)
  params, step = setup_lib.restore_ema(u, wd, -1)
  return u, params, step


CHUNK = 250  # examples per sampler call


def _generate(u, params, batch: dict) -> np.ndarray:
  """The task model's samples (its config's sampler) for every example of `batch`, in chunks, the noise of
  example i drawn from its index i (as `setup_task.generate_for` does for one call)."""
  import jax
  import jax.numpy as jnp
  from diffusax.programs import setup_task
  s, gen = u.s, setup_task.make_generator(u)
  key = jax.random.fold_in(jax.random.key(s.seed), 0x7A5C)
  outs = []
  for lo in range(0, len(batch["x"]), CHUNK):
    idx = np.arange(lo, min(lo + CHUNK, len(batch["x"])))
    labels = jnp.asarray(batch["label"][idx], jnp.int32) if s.loss.null_class is not None else None
    outs.append(np.asarray(gen(params, idx, labels, jnp.asarray(batch["cond_image"][idx]),
                               jnp.float32(s.task.aug_level), jnp.float32(s.sample.guidance_scale), key)))
  return np.concatenate(outs)


def _psnr(a: np.ndarray, b: np.ndarray, weight: np.ndarray | None = None) -> float:
  """PSNR in dB of images in [-1, 1] (peak-to-peak 2) over all pixels, or over those with weight 1."""
  err = (a - b) ** 2
  mse = float(np.mean(err)) if weight is None else float(np.sum(err * weight) / (np.sum(weight) * a.shape[-1]))
  return float(10 * np.log10(4.0 / mse))


def inpainting(runs: str, n: int = 1000, repaint_steps: int = 50, repaint_runs: tuple = ("photos_pixel",)) -> dict:
  """Trained inpainting (configs/photos_inpaint.py, its sampler) against RePaint replacement
  (`core.inpaint`, ddpm x repaint_steps, resample 1, CFG w = 1) with configs/photos.py models (same U-Net
  and batch; `repaint_runs` names their workdirs: photos_pixel, 900 steps, is the compute twin;
  photos_pixel1132 has 1.26x the steps), on the same n held-out crops and masks (all 1000 by default):
  FD of the completed images against those n originals (photos classifier features; paired, so it
  measures how far the completions move the set), PSNR over the hole pixels, the RMS error on the known
  pixels, network calls per sample. (FD of a 250-crop subset against the 1000 swings from 14 to 212 with
  the choice of crops, as neighbouring test crops come from the same photo, hence the whole set.)"""
  import jax
  import jax.numpy as jnp
  from diffusax.core import samplers
  from diffusax.evaluation import distances
  from diffusax.nn import bridge
  from diffusax.programs import setup_task
  from diffusax.sampling import generate
  feats = _features()
  u, params, step = _restore("photos_inpaint", os.path.join(runs, "photos_inpaint"))
  sub = setup_task.held_out(u, n)
  n = len(sub["x"])
  ref = feats(generate.to_uint8(sub["x"]))
  m = sub["mask"]

  def scores(out):
    err = (out - sub["x"]) * m
    return {"fd_photos": float(distances.frechet_distance_from_features(feats(generate.to_uint8(out)), ref)),
            "hole_psnr": _psnr(out, sub["x"], 1 - m),
            "known_rms": float(np.sqrt(np.sum(err ** 2) / (np.sum(m) * out.shape[-1])))}

  s = u.s
  calls = s.sample.num_steps * (2 if s.sample.guidance_scale else 1)  # One network call a step (DPM-Solver++(2M)).
  trained = _generate(u, params, sub)
  about = {"sampler": f"{s.sample.method} x {s.sample.num_steps}, w = {s.sample.guidance_scale}",
           "network_calls": calls, "step": int(step), "model": os.path.join(runs, "photos_inpaint")}
  res = {"examples": n, "reference": f"the same {n} test crops", "hole_fraction": float(1 - m.mean()),
         "trained": {**scores(trained), **about},
         # The known pixels pasted back (as RePaint's output has them by construction): the hole alone compared.
         "trained_composited": {**scores(m * sub["x"] + (1 - m) * trained), **about}}
  key = jax.random.key(0)
  for run in filter(None, repaint_runs):
    pu, pparams, pstep = _restore("photos", os.path.join(runs, run))
    x_T = generate.initial_noise(jax.random.fold_in(key, 0), np.arange(n), pu.sample_shape, 1.0)

    @jax.jit
    def repaint(x_T, known, mask, labels, pu=pu, pparams=pparams):
      model = bridge.model(pu.module, {"params": pparams}, pu.s.loss.target, pu.schedule)
      model, c = bridge.condition(pu.module, model, labels, 1.0, pu.s.loss.null_class)
      return samplers.sample(model, x_T, key=jax.random.fold_in(key, 1), method="ddpm", num_steps=repaint_steps,
                             cond=c, inpaint=samplers.Inpaint(known, mask, 1))

    outs = []
    for lo in range(0, n, CHUNK):
      sl = slice(lo, min(lo + CHUNK, n))
      outs.append(np.asarray(repaint(x_T[sl], jnp.asarray(sub["x"][sl]), jnp.asarray(m[sl]),
                                     jnp.asarray(sub["label"][sl], jnp.int32))))
    res[f"repaint:{run}"] = {**scores(np.concatenate(outs)), "sampler": f"ddpm x {repaint_steps}, resample 1, w = 1",
                             "network_calls": 2 * repaint_steps, "step": int(pstep), "model": os.path.join(runs, run)}
  return res


def colorization(runs: str, n: int = 1000) -> dict:
  """Colourisation: FD of the colourised held-out crops (and of the grey inputs as RGB) against the same n
  colour crops (all 1000 by default; paired, as in `inpainting`), PSNR / SSIM against the colour crops."""
  from diffusax.evaluation import distances, reconstruction
  from diffusax.programs import setup_task
  from diffusax.sampling import generate
  feats = _features()
  u, params, step = _restore("photos_colorize", os.path.join(runs, "photos_colorize"))
  sub = setup_task.held_out(u, n)
  real = generate.to_uint8(sub["x"])
  ref = feats(real)
  out = generate.to_uint8(_generate(u, params, sub))
  grey = generate.to_uint8(np.repeat(sub["gray"], 3, axis=-1))
  row = lambda x: {"fd_photos": float(distances.frechet_distance_from_features(feats(x), ref)),  # noqa: E731
                   "psnr": float(np.mean(reconstruction.psnr(real, x))),
                   "ssim": float(np.mean(reconstruction.ssim(real, x)))}
  return {"examples": len(real), "reference": f"the same {len(real)} colour crops", "step": step,
          "model": row(out), "grey_input": row(grey)}


def task_metrics(runs: str) -> dict:
  """The end-of-training held-out task metrics (`setup_task.metrics`: samples and the posterior mean, PSNR /
  SSIM; super-resolution's bicubic baseline; inpainting's known-pixel error) recomputed from each run's
  final EMA with the current code."""
  from diffusax.programs import setup_task
  out = {}
  for name, cfg, over in (("photos_sr", "photos_sr", {}),
                          ("photos_sr_noaug", "photos_sr", {"task.aug_max": 0.0, "sample.aug_level": 0.0}),
                          ("photos_colorize", "photos_colorize", {}), ("photos_inpaint", "photos_inpaint", {})):
    wd = os.path.join(runs, name)
    if os.path.isdir(os.path.join(wd, "checkpoints")):
      u, params, step = _restore(cfg, wd, over)
      out[name] = {"step": step, **setup_task.metrics(u, params)}
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--runs", default="runs", help="the folder holding the runs' workdirs")
  p.add_argument("--out", default=os.path.join(HERE, "cascade.json"))
  p.add_argument("--repaint_runs", default="photos_pixel,photos_pixel1132",
                 help="comma-separated configs/photos.py workdirs under --runs that RePaint samples from")
  p.add_argument("--skip", default="", help="comma-separated parts to leave out: flops, inpainting, colorization, task_metrics")
  a = p.parse_args()
  skip = set(a.skip.split(","))
  out = {"runs": collect(a.runs)}
  if "flops" not in skip:
    out["train_flops"] = train_flops()
  if "inpainting" not in skip:
    out["inpainting"] = inpainting(a.runs, repaint_runs=tuple(a.repaint_runs.split(",")))
  if "colorization" not in skip:
    out["colorization"] = colorization(a.runs)
  if "task_metrics" not in skip:
    out["task_metrics"] = task_metrics(a.runs)
  with open(a.out, "w") as f:
    json.dump(out, f, indent=1)
  print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
  main()
