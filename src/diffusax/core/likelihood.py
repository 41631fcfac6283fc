"""The discrete-time variational bound (DDPM / VDM) in nats and bits per dimension.

For a time grid t_0 < t_1 < ... < t_N = 1 the negative ELBO of x0 is

    -log p(x0) <= KL(q(x_{t_N}|x0) || p(x_1))                          prior
                + sum_i E_q KL(q(x_{t_{i-1}} | x_{t_i}, x0) || p(x_{t_{i-1}} | x_{t_i}))   diffusion
                - E_q log p(x0 | x_{t_0})                               decoder

(Ho et al. 2020, eq. 5; Kingma et al. 2021, eq. 11). The model step
p(x_s | x_t) = N(mu_q(x_t, x0_hat(x_t, t)), v) uses the posterior mean with the
model's x0 prediction and v the posterior variance ("small", beta_tilde) or
sigma^2_{t|s} ("large", beta). The decoder is N(x0_hat(x_{t_0}), sigma_0^2 I)
with sigma_0 = sigma(t_0) / alpha(t_0) unless given, either continuous
(`gaussian`) or discretised to 256 bins on [-1, 1] (`discretized`, Ho et al.
2020, eq. 13). Each expectation is a single draw of x_t per step, from a key
folded with the step index, so the sum over all steps is unbiased.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from diffusax.core import process
from diffusax.core.schedules import Discrete, Schedule

F32 = jnp.float32
LOG2 = math.log(2.0)


def normal_kl(mean1, var1, mean2, var2):
  """Elementwise KL(N(mean1, var1) || N(mean2, var2)) in nats."""
  return 0.5 * (jnp.log(var2) - jnp.log(var1) + (var1 + jnp.square(mean1 - mean2)) / var2 - 1.0)


def _sum_dims(x):
  return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def prior_kl(schedule: Schedule, x0, t=1.0):
  """KL(q(x_t | x0) || N(0, sigma(1)^2 I)) summed over dimensions: [B] nats."""
  x0 = jnp.asarray(x0, F32)
  t = process.batch_time(t, x0, "t", "x0")  # Scalar or [B], broadcast over the example.
  a, s = schedule.alpha(t), schedule.sigma(t)
  prior_var = schedule.prior_std ** 2
  return _sum_dims(normal_kl(a * x0, s * s, 0.0, prior_var))


def gaussian_log_likelihood(x, mean, log_scale):
  """Elementwise log N(x; mean, exp(log_scale)^2) in nats."""
  z = (x - mean) * jnp.exp(-log_scale)
  return -0.5 * (z * z + math.log(2 * math.pi)) - log_scale


def _approx_std_normal_cdf(x):
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale, num_bins: int = 256):
  """Elementwise log-probability of the bin of x under a Gaussian (Ho et al. 2020, eq. 13).

  x holds data scaled to [-1, 1] on a grid of `num_bins` levels; the first and
  last bins extend to -inf and +inf. Uses the exact normal CDF (log-space at the tails).
  """
  x, mean, log_scale = (jnp.asarray(v, F32) for v in (x, mean, log_scale))
  half = 1.0 / (num_bins - 1)
  inv_std = jnp.exp(-log_scale)
  upper = (x - mean + half) * inv_std
  lower = (x - mean - half) * inv_std
  log_cdf_upper = jax.scipy.special.log_ndtr(upper)
  log_sf_lower = jax.scipy.special.log_ndtr(-lower)
  # log(Phi(upper) - Phi(lower)), computed on the side where it is accurate.
  mid = jnp.where(lower > 0,
                  log_sf_lower + jnp.log(-jnp.expm1(jax.scipy.special.log_ndtr(-upper) - log_sf_lower)),
                  log_cdf_upper + jnp.log(-jnp.expm1(jax.scipy.special.log_ndtr(lower) - log_cdf_upper)))
  return jnp.where(x < -1 + half, log_cdf_upper, jnp.where(x > 1 - half, log_sf_lower, mid))


def ddpm_grid(schedule: Discrete):
  """The knots t_i = i / T, i = 1..T, of a discrete schedule: the DDPM bound's grid."""
  return schedule.t_from_step(jnp.arange(schedule.num_steps))


