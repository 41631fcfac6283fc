"""Target conversions against the definitions, written here from (x0, eps).

With x_t = alpha x0 + sigma eps (alpha, sigma, alpha', sigma' from the papers'
closed forms in numpy float64, see test_schedules.py):
    eps, x0, v = alpha eps - sigma x0 (Salimans & Ho 2022),
    score = grad_{x_t} log q(x_t | x0) (taken here by jax.grad of the log density),
    flow = alpha' x0 + sigma' eps (= eps - x0 for rectified flow).
Tolerance: float32 conversions divide by alpha or sigma; at the times used
(t in [0.05, 0.8]) the worst amplification is ~1/alpha ~ 20, so rtol 1e-4 with
atol 1e-4 * (largest magnitude of the reference).
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusax.core import losses, schedules, targets
from references import np_coefficients, np_flow, np_targets, np_ve, np_vp_cosine, np_vp_linear

TARGETS = ["eps", "x0", "v", "score", "flow"]
T_EVAL = np.array([0.055, 0.315, 0.605, 0.785])
T_DISCRETE = 50


def np_discrete(betas):
  """Continuous view of a DDPM schedule: log-SNR linear in t between knots i/T (i >= 1)."""
  acp = np.cumprod(1 - betas)
  lam = np.log(acp / (1 - acp))
  knots_t = np.arange(1, len(betas) + 1) / len(betas)

  def ref(t):
    l = np.interp(t, knots_t, lam)  # only used at t >= 1/T
    return np.sqrt(1 / (1 + np.exp(-l))), np.sqrt(1 / (1 + np.exp(l)))
  return ref


def _cos_betas(T, s=0.008):
  f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
  return np.minimum(1 - f[1:] / f[:-1], 0.999)


SCHEDULES = {
    "vp_linear": (schedules.VPLinear(), np_vp_linear),
    "vp_cosine": (schedules.VPCosine(), np_vp_cosine),
    "ve": (schedules.VE(), np_ve),
    "flow": (schedules.Flow(), np_flow),
    "ddpm_linear": (schedules.get("ddpm_linear", num_steps=T_DISCRETE),
                    np_discrete(np.linspace(1e-4, 0.02, T_DISCRETE))),
    "ddpm_cosine": (schedules.get("ddpm_cosine", num_steps=T_DISCRETE), np_discrete(_cos_betas(T_DISCRETE))),
}


def _case(name, seed=0):
  sched, ref = SCHEDULES[name]
  rng = np.random.default_rng(seed)
  x0 = rng.normal(size=(4, 5))
  eps = rng.normal(size=(4, 5))
  t = T_EVAL.astype(np.float32).astype(np.float64)
  a, s, da, ds = np_coefficients(ref, t)
  xt = a[:, None] * x0 + s[:, None] * eps
  return sched, x0, eps, t, xt, (a, s, da, ds)


@jax.jit
def _all_pairs(sched, preds, xt, t):
  """{(src, dst): convert_at(preds[src], src -> dst)} for all 25 pairs, in one compiled call."""
  return {f"{a}>{b}": targets.convert_at(sched, a, b, preds[a], xt, t) for a, b in itertools.product(TARGETS, TARGETS)}


@jax.jit
def _target_values(sched, x0, eps, t):
  return {k: losses.target_value(sched, k, x0, eps, t) for k in TARGETS}


def _close(got, ref, rtol=1e-4):
  np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=rtol, atol=rtol * np.abs(ref).max())


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_conversion_matches_definitions(name):
  """convert_at(src -> dst) of the true src value equals the true dst value, for all 25 pairs."""
  sched, x0, eps, t, xt, coef = _case(name)
  true = np_targets(x0, eps, *coef)
  out = _all_pairs(sched, {k: jnp.asarray(v, jnp.float32) for k, v in true.items()},
                   jnp.asarray(xt, jnp.float32), jnp.asarray(t, jnp.float32))
  for src, dst in itertools.product(TARGETS, TARGETS):
    got = out[f"{src}>{dst}"]
    assert got.dtype == jnp.float32
    _close(got, true[dst])


@pytest.mark.parametrize("name", ["vp_linear", "flow"])
def test_x0_eps_weights_solve_the_definitions(name):
  """x0 = A x_t + B pred and eps = C x_t + D pred hold for the true pred of every target (samplers' fast path)."""
  _, x0, eps, t, xt, (a, s, da, ds) = _case(name)
  true = np_targets(x0, eps, a, s, da, ds)
  for target in TARGETS:
    w = [np.asarray(c, np.float64)[:, None] for c in targets.x0_eps_weights(
        target, *(jnp.asarray(c, jnp.float32) for c in (a, s, da, ds)))]
    _close(w[0] * xt + w[1] * true[target], x0)
    _close(w[2] * xt + w[3] * true[target], eps)
  with pytest.raises(ValueError, match="d_alpha and d_sigma"):
    targets.x0_eps_weights("flow", 1.0, 0.5)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_round_trips(name):
  """convert(convert(p, a, b), b, a) == p for arbitrary p (not only the true target value)."""
  sched, _, _, t, xt, _ = _case(name)
  pred = jnp.asarray(np.random.default_rng(3).normal(size=xt.shape), jnp.float32)
  xt, t = jnp.asarray(xt, jnp.float32), jnp.asarray(t, jnp.float32)
  there = _all_pairs(sched, {k: pred for k in TARGETS}, xt, t)  # reuses the compiled 25-pair call
  for a in TARGETS:
    back = _all_pairs(sched, {b: there[f"{a}>{b}"] for b in TARGETS}, xt, t)
    for b in TARGETS:
      _close(back[f"{b}>{a}"], np.asarray(pred, np.float64), rtol=2e-4)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_target_value_and_score_is_grad_log_q(name):
  sched, x0, eps, t, xt, (a, s, da, ds) = _case(name)
  a32, s32 = jnp.asarray(a[:, None], jnp.float32), jnp.asarray(s[:, None], jnp.float32)

  def log_q(x):  # log N(x; alpha x0, sigma^2 I) summed over everything
    return jnp.sum(-0.5 * jnp.square(x - a32 * x0) / s32**2 - jnp.log(s32) - 0.5 * jnp.log(2 * jnp.pi))

  score_ref = jax.grad(log_q)(jnp.asarray(xt, jnp.float32))
  got = _target_values(sched, jnp.asarray(x0, jnp.float32), jnp.asarray(eps, jnp.float32), jnp.asarray(t, jnp.float32))
  _close(got["score"], np.asarray(score_ref, np.float64), rtol=2e-4)
  true = np_targets(x0, eps, a, s, da, ds)
  for name_ in TARGETS:
    _close(got[name_], true[name_])


def test_flow_schedule_velocity_is_eps_minus_x0():
  sched, x0, eps, t, xt, _ = _case("flow")
  _close(losses.target_value(sched, "flow", x0, eps, t), eps - x0)
  # and it is d x_t / dt along the path for fixed (x0, eps)
  dxdt = jax.jit(jax.vmap(jax.jacfwd(lambda u, a, b: (1 - u) * a + u * b)))(jnp.asarray(t), jnp.asarray(x0), jnp.asarray(eps))
  _close(dxdt, eps - x0)


@pytest.mark.parametrize("name", ["vp_cosine", "ve", "flow", "ddpm_linear"])
def test_x0_mse_factor(name):
  """||target_hat - target||^2 = c ||x0_hat - x0||^2 at fixed x_t, with target_hat built by np_targets."""
  sched, x0, eps, t, xt, (a, s, da, ds) = _case(name)
  x0_hat = x0 + np.random.default_rng(5).normal(size=x0.shape) * 0.3
  eps_hat = (xt - a[:, None] * x0_hat) / s[:, None]
  true, hat = np_targets(x0, eps, a, s, da, ds), np_targets(x0_hat, eps_hat, a, s, da, ds)
  err_x0 = np.sum((x0_hat - x0) ** 2, axis=1)
  for name_ in TARGETS:
    c = targets.x0_mse_factor(name_, a, s, da, ds)
    np.testing.assert_allclose(np.asarray(c) * err_x0, np.sum((hat[name_] - true[name_]) ** 2, axis=1), rtol=1e-4)


# --- dtypes, transformations -------------------------------------------------

def test_jit_vmap_bf16_and_grad():
  sched, x0, eps, t, xt, (a, s, da, ds) = _case("vp_linear")
  f = jax.jit(targets.convert_at, static_argnums=(1, 2))
  v = np_targets(x0, eps, a, s, da, ds)["v"]
  got = f(sched, "v", "eps", jnp.asarray(v, jnp.float32), jnp.asarray(xt, jnp.float32), jnp.asarray(t, jnp.float32))
  _close(got, eps)
  # vmap over examples with scalar coefficients equals the batched call
  mapped = jax.jit(jax.vmap(lambda p, x, u: targets.convert_at(sched, "v", "eps", p, x, u)))(
      jnp.asarray(v, jnp.float32), jnp.asarray(xt, jnp.float32), jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(mapped, got, rtol=1e-5, atol=1e-6)
  # bfloat16 inputs: float32 output equal to the float32 conversion of the rounded inputs
  vb, xb = jnp.asarray(v, jnp.bfloat16), jnp.asarray(xt, jnp.bfloat16)
  gb = f(sched, "v", "eps", vb, xb, jnp.asarray(t, jnp.bfloat16))
  assert gb.dtype == jnp.float32
  ref = f(sched, "v", "eps", vb.astype(jnp.float32), xb.astype(jnp.float32),
          jnp.asarray(t, jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(gb, ref, rtol=1e-6, atol=1e-6)
  # gradient of eps -> x0 w.r.t. the prediction is -sigma / alpha
  g = jax.jit(jax.grad(lambda p: targets.convert("eps", "x0", p, jnp.asarray(xt), a, s).sum()))(jnp.asarray(eps, jnp.float32))
  np.testing.assert_allclose(g, np.broadcast_to(-(s / a)[:, None], g.shape), rtol=1e-5)
  # differentiable through the schedule's time too (finite)
  gt = jax.jit(jax.grad(lambda u: targets.convert_at(sched, "v", "x0", jnp.asarray(v), jnp.asarray(xt), u).sum()))(
      jnp.asarray(t, jnp.float32))
  assert np.all(np.isfinite(gt))


# --- errors --------------------------------------------------------------

def test_errors_name_the_argument():
  x = jnp.zeros((4, 3))
  with pytest.raises(ValueError, match=r"unknown src 'noise'; allowed: \['eps', 'x0', 'v', 'score', 'flow'\]"):
    targets.convert("noise", "x0", x, x, 1.0, 1.0)
  with pytest.raises(ValueError, match="unknown dst 'velocity'"):
    targets.convert("eps", "velocity", x, x, 1.0, 1.0)
  with pytest.raises(ValueError, match=r"pred and x_t must have the same shape.*\(4, 2\)"):
    targets.convert("eps", "x0", jnp.zeros((4, 2)), x, 1.0, 1.0)
  with pytest.raises(ValueError, match=r"alpha of shape \(5,\)"):
    targets.convert("eps", "x0", x, x, jnp.ones(5), 1.0)
  with pytest.raises(ValueError, match=r"sigma of shape \(2, 2\) does not broadcast"):
    targets.convert("eps", "x0", x, x, 1.0, jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="d_alpha and d_sigma"):
    targets.convert("flow", "x0", x, x, 1.0, 1.0)
  with pytest.raises(ValueError, match="d_alpha and d_sigma"):
    targets.convert("eps", "flow", x, x, 1.0, 1.0)
  # at trace time under jit
  with pytest.raises(ValueError, match="pred and x_t"):
    jax.jit(lambda p: targets.convert("eps", "x0", p, x, 1.0, 1.0))(jnp.zeros((3, 3)))
