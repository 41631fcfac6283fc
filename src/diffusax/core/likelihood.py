"""Likelihood of a `core.Model` by two routes, in nats and bits per dimension.

1. The discrete-time variational bound (DDPM / VDM), `vlb_terms`, and VDM's continuous-time
   bound, `vdm_elbo`.
2. The probability-flow ODE (Song et al. 2021, sec. 4.3 and app. D.2), `ode_log_likelihood`.

The variational bound.

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

The probability-flow ODE. For x_t = alpha(t) x0 + sigma(t) eps the probability-flow ODE is

    dx/dt = f(x, t) = f_sde(t) x - 1/2 g(t)^2 score(x, t) = alpha'(t) x0_hat(x, t) + sigma'(t) eps_hat(x, t)

(the second form, with the model's (x0_hat, eps_hat) from any target via
`Model.predict`, holds for VP, VE and flow schedules alike), and along
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
singular at t = 1); `ode_default_t_max` does that.

Dequantisation for 8-bit data x in {0..255} scaled as y = x / 127.5 - 1:
y~ = (x + u - 1/2) / 127.5 - 1 with u ~ U[0, 1)^D (bins of width 1/127.5
centred on the training values); then
-log P(x) <= E_u[-log p(y~)] + D log 127.5  (Theis et al. 2016; Ho et al. 2019),
so bits/dim = (-log p(y~) + D log 127.5) / (D ln 2).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffusax.core import model as model_lib
from diffusax.core import process
from diffusax.core.model import Model
from diffusax.core.schedules import Discrete, Schedule

F32 = jnp.float32
LOG2 = math.log(2.0)
SOLVERS = ("euler", "heun", "rk4")
DIVERGENCES = ("rademacher", "gaussian", "exact")
DEQUANT_LOG_SCALE = math.log(127.5)  # log of 1 / bin width in the [-1, 1] scaling of 8-bit data


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


def vlb_terms(model: Model, x0, key, t_grid, *, cond: Any = None, decoder: str = "discretized",
              model_var: str = "auto", decoder_log_scale=None, num_bins: int = 256):
  """Terms of the negative ELBO, each [B] in nats summed over dimensions.

  Args:
    model: a `core.Model`; its x0 prediction (from any target) is the model step's mean.
    x0: data [B, ...] (in [-1, 1] on `num_bins` levels for the discretized decoder; 8-bit data: 256).
    cond: passed to the model unchanged.
    key: PRNG key; step i uses fold_in(key, i).
    t_grid: [N] ascending times ending at 1 (N - 1 KL steps).
    decoder: "discretized" (8-bit data) or "gaussian" (continuous data).
    model_var: "small" (posterior variance), "large" (sigma^2_{t|s}), "learned" (the model's
      variance channels: `process.learned_variance_log_var`, also the decoder's scale, with the
      first step's beta_tilde clipped to the next one's), or "auto" (learned when the model has
      learned variance, else small).
  Returns: dict with "prior", "diffusion", "decoder" and "total".
  """
  model_lib.check(model)
  schedule = model.schedule
  if decoder not in ("discretized", "gaussian"):
    raise ValueError(f"unknown decoder {decoder!r}; allowed: ['discretized', 'gaussian']")
  if model_var == "auto":
    model_var = "learned" if model.learned_variance else "small"
  if model_var not in ("small", "large", "learned"):
    raise ValueError(f"unknown model_var {model_var!r}; allowed: ['auto', 'large', 'learned', 'small']")
  if model_var == "learned" and not model.learned_variance:
    raise ValueError("model_var='learned' needs a Model with learned_variance=True")
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
    pred = model.predict(x_t, tb, cond)
    mean_q, var_q = process.posterior(schedule, x0, x_t, tb, sb)
    mean_p, _ = process.posterior(schedule, pred.x0, x_t, tb, sb)
    if model_var == "small":
      var_p = var_q
    elif model_var == "large":
      var_p = process.transition(schedule, t, s)[1]
    else:
      var_p = jnp.exp(process.learned_variance_log_var(schedule, tb, sb, pred.var_interp))
    return carry + _sum_dims(normal_kl(mean_q, var_q, mean_p, var_p)), None

  n_kl = t_grid.shape[0] - 1
  diffusion, _ = jax.lax.scan(kl_step, jnp.zeros((b,), F32), jnp.arange(n_kl))

  t0 = t_grid[0]
  eps0 = jax.random.normal(jax.random.fold_in(key, 0), x0.shape, F32)
  t0b = jnp.full((b,), t0)
  x_t0 = process.q_sample(schedule, x0, t0b, eps0)
  pred0 = model.predict(x_t0, t0b, cond)
  x0_hat = pred0.x0
  if decoder_log_scale is None and model_var == "learned":
    dt = (t_grid[1] - t0) if t_grid.shape[0] > 1 else t0
    decoder_log_scale = 0.5 * process.learned_variance_log_var(schedule, t0b, jnp.zeros_like(t0b),
                                                               pred0.var_interp, dt)
  elif decoder_log_scale is None:
    decoder_log_scale = -0.5 * schedule.log_snr(t0)
  if decoder == "discretized":
    ll = discretized_gaussian_log_likelihood(x0, x0_hat, decoder_log_scale, num_bins)
  else:
    ll = gaussian_log_likelihood(x0, x0_hat, decoder_log_scale)
  dec = -_sum_dims(ll)
  pri = prior_kl(schedule, x0, t_grid[-1])
  return {"prior": pri, "diffusion": diffusion, "decoder": dec, "total": pri + diffusion + dec}


def vdm_elbo(model: Model, x0, key, *, cond: Any = None, num_t: int = 64, levels: int = 256):
  """VDM's continuous-time negative ELBO of each example [B] in nats (Kingma et al. 2021, eq. 11 and 17):

      prior + reconstruction + 1/2 E_t[gamma'(t) ||eps - eps_hat(x_t, t)||^2],   t ~ U[0, 1],

  (`core.losses.vdm_terms`) estimated with `num_t` stratified times per example, t_ij = (u_i + j / num_t)
  mod 1, each with its own eps and eps_0 (draw j from fold_in(key, j)); the decoder is over `levels`
  values of x0 in [-1, 1]. Any VP schedule (gamma = -logSNR), learned ones included.
  """
  from diffusax.core import losses  # losses imports likelihood only inside a function
  model_lib.check(model)
  x0 = jnp.asarray(x0, F32)
  b = x0.shape[0]
  u = jax.random.uniform(jax.random.fold_in(key, num_t), (b,), F32)

  def one(j):
    k_eps, k_0 = jax.random.split(jax.random.fold_in(key, j))
    t = jnp.mod(u + j / num_t, 1.0)
    eps, eps_0 = jax.random.normal(k_eps, x0.shape, F32), jax.random.normal(k_0, x0.shape, F32)
    x_t = process.q_sample(model.schedule, x0, t, eps)
    eps_hat = model.predict(x_t, t, cond).eps
    return losses.vdm_terms("eps", eps_hat, x0, eps, eps_0, *losses.vdm_gammas(model.schedule, t),
                            levels=levels).total

  return jnp.mean(jax.lax.map(one, jnp.arange(num_t)), axis=0)


def bits_per_dim(nll, num_dims: int, *, dequantized: bool = False, levels: int = 256):
  """Negative log-likelihood [B] in nats -> bits/dim.

  dequantized: `nll` is -log p(y~) of uniformly dequantised data on `levels` values (`dequantize`);
  the bits/dim are then those of the discrete data, (nll + D log((levels - 1) / 2)) / (D ln 2)
  (8-bit data: log 127.5; see module docstring).
  """
  nll = jnp.asarray(nll, F32) + (num_dims * math.log((levels - 1) / 2.0) if dequantized else 0.0)
  return nll / (num_dims * LOG2)


# ---------------------------------------------------------------------------
# The probability-flow ODE.

def pf_ode_drift(model: Model, cond: Any = None) -> Callable:
  """f(x [B, ...], t scalar) = alpha'(t) x0_hat + sigma'(t) eps_hat: [B, ...] float32."""
  model_lib.check(model)
  schedule = model.schedule

  def f(x, t):
    x0, eps, _ = model.predict(x, t, cond)
    return schedule.d_alpha(t) * x0 + schedule.d_sigma(t) * eps

  return f


def _div_fn(f, divergence: str, probe):
  """(x, t) -> (f(x, t), div f [B]) with the chosen estimator."""
  if divergence == "exact":
    def fd(x, t):
      fx = f(x, t)
      d = x[0].size
      basis = jnp.eye(d, dtype=F32).reshape((d,) + x.shape[1:])

      def one(e):
        v = jnp.broadcast_to(e, x.shape)
        return _sum_dims(v * jax.jvp(lambda y: f(y, t), (x,), (v,))[1])
      return fx, jnp.sum(jax.lax.map(one, basis), axis=0)
    return fd

  def fd(x, t):  # probe [P, B, ...]: the mean of P independent estimates.
    fx, jv = jax.vmap(lambda v: jax.jvp(lambda y: f(y, t), (x,), (v,)))(probe)
    return fx[0], jnp.mean(jax.vmap(_sum_dims)(probe * jv), axis=0)
  return fd


def ode_log_likelihood(model: Model, x, key, *, cond: Any = None, num_steps: int = 50,
                       solver: str = "heun", divergence: str = "rademacher", t_min: float = 1e-3,
                       t_max: float = 1.0, grid: str = "log_snr", num_probes: int = 1):
  """log p_{t_min}(x) [B] in nats by the PF-ODE (see module docstring), and x_{t_max}.

  Args:
    model: a `core.Model`; cond is passed to it unchanged.
    x: [B, ...] continuous data (dequantise 8-bit data first, see `dequantize`).
    key: PRNG key of the Hutchinson probes (unused for divergence="exact").
    num_probes: Hutchinson probes per example (their estimates are averaged).
  Returns: (log_p [B] float32, x_T [B, ...]).
  """
  model_lib.check(model)
  schedule = model.schedule
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
  fd = _div_fn(pf_ode_drift(model, cond), divergence, probe)
  grid = ode_time_grid(schedule, num_steps, t_min, t_max, grid)

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
  log_prior = -0.5 * _sum_dims(x_T * x_T) / var - 0.5 * d * jnp.log(2 * math.pi * var)
  return log_prior + integral, x_T


def ode_time_grid(schedule, num_steps: int, t_min: float, t_max: float, kind: str = "log_snr"):
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


def ode_default_t_max(schedule: Schedule, target: str, margin: float = 1e-3) -> float:
  """1, or 1 - margin where alpha(1) = 0 and the drift is singular at t = 1 for this target."""
  a1 = float(schedule.alpha(jnp.float32(1.0)))
  flow_ok = schedule.kind == "flow" and target in ("flow", "x0", "v")
  return 1.0 if a1 > 0 or flow_ok else 1.0 - margin


def to_levels(x_uint8, levels: int = 256):
  """8-bit data [B, ...] holding `levels` values (stored as round(k * 255 / (levels - 1))) -> the
  level index k, float32 (8-bit data: the value itself)."""
  x = jnp.asarray(x_uint8, F32)
  return x if levels == 256 else jnp.round(x * ((levels - 1) / 255.0))


def on_grid(x_uint8, levels: int = 256):
  """8-bit data [B, ...] on `levels` values -> their exact grid values 2k / (levels - 1) - 1 in [-1, 1]."""
  return to_levels(x_uint8, levels) * (2.0 / (levels - 1)) - 1.0


def dequantize(x_uint8, key, levels: int = 256):
  """8-bit data [B, ...] on `levels` values -> float32 in [-1, 1] with uniform noise within each value's
  bin of width 2 / (levels - 1) (8-bit data: 1 / 127.5)."""
  u = jax.random.uniform(key, jnp.shape(x_uint8), F32)
  return (to_levels(x_uint8, levels) + u - 0.5) * (2.0 / (levels - 1)) - 1.0
