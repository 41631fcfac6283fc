"""Likelihood of four digits models on the digits' 17 values, and the variance of the VDM loss estimate.

    python -m diffusax.main --config=configs/digits.py --workdir=runs/digits                      # (a)
    python -m diffusax.main --config=configs/digits_iddpm.py --workdir=runs/digits_iddpm          # (b)
    python -m diffusax.main --config=configs/digits_vdm.py --workdir=runs/digits_vdm_fixed \\
        --config.diffusion.schedule=linear_log_snr --config.diffusion.variance_minimisation=False \\
        --config.diffusion.learn_endpoints=False                                                  # (c)
    python -m diffusax.main --config=configs/digits_vdm.py --workdir=runs/digits_vdm             # (d)
    python benchmarks/vdm_likelihood.py --a=runs/digits --b=runs/digits_iddpm \\
        --c=runs/digits_vdm_fixed --d=runs/digits_vdm

Every model: the same U-Net, data and steps (configs/digits.py), its EMA parameters, the first
`--examples` test digits, unconditional (the null class), data.levels = 17:
  * bpd_vlb: each model's own bound. (a) and (b): the discrete VLB (`core.likelihood.vlb_terms`; (a) on
    eval.vlb_steps steps uniform in logSNR, (b) on its 1000 steps with its learned variances), decoder
    bins of the 17 values. (c) and (d): VDM's continuous-time bound (`core.likelihood.vdm_elbo`,
    eval.vlb_steps stratified times per example).
  * bpd_ode: the probability-flow ODE (eval.ode_steps Heun steps, Hutchinson), dequantised within the
    17 values' bins.
  * For (c) and (d): the variance of the loss estimate (the train step's objective, bits/dim) over
    --repeats independent draws of (t, eps, eps_0) on one fixed batch of 64 training digits, per batch
    (low-discrepancy t over the batch, as trained) and per example (one t per example).
Writes benchmarks/vdm_likelihood.json and benchmarks/vdm_schedules.png (gamma(t) of (d) against (c)).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIGS = {"a": ("digits.py", []), "b": ("digits_iddpm.py", []),
           "c": ("digits_vdm.py", ["--config.diffusion.schedule=linear_log_snr",
                                    "--config.diffusion.variance_minimisation=False",
                                    "--config.diffusion.learn_endpoints=False"]),
           "d": ("digits_vdm.py", [])}
NAMES = {"a": "README model (vp_cosine, v, L_simple)", "b": "iDDPM hybrid (learned variances)",
         "c": "VDM, fixed linear logSNR", "d": "VDM, learned schedule (variance minimisation)"}


def _eval(key, workdir, examples, data_dir):
  """--mode=eval's bpd_vlb and bpd_ode at 17 levels, on a copy of the run's checkpoints (its own eval
  files stay as they are)."""
  cfg, extra = CONFIGS[key]
  tmp = tempfile.mkdtemp(prefix=f"vdm_bench_{key}_")
  shutil.copytree(os.path.join(workdir, "checkpoints"), os.path.join(tmp, "checkpoints"))
  args = [sys.executable, "-m", "diffusax.main", f"--config={os.path.join(ROOT, 'configs', cfg)}",
          f"--workdir={tmp}", "--mode=eval", *extra, "--config.data.levels=17",
          "--config.eval.metrics=('bpd_vlb', 'bpd_ode')", f"--config.eval.bpd_examples={examples}"]
  if data_dir:
    args.append(f"--config.data.data_dir={data_dir}")
  subprocess.run(args, check=True, cwd=ROOT)
  ev = os.path.join(tmp, "eval")
  out = json.load(open(os.path.join(ev, sorted(os.listdir(ev))[-1])))
  shutil.rmtree(tmp, ignore_errors=True)
  return out


def _loss_variance(key, workdir, repeats, data_dir):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from diffusax.nn import bridge
  from diffusax.programs import evaluate, setup as setup_lib, settings as settings_lib
  from diffusax.programs.defaults import sibling_config
  from diffusax.training import step as step_lib
  cfg, extra = CONFIGS[key]
  c = sibling_config(os.path.join(ROOT, "configs", cfg), os.path.splitext(cfg)[0])
  for a in extra:
    k, v = a[len("--config."):].split("=")
    node = c
    for part in k.split(".")[:-1]:
      node = node[part]
    node[k.split(".")[-1]] = {"False": False, "True": True}.get(v, v)
  if data_dir:
    c.data.data_dir = data_dir
  s = settings_lib.parse(c)
  u = setup_lib.model_setup(s)
  params, step = setup_lib.restore_ema(u, workdir)
  s = u.s
  data = evaluate._real_images(s, s.data.split, 64)
  batch = {"x": jnp.asarray(data, jnp.float32) / 127.5 - 1.0, "label": jnp.full((64,), s.loss.null_class, jnp.int32)}
  per_batch = jax.jit(jax.vmap(step_lib.make_eval_loss(u.module.apply, u.schedule, s.loss), in_axes=(None, None, 0)))
  loss_ex = step_lib.LossConfig(**{**s.loss.__dict__, "time_sampler": "uniform"})
  per_example = jax.jit(jax.vmap(step_lib.make_eval_loss(u.module.apply, u.schedule, loss_ex), in_axes=(None, None, 0)))
  one = {"x": batch["x"][:1], "label": batch["label"][:1]}
  keys = jax.random.split(jax.random.key(0xA7), repeats)
  lb = np.asarray(per_batch(params, batch, keys), np.float64)
  le = np.asarray(per_example(params, one, keys), np.float64)
  sched = bridge.bind_schedule(u.schedule, params)
  t = jnp.linspace(0.0, 1.0, 101)
  return {"step": step, "batch_mean_bpd": float(lb.mean()), "batch_var": float(lb.var()),
          "example_mean_bpd": float(le.mean()), "example_var": float(le.var()),
          "gamma_0": float(-sched.log_snr(0.0)), "gamma_1": float(-sched.log_snr(1.0)),
          "gamma": [float(v) for v in -sched.log_snr(t)]}


def main():
  ap = argparse.ArgumentParser()
  for k in "abcd":
    ap.add_argument(f"--{k}", required=True, help=f"workdir of ({k}) {NAMES[k]}")
  ap.add_argument("--examples", type=int, default=360, help="test digits for bits/dim (the whole test split)")
  ap.add_argument("--repeats", type=int, default=256, help="draws of the loss estimate for its variance")
  ap.add_argument("--data_dir", default="")
  a = ap.parse_args()
  out = {"levels": 17, "examples": a.examples, "repeats": a.repeats, "models": {}}
  for k in "abcd":
    ev = _eval(k, getattr(a, k), a.examples, a.data_dir)
    out["models"][k] = {"name": NAMES[k], "workdir": getattr(a, k), "step": ev["step"], **ev["metrics"],
                        "bound": ev["likelihood"]["bound"]}
    print(k, out["models"][k], flush=True)
  for k in "cd":
    v = _loss_variance(k, getattr(a, k), a.repeats, a.data_dir)
    out["models"][k].update({n: v[n] for n in v if n != "gamma"})
    out["models"][k]["gamma_curve"] = v["gamma"]
    print(k, {n: v[n] for n in v if n != "gamma"}, flush=True)
  c, d = out["models"]["c"], out["models"]["d"]
  out["batch_variance_ratio_c_over_d"] = c["batch_var"] / d["batch_var"]
  out["example_variance_ratio_c_over_d"] = c["example_var"] / d["example_var"]
  print("variance ratio (c)/(d): per batch", out["batch_variance_ratio_c_over_d"], "per example",
        out["example_variance_ratio_c_over_d"])
  json.dump(out, open(os.path.join(HERE, "vdm_likelihood.json"), "w"), indent=1)
  import numpy as np
  from PIL import Image
  from diffusax.evaluation import curves
  ts = np.linspace(0.0, 1.0, 101)
  img = curves.line_plot(ts, d["gamma_curve"], points=[(t, g) for t, g in zip(ts[::5], c["gamma_curve"][::5])],
                         title="gamma(t) = -logSNR: learned (line) vs fixed linear (crosses)",
                         xlabel="t", ylabel="gamma")
  Image.fromarray(img).save(os.path.join(HERE, "vdm_schedules.png"))


if __name__ == "__main__":
  main()
