"""The multistep consistency sampler (Song et al. 2023, Algorithm 1).

With the consistency function f(x_t, t) = a(t) x_t + b(t) x0_hat(x_t, t)
(`core.distill.consistency_fn`: a = 1, b = 0 at the boundary time, so f(x, boundary) = x), step i
maps x_{t_i} to

    x0 = f(x_{t_i}, t_i),   x_{t_{i+1}} = alpha_{t_{i+1}} x0 + sigma_{t_{i+1}} z,   z ~ N(0, I),

and the last step returns x0: one network call per step, fresh noise between steps. One step is
the one-step consistency model. The default grid is "trailing" (t_i = t_max (1 - i / n)), the
grid the progressive students are trained on; any `grid` spacing works.
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusax.core.samplers import driver, grid
from diffusax.core.samplers.model import Bound


def consistency(m: Bound, *, sigma_data=0.5, boundary=None, spacing: str = "trailing", t_min=None, t_max=None):
  """Multistep consistency sampling; `sigma_data` and `boundary` (default `grid.default_t_min`) must be
  the ones the consistency model was trained with (`core.distill.consistency_weights`)."""
  from diffusax.core import distill  # The scalings live with the training loss.
  schedule = m.schedule
  boundary = grid.default_t_min(schedule) if boundary is None else boundary

  def plan(lv, i, n):
    a, b = distill.consistency_weights(schedule, lv.t, boundary, sigma_data)
    return {"w": m.weights(lv.t), "a": a, "b": b}

  def step(state, i, last=None):
    c = driver.row(state, i)
    lv = c["levels"]
    out, _ = m.output(state.x, lv.t)
    x0, _ = m.x0_eps(state.x, out, c["w"])
    f = c["a"] * state.x + c["b"] * x0
    if last is True:
      return state._replace(x=f)
    if last is False:
      z = driver.noise(driver.step_key(state.key, i), state.x.shape)
      return state._replace(x=lv.alpha_next * f + lv.sigma_next * z)
    return state._replace(x=driver.add_noise(lv.alpha_next * f, lv.sigma_next, ~lv.last, state.key, i))

  return driver.Sampler(driver.tabulated_init(grid.make(schedule, spacing, t_min, t_max), schedule, plan), step,
                        stochastic=True, peel_last=True)
