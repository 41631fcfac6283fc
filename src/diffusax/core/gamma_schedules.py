"""Schedules given by gamma(t) = -logSNR(t): VDM's fixed linear-logSNR and learned schedules.

Kingma et al. 2021 (Variational Diffusion Models): alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma).
`Learned` is a monotone network between two end values; its weights are pytree leaves, so a loss
differentiates through every schedule method. Imported into (and registered by) `schedules`.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from diffusax.core.schedules import F32, Schedule, _check, _concrete, _f32, _register


class GammaSchedule(Schedule):
  """A VP schedule given by gamma(t) = -logSNR(t), increasing in t (Kingma et al. 2021, eq. 3):

      alpha(t)^2 = sigmoid(-gamma(t)),   sigma(t)^2 = sigmoid(gamma(t)).

  Subclasses define `gamma`; d logSNR / dt comes from `jax.jvp` of gamma, and `t_from_log_snr`
  inverts gamma by bisection (exact to float32 resolution in 32 halvings) unless overridden.
  """
  kind = "vp"

  def gamma(self, t):
    raise NotImplementedError

  def log_snr(self, t):
    return -self.gamma(t)

  def alpha(self, t):
    return jnp.sqrt(jax.nn.sigmoid(-self.gamma(t)))

  def sigma(self, t):
    return jnp.sqrt(jax.nn.sigmoid(self.gamma(t)))

  def _check_ends(self, name: str) -> None:
    """gamma_1 > gamma_0 for the ends a user passes in (not for traced ones)."""
    lo, hi = _concrete(self.gamma_0), _concrete(self.gamma_1)
    if lo is not None and hi is not None:
      _check(hi > lo, f"{name}: gamma_1 must exceed gamma_0, got gamma_0={lo}, gamma_1={hi}")

  def d_gamma(self, t):
    """d gamma / dt, elementwise, by forward-mode autodiff."""
    t = _f32(t)
    return jax.jvp(self.gamma, (t,), (jnp.ones_like(t),))[1]

  def t_from_log_snr(self, log_snr):
    g = -_f32(log_snr)

    def halve(_, lo_hi):
      lo, hi = lo_hi
      mid = 0.5 * (lo + hi)
      up = self.gamma(mid) < g
      return jnp.where(up, mid, lo), jnp.where(up, hi, mid)

    lo, hi = jax.lax.fori_loop(0, 32, halve, (jnp.zeros_like(g), jnp.ones_like(g)))
    return 0.5 * (lo + hi)


@_register
class LinearLogSNR(GammaSchedule):
  """gamma(t) = gamma_0 + (gamma_1 - gamma_0) t: logSNR falls linearly from -gamma_0 to -gamma_1.

  VDM's fixed baseline (Kingma et al. 2021, gamma_0 = -13.3, gamma_1 = 5)."""
  gamma_0: Any = -13.3
  gamma_1: Any = 5.0

  def __post_init__(self):
    self._check_ends("linear_log_snr")

  def gamma(self, t):
    return self.gamma_0 + (self.gamma_1 - self.gamma_0) * _f32(t)

  def t_from_log_snr(self, log_snr):
    return (-_f32(log_snr) - self.gamma_0) / (self.gamma_1 - self.gamma_0)


def monotone_net_init(key, hidden: int = 1024) -> dict:
  """Initial parameters of `Learned`'s monotone network m(t) (VDM's initialisation, app. H):
  first layer weight 1 and bias 0, the hidden layer N(0, 1) weights and biases, the last layer
  lecun-normal (std 1/sqrt(hidden)), so the initial schedule is near linear with a small bend."""
  k2, k3, k4 = jax.random.split(key, 3)
  return {"l1_w": jnp.ones((), F32), "l1_b": jnp.zeros((), F32),
          "l2_w": jax.random.normal(k2, (hidden,), F32), "l2_b": jax.random.normal(k3, (hidden,), F32),
          "l3_w": jax.random.normal(k4, (hidden,), F32) / math.sqrt(hidden)}


MONOTONE_MIN_SLOPE = 1e-4  # added to |w1|: m is strictly increasing, so gamma is invertible


def monotone_net(net: dict, t):
  """m(t) = h + sum_j |w3_j| (2 sigmoid(|w2_j| h + b2_j) - 1),  h = (|w1| + 1e-4) t + b1.

  Every weight enters through its absolute value (VDM's positive-weight dense layers), so m is
  strictly increasing in t for any parameters; Adam moves the raw weights additively."""
  t = _f32(t)
  h = (jnp.abs(net["l1_w"]) + MONOTONE_MIN_SLOPE) * t + net["l1_b"]
  s = 2.0 * jax.nn.sigmoid(h[..., None] * jnp.abs(net["l2_w"]) + net["l2_b"]) - 1.0
  return h + jnp.sum(jnp.abs(net["l3_w"]) * s, axis=-1)


@_register
class Learned(GammaSchedule):
  """A learned schedule: gamma(t) = gamma_0 + (gamma_1 - gamma_0) (m(t) - m(0)) / (m(1) - m(0)).

  m is `monotone_net` (strictly increasing), so gamma is strictly increasing with exactly the
  end values gamma_0 = gamma(0) and gamma_1 = gamma(1) whatever the network's weights: the
  interior shape is the network's, the ends are the two scalars. All three fields are pytree
  leaves: a training step differentiates a loss with respect to them like any parameters (the
  programs keep them in params["schedule"]; fixed ends stay out of it). Build with
  `Learned(monotone_net_init(key), gamma_0, gamma_1)`.
  """
  net: Any
  gamma_0: Any = -13.3
  gamma_1: Any = 5.0

  def __post_init__(self):
    self._check_ends("learned")

  def gamma(self, t):
    m = lambda u: monotone_net(self.net, u)
    m0, m1 = m(jnp.zeros((), F32)), m(jnp.ones((), F32))
    return self.gamma_0 + (self.gamma_1 - self.gamma_0) * (m(t) - m0) / (m1 - m0)
