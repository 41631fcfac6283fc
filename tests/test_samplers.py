"""Sampler API, shapes, determinism, exact identities between samplers, and recompiles."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusax.core import guidance, process, samplers, schedules
from diffusax.core.samplers import grid

ALL = sorted(samplers.METHODS)


def std_normal_denoiser(schedule, target="eps"):
  """Exact denoiser of N(0, I) data: E[x0 | x_t] = alpha x_t / (alpha^2 + sigma^2), any shape."""
  from diffusax.core import targets

  def denoise(x, t, cond):
    a, s, da, ds = targets.coefficients(schedule, t)
    a4, s4 = a.reshape((-1,) + (1,) * (x.ndim - 1)), s.reshape((-1,) + (1,) * (x.ndim - 1))
    x0 = a4 * x / (a4 ** 2 + s4 ** 2)
    return targets.from_x0_eps(x0, (x - a4 * x0) / s4, target, a, s, da, ds)
  return denoise


@pytest.mark.parametrize("method", ALL)
def test_image_shapes_every_method(method):
  sch = schedules.VPLinear() if not method.startswith("flow") else schedules.Flow()
  x_T = process.prior_sample(jax.random.key(0), sch, (2, 4, 4, 3))
  x0, traj = samplers.sample(std_normal_denoiser(sch, "v"), "v", sch, x_T, method=method, num_steps=4,
                             key=jax.random.key(1), return_trajectory=True)
  assert x0.shape == x_T.shape and x0.dtype == x_T.dtype
  assert traj.shape == (5, 2, 4, 4, 3)
  np.testing.assert_array_equal(traj[0], x_T)
  np.testing.assert_array_equal(traj[-1], x0)
  assert np.all(np.isfinite(np.asarray(x0)))


def test_errors():
  sch = schedules.VPLinear()
  den = std_normal_denoiser(sch)
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="allowed: .*ddim"):
    samplers.sample(den, "eps", sch, x, method="nope", num_steps=2, key=jax.random.key(0))
  with pytest.raises(ValueError, match="exceeds max_steps"):
    samplers.sample(den, "eps", sch, x, method="ddim", num_steps=9, max_steps=4, key=jax.random.key(0))
  with pytest.raises(ValueError, match="bad options"):
    samplers.sample(den, "eps", sch, x, method="ddim", num_steps=2, key=jax.random.key(0), churn=1.0)
  with pytest.raises(ValueError, match="leading"):
    samplers.sample(den, "eps", sch, x, method="ddim", num_steps=2, key=jax.random.key(0), spacing="leading")
  with pytest.raises(ValueError, match="max_steps"):
    jax.jit(lambda n: samplers.sample(den, "eps", sch, x, method="ddim", num_steps=n, key=jax.random.key(0),
                                      return_trajectory=True))(3)
  with pytest.raises(ValueError, match="2C"):
    samplers.sample(den, "eps", sch, x, method="ddpm", num_steps=2, key=jax.random.key(0), learned_variance=True)


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
  ddpm_small = samplers.sample(den, "eps", sch, x_T, method="ddpm", **kw)
  ddim1 = samplers.sample(den, "eps", sch, x_T, method="ddim", eta=1.0, **kw)
  np.testing.assert_allclose(ddim1, ddpm_small, rtol=1e-5, atol=1e-5)
  ddpm_large = samplers.sample(den, "eps", sch, x_T, method="ddpm", variance="large", **kw)
  for v, ref in ((-1.0, ddpm_small), (1.0, ddpm_large)):
    den2 = lambda x, t, c, v=v: jnp.concatenate([den(x, t, c), jnp.full_like(x, v)], axis=-1)
    out = samplers.sample(den2, "eps", sch, x_T, method="ddpm", learned_variance=True, **kw)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_determinism_and_last_step_is_denoised_mean():
  sch = schedules.VE(0.01, 10.0)
  den = std_normal_denoiser(sch)
  x_T = process.prior_sample(jax.random.key(0), sch, (4, 2))
  for method in ("ddpm", "euler_maruyama", "pc", "euler"):
    opts = {"churn": 10.0} if method == "euler" else {}
    f = jax.jit(lambda key, method=method, opts=opts: samplers.sample(den, "eps", sch, x_T, method=method,
                                                                      num_steps=6, key=key, **opts))
    a, b, c = f(jax.random.key(5)), f(jax.random.key(5)), f(jax.random.key(6))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
  # One step: the output is the denoised mean at t_max, no noise.
  one = samplers.sample(den, "eps", sch, x_T, method="ddpm", num_steps=1, key=jax.random.key(5))
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
      g = guidance.cfg(den, null_cond=2, scale=w)
      return samplers.sample(g, "eps", sch, x_T, method=method, num_steps=n, key=key, cond=labels,
                             max_steps=64, return_trajectory=True, **{knob: k})
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

  f = jax.jit(lambda n: samplers.sample(counting2, "eps", sch, x_T, method="dpm_solver_pp_2m", num_steps=n,
                                        key=jax.random.key(0), max_steps=1000))
  f(7).block_until_ready()
  jax.effects_barrier()
  assert len(hits) == 7
  hits.clear()
  f(3).block_until_ready()
  jax.effects_barrier()
  assert len(hits) == 3


def test_tabulated_step_scalars_match_the_traced_step_count():
  """A static n tabulates the per-step scalars before the loop (driver.coefs); a traced n computes them
  in the loop. Both give the same samples, for every target path of the tabulating samplers, and the
  table holds no inf or NaN."""
  sch_vp, sch_fl = schedules.VPLinear(), schedules.Flow()
  x_T = process.prior_sample(jax.random.key(0), sch_vp, (4, 3))
  key = jax.random.key(1)
  cases = [("euler", sch_vp, "eps", {}), ("heun", sch_vp, "v", {}), ("heun", sch_vp, "x0", {"churn": 5.0}),
           ("heun", sch_vp, "score", {"clip_x0": 1.0}), ("flow_euler", sch_fl, "flow", {}),
           ("flow_heun", sch_fl, "x0", {"clip_x0": 1.0}), ("flow_heun", sch_vp, "flow", {}),
           ("ddim", sch_vp, "x0", {"eta": 0.5}), ("ddpm", sch_vp, "v", {"learned_variance": True})]
  for method, sch, target, opts in cases:
    den = std_normal_denoiser(sch, target)
    if opts.get("learned_variance"):  # [prediction | v] with v = 0.3: halfway-ish between the two variances.
      den = lambda x, t, c, base=den: jnp.concatenate([base(x, t, c), jnp.full_like(x, 0.3)], axis=-1)
    run = lambda n, method=method, sch=sch, den=den, target=target, opts=opts: samplers.sample(
        den, target, sch, x_T, method=method, num_steps=n, key=key, **opts)
    sampler = samplers.make(den, target, sch, method=method, **opts)
    table = sampler.init(x_T, key, 6).table
    assert table is not None, method
    for leaf in jax.tree.leaves(table):  # No 1/0 stand-ins in the last row (the corrector skips it).
      assert np.all(np.isfinite(np.asarray(leaf, np.float32))), (method, target, opts)
    static, traced = run(6), jax.jit(run)(6)
    np.testing.assert_allclose(static, traced, rtol=2e-5, atol=2e-5, err_msg=f"{method} {target} {opts}")
    assert np.all(np.isfinite(np.asarray(static)))


def test_model_predict_takes_a_per_example_time():
  """Model.predict at t [B] scales each example by its own coefficients (as one scalar call per example)."""
  sch = schedules.VPLinear()
  x = jax.random.normal(jax.random.key(0), (3, 4, 3))  # last axis = B: a wrong broadcast would not raise
  t = jnp.array([0.2, 0.5, 0.9])
  for target, clip in (("eps", None), ("v", 1.0)):
    m = samplers.Model(std_normal_denoiser(sch, target), target, sch, clip_x0=clip)
    x0, eps, _ = m.predict(x, t)
    for i in range(3):
      x0_i, eps_i, _ = m.predict(x[i:i + 1], t[i])
      np.testing.assert_allclose(x0[i:i + 1], x0_i, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(eps[i:i + 1], eps_i, rtol=1e-5, atol=1e-6)
