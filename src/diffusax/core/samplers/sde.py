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
from diffusax.core.samplers.model import Bound

F32 = jnp.float32


def _norm(x):
  """Mean over the batch of the per-example L2 norms (a scalar)."""
  return jnp.mean(jnp.sqrt(jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=1)))


def _sampler(m: Bound, *, n_corrector: int = 0, snr=0.16, spacing: str = "linspace", t_min=None, t_max=None):
  schedule = m.schedule
  t_at = grid.make(schedule, spacing, t_min, t_max)
  snr = jnp.asarray(snr, F32)
  if isinstance(n_corrector, bool) or not isinstance(n_corrector, int) or n_corrector < 0:
    raise ValueError(f"n_corrector must be a static int >= 0, got {n_corrector!r}")

  def plan(lv, i, n):
    f, g2 = schedule.sde(lv.t)
    dt = lv.t - lv.t_next
    c = dict(w=m.weights(lv.t), inv_sigma=driver.reciprocal(lv.sigma), f_dt=f * dt, g2_dt=g2 * dt,
             std=jnp.sqrt(g2 * dt))
    if n_corrector:
      c["a"] = jnp.where(lv.last | (schedule.kind == "ve"), 1.0,
                         (lv.alpha / jnp.where(lv.last, 1.0, lv.alpha_next)) ** 2)
    return c

  init = driver.tabulated_init(t_at, schedule, plan)

  def step(state, i, last=None):
    c = driver.row(state, i)
    lv = c["levels"]
    x = state.x
    if n_corrector:
      def corrector(j, x):
        score = -m.predict(x, lv.t, c["w"]).eps * c["inv_sigma"]
        z = driver.noise(driver.step_key(state.key, i, j + 1), x.shape)
        e = 2.0 * c["a"] * (snr * _norm(z) / jnp.maximum(_norm(score), 1e-20)) ** 2
        return x + e * score + jnp.sqrt(2.0 * e) * z
      x = jax.lax.fori_loop(0, n_corrector, corrector, x)
    x0, eps, _ = m.predict(x, lv.t, c["w"])
    if last is True:  # Peeled last step (`run`): Tweedie's mean, no predictor draw.
      return state._replace(x=x0)
    score = -eps * c["inv_sigma"]
    z = driver.noise(driver.step_key(state.key, i, 0), x.shape)
    x_next = x - c["f_dt"] * x + c["g2_dt"] * score + c["std"] * z
    return state._replace(x=x_next if last is False else jnp.where(lv.last, x0, x_next))

  # The last step returns x0_hat without the predictor's draw: `run` peels it off the loop (see `driver`).
  return driver.Sampler(init, step, stochastic=True, peel_last=True)


def euler_maruyama(m: Bound, *, spacing: str = "linspace", t_min=None, t_max=None):
  """Reverse-SDE Euler-Maruyama, one network call per step."""
  return _sampler(m, spacing=spacing, t_min=t_min, t_max=t_max)


def pc(m: Bound, *, n_corrector: int = 1, snr=0.16, spacing: str = "linspace", t_min=None, t_max=None):
  """Predictor (Euler-Maruyama) + Langevin corrector with signal-to-noise ratio `snr`."""
  return _sampler(m, n_corrector=n_corrector, snr=snr, spacing=spacing, t_min=t_min, t_max=t_max)
