"""Progressive distillation's target (core.distill) against an independent float64 numpy derivation.

Teacher: the exact denoiser of the 2-D Gaussian mixture (tests/gmm.py) on the VP-cosine schedule,
whose alpha and sigma the numpy side takes from tests/references.py (the paper's closed form), not
from diffusax. Two teacher DDIM steps t -> t - dt/2 -> t - dt are done in numpy; the student target
is then the paper's inversion (Salimans & Ho 2022, Algorithm 2), and the ideal student, whose x0 is
that target, reaches the teacher's two-step result in one DDIM step.
"""
import jax
import jax.numpy as jnp
import numpy as np

import gmm
import references
from diffusax.core import distill, schedules

G = gmm.standard_mixture()
SCHED = schedules.VPCosine()


def _target(z, t, dt):
  return distill.progressive_target(G.model(SCHED, "eps"), z, t, dt)


def _np_ddim(x0, z, a_t, s_t, a_s, s_s):
  return a_s * x0 + (s_s / s_t) * (z - a_t * x0)


def _np_two_steps(z, t, dt):
  a, s = references.np_vp_cosine(t)
  am, sm = references.np_vp_cosine(t - dt / 2)
  ae, se = references.np_vp_cosine(np.maximum(t - dt, 0.0))
  a, s, am, sm, ae, se = (v[:, None] for v in (a, s, am, sm, ae, se))
  z_mid = _np_ddim(G.posterior_mean(z, a, s, xp=np), z, a, s, am, sm)
  z_end = _np_ddim(G.posterior_mean(z_mid, am, sm, xp=np), z_mid, am, sm, ae, se)
  return z_end, (a, s, ae, se)


def test_the_student_target_is_the_papers_inversion_of_two_teacher_steps():
  rng = np.random.default_rng(0)
  n = 256
  dt = np.full(n, 1.0 / 8)
  t = rng.uniform(1.0 / 8, 0.95, n)  # on a student grid t >= dt (t = i / N)
  a, s = references.np_vp_cosine(t)
  z = a[:, None] * np.asarray(G.sample(jax.random.key(1), n)[0], np.float64) + s[:, None] * rng.standard_normal((n, 2))
  z_end, (a, s, ae, se) = _np_two_steps(z, t, dt)
  want = (z_end - (se / s) * z) / (ae - (se / s) * a)
  got = _target(jnp.asarray(z, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(dt, jnp.float32))
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=2e-4, rtol=1e-4)
  # The ideal student (x0 = its target) lands on the teacher's two-step result in one DDIM step...
  one = distill.ddim_step(SCHED, got, jnp.asarray(z, jnp.float32), jnp.asarray(t, jnp.float32),
                          jnp.asarray(t - dt, jnp.float32))
  np.testing.assert_allclose(np.asarray(one, np.float64), z_end, atol=2e-4, rtol=1e-4)
  # ... and has zero loss there, while the teacher's own one-step x0 does not.
  loss = distill.progressive_loss(SCHED, got, got, jnp.asarray(t, jnp.float32))
  assert float(jnp.max(jnp.abs(loss))) == 0.0
  teacher_x0 = G.model(SCHED, "eps").predict(jnp.asarray(z, jnp.float32), jnp.asarray(t, jnp.float32)).x0
  assert float(jnp.mean(distill.progressive_loss(SCHED, teacher_x0, got, jnp.asarray(t, jnp.float32)))) > 1e-4


