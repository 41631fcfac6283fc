"""Conversions between prediction targets.

With x_t = alpha x0 + sigma eps the targets are
    eps    the noise
    x0     the clean data
    v      alpha eps - sigma x0                       (Salimans & Ho 2022)
    score  grad_x log q(x_t | x0) = -eps / sigma
    flow   dx_t/dt = alpha' x0 + sigma' eps           (for `Flow`: eps - x0)
Every target is converted through the pair (x0, eps), solving the 2x2 linear
system formed by x_t and the target; only the eps and score sources divide by
alpha (so they cannot give x0 where alpha = 0). `convert` takes alpha and sigma (and alpha', sigma' for flow) as
scalars, [B] arrays (expanded over x_t) or arrays broadcastable to x_t;
`convert_at` reads them from a schedule at time t.
"""
from __future__ import annotations

import jax.numpy as jnp

F32 = jnp.float32
TARGETS = ("eps", "x0", "v", "score", "flow")


def check_target(name: str, arg: str = "target") -> str:
  if name not in TARGETS:
    raise ValueError(f"unknown {arg} {name!r}; allowed: {list(TARGETS)}")
  return name


def expand(c, x, name):
  """A coefficient for x [B, ...]: a scalar as is, [B] as [B, 1, ...] (one per example), else it must
  broadcast to x; None passes through. Raises naming `name` on a shape that fits neither."""
  if c is None:
    return None
  c = jnp.asarray(c, F32)
  if c.ndim == 1 and x.ndim > 1:
    if c.shape[0] != x.shape[0]:
      raise ValueError(f"{name} of shape {tuple(c.shape)} does not match the batch of x_t {tuple(x.shape)}")
    return c.reshape(c.shape + (1,) * (x.ndim - 1))
  try:
    jnp.broadcast_shapes(c.shape, x.shape)
  except ValueError:
    raise ValueError(f"{name} of shape {tuple(c.shape)} does not broadcast to x_t {tuple(x.shape)}") from None
  return c


def to_x0_eps(target, pred, x_t, alpha, sigma, d_alpha=None, d_sigma=None):
  """Returns (x0, eps) in float32 implied by a prediction of `target` at x_t."""
  check_target(target, "src")
  pred, x_t = jnp.asarray(pred, F32), jnp.asarray(x_t, F32)
  if pred.shape != x_t.shape:
    raise ValueError(f"pred and x_t must have the same shape; got {tuple(pred.shape)} and {tuple(x_t.shape)}")
  a, s = expand(alpha, x_t, "alpha"), expand(sigma, x_t, "sigma")
  da, ds = expand(d_alpha, x_t, "d_alpha"), expand(d_sigma, x_t, "d_sigma")
  w_x0_x, w_x0_p, w_eps_x, w_eps_p = x0_eps_weights(target, a, s, da, ds)
  return w_x0_x * x_t + w_x0_p * pred, w_eps_x * x_t + w_eps_p * pred


def x0_eps_weights(target, alpha, sigma, d_alpha=None, d_sigma=None):
  """Scalars (A, B, C, D) with x0 = A x_t + B pred and eps = C x_t + D pred (the solve `to_x0_eps` applies).

  Samplers that tabulate them per step convert with two multiply-adds per
  element and no divide. alpha, sigma (and d_alpha, d_sigma for 'flow') are
  scalars or arrays of one shape; the weights have that shape, float32.
  """
  check_target(target)
  a, s = jnp.asarray(alpha, F32), jnp.asarray(sigma, F32)
  zero, one = jnp.zeros_like(a * s), jnp.ones_like(a * s)
  if target == "eps":
    return 1.0 / a, -s / a, zero, one
  if target == "x0":
    return zero, one, 1.0 / s, -a / s
  if target == "v":
    n = a * a + s * s
    return a / n, -s / n, s / n, a / n
  if target == "score":
    return 1.0 / a, s * s / a, zero, -s
  if d_alpha is None or d_sigma is None:
    raise ValueError("converting the 'flow' target needs d_alpha and d_sigma (d alpha/dt, d sigma/dt)")
  da, ds = jnp.asarray(d_alpha, F32), jnp.asarray(d_sigma, F32)
  det = a * ds - s * da
  return ds / det, -s / det, -da / det, a / det


def from_x0_eps(target, x0, eps, alpha, sigma, d_alpha=None, d_sigma=None):
  """The value of `target` for the pair (x0, eps), float32."""
  check_target(target, "dst")
  x0, eps = jnp.asarray(x0, F32), jnp.asarray(eps, F32)
  a, s = expand(alpha, x0, "alpha"), expand(sigma, x0, "sigma")
  if target == "eps":
    return eps
  if target == "x0":
    return x0
  if target == "v":
    return a * eps - s * x0
  if target == "score":
    return -eps / s
  if d_alpha is None or d_sigma is None:
    raise ValueError("converting to the 'flow' target needs d_alpha and d_sigma (d alpha/dt, d sigma/dt)")
  da, ds = expand(d_alpha, x0, "d_alpha"), expand(d_sigma, x0, "d_sigma")
  return da * x0 + ds * eps


def convert(src, dst, pred, x_t, alpha, sigma, d_alpha=None, d_sigma=None):
  """Converts a prediction of `src` at x_t into `dst`; float32 result.

  Args:
    pred, x_t: [B, ...] arrays of one shape.
    src, dst: names in TARGETS.
    alpha, sigma (and d_alpha, d_sigma when either side is 'flow'): scalars,
      [B], or broadcastable to x_t.
  """
  check_target(src, "src")
  check_target(dst, "dst")
  if src == dst:
    return jnp.asarray(pred, F32)
  x0, eps = to_x0_eps(src, pred, x_t, alpha, sigma, d_alpha, d_sigma)
  return from_x0_eps(dst, x0, eps, alpha, sigma, d_alpha, d_sigma)


def coefficients(schedule, t):
  """(alpha, sigma, d_alpha, d_sigma) of a schedule at t, float32."""
  t = jnp.asarray(t, F32)
  return schedule.alpha(t), schedule.sigma(t), schedule.d_alpha(t), schedule.d_sigma(t)


def convert_at(schedule, src, dst, pred, x_t, t):
  """`convert` with the coefficients read from `schedule` at t (scalar or [B])."""
  a, s, da, ds = coefficients(schedule, t)
  return convert(src, dst, pred, x_t, a, s, da, ds)


def x0_mse_factor(target, alpha, sigma, d_alpha=None, d_sigma=None):
  """c(t) with ||target_hat - target||^2 = c(t) ||x0_hat - x0||^2 at fixed x_t.

  Predictions that differ only through x0_hat at fixed x_t differ linearly:
  eps: SNR = alpha^2/sigma^2; v: (alpha^2+sigma^2)^2/sigma^2; score: alpha^2/sigma^4;
  flow: (d_alpha - d_sigma alpha/sigma)^2; x0: 1.
  """
  check_target(target)
  a, s = jnp.asarray(alpha, F32), jnp.asarray(sigma, F32)
  if target == "x0":
    return jnp.ones_like(a * s)
  if target == "eps":
    return (a / s) ** 2
  if target == "v":
    return (a * a + s * s) ** 2 / (s * s)
  if target == "score":
    return (a / (s * s)) ** 2
  if d_alpha is None or d_sigma is None:
    raise ValueError("the 'flow' target needs d_alpha and d_sigma")
  return (jnp.asarray(d_alpha, F32) - jnp.asarray(d_sigma, F32) * a / s) ** 2