def uniform_grid(num_steps: int, t_min: float = 1e-3):
  """num_steps + 1 equally spaced times from t_min to 1."""
  return jnp.linspace(t_min, 1.0, num_steps + 1, dtype=F32)


def vlb_terms(schedule: Schedule, denoise_x0: Callable, x0, key, t_grid, *,
              decoder: str = "discretized", model_var: str = "small", decoder_log_scale=None):
  """Terms of the negative ELBO, each [B] in nats summed over dimensions.

  Args:
    denoise_x0: (x_t [B, ...], t [B]) -> x0 prediction [B, ...].
    x0: data [B, ...] (in [-1, 1] on 256 levels for the discretized decoder).
    key: PRNG key; step i uses fold_in(key, i).
    t_grid: [N] ascending times ending at 1 (N - 1 KL steps).
    decoder: "discretized" (8-bit data) or "gaussian" (continuous data).
    model_var: "small" (posterior variance) or "large" (sigma^2_{t|s}).
  Returns: dict with "prior", "diffusion", "decoder" and "total".
  """
  if decoder not in ("discretized", "gaussian"):
    raise ValueError(f"unknown decoder {decoder!r}; allowed: ['discretized', 'gaussian']")
  if model_var not in ("small", "large"):
    raise ValueError(f"unknown model_var {model_var!r}; allowed: ['large', 'small']")
  x0 = jnp.asarray(x0, F32)
  t_grid = jnp.asarray(t_grid, F32)
  if t_grid.ndim != 1 or t_grid.shape[0] < 1:
    raise ValueError(f"t_grid must be a 1-D array of at least one time, got shape {tuple(t_grid.shape)}")
  b = x0.shape[0]

  def kl_step(carry, i):
    s, t = t_grid[i], t_grid[i + 1]
    eps = jax.random.normal(jax.random.fold_in(key, i + 1), x0.shape, F32)
    tb = jnp.full((b,), t)
    sb = jnp.full((b,), s)
    x_t = process.q_sample(schedule, x0, tb, eps)
    x0_hat = jnp.asarray(denoise_x0(x_t, tb), F32)
    mean_q, var_q = process.posterior(schedule, x0, x_t, tb, sb)
    mean_p, _ = process.posterior(schedule, x0_hat, x_t, tb, sb)
    if model_var == "small":
      var_p = var_q
    else:
      var_p = process.transition(schedule, t, s)[1]
    return carry + _sum_dims(normal_kl(mean_q, var_q, mean_p, var_p)), None

  n_kl = t_grid.shape[0] - 1
  diffusion, _ = jax.lax.scan(kl_step, jnp.zeros((b,), F32), jnp.arange(n_kl))

  t0 = t_grid[0]
  eps0 = jax.random.normal(jax.random.fold_in(key, 0), x0.shape, F32)
  t0b = jnp.full((b,), t0)
  x_t0 = process.q_sample(schedule, x0, t0b, eps0)
  x0_hat = jnp.asarray(denoise_x0(x_t0, t0b), F32)
  if decoder_log_scale is None:
    decoder_log_scale = -0.5 * schedule.log_snr(t0)
  if decoder == "discretized":
    ll = discretized_gaussian_log_likelihood(x0, x0_hat, decoder_log_scale)
  else:
    ll = gaussian_log_likelihood(x0, x0_hat, decoder_log_scale)
  dec = -_sum_dims(ll)
  pri = prior_kl(schedule, x0, t_grid[-1])
  return {"prior": pri, "diffusion": diffusion, "decoder": dec, "total": pri + diffusion + dec}


def bits_per_dim(nats, num_dims: int):
  """Converts nats per example into bits per dimension."""
  return jnp.asarray(nats, F32) / (num_dims * LOG2)
