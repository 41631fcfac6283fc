"""Noise schedules: alpha(t), sigma(t) and logSNR(t) for continuous t in [0, 1].

Every schedule describes the marginal of the forward process

    x_t = alpha(t) * x0 + sigma(t) * eps,      eps ~ N(0, I),
    log_snr(t) = log(alpha(t)**2 / sigma(t)**2),

with t = 0 the data end and t = 1 the prior end. Schedules are frozen
dataclasses registered as pytrees (their numbers are leaves), so they can be
passed straight into `jax.jit`-ed functions. All schedule math is done in
float32 whatever the dtype of the arrays they are later applied to.

Families:
  * `VPLinear`      VP SDE with linear beta(t) (Song et al. 2021, eq. 33).
  * `VPCosine`      continuous cosine schedule (Nichol & Dhariwal 2021, eq. 17).
  * `VE`            variance exploding, geometric sigma (Song et al. 2021, eq. 31).
  * `Flow`          rectified flow / linear interpolant: alpha = 1 - t, sigma = t.
  * `Discrete`      any DDPM beta sequence; the continuous view interpolates logSNR
                    linearly between the knots t_i = i / T.
  * `LinearLogSNR`  VP with gamma(t) = -logSNR(t) linear in t (VDM's fixed schedule).
  * `Learned`       VP with gamma(t) a monotone network with parameters (VDM's learned
                    schedule, Kingma et al. 2021, sec. 4.1 / app. H): the network's weights are
                    pytree leaves, so a loss differentiates through every schedule method.
                    Both are defined in `gamma_schedules` and importable from here.
Helpers: `linear_betas`, `cosine_betas` (DDPM / improved-DDPM conventions),
`karras_sigmas` (EDM spacing), and `get(name, **kwargs)`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


def _f32(t):
  return jnp.asarray(t, F32)


def _concrete(x) -> float | None:
  """Returns a Python float when `x` is a concrete host number, else None.

  Pytree unflattening rebuilds schedules with tracers (or placeholders), so
  validation only runs on the values a user passes in.
  """
  if isinstance(x, (bool, int, float, np.integer, np.floating)):
    return float(x)
  if isinstance(x, np.ndarray) and x.ndim == 0:
    return float(x)
  return None


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise ValueError(msg)


class Schedule:
  """Shared methods; subclasses define `alpha`, `sigma` and `log_snr`."""

  kind: str = "vp"  # "vp" (alpha^2 + sigma^2 = 1), "ve" (alpha = 1) or "flow".

  def alpha(self, t):
    raise NotImplementedError

  def sigma(self, t):
    raise NotImplementedError

  def log_snr(self, t):
    raise NotImplementedError

  def t_from_log_snr(self, log_snr):
    raise NotImplementedError(f"{type(self).__name__} has no inverse of log_snr")

  def snr(self, t):
    return jnp.exp(self.log_snr(t))

  def alpha_sigma(self, t):
    return self.alpha(t), self.sigma(t)

  def d_alpha(self, t):
    """d alpha / dt, elementwise, by forward-mode autodiff."""
    t = _f32(t)
    return jax.jvp(self.alpha, (t,), (jnp.ones_like(t),))[1]

  def d_sigma(self, t):
    """d sigma / dt, elementwise, by forward-mode autodiff."""
    t = _f32(t)
    return jax.jvp(self.sigma, (t,), (jnp.ones_like(t),))[1]

  def d_log_snr(self, t):
    t = _f32(t)
    return jax.jvp(self.log_snr, (t,), (jnp.ones_like(t),))[1]

  def sde(self, t):
    """Coefficients (f(t), g(t)^2) of the forward SDE dx = f x dt + g dW.

    For any schedule with these marginals: f = d log alpha / dt and
    g^2 = d sigma^2 / dt - 2 f sigma^2 (Kingma et al. 2021, appendix A).
    """
    t = _f32(t)
    a, s = self.alpha(t), self.sigma(t)
    da, ds = self.d_alpha(t), self.d_sigma(t)
    f = da / a
    g2 = 2.0 * s * ds - 2.0 * f * s * s
    return f, g2

  def edm_sigma(self, t):
    """The EDM noise level sigma / alpha = exp(-log_snr / 2)."""
    return jnp.exp(-0.5 * self.log_snr(t))

  def t_from_edm_sigma(self, edm_sigma):
    return self.t_from_log_snr(-2.0 * jnp.log(_f32(edm_sigma)))

  @property
  def prior_std(self) -> jax.Array:
    """Standard deviation of the prior N(0, prior_std^2 I) at t = 1."""
    return self.sigma(jnp.ones((), F32))


def _register(cls):
  cls = dataclasses.dataclass(frozen=True)(cls)
  return jax.tree_util.register_dataclass(cls)


@_register
class VPLinear(Schedule):
  """VP SDE with beta(t) = beta_min + t (beta_max - beta_min).

  log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2, sigma^2 = 1 - alpha^2.
  """
  beta_min: Any = 0.1
  beta_max: Any = 20.0
  kind = "vp"

  def __post_init__(self):
    lo, hi = _concrete(self.beta_min), _concrete(self.beta_max)
    if lo is not None:
      _check(lo >= 0, f"vp_linear: beta_min must be >= 0, got {lo}")
    if lo is not None and hi is not None:
      _check(hi > lo, f"vp_linear: beta_max must exceed beta_min, got beta_min={lo}, beta_max={hi}")

  def _log_alpha(self, t):
    t = _f32(t)
    return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

  def alpha(self, t):
    return jnp.exp(self._log_alpha(t))

  def sigma(self, t):
    return jnp.sqrt(-jnp.expm1(2.0 * self._log_alpha(t)))

  def log_snr(self, t):
    return -jnp.log(jnp.expm1(-2.0 * self._log_alpha(t)))

  def t_from_log_snr(self, log_snr):
    c = jax.nn.softplus(-_f32(log_snr))  # = -2 log alpha
    d = self.beta_max - self.beta_min
    return 2.0 * c / (self.beta_min + jnp.sqrt(self.beta_min**2 + 2.0 * d * c))


@_register
class VPCosine(Schedule):
  """alpha(t) = cos((t + s) / (1 + s) * pi / 2) / cos(s / (1 + s) * pi / 2)."""
  s: Any = 0.008
  kind = "vp"

  def __post_init__(self):
    s = _concrete(self.s)
    if s is not None:
      _check(s >= 0, f"vp_cosine: s must be >= 0, got {s}")

  def _f0(self):
    return jnp.cos(self.s / (1.0 + self.s) * (jnp.pi / 2))

  def alpha(self, t):
    t = _f32(t)
    # cos((t + s)/(1 + s) pi/2) written as sin((1 - t)/(1 + s) pi/2): accurate near t = 1.
    a = jnp.sin((1.0 - t) / (1.0 + self.s) * (jnp.pi / 2)) / self._f0()
    # clipped with `where` so that d alpha/dt keeps its one-sided value at t = 0 and t = 1
    # (jnp.clip halves the gradient where alpha lands exactly on a bound).
    return jnp.where(a > 1.0, 1.0, jnp.where(a < 0.0, 0.0, a))

  def _sigma2(self, t):
    # 1 - alpha^2 = (cos^2 th0 - cos^2 th) / cos^2 th0 = sin(th + th0) sin(th - th0) / cos^2 th0
    # with th - th0 = t / (1 + s) * pi / 2: no cancellation near t = 0, where
    # 1 - alpha^2 in float32 loses all digits (sigma 4% off at t = 1e-5).
    t = _f32(t)
    th0 = self.s / (1.0 + self.s) * (jnp.pi / 2)
    d = t / (1.0 + self.s) * (jnp.pi / 2)
    return jnp.clip(jnp.sin(2.0 * th0 + d) * jnp.sin(d) / jnp.cos(th0) ** 2, 0.0, 1.0)

  def sigma(self, t):
    return jnp.sqrt(self._sigma2(t))

  def log_snr(self, t):
    return 2.0 * jnp.log(self.alpha(t)) - jnp.log(self._sigma2(t))

  def t_from_log_snr(self, log_snr):
    # th - th0 from its sine and cosine (both free of cancellation near t = 0):
    # sin(th - th0) = cos th0 sigma^2 / (sin th + alpha sin th0),
    # cos(th - th0) = alpha cos^2 th0 + sin th sin th0, sin th = sqrt(sin^2 th0 + cos^2 th0 sigma^2).
    lam = _f32(log_snr)
    a, s2 = jnp.sqrt(jax.nn.sigmoid(lam)), jax.nn.sigmoid(-lam)
    th0 = self.s / (1.0 + self.s) * (jnp.pi / 2)
    c0, s0 = jnp.cos(th0), jnp.sin(th0)
    sin_th = jnp.sqrt(s0 * s0 + c0 * c0 * s2)
    d = jnp.arctan2(c0 * s2 / (sin_th + a * s0), a * c0 * c0 + sin_th * s0)
    return d * (2 / jnp.pi) * (1.0 + self.s)


@_register
class VE(Schedule):
  """alpha = 1, sigma(t) = sigma_min (sigma_max / sigma_min)^t."""
  sigma_min: Any = 0.01
  sigma_max: Any = 50.0
  kind = "ve"

  def __post_init__(self):
    lo, hi = _concrete(self.sigma_min), _concrete(self.sigma_max)
    if lo is not None:
      _check(lo > 0, f"ve: sigma_min must be > 0, got {lo}")
    if lo is not None and hi is not None:
      _check(hi > lo, f"ve: sigma_max must exceed sigma_min, got sigma_min={lo}, sigma_max={hi}")

  def alpha(self, t):
    return jnp.ones_like(_f32(t))

  def sigma(self, t):
    t = _f32(t)
    return self.sigma_min * jnp.exp(t * jnp.log(self.sigma_max / self.sigma_min))

  def log_snr(self, t):
    return -2.0 * jnp.log(self.sigma(t))

  def t_from_log_snr(self, log_snr):
    log_sigma = -0.5 * _f32(log_snr)
    return (log_sigma - jnp.log(self.sigma_min)) / jnp.log(self.sigma_max / self.sigma_min)


@_register
class Flow(Schedule):
  """Rectified flow: x_t = (1 - t) x0 + t eps, velocity dx_t/dt = eps - x0."""
  kind = "flow"

  def alpha(self, t):
    return 1.0 - _f32(t)

  def sigma(self, t):
    return _f32(t)

  def log_snr(self, t):
    t = _f32(t)
    return 2.0 * (jnp.log1p(-t) - jnp.log(t))

  def t_from_log_snr(self, log_snr):
    return jax.nn.sigmoid(-0.5 * _f32(log_snr))

  def d_alpha(self, t):
    return -jnp.ones_like(_f32(t))

  def d_sigma(self, t):
    return jnp.ones_like(_f32(t))


@_register
class Discrete(Schedule):
  """A DDPM schedule of T discrete steps from its betas.

  Step i = 1..T sits at continuous time t_i = i / T with alpha_i^2 equal to the
  DDPM alphas_cumprod[i-1] exactly. Between knots log-SNR is interpolated
  linearly; below t_1 it is extrapolated along the first segment, so t = 0 has a
  finite (large) log-SNR. Build with `Discrete.from_betas(betas)`.
  """
  betas: Any
  alphas_cumprod: Any
  log_snr_knots: Any  # [T + 1] log-SNR at t = 0, 1/T, ..., 1.
  kind = "vp"

  @classmethod
  def from_betas(cls, betas) -> "Discrete":
    b = np.asarray(betas, np.float64)
    _check(b.ndim == 1 and b.size >= 1, f"discrete schedule: betas must be a 1-D array of at least 1 step, got shape {b.shape}")
    _check(bool(np.all((b > 0) & (b < 1))), f"discrete schedule: betas must lie in (0, 1), got min {b.min()} max {b.max()}")
    acp = np.cumprod(1.0 - b)
    lsnr = np.log(acp) - np.log1p(-acp)
    first = lsnr[0] + (lsnr[0] - lsnr[1]) if b.size > 1 else lsnr[0] + 1.0
    knots = np.concatenate([[first], lsnr])
    return cls(betas=jnp.asarray(b, F32), alphas_cumprod=jnp.asarray(acp, F32),
               log_snr_knots=jnp.asarray(knots, F32))

  @property
  def num_steps(self) -> int:
    return int(self.betas.shape[-1])

  def _t_knots(self):
    return jnp.linspace(0.0, 1.0, self.num_steps + 1, dtype=F32)

  def log_snr(self, t):
    return jnp.interp(_f32(t), self._t_knots(), self.log_snr_knots)

  def alpha(self, t):
    return jnp.sqrt(jax.nn.sigmoid(self.log_snr(t)))

  def sigma(self, t):
    return jnp.sqrt(jax.nn.sigmoid(-self.log_snr(t)))

  def t_from_log_snr(self, log_snr):
    return jnp.interp(-_f32(log_snr), -self.log_snr_knots, self._t_knots())

  def t_from_step(self, step):
    """Continuous time of the 0-based DDPM step index (step 0 is t = 1/T)."""
    return (jnp.asarray(step, F32) + 1.0) / self.num_steps

  def step_from_t(self, t):
    """0-based step index nearest to continuous time t, clipped to [0, T-1]."""
    return jnp.clip(jnp.round(_f32(t) * self.num_steps) - 1, 0, self.num_steps - 1).astype(jnp.int32)


# VDM's gamma schedules live in their own module (registered below).
from diffusax.core.gamma_schedules import (  # noqa: E402 - needs the base classes above
    GammaSchedule, Learned, LinearLogSNR, MONOTONE_MIN_SLOPE, monotone_net, monotone_net_init)


# ---------------------------------------------------------------------------
# Discrete beta sequences.


def _check_steps(num_steps) -> int:
  if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
    raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
  return int(num_steps)


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> jax.Array:
  """DDPM linear betas (Ho et al. 2020): linspace(beta_start, beta_end, T), float32 [T]."""
  n = _check_steps(num_steps)
  _check(beta_start > 0, f"linear_betas: beta_start must be > 0, got {beta_start}")
  _check(beta_end > beta_start, f"linear_betas: beta_end must exceed beta_start, got beta_start={beta_start}, beta_end={beta_end}")
  _check(beta_end < 1, f"linear_betas: beta_end must be < 1, got {beta_end}")
  return jnp.asarray(np.linspace(beta_start, beta_end, n, dtype=np.float64), F32)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> jax.Array:
  """Improved-DDPM cosine betas (Nichol & Dhariwal 2021, eq. 17), float32 [T].

  alpha_bar(t) = cos((t/T + s) / (1 + s) * pi/2)^2, beta_t = min(1 - alpha_bar(t)/alpha_bar(t-1), max_beta).
  """
  n = _check_steps(num_steps)
  _check(s >= 0, f"cosine_betas: s must be >= 0, got {s}")
  _check(0 < max_beta < 1, f"cosine_betas: max_beta must lie in (0, 1), got {max_beta}")
  f = lambda i: math.cos((i / n + s) / (1 + s) * math.pi / 2) ** 2
  b = [min(1 - f(i + 1) / f(i), max_beta) for i in range(n)]
  return jnp.asarray(np.asarray(b, np.float64), F32)


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> jax.Array:
  """EDM noise levels (Karras et al. 2022, eq. 5), descending, float32 [num_steps].

  sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
  The final sigma_N = 0 of the paper is not included. `num_steps` must be a
  Python int; the samplers evaluate the same spacing from a traced step index
  (`samplers.grid`, spacing "karras"), so their step count can be traced.
  """
  n = _check_steps(num_steps)
  _check(0 < sigma_min < sigma_max, f"karras_sigmas: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
  _check(rho > 0, f"karras_sigmas: rho must be > 0, got {rho}")
  i = np.arange(n, dtype=np.float64) / max(n - 1, 1)
  sig = (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
  return jnp.asarray(sig, F32)


# ---------------------------------------------------------------------------
# Lookup by name.

_PARAMS = {
    "vp_linear": ("beta_min", "beta_max"),
    "vp_cosine": ("s",),
    "ve": ("sigma_min", "sigma_max"),
    "flow": (),
    "ddpm_linear": ("num_steps", "beta_start", "beta_end"),
    "ddpm_cosine": ("num_steps", "s", "max_beta"),
    "linear_log_snr": ("gamma_0", "gamma_1"),
    "learned": ("gamma_0", "gamma_1", "hidden"),
}


def _ddpm_linear(num_steps=1000, beta_start=1e-4, beta_end=0.02):
  return Discrete.from_betas(linear_betas(num_steps, beta_start, beta_end))


def _ddpm_cosine(num_steps=1000, s=0.008, max_beta=0.999):
  return Discrete.from_betas(cosine_betas(num_steps, s, max_beta))


def _learned(gamma_0=-13.3, gamma_1=5.0, hidden=1024):
  """A learned schedule at its initialisation from key 0 (a template: training replaces its fields)."""
  if not isinstance(hidden, (int, np.integer)) or isinstance(hidden, bool) or hidden < 1:
    raise ValueError(f"learned: hidden must be an integer >= 1, got {hidden!r}")
  return Learned(monotone_net_init(jax.random.key(0), int(hidden)), gamma_0, gamma_1)


SCHEDULES = {
    "vp_linear": VPLinear,
    "vp_cosine": VPCosine,
    "ve": VE,
    "flow": Flow,
    "ddpm_linear": _ddpm_linear,
    "ddpm_cosine": _ddpm_cosine,
    "linear_log_snr": LinearLogSNR,
    "learned": _learned,
}


def get(name: str, **kwargs) -> Schedule:
  """Builds a schedule by name; see `SCHEDULES` for the names and `_PARAMS` for their settings."""
  if name not in SCHEDULES:
    raise ValueError(f"unknown schedule {name!r}; allowed: {sorted(SCHEDULES)}")
  bad = sorted(set(kwargs) - set(_PARAMS[name]))
  if bad:
    raise ValueError(f"schedule {name!r} takes no setting(s) {bad}; allowed: {list(_PARAMS[name])}")
  return SCHEDULES[name](**kwargs)
