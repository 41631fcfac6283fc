"""The forward process in closed form.

    q(x_t | x0)       = N(alpha_t x0, sigma_t^2 I)
    q(x_t | x_s)      = N(alpha_{t|s} x_s, sigma_{t|s}^2 I),  alpha_{t|s} = alpha_t / alpha_s,
                        sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2            (s < t)
    q(x_s | x_t, x0)  = N(mu, var I),
        var = sigma_s^2 sigma_{t|s}^2 / sigma_t^2 = sigma_s^2 (1 - SNR_t / SNR_s)
        mu  = alpha_{t|s} sigma_s^2 / sigma_t^2 x_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x0
    (Kingma et al. 2021, eqs. 3-4 and appendix A). With a `Discrete` schedule and
    s = t - 1/T these are exactly the DDPM posterior (Ho et al. 2020, eqs. 6-7):
    var = beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t.

Time arrays `t` and `s` are scalars or of shape [B] (one time per example),
broadcast over the trailing dimensions of the data. Schedule math is float32;
results are cast back to the data dtype.

Argument order follows the distribution as written: (schedule, the variables conditioned on, times,
then the noise), e.g. q_sample(schedule, x0, t, eps) draws from q(x_t | x0) and posterior(schedule,
x0, x_t, t, s) is q(x_s | x_t, x0). This differs on purpose from the losses (core/losses.py:
schedule, names, predictions, data, t), which compare a model's output with the process.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusax.core.schedules import Schedule

F32 = jnp.float32


def batch_time(t, x, name: str = "t", x_name: str = "x"):
  """Checks `t` against data `x` and returns it in float32, shaped to broadcast over x.

  `t` may be a scalar or of shape [B] where B = x.shape[0]. Raised at trace time.
  """
  t = jnp.asarray(t)
  x = jnp.asarray(x) if not hasattr(x, "shape") else x
  if t.ndim == 0:
    return t.astype(F32)
  if x.ndim == 0 or t.ndim != 1 or t.shape[0] != x.shape[0]:
    raise ValueError(
        f"{name} must be a scalar or of shape [B] with B = {x_name}.shape[0]; "
        f"got {name}.shape={tuple(t.shape)} and {x_name}.shape={tuple(x.shape)}")
  return t.astype(F32).reshape(t.shape + (1,) * (x.ndim - 1))


def check_same_shape(a, b, a_name: str, b_name: str) -> None:
  if tuple(a.shape) != tuple(b.shape):
    raise ValueError(f"{a_name} and {b_name} must have the same shape; got "
                     f"{a_name}.shape={tuple(a.shape)}, {b_name}.shape={tuple(b.shape)}")


def _out_dtype(*xs):
  dt = jnp.result_type(*xs)
  return dt if jnp.issubdtype(dt, jnp.floating) else F32


def q_sample(schedule: Schedule, x0, t, eps):
  """x_t = alpha(t) x0 + sigma(t) eps.  x0, eps: [B, ...]; t: [B] or scalar."""
  x0, eps = jnp.asarray(x0), jnp.asarray(eps)
  check_same_shape(x0, eps, "x0", "eps")
  tb = batch_time(t, x0, "t", "x0")
  a, s = schedule.alpha(tb), schedule.sigma(tb)
  out = a * x0.astype(F32) + s * eps.astype(F32)
  return out.astype(_out_dtype(x0, eps))


def transition(schedule: Schedule, t, s):
  """(alpha_{t|s}, sigma^2_{t|s}) of q(x_t | x_s), for s < t, in float32."""
  t, s = jnp.asarray(t, F32), jnp.asarray(s, F32)
  a_t, a_s = schedule.alpha(t), schedule.alpha(s)
  s_t, s_s = schedule.sigma(t), schedule.sigma(s)
  r = -jnp.expm1(schedule.log_snr(t) - schedule.log_snr(s))  # 1 - SNR_t / SNR_s
  return a_t / a_s, s_t * s_t * r


def posterior(schedule: Schedule, x0, x_t, t, s):
  """Mean and variance of q(x_s | x_t, x0) for s < t (see module docstring).

  Args:
    x0, x_t: [B, ...] arrays of the same shape.
    t, s: scalars or [B]; s < t elementwise (not checked: values may be traced).
  Returns:
    (mean [B, ...] in the data dtype, var broadcastable to mean, float32).
  """
  x0, x_t = jnp.asarray(x0), jnp.asarray(x_t)
  check_same_shape(x0, x_t, "x0", "x_t")
  tb = batch_time(t, x_t, "t", "x_t")
  sb = batch_time(s, x_t, "s", "x_t")
  a_t, a_s = schedule.alpha(tb), schedule.alpha(sb)
  s_t, s_s = schedule.sigma(tb), schedule.sigma(sb)
  r = -jnp.expm1(schedule.log_snr(tb) - schedule.log_snr(sb))  # sigma_{t|s}^2 / sigma_t^2
  c_xt = a_t * s_s * s_s / (a_s * s_t * s_t)
  c_x0 = a_s * r
  mean = c_xt * x_t.astype(F32) + c_x0 * x0.astype(F32)
  var = s_s * s_s * r
  return mean.astype(_out_dtype(x0, x_t)), var


def learned_variance_log_var(schedule: Schedule, t, s, var_interp, dt=None):
  """log Sigma of the model step s < t: f log beta + (1 - f) log beta_tilde, f = (var_interp + 1) / 2.

  beta = sigma_{t|s}^2 = sigma_t^2 r and beta_tilde = sigma_s^2 r with r = 1 - SNR_t / SNR_s
  (Nichol & Dhariwal 2021, eq. 15; the DDPM sampler's interpolation). Where s = 0, beta_tilde = 0:
  it is replaced by the beta_tilde of the next step (t + dt, t) as in their clipped posterior
  variance; `dt` is needed only then. t, s: [B]; var_interp: [B, ...]; returns [B, ...] float32.
  """
  t, s = jnp.asarray(t, F32), jnp.asarray(s, F32)
  lt, ls = schedule.log_snr(t), schedule.log_snr(s)
  r = jnp.where(s <= 0.0, 1.0, -jnp.expm1(lt - ls))  # s = 0 is the clean end (SNR = inf) on every schedule
  log_large = jnp.log(jnp.square(schedule.sigma(t)) * r)
  small = jnp.square(schedule.sigma(s)) * r
  if dt is not None:
    t2 = jnp.minimum(t + dt, 1.0)
    next_small = jnp.square(schedule.sigma(t)) * -jnp.expm1(schedule.log_snr(t2) - lt)
    small = jnp.where(s <= 0.0, next_small, small)
  log_small = jnp.log(jnp.maximum(small, 1e-20))
  frac = (jnp.asarray(var_interp, F32) + 1.0) / 2.0
  shape = (-1,) + (1,) * (frac.ndim - 1)
  return frac * log_large.reshape(shape) + (1.0 - frac) * log_small.reshape(shape)


def prior(schedule: Schedule):
  """(mean, std) of the prior p(x_1) = N(0, std^2 I) as float32 scalars."""
  return jnp.zeros((), F32), schedule.prior_std


def prior_sample(key, schedule: Schedule, shape, dtype=F32):
  """A draw from the prior N(0, sigma(1)^2 I) of the given shape."""
  return (schedule.prior_std * jax.random.normal(key, shape, F32)).astype(dtype)
