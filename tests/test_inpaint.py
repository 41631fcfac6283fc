"""Inpainting by replacement on a correlated 4-D Gaussian with an exact denoiser."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gmm
from diffusax.core import Model, process, samplers, schedules

RHO = 0.8
COV = 0.5 * RHO ** np.abs(np.subtract.outer(np.arange(4), np.arange(4)))
MU = np.array([0.5, -0.3, 0.2, 0.1])
Y = np.array([1.2, 0.4, 0.0, 0.0])
MASK = np.array([1.0, 1.0, 0.0, 0.0])
B = 1000


def _truth():
  s_ab, s_aa = COV[2:, :2], COV[:2, :2]
  m = MU[2:] + s_ab @ np.linalg.solve(s_aa, Y[:2] - MU[:2])
  v = COV[2:, 2:] - s_ab @ np.linalg.solve(s_aa, s_ab.T)
  return m, v


def _run(method, n, resample):
  g = gmm.GMM([1.0], [MU], [COV])
  sch = schedules.VPLinear()
  known = jnp.tile(jnp.asarray(Y, jnp.float32), (B, 1))
  f = jax.jit(lambda x_T, key: samplers.sample(g.model(sch), x_T, method=method, num_steps=n,
                                               key=key, inpaint=samplers.Inpaint(known, MASK, resample)))
  return np.asarray(f(process.prior_sample(jax.random.key(0), sch, (B, 4)), jax.random.key(1)), np.float64)


def test_repaint_keeps_known_and_fills_from_the_conditional():
  """RePaint (10 resamplings, 500 steps): known entries exact; unknown entries match
  the Gaussian conditional N(m, V) within 4 standard errors (B = 1000) in mean and covariance."""
  x = _run("ddpm", 500, 10)
  np.testing.assert_allclose(x[:, :2], np.broadcast_to(Y[:2], (B, 2)), atol=1e-6)
  m, v = _truth()
  u = x[:, 2:]
  z_mean = (u.mean(0) - m) / np.sqrt(np.diag(v) / B)
  z_cov = (np.cov(u.T) - v) / np.sqrt((np.outer(np.diag(v), np.diag(v)) + v * v) / B)
  assert np.all(np.abs(z_mean) < 4), z_mean
  assert np.all(np.abs(z_cov) < 4), z_cov


def test_plain_replacement_keeps_known_pixels_but_is_biased():
  """Documents the known limitation: replacement without resampling keeps known entries
  but its unknown part lags behind the conditional (here > 5 standard errors off)."""
  x = _run("ddim", 100, 1)
  np.testing.assert_allclose(x[:, :2], np.broadcast_to(Y[:2], (B, 2)), atol=1e-6)
  m, v = _truth()
  z_mean = (x[:, 2:].mean(0) - m) / np.sqrt(np.diag(v) / B)
  assert np.max(np.abs(z_mean)) > 5


def test_inpaint_image_shapes_and_errors():
  sch = schedules.VPCosine()
  m = Model(lambda x, t, c: 0.1 * x, "eps", sch)
  x_T = jnp.ones((2, 4, 4, 3))
  known = jnp.zeros((2, 4, 4, 3))
  mask = jnp.zeros((1, 4, 4, 1)).at[:, :2].set(1.0)
  out = samplers.sample(m, x_T, method="ddpm", num_steps=3, key=jax.random.key(0),
                        inpaint=samplers.Inpaint(known, mask, resample=2))
  assert out.shape == x_T.shape
  np.testing.assert_allclose(np.asarray(out)[:, :2], 0.0, atol=1e-6)
  with pytest.raises(ValueError, match=r"\['resample'\] of samplers.sample"):
    samplers.sample(m, x_T, method="ddpm", num_steps=3, key=jax.random.key(0), resample=2)
  with pytest.raises(ValueError, match="resample must be a static int"):
    samplers.sample(m, x_T, method="ddpm", num_steps=3, key=jax.random.key(0),
                    inpaint=samplers.Inpaint(known, mask, resample=0))
  with pytest.raises(ValueError, match="known has shape"):
    samplers.sample(m, x_T, method="ddpm", num_steps=3, key=jax.random.key(0),
                    inpaint=samplers.Inpaint(known[:1], mask))
