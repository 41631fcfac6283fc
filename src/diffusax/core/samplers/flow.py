"""Euler and Heun on the flow ODE dx/dt = u(x_t, t) (rectified flow, Liu et al. 2023).

u is the model's prediction converted to the "flow" target,
u = alpha'(t) x0_hat + sigma'(t) eps_hat, which for the `Flow` schedule
(alpha = 1 - t, sigma = t) is eps_hat - x0_hat and the ODE has straight-line
solutions for a single point mass. The default grid is "trailing": n uniform
intervals t_i = t_max (1 - i/n) from t_max = 1 down to 0 (the standard
rectified-flow Euler grid). Step i:

    Euler:  x_{i+1} = x_i + (t_{i+1} - t_i) u(x_i, t_i)
    Heun:   x_{i+1} = x_i + (t_{i+1} - t_i) (u(x_i, t_i) + u(x'_{i+1}, t_{i+1})) / 2

and the last step returns x0_hat (for `Flow` exactly the Euler step to t = 0,
x - t u). Heun costs 2n - 1 network calls. Works on any schedule (the ODE is
the same probability-flow ODE written in t), but is designed for `Flow`.
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusax.core.samplers import driver, grid
from diffusax.core.samplers.model import Model


def _sampler(model: Model, heun: bool, *, spacing: str = "trailing", t_min=None, t_max=None):
  schedule = model.schedule
  if t_max is None:
    t_max = grid.default_t_max(schedule, endpoint_ok=model.target in ("flow", "x0", "v"))
  t_at = grid.make(schedule, spacing, t_min, t_max)

  def levels(state, i):
    return grid.levels(schedule, t_at, i, state.n)

  def init(x_T, key, n):
    return driver.init_state(x_T, key, n)

  def velocity(x, t):
    x0, eps, _ = model.predict(x, t)
    return schedule.d_alpha(t) * x0 + schedule.d_sigma(t) * eps, x0

  def step(state, i, last=None):
    lv = grid.levels(schedule, t_at, i, state.n, last)
    u, x0 = velocity(state.x, lv.t)
    dt = lv.t_next - lv.t
    x_next = state.x + dt * u
    if heun:
      def correct():
        u1, _ = velocity(x_next, lv.t_next)
        return state.x + dt * 0.5 * (u + u1)
      x_next = driver.branch(lv.last, lambda: x0, correct)
    else:
      x_next = jnp.where(lv.last, x0, x_next)
    return state._replace(x=x_next)

  # Heun's last step skips the corrector: `run` peels it off the loop (see `driver`).
  return driver.Sampler(init, lambda s, i: step(s, i), levels, step if heun else None)


def flow_euler(model: Model, **options):
  """Options: spacing (default "trailing"), t_min, t_max."""
  return _sampler(model, False, **options)


def flow_heun(model: Model, **options):
  """Options: spacing (default "trailing"), t_min, t_max."""
  return _sampler(model, True, **options)
