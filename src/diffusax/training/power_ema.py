"""Power-function EMA and its post-hoc reconstruction (Karras et al. 2024, EDM2, sec. 3 and app. C).

An EMA of the parameters theta_1, theta_2, ... (theta_k after optimizer step k)
with the power-function profile of exponent gamma averages, at step t,

    theta_hat_t = beta_t theta_hat_{t-1} + (1 - beta_t) theta_t,   beta_t = (1 - 1/t)^(gamma + 1),

(beta_1 = 0: the EMA starts at theta_1). Unrolling, the weight of theta_k in
theta_hat_t is (1 - beta_k) prod_{j=k+1..t} beta_j, and prod_{j=k+1..t} (1 - 1/j) = k / t,
so

    w_t(k) = (k^(gamma+1) - (k-1)^(gamma+1)) / t^(gamma+1) = integral_{k-1}^{k} p_t(s) ds,
    p_t(s) = (gamma + 1) s^gamma / t^(gamma+1)   on [0, t],

exactly: the EMA is the continuous profile p_t integrated over unit bins of
training steps (`discrete_weights`). The profile's width relative to its length
is its relative standard deviation (EDM2 eq. 3 and following):

    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)),

largest (0.2887 = 1/sqrt(12), uniform) at gamma = 0 and falling to 0 as gamma
grows; `gamma_from_sigma_rel` solves the cubic on the branch gamma >= 0.

Post-hoc reconstruction (EDM2 sec. 3.2): with snapshots of EMAs of profiles
p_i (exponents gamma_i, taken at steps t_i), the EMA of any other profile p_*
(gamma_*, end step t_*) is approximated by sum_i x_i theta_hat_i, with x the
least-squares solution of

    min_x || sum_i x_i p_i - p_* ||^2_{L2[0, inf)}   =>   A x = b,
    A_ij = <p_i, p_j>,  b_i = <p_i, p_*>,
    <p_a, p_b> = (g_a + 1)(g_b + 1) m^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a+1) t_b^(g_b+1)),  m = min(t_a, t_b)

in closed form (`inner_products`). The weights over steps of the reconstruction
are then sum_i x_i w_{t_i}(k), the bin integrals of the fitted profile, so the
L2 fit of profiles is the fit of the actual discrete EMAs. A target that equals
one of the snapshots' profiles is reproduced exactly (x = e_i).
Pure numpy in float64: the solve runs once on the host.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)  # gamma = 0: the uniform average over all steps.


def sigma_rel_from_gamma(gamma) -> np.ndarray:
  """Relative standard deviation of the power-function profile of exponent gamma (> -1)."""
  g = np.asarray(gamma, np.float64)
  return np.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def gamma_from_sigma_rel(sigma_rel: float) -> float:
  """The exponent gamma >= 0 whose profile has relative std sigma_rel in (0, 1/sqrt(12)].

  Solves s^2 (g + 2)^2 (g + 3) - (g + 1) = 0, i.e. s^2 g^3 + 7 s^2 g^2 + (16 s^2 - 1) g + (12 s^2 - 1) = 0,
  and takes its largest real root (the branch gamma >= 0, where sigma_rel decreases in gamma).
  """
  s = float(sigma_rel)
  if not 0.0 < s <= SIGMA_REL_MAX + 1e-12:
    raise ValueError(f"sigma_rel must lie in (0, {SIGMA_REL_MAX:.4f}] (1/sqrt(12): the uniform average), got {s}")
  s2 = s * s
  roots = np.roots([s2, 7.0 * s2, 16.0 * s2 - 1.0, 12.0 * s2 - 1.0])
  real = roots[np.abs(roots.imag) < 1e-7 * np.maximum(1.0, np.abs(roots))].real
  return float(max(0.0, real.max()))


def beta(step, gamma) -> np.ndarray:
  """beta_t = (1 - 1/t)^(gamma + 1) for t = step >= 1 (float64 numpy; the train step uses the same formula)."""
  t = np.asarray(step, np.float64)
  with np.errstate(divide="ignore"):  # t = 1: log1p(-1) = -inf, beta = 0.
    return np.exp((np.asarray(gamma, np.float64) + 1.0) * np.log1p(-1.0 / t))


def discrete_weights(t: int, gamma: float, num_steps: int | None = None) -> np.ndarray:
  """w[k - 1] = weight of theta_k in the EMA at step t, k = 1..num_steps (0 after t), in closed form."""
  n = t if num_steps is None else num_steps
  k = np.arange(1, n + 1, dtype=np.float64)
  g1 = float(gamma) + 1.0
  w = ((k / t) ** g1 - ((k - 1.0) / t) ** g1)
  return np.where(k <= t, w, 0.0)


def inner_products(t_a, g_a, t_b, g_b) -> np.ndarray:
  """<p_a, p_b> on [0, inf) of power-function profiles (end steps t, exponents g); broadcasts."""
  t_a, g_a, t_b, g_b = (np.asarray(v, np.float64) for v in (t_a, g_a, t_b, g_b))
  m = np.minimum(t_a, t_b)
  e = g_a + g_b + 1.0
  # Logs keep t^(gamma + 1) finite for large t and gamma.
  log = (np.log(g_a + 1.0) + np.log(g_b + 1.0) + e * np.log(m) - np.log(e)
         - (g_a + 1.0) * np.log(t_a) - (g_b + 1.0) * np.log(t_b))
  return np.exp(log)


def solve(snapshot_steps: Sequence[int], snapshot_gammas: Sequence[float], target_step: int,
          target_gamma: float) -> np.ndarray:
  """x [n]: least-squares coefficients of the snapshots for the target profile (module docstring).

  The Gram matrix is solved by `lstsq` (minimum-norm where snapshots repeat a
  profile). Snapshots after target_step may be given; they are used like any other
  (a profile ending later than the target can still help), but callers normally
  pass only those up to it.
  """
  t = np.asarray(snapshot_steps, np.float64)
  g = np.asarray(snapshot_gammas, np.float64)
  if t.shape != g.shape or t.ndim != 1 or not len(t):
    raise ValueError(f"need one gamma per snapshot step, got {t.shape} steps and {g.shape} gammas")
  if np.any(t < 1) or target_step < 1:
    raise ValueError("snapshot and target steps must be >= 1")
  a = inner_products(t[:, None], g[:, None], t[None, :], g[None, :])
  b = inner_products(t, g, float(target_step), float(target_gamma))
  # Scale rows and columns by the diagonal: the Gram matrix of normalised profiles is well conditioned
  # enough for float64 lstsq at the usual snapshot counts (hundreds).
  d = 1.0 / np.sqrt(np.diag(a))
  x = np.linalg.lstsq(a * d[:, None] * d[None, :], b * d, rcond=1e-13)[0] * d
  return x


def reconstruction_weights(x, snapshot_steps, snapshot_gammas, num_steps: int) -> np.ndarray:
  """The weights over steps 1..num_steps of sum_i x_i theta_hat_i (for checking a reconstruction)."""
  out = np.zeros(num_steps)
  for xi, ti, gi in zip(x, snapshot_steps, snapshot_gammas):
    out += xi * discrete_weights(int(ti), float(gi), num_steps)
  return out
