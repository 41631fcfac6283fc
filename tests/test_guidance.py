"""Classifier-free and classifier guidance with the exact mixture denoiser and Bayes classifier."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gmm
from diffusax.core import Model, guidance, process, samplers, schedules, targets

G = gmm.standard_mixture()           # classes: 0 = component 0, 1 = components 1, 2
NULL = G.num_classes
SCH = schedules.VPLinear()


def _sampler(model, method="dpm_solver_pp_2m", steps=30):
  return jax.jit(lambda x_T, labels: samplers.sample(model, x_T, method=method, num_steps=steps,
                                                    key=jax.random.key(1), cond=labels))


def test_cfg_calls_the_model_once_on_the_doubled_batch_and_w0_is_conditional():
  seen = []
  base = G.denoiser(SCH, "eps", conditional=True)

  def den(x, t, c):
    seen.append((x.shape, t.shape, c.shape))
    return base(x, t, c)
  x_T = process.prior_sample(jax.random.key(0), SCH, (64, 2))
  labels = jnp.arange(64) % 2
  guided_model = guidance.cfg(Model(den, "eps", SCH), null_cond=NULL, scale=0.0)
  assert isinstance(guided_model, Model) and guided_model.target == "eps" and guided_model.schedule == SCH
  guided = _sampler(guided_model)(x_T, labels)
  assert seen == [((128, 2), (128,), (128,))]
  cond = _sampler(Model(base, "eps", SCH))(x_T, labels)
  np.testing.assert_allclose(guided, cond, atol=1e-5)


def test_cfg_is_the_same_in_every_target_space_and_interval_and_rescale():
  x = jax.random.normal(jax.random.key(0), (16, 2))
  t = jnp.linspace(0.05, 0.95, 16)
  labels = jnp.arange(16) % 2
  a, s, da, ds = targets.coefficients(SCH, t)
  outs = {}
  for tgt in ("eps", "x0", "v", "score"):
    g = jax.jit(guidance.cfg(G.model(SCH, tgt, conditional=True), null_cond=NULL, scale=2.5).denoise)
    outs[tgt] = targets.convert(tgt, "x0", g(x, t, labels), x, a, s, da, ds)
  for tgt in ("eps", "v", "score"):
    np.testing.assert_allclose(outs[tgt], outs["x0"], rtol=1e-4, atol=1e-4)
  # Interval: outside [0.4, 0.6] the guided model is the conditional one.
  base = jax.jit(G.denoiser(SCH, "eps", conditional=True))
  gi = jax.jit(guidance.cfg(Model(base, "eps", SCH), null_cond=NULL, scale=2.5, interval=(0.4, 0.6)).denoise)(
      x, t, labels)
  off = (t < 0.4) | (t > 0.6)
  np.testing.assert_allclose(gi[off], base(x, t, labels)[off], atol=1e-6)
  assert not np.allclose(gi[~off], base(x, t, labels)[~off])
  # Rescale: phi = 0 is plain CFG; phi = 1 gives x0 the per-example std of the conditional x0.
  x4 = jax.random.normal(jax.random.key(1), (4, 8, 8, 2))
  t4 = jnp.array([0.2, 0.4, 0.6, 0.8])
  lin = lambda y, tt, c: 0.3 * y + 0.1 * c[:, None, None, None]
  m_lin = Model(lin, "eps", SCH)
  plain = guidance.cfg(m_lin, null_cond=0, scale=3.0).denoise(x4, t4, jnp.ones(4))
  r0 = guidance.cfg(m_lin, null_cond=0, scale=3.0, rescale=jnp.float32(0.0)).denoise(x4, t4, jnp.ones(4))
  np.testing.assert_allclose(r0, plain, atol=1e-6)
  r1 = guidance.cfg(m_lin, null_cond=0, scale=3.0, rescale=1.0).denoise(x4, t4, jnp.ones(4))
  co = targets.coefficients(SCH, t4)
  x0_r = targets.to_x0_eps("eps", r1, x4, *co)[0]
  x0_c = targets.to_x0_eps("eps", lin(x4, t4, jnp.ones(4)), x4, *co)[0]
  np.testing.assert_allclose(x0_r.reshape(4, -1).std(1), x0_c.reshape(4, -1).std(1), rtol=1e-4)
  # Learned variance: only the first C channels are guided.
  lv = lambda y, tt, c: jnp.concatenate([lin(y, tt, c), jnp.full_like(y, 0.25) * c[:, None, None, None]], -1)
  out = guidance.cfg(Model(lv, "eps", SCH, learned_variance=True), null_cond=0, scale=3.0).denoise(
      x4, t4, jnp.ones(4))
  np.testing.assert_allclose(out[..., :2], plain, atol=1e-6)
  np.testing.assert_allclose(out[..., 2:], 0.25, atol=1e-6)
  with pytest.raises(TypeError, match="core.Model"):
    guidance.cfg(lin, null_cond=0, scale=1.0)


def test_larger_cfg_scale_moves_samples_toward_their_class():
  """Two overlapping isotropic classes at (-0.6, 0) and (0.6, 0), variance 0.5.

  Guidance samples p(x|c) p(c|x)^w: for class 0 the mean moves monotonically
  away from the other class (more negative first coordinate), the Bayes
  posterior p(0 | x0) rises, and w = 0 reproduces the class mean within 4 SE (n = 2000).
  """
  g2 = gmm.GMM([0.5, 0.5], [[-0.6, 0.0], [0.6, 0.0]], [np.eye(2) * 0.5] * 2, classes=[0, 1])
  base = g2.model(SCH, "eps", conditional=True)
  x_T = process.prior_sample(jax.random.key(0), SCH, (2000, 2))
  labels = jnp.zeros(2000, jnp.int32)
  f = jax.jit(lambda w: samplers.sample(guidance.cfg(base, null_cond=2, scale=w), x_T,
                                        method="dpm_solver_pp_2m", num_steps=30, key=jax.random.key(1), cond=labels))
  means, post = [], []
  for w in (0.0, 1.0, 3.0):
    x = np.asarray(f(w), np.float64)
    means.append(x[:, 0].mean())
    post.append(np.exp(g2.class_log_prob(x, 1.0, 1e-4, np.zeros(len(x), np.int32))).mean())
  assert abs(means[0] - (-0.6)) < 4 * np.sqrt(0.5 / 2000), means
  assert means[0] > means[1] > means[2], means
  assert post[0] < post[1] < post[2], post


def test_classifier_guidance_with_the_bayes_classifier_is_the_conditional():
  """grad log p(x_t) + s grad log p(c|x_t) with the exact classifier:
  s = 1 is exactly the conditional score, and s = 1 + w equals CFG with weight w.
  Checked on the denoiser output and on deterministic sample paths; the s = 1 samples
  also match the class-conditional mixture's moments (within 4.5 SE, n = 2000)."""
  uncond = G.model(SCH, "v")
  cond = G.model(SCH, "v", conditional=True)
  x = jax.random.normal(jax.random.key(0), (32, 2)) * 2
  t = jnp.linspace(0.02, 0.98, 32)
  labels = jnp.arange(32) % 2
  cg1 = guidance.classifier_guidance(uncond, G.classifier(SCH), scale=1.0)
  assert isinstance(cg1, Model) and cg1.target == "v"
  np.testing.assert_allclose(jax.jit(cg1.denoise)(x, t, labels), jax.jit(cond.denoise)(x, t, labels),
                             rtol=2e-3, atol=2e-3)
  cg3 = guidance.classifier_guidance(uncond, G.classifier(SCH), scale=3.0)
  cfg2 = guidance.cfg(cond, null_cond=NULL, scale=2.0)
  np.testing.assert_allclose(jax.jit(cg3.denoise)(x, t, labels), jax.jit(cfg2.denoise)(x, t, labels),
                             rtol=5e-3, atol=5e-3)

  x_T = process.prior_sample(jax.random.key(3), SCH, (2000, 2))
  lab = jnp.ones(2000, jnp.int32)
  a = _sampler(cg1)(x_T, lab)
  b = _sampler(cond)(x_T, lab)
  np.testing.assert_allclose(a, b, atol=2e-3)
  z = gmm.moments_z(a, G.class_gmm(1))
  assert max(z.values()) < 4.5, z


