"""Per-call time of each sampler against two hand-written `lax.scan` floors of the same computation.

Trivial denoiser eps_hat = 0.1 x_t (`Model(den, "eps", schedule)`) at batch 64x32x32x3
(float32, CPU); VP rows on `vp_cosine`, the flow rows on `flow`. Two floors per row:

  * "plain": what a user writes from the samplers' docstrings: a `lax.scan` over
    i = 0 .. n - 2 whose body computes the step's grid point t_i, t_{i+1} and
    alpha, sigma (log-SNR, SDE coefficients, ...) from the schedule's methods,
    then the documented update; the last step (to the clean end) after the loop
    returns x0_hat. No tables, no barriers. Its output is checked against the
    sampler's (same model calls, same grid, same noise draws from
    fold_in(fold_in(key, i), sub)), so both compute the same thing.
  * "coef": the same elementwise updates on precomputed per-step coefficient arrays
    (no grid or schedule code in the program at all); its numbers are not a sampler's.

The "+cfg" rows wrap a label-dependent denoiser in `guidance.cfg` (traced scale);
their floors do the same doubled-batch call ([x; x], [labels; null], split, combine).

Each row is timed with the step count static (`static_argnums`, as the programs
and the sampling job call a sampler) and traced (`jit(f)(x, key, n)` with
max_steps = n: one program for every n <= max_steps). The four calls of a row
alternate in a shuffled order every round (the machine is shared and noisy);
"ratio" is sampler median / floor median, "paired" the median and quartiles of
the per-round ratios. Run by hand:

    PYTHONPATH=src python benchmarks/sampler_overhead.py [--steps 50,200] [--budget 3] [--methods ddim,heun]

Writes benchmarks/sampler_overhead.json (unless --methods picks a subset) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusax.core import distill, guidance, samplers, schedules
from diffusax.core.model import Model

SHAPE = (64, 32, 32, 3)
NULL = 10  # the "no label" value of the cfg rows
RHO = 7.0
SNR = 0.16
den = lambda x, t, c: 0.1 * x
den_c = lambda x, t, c: 0.1 * x * (1.0 + 0.01 * c.astype(jnp.float32)[:, None, None, None])  # label-dependent
VP = schedules.get("vp_cosine")
FLOW = schedules.get("flow")
T_MIN, T_MAX = 1e-3, 1.0 - 1e-3  # the documented default ends on vp_cosine (grid.default_t_min/max)


def _normal(key, i, sub=None):
  k = jax.random.fold_in(key, i)
  k = k if sub is None else jax.random.fold_in(k, sub)
  return jax.random.normal(k, SHAPE, jnp.float32)


def _guided(x, labels, w):
  """What guidance.cfg computes around den_c: one call on the doubled batch, then out_c + w (out_c - out_u)."""
  b = x.shape[0]
  out = den_c(jnp.concatenate([x, x]), None, jnp.concatenate([labels, jnp.full_like(labels, NULL)]))
  oc, ou = out[:b], out[b:]
  return oc + w * (oc - ou)


# ---------------------------------------------------------------------------------------------
# "plain" floors: scalars computed in the scan body from the documented grid and schedule.

def _frac(i, n):
  return i.astype(jnp.float32) / (n - 1)


def _t_linspace(i, n):
  return T_MAX + (T_MIN - T_MAX) * _frac(i, n)


def _t_karras(i, n, sch=VP):
  s_max, s_min = sch.edm_sigma(T_MAX) ** (1 / RHO), sch.edm_sigma(T_MIN) ** (1 / RHO)
  return sch.t_from_edm_sigma((s_max + (s_min - s_max) * _frac(i, n)) ** RHO)


def _t_log_snr(i, n, sch=VP):
  lo, hi = sch.log_snr(T_MAX), sch.log_snr(T_MIN)
  return sch.t_from_log_snr(lo + (hi - lo) * _frac(i, n))


def _t_trailing(i, n):
  return T_MAX * (1.0 - i.astype(jnp.float32) / n)


def _x0(x, eps, sch, t):
  return (x - sch.sigma(t) * eps) / sch.alpha(t)


def _scan(body, x, n):
  return jax.lax.scan(lambda c, i: (body(c, i), None), x, jnp.arange(n - 1))[0]


def plain_ddim(x, key, n, eps_fn=lambda x: den(x, None, None)):
  """DDIM, eta = 0: x_s = alpha_s x0_hat + sigma_s eps_hat on the linspace grid."""
  def body(x, i):
    t, s = _t_linspace(i, n), _t_linspace(i + 1, n)
    eps = eps_fn(x)
    return VP.alpha(s) * _x0(x, eps, VP, t) + VP.sigma(s) * eps
  x = _scan(body, x, n)
  return _x0(x, eps_fn(x), VP, _t_linspace(jnp.int32(n - 1), n))


def plain_ddpm(x, key, n):
  """Ancestral DDPM (variance "small"): r = -expm1(lambda_t - lambda_s), mean alpha_s x0 + sigma_s sqrt(1-r) eps,
  std sigma_s sqrt(r), z from fold_in(key, i)."""
  def body(x, i):
    t, s = _t_linspace(i, n), _t_linspace(i + 1, n)
    r = -jnp.expm1(VP.log_snr(t) - VP.log_snr(s))
    eps = den(x, None, None)
    mean = VP.alpha(s) * _x0(x, eps, VP, t) + VP.sigma(s) * jnp.sqrt(1.0 - r) * eps
    return mean + VP.sigma(s) * jnp.sqrt(r) * _normal(key, i)
  x = _scan(body, x, n)
  return _x0(x, den(x, None, None), VP, _t_linspace(jnp.int32(n - 1), n))


def plain_euler(x, key, n, heun=False):
  """EDM Euler / Heun in x~ = x / alpha, s = sigma / alpha, on the Karras grid; the last step returns D."""
  def body(x, i):
    t, tn = _t_karras(i, n), _t_karras(i + 1, n)
    a, an = VP.alpha(t), VP.alpha(tn)
    s, sn = VP.sigma(t) / a, VP.sigma(tn) / an
    xs = x / a
    d = (xs - _x0(x, den(x, None, None), VP, t)) / s
    xn = xs + (sn - s) * d
    if heun:
      xi = an * xn
      d1 = (xn - _x0(xi, den(xi, None, None), VP, tn)) / sn
      xn = xs + (sn - s) * 0.5 * (d + d1)
    return an * xn
  x = _scan(body, x, n)
  return _x0(x, den(x, None, None), VP, _t_karras(jnp.int32(n - 1), n))


def plain_dpm(x, key, n, eps_fn=lambda x: den(x, None, None)):
  """DPM-Solver++(2M) on the log-SNR grid, lambda = log_snr / 2."""
  def body(carry, i):
    x, prev = carry
    t, tn, tp = _t_log_snr(i, n), _t_log_snr(i + 1, n), _t_log_snr(jnp.maximum(i - 1, 0), n)
    h = 0.5 * (VP.log_snr(tn) - VP.log_snr(t))
    h_prev = 0.5 * (VP.log_snr(t) - VP.log_snr(tp))
    inv2r = jnp.where(i == 0, 0.0, 0.5 * h / h_prev)
    x0 = _x0(x, eps_fn(x), VP, t)
    d = (1.0 + inv2r) * x0 - inv2r * prev
    return (VP.sigma(tn) / VP.sigma(t) * x - VP.alpha(tn) * jnp.expm1(-h) * d, x0)
  x, _ = _scan(body, (x, jnp.zeros_like(x)), n)
  return _x0(x, eps_fn(x), VP, _t_log_snr(jnp.int32(n - 1), n))


def plain_flow(x, key, n, heun=False):
  """Flow Euler / Heun on the trailing grid, u = alpha' x0_hat + sigma' eps_hat = eps_hat - x0_hat on `flow`."""
  def u(x, t):
    eps = den(x, None, None)
    return eps - _x0(x, eps, FLOW, t)
  def body(x, i):
    t, tn = _t_trailing(i, n), _t_trailing(i + 1, n)
    u0 = u(x, t)
    xn = x + (tn - t) * u0
    if heun:
      xn = x + (tn - t) * 0.5 * (u0 + u(xn, tn))
    return xn
  x = _scan(body, x, n)
  return _x0(x, den(x, None, None), FLOW, _t_trailing(jnp.int32(n - 1), n))


def _em(x, t, s, key, i):
  f, g2 = VP.sde(t)
  score = -den(x, None, None) / VP.sigma(t)
  return x - (f * x - g2 * score) * (t - s) + jnp.sqrt(g2 * (t - s)) * _normal(key, i, 0)


def plain_em(x, key, n):
  """Reverse-SDE Euler-Maruyama on the linspace grid: x_s = x - (f x - g^2 score) dt + g sqrt(dt) z."""
  x = _scan(lambda x, i: _em(x, _t_linspace(i, n), _t_linspace(i + 1, n), key, i), x, n)
  return _x0(x, den(x, None, None), VP, _t_linspace(jnp.int32(n - 1), n))


def _bnorm(x):
  return jnp.mean(jnp.sqrt(jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=1)))


def _langevin(x, t, a, key, i):
  """One corrector step: e = 2 a (snr ||z|| / ||score||)^2 (batch-mean norms), x + e score + sqrt(2 e) z."""
  score = -den(x, None, None) / VP.sigma(t)
  z = _normal(key, i, 1)
  e = 2.0 * a * (SNR * _bnorm(z) / jnp.maximum(_bnorm(score), 1e-20)) ** 2
  return x + e * score + jnp.sqrt(2.0 * e) * z


def plain_pc(x, key, n):
  """One Langevin corrector (a = (alpha_t / alpha_s)^2 on VP) then the Euler-Maruyama predictor."""
  def body(x, i):
    t, s = _t_linspace(i, n), _t_linspace(i + 1, n)
    x = _langevin(x, t, (VP.alpha(t) / VP.alpha(s)) ** 2, key, i)
    return _em(x, t, s, key, i)
  x = _scan(body, x, n)
  i = jnp.int32(n - 1)
  t = _t_linspace(i, n)
  x = _langevin(x, t, 1.0, key, i)
  return _x0(x, den(x, None, None), VP, t)


def _lam(i, n):
  """lambda = log(alpha / sigma) = log_snr / 2 at point i of the log-SNR grid."""
  return 0.5 * VP.log_snr(_t_log_snr(i, n))


def plain_dpm3m(x, key, n):
  """DPM-Solver++(3M) (Lu et al. 2022b; n >= 15, so order min(3, i + 1) and no lower-order final):
  D1_0 = (m_i - m_{i-1}) / r0, D1_1 = (m_{i-1} - m_{i-2}) / r1, D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1),
  D2 = (D1_0 - D1_1) / (r0 + r1), x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} phi m_i
  + alpha_{i+1} (phi/h + 1) D1 - alpha_{i+1} ((phi + h)/h^2 - 1/2) D2 (phi = expm1(-h)). The D's are
  written as scalar weights on (m_i, m_{i-1}, m_{i-2}), then one combination of the three arrays."""
  def body(carry, i):
    x, m1, m2 = carry
    t, tn = _t_log_snr(i, n), _t_log_snr(i + 1, n)
    lam, lam_n = _lam(i, n), _lam(i + 1, n)
    lam1, lam2 = _lam(jnp.maximum(i - 1, 0), n), _lam(jnp.maximum(i - 2, 0), n)
    h = lam_n - lam
    r0 = jnp.where(i >= 1, (lam - lam1) / h, 1.0)
    r1 = jnp.where(i >= 2, (lam1 - lam2) / h, 1.0)
    a, phi = VP.alpha(tn), jnp.expm1(-h)
    d10 = jnp.stack([1.0 / r0, -1.0 / r0, 0.0])
    d11 = jnp.stack([0.0, 1.0 / r1, -1.0 / r1])
    d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
    d2 = (d10 - d11) / (r0 + r1)
    e0 = jnp.array([1.0, 0.0, 0.0])
    w3 = -a * phi * e0 + a * (phi / h + 1.0) * d1 - a * ((phi + h) / h ** 2 - 0.5) * d2
    w2 = -a * phi * (e0 + 0.5 * d10)          # 2M: D = m_i + (m_i - m_{i-1}) / (2 r0)
    w1 = -a * phi * e0
    w = jnp.where(i == 0, w1, jnp.where(i == 1, w2, w3))
    x0 = _x0(x, den(x, None, None), VP, t)
    return (VP.sigma(tn) / VP.sigma(t) * x + w[0] * x0 + w[1] * m1 + w[2] * m2, x0, m1)
  z = jnp.zeros_like(x)
  x = _scan(body, (x, z, z), n)[0]
  return _x0(x, den(x, None, None), VP, _t_log_snr(jnp.int32(n - 1), n))


def _unipc_b(h, count):
  """b_1..b_count of UniPC-bh2 (Zhao et al. 2023, eq. 8-10, B(h) = expm1(-h)): with hh = -h,
  phi_1 h = expm1(hh), then b_j = j! (h phi_{j+1}) / B(h) by the recursion h phi_{k+1} = h phi_k / hh - 1/k!."""
  hh = -h
  bh = jnp.expm1(hh)
  hphi, fact, out = bh / hh - 1.0, 1.0, []
  for j in range(1, count + 1):
    out.append(hphi * fact / bh)
    fact *= j + 1
    hphi = hphi / hh - 1.0 / fact
  return out


def plain_unipc(x, key, n):
  """UniPC-2 with its corrector UniC (bh2; n > 2): predictor x_{i+1} = c x_i - alpha phi m_i
  - alpha B(h) rho (m_{i-1} - m_i) / r (order 2, rho = 1/2, r = (lambda_{i-1} - lambda_i)/h; order 1 at i = 0);
  corrector of x_i from x_{i-1} with the new m_i: x_i = c x_{i-1} - alpha phi m_{i-1}
  - alpha B(h) sum_k rho_k D_k, D over (m_{i-2}, r) and (m_i, r = 1), rho from [[1, 1], [r, 1]] rho = (b1, b2)
  (order 1, rho = 1/2, at i = 1)."""
  def body(carry, i):
    x, x_prev, m1, m2 = carry
    t = _t_log_snr(i, n)
    x0 = _x0(x, den(x, None, None), VP, t)
    lam, lam1, lam2 = _lam(i, n), _lam(jnp.maximum(i - 1, 0), n), _lam(jnp.maximum(i - 2, 0), n)
    # Corrector of x_i (step i - 1 -> i).
    hc = jnp.where(i > 0, lam - lam1, 1.0)
    ac, bc = VP.alpha(t), jnp.expm1(-hc)
    rc = jnp.where(i > 1, (lam2 - lam1) / hc, -1.0)
    b1, b2 = _unipc_b(hc, 2)
    det = rc - 1.0                                  # [[1, 1], [rc, 1]] rho = [b1, b2]
    rho_e, rho_n = (b2 - b1) / det, (rc * b1 - b2) / det
    rho_e, rho_n = jnp.where(i > 1, rho_e, 0.0), jnp.where(i > 1, rho_n, 0.5)
    corr = (VP.sigma(t) / VP.sigma(_t_log_snr(jnp.maximum(i - 1, 0), n)) * x_prev - ac * bc * m1
            - ac * bc * (rho_e * (m2 - m1) / rc + rho_n * (x0 - m1)))
    xc = jnp.where(i > 0, corr, x)
    # Predictor i -> i + 1.
    tn = _t_log_snr(i + 1, n)
    h = _lam(i + 1, n) - lam
    a, phi = VP.alpha(tn), jnp.expm1(-h)
    r = jnp.where(i > 0, (lam1 - lam) / h, -1.0)
    rho = jnp.where(i > 0, 0.5, 0.0)
    xn = VP.sigma(tn) / VP.sigma(t) * xc - a * phi * x0 - a * phi * rho * (m1 - x0) / r
    return (xn, xc, x0, m1)
  z = jnp.zeros_like(x)
  x = _scan(body, (x, z, z, z), n)[0]
  return _x0(x, den(x, None, None), VP, _t_log_snr(jnp.int32(n - 1), n))


def plain_consistency(x, key, n):
  """Multistep consistency sampling (Song et al. 2023, alg. 1) on the trailing grid: f = a x + b x0_hat
  (`distill.consistency_weights`, boundary 1e-3, sigma_data 0.5), x_{i+1} = alpha_{i+1} f + sigma_{i+1} z_i;
  the last step returns f."""
  def f(x, t):
    a, b = distill.consistency_weights(VP, t, T_MIN, 0.5)
    return a * x + b * _x0(x, den(x, None, None), VP, t)
  def body(x, i):
    tn = _t_trailing(i + 1, n)
    return VP.alpha(tn) * f(x, _t_trailing(i, n)) + VP.sigma(tn) * _normal(key, i)
  x = _scan(body, x, n)
  return f(x, _t_trailing(jnp.int32(n - 1), n))


def plain_ddim_cfg(x, key, n, labels, w):
  return plain_ddim(x, key, n, eps_fn=lambda x: _guided(x, labels, w))


def plain_dpm_cfg(x, key, n, labels, w):
  return plain_dpm(x, key, n, eps_fn=lambda x: _guided(x, labels, w))


# ---------------------------------------------------------------------------------------------
# "coef" floors: the same elementwise updates on precomputed per-step coefficient arrays.

def _coef(n):
  return [jnp.asarray(np.linspace(0.9, 0.1, n) + k * 0.01, jnp.float32) for k in range(4)]


def coef_ddim(x, key, n, eps_fn=lambda x: den(x, None, None)):
  a, s, an, c = _coef(n)
  def body(x, i):
    eps = eps_fn(x)
    x0 = (x - s[i] * eps) / a[i]
    return an[i] * x0 + c[i] * eps, None
  return jax.lax.scan(body, x, jnp.arange(n))[0]


def coef_ddpm(x, key, n):
  a, s, an, c = _coef(n)
  def body(x, i):
    eps = den(x, None, None)
    x0 = (x - s[i] * eps) / a[i]
    return an[i] * x0 + c[i] * eps + s[i] * 0.1 * _normal(key, i), None
  return jax.lax.scan(body, x, jnp.arange(n))[0]


def coef_euler(x, key, n, heun=False):
  a, s, an, c = _coef(n)
  def d(xs, i):
    xi = a[i] * xs
    return (xi - s[i] * den(xi, None, None)) / a[i]
  def body(x, i):
    xs = x / a[i]
    dv = (xs - d(xs, i)) / s[i]
    xn = xs + (c[i] - s[i]) * dv
    if heun:
      xn = xs + (c[i] - s[i]) * 0.5 * (dv + (xn - d(xn, i)) / c[i])
    return an[i] * xn, None
  if not heun:
    return jax.lax.scan(body, x, jnp.arange(n))[0]
  x = jax.lax.scan(body, x, jnp.arange(n - 1))[0]
  return d(x / a[n - 1], n - 1)  # Heun's last step: one call, the denoised mean


def coef_dpm(x, key, n, x0_fn=lambda x, i, s, a: (x - s[i] * den(x, None, None)) / a[i]):
  a, s, an, c = _coef(n)
  def body(carry, i):
    x, prev = carry
    x0 = x0_fn(x, i, s, a)
    dd = (1.0 + c[i]) * x0 - c[i] * prev
    return (s[i] * x - an[i] * dd, x0), None
  return jax.lax.scan(body, (x, jnp.zeros_like(x)), jnp.arange(n))[0][0]


def coef_flow(x, key, n, heun=False):
  a, s, an, c = _coef(n)
  def u(x, i):
    eps = den(x, None, None)
    return eps - (x - s[i] * eps) / a[i]
  def body(x, i):
    u0 = u(x, i)
    xn = x + c[i] * u0
    if heun:
      xn = x + c[i] * 0.5 * (u0 + u(xn, i))
    return xn, None
  if not heun:
    return jax.lax.scan(body, x, jnp.arange(n))[0]
  x = jax.lax.scan(body, x, jnp.arange(n - 1))[0]
  return (x - s[n - 1] * den(x, None, None)) / a[n - 1]  # last step: x0_hat


def coef_em(x, key, n):
  a, s, an, c = _coef(n)
  def body(x, i):
    score = -den(x, None, None) / s[i]
    return x - (a[i] * x - an[i] * score) * c[i] + s[i] * _normal(key, i, 0), None
  return jax.lax.scan(body, x, jnp.arange(n))[0]


def coef_pc(x, key, n):
  a, s, an, c = _coef(n)
  def body(x, i):
    score = -den(x, None, None) / s[i]
    z = _normal(key, i, 1)
    e = 2.0 * an[i] * (SNR * _bnorm(z) / jnp.maximum(_bnorm(score), 1e-20)) ** 2
    x = x + e * score + jnp.sqrt(2.0 * e) * z
    score = -den(x, None, None) / s[i]
    return x - (a[i] * x - an[i] * score) * c[i] + s[i] * _normal(key, i, 0), None
  return jax.lax.scan(body, x, jnp.arange(n))[0]


def coef_dpm3m(x, key, n):
  a, s, an, c = _coef(n)
  def body(carry, i):
    x, m1, m2 = carry
    x0 = (x - s[i] * den(x, None, None)) / a[i]
    return (c[i] * x + an[i] * x0 + s[i] * m1 + a[i] * m2, x0, m1), None
  z = jnp.zeros_like(x)
  return jax.lax.scan(body, (x, z, z), jnp.arange(n))[0][0]


def coef_unipc(x, key, n):
  a, s, an, c = _coef(n)
  def body(carry, i):
    x, x_prev, m1, m2 = carry
    x0 = (x - s[i] * den(x, None, None)) / a[i]
    xc = c[i] * x_prev + an[i] * m1 + s[i] * m2 + a[i] * x0
    return (c[i] * xc + an[i] * x0 + s[i] * m1, xc, x0, m1), None
  z = jnp.zeros_like(x)
  return jax.lax.scan(body, (x, z, z, z), jnp.arange(n))[0][0]


def coef_consistency(x, key, n):
  a, s, an, c = _coef(n)
  def body(x, i):
    f = a[i] * x + s[i] * (x - c[i] * den(x, None, None)) / an[i]
    return an[i] * f + c[i] * _normal(key, i), None
  return jax.lax.scan(body, x, jnp.arange(n))[0]


def coef_ddim_cfg(x, key, n, labels, w):
  return coef_ddim(x, key, n, eps_fn=lambda x: _guided(x, labels, w))


def coef_dpm_cfg(x, key, n, labels, w):
  return coef_dpm(x, key, n, x0_fn=lambda x, i, s, a: (x - s[i] * _guided(x, labels, w)) / a[i])


CASES = {  # row -> (method, schedule, plain floor, coef floor, guided)
    "ddim": ("ddim", VP, plain_ddim, coef_ddim, False),
    "ddpm": ("ddpm", VP, plain_ddpm, coef_ddpm, False),
    "euler": ("euler", VP, plain_euler, coef_euler, False),
    "heun": ("heun", VP, lambda x, k, n: plain_euler(x, k, n, heun=True),
             lambda x, k, n: coef_euler(x, k, n, heun=True), False),
    "dpm_solver_pp_2m": ("dpm_solver_pp_2m", VP, plain_dpm, coef_dpm, False),
    "dpm_solver_pp_3m": ("dpm_solver_pp_3m", VP, plain_dpm3m, coef_dpm3m, False),
    "unipc": ("unipc", VP, plain_unipc, coef_unipc, False),
    "flow_euler": ("flow_euler", FLOW, plain_flow, coef_flow, False),
    "flow_heun": ("flow_heun", FLOW, lambda x, k, n: plain_flow(x, k, n, heun=True),
                  lambda x, k, n: coef_flow(x, k, n, heun=True), False),
    "euler_maruyama": ("euler_maruyama", VP, plain_em, coef_em, False),
    "pc": ("pc", VP, plain_pc, coef_pc, False),
    "consistency": ("consistency", VP, plain_consistency, coef_consistency, False),
    "ddim+cfg": ("ddim", VP, plain_ddim_cfg, coef_ddim_cfg, True),
    "dpm_solver_pp_2m+cfg": ("dpm_solver_pp_2m", VP, plain_dpm_cfg, coef_dpm_cfg, True),
}


def _time_group(fns: dict, repeats: int, budget_s: float, seed: int = 0) -> dict:
  """Seconds per call of each (f, args) in `fns`, all called once per round in a shuffled order.

  At least `repeats` rounds, more for cheap calls (up to about budget_s seconds in all).
  """
  t0 = time.perf_counter()
  for f, a in fns.values():
    jax.block_until_ready(f(*a))
  once = time.perf_counter() - t0
  rounds = max(repeats, min(400, int(budget_s / max(once, 1e-6))))
  names, rng = list(fns), random.Random(seed)
  out = {n: [] for n in names}
  for _ in range(rounds):
    rng.shuffle(names)
    for n in names:
      f, a = fns[n]
      t1 = time.perf_counter()
      jax.block_until_ready(f(*a))
      out[n].append(time.perf_counter() - t1)
  return {n: np.asarray(v) for n, v in out.items()}


def _close(a, b, rel=1e-4):
  """max |a - b| <= rel * max |b| (same computation up to float32 rounding of the per-step scalars)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  err, scale = float(np.max(np.abs(a - b))), float(np.max(np.abs(b)))
  return err <= rel * scale, err / scale


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", default="50,200", help="comma-separated step counts")
  ap.add_argument("--repeats", type=int, default=9, help="minimum rounds per row")
  ap.add_argument("--budget", type=float, default=3.0, help="seconds of timed calls per row and step count")
  ap.add_argument("--methods", default="", help="comma-separated rows (default: all; then the JSON is written)")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "sampler_overhead.json"))
  args = ap.parse_args()
  names = [m for m in args.methods.split(",") if m] or list(CASES)
  unknown = sorted(set(names) - set(CASES))
  if unknown:
    raise SystemExit(f"unknown rows {unknown}; allowed: {list(CASES)}")
  steps = [int(s) for s in args.steps.split(",")]
  x = jax.random.normal(jax.random.key(0), SHAPE)
  key = jax.random.key(1)
  labels = jnp.arange(SHAPE[0], dtype=jnp.int32) % NULL
  w = jnp.float32(2.0)
  rows = {}
  print(f"ms per call at batch {SHAPE}, >= {args.repeats} shuffled rounds, {args.budget:g} s per row "
        f"({jax.devices()[0].platform}); ratio = sampler median / floor median [paired q25-q75]")
  print(f"{'row':22s}{'n':>5s}{'static':>9s}{'traced':>9s}{'plain':>9s}{'coef':>9s}"
        f"{'static/plain':>20s}{'traced/plain':>20s}{'static/coef':>13s}")
  for n in steps:
    for name in names:
      method, sch, plain, coef, guided = CASES[name]
      if guided:
        def f(x, key, n, w, method=method, sch=sch, max_steps=None):
          return samplers.sample(guidance.cfg(Model(den_c, "eps", sch), null_cond=NULL, scale=w), x, key=key,
                                 method=method, num_steps=n, cond=labels, max_steps=max_steps)
        floors = {k: jax.jit(lambda x, key, n, w, fl=fl: fl(x, key, n, labels, w), static_argnums=2)
                  for k, fl in (("plain", plain), ("coef", coef))}
        extra = (w,)
      else:
        def f(x, key, n, method=method, sch=sch, max_steps=None):
          return samplers.sample(Model(den, "eps", sch), x, key=key, method=method, num_steps=n,
                                 max_steps=max_steps)
        floors = {k: jax.jit(fl, static_argnums=2) for k, fl in (("plain", plain), ("coef", coef))}
        extra = ()
      fns = {"static": (jax.jit(f, static_argnums=2), (x, key, n) + extra),
             "traced": (jax.jit(lambda *a, f=f, n=n: f(*a, max_steps=n)), (x, key, jnp.int32(n)) + extra),
             "plain": (floors["plain"], (x, key, n) + extra),
             "coef": (floors["coef"], (x, key, n) + extra)}
      ref = fns["static"][0](*fns["static"][1])
      ok_p, err_p = _close(fns["plain"][0](*fns["plain"][1]), ref)
      ok_t, err_t = _close(fns["traced"][0](*fns["traced"][1]), ref)
      if not (ok_p and ok_t):
        raise SystemExit(f"{name} n={n}: the floor does not compute the sampler's result "
                         f"(relative max error plain {err_p:.2e}, traced {err_t:.2e})")
      ts = _time_group(fns, args.repeats, args.budget)
      med = {k: float(np.median(v)) for k, v in ts.items()}

      def paired(k, floor="plain"):
        r = ts[k] / ts[floor]
        return [float(np.percentile(r, q)) for q in (25, 50, 75)]
      row = {"ms": {k: 1e3 * v for k, v in med.items()},
             "min_ms": {k: 1e3 * float(v.min()) for k, v in ts.items()},
             "rounds": int(len(ts["plain"])),
             "ratio_static_plain": med["static"] / med["plain"], "ratio_traced_plain": med["traced"] / med["plain"],
             "ratio_static_coef": med["static"] / med["coef"], "ratio_traced_coef": med["traced"] / med["coef"],
             "paired_static_plain_q25_q50_q75": paired("static"), "paired_traced_plain_q25_q50_q75": paired("traced"),
             "floor_rel_err": err_p}
      rows[f"{name} n={n}"] = row
      ps, pt = row["paired_static_plain_q25_q50_q75"], row["paired_traced_plain_q25_q50_q75"]
      print(f"{name:22s}{n:5d}{row['ms']['static']:9.2f}{row['ms']['traced']:9.2f}{row['ms']['plain']:9.2f}"
            f"{row['ms']['coef']:9.2f}{row['ratio_static_plain']:8.2f} [{ps[0]:.2f}-{ps[2]:.2f}]"
            f"{row['ratio_traced_plain']:8.2f} [{pt[0]:.2f}-{pt[2]:.2f}]{row['ratio_static_coef']:9.2f}", flush=True)
  if names == list(CASES):
    with open(args.out, "w") as fh:
      json.dump({"shape": SHAPE, "steps": steps, "min_rounds": args.repeats, "budget_s": args.budget,
                 "platform": jax.devices()[0].platform, "rows": rows}, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
