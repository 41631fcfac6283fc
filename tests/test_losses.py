"""Losses, weightings, time samplers and label dropout against independent references.

Weightings are defined on the x0-space error (losses.py docstring). The test
builds each target's prediction from one x0_hat at fixed x_t with its own
formulas (eps_hat = (x_t - alpha x0_hat) / sigma, v = alpha eps - sigma x0,
score = -eps / sigma, flow = alpha' x0 + sigma' eps) and checks every weighted
loss against w_x0(t) * mean_d (x0_hat - x0)^2 with w_x0 written here:
  snr      SNR = alpha^2 / sigma^2
  min_snr  min(SNR, gamma)                         (Hang et al. 2023)
  elbo     -1/2 dlogSNR/dt SNR                     (Kingma et al. 2021, eq. 17)
  sigmoid  SNR sigmoid(bias - logSNR)              (Kingma & Gao 2023)
Deterministic checks: rtol 2e-4 (float32 conversions at t <= 0.8, see
test_targets.py). Monte Carlo checks: within 5 standard errors.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate

from diffusax.core import losses, schedules
from references import np_coefficients, np_flow, np_log_snr, np_targets, np_ve, np_vp_cosine, np_vp_linear

TARGETS = ["eps", "x0", "v", "score", "flow"]
T_EVAL = np.array([0.02, 0.055, 0.315, 0.605, 0.785])


SCHEDULES = {
    "vp_linear": (schedules.VPLinear(), np_vp_linear),
    "vp_cosine": (schedules.VPCosine(), np_vp_cosine),
    "ve": (schedules.VE(), np_ve),
    "flow": (schedules.Flow(), np_flow),
}
WEIGHTINGS = {"snr": {}, "min_snr": {"gamma": 5.0}, "elbo": {}, "sigmoid": {"bias": -1.0}}


def np_weight_x0(ref, t, weighting):
  lam = np_log_snr(ref, t)
  snr = np.exp(lam)
  if weighting == "snr":
    return snr
  if weighting == "min_snr":
    return np.minimum(snr, 5.0)
  if weighting == "elbo":
    h = 1e-6
    dlam = (np_log_snr(ref, t + h) - np_log_snr(ref, t - h)) / (2 * h)
    return -0.5 * dlam * snr
  if weighting == "sigmoid":
    return snr / (1 + np.exp(-(-1.0 - lam)))
  raise ValueError(weighting)


@jax.jit
def _all_losses(sched, preds, x0, eps, t):
  out = {}
  for target in TARGETS:
    for w in ["uniform", *WEIGHTINGS]:
      out[target, w] = losses.diffusion_loss(sched, target, preds[target], x0, eps, t, weighting=w,
                                             **WEIGHTINGS.get(w, {}))
  return out


def _case(name, seed=0):
  sched, ref = SCHEDULES[name]
  rng = np.random.default_rng(seed)
  x0 = rng.normal(size=(len(T_EVAL), 6))
  eps = rng.normal(size=x0.shape)
  t = T_EVAL.astype(np.float32).astype(np.float64)
  coef = np_coefficients(ref, t)
  a, s = coef[:2]
  xt = a[:, None] * x0 + s[:, None] * eps
  x0_hat = x0 + 0.2 * rng.normal(size=x0.shape)
  eps_hat = (xt - a[:, None] * x0_hat) / s[:, None]
  true = np_targets(x0, eps, *coef)
  preds = np_targets(x0_hat, eps_hat, *coef)
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  out = _all_losses(sched, {k: f32(v) for k, v in preds.items()}, f32(x0), f32(eps), f32(t))
  return ref, t, x0, x0_hat, true, preds, out


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_weighting_is_the_same_objective_in_every_target_space(name):
  ref, t, x0, x0_hat, true, preds, out = _case(name)
  mse_x0 = np.mean((x0_hat - x0) ** 2, axis=1)
  for target, w in itertools.product(TARGETS, WEIGHTINGS):
    expect = np_weight_x0(ref, t, w) * mse_x0
    got = out[target, w]
    assert got.shape == (len(t),) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, expect, rtol=2e-4, err_msg=f"{target} {w}")


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_uniform_is_plain_mse_and_snr_is_eps_mse(name):
  ref, t, x0, x0_hat, true, preds, out = _case(name)
  for target in TARGETS:
    mse = np.mean((preds[target] - true[target]) ** 2, axis=1)
    np.testing.assert_allclose(out[target, "uniform"], mse, rtol=2e-4, err_msg=target)
  # "snr" weighting of an x0 model is exactly the unweighted eps loss (DDPM's L_simple)
  np.testing.assert_allclose(out["x0", "snr"], out["eps", "uniform"], rtol=2e-4)
  np.testing.assert_allclose(out["x0", "uniform"], np.mean((x0_hat - x0) ** 2, axis=1), rtol=1e-5)


def test_min_snr_clips_at_gamma():
  ref, t, x0, x0_hat, true, preds, out = _case("vp_cosine")
  snr = np.exp(np_log_snr(ref, t))
  assert np.any(snr > 5.0) and np.any(snr < 5.0)  # both branches are exercised
  ratio = np.asarray(out["eps", "min_snr"]) / np.asarray(out["eps", "uniform"])  # eps-space weight
  np.testing.assert_allclose(ratio, np.minimum(snr, 5.0) / snr, rtol=2e-4)


def test_elbo_weighting_is_continuous_time_vlb():
  """E_{t ~ U(t_min, 1)} (1 - t_min) D loss_elbo = -1/2 int SNR'(t) E||x0 - x0_hat||^2 dt (VDM eq. 17).

  Data x0 ~ N(m, s^2 I) with the exact denoiser x0_hat = m + alpha s^2 / (alpha^2 s^2 + sigma^2)
  (x_t - alpha m), whose expected error per dimension is s^2 sigma^2 / (alpha^2 s^2 + sigma^2);
  the reference integral is computed by scipy quad in float64. The estimate uses
  20 independent low-discrepancy batches; the standard error is taken across them.
  """
  sched, ref = SCHEDULES["vp_cosine"]
  m, s, d, t_min = 0.3, 0.5, 4, 1e-2
  n_rep, b = 20, 4096

  @jax.jit
  def estimate(key):
    k1, k2, k3 = jax.random.split(key, 3)
    t = losses.low_discrepancy_t(k1, b, t_min=t_min)
    x0 = m + s * jax.random.normal(k2, (b, d))
    eps = jax.random.normal(k3, (b, d))
    a, sg = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    xt = a * x0 + sg * eps
    x0_hat = m + a * s**2 / (a**2 * s**2 + sg**2) * (xt - a * m)
    loss = losses.diffusion_loss(sched, "x0", x0_hat, x0, eps, t, weighting="elbo")
    return jnp.mean((1 - t_min) * d * loss)

  est = np.array([estimate(jax.random.key(i)) for i in range(n_rep)])
  mean, se = est.mean(), est.std(ddof=1) / np.sqrt(n_rep)

  def integrand(t):
    a, sg = ref(t)
    return np_weight_x0(ref, t, "elbo") * d * s**2 * sg**2 / (a**2 * s**2 + sg**2)
  exact = scipy.integrate.quad(integrand, t_min, 1.0, limit=200)[0]
  assert abs(mean - exact) < 5 * se, (mean, exact, se)
  assert se < 0.01 * exact  # the check is sharp: 5 SE < 5% of the value


# --- time samplers ----------------------------------------------------------

def test_uniform_t():
  t = losses.uniform_t(jax.random.key(0), 50_000, t_min=0.1, t_max=0.6)
  assert t.shape == (50_000,) and t.dtype == jnp.float32
  assert float(t.min()) >= 0.1 and float(t.max()) <= 0.6
  se = 0.5 / np.sqrt(12 * 50_000)
  assert abs(float(t.mean()) - 0.35) < 5 * se
  t = losses.sample_t(jax.random.key(1), 1000, "uniform", t_min=1e-3)
  assert float(t.min()) >= 1e-3 and float(t.max()) <= 1.0


def test_low_discrepancy_is_stratified():
  for b, t_min in [(16, 1e-5), (7, 0.2)]:
    for seed in range(3):
      t = np.asarray(losses.low_discrepancy_t(jax.random.key(seed), b, t_min=t_min), np.float64)
      assert t.shape == (b,)
      u = (t - t_min) / (1 - t_min)
      assert np.all((u >= 0) & (u < 1 + 1e-6))
      # exactly one sample in each stratum [k/B, (k+1)/B)
      np.testing.assert_array_equal(np.sort(np.floor(u * b + 1e-6).astype(int) % b), np.arange(b))
      np.testing.assert_allclose(np.diff(np.sort(u)), 1.0 / b, atol=1e-5)


def test_uniform_discrete_hits_only_knots():
  T = 20
  t = np.asarray(losses.sample_t(jax.random.key(0), 20_000, "uniform_discrete",
                                 schedule=schedules.get("ddpm_linear", num_steps=T)), np.float64)
  i = t * T - 1
  np.testing.assert_allclose(i, np.round(i), atol=1e-4)
  counts = np.bincount(np.round(i).astype(int), minlength=T)
  assert counts.size == T and np.all(counts > 0)
  p = 1 / T
  assert np.all(np.abs(counts / t.size - p) < 5 * np.sqrt(p * (1 - p) / t.size))
  t2 = losses.sample_t(jax.random.key(0), 100, "uniform_discrete", num_steps=7)
  np.testing.assert_allclose(np.asarray(t2) * 7, np.round(np.asarray(t2) * 7), atol=1e-4)


@pytest.mark.parametrize("name", ["vp_cosine", "ve_wide"])
def test_log_normal_t(name):
  """ln(sigma/alpha) at the returned t (paper closed form) has mean p_mean and std p_std."""
  if name == "ve_wide":
    sched, ref = schedules.VE(sigma_min=0.002, sigma_max=80.0), lambda u: np_ve(u, 0.002, 80.0)
  else:
    sched, ref = SCHEDULES[name]
  n, p_mean, p_std = 50_000, -1.2, 1.2
  t = np.asarray(losses.sample_t(jax.random.key(0), n, "log_normal", schedule=sched,
                                 p_mean=p_mean, p_std=p_std), np.float64)
  assert t.shape == (n,) and np.all((t >= 0) & (t <= 1))
  a, s = ref(t)
  log_sigma = np.log(s / a)
  assert abs(log_sigma.mean() - p_mean) < 5 * p_std / np.sqrt(n)
  assert abs(log_sigma.std() - p_std) < 5 * p_std / np.sqrt(2 * n)
  # t_min is honoured: with t_min = 0.05 about a tenth of the draws (vp_cosine: P(ln s < ln s(0.05)) = 13%)
  # land on t_min, none below.
  if name == "vp_cosine":
    tc = np.asarray(losses.sample_t(jax.random.key(0), n, "log_normal", schedule=sched, t_min=0.05))
    assert tc.min() == np.float32(0.05) and 0.08 < np.mean(tc == np.float32(0.05)) < 0.2


def test_sample_t_errors():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r"unknown time sampler 'uniformm'.*low_discrepancy"):
    losses.sample_t(key, 4, "uniformm")
  with pytest.raises(ValueError, match="num_steps"):
    losses.sample_t(key, 4, "uniform_discrete", schedule=schedules.VPCosine())
  with pytest.raises(ValueError, match="schedule"):
    losses.sample_t(key, 4, "log_normal")


# --- label dropout ------------------------------------------------------------

def test_drop_labels():
  labels = jnp.arange(40_000, dtype=jnp.int32) % 10
  f = jax.jit(losses.drop_labels, static_argnums=(3,))
  for p in [0.1, 0.5]:
    out = np.asarray(f(jax.random.key(1), labels, p, 10))
    dropped = out == 10
    assert abs(dropped.mean() - p) < 5 * np.sqrt(p * (1 - p) / labels.size)
    np.testing.assert_array_equal(out[~dropped], np.asarray(labels)[~dropped])
  np.testing.assert_array_equal(f(jax.random.key(2), labels, 0.0, 10), labels)
  np.testing.assert_array_equal(f(jax.random.key(3), labels, 1.0, 10), np.full(labels.shape, 10))
  assert f(jax.random.key(2), labels.astype(jnp.int16), 0.3, 10).dtype == jnp.int16
  with pytest.raises(ValueError, match="labels must be integers"):
    losses.drop_labels(jax.random.key(0), jnp.zeros(3), 0.1, 10)


# --- dtypes, transformations, errors ------------------------------------------

def test_bf16_vmap_grad():
  sched = SCHEDULES["vp_linear"][0]
  rng = np.random.default_rng(0)
  x0, eps, pred = (rng.normal(size=(4, 3, 2)).astype(np.float32) for _ in range(3))
  t = np.array([0.1, 0.3, 0.5, 0.7], np.float32)
  loss = jax.jit(losses.diffusion_loss, static_argnames=("target", "weighting"))
  f32 = loss(sched, target="v", pred=pred, x0=x0, eps=eps, t=t, weighting="min_snr")
  bf = lambda v: jnp.asarray(v, jnp.bfloat16)
  got = loss(sched, target="v", pred=bf(pred), x0=bf(x0), eps=bf(eps), t=bf(t), weighting="min_snr")
  assert got.dtype == jnp.float32
  ref = loss(sched, target="v", pred=bf(pred).astype(jnp.float32), x0=bf(x0).astype(jnp.float32),
             eps=bf(eps).astype(jnp.float32), t=bf(t).astype(jnp.float32), weighting="min_snr")
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  np.testing.assert_allclose(got, f32, rtol=5e-2)  # bf16 rounding of the inputs
  # vmap over examples (each a batch of one) equals the batched loss
  per = jax.jit(jax.vmap(lambda p, a, e, u: losses.diffusion_loss(
      sched, "v", p[None], a[None], e[None], u[None], weighting="min_snr")[0]))(pred, x0, eps, t)
  np.testing.assert_allclose(per, f32, rtol=1e-5)
  # d loss_b / d pred = 2 w_b (pred - target) / D
  g = jax.jit(jax.grad(lambda p: losses.diffusion_loss(sched, "eps", p, x0, eps, t, weighting="uniform").sum()))(pred)
  np.testing.assert_allclose(g, 2 * (pred - eps) / 6, rtol=1e-5, atol=1e-7)
  assert np.all(np.isfinite(jax.jit(jax.grad(lambda u: losses.diffusion_loss(
      sched, "v", pred, x0, eps, u, weighting="elbo").sum()))(t)))


def test_errors_name_the_argument():
  sched = SCHEDULES["vp_linear"][0]
  x0 = jnp.zeros((4, 3))
  t = jnp.full((4,), 0.5)
  with pytest.raises(ValueError, match=r"unknown loss weighting 'snrr'; allowed:.*min_snr"):
    losses.diffusion_loss(sched, "eps", x0, x0, x0, t, weighting="snrr")
  with pytest.raises(ValueError, match=r"unknown target 'noise'"):
    losses.diffusion_loss(sched, "noise", x0, x0, x0, t)
  with pytest.raises(ValueError, match=r"unknown loss weighting parameter\(s\) \['gama'\]"):
    losses.diffusion_loss(sched, "eps", x0, x0, x0, t, weighting="min_snr", gama=1.0)
  loss = jax.jit(losses.diffusion_loss, static_argnums=(1,))
  with pytest.raises(ValueError, match=r"pred and x0 must have the same shape"):
    loss(sched, "eps", jnp.zeros((4, 2)), x0, x0, t)
  with pytest.raises(ValueError, match=r"x0 and eps must have the same shape.*eps.shape=\(4, 1\)"):
    loss(sched, "eps", x0, x0, jnp.zeros((4, 1)), t)
  with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[4\], got \(3,\)"):
    loss(sched, "eps", x0, x0, x0, jnp.full((3,), 0.5))
  with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
    loss(sched, "eps", x0, x0, x0, 0.5)


def test_drop_labels_refuses_impossible_probability():
  with pytest.raises(ValueError, match=r"p must lie in \[0, 1\], got 1.5"):
    losses.drop_labels(jax.random.key(0), jnp.arange(4), 1.5, 10)


# ---------------------------------------------------------------------------
# Improved DDPM's L_vlb term of a learned-variance model, against Ho et al.'s formulas in float64.

def _ddpm_np(betas):
  """(abar [T+1] with abar_0 = 1, beta_tilde [T+1]) from the betas, Ho et al. 2020 eq. 6-7."""
  betas = np.asarray(betas, np.float64)
  abar = np.concatenate([[1.0], np.cumprod(1.0 - betas)])
  bt = np.concatenate([[0.0], (1.0 - abar[:-1]) / (1.0 - abar[1:]) * betas])
  return abar, np.concatenate([[0.0], betas]), bt


def test_vlb_loss_is_the_gaussian_kl_with_the_interpolated_variance_and_the_decoder_at_the_first_step():
  import scipy.stats
  T = 20
  betas = np.linspace(1e-3, 0.2, T)
  sched = schedules.Discrete.from_betas(jnp.asarray(betas, jnp.float32))
  abar, beta, btilde = _ddpm_np(betas)
  rng = np.random.default_rng(0)
  b, d = 6, 5
  k = np.array([1, 2, 5, 10, 19, 20])  # step k: t = k / T, s = (k - 1) / T; k = 1 is the decoder
  x0 = rng.choice(np.linspace(-1, 1, 17), size=(b, d))  # 17-level data
  x_t = np.sqrt(abar[k])[:, None] * x0 + np.sqrt(1 - abar[k])[:, None] * rng.normal(size=(b, d))
  x0_hat = np.clip(x0 + 0.1 * rng.normal(size=(b, d)), -1, 1)
  v = rng.uniform(-1, 1, size=(b, d))
  got = np.asarray(losses.vlb_loss(sched, x0_hat, v, x0, x_t, jnp.asarray(k / T, jnp.float32), dt=1.0 / T,
                                   decoder="discretized", num_bins=17))

  def mu(x0_, xt, kk):  # Ho et al. 2020, eq. 7
    c0 = np.sqrt(abar[kk - 1]) * beta[kk] / (1 - abar[kk])
    ct = np.sqrt(1 - beta[kk]) * (1 - abar[kk - 1]) / (1 - abar[kk])
    return c0[:, None] * x0_ + ct[:, None] * xt

  frac = (v + 1) / 2
  small = np.where(k == 1, btilde[np.minimum(k + 1, T)], btilde[k])  # the clipped beta_tilde at k = 1
  log_var = frac * np.log(beta[k])[:, None] + (1 - frac) * np.log(small)[:, None]
  var_p = np.exp(log_var)
  mq, mp, vq = mu(x0, x_t, k), mu(x0_hat, x_t, k), btilde[k][:, None]
  kl = 0.5 * (np.log(var_p) - np.log(vq) + (vq + (mq - mp) ** 2) / var_p - 1)
  half, std = 1 / 16, np.sqrt(var_p)
  n = scipy.stats.norm
  up, lo = (x0 - x0_hat + half) / std, (x0 - x0_hat - half) / std
  # The bin's mass, on the side of the mean where float64 keeps it (the tails are far out: std ~ 0.03).
  mass = np.where(lo > 0, n.sf(lo) - n.sf(up), n.cdf(up) - n.cdf(lo))
  p = np.where(x0 < -1 + half, n.cdf(up), np.where(x0 > 1 - half, n.sf(lo), mass))
  want = np.where((k == 1)[:, None], -np.log(p), kl).mean(1) / np.log(2)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
  assert np.all(want[1:] > 0) and np.ptp(want) > 0.1  # a real comparison, not of zeros


def test_hybrid_loss_trains_the_mean_only_through_l_simple():
  sched = schedules.get("vp_cosine")
  rng = np.random.default_rng(1)
  x0 = jnp.asarray(rng.uniform(-1, 1, (4, 3, 3, 2)), jnp.float32)
  eps = jnp.asarray(rng.normal(size=x0.shape), jnp.float32)
  t = jnp.asarray([0.0005, 0.1, 0.5, 0.9], jnp.float32)  # the first is below dt: the decoder term
  out = jnp.asarray(rng.normal(size=(4, 3, 3, 4)) * 0.3, jnp.float32)
  parts = lambda o: losses.hybrid_loss(sched, "eps", o, x0, eps, t, dt=1e-3, decoder="gaussian")[1]  # noqa: E731
  g_vlb = jax.grad(lambda o: jnp.sum(parts(o)["vlb"]))(out)
  g_simple = jax.grad(lambda o: jnp.sum(parts(o)["simple"]))(out)
  assert np.all(np.asarray(g_vlb[..., :2]) == 0.0)  # the mean's gradient is stopped in L_vlb
  assert np.all(np.abs(np.asarray(g_vlb[..., 2:])).sum((1, 2, 3)) > 0)
  assert np.all(np.asarray(g_simple[..., 2:]) == 0.0) and np.abs(np.asarray(g_simple[..., :2])).sum() > 0
  total, p = losses.hybrid_loss(sched, "eps", out, x0, eps, t, dt=1e-3, vlb_weight=1e-3, decoder="gaussian")
  np.testing.assert_allclose(total, p["simple"] + 1e-3 * p["vlb"], rtol=1e-6)
  np.testing.assert_allclose(p["simple"], losses.diffusion_loss(sched, "eps", out[..., :2], x0, eps, t), rtol=1e-6)
  with pytest.raises(ValueError, match=r"a learned-variance output needs 2C = 4 channels"):
    losses.hybrid_loss(sched, "eps", out[..., :3], x0, eps, t, dt=1e-3)
  # Finite gradients at every step of a discrete schedule with the discretised decoder (the branches
  # not taken must not leak NaN: at large t the decoder of a far-off mean overflows).
  disc = schedules.get("ddpm_cosine")
  k = jnp.asarray([1, 2, 500, 1000], jnp.float32)
  x0q = jnp.round(x0 * 8) / 8  # 17 levels
  g = jax.grad(lambda o: jnp.sum(losses.hybrid_loss(disc, "eps", o, x0q, eps, k / 1000, dt=1e-3)[0]))(out)
  assert np.all(np.isfinite(np.asarray(g)))
