"""Schedules against the papers' closed forms, written here in numpy float64.

References:
  VP linear   Song et al. 2021 (score SDE), eq. 33: mean coefficient of the
              VP SDE marginal exp(-t^2 (b1 - b0) / 4 - t b0 / 2); SDE
              dx = -beta(t)/2 x dt + sqrt(beta(t)) dW (eq. 11).
  VP cosine   Nichol & Dhariwal 2021, eq. 17 with t continuous in [0, 1]:
              alpha_bar(t) = f(t) / f(0), f(t) = cos((t + s)/(1 + s) pi/2)^2.
  VE          Song et al. 2021, eq. 31: sigma(t) = smin (smax/smin)^t;
              SDE g^2 = d sigma^2 / dt.
  Flow        rectified flow: alpha = 1 - t, sigma = t.
  DDPM        Ho et al. 2020: betas linspace(1e-4, 0.02, T), alphas_cumprod.
  EDM         Karras et al. 2022, eq. 5.

Tolerances: schedule math is float32 (eps ~ 1.2e-7); values are checked to
rtol 2e-5 (a handful of float32 ops each rounding to ~6e-8 relative), log-SNR
to atol 2e-4 (log of a float32 ratio near 0 where log-SNR crosses zero is
absolute, not relative), autodiff derivatives to rtol 1e-4 against float64
central differences (h = 1e-5, truncation error ~1e-10).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusax.core import schedules
from references import np_flow, np_log_snr, np_ve, np_vp_cosine, np_vp_linear

T_GRID = np.linspace(0.01, 0.99, 25)


# --- independent float64 closed forms -------------------------------------

CONTINUOUS = {
    "vp_linear": (lambda: schedules.VPLinear(), np_vp_linear),
    "vp_linear_custom": (lambda: schedules.VPLinear(beta_min=0.5, beta_max=10.0),
                         lambda t: np_vp_linear(t, 0.5, 10.0)),
    "vp_cosine": (lambda: schedules.VPCosine(), np_vp_cosine),
    "ve": (lambda: schedules.VE(), np_ve),
    "ve_custom": (lambda: schedules.VE(sigma_min=0.002, sigma_max=80.0), lambda t: np_ve(t, 0.002, 80.0)),
    "flow": (lambda: schedules.Flow(), np_flow),
}


def central_diff(fn, t, h=1e-5):
  return (fn(t + h) - fn(t - h)) / (2 * h)


@pytest.fixture
def eval_schedule():
  """A jitted evaluator per test.

  It was one module-wide jitted function; in one CI run (2 cores, loaded,
  persistent compilation cache on) its call on VPLinear at shape (6,) returned
  alpha == 1 everywhere, i.e. the outputs of VE, which ran just before with the
  same leaf count and shape. Not reproduced since (alone, in file order, with
  the cache filled by a first run). Each test now compiles its own (~0.1 s) and
  the eager values are checked against the jitted ones, so a wrong executable
  would be reported as such.
  """
  @jax.jit
  def f(sched, t):
    return sched.alpha(t), sched.sigma(t), sched.log_snr(t)
  return f


@pytest.mark.parametrize("name", sorted(CONTINUOUS))
def test_continuous_closed_forms(name, eval_schedule):
  make, ref = CONTINUOUS[name]
  sched = make()
  a, s, l = eval_schedule(sched, jnp.asarray(T_GRID, jnp.float32))
  a_ref, s_ref = ref(T_GRID.astype(np.float32).astype(np.float64))
  np.testing.assert_allclose(a, a_ref, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(s, s_ref, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(l, np.log(a_ref**2 / s_ref**2), rtol=2e-5, atol=2e-4)
  # Eager evaluation agrees with the jitted one.
  np.testing.assert_allclose(sched.alpha(T_GRID), a, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(CONTINUOUS))
def test_closed_forms_near_endpoints(name, eval_schedule):
  """Relative accuracy where sigma -> 0 (t -> 0) and alpha -> 0 (t -> 1), e.g. at t_min = 1e-5.

  Found a bug: VPCosine computed sigma = sqrt(1 - alpha^2), which in float32
  was 4% off at t = 1e-5 (log-SNR off by 0.08) and t_from_log_snr 1.5% off at t = 1e-4.
  """
  make, ref = CONTINUOUS[name]
  sched = make()
  t = np.asarray([1e-5, 3e-5, 1e-4, 1e-3, 0.99, 0.995], np.float32)
  a, s, l = eval_schedule(sched, jnp.asarray(t))
  np.testing.assert_allclose(a, sched.alpha(t), rtol=1e-6, err_msg="jitted != eager")
  a_ref, s_ref = ref(t.astype(np.float64))
  # near t = 1 the float32 rounding of t itself moves alpha of VPCosine by ~1e-5 relative.
  np.testing.assert_allclose(a, a_ref, rtol=5e-5, atol=1e-7)
  np.testing.assert_allclose(s, s_ref, rtol=2e-5)
  np.testing.assert_allclose(l, np.log(a_ref**2 / s_ref**2), rtol=2e-5, atol=1e-4)
  # The inverse can be no better than the float32 rounding of its input:
  # |dt/dlog_snr| * ulp(log_snr) (large for VE near t = 0, where log-SNR stays finite).
  lam = np.log(a_ref**2 / s_ref**2)
  t64 = t.astype(np.float64)
  h = 1e-4 * np.minimum(t64, 1 - t64)
  dl_dt = (np_log_snr(ref, t64 + h) - np_log_snr(ref, t64 - h)) / (2 * h)
  cond = np.abs(np.spacing(lam.astype(np.float32)) / dl_dt)
  got = np.asarray(sched.t_from_log_snr(lam), np.float64)
  assert np.all(np.abs(got - t) <= 1e-4 * t + 4 * cond), (got, t, cond)


@pytest.mark.parametrize("name", ["vp_linear", "vp_cosine"])
def test_vp_unit_variance(name):
  sched = CONTINUOUS[name][0]()
  a, s = sched.alpha(T_GRID), sched.sigma(T_GRID)
  np.testing.assert_allclose(a**2 + s**2, 1.0, atol=1e-6)


def test_vp_cosine_endpoints():
  sched = schedules.VPCosine()
  np.testing.assert_allclose(sched.alpha(0.0), 1.0, atol=1e-6)
  assert float(sched.alpha(1.0)) < 1e-6  # cos(pi/2) = 0 (clipped at 0, not negative)
  assert float(sched.log_snr(0.999)) < -10


@pytest.mark.parametrize("name", sorted(CONTINUOUS))
def test_t_from_log_snr_inverts(name):
  sched = CONTINUOUS[name][0]()
  t = jnp.asarray(np.linspace(0.05, 0.95, 19), jnp.float32)
  np.testing.assert_allclose(sched.t_from_log_snr(sched.log_snr(t)), t, rtol=1e-4, atol=1e-5)
  # and on log-SNR given in float64 by the paper's formula
  lam = np_log_snr(CONTINUOUS[name][1], np.asarray(t, np.float64))
  np.testing.assert_allclose(sched.t_from_log_snr(lam), t, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONTINUOUS))
def test_derivatives_against_finite_differences(name):
  make, ref = CONTINUOUS[name]
  sched = make()
  t = np.linspace(0.05, 0.95, 19)
  da_ref = central_diff(lambda u: ref(u)[0], t)
  ds_ref = central_diff(lambda u: ref(u)[1], t)
  dl_ref = central_diff(lambda u: np_log_snr(ref, u), t)
  tt = jnp.asarray(t, jnp.float32)
  np.testing.assert_allclose(sched.d_alpha(tt), da_ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(sched.d_sigma(tt), ds_ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(sched.d_log_snr(tt), dl_ref, rtol=1e-4, atol=1e-5)


def test_vp_cosine_derivative_at_endpoints():
  """One-sided d alpha/dt at t = 0 and 1: -tan(th0) c and -c / cos(th0), c = pi / (2 (1 + s)).

  Found a bug: jnp.clip halved the gradient where alpha sits exactly on 1 (t = 0),
  and at t = 1 alpha was clipped from cos(pi/2) < 0 in float32, so d_alpha(1) was 0 and
  every conversion from the 'flow' target divided by alpha sigma' - sigma alpha' = 0.
  """
  sched = schedules.VPCosine()
  th0, c = 0.008 / 1.008 * np.pi / 2, np.pi / 2 / 1.008
  np.testing.assert_allclose(sched.d_alpha(jnp.asarray([0.0, 1.0])), [-np.tan(th0) * c, -c / np.cos(th0)], rtol=1e-5)
  h = 1e-6
  np.testing.assert_allclose(sched.d_alpha(1.0), (np_vp_cosine(1.0)[0] - np_vp_cosine(1.0 - h)[0]) / h, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(CONTINUOUS))
def test_sde_against_definition(name):
  """f = d log alpha/dt, g^2 = d sigma^2/dt - 2 f sigma^2 by float64 finite differences."""
  make, ref = CONTINUOUS[name]
  sched = make()
  t = np.linspace(0.05, 0.95, 19)
  f_ref = central_diff(lambda u: np.log(ref(u)[0]), t)
  g2_ref = central_diff(lambda u: ref(u)[1] ** 2, t) - 2 * f_ref * ref(t)[1] ** 2
  f, g2 = sched.sde(jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(f, f_ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g2, g2_ref, rtol=1e-4, atol=1e-6)


def test_sde_matches_song_et_al():
  """VP: f = -beta(t)/2, g^2 = beta(t) (eq. 11); VE: f = 0, g^2 = 2 sigma^2 log(smax/smin) (eq. 30)."""
  t = np.linspace(0.05, 0.95, 19)
  f, g2 = schedules.VPLinear(beta_min=0.1, beta_max=20.0).sde(t)
  beta = 0.1 + t * (20.0 - 0.1)
  np.testing.assert_allclose(f, -beta / 2, rtol=1e-4)
  np.testing.assert_allclose(g2, beta, rtol=1e-4)
  f, g2 = schedules.VE(sigma_min=0.01, sigma_max=50.0).sde(t)
  np.testing.assert_allclose(f, 0.0, atol=1e-7)
  np.testing.assert_allclose(g2, 2 * np_ve(t)[1] ** 2 * math.log(5000.0), rtol=1e-4)


def test_edm_sigma_round_trip():
  sched = schedules.VPCosine()
  t = np.linspace(0.05, 0.95, 19)
  a, s = np_vp_cosine(t)
  np.testing.assert_allclose(sched.edm_sigma(t), s / a, rtol=1e-4)
  np.testing.assert_allclose(sched.t_from_edm_sigma(s / a), t, rtol=1e-4, atol=1e-5)


def test_prior_std():
  np.testing.assert_allclose(schedules.VE(sigma_max=80.0).prior_std, 80.0, rtol=1e-6)
  np.testing.assert_allclose(schedules.Flow().prior_std, 1.0)
  np.testing.assert_allclose(schedules.VPLinear().prior_std, np_vp_linear(1.0)[1], rtol=1e-6)


# --- discrete DDPM schedules ----------------------------------------------

def np_cosine_abar(T, s=0.008):
  f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
  return f / f[0]  # alpha_bar at steps 0..T (alpha_bar_0 = 1)


def test_linear_betas_closed_form():
  np.testing.assert_allclose(schedules.linear_betas(1000), np.linspace(1e-4, 0.02, 1000), rtol=1e-6)
  np.testing.assert_allclose(schedules.linear_betas(10, 1e-3, 0.05), np.linspace(1e-3, 0.05, 10), rtol=1e-6)
  assert schedules.linear_betas(7).dtype == jnp.float32


def test_cosine_betas_closed_form():
  T = 1000
  abar = np_cosine_abar(T)
  ref = np.minimum(1.0 - abar[1:] / abar[:-1], 0.999)
  np.testing.assert_allclose(schedules.cosine_betas(T), ref, rtol=1e-5)
  assert ref[-1] == 0.999 and ref[-2] < 0.999  # only the last beta is clipped at T = 1000


@pytest.mark.parametrize("name", ["ddpm_linear", "ddpm_cosine"])
def test_discrete_knots_match_alphas_cumprod(name):
  T = 1000
  sched = schedules.get(name, num_steps=T)
  if name == "ddpm_linear":
    acp = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))
  else:
    abar = np_cosine_abar(T)
    # alphas_cumprod = cos^2 formula at steps 1..T-1; the last step has beta clipped to 0.999.
    acp = np.concatenate([abar[1:T], [abar[T - 1] * (1 - 0.999)]])
    np.testing.assert_allclose(sched.alphas_cumprod[:-1], abar[1:T], rtol=5e-5, atol=1e-9)
  np.testing.assert_allclose(sched.alphas_cumprod, acp, rtol=5e-5, atol=1e-12)
  steps = jnp.arange(T)
  t = sched.t_from_step(steps)
  np.testing.assert_allclose(t, (np.arange(T) + 1) / T, rtol=1e-6)
  np.testing.assert_allclose(sched.alpha(t) ** 2, acp, rtol=5e-5, atol=1e-12)
  np.testing.assert_allclose(sched.alpha(t) ** 2 + sched.sigma(t) ** 2, 1.0, atol=1e-6)
  np.testing.assert_array_equal(sched.step_from_t(t), np.arange(T))
  # log-SNR is linear in t between knots and the inverse holds
  mid = (np.arange(T - 1) + 1.5) / T
  lam = np.log(acp / (1 - acp))
  # the float32 rounding of t (~6e-8) times the slope T * dlam limits the match
  atol = 2e-5 + 2 * 6e-8 * T * np.abs(np.diff(lam))
  err = np.abs(np.asarray(sched.log_snr(mid)) - 0.5 * (lam[:-1] + lam[1:]))
  assert np.all(err <= atol), err.max()
  np.testing.assert_allclose(sched.t_from_log_snr(sched.log_snr(mid)), mid, atol=2e-5)


def test_karras_sigmas_eq5():
  for n, smin, smax, rho in [(18, 0.002, 80.0, 7.0), (5, 0.01, 10.0, 3.0), (1, 0.002, 80.0, 7.0)]:
    i = np.arange(n)
    ref = (smax ** (1 / rho) + i / max(n - 1, 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    got = schedules.karras_sigmas(n, smin, smax, rho)
    assert got.shape == (n,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5)
  s = schedules.karras_sigmas(18)
  np.testing.assert_allclose([s[0], s[-1]], [80.0, 0.002], rtol=1e-5)


# --- transformations, dtypes -----------------------------------------------

ALL_NAMES = ["vp_linear", "vp_cosine", "ve", "flow", "ddpm_linear", "ddpm_cosine"]


def _make(name):
  return schedules.get(name, num_steps=50) if name.startswith("ddpm") else schedules.get(name)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_jit_vmap_bf16_grad(name, eval_schedule):
  sched = _make(name)
  t = jnp.asarray([0.1, 0.37, 0.5, 0.83], jnp.float32)
  a, s, l = eval_schedule(sched, t)
  # vmap over scalar times
  va, vs, vl = jax.jit(jax.vmap(lambda u: eval_schedule(sched, u)))(t)
  np.testing.assert_allclose(va, a, rtol=1e-6)
  np.testing.assert_allclose(vl, l, rtol=1e-5, atol=1e-6)
  # bfloat16 times: results are float32 and equal the float32 math on the rounded times
  tb = t.astype(jnp.bfloat16)
  ba, bs, bl = eval_schedule(sched, tb)
  assert ba.dtype == bs.dtype == bl.dtype == jnp.float32
  ra, _, rl = eval_schedule(sched, tb.astype(jnp.float32))
  np.testing.assert_allclose(ba, ra, rtol=1e-6)
  np.testing.assert_allclose(bl, rl, rtol=1e-6, atol=1e-6)
  # differentiable in t (and grad equals the forward-mode derivative)
  g, gl, da = jax.jit(lambda u: (jax.vmap(jax.grad(sched.alpha))(u), jax.vmap(jax.grad(sched.log_snr))(u),
                                  sched.d_alpha(u)))(t)
  np.testing.assert_allclose(g, da, rtol=1e-5, atol=1e-7)
  assert np.all(np.isfinite(gl))


def test_grad_wrt_schedule_parameters():
  """Schedule numbers are pytree leaves: d alpha / d beta_max = -t^2/4 alpha (float64 reference)."""
  t = 0.6
  g = jax.grad(lambda sched: sched.alpha(t))(schedules.VPLinear(beta_min=0.1, beta_max=20.0))
  np.testing.assert_allclose(g.beta_max, -t**2 / 4 * np_vp_linear(t)[0], rtol=1e-4)
  np.testing.assert_allclose(g.beta_min, (t**2 / 4 - t / 2) * np_vp_linear(t)[0], rtol=1e-4)


# --- errors ------------------------------------------------------------------

def test_get_unknown_name_lists_allowed():
  with pytest.raises(ValueError, match="unknown schedule 'cosin'") as e:
    schedules.get("cosin")
  for name in ALL_NAMES:
    assert name in str(e.value)


def test_get_unknown_setting():
  with pytest.raises(ValueError, match=r"beta_mni.*allowed.*beta_min"):
    schedules.get("vp_linear", beta_mni=0.1)
  with pytest.raises(ValueError, match="flow"):
    schedules.get("flow", s=0.1)


@pytest.mark.parametrize("name,kwargs,match", [
    ("vp_linear", {"beta_min": 20.0, "beta_max": 0.1}, "beta_max must exceed beta_min"),
    ("vp_linear", {"beta_min": -1.0}, "beta_min must be >= 0"),
    ("vp_cosine", {"s": -0.1}, "s must be >= 0"),
    ("ve", {"sigma_min": 0.0}, "sigma_min must be > 0"),
    ("ve", {"sigma_min": 5.0, "sigma_max": 1.0}, "sigma_max must exceed sigma_min"),
    ("ddpm_linear", {"num_steps": 0}, "num_steps"),
    ("ddpm_linear", {"num_steps": 10.5}, "num_steps"),
    ("ddpm_linear", {"beta_end": 1.5}, "beta_end"),
    ("ddpm_linear", {"beta_start": 0.0}, "beta_start"),
    ("ddpm_cosine", {"max_beta": 1.0}, "max_beta"),
    ("ddpm_cosine", {"s": -1.0}, "s must be >= 0"),
])
def test_impossible_settings(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    schedules.get(name, **kwargs)


def test_bad_betas_and_karras():
  with pytest.raises(ValueError, match="betas"):
    schedules.Discrete.from_betas(np.array([0.1, 1.2]))
  with pytest.raises(ValueError, match="betas"):
    schedules.Discrete.from_betas(np.ones((2, 2)) * 0.1)
  with pytest.raises(ValueError, match="sigma_min"):
    schedules.karras_sigmas(10, sigma_min=5.0, sigma_max=1.0)
  with pytest.raises(ValueError, match="rho"):
    schedules.karras_sigmas(10, rho=0.0)


def test_schedules_pass_through_jit_with_traced_leaves():
  """Validation must not run on tracers when jit rebuilds the dataclass."""
  out = jax.jit(lambda sched: sched.sigma(0.5))(schedules.VE(sigma_min=0.01, sigma_max=50.0))
  np.testing.assert_allclose(out, np_ve(0.5)[1], rtol=1e-5)
