"""Variational bound and likelihood helpers against closed forms.

The ELBO tests use data x0 ~ N(m, s^2 I) in D dimensions, whose optimal
denoiser is exact, E[x0 | x_t] = m + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha m),
with error variance mmse(t) = s^2 sigma^2 / (alpha^2 s^2 + sigma^2) per dimension.
Every expected term of the bound then has a closed form, written here in
numpy float64 from the schedule's paper formula (Song et al. 2021, eq. 33):
  diffusion  sum_i 1/2 (SNR(t_{i-1}) - SNR(t_i)) D mmse(t_i)      (Kingma et al. 2021, eq. 13;
             the KL of two Gaussians with the posterior variance and means that
             differ by alpha_s (1 - SNR_t/SNR_s) (x0 - x0_hat))
  decoder    D [1/2 log(2 pi v) + mmse(t_0) / (2 v)],  v = sigma_0^2 / alpha_0^2
  prior      D/2 alpha_1^2 (m^2 + s^2) / sigma_1^2
  true NLL   D [1/2 log(2 pi s^2) + 1/2].
Monte Carlo estimates are compared within 5 standard errors.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.stats

from diffusax.core import Model, likelihood, schedules

M, S, D, B = 0.5, 0.4, 4, 2048
T_MIN = 1e-3


def np_vp_linear(t, b0=0.1, b1=20.0):
  a = np.exp(-0.25 * t**2 * (b1 - b0) - 0.5 * t * b0)
  return a, np.sqrt(-np.expm1(2 * np.log(a)))


def np_expected_terms(grid, model_var="small"):
  grid = np.asarray(grid, np.float32).astype(np.float64)  # the times the code sees
  a, s = np_vp_linear(grid)
  snr = a**2 / s**2
  mmse = S**2 * s**2 / (a**2 * S**2 + s**2)
  if model_var == "small":
    diffusion = np.sum(0.5 * (snr[:-1] - snr[1:]) * D * mmse[1:])
  else:  # model variance sigma_{t|s}^2 instead of the posterior variance
    a_ts2 = (a[1:] / a[:-1]) ** 2
    var_p = s[1:] ** 2 - a_ts2 * s[:-1] ** 2
    var_q = s[:-1] ** 2 * (1 - snr[1:] / snr[:-1])
    c_x0 = a[:-1] * (1 - snr[1:] / snr[:-1])
    diffusion = np.sum(0.5 * D * (np.log(var_p / var_q) + var_q / var_p + c_x0**2 * mmse[1:] / var_p - 1))
  v = s[0] ** 2 / a[0] ** 2
  decoder = D * (0.5 * np.log(2 * np.pi * v) + mmse[0] / (2 * v))
  prior = 0.5 * D * a[-1] ** 2 * (M**2 + S**2) / s[-1] ** 2
  return {"diffusion": diffusion, "decoder": decoder, "prior": prior}


def x0_model(sched, fn):
  """A core.Model predicting x0 from an (x_t, t) -> x0 function."""
  return Model(lambda xt, t, cond: fn(xt, t), "x0", sched)


TRUE_NLL = D * (0.5 * np.log(2 * np.pi * S**2) + 0.5)


@pytest.fixture(scope="module")
def vlb_gap():
  sched = schedules.VPLinear()

  def denoise(xt, t):
    a, sg = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    return M + a * S**2 / (a**2 * S**2 + sg**2) * (xt - a * M)

  @jax.jit
  def f(key, grid):
    kx, kv = jax.random.split(key)
    x0 = M + S * jax.random.normal(kx, (B, D))  # same x0 for every T (common random numbers)
    terms = likelihood.vlb_terms(x0_model(sched, denoise), x0, kv, grid, decoder="gaussian")
    nll = -jnp.sum(jax.scipy.stats.norm.logpdf(x0, M, S), axis=1)
    return terms, terms["total"] - nll

  return f


def _mean_se(x):
  x = np.asarray(x, np.float64)
  return x.mean(), x.std(ddof=1) / np.sqrt(x.size)


def test_elbo_approaches_true_nll(vlb_gap):
  gaps = {}
  for T in [10, 100, 1000]:
    grid = likelihood.uniform_grid(T, T_MIN)
    terms, gap = vlb_gap(jax.random.key(0), grid)
    gaps[T] = np.asarray(gap, np.float64)
    expect = np_expected_terms(grid)
    # each term's Monte Carlo mean matches its closed-form expectation
    for k in ("diffusion", "decoder"):
      mean, se = _mean_se(terms[k])
      assert abs(mean - expect[k]) < 5 * se + 1e-4 * abs(expect[k]), (T, k, mean, expect[k], se)
    np.testing.assert_allclose(np.mean(terms["prior"]), expect["prior"], rtol=1e-2, atol=1e-7)
    mean, se = _mean_se(gaps[T])
    expect_gap = sum(expect.values()) - TRUE_NLL
    assert abs(mean - expect_gap) < 5 * se + 1e-4 * abs(expect_gap), (T, mean, expect_gap, se)
    assert expect_gap > 0  # the bound holds
  # the gap shrinks monotonically, each step far beyond Monte Carlo error (paired x0 samples)
  for lo, hi in [(10, 100), (100, 1000)]:
    mean, se = _mean_se(gaps[lo] - gaps[hi])
    assert mean > 5 * se and mean > 0.5 * gaps[lo].mean(), (lo, hi, mean, se)
  # At T = 1000 what remains is mostly the discretisation of the first steps near t_min
  # (~ D/2 sum_i (1/T / t_i)^2 / 2 ~ 1.6 nats here) plus the decoder's variance mismatch.
  mean, se = _mean_se(gaps[1000])
  assert 0 < mean < 2.5, (mean, se)


def test_elbo_large_model_variance(vlb_gap):
  """model_var="large" (sigma^2_{t|s}, DDPM's beta) against its closed-form KL, T = 10."""
  sched = schedules.VPLinear()

  def denoise(xt, t):
    a, sg = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    return M + a * S**2 / (a**2 * S**2 + sg**2) * (xt - a * M)
  grid = likelihood.uniform_grid(10, 0.05)
  x0 = M + S * jax.random.normal(jax.random.key(3), (B, D))
  terms = jax.jit(lambda x: likelihood.vlb_terms(x0_model(sched, denoise), x, jax.random.key(4), grid,
                                                 decoder="gaussian", model_var="large"))(x0)
  mean, se = _mean_se(terms["diffusion"])
  expect = np_expected_terms(grid, "large")["diffusion"]
  assert abs(mean - expect) < 5 * se + 1e-4 * expect, (mean, expect, se)


@pytest.mark.parametrize("var_interp,closed_form", [(1.0, "large"), (-1.0, "small")])
def test_elbo_learned_variance_at_its_ends_is_beta_or_beta_tilde(var_interp, closed_form):
  """A learned-variance model whose variance channels sit at +1 (beta) or -1 (beta_tilde), with the exact
  denoiser: the diffusion term against the closed forms of model_var="large" / "small", T = 10."""
  sched = schedules.VPLinear()

  def denoise(xt, t, cond):
    a, sg = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    x0 = M + a * S**2 / (a**2 * S**2 + sg**2) * (xt - a * M)
    return jnp.concatenate([x0, jnp.full_like(x0, var_interp)], axis=-1)

  model = Model(denoise, "x0", sched, learned_variance=True)
  grid = likelihood.uniform_grid(10, 0.05)
  x0 = M + S * jax.random.normal(jax.random.key(3), (B, D))
  terms = jax.jit(lambda x: likelihood.vlb_terms(model, x, jax.random.key(4), grid, decoder="gaussian"))(x0)
  mean, se = _mean_se(terms["diffusion"])
  expect = np_expected_terms(grid, closed_form)["diffusion"]
  assert abs(mean - expect) < 5 * se + 1e-4 * expect, (mean, expect, se)
  with pytest.raises(ValueError, match=r"model_var='learned' needs a Model with learned_variance=True"):
    likelihood.vlb_terms(x0_model(sched, lambda xt, t: xt), x0, jax.random.key(0), grid, model_var="learned")


def test_vlb_discretized_decoder_on_ddpm_grid():
  """DDPM set-up: knots i/T, 8-bit data; decoder term equals -log of the bin mass (scipy)."""
  sched = schedules.get("ddpm_linear", num_steps=20)
  grid = likelihood.ddpm_grid(sched)
  np.testing.assert_allclose(grid, np.arange(1, 21) / 20, rtol=1e-6)
  x0 = (jnp.asarray([[0, 128, 255], [10, 200, 37]], jnp.float32) / 127.5) - 1
  ident = lambda xt, t: jnp.asarray(x0)  # a perfect x0 model: diffusion KL is exactly 0
  terms = jax.jit(lambda key: likelihood.vlb_terms(x0_model(sched, ident), x0, key, grid))(jax.random.key(0))
  np.testing.assert_allclose(terms["diffusion"], 0.0, atol=1e-6)
  acp0 = 1 - 1e-4
  scale = math.sqrt((1 - acp0) / acp0)
  xs = np.asarray(x0, np.float64)
  # the decoder mean is x0 itself; N(x0, scale^2) mass of the bin [x0 - 1/255, x0 + 1/255], ends open
  lo = np.where(xs < -0.999, -np.inf, -1 / 255 / scale)
  hi = np.where(xs > 0.999, np.inf, 1 / 255 / scale)
  expect = -np.log(scipy.stats.norm.cdf(hi) - scipy.stats.norm.cdf(lo)).sum(1)
  np.testing.assert_allclose(terms["decoder"], expect, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(terms["total"], terms["prior"] + terms["diffusion"] + terms["decoder"], rtol=1e-6)


# --- helpers ---------------------------------------------------------------

def test_normal_kl_closed_form_and_integral():
  cases = [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 2.0), (1.0, 0.01, 0.9, 0.02), (-2.0, 3.0, 1.0, 0.7)]
  m1, v1, m2, v2 = (np.array(c) for c in zip(*cases))
  got = likelihood.normal_kl(m1, v1, m2, v2)
  closed = np.log(np.sqrt(v2 / v1)) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5
  np.testing.assert_allclose(got, closed, rtol=1e-5, atol=1e-7)
  for i, (a, va, b, vb) in enumerate(cases):
    p, q = scipy.stats.norm(a, math.sqrt(va)), scipy.stats.norm(b, math.sqrt(vb))
    sd = math.sqrt(va)
    integral = scipy.integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), a - 12 * sd, a + 12 * sd)[0]
    np.testing.assert_allclose(got[i], integral, rtol=1e-5, atol=1e-7)
  g = jax.jit(jax.grad(lambda m: likelihood.normal_kl(m, 0.5, 0.2, 2.0)))(1.0)
  np.testing.assert_allclose(g, (1.0 - 0.2) / 2.0, rtol=1e-6)


