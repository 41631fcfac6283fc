"""Image-conditioned diffusion (core.conditioning) against closed forms and exact Gaussian-mixture posteriors.

Super-resolution reference. The "high-resolution image" x in R^2 is stored as a 1x2 image [B, 1, 2, 1];
its low-resolution image is the 1x1 area average z = a^T x, a = (1/2, 1/2); p(x) is the repo's
3-component mixture (tests/gmm.py). A condition y = c z + n, n ~ N(0, v) (c = 1, v = 0: the clean z;
c = alpha(s), v = sigma(s)^2: the augmented z_s ~ q(z_s | z)) gives, per component k (mean mu_k,
covariance S_k, weight pi_k), with g_k = S_k a and q_k = c^2 a^T S_k a + v (Gaussian conditioning):

    p(k | y)    = pi_k N(y; c a^T mu_k, q_k) / sum_j (...)
    x | y, k    ~ N(mu_k + g_k c (y - c a^T mu_k) / q_k,  S_k - c^2 g_k g_k^T / q_k)

so p(x | y) is again a mixture (`given`, float64). Since x_t is independent of y given x0, the exact
conditional denoiser E[x0 | x_t, y] is that mixture's posterior mean: `sr_denoiser` does the 2x2
algebra per example from the Cond it is given (float32), and is itself checked against the float64
`gmm.GMM.posterior_mean` of `given`. Distribution checks use `gmm.moments_z` (standard errors of an
i.i.d. sample of the same size from the exact distribution) at 4.5 sigma, as tests/test_samplers_gmm.py,
and each also asserts that a wrong reference lies far outside that tolerance.
"""
import functools
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gmm
from diffusax.core import Model, conditioning, process, samplers, schedules
from diffusax.core.conditioning import Cond

G = gmm.standard_mixture()
A = np.array([0.5, 0.5])
SCH = schedules.VPCosine()
N = 4000          # samples per condition in the distribution checks
TOL = 4.5
F32 = jnp.float32


def cosine_alpha_sigma(s, s0=0.008):
  """Closed form of the VP cosine schedule (Nichol & Dhariwal 2021, eq. 17), float64."""
  a = math.cos((s + s0) / (1 + s0) * math.pi / 2) / math.cos(s0 / (1 + s0) * math.pi / 2)
  return a, math.sqrt(1.0 - a * a)


def given(y, c=1.0, v=0.0):
  """p(x | y) for y = c a^T x + N(0, v): a `gmm.GMM` (module docstring), float64."""
  g = G.covs @ A                                    # [K, 2]
  q = c * c * (g @ A) + v                           # [K]
  mz = c * (G.means @ A)                            # [K]
  logw = np.log(G.weights) - 0.5 * np.log(2 * np.pi * q) - 0.5 * (y - mz) ** 2 / q
  means = G.means + g * (c * (y - mz) / q)[:, None]
  covs = G.covs - c * c * g[:, :, None] * g[:, None, :] / q[:, None, None]
  return gmm.GMM(np.exp(logw - logw.max()), means, covs)


def sr_denoiser(aug_schedule=SCH):
  """denoise(x_t [B, 1, 2, 1], t [B], Cond(image [B, 1, 1, 1], aug_level [B])) -> E[x0 | x_t, y], float32.

  aug_level s = 0 means the clean z (c = 1, v = 0), else c = alpha(s), v = sigma(s)^2 of aug_schedule.
  """
  means, covs = jnp.asarray(G.means, F32), jnp.asarray(G.covs, F32)
  g = covs @ jnp.asarray(A, F32)                    # [K, 2]
  ag, am = g @ jnp.asarray(A, F32), means @ jnp.asarray(A, F32)
  logpi = jnp.asarray(np.log(G.weights), F32)

  def denoise(x, t, cond):
    b = x.shape[0]
    xv, y, s = x.reshape(b, 2), cond.image.reshape(b, 1), cond.aug_level
    c = jnp.where(s == 0, 1.0, aug_schedule.alpha(s))[:, None]
    v = jnp.where(s == 0, 0.0, aug_schedule.sigma(s) ** 2)[:, None]
    q = c * c * ag + v                                                  # [B, K]
    logw = logpi - 0.5 * jnp.log(2 * jnp.pi * q) - 0.5 * (y - c * am) ** 2 / q
    m = means + g * (c * (y - c * am) / q)[..., None]                   # [B, K, 2]
    p = covs - (c * c / q)[..., None, None] * g[:, :, None] * g[:, None, :]  # [B, K, 2, 2]
    al, sg = SCH.alpha(t)[:, None, None, None], SCH.sigma(t)[:, None, None, None]
    cc = al * al * p + sg * sg * jnp.eye(2)
    det = cc[..., 0, 0] * cc[..., 1, 1] - cc[..., 0, 1] * cc[..., 1, 0]
    inv = jnp.stack([jnp.stack([cc[..., 1, 1], -cc[..., 0, 1]], -1),
                     jnp.stack([-cc[..., 1, 0], cc[..., 0, 0]], -1)], -2) / det[..., None, None]
    r = xv[:, None] - al[..., 0] * m
    cr = jnp.einsum("bkij,bkj->bki", inv, r)
    logp = logw - 0.5 * jnp.sum(r * cr, -1) - 0.5 * jnp.log(det)
    resp = jax.nn.softmax(logp, axis=1)
    x0 = jnp.sum(resp[..., None] * (m + al[..., 0] * jnp.einsum("bkij,bkj->bki", p, cr)), axis=1)
    return x0.reshape(x.shape)
  return denoise


