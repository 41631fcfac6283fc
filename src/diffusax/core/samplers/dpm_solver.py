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
from diffusax.core.samplers.model import Bound


def dpm_solver_pp_2m(m: Bound, *, spacing: str = "log_snr", t_min=None, t_max=None):
  t_at = grid.make(m.schedule, spacing, t_min, t_max)

  def plan(lv, i, n):
    h = 0.5 * (jnp.where(lv.last, lv.log_snr, lv.log_snr_next) - lv.log_snr)
    h_prev = 0.5 * (lv.log_snr - grid.levels(m.schedule, t_at, jnp.maximum(i - 1, 0), n).log_snr)
    inv2r = jnp.where((i == 0) | lv.last, 0.0, 0.5 * h / jnp.where(i == 0, 1.0, h_prev))
    return dict(w=m.weights(lv.t), c_x=lv.sigma_next / lv.sigma, c_d=-lv.alpha_next * jnp.expm1(-h),
                inv2r=inv2r)

  init = driver.tabulated_init(t_at, m.schedule, plan, aux=jnp.zeros_like)  # aux: the previous x0_hat

  def step(state, i, last=None):
    c = driver.row(state, i)
    x0 = m.predict(state.x, c["levels"].t, c["w"]).x0
    d = (1.0 + c["inv2r"]) * x0 - c["inv2r"] * state.aux
    x = jnp.where(c["levels"].last, x0, c["c_x"] * state.x + c["c_d"] * d)
    return state._replace(x=x, aux=x0)

  return driver.Sampler(init, step, stochastic=False)
