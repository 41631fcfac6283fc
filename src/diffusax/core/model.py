"""`Model`: a denoiser the core can use, taken first by every core entry point that needs one.

    model = Model(denoise, "eps", schedule)                 # denoise(x_t [B, ...], t [B], cond) -> [B, ...]
    x0 = samplers.sample(model, x_T, key=k, method="ddim", num_steps=50, cond=labels)
    guided = guidance.cfg(model, null_cond=10, scale=2.0)   # again a Model
    nats = likelihood.vlb_terms(model, x0, key, t_grid, cond=labels)["total"]

A model is the callable, the name of what it predicts (`targets.TARGETS`:
"eps", "x0", "v", "score", "flow"), the noise schedule it was trained with
(t is the schedule's continuous time in [0, 1]) and whether its output carries
learned-variance channels. It is a frozen dataclass registered as a pytree: the
schedule's numbers are its leaves, the callable, target and variance flag are
static, so a model passes through `jax.jit` (the callable must then be hashable,
as functions are).

`predict(x_t, t, cond)` evaluates the network once and returns the implied pair
(x0_hat, eps_hat), solving

    x_t = alpha(t) x0_hat + sigma(t) eps_hat,   pred = f_target(x0_hat, eps_hat)

as x0 = A x_t + B pred, eps = C x_t + D pred with the scalar weights
`targets.x0_eps_weights` (no elementwise divide). `weights(t)` gives those
scalars so a sampler can tabulate them once per step.

Learned variance (improved DDPM, Nichol & Dhariwal 2021, eq. 15): with
`learned_variance=True` the network returns 2C channels on the last axis: the
first C are the target prediction, the last C the raw interpolation output
`var_interp` in [-1, 1], with log Sigma = f log beta + (1 - f) log beta_tilde,
f = (var_interp + 1) / 2 (`Prediction.var_interp`; None without learned variance).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from diffusax.core import targets as targets_lib
from diffusax.core.schedules import Schedule

F32 = jnp.float32


class ConversionWeights(NamedTuple):
  """The schedule's scalars at t that turn a prediction into (x0_hat, eps_hat).

  w = (A, B, C, D): x0 = A x_t + B pred, eps = C x_t + D pred (`targets.x0_eps_weights`).
  Each leaf is a scalar (one time) or [B] (one time per example).
  """
  alpha: jnp.ndarray
  sigma: jnp.ndarray
  w: tuple


class Prediction(NamedTuple):
  """What one network call implies at x_t: float32 [B, ...] each."""
  x0: jnp.ndarray
  eps: jnp.ndarray
  var_interp: Optional[jnp.ndarray] = None  # learned-variance channels in [-1, 1], or None


@dataclasses.dataclass(frozen=True)
class Model:
  """A denoiser bound to its target and schedule.

  Attributes:
    denoise: (x_t [B, ...], t [B] float32, cond) -> [B, ...] (or [B, ..., 2C] with learned variance).
    target: the name of what `denoise` predicts, one of `targets.TARGETS`.
    schedule: the noise schedule the model was trained with (`schedules.Schedule`).
    learned_variance: the output carries C extra variance channels (see module docstring).
  """
  denoise: Callable
  target: str
  schedule: Schedule
  learned_variance: bool = False

  def __post_init__(self):
    if not callable(self.denoise):
      raise TypeError(f"Model.denoise must be a callable (x_t, t, cond) -> prediction, "
                      f"got {type(self.denoise).__name__}")
    if isinstance(self.target, str):  # Unflattening under a transform passes the static fields unchanged.
      targets_lib.check_target(self.target)
    else:
      raise TypeError(f"Model.target must be a target name in {list(targets_lib.TARGETS)}, got {self.target!r}")
    if not isinstance(self.schedule, Schedule):
      raise TypeError(f"Model.schedule must be a diffusax.core.schedules.Schedule, "
                      f"got {type(self.schedule).__name__}")

  def replace(self, **changes) -> "Model":
    """A copy with some fields changed (e.g. `denoise=` for a wrapper)."""
    return dataclasses.replace(self, **changes)

  def __call__(self, x_t, t, cond: Any = None):
    """The raw network output at t (scalar or [B]): float32 [B, ...] ([B, ..., 2C] with learned variance)."""
    x_t = jnp.asarray(x_t)
    tb = jnp.broadcast_to(jnp.asarray(t, F32), (x_t.shape[0],))
    return jnp.asarray(self.denoise(x_t, tb, cond), F32)

  def output(self, x_t, t, cond: Any = None):
    """One network call: (prediction of `target` [B, ...], var_interp or None), float32."""
    x_t = jnp.asarray(x_t, F32)
    return self.split(self(x_t, t, cond), x_t)

  def split(self, out, x_t):
    """A raw output -> (prediction, var_interp or None), checking its shape against x_t."""
    if self.learned_variance:
      c = x_t.shape[-1]
      if out.shape[-1] != 2 * c:
        raise ValueError(f"learned_variance=True needs a denoiser output with 2C = {2 * c} channels "
                         f"on the last axis; got output shape {tuple(out.shape)} for x_t {tuple(x_t.shape)}")
      return out[..., :c], out[..., c:]
    if out.shape != x_t.shape:
      raise ValueError(f"denoiser output shape {tuple(out.shape)} differs from x_t shape {tuple(x_t.shape)} "
                       "(use Model(..., learned_variance=True) for a 2C-channel output)")
    return out, None

  def weights(self, t) -> ConversionWeights:
    """The conversion scalars at t (scalar or [B]); samplers tabulate them once per step."""
    t = jnp.asarray(t, F32)
    a, s = self.schedule.alpha(t), self.schedule.sigma(t)
    da, ds = (self.schedule.d_alpha(t), self.schedule.d_sigma(t)) if self.target == "flow" else (None, None)
    # The barrier keeps x * (1 / alpha) a multiply (XLA folds it into a divide; see samplers.driver.reciprocal).
    w = jax.lax.optimization_barrier(targets_lib.x0_eps_weights(self.target, a, s, da, ds))
    return ConversionWeights(a, s, w)

  def x0_eps(self, x_t, pred, weights: ConversionWeights, clip_x0: Optional[float] = None):
    """(x0_hat, eps_hat) implied by `pred` at x_t; with clip_x0, x0_hat is clipped to [-clip_x0, clip_x0]
    and eps_hat recomputed from it (DDPM's "clip denoised" for data in [-1, 1])."""
    x_t = jnp.asarray(x_t, F32)
    a_, b_, c_, d_ = (targets_lib.expand(w, x_t, "weights.w") for w in weights.w)
    x0 = pred if self.target == "x0" else a_ * x_t + b_ * pred
    eps = pred if self.target == "eps" else c_ * x_t + d_ * pred
    if clip_x0 is not None:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
      eps = (x_t - targets_lib.expand(weights.alpha, x_t, "alpha") * x0) / targets_lib.expand(
          weights.sigma, x_t, "sigma")
    return x0, eps

  def predict(self, x_t, t, cond: Any = None, *, weights: Optional[ConversionWeights] = None,
              clip_x0: Optional[float] = None) -> Prediction:
    """One network call at t (scalar or [B]): Prediction(x0, eps, var_interp), float32 [B, ...].

    weights: `self.weights(t)` when the caller already has them (a sampler's per-step table).
    """
    pred, var = self.output(x_t, t, cond)
    x0, eps = self.x0_eps(x_t, pred, self.weights(t) if weights is None else weights, clip_x0)
    return Prediction(x0, eps, var)


jax.tree_util.register_dataclass(Model, data_fields=["schedule"],
                                 meta_fields=["denoise", "target", "learned_variance"])


def check(model) -> Model:
  """Raises a TypeError naming what was given when `model` is not a `Model` (the core's entry points call it)."""
  if not isinstance(model, Model):
    raise TypeError(f"expected a diffusax.core.Model(denoise, target, schedule) as the first argument, "
                    f"got {type(model).__name__}")
  return model