SR_MODEL = Model(sr_denoiser(), "x0", SCH)
Z = -0.8                  # the clean low-resolution value: p(x | z) is bimodal along the line x1 + x2 = 2z
S_AUG = 0.2               # augmentation level of the second condition
Y_AUG = -0.6              # the given z_s at that level


def test_sr_denoiser_is_the_exact_posterior_mean():
  """The float32 per-example algebra against float64 gmm.GMM.posterior_mean of the conditional mixture."""
  x = jax.random.normal(jax.random.key(0), (6, 1, 2, 1)) * 2.0
  t = jnp.array([0.01, 0.1, 0.3, 0.5, 0.8, 0.95])
  a_s, s_s = cosine_alpha_sigma(S_AUG)
  xd = np.asarray(x, np.float64).reshape(6, 2)
  alpha, sigma = np.asarray(SCH.alpha(t), np.float64), np.asarray(SCH.sigma(t), np.float64)
  f = jax.jit(SR_MODEL.denoise)
  for y, s, ref in ((Z, 0.0, given(Z)), (Y_AUG, S_AUG, given(Y_AUG, a_s, s_s ** 2))):
    cond = Cond(image=jnp.full((6, 1, 1, 1), y), aug_level=jnp.full((6,), s))
    got = np.asarray(f(x, t, cond)).reshape(6, 2)
    np.testing.assert_allclose(got, ref.posterior_mean(xd, alpha, sigma), atol=2e-4)


@functools.lru_cache(maxsize=None)
def _sr_samples(method, steps):
  """N samples under the clean z (rows :N) and N under z_s = Y_AUG at S_AUG (rows N:), one jitted call."""
  cond = Cond(image=jnp.concatenate([jnp.full((N, 1, 1, 1), Z), jnp.full((N, 1, 1, 1), Y_AUG)]),
              aug_level=jnp.concatenate([jnp.zeros((N,)), jnp.full((N,), S_AUG)]))
  x_T = process.prior_sample(jax.random.key(3), SCH, (2 * N, 1, 2, 1))
  f = jax.jit(lambda x_T, cond: samplers.sample(SR_MODEL, x_T, key=jax.random.key(4), method=method,
                                                num_steps=steps, cond=cond))
  x = np.asarray(f(x_T, conditioning.check(cond, batch=2 * N, image_shape=(1, 1, 1), needs_aug=True)),
                 np.float64).reshape(2 * N, 2)
  return x[:N], x[N:]


@pytest.mark.parametrize("method,steps", [("ddpm", 200), ("heun", 80)])
def test_super_resolution_samples_match_the_exact_conditional(method, steps):
  clean, aug = _sr_samples(method, steps)
  a_s, s_s = cosine_alpha_sigma(S_AUG)
  z_clean = gmm.moments_z(clean, given(Z))
  z_aug = gmm.moments_z(aug, given(Y_AUG, a_s, s_s ** 2))
  assert max(z_clean.values()) < TOL, z_clean
  assert max(z_aug.values()) < TOL, z_aug
  # Every clean-condition sample has the given area average (the posterior lies on x1 + x2 = 2z).
  np.testing.assert_allclose(clean @ A, Z, atol=2e-3)
  # Power: the unconditional mixture, and for z_s the posterior that ignores the augmentation
  # (z_s taken as a clean z), lie far outside the tolerance.
  assert max(gmm.moments_z(clean, G).values()) > 2 * TOL
  assert max(gmm.moments_z(aug, given(Y_AUG)).values()) > 2 * TOL


