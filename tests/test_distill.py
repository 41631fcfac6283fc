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