def test_the_last_student_step_targets_the_teachers_end_point_and_weights_truncate_at_snr_one():
  rng = np.random.default_rng(1)
  n = 64
  t = np.full(n, 0.25)
  dt = np.full(n, 0.25)  # t - dt = 0: sigma = 0, alpha = 1
  a, s = references.np_vp_cosine(t)
  z = a[:, None] * np.asarray(G.sample(jax.random.key(2), n)[0], np.float64) + s[:, None] * rng.standard_normal((n, 2))
  z_end, _ = _np_two_steps(z, t, dt)
  got = _target(jnp.asarray(z, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(dt, jnp.float32))
  np.testing.assert_allclose(np.asarray(got, np.float64), z_end, atol=2e-4, rtol=1e-4)
  tt = np.array([0.1, 0.5, 0.9])
  a, s = references.np_vp_cosine(tt)
  np.testing.assert_allclose(np.asarray(distill.truncated_snr_weight(SCHED, jnp.asarray(tt, jnp.float32))),
                             np.maximum(a ** 2 / s ** 2, 1.0), rtol=1e-4)


# --- Consistency distillation -------------------------------------------------------------------

def _np_t_from_edm_sigma(sig, s=0.008):
  """VP-cosine time of EDM level sigma / alpha = sig, inverted in numpy: abar = 1 / (1 + sig^2)."""
  f0 = np.cos(s / (1 + s) * np.pi / 2) ** 2
  return (1 + s) * 2 / np.pi * np.arccos(np.sqrt(f0 / (1.0 + sig ** 2))) - s


def _np_karras(n, t_min, t_max, rho=7.0):
  lo, hi = (np.divide(*references.np_vp_cosine(np.float64(v))[::-1]) ** (1 / rho) for v in (t_min, t_max))
  return _np_t_from_edm_sigma((lo + np.arange(n) / (n - 1) * (hi - lo)) ** rho)


T_MIN, T_MAX = 1e-3, 1.0 - 1e-3


def _exact_f(z, t):
  """The exact consistency function of the mixture: the PF-ODE from t to T_MIN (float64 RK4), in x-space."""
  a, s = references.np_vp_cosine(np.float64(t))
  a0, s0 = references.np_vp_cosine(np.float64(T_MIN))
  if t <= T_MIN:
    return np.asarray(z, np.float64)
  return a0 * G.ode_reference(z, s / a, s0 / a0, alpha_max=a, steps=400, denoise_end=False)


def test_karras_times_and_the_skip_scaling_match_numpy_and_f_is_the_identity_at_the_boundary():
  got = distill.karras_time(SCHED, jnp.arange(18), 18, T_MIN, T_MAX)
  np.testing.assert_allclose(np.asarray(got, np.float64), _np_karras(18, T_MIN, T_MAX), rtol=2e-4, atol=2e-6)
  t = np.array([T_MIN, 0.01, 0.3, 0.9])
  a, s = references.np_vp_cosine(t)
  a0, s0 = references.np_vp_cosine(np.float64(T_MIN))
  k, k0 = s / a, s0 / a0  # EDM levels; Song et al.'s c_skip, c_out on EDM's F = (D - c_skip_edm x) / c_out_edm
  c_skip, c_out = 0.25 / ((k - k0) ** 2 + 0.25), 0.5 * (k - k0) / np.sqrt(0.25 + k ** 2)
  e_skip, e_out = 0.25 / (k ** 2 + 0.25), 0.5 * k / np.sqrt(0.25 + k ** 2)
  want_a, want_b = c_skip - c_out / e_out * e_skip, c_out / e_out
  got_a, got_b = distill.consistency_weights(SCHED, jnp.asarray(t, jnp.float32), T_MIN)
  np.testing.assert_allclose(np.asarray(got_a), want_a, atol=1e-4)
  np.testing.assert_allclose(np.asarray(got_b), want_b, atol=1e-4)
  z = jnp.asarray(np.random.default_rng(3).standard_normal((16, 2)), jnp.float32)
  f = distill.consistency_fn(G.model(SCHED, "eps"), z, T_MIN, t_min=T_MIN)
  assert bool(jnp.all(f == z))  # c_skip(t_min) = 1 exactly: f(x, t_min) = x
  far = distill.consistency_fn(G.model(SCHED, "eps"), z, 0.9, t_min=T_MIN)
  x0 = G.model(SCHED, "eps").predict(z, 0.9).x0  # away from t_min, f is the denoiser
  np.testing.assert_allclose(np.asarray(far), np.asarray(x0), atol=1e-3 * float(jnp.max(jnp.abs(z))))


def test_the_exact_consistency_function_has_zero_loss_up_to_the_teacher_steps_order():
  """f* = the exact PF-ODE map to t_min has zero consistency loss when the teacher's step is exact;
  with one teacher step from EDM level k to k e^-h its loss is that step's local error squared: Heun
  (O(h^3)) shrinks ~64x per halving of h, DDIM (Euler, O(h^2)) ~16x; a wrong f (the one-step denoiser)
  is far off."""
  rng = np.random.default_rng(4)
  b = 64
  teacher = G.model(SCHED, "eps")
  t_next = float(_np_t_from_edm_sigma(1.0))
  a, s = references.np_vp_cosine(np.float64(t_next))
  z = a * np.asarray(G.sample(jax.random.key(5), b)[0], np.float64) + s * rng.standard_normal((b, 2))
  f_next = _exact_f(z, t_next)
  losses = {}
  for h in (0.4, 0.2, 0.1):
    t_cur = float(_np_t_from_edm_sigma(np.exp(-h)))
    for solver in distill.TEACHER_SOLVERS:
      x_cur = distill.teacher_ode_step(teacher, jnp.asarray(z, jnp.float32), jnp.full((b,), t_next),
                                       jnp.full((b,), t_cur), solver=solver)
      tgt = _exact_f(np.asarray(x_cur, np.float64), t_cur)
      losses[solver, h] = float(np.mean(distill.consistency_loss(jnp.asarray(f_next), jnp.asarray(tgt))))
  wrong = np.asarray(teacher.predict(jnp.asarray(z, jnp.float32), t_next).x0, np.float64)
  wrong_loss = float(np.mean(distill.consistency_loss(jnp.asarray(wrong), jnp.asarray(f_next))))
  assert losses["heun", 0.1] < 1e-7 and wrong_loss > 1e-2, (losses, wrong_loss)
  for h in (0.4, 0.2):
    assert losses["heun", h] / losses["heun", h / 2] > 30, losses
    assert 8 < losses["ddim", h] / losses["ddim", h / 2] < 30, losses
  assert losses["heun", 0.1] < losses["ddim", 0.1] / 10, losses


def test_pseudo_huber_is_quadratic_near_zero_and_linear_far():
  d = jnp.asarray([[1e-5, 0.0], [3.0, 4.0]], jnp.float32)
  got = np.asarray(distill.consistency_loss(d, jnp.zeros_like(d), "pseudo_huber", c=0.01), np.float64)
  msq = np.array([1e-10 / 2, 12.5])
  np.testing.assert_allclose(got, np.sqrt(msq + 1e-4) - 0.01, rtol=1e-4)
  assert abs(got[0] - msq[0] / (2 * 0.01)) < 1e-9 and abs(got[1] - np.sqrt(12.5)) < 0.011


def test_the_multistep_consistency_sampler_follows_algorithm_1():
  from diffusax.core import samplers
  from diffusax.core.samplers import driver
  model = G.model(SCHED, "eps")
  x_T = jnp.asarray(np.random.default_rng(6).standard_normal((32, 2)), jnp.float32)
  key = jax.random.key(7)
  one = samplers.sample(model, x_T, key=key, method="consistency", num_steps=1)
  np.testing.assert_allclose(np.asarray(one), np.asarray(distill.consistency_fn(model, x_T, T_MAX, t_min=T_MIN)),
                             atol=1e-6)
  two = samplers.sample(model, x_T, key=key, method="consistency", num_steps=2)
  x0 = distill.consistency_fn(model, x_T, T_MAX, t_min=T_MIN)
  t1 = T_MAX / 2  # the trailing grid t_i = t_max (1 - i / n)
  a, s = references.np_vp_cosine(np.float64(t1))
  x1 = a * x0 + s * driver.noise(driver.step_key(key, 0), x0.shape)
  np.testing.assert_allclose(np.asarray(two), np.asarray(distill.consistency_fn(model, x1, t1, t_min=T_MIN)),
                             atol=3e-4)  # float64 alpha and sigma here; a wrong key or step would be O(1) off
  assert samplers.stochastic("consistency")


def test_a_tiny_progressive_round_on_the_mixture_beats_the_teachers_two_step_ddim():
  """An MLP student distilled for 2 steps from the exact mixture denoiser (its 4-step DDIM) lands closer
  to the exact PF-ODE end points (float64 RK4) with 2 DDIM steps than the teacher's own 2 DDIM steps."""
  import optax
  from diffusax import nn
  from diffusax.core import samplers
  from diffusax.training import distill_step, state as state_lib
  module = nn.build("mlp", hidden=64, depth=2)
  params = module.init(jax.random.key(0), jnp.zeros((2, 2)), jnp.full((2,), 0.5))["params"]
  tx = optax.adam(2e-3)
  student = distill_step.flax_models(module, "v", SCHED)
  teacher = lambda _: G.model(SCHED, "eps")
  step = jax.jit(distill_step.make_distill_step("progressive", student, teacher, tx, lambda k: 2e-3,
                                                label_dropout=0.0, null_class=None, ema_decays=(0.99,),
                                                t_max=T_MAX, t_min=T_MIN))
  state = state_lib.create(params, tx, 0, 1)
  data = G.sample(jax.random.key(1), 600 * 256)[0].reshape(600, 256, 2)
  for k in range(600):
    state, m = step(state, (), {"x": data[k]}, jnp.int32(2), jnp.int32(0))
  x_T = jnp.asarray(np.random.default_rng(8).standard_normal((256, 2)), jnp.float32)
  a, s = references.np_vp_cosine(np.float64(T_MAX))
  a0, s0 = references.np_vp_cosine(np.float64(T_MIN))
  exact = G.ode_reference(np.asarray(x_T, np.float64), s / a, s0 / a0, alpha_max=a, steps=400)
  two = lambda model: np.asarray(samplers.sample(model, x_T, key=jax.random.key(0), method="ddim",
                                                 num_steps=2, options={"spacing": "trailing"}), np.float64)
  err = lambda y: float(np.mean(np.linalg.norm(y - exact, axis=1)))
  e_teacher, e_student = err(two(G.model(SCHED, "eps"))), err(two(student(state.ema_params[0])))
  e_four = err(np.asarray(samplers.sample(G.model(SCHED, "eps"), x_T, key=jax.random.key(0),
                                          method="ddim", num_steps=4, options={"spacing": "trailing"})))
  assert e_student < 0.7 * e_teacher and e_four < e_teacher, (e_student, e_teacher, e_four)