def test_sample_to_stops_the_reverse_process_at_s():
  """Truncated augmentation: the base model's reverse process run to s is distributed as q(x_s)."""
  s = 0.5
  a_s, s_s = cosine_alpha_sigma(s)
  q_s = gmm.GMM(G.weights, a_s * G.means, a_s ** 2 * G.covs + s_s ** 2 * np.eye(2))
  base = G.model(SCH, "eps")
  x_T = process.prior_sample(jax.random.key(5), SCH, (N, 2))
  run = jax.jit(lambda x_T, s: conditioning.sample_to(base, x_T, s, key=jax.random.key(6), method="ddpm",
                                                      num_steps=200))
  x_s = np.asarray(run(x_T, s), np.float64)
  z = gmm.moments_z(x_s, q_s)
  assert max(z["mean"], z["cov"]) < TOL, z   # component frequencies are not identifiable: the noisy components overlap
  assert max(gmm.moments_z(x_s, G)[k] for k in ("mean", "cov")) > 2 * TOL  # the clean data is far outside
  # The existing samplers with t_min = s end at the denoised mean E[x0 | x_s] instead (not q(x_s)).
  ends = jax.jit(lambda x_T: samplers.sample(base, x_T, key=jax.random.key(6), method="ddpm", num_steps=201,
                                             options={"t_min": s}))(x_T)
  assert gmm.moments_z(np.asarray(ends, np.float64), q_s)["cov"] > 2 * TOL
  # A deterministic run stops at the driver's own trajectory point k = num_steps of the (num_steps + 1)-point grid.
  xs8 = x_T[:8]
  stop = conditioning.sample_to(base, xs8, s, key=jax.random.key(0), method="ddim", num_steps=6)
  _, traj = samplers.sample(base, xs8, key=jax.random.key(0), method="ddim", num_steps=7,
                            options={"t_min": s}, return_trajectory=True)
  np.testing.assert_allclose(stop, traj[6], rtol=1e-6, atol=1e-6)
  # The wrappers' form step(state, i) (no static `last`) skips the last step too.
  cut = conditioning.truncate(samplers.make(base, method="ddim", options={"t_min": s}))
  state = cut.init(xs8, jax.random.key(0), 7, 7)
  state = jax.lax.fori_loop(0, 7, lambda i, st: cut.step(st, i), state)
  np.testing.assert_allclose(state.x, traj[6], rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="spacing 'trailing'"):
    conditioning.sample_to(base, xs8, s, key=jax.random.key(0), method="flow_euler", num_steps=3)


def test_augment_is_the_forward_process_at_a_uniform_level():
  n = 20000
  z = jnp.broadcast_to(jnp.array([0.7, -1.3]), (n, 2))
  # A fixed level: z_s ~ N(alpha_s z, sigma_s^2) with the closed-form cosine alpha_s, sigma_s.
  a_s, s_s = cosine_alpha_sigma(S_AUG)
  z_s, lvl = conditioning.augment_at(SCH, jax.random.key(0), z, S_AUG)
  z_s = np.asarray(z_s, np.float64)
  assert lvl.shape == (n,) and np.all(np.asarray(lvl) == np.float32(S_AUG))
  assert np.all(np.abs(z_s.mean(0) - a_s * np.array([0.7, -1.3])) < TOL * s_s / math.sqrt(n))
  assert np.all(np.abs(z_s.var(0) - s_s ** 2) < TOL * s_s ** 2 * math.sqrt(2 / (n - 1)))
  # Level 0 returns z bit-exactly, also per example in a mixed batch.
  mixed = jnp.where(jnp.arange(n) % 2 == 0, 0.0, 0.3)
  z0, _ = conditioning.augment_at(SCH, jax.random.key(1), z, mixed)
  assert np.array_equal(np.asarray(z0[::2]), np.asarray(z[::2])) and not np.any(np.asarray(z0[1::2] == z[1::2]))
  # Training draws: s ~ U[0, s_max] (Kolmogorov-Smirnov, 1e-3 critical value 1.95 / sqrt(n)), and given s the
  # standardised residual (z_s - alpha(s) z) / sigma(s) is N(0, 1) with the closed-form alpha(s), sigma(s).
  s_max = 0.3
  k = jax.random.key(2)
  z_s, s = conditioning.augment(SCH, k, z, s_max)
  s64 = np.sort(np.asarray(s, np.float64))
  assert s64[0] >= 0.0 and s64[-1] <= s_max
  grid = np.arange(1, n + 1) / n
  ks = max(np.max(grid - s64 / s_max), np.max(s64 / s_max - (grid - 1 / n)))
  assert ks < 1.95 / math.sqrt(n), ks
  assert ks > 0.2 / math.sqrt(n)  # not a suspiciously regular grid either
  ab = np.array([cosine_alpha_sigma(v) for v in np.asarray(s, np.float64)])
  e = (np.asarray(z_s, np.float64) - ab[:, :1] * np.asarray(z)) / ab[:, 1:]
  assert np.all(np.abs(e.mean(0)) < TOL / math.sqrt(n)) and np.all(np.abs(e.var(0) - 1) < TOL * math.sqrt(2 / n))
  # Determinism: the same key gives identical draws, another key different ones.
  again = conditioning.augment(SCH, k, z, s_max)
  assert np.array_equal(np.asarray(again[0]), np.asarray(z_s)) and np.array_equal(np.asarray(again[1]), np.asarray(s))
  assert not np.array_equal(np.asarray(conditioning.augment(SCH, jax.random.key(3), z, s_max)[1]), np.asarray(s))
  with pytest.raises(ValueError, match="s_max"):
    conditioning.augment(SCH, k, z, 1.5)


