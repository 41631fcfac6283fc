"""Feature-distribution distances: Fréchet distance (FID-style) and KID.

Features are [N, D] arrays from any extractor (Inception-v3 pool3 for FID, the
digits classifier's penultimate layer, ...).

Fréchet distance between N(mu1, S1) and N(mu2, S2) (Heusel et al. 2017, eq. 6):

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

The trace term is computed without a general (complex) matrix square root:
S1^{1/2} S2 S1^{1/2} is symmetric PSD and similar to S1 S2, so
tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(S1^{1/2} S2 S1^{1/2})), with both
eigendecompositions in float64 on the host and tiny negative eigenvalues
(round-off) clipped to 0. The statistics themselves (sums and Gram matrices of
centred batches) are computed in JAX, accumulated in float64.

FD is >= 0 for PSD covariances, but the computed value can fall below 0 by
round-off, which is returned as computed (never clamped) while it lies within

    tol = 4 D sqrt(eps) (tr S1 + tr S2) + 8 D eps (|mu1 - mu2|^2 + tr S1 + tr S2),   eps = 2^-52.

Why: a symmetric eigensolver returns each eigenvalue of A within ~eps ||A||_2
(backward stable, Weyl), and |sqrt(a) - sqrt(b)| <= sqrt(|a - b|), so each of
the D clipped square roots of M = S1^{1/2} S2 S1^{1/2} (||M|| <= ||S1|| ||S2||)
can be off by sqrt(eps ||S1|| ||S2||) <= sqrt(eps) (tr S1 + tr S2) / 2: these
errors do not cancel for the near-zero eigenvalues of rank-deficient
covariances (fewer vectors than dimensions), where the clipped sqrt is biased
up; the second term covers the float64 sums. Measured on self-distances of
rank-deficient sets (D = 2..2048, 5 <= N): at most 0.1 D sqrt(eps) (tr S1 + tr S2)
below 0, 40x inside tol. A value below -tol is not round-off: non-PSD input or a
bug, and raises `NegativeDistance` with the value.

KID (Binkowski et al. 2018): the unbiased estimate of MMD^2 with the kernel
k(x, y) = (x.y / D + 1)^3,

    MMD^2_u = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
              - 2/(mn) sum_{i, j} k(x_i, y_j),

averaged over random subsets (as in the reference implementations); its
expectation is MMD^2 for any subset size >= 2. Kernel sums are float64 on the
host: for unnormalised features the kernel reaches 1e6 and more and float32
sums lose the (small) difference of the three terms.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class GaussianStats:
  """Mean [D] and covariance [D, D] (float64) of a feature set of n vectors."""
  mu: np.ndarray
  cov: np.ndarray
  n: int


@jax.jit
def _moments(x, shift):
  xc = x.astype(jnp.float32) - shift
  return jnp.sum(xc, axis=0), xc.T @ xc


def feature_stats(features, batch_size: int = 4096) -> GaussianStats:
  """Mean and unbiased covariance of features [N, D] (N >= 2), batched through JAX.

  Batches are centred on the first batch's mean before the float32 Gram matrix
  (no cancellation from a large common offset); sums are accumulated in float64.
  """
  f = np.asarray(features)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"features must be [N >= 2, D], got shape {f.shape}")
  n, d = f.shape
  shift = np.asarray(f[:batch_size], np.float64).mean(0)
  s1, s2 = np.zeros(d), np.zeros((d, d))
  for i in range(0, n, batch_size):
    a, b = _moments(jnp.asarray(f[i:i + batch_size], jnp.float32), jnp.asarray(shift, jnp.float32))
    s1 += np.asarray(a, np.float64)
    s2 += np.asarray(b, np.float64)
  shift32 = np.asarray(np.float32(shift), np.float64)  # the shift JAX actually subtracted
  m = s1 / n
  cov = (s2 - n * np.outer(m, m)) / (n - 1)
  return GaussianStats(mu=shift32 + m, cov=0.5 * (cov + cov.T), n=n)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh(0.5 * (a + a.T))
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(s1, s2) -> float:
  """tr((S1 S2)^{1/2}) for symmetric PSD S1, S2 (float64, see module docstring)."""
  s1 = np.asarray(s1, np.float64)
  s2 = np.asarray(s2, np.float64)
  r = _psd_sqrt(s1)
  m = r @ s2 @ r
  w = np.linalg.eigvalsh(0.5 * (m + m.T))
  return float(np.sum(np.sqrt(np.clip(w, 0.0, None))))


class NegativeDistance(ArithmeticError):
  """A Fréchet distance below 0 by more than float64 round-off (non-PSD covariances, or a bug)."""


def frechet_rounding_bound(mu1, cov1, mu2, cov2) -> float:
  """The round-off bound `tol` on a computed FD below 0 (module docstring)."""
  eps = float(np.finfo(np.float64).eps)
  d = np.asarray(mu1).shape[0]
  traces = abs(float(np.trace(cov1))) + abs(float(np.trace(cov2)))
  diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
  return 4 * d * np.sqrt(eps) * traces + 8 * d * eps * (float(diff @ diff) + traces)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
  """FD between N(mu1, cov1) and N(mu2, cov2) in float64, as computed (not clamped).

  It may be negative by round-off within `frechet_rounding_bound`; further below 0
  raises NegativeDistance naming the value.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
  if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
    raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, cov {cov1.shape} vs {cov2.shape}")
  diff = mu1 - mu2
  fd = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt_product(cov1, cov2)
  if fd < 0:
    tol = frechet_rounding_bound(mu1, cov1, mu2, cov2)
    if fd < -tol:
      raise NegativeDistance(f"Fréchet distance {fd:.6g} is below 0 by more than float64 round-off (bound "
                             f"{tol:.3g}): the covariances are not both symmetric PSD, or this is a bug")
  return float(fd)


