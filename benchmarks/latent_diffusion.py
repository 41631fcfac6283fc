"""Latent diffusion on `photos` (32x32): the autoencoder's reconstructions against bicubic, the cost of a
latent train step against a pixel one, and sample quality of latent and pixel models.

    # stage 1 (configs/photos_autoencoder.py) and its ablations, each its own workdir:
    python -m diffusax.main --config=configs/photos_autoencoder.py --workdir=runs/photos_ae
    #   ... and e.g. --config.autoencoder.disc_start=-1 (no GAN), block_out_channels (32,64) (f=2) or
    #   (32,64,64,64) (f=8)
    # stage 2 with the per-channel normalisation and with raw latents, and the pixel model:
    python -m diffusax.main --config=configs/photos_latent.py --workdir=runs/photos_latent \\
        --config.latent.autoencoder_workdir=runs/photos_ae
    python -m diffusax.main --config=configs/photos_latent.py --workdir=runs/photos_latent_raw \\
        --config.latent.autoencoder_workdir=runs/photos_ae --config.latent.normalize=none
    python -m diffusax.main --config=configs/photos.py --workdir=runs/photos
    # each model evaluated with --mode=eval (--config.eval.metrics='("fd","kid","class_accuracy")' for pixels)
    python benchmarks/latent_diffusion.py --autoencoders=f4:runs/photos_ae,... \\
        --models=latent:runs/photos_latent,raw:runs/photos_latent_raw,pixel:runs/photos \\
        --autoencoder=runs/photos_ae --out=benchmarks/latent_diffusion.json

Reads what the runs wrote (metrics.json: the held-out reconstruction metrics and the training history;
eval/eval_<step>.json: fd_photos and class accuracy) and measures in this process, with the programs'
own steps on random data of each shape:
  * train FLOPs per step (XLA's cost analysis of the compiled step) and images/s, the pixel U-Net of
    configs/photos.py against the latent U-Net of configs/photos_latent.py, timed alternately;
  * the encoder's forward FLOPs and time per stage-2 batch: what encoding on the fly inside the step would
    add to every step, against reading the cache (which costs one encoding pass per split, once).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402


def _pairs(text: str) -> dict:
  return dict(p.split(":", 1) for p in text.split(",") if p) if text else {}


def _train_seconds(history: list, log_every: int) -> float:
  """The training loop's wall time from the logged rates (each interval's steps / its steps per second)."""
  total, prev = 0.0, 0
  for h in history:
    total += (h["step"] - prev) / max(h["steps_per_s"], 1e-9)
    prev = h["step"]
  return total


def collect(autoencoders: dict, models: dict) -> dict:
  out = {"autoencoders": {}, "models": {}}
  for name, wd in autoencoders.items():
    m = json.load(open(os.path.join(wd, "metrics.json")))
    out["autoencoders"][name] = {"workdir": wd, "step": m["step"], "reconstruction": m["reconstruction"],
                                 "train_seconds": round(_train_seconds(m["history"], 0), 1),
                                 "latent_stats": json.load(open(os.path.join(wd, "latent_stats.json")))}
  for name, wd in models.items():
    m = json.load(open(os.path.join(wd, "metrics.json")))
    evals = sorted(glob.glob(os.path.join(wd, "eval", "eval_*.json")))
    ev = json.load(open(evals[-1])) if evals else {}
    out["models"][name] = {"workdir": wd, "step": m["step"], "train_seconds": round(_train_seconds(m["history"], 0), 1),
                           "eval": ev.get("metrics"), "reconstruction": ev.get("reconstruction"),
                           "sampler": ev.get("sampler")}
  return out


def cost(autoencoder: str, repeats: int) -> dict:
  """Train-step FLOPs and images/s, pixel vs latent, and the encoder's per-batch cost."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  pix_c = harness.load_config("photos")
  harness.apply_runtime(pix_c)
  lat_c = harness.load_config("photos_latent", {"latent.autoencoder_workdir": autoencoder})
  from diffusax.programs import setup as setup_lib
  from diffusax.programs import settings as settings_lib
  from diffusax.programs import train
  from diffusax.training import step as step_lib
  rows = {}
  fns = {}
  for name, c in (("pixel", pix_c), ("latent", lat_c)):
    s = settings_lib.parse(c)
    m = setup_lib.model_setup(s)
    u = train.for_training(m, source=None)
    s = u.s
    fn = step_lib.make_train_step(u.module.apply, u.tx, u.lr_fn, u.schedule, s.loss, s.ema_decays, s.ema_warmup)
    b = s.train.batch_size
    batch = {"x": jnp.asarray(np.random.default_rng(0).normal(size=(b,) + u.sample_shape).astype(np.float32)),
             "label": jnp.zeros((b,), jnp.int32)}
    state = train.init_state(u)
    jitted = jax.jit(fn, donate_argnums=0)
    compiled = jitted.lower(state, batch).compile()
    flops = float(compiled.cost_analysis()["flops"])
    state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    fns[name] = [compiled, state, batch]
    rows[name] = {"batch": b, "shape": list(u.sample_shape), "flops_per_step": flops,
                  "flops_per_image": flops / b, "params": int(sum(x.size for x in jax.tree.leaves(state.params)))}
    if name == "latent":
      lat = m.latent
      ae_params = lat.params(m.mesh)
      img = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (b,) + tuple(lat.image.shape)).astype(np.float32))
      enc = jax.jit(lambda p, x: lat.module.apply({"params": p}, x, method="encode")).lower(ae_params, img).compile()
      enc_flops = float(enc.cost_analysis()["flops"])
      jax.block_until_ready(enc(ae_params, img))
      fns["encoder"] = [enc, ae_params, img]
      rows["encoder_per_batch"] = {"flops": enc_flops, "batch": b}
  times = {k: [] for k in fns}
  for _ in range(repeats):  # Alternating, so that both see the same machine load.
    for k, (f, a, bt) in fns.items():
      t = time.perf_counter()
      if k == "encoder":
        jax.block_until_ready(f(a, bt))
      else:
        fns[k][1], _ = f(a, bt)
        jax.block_until_ready(fns[k][1])
      times[k].append(time.perf_counter() - t)
  for k, ts in times.items():
    med = statistics.median(ts)
    if k == "encoder":
      rows["encoder_per_batch"]["seconds"] = med
    else:
      rows[k].update(seconds_per_step=med, images_per_s=rows[k]["batch"] / med)
  rows["latent_vs_pixel_flops_per_image"] = rows["latent"]["flops_per_image"] / rows["pixel"]["flops_per_image"]
  rows["latent_vs_pixel_images_per_s"] = rows["latent"]["images_per_s"] / rows["pixel"]["images_per_s"]
  rows["on_the_fly_encoding_vs_latent_step_time"] = rows["encoder_per_batch"]["seconds"] / rows["latent"]["seconds_per_step"]
  rows["on_the_fly_encoding_vs_latent_step_flops"] = rows["encoder_per_batch"]["flops"] / rows["latent"]["flops_per_step"]
  rows["repeats"] = repeats
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--autoencoders", default="", help="name:workdir,... of stage-1 runs")
  p.add_argument("--models", default="", help="name:workdir,... of evaluated diffusion runs")
  p.add_argument("--autoencoder", default="", help="the stage-1 workdir of the latent step's cost")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--out", default=os.path.join(HERE, "latent_diffusion.json"))
  a = p.parse_args()
  out = collect(_pairs(a.autoencoders), _pairs(a.models))
  if a.autoencoder:
    out["cost"] = cost(a.autoencoder, a.repeats)
  with open(a.out, "w") as f:
    json.dump(out, f, indent=1)
  print(json.dumps(out, indent=1)[:4000])


if __name__ == "__main__":
  main()