def test_gaussian_log_likelihood():
  x, mean, log_scale = np.array([0.3, -2.0, 5.0]), np.array([0.0, -1.0, 4.0]), np.array([0.0, -1.5, 1.0])
  np.testing.assert_allclose(likelihood.gaussian_log_likelihood(x, mean, log_scale),
                             scipy.stats.norm.logpdf(x, mean, np.exp(log_scale)), rtol=1e-6)


def _np_bin_logprob(x, mean, scale):
  """log P(bin of x) for N(mean, scale^2), bins of width 2/255 on [-1, 1], ends open (float64)."""
  lo = np.where(x < -1 + 1e-6, -np.inf, (x - 1 / 255 - mean) / scale)
  hi = np.where(x > 1 - 1e-6, np.inf, (x + 1 / 255 - mean) / scale)
  with np.errstate(divide="ignore"):  # on the side of the distribution where the difference is accurate
    return np.where(lo > 0, np.log(scipy.stats.norm.sf(lo) - scipy.stats.norm.sf(hi)),
                    np.log(scipy.stats.norm.cdf(hi) - scipy.stats.norm.cdf(lo)))


@pytest.mark.parametrize("mean,scale", [(0.0, 0.1), (0.37, 1e-3), (0.999, 0.02), (-1.5, 0.3), (0.2, 5.0)])
def test_discretized_gaussian_sums_to_one_and_matches_cdf(mean, scale):
  x = np.linspace(-1, 1, 256)
  ll = jax.jit(likelihood.discretized_gaussian_log_likelihood)(
      jnp.asarray(x, jnp.float32), jnp.full(256, mean, jnp.float32), jnp.full(256, math.log(scale), jnp.float32))
  assert ll.dtype == jnp.float32 and np.all(np.asarray(ll) <= 1e-6)
  np.testing.assert_allclose(np.exp(np.asarray(ll, np.float64)).sum(), 1.0, atol=1e-5)
  ref = _np_bin_logprob(x, mean, scale)
  ok = np.isfinite(ref) & (ref > -80)  # float32 CDF arguments hold ~1e-7 relative
  assert ok.sum() >= 1
  # log-probabilities: absolute 1e-4 where the bin mass is large, and relative in the tails,
  # where a float32 rounding of (x - mean)/scale ~ 1e-7 |z| moves log P by ~ z^2 * 1e-7.
  z = np.abs((x - mean) / scale)
  np.testing.assert_array_less(np.abs(np.asarray(ll, np.float64) - ref)[ok], (2e-4 + 5e-7 * (1 + z**2))[ok])


