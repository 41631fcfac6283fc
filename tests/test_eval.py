"""Feature distances (Fréchet, KID), the digits evaluation classifier and `--mode=eval` end to end."""
import json
import math
import os
import sys

import numpy as np
import pytest
import scipy.linalg

from diffusax.evaluation import distances

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))


def _random_cov(rng, d, scale=1.0):
  a = rng.standard_normal((d, d)) * scale
  return a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------------------
# Fréchet distance.

def test_fd_of_a_set_with_itself_is_zero():
  rng = np.random.default_rng(0)
  f = rng.standard_normal((500, 64)) * 3 + 100.0  # a large common offset must not hurt
  assert abs(distances.frechet_distance_from_features(f, f)) < 1e-8 * np.trace(np.cov(f.T))


def test_fd_is_not_clamped_and_refuses_a_negative_value_beyond_round_off():
  rng = np.random.default_rng(5)
  # Rank-deficient (5 vectors in 64 dimensions): the self-distance comes out below 0 by round-off
  # (clipped square roots of near-zero eigenvalues); it is returned as computed, inside the stated bound.
  x = rng.standard_normal((5, 64)) * rng.uniform(0.1, 10, 64)
  mu, cov = x.mean(0), np.cov(x.T)
  fd = distances.frechet_distance(mu, cov, mu, cov)
  tol = distances.frechet_rounding_bound(mu, cov, mu, cov)
  eps = np.finfo(np.float64).eps
  assert tol == pytest.approx(4 * 64 * np.sqrt(eps) * 2 * np.trace(cov) + 8 * 64 * eps * 2 * np.trace(cov))
  assert -tol < fd < 0, (fd, tol)  # negative: so it was not clamped at 0
  # Not PSD (one eigenvalue -5): FD = d + (d - 6) - 2 (d - 1) = -4 by the formula with the clip, far
  # beyond round-off: refused with the value.
  d = 8
  bad = np.diag([1.0] * (d - 1) + [-5.0])
  with pytest.raises(distances.NegativeDistance, match=r"Fréchet distance -4 is below 0 by more than float64 "
                                                         r"round-off \(bound [0-9.e-]+\)"):
    distances.frechet_distance(np.zeros(d), np.eye(d), np.zeros(d), bad)


def test_fd_closed_form_for_two_gaussians():
  rng = np.random.default_rng(1)
  d = 16
  m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
  c1, c2 = _random_cov(rng, d), _random_cov(rng, d, 2.0)
  # Reference: the definition with scipy's general matrix square root.
  ref = (np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2)
         - 2 * np.trace(scipy.linalg.sqrtm(c1 @ c2)).real)
  assert distances.frechet_distance(m1, c1, m2, c2) == pytest.approx(ref, rel=1e-9)
  # Commuting (diagonal) covariances: sum (sqrt(a) - sqrt(b))^2 + |m1 - m2|^2.
  a, b = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
  want = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert distances.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(want, rel=1e-12)
  # Rank-deficient covariances (fewer vectors than dimensions) stay finite and >= 0.
  low = rng.standard_normal((d, 3))
  assert distances.frechet_distance(m1, low @ low.T, m1, np.zeros((d, d))) == pytest.approx(
      np.trace(low @ low.T), rel=1e-9)


