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
from diffusax.core.samplers.model import Bound


def _sampler(m: Bound, heun: bool, *, spacing: str = "trailing", t_min=None, t_max=None):
  schedule = m.schedule
  if t_max is None:
    t_max = grid.default_t_max(schedule, endpoint_ok=m.target in ("flow", "x0", "v"))
  t_at = grid.make(schedule, spacing, t_min, t_max)

  def plan(lv, i, n):
    """Every scalar of step i besides its levels (tabulated per step; see `driver`)."""
    c = dict(dt=lv.t_next - lv.t, w=m.weights(lv.t), d=(schedule.d_alpha(lv.t), schedule.d_sigma(lv.t)))
    if heun:  # The corrector's scalars at t_next; at the last step (no corrector) finite stand-ins at t.
      t_c = jnp.where(lv.last, lv.t, lv.t_next)
      c["w_next"], c["d_next"] = m.weights(t_c), (schedule.d_alpha(t_c), schedule.d_sigma(t_c))
    return c

  init = driver.tabulated_init(t_at, schedule, plan)

  def velocity(x, t, w, d):
    """(u, x0_hat) from one network call; u = d_alpha x0_hat + d_sigma eps_hat."""
    out, _ = m.output(x, t)
    return m.combine(x, out, w, d[0], d[1]), m.x0_eps(x, out, w)[0]

  def step(state, i, last=None):
    c = driver.row(state, i)
    lv = c["levels"]
    last = lv.last if last is None else last
    u, x0 = velocity(state.x, lv.t, c["w"], c["d"])
    x_next = state.x + c["dt"] * u
    if heun:
      def correct():
        u1, _ = velocity(x_next, lv.t_next, c["w_next"], c["d_next"])
        return state.x + c["dt"] * 0.5 * (u + u1)
      x_next = driver.branch(last, lambda: x0, correct)
    else:
      x_next = jnp.where(last, x0, x_next)
    return state._replace(x=x_next)

  # Heun's last step skips the corrector: `run` peels it off the loop (see `driver`).
  return driver.Sampler(init, step, stochastic=False, peel_last=heun)


def flow_euler(m: Bound, *, spacing: str = "trailing", t_min=None, t_max=None):
  """Options: spacing (default "trailing"), t_min, t_max."""
  return _sampler(m, False, spacing=spacing, t_min=t_min, t_max=t_max)


def flow_heun(m: Bound, *, spacing: str = "trailing", t_min=None, t_max=None):
  """Options: spacing (default "trailing"), t_min, t_max."""
  return _sampler(m, True, spacing=spacing, t_min=t_min, t_max=t_max)