def test_discretized_bf16_and_grad():
  x = jnp.asarray([-1.0, 0.0, 128 / 127.5 - 1, 1.0], jnp.bfloat16)
  out = likelihood.discretized_gaussian_log_likelihood(x, jnp.zeros(4, jnp.bfloat16), jnp.full(4, -2.0, jnp.bfloat16))
  assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
  g = jax.jit(jax.grad(lambda m: likelihood.discretized_gaussian_log_likelihood(0.0, m, -3.0)))(0.01)
  h = 1e-4
  ref = (_np_bin_logprob(np.array(0.0), 0.01 + h, math.exp(-3.0)) - _np_bin_logprob(np.array(0.0), 0.01 - h, math.exp(-3.0))) / (2 * h)
  np.testing.assert_allclose(g, ref, rtol=1e-3)


@pytest.mark.parametrize("name", ["vp_linear", "ve"])
def test_prior_kl_closed_form(name):
  x0 = np.array([[0.5, -1.0, 0.0], [2.0, 0.1, -0.3]])
  if name == "vp_linear":
    sched, p_std = schedules.VPLinear(), np_vp_linear(1.0)[1]
    a, s = np_vp_linear(np.array([1.0, 0.7]))
  else:
    sched, p_std = schedules.VE(sigma_min=0.01, sigma_max=50.0), 50.0
    a, s = np.ones(2), 0.01 * 5000.0 ** np.array([1.0, 0.7])
  for i, t in enumerate([1.0, 0.7]):
    expect = np.sum(np.log(p_std / s[i]) + (s[i] ** 2 + a[i] ** 2 * x0**2) / (2 * p_std**2) - 0.5, axis=1)
    np.testing.assert_allclose(likelihood.prior_kl(sched, x0, t), expect, rtol=1e-4, atol=1e-6)


