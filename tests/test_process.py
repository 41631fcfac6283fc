"""Forward process: q_sample statistics, posterior by Gaussian conditioning, DDPM eqs. 6-7.

References are written here in numpy float64 from the papers' closed forms
(see test_schedules.py for the schedule formulas):
  * posterior q(x_s | x_t, x0): the joint of (x_s, x_t) given x0 of a Markov
    forward process is Gaussian with Var x_s = sigma_s^2, Var x_t = sigma_t^2,
    Cov(x_s, x_t) = (alpha_t / alpha_s) sigma_s^2; conditioning on x_t gives
    mean = alpha_s x0 + C / sigma_t^2 (x_t - alpha_t x0), var = sigma_s^2 - C^2 / sigma_t^2.
  * DDPM (Ho et al. 2020, eq. 7): beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t,
    mean = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 + sqrt(1 - beta_t) (1 - abar_{t-1}) / (1 - abar_t) x_t.
Monte Carlo checks assert within 5 standard errors.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusax.core import process, schedules
from references import np_flow, np_ve, np_vp_cosine, np_vp_linear


CONTINUOUS = {
    "vp_linear": (schedules.VPLinear(), np_vp_linear),
    "vp_cosine": (schedules.VPCosine(), np_vp_cosine),
    "ve": (schedules.VE(), np_ve),
    "flow": (schedules.Flow(), np_flow),
}


@pytest.fixture(scope="module")
def q_sample_jit():
  return jax.jit(process.q_sample)


@pytest.mark.parametrize("name", sorted(CONTINUOUS))
def test_q_sample_statistics(name, q_sample_jit):
  """Fixed x0, 100k eps draws: mean alpha x0 and variance sigma^2 within 5 standard errors."""
  sched, ref = CONTINUOUS[name]
  n, d = 100_000, 3
  x0 = np.array([0.7, -1.3, 0.2], np.float32)
  for i, t in enumerate([0.1, 0.5, 0.9]):
    eps = jax.random.normal(jax.random.key(i), (n, d), jnp.float32)
    xt = np.asarray(q_sample_jit(sched, jnp.broadcast_to(x0, (n, d)), jnp.full((n,), t), eps), np.float64)
    a, s = ref(np.float64(np.float32(t)))
    se_mean = s / np.sqrt(n)
    se_var = s**2 * np.sqrt(2.0 / (n - 1))
    assert np.all(np.abs(xt.mean(0) - a * x0) < 5 * se_mean), (xt.mean(0), a * x0, se_mean)
    assert np.all(np.abs(xt.var(0, ddof=1) - s**2) < 5 * se_var), (xt.var(0), s**2, se_var)


def test_q_sample_exact_and_scalar_t():
  sched, ref = CONTINUOUS["vp_linear"]
  x0 = np.array([[1.0, -2.0], [0.5, 0.0]], np.float32)
  eps = np.array([[0.3, 0.1], [-1.0, 2.0]], np.float32)
  t = np.array([0.2, 0.7], np.float32)
  a, s = ref(t.astype(np.float64))
  out = process.q_sample(sched, x0, t, eps)
  np.testing.assert_allclose(out, a[:, None] * x0 + s[:, None] * eps, rtol=1e-5, atol=1e-6)
  a, s = ref(np.float64(np.float32(0.2)))
  np.testing.assert_allclose(process.q_sample(sched, x0, 0.2, eps), a * x0 + s * eps, rtol=1e-5, atol=1e-6)


def np_posterior(ref, x0, xt, t, s):
  """Gaussian conditioning of x_s on x_t in the joint given x0 (float64)."""
  a_t, s_t = ref(t)
  a_s, s_s = ref(s)
  cov = (a_t / a_s) * s_s**2
  mean = a_s * x0 + cov / s_t**2 * (xt - a_t * x0)
  var = s_s**2 - cov**2 / s_t**2
  return mean, var


@pytest.mark.parametrize("name", sorted(CONTINUOUS))
def test_posterior_is_gaussian_conditioning(name):
  sched, ref = CONTINUOUS[name]
  rng = np.random.default_rng(0)
  t = np.array([0.3, 0.6, 0.9, 0.5, 0.95], np.float32)
  s = np.array([0.1, 0.55, 0.2, 0.01, 0.9], np.float32)
  x0 = rng.normal(size=(5, 4)).astype(np.float32)
  xt = rng.normal(size=(5, 4)).astype(np.float32) * 2
  mean, var = jax.jit(process.posterior)(sched, x0, xt, t, s)
  m_ref, v_ref = np_posterior(ref, x0.astype(np.float64), xt.astype(np.float64),
                              t.astype(np.float64)[:, None], s.astype(np.float64)[:, None])
  # var for VE reaches ~sigma_s^2 (up to 2500); the comparison is relative.
  np.testing.assert_allclose(mean, m_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.broadcast_to(var, m_ref.shape), np.broadcast_to(v_ref, m_ref.shape), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("name", sorted(CONTINUOUS))
def test_transition(name):
  sched, ref = CONTINUOUS[name]
  t = np.array([0.3, 0.6, 0.9, 0.5], np.float32)
  s = np.array([0.1, 0.55, 0.2, 0.01], np.float32)
  a_ts, var_ts = process.transition(sched, t, s)
  (a_t, s_t), (a_s, s_s) = ref(t.astype(np.float64)), ref(s.astype(np.float64))
  np.testing.assert_allclose(a_ts, a_t / a_s, rtol=1e-5)
  np.testing.assert_allclose(var_ts, s_t**2 - (a_t / a_s) ** 2 * s_s**2, rtol=1e-4)


@pytest.mark.parametrize("name", ["ddpm_linear", "ddpm_cosine"])
def test_discrete_posterior_is_ddpm(name):
  """With s = t - 1/T the posterior is beta_tilde and Ho et al. eq. 7, at steps 2..T.

  (At step 1, s = 0 sits on the extrapolated log-SNR below the first knot, where
  DDPM instead has abar_0 = 1 and beta_tilde_1 = 0: not compared.)
  """
  T = 100
  sched = schedules.get(name, num_steps=T)
  if name == "ddpm_linear":
    betas = np.linspace(1e-4, 0.02, T)
  else:
    f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
    betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
  abar = np.cumprod(1 - betas)
  i = np.arange(1, T)  # 0-based steps 1..T-1
  beta_tilde = (1 - abar[i - 1]) / (1 - abar[i]) * betas[i]
  c_x0 = np.sqrt(abar[i - 1]) * betas[i] / (1 - abar[i])
  c_xt = np.sqrt(1 - betas[i]) * (1 - abar[i - 1]) / (1 - abar[i])
  t = sched.t_from_step(i)
  s = t - 1.0 / T
  ones, zeros = jnp.ones((T - 1, 1)), jnp.zeros((T - 1, 1))
  mean_x0, var = process.posterior(sched, ones, zeros, t, s)   # coefficient of x0
  mean_xt, _ = process.posterior(sched, zeros, ones, t, s)     # coefficient of x_t
  # float32 log-SNR knots (|lam| <= 20, abs error ~1e-6) enter through 1 - exp(lam_t - lam_s)
  # with lam_t - lam_s down to ~0.02: relative error up to ~1e-4.
  np.testing.assert_allclose(var[:, 0], beta_tilde, rtol=2e-4)
  np.testing.assert_allclose(mean_x0[:, 0], c_x0, rtol=2e-4)
  np.testing.assert_allclose(mean_xt[:, 0], c_xt, rtol=2e-4)
  a_ts, var_ts = process.transition(sched, t, s)
  np.testing.assert_allclose(var_ts, betas[i], rtol=2e-4)
  # betas are stored in float32: 1 - 0.999 (the clipped last cosine beta) is off by 1.3e-5 relative.
  np.testing.assert_allclose(a_ts, np.sqrt(1 - betas[i]), rtol=3e-5)


def test_prior():
  for sched, std in [(schedules.VE(sigma_max=80.0), 80.0), (schedules.Flow(), 1.0),
                     (schedules.VPLinear(), np_vp_linear(1.0)[1])]:
    mean, s = process.prior(sched)
    np.testing.assert_allclose(mean, 0.0)
    np.testing.assert_allclose(s, std, rtol=1e-6)
  x = process.prior_sample(jax.random.key(0), schedules.VE(sigma_max=80.0), (20_000,), jnp.bfloat16)
  assert x.shape == (20_000,) and x.dtype == jnp.bfloat16
  se = 80.0**2 * np.sqrt(2 / 20_000)
  assert abs(np.var(np.asarray(x, np.float64)) - 80.0**2) < 5 * se


# --- dtypes, transformations ----------------------------------------------

def test_bf16_inputs(q_sample_jit):
  sched, ref = CONTINUOUS["vp_cosine"]
  x0 = jnp.asarray([[0.5, -0.25, 1.0]], jnp.bfloat16)
  eps = jnp.asarray([[1.0, 0.5, -2.0]], jnp.bfloat16)
  t = jnp.asarray([0.3], jnp.bfloat16)
  out = q_sample_jit(sched, x0, t, eps)
  assert out.dtype == jnp.bfloat16
  a, s = ref(np.float64(np.asarray(t, np.float32)[0]))
  expect = a * np.asarray(x0, np.float64) + s * np.asarray(eps, np.float64)
  np.testing.assert_allclose(np.asarray(out, np.float64), expect, rtol=8e-3)  # bf16: 8 bits mantissa
  mean, var = process.posterior(sched, x0, out, t, jnp.asarray([0.1], jnp.bfloat16))
  assert mean.dtype == jnp.bfloat16 and var.dtype == jnp.float32
  # mixed: float32 eps promotes to float32
  assert process.q_sample(sched, x0, t, eps.astype(jnp.float32)).dtype == jnp.float32


def test_vmap_matches_batch():
  sched = CONTINUOUS["vp_linear"][0]
  rng = np.random.default_rng(1)
  x0 = rng.normal(size=(6, 2, 3)).astype(np.float32)
  eps = rng.normal(size=(6, 2, 3)).astype(np.float32)
  t = np.linspace(0.1, 0.9, 6).astype(np.float32)
  batched = process.q_sample(sched, x0, t, eps)
  mapped = jax.jit(jax.vmap(lambda a, b, c: process.q_sample(sched, a, b, c)))(x0, t, eps)
  np.testing.assert_allclose(mapped, batched, rtol=1e-6)
  pm, pv = process.posterior(sched, x0, batched, t, 0.5 * t)
  vm, vv = jax.jit(jax.vmap(lambda a, b, c: process.posterior(sched, a, b, c, 0.5 * c)))(x0, batched, t)
  np.testing.assert_allclose(vm, pm, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(vv.reshape(-1), np.broadcast_to(pv, (6, 1, 1)).reshape(-1), rtol=1e-6)


def test_gradients():
  """d x_t / dt = alpha'(t) x0 + sigma'(t) eps (float64 central differences); d x_t / d x0 = alpha."""
  sched, ref = CONTINUOUS["vp_cosine"]
  x0 = jnp.asarray([[0.5, -1.0]])
  eps = jnp.asarray([[1.5, 0.25]])
  g = jax.jit(jax.grad(lambda t: process.q_sample(sched, x0, t, eps).sum()))(0.4)
  h = 1e-6
  da = (ref(0.4 + h)[0] - ref(0.4 - h)[0]) / (2 * h)
  ds = (ref(0.4 + h)[1] - ref(0.4 - h)[1]) / (2 * h)
  np.testing.assert_allclose(g, da * np.sum(x0) + ds * np.sum(eps), rtol=1e-4)
  gx = jax.jit(jax.grad(lambda x: process.q_sample(sched, x, 0.4, eps).sum()))(x0)
  np.testing.assert_allclose(gx, np.full((1, 2), ref(np.float64(np.float32(0.4)))[0]), rtol=1e-5)
  gm = jax.jit(jax.grad(lambda x: process.posterior(sched, x, eps, 0.4, 0.2)[0].sum()))(x0)
  assert np.all(np.isfinite(gm))


# --- errors at trace time ------------------------------------------------

def test_shape_errors_name_the_argument():
  sched = CONTINUOUS["vp_linear"][0]
  x0 = jnp.zeros((4, 3))
  f = jax.jit(process.q_sample)
  with pytest.raises(ValueError, match=r"x0 and eps.*eps.shape=\(4, 2\)"):
    f(sched, x0, jnp.full((4,), 0.5), jnp.zeros((4, 2)))
  with pytest.raises(ValueError, match=r"t must be a scalar or of shape \[B\].*t.shape=\(5,\)"):
    f(sched, x0, jnp.full((5,), 0.5), jnp.zeros((4, 3)))
  with pytest.raises(ValueError, match=r"t.shape=\(4, 1\)"):
    f(sched, x0, jnp.full((4, 1), 0.5), jnp.zeros((4, 3)))
  # raised while tracing: eval_shape never runs XLA
  with pytest.raises(ValueError, match="eps"):
    jax.eval_shape(lambda e: process.q_sample(sched, x0, 0.5, e), jax.ShapeDtypeStruct((3, 3), jnp.float32))
  with pytest.raises(ValueError, match="x0 and x_t"):
    process.posterior(sched, x0, jnp.zeros((4, 4)), 0.5, 0.2)
  with pytest.raises(ValueError, match=r"s must be a scalar or of shape \[B\].*s.shape=\(3,\)"):
    process.posterior(sched, x0, x0, jnp.full((4,), 0.5), jnp.full((3,), 0.2))
