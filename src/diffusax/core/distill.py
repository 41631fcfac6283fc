"""Progressive distillation (Salimans & Ho 2022, Algorithm 2): the student's target and loss.

A student of N steps takes one DDIM step from t to t'' = t - 1/N where its teacher (2N steps) takes
two, t -> t' = t - 1/(2N) -> t''. With the teacher's x0 predictions x_hat (deterministic DDIM,
eq. 7 of the paper: z_s = alpha_s x_hat + (sigma_s / sigma_t) (z_t - alpha_t x_hat)):

    z_t'  = alpha_t'  x_hat(z_t, t)    + (sigma_t'  / sigma_t)  (z_t  - alpha_t  x_hat(z_t, t))
    z_t'' = alpha_t'' x_hat(z_t', t')  + (sigma_t'' / sigma_t') (z_t' - alpha_t' x_hat(z_t', t'))

and the student's x0 target is the x~ for which its own single DDIM step lands on z_t'':

    x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t).

At t'' = 0 (sigma = 0, alpha = 1) that is x~ = z_t''. The loss is the x-space error weighted by the
truncated SNR, max(alpha_t^2 / sigma_t^2, 1) ("truncated SNR weighting", section 4 of the paper),
per example [B]. Times are the schedule's continuous time in [0, 1]; the caller draws t on the
student's grid, t = i / N, i = 1..N.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from diffusax.core import model as model_lib
from diffusax.core import targets


def _b(v, x):
  return targets.expand(v, x, "t")


def ddim_step(schedule, x0_hat, z_t, t, s):
  """The deterministic DDIM step from t to s given x0_hat: alpha_s x0 + (sigma_s / sigma_t) (z_t - alpha_t x0)."""
  a_t, s_t = schedule.alpha(t), schedule.sigma(t)
  a_s, s_s = schedule.alpha(s), schedule.sigma(s)
  return _b(a_s, z_t) * x0_hat + _b(s_s / s_t, z_t) * (z_t - _b(a_t, z_t) * x0_hat)


def progressive_target(teacher, z_t, t, dt, cond: Any = None):
  """The student's x0 target x~ [B, ...] at (z_t [B, ...], t [B]) for a student step of dt [B] (= 1/N,
  t >= dt, as on the student's grid t = i / N):
  two teacher DDIM steps t -> t - dt/2 -> t - dt (teacher: a `core.Model`), then the inversion above.
  The teacher is not differentiated through (stop_gradient)."""
  model_lib.check(teacher)
  sch = teacher.schedule
  t = jnp.asarray(t, jnp.float32)
  t_mid, t_end = t - 0.5 * dt, jnp.maximum(t - dt, 0.0)
  x0_a = teacher.predict(z_t, t, cond).x0
  z_mid = ddim_step(sch, x0_a, z_t, t, t_mid)
  x0_b = teacher.predict(z_mid, t_mid, cond).x0
  z_end = ddim_step(sch, x0_b, z_mid, t_mid, t_end)
  ratio = sch.sigma(t_end) / sch.sigma(t)
  target = (z_end - _b(ratio, z_t) * z_t) / _b(sch.alpha(t_end) - ratio * sch.alpha(t), z_t)
  return jax.lax.stop_gradient(target)


def truncated_snr_weight(schedule, t):
  """max(SNR(t), 1) [B]: the paper's weighting of the x-space error."""
  return jnp.maximum(jnp.exp(schedule.log_snr(t)), 1.0)


def progressive_loss(schedule, student_x0, target, t):
  """Per-example loss [B]: max(SNR, 1) * mean over features of (x0_student - x~)^2."""
  err = jnp.mean(jnp.reshape((student_x0 - target) ** 2, (student_x0.shape[0], -1)), axis=1)
  return truncated_snr_weight(schedule, t) * err