def test_bits_per_dim_and_grids():
  np.testing.assert_allclose(likelihood.bits_per_dim(3072 * math.log(2) * 3.0, 3072), 3.0, rtol=1e-6)
  np.testing.assert_allclose(likelihood.bits_per_dim(jnp.asarray([100.0]), 10), 100 / (10 * math.log(2)), rtol=1e-6)
  np.testing.assert_allclose(likelihood.uniform_grid(4, 0.2), [0.2, 0.4, 0.6, 0.8, 1.0], rtol=1e-6)


def test_vlb_errors():
  sched = schedules.VPLinear()
  ident = lambda xt, t: xt
  x0 = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match=r"unknown decoder 'bernoulli'; allowed"):
    likelihood.vlb_terms(x0_model(sched, ident), x0, jax.random.key(0), jnp.linspace(0.1, 1, 3), decoder="bernoulli")
  with pytest.raises(ValueError, match=r"unknown model_var 'fixed'"):
    likelihood.vlb_terms(x0_model(sched, ident), x0, jax.random.key(0), jnp.linspace(0.1, 1, 3), model_var="fixed")
  with pytest.raises(ValueError, match=r"t_grid must be a 1-D array.*\(2, 2\)"):
    likelihood.vlb_terms(x0_model(sched, ident), x0, jax.random.key(0), jnp.ones((2, 2)))


def test_prior_kl_takes_per_example_times():
  """t of shape [B] broadcasts over each example (B == D here, which a bare broadcast would get wrong)."""
  from diffusax.core import schedules as sch
  s = sch.get("vp_linear")
  x0 = np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4)
  t = np.array([0.3, 0.6, 0.9, 1.0], np.float32)
  got = np.asarray(likelihood.prior_kl(s, x0, t))
  for i in range(4):
    a, sg = float(s.alpha(t[i])), float(s.sigma(t[i]))
    want = 0.5 * np.sum((a * x0[i]) ** 2 + sg ** 2 - 1.0 - np.log(sg ** 2))  # KL(N(a x, s^2) || N(0, 1)).
    np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-5)  # float32 cancellation in s^2 - 1 - log s^2.
