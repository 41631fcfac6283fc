"""The denoiser contract seen by every sampler.

A model is `denoise(x_t [B, ...], t [B] float32, cond) -> prediction of target`,
with `target` one of `targets.TARGETS` ("eps", "x0", "v", "score", "flow") and t
the schedule's continuous time in [0, 1]. Samplers never interpret the raw output
themselves: `Model.predict(x, t)` evaluates the network once and returns the
implied pair (x0_hat, eps_hat), solving

    x_t = alpha(t) x0_hat + sigma(t) eps_hat,   pred = f_target(x0_hat, eps_hat)

(`targets.to_x0_eps`, evaluated as x0 = A x_t + B pred, eps = C x_t + D pred with
the scalar weights of `targets.x0_eps_weights`: no elementwise divide), so each
sampler works with every target. The pieces are public for samplers that need
another linear combination: `output` (the network call), `x0_eps` and
`combine(x, out, coef, k_x0, k_eps)` = k_x0 x0_hat + k_eps eps_hat as one
multiply-add (the flow samplers' velocity), with `coef(t)` precomputable.

Learned variance (improved DDPM, Nichol & Dhariwal 2021, eq. 15): with
`learned_variance=True` the network returns 2C channels on the last axis; the
first C are the target prediction, the last C a raw v in [-1, 1], returned as
the third value of `predict` (None otherwise). Only the DDPM sampler uses it.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from diffusax.core import targets as targets_lib
from diffusax.core.schedules import Schedule

F32 = jnp.float32


class Coef(NamedTuple):
  """The schedule's scalars at t that `Model.predict` converts with.

  w = (A, B, C, D): x0 = A x_t + B pred, eps = C x_t + D pred (`targets.x0_eps_weights`).
  """
  alpha: jnp.ndarray
  sigma: jnp.ndarray
  w: tuple


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

  def coef(self, t) -> Coef:
    """The conversion scalars at time t: a scalar (samplers; a `plan` tabulates them per step) or [B]."""
    t = jnp.asarray(t, F32)
    a, s = self.schedule.alpha(t), self.schedule.sigma(t)
    da, ds = (self.schedule.d_alpha(t), self.schedule.d_sigma(t)) if self.target == "flow" else (None, None)
    # The barrier keeps x * (1 / alpha) a multiply (XLA folds it into a divide; see driver.reciprocal).
    w = jax.lax.optimization_barrier(targets_lib.x0_eps_weights(self.target, a, s, da, ds))
    return Coef(a, s, w)

  def output(self, x, t):
    """One network call at time t (scalar or [B]): (prediction of target, v or None), float32 [B, ...]."""
    x = jnp.asarray(x, F32)
    tb = jnp.broadcast_to(jnp.asarray(t, F32), (x.shape[0],))
    out = jnp.asarray(self.denoise(x, tb, self.cond), F32)
    if self.learned_variance:
      c = x.shape[-1]
      if out.shape[-1] != 2 * c:
        raise ValueError(f"learned_variance=True needs a denoiser output with 2C = {2 * c} channels "
                         f"on the last axis; got output shape {tuple(out.shape)} for x_t {tuple(x.shape)}")
      return out[..., :c], out[..., c:]
    if out.shape != x.shape:
      raise ValueError(f"denoiser output shape {tuple(out.shape)} differs from x_t shape {tuple(x.shape)} "
                       "(pass learned_variance=True for a 2C-channel output)")
    return out, None

  def x0_eps(self, x, out, coef: Coef):
    """(x0_hat, eps_hat) implied by the prediction `out` at x (clipped as `clip_x0` says)."""
    x = jnp.asarray(x, F32)
    a_, b_, c_, d_ = (targets_lib.expand(w, x, "coef.w") for w in coef.w)
    x0 = out if self.target == "x0" else a_ * x + b_ * out
    eps = out if self.target == "eps" else c_ * x + d_ * out
    if self.clip_x0 is not None:
      x0 = jnp.clip(x0, -self.clip_x0, self.clip_x0)
      eps = (x - targets_lib.expand(coef.alpha, x, "alpha") * x0) / targets_lib.expand(coef.sigma, x, "sigma")
    return x0, eps

  def combine(self, x, out, coef: Coef, k_x0, k_eps):
    """k_x0 x0_hat + k_eps eps_hat (scalars k), as one multiply-add per operand when nothing is clipped."""
    if self.clip_x0 is not None:
      x0, eps = self.x0_eps(x, out, coef)
      return k_x0 * x0 + k_eps * eps
    x = jnp.asarray(x, F32)
    a_, b_, c_, d_ = (targets_lib.expand(w, x, "coef.w") for w in coef.w)
    k_x0, k_eps = targets_lib.expand(k_x0, x, "k_x0"), targets_lib.expand(k_eps, x, "k_eps")
    return (k_x0 * a_ + k_eps * c_) * x + (k_x0 * b_ + k_eps * d_) * out

  def predict(self, x, t, coef: Optional[Coef] = None):
    """One network call at time t (scalar or [B]): returns (x0_hat, eps_hat, v or None), float32 [B, ...].

    coef: `self.coef(t)` when the caller already has it (from a per-step table); else computed here.
    """
    out, v = self.output(x, t)
    x0, eps = self.x0_eps(x, out, self.coef(t) if coef is None else coef)
    return x0, eps, v


def check(denoise, target: str) -> None:
  """Raises early on a malformed denoiser contract."""
  if not callable(denoise):
    raise TypeError(f"denoise must be a callable (x_t, t, cond) -> prediction, got {type(denoise).__name__}")
  targets_lib.check_target(target)
