"""Per-step time of each sampler vs a bare lax.scan of the same arithmetic.

Trivial denoiser eps_hat = 0.1 x_t at batch 64x32x32x3 (float32, CPU). For each
sampler the "floor" is a hand-written `lax.scan` over precomputed per-step
coefficient arrays doing the same elementwise update (and the same noise draws,
from fold_in(key, i)), with no grid, schedule or target-conversion code. The
ratio sampler / floor is the framework's overhead. Run by hand:

    .venv/bin/python benchmarks/sampler_overhead.py [--steps 20] [--repeats 7]

Writes benchmarks/sampler_overhead.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusax.core import samplers, schedules

SHAPE = (64, 32, 32, 3)
den = lambda x, t, c: 0.1 * x


def _coef(n):
  return [jnp.asarray(np.linspace(0.9, 0.1, n) + k * 0.01, jnp.float32) for k in range(4)]


def _normal(key, i):
  return jax.random.normal(jax.random.fold_in(key, i), SHAPE, jnp.float32)


def floor_ddim(x, key, n):
  a, s, an, c = _coef(n)
  def body(x, i):
    eps = den(x, None, None)
    x0 = (x - s[i] * eps) / a[i]
    return an[i] * x0 + c[i] * eps, None
  return jax.lax.scan(body, x, jnp.arange(n))[0]


def floor_ddpm(x, key, n):
  a, s, an, c = _coef(n)
  def body(x, i):
    eps = den(x, None, None)
    x0 = (x - s[i] * eps) / a[i]
    return an[i] * x0 + c[i] * eps + s[i] * 0.1 * _normal(key, i), None
  return jax.lax.scan(body, x, jnp.arange(n))[0]


def floor_euler(x, key, n, heun=False):
  a, s, an, c = _coef(n)
  def d(xs, i):
    xi = a[i] * xs
    return (xi - s[i] * den(xi, None, None)) / a[i]
  def body(x, i):
    xs = x / a[i]
    dv = (xs - d(xs, i)) / s[i]
    xn = xs + (c[i] - s[i]) * dv
    if heun:
      xn = xs + (c[i] - s[i]) * 0.5 * (dv + (xn - d(xn, i)) / c[i])
    return an[i] * xn, None
  return jax.lax.scan(body, x, jnp.arange(n))[0]


def floor_dpm(x, key, n):
  a, s, an, c = _coef(n)
  def body(carry, i):
    x, prev = carry
    x0 = (x - s[i] * den(x, None, None)) / a[i]
    dd = (1.0 + c[i]) * x0 - c[i] * prev
    return (s[i] * x - an[i] * dd, x0), None
  return jax.lax.scan(body, (x, jnp.zeros_like(x)), jnp.arange(n))[0][0]


def floor_flow(x, key, n):
  a, s, an, c = _coef(n)
  def body(x, i):
    eps = den(x, None, None)
    x0 = (x - s[i] * eps) / a[i]
    return x + c[i] * (eps - x0), None
  return jax.lax.scan(body, x, jnp.arange(n))[0]


def floor_em(x, key, n):
  a, s, an, c = _coef(n)
  def body(x, i):
    score = -den(x, None, None) / s[i]
    return x - (a[i] * x - an[i] * score) * c[i] + s[i] * _normal(key, i), None
  return jax.lax.scan(body, x, jnp.arange(n))[0]


CASES = {  # method -> (schedule, target, floor)
    "ddim": (schedules.VPLinear(), floor_ddim),
    "ddpm": (schedules.VPLinear(), floor_ddpm),
    "euler": (schedules.VPLinear(), floor_euler),
    "heun": (schedules.VPLinear(), lambda x, k, n: floor_euler(x, k, n, heun=True)),
    "dpm_solver_pp_2m": (schedules.VPLinear(), floor_dpm),
    "flow_euler": (schedules.Flow(), floor_flow),
    "euler_maruyama": (schedules.VPLinear(), floor_em),
}


def _time(f, *args, repeats):
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "sampler_overhead.json"))
  args = ap.parse_args()
  x = jax.random.normal(jax.random.key(0), SHAPE)
  key = jax.random.key(1)
  rows = {}
  print(f"per-step ms at batch {SHAPE}, {args.steps} steps, median of {args.repeats} ({jax.devices()[0].platform})")
  print(f"{'method':18s}{'sampler':>10s}{'floor':>10s}{'ratio':>8s}")
  for method, (sch, floor) in CASES.items():
    fs = jax.jit(lambda x, key, n, sch=sch, method=method: samplers.sample(den, "eps", sch, x, method=method,
                                                                          num_steps=n, key=key))
    ff = jax.jit(floor, static_argnums=2)
    # Alternate to share machine noise evenly.
    ts, tf = [], []
    for _ in range(3):
      ts.append(_time(fs, x, key, args.steps, repeats=args.repeats))
      tf.append(_time(ff, x, key, args.steps, repeats=args.repeats))
    s_ms, f_ms = 1e3 * min(ts) / args.steps, 1e3 * min(tf) / args.steps
    rows[method] = {"sampler_ms_per_step": s_ms, "floor_ms_per_step": f_ms, "ratio": s_ms / f_ms}
    print(f"{method:18s}{s_ms:10.3f}{f_ms:10.3f}{s_ms / f_ms:8.2f}")
  with open(args.out, "w") as fh:
    json.dump({"shape": SHAPE, "steps": args.steps, "rows": rows}, fh, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