def frechet_distance_from_features(f1, f2) -> float:
  a, b = feature_stats(f1), feature_stats(f2)
  return frechet_distance(a.mu, a.cov, b.mu, b.cov)


def _mmd2_unbiased(x, y) -> float:
  """Unbiased MMD^2 of float64 arrays (host numpy: the cubic kernel of unnormalised features
  reaches 1e6 and more, where float32 sums lose the small difference)."""
  d = x.shape[1]
  k = lambda a, b: (a @ b.T / d + 1.0) ** 3
  kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
  m, n = x.shape[0], y.shape[0]
  sxx = (np.sum(kxx) - np.trace(kxx)) / (m * (m - 1))
  syy = (np.sum(kyy) - np.trace(kyy)) / (n * (n - 1))
  return float(sxx + syy - 2.0 * np.mean(kxy))


def kid(f1, f2, *, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
  """(mean, std) over random subsets of the unbiased MMD^2 with the cubic polynomial kernel.

  subset_size is capped at the smaller set's size; with subsets as large as
  both sets (and num_subsets=1) this is the plain unbiased estimate.
  """
  x = np.asarray(f1, np.float64)
  y = np.asarray(f2, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise ValueError(f"features must be [N, D] with equal D, got {x.shape} and {y.shape}")
  m = min(subset_size, x.shape[0], y.shape[0])
  if m < 2:
    raise ValueError(f"KID needs at least 2 vectors per set, got {x.shape[0]} and {y.shape[0]}")
  rng = np.random.default_rng(seed)
  vals = []
  for _ in range(num_subsets):
    ix = rng.choice(x.shape[0], m, replace=False)
    iy = rng.choice(y.shape[0], m, replace=False)
    vals.append(_mmd2_unbiased(x[ix], y[iy]))
  return float(np.mean(vals)), float(np.std(vals))


def mmd2_unbiased(f1, f2) -> float:
  """The unbiased MMD^2 estimate on the full sets (no subsetting)."""
  return _mmd2_unbiased(np.asarray(f1, np.float64), np.asarray(f2, np.float64))