# -- autoguidance ---------------------------------------------------------------------------------
# The guide: the same mixture with every component widened by 0.4 I (a "worse" model of the same task).
GUIDE = gmm.GMM(G.weights, G.means, G.covs + 0.4 * np.eye(2), classes=G.classes)
XA = jax.random.normal(jax.random.key(5), (24, 2)) * 2
TA = jnp.linspace(0.05, 0.95, 24)
LA = jnp.arange(24) % 3               # label 2 = G.num_classes: the unconditional mixture
WA = jnp.linspace(-1.0, 4.0, 24)      # a per-example scale [B]


def _np_alpha_sigma(t):
  """VPLinear(0.1, 20) in float64 from its formula: log alpha = -t^2 (20 - 0.1) / 4 - 0.1 t / 2."""
  la = -0.25 * t * t * 19.9 - 0.05 * t
  return np.exp(la), np.sqrt(-np.expm1(2 * la))


def _np_from_x0(target, x0, x, t):
  a, s = (c[:, None] for c in _np_alpha_sigma(t))
  eps = (x - a * x0) / s
  return {"x0": x0, "eps": eps, "v": a * eps - s * x0}[target]


def _np_autoguided(target, w, interval=None):
  """D_guide + (1 + w) (D_main - D_guide) in x0 space from the exact posterior means (float64), in `target`."""
  x, t, lab = (np.asarray(v, np.float64) for v in (XA, TA, LA))
  a, s = _np_alpha_sigma(t)
  dm = G.posterior_mean(x, a, s, lab.astype(np.int32))
  dg = GUIDE.posterior_mean(x, a, s, lab.astype(np.int32))
  w = np.broadcast_to(np.asarray(w, np.float64), t.shape)
  if interval is not None:
    w = np.where((t >= interval[0]) & (t <= interval[1]), w, 0.0)
  return _np_from_x0(target, dg + (1 + w)[:, None] * (dm - dg), x, t), dm, dg


