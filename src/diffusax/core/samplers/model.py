"""The denoiser contract seen by every sampler.

A model is `denoise(x_t [B, ...], t [B] float32, cond) -> prediction of target`,
with `target` one of `targets.TARGETS` ("eps", "x0", "v", "score", "flow") and t
the schedule's continuous time in [0, 1]. Samplers never look at the raw output:
they call `Model.predict(x, t)` which evaluates the network once and returns the
implied pair (x0_hat, eps_hat), solving

    x_t = alpha(t) x0_hat + sigma(t) eps_hat,   pred = f_target(x0_hat, eps_hat)

(`targets.to_x0_eps`), so each sampler works with every target.

Learned variance (improved DDPM, Nichol & Dhariwal 2021, eq. 15): with
`learned_variance=True` the network returns 2C channels on the last axis; the
first C are the target prediction, the last C a raw v in [-1, 1], returned as
the third value of `predict` (None otherwise). Only the DDPM sampler uses it.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax.numpy as jnp

from diffusax.core import targets as targets_lib
from diffusax.core.schedules import Schedule

F32 = jnp.float32


class Model(NamedTuple):
  """A denoiser bound to its target, schedule and condition.

  Attributes:
    denoise: (x_t [B, ...], t [B], cond) -> [B, ...] (or [B, ..., 2C] with learned variance).
    target: the name of what `denoise` predicts.
    schedule: the noise schedule the model was trained with.
    cond: passed through to `denoise` unchanged (labels [B], embeddings, a pytree or None).
    learned_variance: the output carries C extra variance channels (see module docstring).
    clip_x0: if not None, x0_hat is clipped to [-clip_x0, clip_x0] and eps_hat recomputed
      from it (the "clip denoised" option of DDPM for data in [-1, 1]).
  """
  denoise: Callable
  target: str
  schedule: Schedule
  cond: Any = None
  learned_variance: bool = False
  clip_x0: Optional[float] = None

  def predict(self, x, t):
    """One network call at a scalar time t: returns (x0_hat, eps_hat, v or None), float32 [B, ...]."""
    x = jnp.asarray(x, F32)
    t = jnp.asarray(t, F32)
    tb = jnp.broadcast_to(t, (x.shape[0],))
    out = jnp.asarray(self.denoise(x, tb, self.cond), F32)
    v = None
    if self.learned_variance:
      c = x.shape[-1]
      if out.shape[-1] != 2 * c:
        raise ValueError(f"learned_variance=True needs a denoiser output with 2C = {2 * c} channels "
                         f"on the last axis; got output shape {tuple(out.shape)} for x_t {tuple(x.shape)}")
      out, v = out[..., :c], out[..., c:]
    elif out.shape != x.shape:
      raise ValueError(f"denoiser output shape {tuple(out.shape)} differs from x_t shape {tuple(x.shape)} "
                       "(pass learned_variance=True for a 2C-channel output)")
    a, s = self.schedule.alpha(t), self.schedule.sigma(t)
    if self.target == "flow":
      da, ds = self.schedule.d_alpha(t), self.schedule.d_sigma(t)
    else:
      da = ds = None
    x0, eps = targets_lib.to_x0_eps(out, self.target, x, a, s, da, ds)
    if self.clip_x0 is not None:
      x0 = jnp.clip(x0, -self.clip_x0, self.clip_x0)
      eps = (x - a * x0) / s
    return x0, eps, v


def check(denoise, target: str) -> None:
  """Raises early on a malformed denoiser contract."""
  if not callable(denoise):
    raise TypeError(f"denoise must be a callable (x_t, t, cond) -> prediction, got {type(denoise).__name__}")
  targets_lib.check_target(target)