def test_fd_from_samples_converges_to_closed_form():
  rng = np.random.default_rng(2)
  d, n = 8, 200_000
  m1, m2 = np.zeros(d), np.full(d, 0.5)
  c1, c2 = _random_cov(rng, d), _random_cov(rng, d)
  x = rng.multivariate_normal(m1, c1, n)
  y = rng.multivariate_normal(m2, c2, n)
  st = distances.feature_stats(x, batch_size=50_000)
  np.testing.assert_allclose(st.cov, np.cov(x.T), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(st.mu, x.mean(0), atol=1e-6)
  want = distances.frechet_distance(m1, c1, m2, c2)
  assert distances.frechet_distance_from_features(x, y) == pytest.approx(want, rel=0.02)


# ---------------------------------------------------------------------------
# KID.

def _mmd2_direct(x, y):
  """Binkowski et al. 2018, eq. (2) with k(a, b) = (a.b / d + 1)^3: float64 loops over every pair."""
  m, n, d = len(x), len(y), x.shape[1]

  def k(a, b):
    dot = 0.0
    for t in range(d):
      dot += float(a[t]) * float(b[t])
    return (dot / d + 1.0) ** 3

  sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
  return sxx + syy - 2.0 * sxy


def test_kid_cubic_kernel_matches_the_direct_formula():
  rng = np.random.default_rng(4)
  d = 5
  x = rng.standard_normal((7, d)) * 3 + 1.0  # kernel values far from 1: the cube matters
  y = rng.standard_normal((9, d)) * 2 - 0.5  # unequal sizes: 1/(m(m-1)) and 1/(n(n-1)) differ
  want = _mmd2_direct(x, y)
  assert abs(want) > 1.0
  assert distances.mmd2_unbiased(x, y) == pytest.approx(want, rel=1e-12)
  # KID with one subset as large as both (equal-size) sets is the plain estimate.
  mean, std = distances.kid(x, y[:7], num_subsets=1, subset_size=100)
  assert mean == pytest.approx(_mmd2_direct(x, y[:7]), rel=1e-12) and std == 0.0


def test_kid_is_unbiased_on_small_sets():
  """Mean of many 10-vector estimates = the large-set value (0 for equal distributions)."""
  rng = np.random.default_rng(3)
  d, m, reps = 4, 10, 2000
  draw_p = lambda n: rng.standard_normal((n, d))
  draw_q = lambda n: rng.standard_normal((n, d)) * 1.2 + 0.3
  same = np.array([distances.mmd2_unbiased(draw_p(m), draw_p(m)) for _ in range(reps)])
  assert abs(same.mean()) < 4 * same.std() / math.sqrt(reps)
  diff = np.array([distances.mmd2_unbiased(draw_p(m), draw_q(m)) for _ in range(reps)])
  big = np.mean([distances.mmd2_unbiased(draw_p(4000), draw_q(4000)) for _ in range(3)])
  assert big > 0.1
  assert abs(diff.mean() - big) < 4 * diff.std() / math.sqrt(reps) + 0.02 * big
  # The biased (V-statistic) estimate would be far off at m = 10: the diagonal terms add ~ 2 E k(x, x) / m.
  mean, std = distances.kid(draw_p(50), draw_q(50), num_subsets=20, subset_size=10)
  assert np.isfinite(mean) and std > 0


# ---------------------------------------------------------------------------
# The digits classifier and --mode=eval.

@pytest.fixture(scope="module")
def data_dir(tiny_digits):
  return tiny_digits["data_dir"]  # Shared, so the cached classifier is trained once for --mode=eval too.


def test_digits_classifier_is_cached_and_accurate(data_dir):
  from diffusax.evaluation import digits_classifier as dc
  p1, info = dc.load_or_train(data_dir)
  assert info["test_accuracy"] > 0.97, info
  assert os.path.exists(dc.cache_path(data_dir))
  p2, info2 = dc.load_or_train(data_dir, log=lambda m: pytest.fail(f"retrained: {m}"))
  import jax
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  a, b = dc.real_halves(data_dir)
  assert len(a) + len(b) == 1797 and abs(len(a) - len(b)) <= 1
  logits, feats = dc.apply(p1, a[:7])
  assert logits.shape == (7, 10) and feats.shape == (7, dc.FEATURE_DIM)


def test_eval_mode_on_tiny_digits(tiny_digits):
  """--mode=eval in this process (the command line's eval runs in tests/test_gcs.py, into gs://)."""
  from diffusax.programs import evaluate
  from diffusax.programs import settings as settings_lib
  wd = tiny_digits["workdir"]  # 4 training steps of the tiny digits DiT (tests/conftest.py).
  c = tiny_digits["config"].copy_and_resolve_references()
  for k, v in {"num_samples": 40, "bpd_examples": 8, "vlb_steps": 6, "ode_steps": 3, "ode_solver": "euler"}.items():
    c.eval[k] = v
  c.sample.shard_size, c.sample.guidance_scale = 24, 2.0
  evaluate.run(settings_lib.parse(c), wd)
  out = json.load(open(os.path.join(wd, "eval", "eval_0000004.json")))
  # The same result beside its samples, so evaluating a step under another sampler setting loses nothing.
  assert json.load(open(os.path.join(out["samples_dir"], "eval.json"))) == out
  m = out["metrics"]
  assert set(m) == {"fd_digits", "fd_digits_real_baseline", "kid_digits", "kid_digits_real_baseline",
                    "class_accuracy", "bpd_vlb", "bpd_ode"}, m
  assert all(np.isfinite(v) for v in m.values())
  assert m["fd_digits"] > m["fd_digits_real_baseline"] > 0  # 4 training steps: far from the data
  assert 0 <= m["class_accuracy"] <= 1 and m["bpd_vlb"] > 0 and m["bpd_ode"] > 0
  assert out["step"] == 4 and out["num_samples"] == 40 and out["sampler"]["guidance_scale"] == 2.0
  assert os.listdir(os.path.join(wd, "tb"))
  # A refusal is a ConfigError naming the allowed values (main prints a ConfigError as one line and exits
  # 2: tests/test_cli_errors.py), checked in this process rather than by one more eval process.
  import digits as digits_config
  from diffusax.programs import settings as settings_lib
  c = digits_config.get_config()
  c.eval.metrics = ("fd", "psnr")
  with pytest.raises(settings_lib.ConfigError, match=r"unknown eval.metrics \['psnr'\]; allowed: \['fd', "):
    settings_lib.parse(c)


# On the shared tiny digits run (tests/conftest.py), in this module so that pytest-xdist (--dist loadfile) runs
# every test of that run on one worker.

def test_digits_default_pipeline_small(tiny_digits):
  """The embedded digits pipeline (class-conditional, CFG grid) on a tiny DiT for 4 steps."""
  out = tiny_digits["result"]
  from PIL import Image
  img = np.asarray(Image.open(out["samples"]))
  # 10 class rows x 2 columns of 8x8 images with 1 px gaps, upscaled 8x.
  assert img.shape == ((10 * 9 - 1) * 8, (2 * 9 - 1) * 8)
  assert out["step"] == 4 and np.isfinite(out["eval_loss_ema"])
  hist = json.load(open(os.path.join(tiny_digits["workdir"], "metrics.json")))["history"]
  assert [h["step"] for h in hist] == [2, 4] and all(np.isfinite(h["loss"]) for h in hist)