_AUTO = {}
_MAIN_V = jax.jit(G.denoiser(SCH, "v", conditional=True))   # the main model alone, shared


def _auto(main_target, guide_target, interval=None):
  """One jitted autoguided denoiser (x, t, labels, w) per configuration, shared by the tests."""
  key = (main_target, guide_target, interval)
  if key not in _AUTO:
    m, g = G.model(SCH, main_target, conditional=True), GUIDE.model(SCH, guide_target, conditional=True)
    _AUTO[key] = jax.jit(lambda x, t, y, w: guidance.autoguidance(m, g, scale=w, interval=interval).denoise(
        x, t, y))
  return _AUTO[key]


def test_autoguidance_with_the_main_model_as_guide_is_the_main_model():
  m = G.model(SCH, "v", conditional=True)
  f = jax.jit(lambda x, t, y, w: guidance.autoguidance(m, m, scale=w).denoise(x, t, y))
  ref = _MAIN_V(XA, TA, LA)
  for w in (WA, -WA * 3):                                # w from -12 to 4, one per example
    np.testing.assert_array_equal(f(XA, TA, LA, w), ref)
  # The same mixture as an eps model: equal after the conversion, to float tolerance.
  g_eps = G.model(SCH, "eps", conditional=True)
  out = jax.jit(lambda x, t, y, w: guidance.autoguidance(m, g_eps, scale=w).denoise(x, t, y))(XA, TA, LA, WA)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_autoguidance_of_two_exact_mixture_denoisers_is_the_formula():
  """Main: the exact denoiser of G; guide: of G with covariances widened by 0.4 I (both conditional,
  same labels). The guided prediction equals D_g + (1 + w)(D_m - D_g) from float64 numpy."""
  ref, dm, dg = _np_autoguided("x0", 2.0)
  assert np.max(np.abs(dm - dg)) > 0.1                                  # the two denoisers do differ
  got = _auto("x0", "x0")(XA, TA, LA, jnp.float32(2.0))
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  assert np.max(np.abs(got - dm)) > 0.1                                 # ... and the guidance is visible
  # Main predicts v, guide eps: the guide is converted; the result is the same formula, in v.
  ref_v, _, _ = _np_autoguided("v", 2.0)
  np.testing.assert_allclose(_auto("v", "eps")(XA, TA, LA, jnp.float32(2.0)), ref_v, rtol=1e-4, atol=1e-4)
  # w per example [B], with an interval: inside it the formula, outside it exactly the main model.
  iv = (0.3, 0.7)
  got_i = _auto("v", "eps", iv)(XA, TA, LA, WA)
  off = np.asarray((TA < iv[0]) | (TA > iv[1]))
  assert 0 < off.sum() < len(off)
  np.testing.assert_array_equal(got_i[off], _MAIN_V(XA, TA, LA)[off])
  ref_i, _, _ = _np_autoguided("v", np.asarray(WA), iv)
  np.testing.assert_allclose(got_i, ref_i, rtol=1e-4, atol=1e-4)


