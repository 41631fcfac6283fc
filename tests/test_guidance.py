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