def test_drop_rates_independence_and_values():
  n, null = 40000, 10
  key = jax.random.key(7)
  labels = jax.random.randint(jax.random.key(8), (n,), 0, null)
  image = jax.random.normal(jax.random.key(9), (n, 2, 2, 1)) + 3.0    # no image is all zeros
  aug = jax.random.uniform(jax.random.key(10), (n,))
  cond = Cond(label=labels, image=image, aug_level=aug)
  lp, ip = 0.2, 0.35
  out = jax.jit(lambda k, c: conditioning.drop(k, c, label_p=lp, image_p=ip, null_label=null))(key, cond)
  dl = np.asarray(out.label) == null
  di = np.asarray(out.has_image) == 0.0
  se = lambda p: math.sqrt(p * (1 - p) / n)
  assert abs(dl.mean() - lp) < TOL * se(lp) and abs(di.mean() - ip) < TOL * se(ip)
  assert abs((dl & di).mean() - lp * ip) < TOL * se(lp * ip)            # independent parts
  assert abs((dl & di).mean() - min(lp, ip)) > 10 * se(lp * ip)          # (the same draw would give min(p))
  # Dropped labels are the null label, kept ones unchanged; dropped images are zeros flagged absent.
  np.testing.assert_array_equal(np.asarray(out.label)[~dl], np.asarray(labels)[~dl])
  img, img0 = np.asarray(out.image), np.asarray(image)
  assert np.all(img[di] == 0.0) and np.array_equal(img[~di], img0[~di])
  assert set(np.unique(np.asarray(out.has_image))) == {0.0, 1.0} and out.has_image.dtype == jnp.float32
  assert np.array_equal(np.asarray(out.aug_level), np.asarray(aug))
  # Each part draws from its own fold_in(key, part): the image draws do not depend on label_p.
  other = conditioning.drop(key, cond, label_p=0.9, image_p=ip, null_label=null)
  assert np.array_equal(np.asarray(other.has_image), np.asarray(out.has_image))
  # Absent parts stay absent; p = 0 keeps everything (with the flag filled), p = 1 drops everything.
  only = conditioning.drop(key, Cond(label=labels[:8]), label_p=1.0, image_p=1.0, null_label=null)
  assert only.image is None and only.has_image is None and np.all(np.asarray(only.label) == null)
  keep = conditioning.drop(key, cond, label_p=0.0, image_p=0.0, null_label=null)
  assert np.array_equal(np.asarray(keep.label), np.asarray(labels)) and np.all(np.asarray(keep.has_image) == 1.0)
  with pytest.raises(ValueError, match="null_label"):
    conditioning.drop(key, cond, label_p=0.1, image_p=0.1)


# A denoiser whose x0 output depends on each part in a known way (has_image = 0 means no image).
EMB = np.array([0.3, -1.1, 2.0, 0.0])             # label 3 is the null label


def _known(x, t, cond):
  has = cond.has_image if cond.has_image is not None else jnp.ones(x.shape[0])
  img = jnp.mean(cond.image, axis=(1, 2, 3))
  return (0.5 * x + t[:, None] * jnp.asarray(EMB, F32)[cond.label][:, None]
          + (has * (1.5 + 2.0 * img * img))[:, None])


def _known_np(x, t, label, image, has):
  """The same formula by hand, float64."""
  img = image.reshape(image.shape[0], -1).mean(1)
  return 0.5 * x + t[:, None] * EMB[label][:, None] + (has * (1.5 + 2.0 * img * img))[:, None]


