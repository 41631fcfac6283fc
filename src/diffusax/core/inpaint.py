"""Inpainting by replacement, with optional RePaint resampling.

Given known data y [B, ...] and a mask m (1 = known, broadcastable to y), after
every sampler step from t to s the known entries are replaced by a fresh draw
of the forward process at s,

    x_s <- m * (alpha_s y + sigma_s z) + (1 - m) * x_s,      z ~ N(0, I)

(Song et al. 2021, appendix I.2; Lugmayr et al. 2022, eq. 8-9), and at the
last step (s = clean) by y itself, so known pixels come out exact. With
resample = R > 1 (RePaint, Lugmayr et al. 2022, Algorithm 1 with jump length 1)
each step is repeated R times; between repeats the merged x_s is pushed back to
t with q(x_t | x_s) = N(alpha_{t|s} x_s, sigma_{t|s}^2 I), letting the unknown
part harmonise with the known part. Resampling is meant for the stochastic
samplers (ddpm, ddim with eta > 0, euler_maruyama); a repeat starts from the
sampler's state before the step, so multistep history stays consistent.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusax.core.samplers import driver

F32 = jnp.float32
_SUB = 1 << 20  # fold-in offset of the replacement / re-noising draws of step i


def replace(sampler: driver.Sampler, known, mask, *, resample: int = 1) -> driver.Sampler:
  """Wraps a sampler so every step keeps the known entries consistent with q(x_s | y)."""
  if not isinstance(resample, int) or resample < 1:
    raise ValueError(f"resample must be a static int >= 1, got {resample!r}")
  known = jnp.asarray(known, F32)
  mask = jnp.asarray(mask, F32)
  try:
    jnp.broadcast_shapes(mask.shape, known.shape)
  except ValueError:
    raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to known {tuple(known.shape)}") from None

  def init(x_T, key, n, max_steps):
    if tuple(known.shape) != tuple(jnp.shape(x_T)):
      raise ValueError(f"known has shape {tuple(known.shape)} but x_T has shape {tuple(jnp.shape(x_T))}")
    return sampler.init(x_T, key, n, max_steps)

  def one(state, i, j):
    """Attempt j of step i from `state`: sampler step, then replacement."""
    inner = state if j is None else state._replace(key=driver.step_key(state.key, i, _SUB + j))
    new = sampler.step(inner, i)._replace(key=state.key)
    lv = driver.row(state, i)["levels"]
    z = driver.noise(driver.step_key(state.key, i, _SUB - 1 - (0 if j is None else j)), known.shape)
    known_s = lv.alpha_next * known + lv.sigma_next * z
    return new._replace(x=mask * known_s + (1.0 - mask) * new.x), lv

  def step(state, i, last=None):
    if resample == 1:
      return one(state, i, None)[0]

    def again(j, x):
      # Attempt j, then back to t with q(x_t | x_s): the next attempt starts from there.
      new, lv = one(state._replace(x=x), i, j)
      a = lv.alpha / lv.alpha_next
      std = jnp.sqrt(jnp.maximum(lv.sigma ** 2 - (a * lv.sigma_next) ** 2, 0.0))
      z = driver.noise(driver.step_key(state.key, i, 2 * _SUB + j), known.shape)
      return a * new.x + std * z
    x = jax.lax.fori_loop(0, resample - 1, again, state.x)
    return one(state._replace(x=x), i, resample - 1)[0]

  return driver.Sampler(init, step, stochastic=True)
