"""Per-step time of each sampler vs a bare lax.scan of the same arithmetic.

Trivial denoiser eps_hat = 0.1 x_t at batch 64x32x32x3 (float32, CPU). For each
sampler the "floor" is a hand-written `lax.scan` over precomputed per-step
coefficient arrays doing the same elementwise update with the same model calls
(Heun: 2n - 1, its last step is the plain denoised mean) and the same noise
draws (from fold_in(fold_in(key, i), sub) like `driver.step_key`), with no grid,
schedule or target-conversion code. The ratio sampler / floor is the
framework's overhead. The "+cfg" rows wrap a label-dependent denoiser in
`guidance.cfg` (traced scale); their floor does the same doubled-batch call
(concatenate [x; x] and [labels; null], split, combine). Run by hand:

    .venv/bin/python benchmarks/sampler_overhead.py [--steps 100] [--repeats 15] [--methods heun,euler]

Each row is measured twice: with the step count traced (`jit(f)(x, key, n)`,
one compiled program for every n) and static (`static_argnums`, as the
programs and the sampling job call it, where samplers with a per-step `plan`
tabulate their scalars before the loop; see `samplers.driver`). The floor is
always static. Sampler and floor calls alternate one by one (the machine is
shared and noisy); "ratio" compares the fastest call of each, "ratio_median"
the medians. 100 steps by default: at 20 steps a call is about a millisecond
and the ratios swing by +-0.2 between runs. Writes
benchmarks/sampler_overhead.json (unless --methods picks a subset) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusax.core import guidance, samplers, schedules

SHAPE = (64, 32, 32, 3)
NULL = 10  # the "no label" value of the cfg rows
den = lambda x, t, c: 0.1 * x
den_c = lambda x, t, c: 0.1 * x * (1.0 + 0.01 * c.astype(jnp.float32)[:, None, None, None])  # label-dependent


def _coef(n):
  return [jnp.asarray(np.linspace(0.9, 0.1, n) + k * 0.01, jnp.float32) for k in range(4)]


def _normal(key, i, sub=None):
  k = jax.random.fold_in(key, i)
  k = k if sub is None else jax.random.fold_in(k, sub)
  return jax.random.normal(k, SHAPE, jnp.float32)


def _guided(x, labels, w):
  """What guidance.cfg computes around den_c: one call on the doubled batch, then eps_u + (1 + w)(...)."""
  b = x.shape[0]
  out = den_c(jnp.concatenate([x, x]), None, jnp.concatenate([labels, jnp.full_like(labels, NULL)]))
  oc, ou = out[:b], out[b:]
  return oc + w * (oc - ou)


def floor_ddim(x, key, n, eps_fn=lambda x: den(x, None, None)):
  a, s, an, c = _coef(n)
  def body(x, i):
    eps = eps_fn(x)
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
  if not heun:
    return jax.lax.scan(body, x, jnp.arange(n))[0]
  x = jax.lax.scan(body, x, jnp.arange(n - 1))[0]
  return d(x / a[n - 1], n - 1)  # Heun's last step: one call, the denoised mean


def floor_dpm(x, key, n, x0_fn=lambda x, i, s, a: (x - s[i] * den(x, None, None)) / a[i]):
  a, s, an, c = _coef(n)
  def body(carry, i):
    x, prev = carry
    x0 = x0_fn(x, i, s, a)
    dd = (1.0 + c[i]) * x0 - c[i] * prev
    return (s[i] * x - an[i] * dd, x0), None
  return jax.lax.scan(body, (x, jnp.zeros_like(x)), jnp.arange(n))[0][0]


def floor_flow(x, key, n, heun=False):
  a, s, an, c = _coef(n)
  def u(x, i):
    eps = den(x, None, None)
    return eps - (x - s[i] * eps) / a[i]
  def body(x, i):
    u0 = u(x, i)
    xn = x + c[i] * u0
    if heun:
      xn = x + c[i] * 0.5 * (u0 + u(xn, i))
    return xn, None
  if not heun:
    return jax.lax.scan(body, x, jnp.arange(n))[0]
  x = jax.lax.scan(body, x, jnp.arange(n - 1))[0]
  return (x - s[n - 1] * den(x, None, None)) / a[n - 1]  # last step: x0_hat


def floor_em(x, key, n):
  a, s, an, c = _coef(n)
  def body(x, i):
    score = -den(x, None, None) / s[i]
    return x - (a[i] * x - an[i] * score) * c[i] + s[i] * _normal(key, i, 0), None
  return jax.lax.scan(body, x, jnp.arange(n))[0]


def _bnorm(x):
  return jnp.mean(jnp.sqrt(jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=1)))


def floor_pc(x, key, n):
  """One Langevin corrector (batch-mean norms, snr 0.16) then Euler-Maruyama, as `sde.pc`."""
  a, s, an, c = _coef(n)
  def body(x, i):
    score = -den(x, None, None) / s[i]
    z = _normal(key, i, 1)
    e = 2.0 * an[i] * (0.16 * _bnorm(z) / jnp.maximum(_bnorm(score), 1e-20)) ** 2
    x = x + e * score + jnp.sqrt(2.0 * e) * z
    score = -den(x, None, None) / s[i]
    return x - (a[i] * x - an[i] * score) * c[i] + s[i] * _normal(key, i, 0), None
  return jax.lax.scan(body, x, jnp.arange(n))[0]


def floor_ddim_cfg(x, key, n, labels, w):
  return floor_ddim(x, key, n, eps_fn=lambda x: _guided(x, labels, w))


def floor_dpm_cfg(x, key, n, labels, w):
  return floor_dpm(x, key, n, x0_fn=lambda x, i, s, a: (x - s[i] * _guided(x, labels, w)) / a[i])


CASES = {  # row -> (method, schedule, floor, guided)
    "ddim": ("ddim", schedules.VPLinear(), floor_ddim, False),
    "ddpm": ("ddpm", schedules.VPLinear(), floor_ddpm, False),
    "euler": ("euler", schedules.VPLinear(), floor_euler, False),
    "heun": ("heun", schedules.VPLinear(), lambda x, k, n: floor_euler(x, k, n, heun=True), False),
    "dpm_solver_pp_2m": ("dpm_solver_pp_2m", schedules.VPLinear(), floor_dpm, False),
    "flow_euler": ("flow_euler", schedules.Flow(), floor_flow, False),
    "flow_heun": ("flow_heun", schedules.Flow(), lambda x, k, n: floor_flow(x, k, n, heun=True), False),
    "euler_maruyama": ("euler_maruyama", schedules.VPLinear(), floor_em, False),
    "pc": ("pc", schedules.VPLinear(), floor_pc, False),
    "ddim+cfg": ("ddim", schedules.VPLinear(), floor_ddim_cfg, True),
    "dpm_solver_pp_2m+cfg": ("dpm_solver_pp_2m", schedules.VPLinear(), floor_dpm_cfg, True),
}


def _time_pair(fs, ff, args_s, args_f, repeats, budget_s=3.0):
  """Seconds per call of fs and ff, alternating call by call: (min_s, median_s, min_f, median_f).

  At least `repeats` pairs, more for cheap calls (up to about budget_s seconds in all).
  """
  t0 = time.perf_counter()
  jax.block_until_ready(fs(*args_s))
  jax.block_until_ready(ff(*args_f))
  once = time.perf_counter() - t0
  ts, tf = [], []
  for _ in range(max(repeats, min(500, int(budget_s / max(once, 1e-6))))):
    for f, a, acc in ((fs, args_s, ts), (ff, args_f, tf)):
      t0 = time.perf_counter()
      jax.block_until_ready(f(*a))
      acc.append(time.perf_counter() - t0)
  return min(ts), float(np.median(ts)), min(tf), float(np.median(tf))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=100)
  ap.add_argument("--repeats", type=int, default=15)
  ap.add_argument("--methods", default="", help="comma-separated rows (default: all; then the JSON is written)")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "sampler_overhead.json"))
  args = ap.parse_args()
  names = [m for m in args.methods.split(",") if m] or list(CASES)
  unknown = sorted(set(names) - set(CASES))
  if unknown:
    raise SystemExit(f"unknown rows {unknown}; allowed: {list(CASES)}")
  x = jax.random.normal(jax.random.key(0), SHAPE)
  key = jax.random.key(1)
  labels = jnp.arange(SHAPE[0], dtype=jnp.int32) % NULL
  w = jnp.float32(2.0)
  rows = {}
  print(f"per-step ms at batch {SHAPE}, {args.steps} steps, >= {args.repeats} alternating calls "
        f"({jax.devices()[0].platform})")
  print(f"{'row':22s}{'n':>7s}{'sampler':>9s}{'floor':>9s}{'ratio':>7s}{'median':>8s}")
  for name in names:
    method, sch, floor, guided = CASES[name]
    if guided:
      f = lambda x, key, n, w, sch=sch, method=method: samplers.sample(
          guidance.cfg(den_c, null_cond=NULL, scale=w), "eps", sch, x, method=method, num_steps=n, key=key,
          cond=labels)
      ff = jax.jit(lambda x, key, n, w, floor=floor: floor(x, key, n, labels, w), static_argnums=2)
      extra = (w,)
    else:
      f = lambda x, key, n, sch=sch, method=method: samplers.sample(den, "eps", sch, x, method=method,
                                                                    num_steps=n, key=key)
      ff = jax.jit(floor, static_argnums=2)
      extra = ()
    a = (x, key, args.steps) + extra
    for mode, fs in (("traced", jax.jit(f)), ("static", jax.jit(f, static_argnums=2))):
      s_min, s_med, f_min, f_med = (1e3 * v / args.steps for v in _time_pair(fs, ff, a, a, args.repeats))
      rows[f"{name} {mode}"] = {"sampler_ms_per_step": s_min, "floor_ms_per_step": f_min,
                                "ratio": s_min / f_min, "ratio_median": s_med / f_med}
      print(f"{name:22s}{mode:>7s}{s_min:9.3f}{f_min:9.3f}{s_min / f_min:7.2f}{s_med / f_med:8.2f}")
  if names == list(CASES):
    with open(args.out, "w") as fh:
      json.dump({"shape": SHAPE, "steps": args.steps, "min_repeats": args.repeats, "rows": rows}, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