def test_autoguidance_scale_is_traced_and_learned_variance_channels_come_from_the_main_model():
  traces = [0]
  base_g = GUIDE.denoiser(SCH, "x0")

  def guide_den(x, t, c):
    traces[0] += 1
    return base_g(x, t, c)
  main = G.model(SCH, "eps")
  run = jax.jit(lambda x_T, w: samplers.sample(guidance.autoguidance(main, Model(guide_den, "x0", SCH), scale=w),
                                              x_T, key=jax.random.key(1), method="ddim", num_steps=4))
  x_T = process.prior_sample(jax.random.key(0), SCH, (8, 2))
  a = run(x_T, jnp.linspace(0.0, 1.0, 8))
  n = traces[0]
  b = run(x_T, jnp.linspace(2.0, 3.0, 8))
  assert n >= 1 and traces[0] == n, (n, traces[0])   # a new w is not a new trace
  assert not np.allclose(a, b)
  # Learned variance: the first C channels are guided, the variance channels are the main model's;
  # a guide with learned variance contributes only its first C channels.
  x4 = np.asarray(jax.random.normal(jax.random.key(2), (4, 3, 3, 2)))
  t4 = jnp.array([0.2, 0.4, 0.6, 0.8])
  lv_m = lambda y, tt, c: jnp.concatenate([0.3 * y, jnp.full_like(y, 0.25)], -1)
  lv_g = lambda y, tt, c: jnp.concatenate([-0.2 * y + 1.0, jnp.full_like(y, -0.7)], -1)
  w4 = np.array([0.0, 1.0, 2.0, -0.5])[:, None, None, None]
  want = 0.3 * x4 + w4 * (0.3 * x4 - (-0.2 * x4 + 1.0))
  for g in (Model(lv_g, "eps", SCH, learned_variance=True), Model(lambda y, tt, c: -0.2 * y + 1.0, "eps", SCH)):
    out = jax.jit(guidance.autoguidance(Model(lv_m, "eps", SCH, learned_variance=True), g,
                                        scale=jnp.asarray(w4[:, 0, 0, 0])).denoise)(jnp.asarray(x4), t4, None)
    assert out.shape == (4, 3, 3, 4)
    np.testing.assert_allclose(out[..., :2], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[..., 2:], 0.25)


def test_autoguidance_and_cfg_refuse_bad_input():
  lin = lambda y, tt, c: 0.3 * y
  main = Model(lin, "eps", SCH)
  with pytest.raises(TypeError, match="main has VPLinear, guide has VPCosine"):
    guidance.autoguidance(main, Model(lin, "eps", schedules.VPCosine()), scale=1.0)
  with pytest.raises(ValueError, match=r"main has VPLinear\(beta_min=0.1, beta_max=20\), "
                                      r"guide has VPLinear\(beta_min=0.1, beta_max=10\) \(they differ in beta_max\)"):
    guidance.autoguidance(main, Model(lin, "eps", schedules.VPLinear(beta_max=10.0)), scale=1.0)
  ddpm = schedules.get("ddpm_linear")
  with pytest.raises(ValueError, match=r"share the schedule.*differ in betas, alphas_cumprod, log_snr_knots"):
    guidance.autoguidance(Model(lin, "eps", ddpm), Model(lin, "eps", schedules.get("ddpm_cosine")), scale=1.0)
  guidance.autoguidance(Model(lin, "eps", ddpm), Model(lin, "eps", schedules.get("ddpm_linear")), scale=1.0)  # equal
  with pytest.raises(TypeError, match="core.Model"):
    guidance.autoguidance(main, lin, scale=1.0)
  for bad in ((0.6, 0.4), (-0.1, 0.5), (0.2, 1.5), 0.5, (0.1, 0.2, 0.3), ("a", 0.5)):
    with pytest.raises(ValueError, match=r"autoguidance: interval"):
      guidance.autoguidance(main, main, scale=1.0, interval=bad)
    with pytest.raises(ValueError, match=r"cfg: interval"):
      guidance.cfg(main, null_cond=0, scale=1.0, interval=bad)
  # A schedule traced by jit (the main model passed as a pytree) is not refused; its values are not checked.
  x = jnp.ones((2, 3))
  out = jax.jit(lambda m: guidance.autoguidance(m, Model(lambda y, tt, c: 0.1 * y, "eps", SCH), scale=2.0).denoise(
      x, jnp.full((2,), 0.5), None))(main)
  np.testing.assert_allclose(out, 0.3 + 2.0 * (0.3 - 0.1), rtol=1e-6)
