"""Euler and Heun on the probability-flow ODE in EDM form (Karras et al. 2022).

Any schedule is rewritten in the variance-exploding variables

    x~ = x_t / alpha(t),   s(t) = sigma(t) / alpha(t) = exp(-lambda(t) / 2)   (`edm_sigma`),

where the PF-ODE is dx~/ds = (x~ - D(x~; s)) / s with D = E[x0 | x_t] (Karras
et al. 2022, eq. 4 with s(t) = t, their Algorithm 1). The grid is the Karras
rho-spacing in s between s(t_max) and s(t_min) (`grid` "karras"), mapped back
to t with `t_from_edm_sigma` so the model always sees continuous time t.

Stochastic churn (their Algorithm 2): at levels s in [s_tmin, s_tmax] the
state is first moved up to s^ = s (1 + gamma), gamma = min(churn / n, sqrt(2) - 1),
by adding N(0, (s^2 - s^2_i) s_noise^2) noise; churn = 0 is the plain ODE (no draw).
churn, s_tmin, s_tmax and s_noise may be traced; a Python churn of 0 (the default)
builds the step without the churn branch at all (no per-step cond).

Heun corrects every step but the last, which is the Euler step to s = 0 and
returns D (so n grid points cost 2n - 1 network calls).
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from diffusax.core.samplers import driver, grid
from diffusax.core.samplers.model import Model

F32 = jnp.float32


def _sampler(model: Model, heun: bool, *, churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             spacing: str = "karras", t_min=None, t_max=None, rho: float = 7.0) -> driver.Sampler:
  schedule = model.schedule
  t_at = grid.make(schedule, spacing, t_min, t_max, rho)
  # A Python churn of 0 (the default) is the plain ODE, built without the churn branch: that
  # per-step lax.cond costs ~10-20% of a cheap step on CPU even when it never draws.
  use_churn = not (isinstance(churn, (int, float)) and churn == 0)
  churn, s_tmin, s_tmax, s_noise = (jnp.asarray(v, F32) for v in (churn, s_tmin, s_tmax, s_noise))

  def levels(state, i):
    return grid.levels(schedule, t_at, i, state.n)

  def init(x_T, key, n):
    return driver.init_state(x_T, key, n)

  def denoise(xs, t):
    return model.predict(schedule.alpha(t) * xs, t)[0]

  def step(state, i, last=None):
    lv = grid.levels(schedule, t_at, i, state.n, last)
    sig = lv.sigma / lv.alpha
    sig_next = lv.sigma_next / lv.alpha_next
    if use_churn:
      gamma = jnp.where((sig >= s_tmin) & (sig <= s_tmax),
                        jnp.minimum(churn / state.n.astype(F32), math.sqrt(2.0) - 1.0), 0.0)
      sig_hat = sig * (1.0 + gamma)
      std = jnp.sqrt(jnp.maximum(sig_hat ** 2 - sig ** 2, 0.0)) * s_noise
      # Churn noise std * z on x~ is alpha * std * z on x, added before the division so that the
      # cond passes state.x through untouched when gamma = 0 and x / alpha fuses into the update.
      x = driver.add_noise(state.x, lv.alpha * std, gamma > 0, state.key, i)
      t_hat = jnp.where(gamma > 0, schedule.t_from_edm_sigma(sig_hat), lv.t)
    else:
      x, sig_hat, t_hat = state.x, sig, lv.t
    inv_alpha, inv_sig_hat = driver.reciprocal(lv.alpha), driver.reciprocal(sig_hat)
    xs = x * inv_alpha
    d0 = denoise(xs, t_hat)
    deriv = (xs - d0) * inv_sig_hat
    xs_next = xs + (sig_next - sig_hat) * deriv
    if heun:
      def correct():
        d1 = denoise(xs_next, lv.t_next)
        return xs + (sig_next - sig_hat) * 0.5 * (deriv + (xs_next - d1) * driver.reciprocal(sig_next))
      xs_next = driver.branch(lv.last, lambda: d0, correct)
    else:
      xs_next = jnp.where(lv.last, d0, xs_next)
    return state._replace(x=lv.alpha_next * xs_next)

  # Heun's last step skips the corrector: `run` peels it off the loop (see `driver`).
  return driver.Sampler(init, lambda s, i: step(s, i), levels, step if heun else None)


def euler(model: Model, **options):
  """EDM Euler (Algorithm 2 with the second-order correction removed). Options as in `heun`."""
  return _sampler(model, False, **options)


def heun(model: Model, **options):
  """EDM Heun (Algorithms 1-2). Options: churn, s_tmin, s_tmax, s_noise (traced), spacing, t_min, t_max, rho."""
  return _sampler(model, True, **options)
