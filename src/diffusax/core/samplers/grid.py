"""Time grids computed from the step index, so the step count can be traced.

Every sampler visits n times t_0 = t_max > t_1 > ... > t_{n-1} and then
returns the denoised mean E[x0 | x_{t_{n-1}}]: step i maps x_{t_i} to x_{t_{i+1}}
and the last step (i = n - 1) maps to the clean end, where alpha = 1, sigma = 0.
`t_at(i, n)` evaluates the grid for an int32 index i and a possibly traced n,
so changing n never changes a shape and never recompiles.

Spacings (`SPACINGS`):
  linspace  uniform in t from t_max to t_min. On a `Discrete` schedule of T steps,
            the step indices round(linspace(T - 1, 0, n)) (DDIM / diffusers "linspace").
  leading   `Discrete` only: indices (n - 1 - i) * (T // n) (DDIM's original spacing).
  trailing  indices round(T - i T / n) - 1 (Lin et al. 2024, table 2); on a continuous
            schedule t_i = t_max (1 - i / n), i.e. n uniform intervals down to t = 0
            (the rectified-flow Euler grid; t_min is then t_max / n).
  log_snr   uniform in log-SNR lambda(t) between t_max and t_min (DPM-Solver).
  karras    EDM noise levels s_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho
            (Karras et al. 2022, eq. 5) in s = sigma / alpha, mapped back to t.
A discrete step index k (0-based) sits at t = (k + 1) / T, see `Discrete.t_from_step`.

Default ends (`default_t_min`, `default_t_max`): t_min = 1e-3 for continuous VP
and flow schedules, 0 for VE (sigma(0) = sigma_min > 0), 1 / T (the first knot)
for `Discrete`; t_max = 1 except VPCosine (alpha(1) = 0: 1 - 1e-3) and Flow
(1 - 1e-3 unless the sampler integrates the flow itself, which handles t = 1).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp

from diffusax.core.schedules import VE, Discrete, Flow, Schedule, VPCosine

F32 = jnp.float32
SPACINGS = ("linspace", "leading", "trailing", "log_snr", "karras")


def default_t_min(schedule: Schedule) -> float:
  if isinstance(schedule, Discrete):
    return 1.0 / schedule.num_steps
  if isinstance(schedule, VE):
    return 0.0
  return 1e-3


def default_t_max(schedule: Schedule, endpoint_ok: bool = False) -> float:
  if isinstance(schedule, VPCosine) or (isinstance(schedule, Flow) and not endpoint_ok):
    return 1.0 - 1e-3
  return 1.0


def make(schedule: Schedule, spacing: str, t_min=None, t_max=None, rho: float = 7.0) -> Callable:
  """Returns t_at(i, n) -> float32 scalar time of grid point i of n (0 <= i < n)."""
  if spacing not in SPACINGS:
    raise ValueError(f"unknown spacing {spacing!r}; allowed: {list(SPACINGS)}")
  discrete = isinstance(schedule, Discrete)
  if spacing == "leading" and not discrete:
    raise ValueError("spacing 'leading' needs a Discrete schedule (it is defined on integer steps)")
  t_min = default_t_min(schedule) if t_min is None else t_min
  t_max = default_t_max(schedule) if t_max is None else t_max

  def frac(i, n):  # i / (n - 1), 0 for n = 1
    return jnp.asarray(i, F32) / jnp.maximum(jnp.asarray(n, F32) - 1.0, 1.0)

  if discrete and spacing in ("linspace", "leading", "trailing"):
    big_t = schedule.num_steps

    def t_at(i, n):
      i = jnp.asarray(i, jnp.int32)
      n = jnp.asarray(n, jnp.int32)
      if spacing == "linspace":
        k = jnp.round(((big_t - 1) * (n - 1 - i)).astype(F32) / jnp.maximum(n - 1, 1).astype(F32))
      elif spacing == "leading":
        k = ((n - 1 - i) * (big_t // n)).astype(F32)
      else:
        k = jnp.round(big_t - i.astype(F32) * big_t / n.astype(F32)) - 1.0
      return (jnp.clip(k, 0, big_t - 1) + 1.0) / big_t
    return t_at

  t_min, t_max = jnp.asarray(t_min, F32), jnp.asarray(t_max, F32)
  if spacing == "linspace":
    return lambda i, n: t_max + (t_min - t_max) * frac(i, n)
  if spacing == "trailing":
    return lambda i, n: t_max * (1.0 - jnp.asarray(i, F32) / jnp.asarray(n, F32))
  if spacing == "log_snr":
    lo, hi = schedule.log_snr(t_max), schedule.log_snr(t_min)
    return lambda i, n: schedule.t_from_log_snr(lo + (hi - lo) * frac(i, n))
  s_max, s_min = schedule.edm_sigma(t_max) ** (1.0 / rho), schedule.edm_sigma(t_min) ** (1.0 / rho)
  return lambda i, n: schedule.t_from_edm_sigma((s_max + (s_min - s_max) * frac(i, n)) ** rho)


class Levels(NamedTuple):
  """Noise levels of step i: from t (alpha, sigma, log_snr) to t_next (the clean end when last)."""
  t: jnp.ndarray
  t_next: jnp.ndarray
  alpha: jnp.ndarray
  sigma: jnp.ndarray
  log_snr: jnp.ndarray
  alpha_next: jnp.ndarray
  sigma_next: jnp.ndarray
  log_snr_next: jnp.ndarray  # meaningless when last (a finite stand-in there, log_snr: no inf in a table)
  last: jnp.ndarray          # bool: i == n - 1 (a Python bool when given statically)


def levels(schedule: Schedule, t_at: Callable, i, n, last=None) -> Levels:
  """Levels of step i of n; at the last step alpha_next = 1, sigma_next = 0.

  last: None (computed from i, n as a traced bool) or a static Python bool the
  caller knows (`driver.run` peeling the last step); then no select on it is emitted.
  """
  t = t_at(i, n)
  a, s, l = schedule.alpha(t), schedule.sigma(t), schedule.log_snr(t)
  zero, one = jnp.zeros((), F32), jnp.ones((), F32)
  if last is True:
    return Levels(t, zero, a, s, l, one, zero, l, True)
  if last is False:
    t_next = t_at(i + 1, n)
    return Levels(t, t_next, a, s, l, schedule.alpha(t_next), schedule.sigma(t_next), schedule.log_snr(t_next), False)
  last = jnp.asarray(i) >= jnp.asarray(n) - 1
  t_next = t_at(jnp.minimum(i + 1, n - 1), n)
  a_n, s_n, l_n = schedule.alpha(t_next), schedule.sigma(t_next), schedule.log_snr(t_next)
  return Levels(t, jnp.where(last, 0.0, t_next), a, s, l,
                jnp.where(last, one, a_n), jnp.where(last, zero, s_n), jnp.where(last, l, l_n), last)
