"""Samplers: each an (init, step) pair run by one loop inside jit.

    model = core.Model(denoise, "eps", schedule)
    x0 = sample(model, x_T, key=key, method="dpm_solver_pp_2m", num_steps=20, cond=labels)
    x0 = sample(model, x_T, key=key, method="ddim", num_steps=50, options={"eta": 0.5},
                clip_x0=1.0, inpaint=Inpaint(known, mask, resample=2))

`model.denoise(x_t [B, ...], t [B] float32, cond) -> prediction of model.target`
with t the schedule's continuous time. `x_T` is the caller's prior draw
(`process.prior_sample`). The arguments come in three layers, each refused
with its allowed names on a typo:

  * the method and its options (`options`: eta, churn, spacing, t_min, t_max,
    variance, snr, ...; `METHODS[name]`'s keyword arguments, see `options_of`);
  * what is done to the model's prediction (`clip_x0`) and the condition (`cond`);
  * wrappers around the method (`inpaint=Inpaint(known, mask, resample)`).

`num_steps` is a Python int or a traced int32 with a static `max_steps`: the
per-step scalars are tabulated once over max_steps (`driver`), so a new step
count, guidance scale, eta or churn reuses the compiled program. Network calls
per sample (NFE) for n steps:

    ddpm, ddim, euler, dpm_solver_pp_2m, dpm_solver_pp_3m, unipc,
    flow_euler, euler_maruyama, consistency                           n
    heun, flow_heun                                                   2n - 1
    pc                                                                n (1 + n_corrector)
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple, Optional

from diffusax.core import model as model_lib
from diffusax.core.samplers import ddpm as _ddpm
from diffusax.core.samplers import consistency as _consistency
from diffusax.core.samplers import dpm_solver, driver, flow, grid, karras, sde, unipc
from diffusax.core.samplers.driver import Sampler, State, run
from diffusax.core.samplers.model import Bound

METHODS: dict[str, Callable[..., Sampler]] = {
    "ddpm": _ddpm.ddpm,
    "ddim": _ddpm.ddim,
    "euler": karras.euler,
    "heun": karras.heun,
    "dpm_solver_pp_2m": dpm_solver.dpm_solver_pp_2m,
    "dpm_solver_pp_3m": unipc.dpm_solver_pp_3m,
    "unipc": unipc.unipc,
    "flow_euler": flow.flow_euler,
    "flow_heun": flow.flow_heun,
    "euler_maruyama": sde.euler_maruyama,
    "pc": sde.pc,
    "consistency": _consistency.consistency,
}


class Inpaint(NamedTuple):
  """Inpainting by replacement (`core.inpaint`): known [B, ...], mask broadcastable to it (1 = known),
  resample = RePaint repeats per step (a static int >= 1)."""
  known: Any
  mask: Any
  resample: int = 1


def get(method: str) -> Callable[..., Sampler]:
  if method not in METHODS:
    raise ValueError(f"unknown sampling method {method!r}; allowed: {sorted(METHODS)}")
  return METHODS[method]


def options_of(method: str) -> dict:
  """{option name: default} of a method (the keyword arguments of METHODS[method])."""
  sig = inspect.signature(get(method))
  return {k: p.default for k, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def stochastic(method: str, options: Optional[dict] = None) -> bool:
  """Whether `method` with these options draws noise in its steps (static; no model needed)."""
  from diffusax.core import schedules  # A throwaway model: the answer depends on the options only.
  probe = model_lib.Model(lambda x, t, c: x, "eps", schedules.VPCosine())
  return make(probe, method=method, options=options).stochastic


def make(model, *, method: str, options: Optional[dict] = None, cond: Any = None,
         clip_x0: Optional[float] = None, inpaint: Optional[Inpaint] = None) -> Sampler:
  """Builds the (init, step) sampler of `method` for `model` (see the module docstring for the layers)."""
  model_lib.check(model)
  factory = get(method)
  options = dict(options or {})
  allowed = options_of(method)
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} for sampling method {method!r}; "
                     f"allowed: {sorted(allowed)}")
  if clip_x0 is not None and not clip_x0 > 0:
    raise ValueError(f"clip_x0 must be None or > 0, got {clip_x0!r}")
  sampler = factory(Bound(model, cond, clip_x0), **options)
  if inpaint is not None:
    from diffusax.core import inpaint as inpaint_lib
    if not isinstance(inpaint, Inpaint):
      raise TypeError(f"inpaint must be samplers.Inpaint(known, mask, resample=1), got {type(inpaint).__name__}")
    sampler = inpaint_lib.replace(sampler, inpaint.known, inpaint.mask, resample=inpaint.resample)
  return sampler


_SAMPLE_ARGS = ("key", "method", "num_steps", "cond", "options", "clip_x0", "inpaint", "max_steps",
                "return_trajectory")


def sample(model, x_T, *, key, method: str, num_steps, cond: Any = None, options: Optional[dict] = None,
           clip_x0: Optional[float] = None, inpaint: Optional[Inpaint] = None, max_steps: Optional[int] = None,
           return_trajectory: bool = False, **unknown):
  """Draws x0 [B, ...] from x_T [B, ...] (in x_T's dtype), or (x0, trajectory).

  Args:
    model: a `core.Model` (callable, target, schedule, learned_variance).
    x_T: the prior draw at t_max.
    key: PRNG key; step i draws from fold_in(key, i).
    method: a key of METHODS; unknown names raise ValueError listing them.
    num_steps: int, or a traced int32 scalar with a static max_steps (see the module docstring for NFE).
    cond: passed to the model unchanged (labels [B], embeddings, a pytree or None).
    options: the method's options (`options_of(method)`); unknown names raise ValueError listing the allowed.
    clip_x0: clip x0_hat to [-clip_x0, clip_x0] (and recompute eps_hat from it), or None.
    inpaint: `Inpaint(known, mask, resample)` or None.
    max_steps: static bound on num_steps (the per-step table's size): needed with a traced num_steps;
      a concrete num_steps above it raises ValueError.
    return_trajectory: also return [max_steps + 1, B, ...] states (see `driver.run`).
  """
  if unknown:
    hint = [k for k in unknown if k in _ALL_METHOD_OPTIONS]
    raise ValueError(f"unknown argument(s) {sorted(unknown)} of samplers.sample; allowed: {list(_SAMPLE_ARGS)}"
                     + (f"; method options such as {hint} go in options={{...}}" if hint else ""))
  sampler = make(model, method=method, options=options, cond=cond, clip_x0=clip_x0, inpaint=inpaint)
  return run(sampler, x_T, key, num_steps, max_steps=max_steps, return_trajectory=return_trajectory)


_ALL_METHOD_OPTIONS = frozenset(k for m in METHODS for k in options_of(m))

__all__ = ["METHODS", "Inpaint", "Sampler", "State", "get", "grid", "make", "options_of", "run", "sample",
           "stochastic"]
