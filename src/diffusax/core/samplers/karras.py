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
from diffusax.core.samplers.model import Bound

F32 = jnp.float32


def _sampler(m: Bound, heun: bool, *, churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             spacing: str = "karras", t_min=None, t_max=None, rho: float = 7.0) -> driver.Sampler:
  schedule = m.schedule
  t_at = grid.make(schedule, spacing, t_min, t_max, rho)
  # A Python churn of 0 (the default) is the plain ODE, built without the churn branch: that
  # per-step lax.cond costs ~10-20% of a cheap step on CPU even when it never draws.
  use_churn = not (isinstance(churn, (int, float)) and churn == 0)
  churn, s_tmin, s_tmax, s_noise = (jnp.asarray(v, F32) for v in (churn, s_tmin, s_tmax, s_noise))

  def plan(lv, i, n):
    """Every scalar of step i besides its levels (tabulated per step; see `driver`)."""
    sig = lv.sigma / lv.alpha
    sig_next = lv.sigma_next / lv.alpha_next
    if use_churn:
      gamma = jnp.where((sig >= s_tmin) & (sig <= s_tmax),
                        jnp.minimum(churn / jnp.asarray(n, F32), math.sqrt(2.0) - 1.0), 0.0)
      sig_hat = sig * (1.0 + gamma)
      # The churn draw on x~ has std sqrt(s^2 - s_i^2) s_noise: alpha times that on x, added to x
      # before the division so the cond passes state.x through untouched when gamma = 0.
      std = lv.alpha * jnp.sqrt(jnp.maximum(sig_hat ** 2 - sig ** 2, 0.0)) * s_noise
      t_hat = jnp.where(gamma > 0, schedule.t_from_edm_sigma(sig_hat), lv.t)
      churn_entries = dict(std=std, churned=gamma > 0)
    else:
      sig_hat, t_hat, churn_entries = sig, lv.t, {}
    c = dict(t_hat=t_hat, **churn_entries, inv_alpha=driver.reciprocal(lv.alpha),
             inv_sig_hat=driver.reciprocal(sig_hat), dsig=sig_next - sig_hat, w=m.weights(t_hat))
    if heun:  # The corrector's scalars; at the last step (s = 0, no corrector) finite stand-ins, not 1 / 0.
      c["inv_sig_next"] = jnp.where(lv.last, 0.0, driver.reciprocal(jnp.where(lv.last, 1.0, sig_next)))
      c["w_next"] = m.weights(jnp.where(lv.last, lv.t, lv.t_next))
    return c

  init = driver.tabulated_init(t_at, schedule, plan)

  def step(state, i, last=None):
    c = driver.row(state, i)
    lv = c["levels"]
    last = lv.last if last is None else last
    x = driver.add_noise(state.x, c["std"], c["churned"], state.key, i) if use_churn else state.x
    xs = x * c["inv_alpha"]
    # Without churn the network input alpha(t_hat) x~ is x itself: no multiply to undo the division.
    d0 = m.predict(c["w"].alpha * xs if use_churn else x, c["t_hat"], c["w"]).x0
    deriv = (xs - d0) * c["inv_sig_hat"]
    xs_next = xs + c["dsig"] * deriv
    if heun:
      def correct():
        d1 = m.predict(lv.alpha_next * xs_next, lv.t_next, c["w_next"]).x0
        return xs + c["dsig"] * 0.5 * (deriv + (xs_next - d1) * c["inv_sig_next"])
      xs_next = driver.branch(last, lambda: d0, correct)
    else:
      xs_next = jnp.where(last, d0, xs_next)
    return state._replace(x=lv.alpha_next * xs_next)

  # The last step returns D (Heun: without the corrector): `run` peels it off the loop, so the
  # loop body has no select or cond on "last" (see `driver`).
  return driver.Sampler(init, step, stochastic=use_churn, peel_last=True)


def euler(m: Bound, *, churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, spacing: str = "karras",
          t_min=None, t_max=None, rho: float = 7.0):
  """EDM Euler (Algorithm 2 with the second-order correction removed). Options as in `heun`."""
  return _sampler(m, False, churn=churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, spacing=spacing,
                  t_min=t_min, t_max=t_max, rho=rho)


def heun(m: Bound, *, churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, spacing: str = "karras",
         t_min=None, t_max=None, rho: float = 7.0):
  """EDM Heun (Algorithms 1-2). Options: churn, s_tmin, s_tmax, s_noise (traced), spacing, t_min, t_max, rho."""
  return _sampler(m, True, churn=churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, spacing=spacing,
                  t_min=t_min, t_max=t_max, rho=rho)
