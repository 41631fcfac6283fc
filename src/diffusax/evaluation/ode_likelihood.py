"""Log-likelihood and bits/dim by the probability-flow ODE (Song et al. 2021, sec. 4.3 and app. D.2).

For x_t = alpha(t) x0 + sigma(t) eps the probability-flow ODE is

    dx/dt = f(x, t) = f_sde(t) x - 1/2 g(t)^2 score(x, t) = alpha'(t) x0_hat(x, t) + sigma'(t) eps_hat(x, t)

(the second form, with the model's (x0_hat, eps_hat) from any target via
`samplers.Model.predict`, holds for VP, VE and flow schedules alike), and along
a trajectory  d log p_t(x_t)/dt = -div f(x_t, t)  (instantaneous change of
variables, Chen et al. 2018). Integrating from x_{t_min} = x (the data point)
to t_max:

    log p_{t_min}(x) = log N(x_{t_max}; 0, (sigma^2 + alpha^2)(t_max) I) + int_{t_min}^{t_max} div f(x_t, t) dt

(the prior is exact for alpha(t_max) = 0 and the usual approximation
otherwise). The divergence is exact (one JVP per dimension; small data) or
Hutchinson's estimate v^T (df/dx) v with one Rademacher or Gaussian probe v per
example (or the mean of several) held fixed along the trajectory (Grathwohl et al. 2018), an unbiased
estimate of the integral. Fixed-grid Euler, Heun or RK4 on a grid uniform in
log-SNR (default: small steps in t where the drift is stiff, e.g. near t = 1
for VP cosine, where f_sde = alpha'/alpha diverges) or uniform in t. Where
alpha(1) = 0 and the model is not a flow model, take t_max < 1 (the drift is
singular at t = 1); `default_t_max` does that.

Dequantisation for 8-bit data x in {0..255} scaled as y = x / 127.5 - 1:
y~ = (x + u - 1/2) / 127.5 - 1 with u ~ U[0, 1)^D (bins of width 1/127.5
centred on the training values); then
-log P(x) <= E_u[-log p(y~)] + D log 127.5  (Theis et al. 2016; Ho et al. 2019),
so bits/dim = (-log p(y~) + D log 127.5) / (D ln 2).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from diffusax.core.samplers import Model

F32 = jnp.float32
SOLVERS = ("euler", "heun", "rk4")
DIVERGENCES = ("rademacher", "gaussian", "exact")
DEQUANT_LOG_SCALE = math.log(127.5)  # log of 1 / bin width in the [-1, 1] scaling of 8-bit data


def pf_ode_drift(denoise: Callable, target: str, schedule, cond=None) -> Callable:
  """f(x [B, ...], t scalar) = alpha'(t) x0_hat + sigma'(t) eps_hat: [B, ...] float32."""
  m = Model(denoise, target, schedule, cond)

  def f(x, t):
    x0, eps, _ = m.predict(x, t)
    return schedule.d_alpha(t) * x0 + schedule.d_sigma(t) * eps

  return f


def _sum(x):
  return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def _div_fn(f, divergence: str, probe):
  """(x, t) -> (f(x, t), div f [B]) with the chosen estimator."""
  if divergence == "exact":
    def fd(x, t):
      fx = f(x, t)
      d = x[0].size
      basis = jnp.eye(d, dtype=F32).reshape((d,) + x.shape[1:])

      def one(e):
        v = jnp.broadcast_to(e, x.shape)
        return _sum(v * jax.jvp(lambda y: f(y, t), (x,), (v,))[1])
      return fx, jnp.sum(jax.lax.map(one, basis), axis=0)
    return fd

  def fd(x, t):  # probe [P, B, ...]: the mean of P independent estimates.
    fx, jv = jax.vmap(lambda v: jax.jvp(lambda y: f(y, t), (x,), (v,)))(probe)
    return fx[0], jnp.mean(jax.vmap(_sum)(probe * jv), axis=0)
  return fd


def ode_log_likelihood(denoise: Callable, target: str, schedule, x, key, *, cond=None, num_steps: int = 50,
                       solver: str = "heun", divergence: str = "rademacher", t_min: float = 1e-3,
                       t_max: float = 1.0, grid: str = "log_snr", num_probes: int = 1):
  """log p_{t_min}(x) [B] in nats by the PF-ODE (see module docstring), and x_{t_max}.

  Args:
    denoise, target, schedule: the model as the samplers see it; cond passed through.
    x: [B, ...] continuous data (dequantise 8-bit data first, see `dequantize`).
    key: PRNG key of the Hutchinson probes (unused for divergence="exact").
    num_probes: Hutchinson probes per example (their estimates are averaged).
  Returns: (log_p [B] float32, x_T [B, ...]).
  """
  if solver not in SOLVERS:
    raise ValueError(f"unknown ODE solver {solver!r}; allowed: {list(SOLVERS)}")
  if divergence not in DIVERGENCES:
    raise ValueError(f"unknown divergence {divergence!r}; allowed: {list(DIVERGENCES)}")
  if not 0.0 <= t_min < t_max <= 1.0:
    raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
  x = jnp.asarray(x, F32)
  if divergence == "rademacher":
    probe = jax.random.rademacher(key, (num_probes,) + x.shape, F32)
  elif divergence == "gaussian":
    probe = jax.random.normal(key, (num_probes,) + x.shape, F32)
  else:
    probe = None
  fd = _div_fn(pf_ode_drift(denoise, target, schedule, cond), divergence, probe)
  grid = time_grid(schedule, num_steps, t_min, t_max, grid)

  def step(carry, i):
    y, acc = carry
    t0, t1 = grid[i], grid[i + 1]
    h = t1 - t0
    k1, d1 = fd(y, t0)
    if solver == "euler":
      dy, dd = k1, d1
    elif solver == "heun":
      k2, d2 = fd(y + h * k1, t1)
      dy, dd = 0.5 * (k1 + k2), 0.5 * (d1 + d2)
    else:
      tm = t0 + 0.5 * h
      k2, d2 = fd(y + 0.5 * h * k1, tm)
      k3, d3 = fd(y + 0.5 * h * k2, tm)
      k4, d4 = fd(y + h * k3, t1)
      dy, dd = (k1 + 2 * k2 + 2 * k3 + k4) / 6, (d1 + 2 * d2 + 2 * d3 + d4) / 6
    return (y + h * dy, acc + h * dd), None

  (x_T, integral), _ = jax.lax.scan(step, (x, jnp.zeros((x.shape[0],), F32)), jnp.arange(num_steps))
  t1 = jnp.asarray(t_max, F32)
  var = schedule.sigma(t1) ** 2 + schedule.alpha(t1) ** 2
  d = x[0].size
  log_prior = -0.5 * _sum(x_T * x_T) / var - 0.5 * d * jnp.log(2 * math.pi * var)
  return log_prior + integral, x_T


def time_grid(schedule, num_steps: int, t_min: float, t_max: float, kind: str = "log_snr"):
  """num_steps + 1 ascending times from t_min to t_max, uniform in log-SNR or in t.

  log_snr falls back to uniform in t when log-SNR is infinite at an end (t = 0, or t = 1 for flows).
  """
  if kind not in ("log_snr", "uniform"):
    raise ValueError(f"unknown ODE grid {kind!r}; allowed: ['log_snr', 'uniform']")
  uniform = jnp.linspace(t_min, t_max, num_steps + 1, dtype=F32)
  if kind == "uniform":
    return uniform
  lo, hi = schedule.log_snr(jnp.float32(t_min)), schedule.log_snr(jnp.float32(t_max))
  g = schedule.t_from_log_snr(jnp.linspace(lo, hi, num_steps + 1, dtype=F32))
  g = g.at[0].set(t_min).at[-1].set(t_max)
  return jnp.where(jnp.isfinite(lo) & jnp.isfinite(hi), g, uniform)  # works on traced schedules too


def default_t_max(schedule, target: str, margin: float = 1e-3) -> float:
  """1, or 1 - margin where alpha(1) = 0 and the drift is singular at t = 1 for this target."""
  a1 = float(schedule.alpha(jnp.float32(1.0)))
  return 1.0 if a1 > 0 or (schedule.kind == "flow" and target in ("flow", "x0", "v")) else 1.0 - margin


def dequantize(x_uint8, key):
  """8-bit data [B, ...] -> float32 in [-1, 1] scaling with uniform noise within each level's bin."""
  u = jax.random.uniform(key, jnp.shape(x_uint8), F32)
  return (jnp.asarray(x_uint8, F32) + u - 0.5) / 127.5 - 1.0


def bits_per_dim(log_p, num_dims: int, dequantized: bool = False):
  """[B] nats of a continuous density -> bits/dim (of the 8-bit data when `dequantized`)."""
  nll = -jnp.asarray(log_p, F32) + (num_dims * DEQUANT_LOG_SCALE if dequantized else 0.0)
  return nll / (num_dims * math.log(2.0))
