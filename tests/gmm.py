"""Analytic Gaussian-mixture reference for sampler tests.

Data: p(x0) = sum_k pi_k N(mu_k, Sigma_k) in R^d, each component tagged with a
class c_k. With x_t = alpha x0 + sigma eps (any schedule):

    x_t | k        ~ N(alpha mu_k, C_k),   C_k = alpha^2 Sigma_k + sigma^2 I
    r_k(x_t)       = pi_k N(x_t; alpha mu_k, C_k) / p(x_t)        (responsibilities)
    E[x0 | x_t, k] = mu_k + alpha Sigma_k C_k^-1 (x_t - alpha mu_k)
    E[x0 | x_t]    = sum_k r_k E[x0 | x_t, k]
    grad log p(x_t) = -sum_k r_k C_k^-1 (x_t - alpha mu_k)
    log p(c | x_t) = logsumexp_{k: c_k = c} log(pi_k N_k) - logsumexp_k log(pi_k N_k)

Sigma_k = U_k diag(lam_k) U_k^T is diagonalised once, so C_k^-1 is elementwise in
the eigenbasis. Every function takes `xp` (numpy for float64 references,
jax.numpy for the float32 denoisers handed to samplers).

`ode_reference` integrates the probability-flow ODE exactly enough (RK4, float64)
in EDM variables: with x~ = x_t / alpha and s = sigma / alpha, the PF-ODE is
dx~/ds = (x~ - D(x~, s)) / s (Karras et al. 2022, eq. 4 with the VE form), D the
posterior mean with alpha = 1, sigma = s. It is schedule-independent.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


class GMM:
  """A Gaussian mixture with per-component class labels."""

  def __init__(self, weights, means, covs, classes=None):
    self.weights = np.asarray(weights, np.float64)
    self.weights = self.weights / self.weights.sum()
    self.means = np.asarray(means, np.float64)            # [K, d]
    self.covs = np.asarray(covs, np.float64)              # [K, d, d]
    self.k, self.d = self.means.shape
    self.classes = np.zeros(self.k, np.int32) if classes is None else np.asarray(classes, np.int32)
    self.num_classes = int(self.classes.max()) + 1
    lam, u = np.linalg.eigh(self.covs)
    self.lam, self.u = np.maximum(lam, 0.0), u             # [K, d], [K, d, d]

  # -- statistics of the data ----------------------------------------------
  def class_gmm(self, c):
    m = self.classes == c
    return GMM(self.weights[m], self.means[m], self.covs[m])

  def mean(self):
    return self.weights @ self.means

  def cov(self):
    m = self.mean()
    dm = self.means - m
    return np.einsum("k,kij->ij", self.weights, self.covs) + np.einsum("k,ki,kj->ij", self.weights, dm, dm)

  def sample(self, key, n):
    """n draws from the mixture: (x0 [n, d] float32, component [n])."""
    k1, k2 = jax.random.split(key)
    comp = jax.random.choice(k1, self.k, (n,), p=jnp.asarray(self.weights, jnp.float32))
    z = jax.random.normal(k2, (n, self.d))
    chol = jnp.asarray(self.u * np.sqrt(self.lam)[:, None, :], jnp.float32)
    x = jnp.asarray(self.means, jnp.float32)[comp] + jnp.einsum("nij,nj->ni", chol[comp], z)
    return x, comp

  # -- the noisy marginal ----------------------------------------------------
  def _parts(self, xp, x, alpha, sigma, label=None):
    """Log joint log(pi_k N_k) [B, K], projected residual y [B, K, d], variances v [B, K, d]."""
    dt = x.dtype
    a = xp.reshape(xp.asarray(alpha, dt), (-1, 1, 1))
    s = xp.reshape(xp.asarray(sigma, dt), (-1, 1, 1))
    means, u, lam = (xp.asarray(v, dt) for v in (self.means, self.u, self.lam))
    y = xp.einsum("kji,bkj->bki", u, x[:, None, :] - a * means[None])
    v = a * a * lam[None] + s * s
    logw = xp.asarray(np.log(self.weights), dt)
    logp = (-0.5 * xp.sum(y * y / v + xp.log(v), axis=-1) - 0.5 * self.d * math.log(2 * math.pi) + logw[None])
    if label is not None:
      label = xp.reshape(xp.asarray(label), (-1, 1))
      keep = (xp.asarray(self.classes)[None] == label) | (label == self.num_classes)
      logp = xp.where(keep, logp, -xp.inf)
    return logp, y, v, a

  @staticmethod
  def _lse(xp, z, axis=-1):
    m = xp.max(z, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0)
    return xp.squeeze(m, axis) + xp.log(xp.sum(xp.exp(z - m), axis=axis))

  def log_density(self, x, alpha, sigma, label=None, xp=np):
    """log p(x_t) [B] (or log p(x_t | c) given labels; label == num_classes means none)."""
    logp, _, _, _ = self._parts(xp, x, alpha, sigma, label)
    return self._lse(xp, logp)

  def posterior_mean(self, x, alpha, sigma, label=None, xp=np):
    """E[x0 | x_t] [B, d]; alpha, sigma scalars or [B]."""
    logp, y, v, a = self._parts(xp, x, alpha, sigma, label)
    r = xp.exp(logp - self._lse(xp, logp)[:, None])                  # [B, K]
    lam = xp.asarray(self.lam, x.dtype)
    ex0 = xp.asarray(self.means, x.dtype)[None] + xp.einsum("kij,bkj->bki", xp.asarray(self.u, x.dtype),
                                                            a * lam[None] * y / v)
    return xp.einsum("bk,bki->bi", r, ex0)

  def score(self, x, alpha, sigma, label=None, xp=np):
    """grad_x log p(x_t) [B, d]."""
    logp, y, v, _ = self._parts(xp, x, alpha, sigma, label)
    r = xp.exp(logp - self._lse(xp, logp)[:, None])
    return -xp.einsum("bk,kij,bkj->bi", r, xp.asarray(self.u, x.dtype), y / v)

  def class_log_prob(self, x, alpha, sigma, label, xp=np):
    """Exact Bayes classifier log p(c | x_t) [B]."""
    logp, _, _, _ = self._parts(xp, x, alpha, sigma)
    keep = xp.asarray(self.classes)[None] == xp.reshape(xp.asarray(label), (-1, 1))
    return self._lse(xp, xp.where(keep, logp, -xp.inf)) - self._lse(xp, logp)

  # -- denoisers for the samplers --------------------------------------------
  def denoiser(self, schedule, target="eps", conditional=False):
    """denoise(x_t [B, d], t [B], cond) -> exact prediction of `target` (float32).

    With conditional=True, cond holds labels [B] and label num_classes is the null class.
    """
    from diffusax.core import targets

    def denoise(x, t, cond):
      a, s, da, ds = targets.coefficients(schedule, t)
      x0 = self.posterior_mean(x.astype(jnp.float32), a, s, cond if conditional else None, xp=jnp)
      eps = (x - a[:, None] * x0) / s[:, None]
      return targets.from_x0_eps(target, x0, eps, a, s, da, ds)
    return denoise

  def model(self, schedule, target="eps", conditional=False):
    """`core.Model` of the exact `denoiser`."""
    from diffusax.core import Model
    return Model(self.denoiser(schedule, target, conditional), target, schedule)

  def classifier(self, schedule):
    """log_prob_fn(x_t, t, labels) -> [B] exact log p(labels | x_t) under `schedule`."""
    def log_prob(x, t, labels):
      return self.class_log_prob(x, schedule.alpha(t), schedule.sigma(t), labels, xp=jnp)
    return log_prob

  # -- the exact probability-flow ODE ------------------------------------------
  def ode_reference(self, x_T, s_max, s_min, alpha_max=1.0, steps=2000, label=None, denoise_end=True):
    """Float64 PF-ODE solution from x_T at EDM sigma s_max to s_min, then D(., s_min).

    x_T is in the schedule's own space (x_t = alpha x0 + sigma eps, alpha = alpha_max).
    Returns x0 [B, d] as the samplers define it: the posterior mean at the last level; with
    denoise_end=False the ODE's own end point x / alpha at s_min (the consistency function's value).
    """
    xs = np.asarray(x_T, np.float64) / alpha_max
    f = lambda x, logs: x - self.posterior_mean(x, 1.0, math.exp(logs), label)
    grid = np.linspace(math.log(s_max), math.log(s_min), steps + 1)
    for u0, u1 in zip(grid[:-1], grid[1:]):
      h = u1 - u0
      k1 = f(xs, u0)
      k2 = f(xs + 0.5 * h * k1, u0 + 0.5 * h)
      k3 = f(xs + 0.5 * h * k2, u0 + 0.5 * h)
      k4 = f(xs + h * k3, u1)
      xs = xs + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return self.posterior_mean(xs, 1.0, s_min, label) if denoise_end else xs


  def flow_reference(self, x_T, t_max=1.0, t_min=1e-6, steps=2000, label=None):
    """Float64 RK4 solution of the rectified-flow ODE dx/dt = (x - D(x, t)) / t for the `Flow`
    schedule (alpha = 1 - t, sigma = t) from t_max to t_min, then D(., t_min)."""
    x = np.asarray(x_T, np.float64)
    f = lambda x, t: (x - self.posterior_mean(x, 1.0 - t, t, label)) / t
    grid = np.linspace(t_max, t_min, steps + 1)
    for t0, t1 in zip(grid[:-1], grid[1:]):
      h = t1 - t0
      k1 = f(x, t0)
      k2 = f(x + 0.5 * h * k1, t0 + 0.5 * h)
      k3 = f(x + 0.5 * h * k2, t0 + 0.5 * h)
      k4 = f(x + h * k3, t1)
      x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return self.posterior_mean(x, 1.0 - t_min, t_min, label)

def standard_mixture():
  """A 2-D, 3-component, 2-class mixture used across the sampler tests."""
  means = [[-2.0, 0.0], [2.0, 1.0], [0.5, -2.5]]
  covs = [[[0.30, 0.10], [0.10, 0.20]], [[0.25, -0.05], [-0.05, 0.40]], [[0.15, 0.0], [0.0, 0.15]]]
  return GMM([0.3, 0.45, 0.25], means, covs, classes=[0, 1, 1])


def moments_z(samples, gmm, labels=None, ref_n=400_000):
  """Largest |z| of sample component frequencies, mean and covariance vs. the truth.

  z = (estimate - truth) / standard error with the standard errors of an i.i.d.
  sample of size n from the true mixture: frequency sqrt(p(1-p)/n); mean
  sqrt(Sigma_ii / n); covariance entry std((x_i - m_i)(x_j - m_j)) / sqrt(n), the
  fourth moment taken from `ref_n` exact draws. Components are assigned by the
  nearest component in likelihood (the test mixtures are well separated).
  """
  x = np.asarray(samples, np.float64)
  n = x.shape[0]
  logp, _, _, _ = gmm._parts(np, x, 1.0, 1e-6)
  freq = np.bincount(np.argmax(logp, axis=1), minlength=gmm.k) / n
  zf = (freq - gmm.weights) / np.sqrt(gmm.weights * (1 - gmm.weights) / n)
  m, c = gmm.mean(), gmm.cov()
  zm = (x.mean(0) - m) / np.sqrt(np.diag(c) / n)
  rng = np.random.default_rng(0)
  comp = rng.choice(gmm.k, ref_n, p=gmm.weights)
  ref = gmm.means[comp] + np.einsum("nij,nj->ni", (gmm.u * np.sqrt(gmm.lam)[:, None, :])[comp],
                                    rng.standard_normal((ref_n, gmm.d)))
  prod = (ref - m)[:, :, None] * (ref - m)[:, None, :]
  se_c = prod.std(0) / np.sqrt(n)
  zc = (np.cov(x.T) - c) / se_c
  return {"freq": float(np.max(np.abs(zf))), "mean": float(np.max(np.abs(zm))), "cov": float(np.max(np.abs(zc)))}
