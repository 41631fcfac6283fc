"""Error vs NFE of the deterministic samplers against the exact probability-flow ODE.

Data: the 2-D, 3-component mixture of tests/gmm.py, whose optimal denoiser
E[x0 | x_t] is closed form. From the same x_T each sampler's x0 is compared with
a float64 RK4 solution of the PF-ODE (4000 steps in log s, s = sigma / alpha;
for the flow samplers 4000 steps in t on the `Flow` schedule down to t = 1e-6)
from t_max to t_min followed by the same final denoise (the samplers' common
end point). Error = RMS over samples of ||x0 - x0_ref||. Run by hand:

    .venv/bin/python benchmarks/sampler_convergence.py [--out benchmarks/sampler_convergence.json]

Prints a table of error vs NFE and the observed order (slope of log error vs
log NFE between the two largest NFE with error above float32 noise).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import gmm  # noqa: E402
from diffusax.core import process, samplers, schedules  # noqa: E402

# method -> (schedule, target, nfe(n), options)
CASES = {
    "ddim": ("vp_linear", "eps", lambda n: n, {"spacing": "log_snr"}),
    "heun": ("vp_linear", "eps", lambda n: 2 * n - 1, {}),
    "dpm_solver_pp_2m": ("vp_linear", "eps", lambda n: n, {}),
    "dpm_solver_pp_3m": ("vp_linear", "eps", lambda n: n, {}),
    "unipc": ("vp_linear", "eps", lambda n: n, {}),             # order 2 (diffusers' default), corrector on
    "unipc:order3": ("vp_linear", "eps", lambda n: n, {"order": 3}),
    "flow_euler": ("flow", "flow", lambda n: n, {}),
    "flow_heun": ("flow", "flow", lambda n: 2 * n - 1, {}),
}
NFES = (5, 10, 20, 50, 100, 200, 500)


def reference(g, schedule, x_T, t_max, t_min, steps=4000):
  if isinstance(schedule, schedules.Flow):
    return g.flow_reference(np.asarray(x_T), t_max, 1e-6, steps)
  s_max = float(schedule.edm_sigma(t_max))
  s_min = float(schedule.edm_sigma(t_min)) if t_min > 0 else 1e-6
  return g.ode_reference(np.asarray(x_T), s_max, s_min, float(schedule.alpha(t_max)), steps)


def run(num_samples=512, nfes=NFES, seed=0):
  g = gmm.standard_mixture()
  rows = {}
  refs = {}
  max_n = max(nfes) + 1  # the static bound of the traced step count (one compile per method)
  for name, (sched_name, target, nfe_of, opts) in CASES.items():
    method = name.split(":")[0]
    schedule = schedules.get(sched_name)
    x_T = process.prior_sample(jax.random.key(seed), schedule, (num_samples, 2))
    flowm = method.startswith("flow")
    t_max = samplers.grid.default_t_max(schedule, endpoint_ok=flowm)
    t_min = 0.0 if flowm else samplers.grid.default_t_min(schedule)
    if (sched_name, flowm) not in refs:
      refs[(sched_name, flowm)] = reference(g, schedule, x_T, t_max, t_min)
    ref = refs[(sched_name, flowm)]
    model = g.model(schedule, target)
    f = jax.jit(lambda x, n, model=model, method=method, opts=opts:
                samplers.sample(model, x, key=jax.random.key(1), method=method, num_steps=n, max_steps=max_n,
                                options=opts))
    rows[name] = []
    for nfe in nfes:
      n = next(k for k in range(1, nfe + 2) if nfe_of(k) >= nfe)
      x = np.asarray(f(x_T, n), np.float64)
      err = float(np.sqrt(np.mean(np.sum((x - ref) ** 2, axis=1))))
      rows[name].append({"nfe": nfe_of(n), "steps": n, "rms_error": err})
  return rows


def order(points):
  good = [p for p in points if p["rms_error"] > 3e-5]
  if len(good) < 2:
    return float("nan")
  a, b = good[-2], good[-1]
  return -math.log(b["rms_error"] / a["rms_error"]) / math.log(b["nfe"] / a["nfe"])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "sampler_convergence.json"))
  ap.add_argument("--num_samples", type=int, default=512)
  args = ap.parse_args()
  t0 = time.time()
  rows = run(args.num_samples)
  print(f"RMS error vs exact PF-ODE solution ({args.num_samples} samples, 2-D GMM); columns = target NFE")
  print(f"{'method':18s}" + "".join(f"{n:>10d}" for n in NFES) + "   order")
  for m, pts in rows.items():
    print(f"{m:18s}" + "".join(f"{p['rms_error']:10.2e}" for p in pts) + f"   {order(pts):5.2f}")
  print("(actual NFE per column: " + "; ".join(f"{m}: {[p['nfe'] for p in pts]}" for m, pts in rows.items()) + ")")
  with open(args.out, "w") as fh:
    json.dump({"num_samples": args.num_samples, "rows": rows, "order": {m: order(p) for m, p in rows.items()}}, fh, indent=1)
  print(f"wrote {args.out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
  main()