def test_cfg_on_each_part_is_the_hand_written_combination():
  b = 6
  x = np.asarray(jax.random.normal(jax.random.key(0), (b, 3)), np.float64)
  t = np.linspace(0.1, 0.9, b)
  label = np.array([0, 1, 2, 0, 1, 2])
  image = np.asarray(jax.random.normal(jax.random.key(1), (b, 2, 2, 1)), np.float64)
  cond = Cond(label=jnp.asarray(label), image=jnp.asarray(image, F32))
  w = np.array([0.0, 0.5, 1.0, 2.0, 3.0, 7.5])
  seen = []

  def den(x, t, c):
    seen.append((x.shape, c.label.shape, c.image.shape, c.has_image.shape))
    return _known(x, t, c)
  model = Model(den, "x0", SCH)
  out_c = _known_np(x, t, label, image, np.ones(b))
  uncond_by_hand = {("label",): (np.full(b, 3), image, np.ones(b)),
                    ("image",): (label, np.zeros_like(image), np.zeros(b)),
                    ("label", "image"): (np.full(b, 3), np.zeros_like(image), np.zeros(b))}
  for parts, (l_u, i_u, h_u) in uncond_by_hand.items():
    out_u = _known_np(x, t, l_u, i_u, h_u)
    seen.clear()
    got = jax.jit(conditioning.cfg_on(model, parts=parts, scale=jnp.asarray(w, F32), null_label=3).denoise)(
        jnp.asarray(x, F32), jnp.asarray(t, F32), cond)
    np.testing.assert_allclose(got, out_c + w[:, None] * (out_c - out_u), rtol=1e-5, atol=1e-5)
    assert seen == [((2 * b, 3), (2 * b,), (2 * b, 2, 2, 1), (2 * b,))]   # one call on the doubled batch
  # Through a sampler under jit, the guided Cond model equals a hand-written two-call guided denoiser.
  def by_hand(x, t, c):
    u = Cond(label=jnp.full_like(c.label, 3), image=jnp.zeros_like(c.image), has_image=jnp.zeros(x.shape[0]))
    oc, ou = _known(x, t, c), _known(x, t, u)
    return oc + 2.0 * (oc - ou)
  x_T = jax.random.normal(jax.random.key(2), (b, 3))
  run = lambda m: jax.jit(lambda x_T, c: samplers.sample(m, x_T, key=jax.random.key(3), method="ddim",
                                                         num_steps=4, cond=c))(x_T, cond)
  np.testing.assert_allclose(run(conditioning.cfg_on(Model(_known, "x0", SCH), parts=("label", "image"),
                                                     scale=2.0, null_label=3)),
                             run(Model(by_hand, "x0", SCH)), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="parts must be"):
    conditioning.cfg_on(model, parts=("aug_level",), scale=1.0)
  with pytest.raises(ValueError, match="no image part"):
    conditioning.uncond(Cond(label=jnp.asarray(label)), ("image",))


def test_check_refuses_missing_and_misshapen_parts():
  b = 4
  ok = Cond(label=jnp.zeros(b, jnp.int32), image=jnp.zeros((b, 8, 8, 3)), aug_level=jnp.zeros(b))
  assert conditioning.check(ok, batch=b, image_shape=(8, 8, 3), needs_label=True, needs_aug=True) is ok
  with pytest.raises(ValueError, match=r"image has shape \(4, 16, 16, 3\), expected \(4, 8, 8, 3\)"):
    conditioning.check(ok._replace(image=jnp.zeros((b, 16, 16, 3))), batch=b, image_shape=(8, 8, 3))
  with pytest.raises(ValueError, match=r"label is missing.*expected label \[4\] int, image \(4, 8, 8, 3\)"):
    conditioning.check(ok._replace(label=None), batch=b, image_shape=(8, 8, 3), needs_label=True)
  with pytest.raises(ValueError, match=r"aug_level is missing; image is missing"):
    conditioning.check(Cond(), batch=b, image_shape=(8, 8, 3), needs_aug=True)
  with pytest.raises(ValueError, match=r"label has shape \(4,\) and dtype float32, expected \[4\] int"):
    conditioning.check(ok._replace(label=jnp.zeros(b)), batch=b)
  with pytest.raises(ValueError, match="has_image is given without an image"):
    conditioning.check(Cond(has_image=jnp.ones(b)), batch=b)
  with pytest.raises(TypeError, match="Cond"):
    conditioning.check({"label": ok.label}, batch=b)


def test_conditioning_imports_no_framework():
  code = ("import sys, diffusax.core.conditioning; "
          "print(','.join(m for m in ('flax', 'optax', 'orbax', 'grain', 'ml_collections') "
          "if any(k == m or k.startswith(m + '.') for k in sys.modules)))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "", f"diffusax.core.conditioning pulled in: {out.stdout.strip()}"
