"""Samplers: each an (init, step) pair run by one loop inside jit.

    x0 = sample(denoise, target, schedule, x_T, method="dpm_solver_pp_2m",
                num_steps=20, key=key, cond=labels)

`denoise(x_t [B, ...], t [B] float32, cond) -> prediction of target` with t the
schedule's continuous time (see `model`). `x_T` is the caller's prior draw
(`process.prior_sample`). `num_steps` may be a traced int32: the grid is
computed from the step index (`grid`) and the loop has a traced trip count
(`driver.run`), so a new step count, guidance scale, eta or churn reuses the
compiled program. Network calls per sample (NFE) for n steps:

    ddpm, ddim, euler, dpm_solver_pp_2m, flow_euler, euler_maruyama   n
    heun, flow_heun                                                   2n - 1
    pc                                                                n (1 + n_corrector)

Each family's `(init, step, levels)` is reachable directly through
`METHODS[name](Model(...), **options)`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from diffusax.core.samplers import ddpm as _ddpm
from diffusax.core.samplers import dpm_solver, driver, flow, grid, karras, model, sde
from diffusax.core.samplers.driver import Sampler, State, run
from diffusax.core.samplers.model import Model

METHODS: dict[str, Callable[..., Sampler]] = {
    "ddpm": _ddpm.ddpm,
    "ddim": _ddpm.ddim,
    "euler": karras.euler,
    "heun": karras.heun,
    "dpm_solver_pp_2m": dpm_solver.dpm_solver_pp_2m,
    "flow_euler": flow.flow_euler,
    "flow_heun": flow.flow_heun,
    "euler_maruyama": sde.euler_maruyama,
    "pc": sde.pc,
}


def get(method: str) -> Callable[..., Sampler]:
  if method not in METHODS:
    raise ValueError(f"unknown sampling method {method!r}; allowed: {sorted(METHODS)}")
  return METHODS[method]


def make(denoise, target: str, schedule, *, method: str, cond=None, learned_variance: bool = False,
         clip_x0: Optional[float] = None, inpaint=None, resample: int = 1, **options) -> Sampler:
  """Builds the (init, step, levels) sampler for `method` with its options.

  inpaint: None or (known [B, ...], mask broadcastable to it, 1 = known); see `inpaint`.
  """
  model.check(denoise, target)
  factory = get(method)
  m = Model(denoise, target, schedule, cond, learned_variance, clip_x0)
  try:
    sampler = factory(m, **options)
  except TypeError as e:
    raise ValueError(f"bad options {sorted(options)} for method {method!r}: {e}; "
                     f"see diffusax.core.samplers.METHODS[{method!r}].__doc__") from None
  if inpaint is not None:
    from diffusax.core import inpaint as inpaint_lib
    known, mask = inpaint
    sampler = inpaint_lib.replace(sampler, known, mask, resample=resample)
  elif resample != 1:
    raise ValueError("resample > 1 needs inpaint=(known, mask)")
  return sampler


def sample(denoise, target: str, schedule, x_T, *, method: str, num_steps, key, cond: Any = None,
           return_trajectory: bool = False, max_steps: Optional[int] = None, **options):
  """Draws x0 [B, ...] from x_T [B, ...] (in x_T's dtype), or (x0, trajectory).

  Args:
    denoise, target: the model and the name of what it predicts.
    schedule: the model's noise schedule (`schedules.Schedule`).
    x_T: the prior draw at t_max.
    method: a key of METHODS; unknown names raise ValueError listing them.
    num_steps: int or traced int32 scalar (grid points; see the module docstring for NFE).
    key: PRNG key; step i draws from fold_in(key, i).
    cond: passed to `denoise` unchanged.
    return_trajectory: also return [max_steps + 1, B, ...] states (see `driver.run`).
    max_steps: static bound on num_steps (needed with a traced num_steps and
      return_trajectory); a concrete num_steps above it raises ValueError.
    **options: the method's options (eta, churn, spacing, t_min, t_max, variance,
      snr, ...), plus learned_variance, clip_x0, inpaint=(known, mask), resample.
  """
  sampler = make(denoise, target, schedule, method=method, cond=cond, **options)
  return run(sampler, x_T, key, num_steps, return_trajectory=return_trajectory, max_steps=max_steps)


__all__ = ["METHODS", "Model", "Sampler", "State", "get", "grid", "make", "run", "sample"]
