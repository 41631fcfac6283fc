"""End-to-end images/s of the sampling job (`--mode=sample`) vs the bare sampler loop, same model.

The digits program (configs/digits.py: class-conditional U-Net, v target,
dpm_solver_pp_2m x 30 steps, CFG scale 1) with freshly initialised EMA params
(speed does not depend on the weights), on one device. Three things make the
same samples' worth of work, called in turn (the machine is shared):

  job      `sampling.job.run_job` as `programs.sample.generate` runs it: shards of
           `shard_size` samples with per-index noise, host transfer, uint8
           conversion and an fsynced .npz per shard, into a fresh directory each
           call (the jitted batch function is reused: compile is not counted,
           see compile_time.py)
  sampler  the job's batch function alone (`job.make_sample_fn`, jitted): initial
           noise + `core.samplers.sample` with `guidance.cfg`, no I/O
  floor    a hand-written `lax.scan` of the same 30 DPM-Solver++(2M) updates
           with the same doubled-batch CFG network call (concatenate [x; x],
           [labels; null]), coefficients precomputed, x_T passed in

Ratios job/sampler and sampler/floor of images/s (fastest calls, and medians).
The first job call, compile included, is reported separately.

    .venv/bin/python benchmarks/sampling_job.py [--num_samples 512] [--repeats 4]

Writes benchmarks/sampling_job.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import harness


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--num_samples", type=int, default=512)
  ap.add_argument("--shard_size", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=4)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "sampling_job.json"))
  args = ap.parse_args()
  config = harness.load_config("digits", {"mesh.shape": (1, 1), "sample.num_samples": args.num_samples,
                                          "sample.shard_size": args.shard_size})
  harness.apply_runtime(config)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from diffusax.programs import setup as setup_lib
  from diffusax.programs import train
  from diffusax.sampling import job as job_lib

  s = harness.settings(config)
  u = train.setup(s, devices=jax.devices()[:1])
  s = u.s
  params = train.init_state(u).ema_params[0]
  spec = setup_lib.job_spec(u, step=0)
  null = s.loss.null_class
  tmp = tempfile.mkdtemp(prefix="diffusax_sampling_job_")
  quiet = lambda *a, **k: None
  calls = {"n": 0}

  sample_fn = job_lib.make_sample_fn(u.module, u.schedule, s.loss.target, spec, null_class=null)

  def job():
    out_dir = os.path.join(tmp, f"job{calls['n']}")
    calls["n"] += 1
    job_lib.run_job(sample_fn, params, spec, out_dir, u.mesh, log=quiet, is_image=True)
    shutil.rmtree(out_dir)

  t0 = time.perf_counter()
  job()
  first_job_s = time.perf_counter() - t0

  batch_fn = jax.jit(sample_fn)
  shards = [np.arange(k * spec.shard_size, min((k + 1) * spec.shard_size, spec.num_samples), dtype=np.uint32)
            for k in range(spec.num_shards)]
  scale = jnp.float32(spec.guidance_scale)

  def sampler():
    for idx in shards:
      jax.block_until_ready(batch_fn(params, idx, job_lib.labels_for(spec, idx), scale))

  # Floor: the DPM-Solver++(2M) update in x0 form; its coefficients only matter for the arithmetic
  # count, so they are made-up precomputed arrays; the network call is the real one.
  n = spec.num_steps
  coef = [jnp.asarray(np.linspace(0.9, 0.1, n) + k * 0.01, jnp.float32) for k in range(4)]
  a, sg, an, c = coef

  def floor_fn(params, x, labels, w):
    def body(carry, i):
      x, prev = carry
      tt = jnp.full((2 * x.shape[0],), 1.0 - i / n, jnp.float32)
      out = u.module.apply({"params": params}, jnp.concatenate([x, x]), tt,
                           jnp.concatenate([labels, jnp.full_like(labels, null)]))
      oc, ou = jnp.split(out, 2)
      v = oc + w * (oc - ou)
      x0 = a[i] * x - sg[i] * v
      d = (1.0 + c[i]) * x0 - c[i] * prev
      return (sg[i] * x - an[i] * d, x0), None
    return jax.lax.scan(body, (x, jnp.zeros_like(x)), jnp.arange(n))[0][0]

  floor_jit = jax.jit(floor_fn)
  x_T = [jax.random.normal(jax.random.key(k), (len(idx),) + u.sample_shape) for k, idx in enumerate(shards)]
  labs = [jnp.asarray(job_lib.labels_for(spec, idx)) for idx in shards]

  def floor():
    for x, y in zip(x_T, labs):
      jax.block_until_ready(floor_jit(params, x, y, scale))

  times = harness.alternate({"job": job, "sampler": sampler, "floor": floor}, args.repeats)
  shutil.rmtree(tmp, ignore_errors=True)
  best = {k: min(v) for k, v in times.items()}
  med = {k: float(np.median(v)) for k, v in times.items()}
  rate = {k: spec.num_samples / v for k, v in best.items()}
  out = {"date": time.strftime("%Y-%m-%d"), "cpu": harness.cpu_model(), "method": spec.method,
         "num_steps": spec.num_steps, "guidance_scale": spec.guidance_scale, "num_samples": spec.num_samples,
         "shard_size": spec.shard_size, "repeats": args.repeats, "images_per_s": rate,
         "job_over_sampler": best["job"] / best["sampler"], "sampler_over_floor": best["sampler"] / best["floor"],
         "job_over_floor": best["job"] / best["floor"],
         "job_over_sampler_median": med["job"] / med["sampler"],
         "sampler_over_floor_median": med["sampler"] / med["floor"],
         "first_job_s": first_job_s, "first_job_over_steady": first_job_s / best["job"], "times": times}
  print(f"digits {spec.method} x {spec.num_steps}, CFG w={spec.guidance_scale:g}, {spec.num_samples} samples "
        f"in shards of {spec.shard_size}; {args.repeats} alternating calls ({harness.cpu_model()})")
  print(f"{'':10s}{'img/s':>8s}{'time ratio':>12s}{'median':>8s}")
  print(f"{'job':10s}{rate['job']:8.1f}{out['job_over_sampler']:12.2f}{out['job_over_sampler_median']:8.2f}"
        "  (vs sampler)")
  print(f"{'sampler':10s}{rate['sampler']:8.1f}{out['sampler_over_floor']:12.2f}"
        f"{out['sampler_over_floor_median']:8.2f}  (vs floor)")
  print(f"{'floor':10s}{rate['floor']:8.1f}")
  print(f"first job call (compile included) / steady job call: {out['first_job_over_steady']:.2f}")
  with open(args.out, "w") as fh:
    json.dump(out, fh, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
