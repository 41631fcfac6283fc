"""VLB bits/dim of one learned-variance checkpoint with its learned, and with fixed, step variances.

    python -m diffusax.main --config=configs/digits_iddpm.py --workdir=runs/digits_iddpm
    python benchmarks/learned_variance_vlb.py --workdir=runs/digits_iddpm [--config=configs/digits_iddpm.py]

The first eval.bpd_examples test digits (unconditional: the null class), the schedule's own
1000-step grid, the same draws for every variance choice (`core.likelihood.vlb_terms` with
model_var learned / small = beta_tilde / large = beta). Prints and writes
benchmarks/learned_variance_vlb.json.
"""
from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--config", default=os.path.join(os.path.dirname(HERE), "configs", "digits_iddpm.py"))
  a = ap.parse_args()
  import jax
  import jax.numpy as jnp
  from diffusax.core import likelihood
  from diffusax.nn import bridge
  from diffusax.programs import evaluate, setup as setup_lib, settings as settings_lib
  from diffusax.programs.defaults import sibling_config
  c = sibling_config(a.config, os.path.splitext(os.path.basename(a.config))[0])
  s = settings_lib.parse(c)
  u = setup_lib.model_setup(s)
  params, step = setup_lib.restore_ema(u, a.workdir)
  n = s.eval.bpd_examples
  data = evaluate._real_images(u.s, s.data.eval_split or s.data.split, n)
  x = jnp.asarray(data, jnp.float32) / 127.5 - 1.0
  s = u.s  # with the null class of the data filled in
  cond = None if s.loss.null_class is None else jnp.full((len(x),), s.loss.null_class, jnp.int32)
  grid = likelihood.ddpm_grid(u.schedule) if hasattr(u.schedule, "num_steps") else \
      likelihood.uniform_grid(s.eval.vlb_steps, s.eval.t_min)
  key = jax.random.fold_in(jax.random.key(s.sample.seed), 0xB9D)
  d = int(x[0].size)
  out = {"workdir": a.workdir, "step": step, "examples": int(len(x)), "grid_steps": int(len(grid))}
  for mv in ("learned", "small", "large"):
    f = jax.jit(lambda p, mv=mv: likelihood.vlb_terms(bridge.model(u.module, {"params": p}, s.loss.target, u.schedule),
                                                       x, key, grid, cond=cond, model_var=mv))
    terms = f(params)
    out[mv] = {k: float(jnp.mean(likelihood.bits_per_dim(v, d))) for k, v in terms.items()}
    print(mv, out[mv], flush=True)
  json.dump(out, open(os.path.join(HERE, "learned_variance_vlb.json"), "w"), indent=1)


if __name__ == "__main__":
  main()
