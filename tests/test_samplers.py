"""Sampler API, shapes, determinism, exact identities between samplers, and recompiles."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusax.core import Model, guidance, process, samplers, schedules
from diffusax.core.samplers import grid

ALL = sorted(samplers.METHODS)


def std_normal_denoiser(schedule, target="eps"):
  """Exact denoiser of N(0, I) data: E[x0 | x_t] = alpha x_t / (alpha^2 + sigma^2), any shape."""
  from diffusax.core import targets

  def denoise(x, t, cond):
    a, s, da, ds = targets.coefficients(schedule, t)
    a4, s4 = a.reshape((-1,) + (1,) * (x.ndim - 1)), s.reshape((-1,) + (1,) * (x.ndim - 1))
    x0 = a4 * x / (a4 ** 2 + s4 ** 2)
    return targets.from_x0_eps(target, x0, (x - a4 * x0) / s4, a, s, da, ds)
  return denoise


def std_normal_model(schedule, target="eps"):
  return Model(std_normal_denoiser(schedule, target), target, schedule)


@pytest.mark.parametrize("method", ALL)
def test_image_shapes_every_method(method):
  sch = schedules.VPLinear() if not method.startswith("flow") else schedules.Flow()
  x_T = process.prior_sample(jax.random.key(0), sch, (2, 4, 4, 3))
  x0, traj = samplers.sample(std_normal_model(sch, "v"), x_T, method=method, num_steps=4,
                             key=jax.random.key(1), return_trajectory=True)
  assert x0.shape == x_T.shape and x0.dtype == x_T.dtype
  assert traj.shape == (5, 2, 4, 4, 3)
  np.testing.assert_array_equal(traj[0], x_T)
  np.testing.assert_array_equal(traj[-1], x0)
  assert np.all(np.isfinite(np.asarray(x0)))


def test_errors_name_the_allowed_values_of_each_layer():
  sch = schedules.VPLinear()
  m = std_normal_model(sch)
  x = jnp.zeros((2, 3))
  k = jax.random.key(0)
  with pytest.raises(ValueError, match="allowed: .*ddim"):
    samplers.sample(m, x, method="nope", num_steps=2, key=k)
  with pytest.raises(ValueError, match="exceeds max_steps"):
    samplers.sample(m, x, method="ddim", num_steps=9, max_steps=4, key=k)
  # Method layer: a typo or another method's option names the method's own options.
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['churn'\] for sampling method 'ddim'; "
                                       r"allowed: \['eta', 'spacing', 't_max', 't_min'\]"):
    samplers.sample(m, x, method="ddim", num_steps=2, key=k, options={"churn": 1.0})
  with pytest.raises(ValueError, match=r"\['etaa'\].*allowed: \['eta'"):
    samplers.sample(m, x, method="ddim", num_steps=2, key=k, options={"etaa": 1.0})
  # Call layer: a method option passed loose is refused with the call's arguments and a pointer to options=.
  with pytest.raises(ValueError, match=r"unknown argument\(s\) \['eta'\] of samplers.sample; allowed: .*"
                                       r"'clip_x0', 'inpaint'.*go in options="):
    samplers.sample(m, x, method="ddim", num_steps=2, key=k, eta=1.0)
  with pytest.raises(ValueError, match=r"\['learned_variance'\] of samplers.sample"):
    samplers.sample(m, x, method="ddpm", num_steps=2, key=k, learned_variance=True)
  # Wrapper layer.
  with pytest.raises(TypeError, match="samplers.Inpaint"):
    samplers.sample(m, x, method="ddpm", num_steps=2, key=k, inpaint=(x, x))
  with pytest.raises(TypeError, match="resmple"):
    samplers.Inpaint(x, x, resmple=2)
  with pytest.raises(ValueError, match="leading"):
    samplers.sample(m, x, method="ddim", num_steps=2, key=k, options={"spacing": "leading"})
  with pytest.raises(ValueError, match="traced num_steps needs a static max_steps"):
    jax.jit(lambda n: samplers.sample(m, x, method="ddim", num_steps=n, key=k))(3)
  with pytest.raises(ValueError, match="2C"):
    samplers.sample(Model(m.denoise, "eps", sch, learned_variance=True), x, method="ddpm", num_steps=2, key=k)
  with pytest.raises(TypeError, match="core.Model"):
    samplers.sample(m.denoise, x, method="ddpm", num_steps=2, key=k)
  with pytest.raises(ValueError, match="unknown target 'noise'"):
    Model(m.denoise, "noise", sch)


def test_traced_step_count_outside_its_bound_gives_nan_not_a_clipped_count():
  sch = schedules.VPLinear()
  x = jnp.ones((2, 3))
  f = jax.jit(lambda n: samplers.sample(std_normal_model(sch), x, method="ddim", num_steps=n,
                                        key=jax.random.key(0), max_steps=4))
  assert np.all(np.isfinite(f(4))) and np.all(np.isfinite(f(1)))
  assert np.all(np.isnan(f(5))) and np.all(np.isnan(f(0)))


def test_each_method_declares_whether_it_draws_noise():
  """`Sampler.stochastic` (what the sampling job keys samples by) agrees with what a second key changes."""
  sch = schedules.VPLinear()
  x_T = process.prior_sample(jax.random.key(0), sch, (2, 3))
  cases = [(m, {}) for m in ALL] + [("ddim", {"eta": 0.5}), ("euler", {"churn": 5.0}), ("heun", {"churn": 5.0})]
  for method, opts in cases:
    run = jax.jit(lambda key, method=method, opts=opts: samplers.sample(std_normal_model(sch), x_T, method=method,
                                                                        num_steps=4, key=key, options=opts))
    differs = not np.array_equal(run(jax.random.key(1)), run(jax.random.key(2)))
    assert samplers.stochastic(method, opts) == differs, (method, opts)


def test_discrete_spacings_match_reference_formulas():
  """Step indices of linspace / leading / trailing on T = 1000 (diffusers conventions)."""
  sch = schedules.get("ddpm_linear", num_steps=1000)
  big_t, n = 1000, 7
  ref = {
      "linspace": np.round(np.linspace(0, big_t - 1, n))[::-1],
      "leading": (np.arange(0, n) * (big_t // n))[::-1],
      "trailing": np.round(np.arange(big_t, 0, -big_t / n)) - 1,
  }
  for spacing, k in ref.items():
    t_at = grid.make(sch, spacing)
    got = np.array([float(t_at(i, n)) for i in range(n)]) * big_t - 1
    np.testing.assert_allclose(got, k, atol=1e-3, err_msg=spacing)
  # All T steps visit every knot once.
  t_at = grid.make(sch, "linspace")
  ts = np.asarray(jax.vmap(lambda i: t_at(i, big_t))(jnp.arange(big_t)))
  np.testing.assert_allclose(ts * big_t, np.arange(big_t, 0, -1), atol=2e-3)


def test_ddim_eta1_is_ddpm_and_learned_variance_endpoints():
  sch = schedules.get("ddpm_linear", num_steps=50)
  den = std_normal_denoiser(sch)
  x_T = process.prior_sample(jax.random.key(0), sch, (8, 3))
  key = jax.random.key(3)
  kw = dict(num_steps=20, key=key)
  m = Model(den, "eps", sch)
  ddpm_small = samplers.sample(m, x_T, method="ddpm", **kw)
  ddim1 = samplers.sample(m, x_T, method="ddim", options={"eta": 1.0}, **kw)
  np.testing.assert_allclose(ddim1, ddpm_small, rtol=1e-5, atol=1e-5)
  ddpm_large = samplers.sample(m, x_T, method="ddpm", options={"variance": "large"}, **kw)
  for v, ref in ((-1.0, ddpm_small), (1.0, ddpm_large)):
    den2 = lambda x, t, c, v=v: jnp.concatenate([den(x, t, c), jnp.full_like(x, v)], axis=-1)
    out = samplers.sample(Model(den2, "eps", sch, learned_variance=True), x_T, method="ddpm", **kw)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_determinism_and_last_step_is_denoised_mean():
  sch = schedules.VE(0.01, 10.0)
  m = std_normal_model(sch)
  x_T = process.prior_sample(jax.random.key(0), sch, (4, 2))
  for method in ("ddpm", "euler_maruyama", "pc", "euler"):
    opts = {"churn": 10.0} if method == "euler" else {}
    f = jax.jit(lambda key, method=method, opts=opts: samplers.sample(m, x_T, method=method,
                                                                      num_steps=6, key=key, options=opts))
    a, b, c = f(jax.random.key(5)), f(jax.random.key(5)), f(jax.random.key(6))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
  # One step: the output is the denoised mean at t_max, no noise.
  one = samplers.sample(m, x_T, method="ddpm", num_steps=1, key=jax.random.key(5))
  a1, s1 = sch.alpha(1.0), sch.sigma(1.0)
  # x0 = (x - s eps) / a cancels at s = 10: float32 error is relative to |x_T| (about 30), not to the result.
  np.testing.assert_allclose(one, a1 * x_T / (a1 ** 2 + s1 ** 2), rtol=1e-5,
                             atol=4 * np.finfo(np.float32).eps * float(np.abs(x_T).max()))


def test_one_compile_across_steps_scales_eta_and_churn():
  """A traced num_steps, guidance scale, eta and churn never retrace the jitted sampler."""
  sch = schedules.VPCosine()
  base = std_normal_denoiser(sch)
  den = lambda x, t, c: base(x, t, c) * (1.0 + 0.01 * (c[:, None] == 2))
  x_T = process.prior_sample(jax.random.key(0), sch, (4, 3))
  labels = jnp.array([0, 1, 0, 1])
  counts = {}

  def make(method, knob):
    def f(x_T, key, n, w, k):
      counts[method] = counts.get(method, 0) + 1
      g = guidance.cfg(Model(den, "eps", sch), null_cond=2, scale=w)
      return samplers.sample(g, x_T, method=method, num_steps=n, key=key, cond=labels,
                             max_steps=64, return_trajectory=True, options={knob: k})
    return jax.jit(f)

  for method, knob in (("ddim", "eta"), ("heun", "churn"), ("pc", "snr")):
    f = make(method, knob)
    outs = []
    for n, w, k in ((5, 0.0, 0.0), (17, 1.5, 0.5), (40, 3.0, 1.0), (64, 0.5, 0.2)):
      x0, traj = f(x_T, jax.random.key(1), n, w, k)
      np.testing.assert_array_equal(traj[n], x0)
      outs.append(x0)
    assert counts[method] == 1, (method, counts)
    assert not np.allclose(outs[0], outs[1])


def test_traced_step_count_does_not_pay_for_skipped_steps():
  """The loop trip count is the traced n: the denoiser runs n times, not max_steps times."""
  sch = schedules.VPLinear()
  base = std_normal_denoiser(sch)
  x_T = jnp.ones((2, 3))

  hits = []

  def counting2(x, t, c):
    jax.debug.callback(lambda: hits.append(1))
    return base(x, t, c)

  f = jax.jit(lambda n: samplers.sample(Model(counting2, "eps", sch), x_T, method="dpm_solver_pp_2m",
                                        num_steps=n, key=jax.random.key(0), max_steps=1000))
  f(7).block_until_ready()
  jax.effects_barrier()
  assert len(hits) == 7
  hits.clear()
  f(3).block_until_ready()
  jax.effects_barrier()
  assert len(hits) == 3


def test_traced_and_static_step_counts_take_the_same_path():
  """One path: the per-step table is built over max_steps (a static n, or its bound when n is traced).
  A static n and a traced n under a larger bound give the same samples, for every target path of the
  samplers, and the table holds no inf or NaN (no 1/0 stand-ins in the last row or past n)."""
  sch_vp, sch_fl = schedules.VPLinear(), schedules.Flow()
  x_T = process.prior_sample(jax.random.key(0), sch_vp, (4, 3))
  key = jax.random.key(1)
  cases = [("euler", sch_vp, "eps", {}, {}), ("heun", sch_vp, "v", {}, {}),
           ("heun", sch_vp, "x0", {"churn": 5.0}, {}), ("heun", sch_vp, "score", {}, {"clip_x0": 1.0}),
           ("flow_euler", sch_fl, "flow", {}, {}), ("flow_heun", sch_fl, "x0", {}, {"clip_x0": 1.0}),
           ("flow_heun", sch_vp, "flow", {}, {}), ("ddim", sch_vp, "x0", {"eta": 0.5}, {}),
           ("ddpm", sch_vp, "v", {}, {"learned_variance": True}), ("dpm_solver_pp_2m", sch_vp, "eps", {}, {}),
           ("pc", sch_vp, "eps", {}, {})]
  for method, sch, target, opts, extra in cases:
    den = std_normal_denoiser(sch, target)
    lv = extra.get("learned_variance", False)
    if lv:  # [prediction | v] with v = 0.3: halfway-ish between the two variances.
      den = lambda x, t, c, base=den: jnp.concatenate([base(x, t, c), jnp.full_like(x, 0.3)], axis=-1)
    m = Model(den, target, sch, learned_variance=lv)
    clip = extra.get("clip_x0")
    run = lambda n, bound=None, method=method, m=m, opts=opts, clip=clip: samplers.sample(
        m, x_T, method=method, num_steps=n, key=key, options=opts, clip_x0=clip, max_steps=bound)
    sampler = samplers.make(m, method=method, options=opts, clip_x0=clip)
    table = sampler.init(x_T, key, 6, 9).table
    assert "levels" in table, method
    for leaf in jax.tree.leaves(table):
      assert leaf.shape[0] == 9, (method, leaf.shape)
    # log-SNR is -inf where alpha = 0 (Flow at t = 1): a level, not a stand-in; everything else is finite.
    finite = {**{k: v for k, v in table.items() if k != "levels"},
              **table["levels"]._replace(log_snr=0.0, log_snr_next=0.0)._asdict()}
    for leaf in jax.tree.leaves(finite):
      assert np.all(np.isfinite(np.asarray(leaf, np.float32))), (method, target, opts)
    static, traced = run(6), jax.jit(lambda n: run(n, 9))(6)
    np.testing.assert_allclose(static, traced, rtol=2e-5, atol=2e-5, err_msg=f"{method} {target} {opts}")
    assert np.all(np.isfinite(np.asarray(static)))


def test_model_is_a_pytree_that_passes_through_jit():
  """Model's schedule is its data (leaves), its callable, target and variance flag are static."""
  sch = schedules.VPLinear()
  m = std_normal_model(sch, "v")
  leaves, treedef = jax.tree.flatten(m)
  assert len(leaves) == len(jax.tree.leaves(sch))
  assert jax.tree.unflatten(treedef, leaves) == m
  x_T = process.prior_sample(jax.random.key(0), sch, (2, 3))
  f = jax.jit(lambda model, x: samplers.sample(model, x, method="ddim", num_steps=3, key=jax.random.key(1)))
  np.testing.assert_allclose(f(m, x_T), samplers.sample(m, x_T, method="ddim", num_steps=3,
                                                        key=jax.random.key(1)), rtol=1e-6, atol=1e-6)


def test_model_predict_takes_a_per_example_time():
  """Model.predict at t [B] scales each example by its own coefficients (as one scalar call per example)."""
  sch = schedules.VPLinear()
  x = jax.random.normal(jax.random.key(0), (3, 4, 3))  # last axis = B: a wrong broadcast would not raise
  t = jnp.array([0.2, 0.5, 0.9])
  for target, clip in (("eps", None), ("v", 1.0)):
    m = std_normal_model(sch, target)
    x0, eps, _ = m.predict(x, t, clip_x0=clip)
    for i in range(3):
      x0_i, eps_i, _ = m.predict(x[i:i + 1], t[i], clip_x0=clip)
      np.testing.assert_allclose(x0[i:i + 1], x0_i, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(eps[i:i + 1], eps_i, rtol=1e-5, atol=1e-6)
