"""Reverse-time SDE samplers (Song et al. 2021): Euler-Maruyama and predictor-corrector.

The forward SDE dx = f(t) x dt + g(t) dW (`Schedule.sde`) has the reverse
(Song et al. 2021, eq. 6)

    dx = [f x - g^2 grad log p_t(x)] dt + g dW_bar,    grad log p_t(x) = -eps_hat / sigma(t).

Euler-Maruyama step from t to s < t (dt = t - s > 0):

    x_s = x_t - (f x_t - g^2 score) dt + g sqrt(dt) z.

Predictor-corrector (their Algorithm 2 for VE, 3 for VP): before each
predictor step, `n_corrector` Langevin steps at t,

    x <- x + e score + sqrt(2 e) z,   e = 2 a (snr ||z|| / ||score||)^2,

with a = 1 for VE and a = 1 - beta_i = (alpha_t / alpha_s)^2 for VP. As in the reference code (score_sde
`LangevinCorrector`) the norms are per-example norms averaged over the batch:
per-example ratios are heavy tailed in low dimension (a near-zero score gives a
huge step), the batch mean is not, and in high dimension both agree. snr is traced.
The last step returns x0_hat (Tweedie's denoised mean) with no noise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusax.core.samplers import driver, grid
from diffusax.core.samplers.model import Model

F32 = jnp.float32


def _norm(x):
  """Mean over the batch of the per-example L2 norms (a scalar)."""
  return jnp.mean(jnp.sqrt(jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=1)))


def _sampler(model: Model, *, n_corrector: int = 0, snr=0.16, spacing: str = "linspace", t_min=None, t_max=None):
  schedule = model.schedule
  t_at = grid.make(schedule, spacing, t_min, t_max)
  snr = jnp.asarray(snr, F32)
  if not isinstance(n_corrector, int) or n_corrector < 0:
    raise ValueError(f"n_corrector must be a static int >= 0, got {n_corrector!r}")

  def levels(state, i):
    return grid.levels(schedule, t_at, i, state.n)

  def init(x_T, key, n):
    return driver.init_state(x_T, key, n)

  def step(state, i):
    lv = levels(state, i)
    x = state.x
    if n_corrector:
      a = jnp.where(lv.last | (schedule.kind == "ve"), 1.0, (lv.alpha / lv.alpha_next) ** 2)

      def corrector(j, x):
        _, eps, _ = model.predict(x, lv.t)
        score = -eps / lv.sigma
        z = driver.noise(driver.step_key(state.key, i, j + 1), x.shape)
        e = 2.0 * a * (snr * _norm(z) / jnp.maximum(_norm(score), 1e-20)) ** 2
        return x + e * score + jnp.sqrt(2.0 * e) * z
      x = jax.lax.fori_loop(0, n_corrector, corrector, x)
    x0, eps, _ = model.predict(x, lv.t)
    f, g2 = schedule.sde(lv.t)
    dt = lv.t - lv.t_next
    score = -eps / lv.sigma
    z = driver.noise(driver.step_key(state.key, i, 0), x.shape)
    x_next = x - (f * x - g2 * score) * dt + jnp.sqrt(g2 * dt) * z
    return state._replace(x=jnp.where(lv.last, x0, x_next))

  return driver.Sampler(init, step, levels)


def euler_maruyama(model: Model, *, spacing: str = "linspace", t_min=None, t_max=None):
  """Reverse-SDE Euler-Maruyama, one network call per step."""
  return _sampler(model, spacing=spacing, t_min=t_min, t_max=t_max)


def pc(model: Model, *, n_corrector: int = 1, snr=0.16, spacing: str = "linspace", t_min=None, t_max=None):
  """Predictor (Euler-Maruyama) + Langevin corrector with signal-to-noise ratio `snr`."""
  return _sampler(model, n_corrector=n_corrector, snr=snr, spacing=spacing, t_min=t_min, t_max=t_max)
