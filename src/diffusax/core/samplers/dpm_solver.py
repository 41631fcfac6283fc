"""DPM-Solver++(2M): multistep second-order solver of the PF-ODE in data prediction.

With lambda = log(alpha / sigma) (half the log-SNR) the exact solution of the
PF-ODE from t to s is x_s = (sigma_s/sigma_t) x_t + sigma_s int e^lambda x0_hat dlambda
(Lu et al. 2022b, eq. 9). Approximating x0_hat linearly in lambda from the
current and previous model outputs (their Algorithm 2):

    h_i = lambda_{i+1} - lambda_i,   r_i = h_{i-1} / h_i
    D_i = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1}          (D_0 = x0_0)
    x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} expm1(-h_i) D_i.

The last step to sigma = 0 is first order ("lower order final"): it returns x0_hat.
One network call per step. Default spacing: uniform in log-SNR.
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusax.core.samplers import driver, grid
from diffusax.core.samplers.model import Model


def dpm_solver_pp_2m(model: Model, *, spacing: str = "log_snr", t_min=None, t_max=None):
  schedule = model.schedule
  t_at = grid.make(schedule, spacing, t_min, t_max)

  def levels(state, i):
    return grid.levels(schedule, t_at, i, state.n)

  def init(x_T, key, n):
    x = jnp.asarray(x_T, jnp.float32)
    return driver.init_state(x, key, n, aux=(jnp.zeros_like(x), jnp.zeros((), jnp.float32)))

  def step(state, i):
    lv = levels(state, i)
    x0_prev, h_prev = state.aux
    x0 = model.predict(state.x, lv.t)[0]
    h = 0.5 * (jnp.where(lv.last, lv.log_snr, lv.log_snr_next) - lv.log_snr)
    first = i == 0
    inv2r = jnp.where(first | lv.last, 0.0, 0.5 * h / jnp.where(first, 1.0, h_prev))
    d = (1.0 + inv2r) * x0 - inv2r * x0_prev
    x = (lv.sigma_next / lv.sigma) * state.x - lv.alpha_next * jnp.expm1(-h) * d
    x = jnp.where(lv.last, x0, x)
    return state._replace(x=x, aux=(x0, h))

  return driver.Sampler(init, step, levels)
