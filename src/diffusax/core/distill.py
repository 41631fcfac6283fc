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


def progressive_loss(schedule, student_x0, x0_target, t):
  """Per-example loss [B]: max(SNR, 1) * mean over features of (x0_student - x~)^2, x~ = x0_target [B, ...]
  (the student's x0 target, e.g. `progressive_target`)."""
  err = jnp.mean(jnp.reshape((student_x0 - x0_target) ** 2, (student_x0.shape[0], -1)), axis=1)
  return truncated_snr_weight(schedule, t) * err


# --- Consistency distillation (Song et al. 2023) -------------------------------------------------
#
# A consistency function f(x_t, t) maps every point of a probability-flow ODE trajectory to its
# end at the boundary time t_min. In the EDM noise level s = sigma / alpha, Song et al. (appendix C)
# parametrise it with the network's EDM-preconditioned raw output F as
#
#     f = c_skip(s) x + c_out(s) F,   c_skip = sd^2 / ((s - s0)^2 + sd^2),   c_out = sd (s - s0) / sqrt(sd^2 + s^2),
#
# s0 = s(t_min), sd = sigma_data, so that f(x, t_min) = x. Our networks predict x0 through any
# target; writing F through the x0 prediction D = c_skip_edm x + c_out_edm F (EDM's own
# preconditioning, c_skip_edm = sd^2 / (s^2 + sd^2), c_out_edm = sd s / sqrt(sd^2 + s^2)) gives
#
#     f(x_t, t) = a(t) x_t + b(t) D(x_t, t),   b = (s - s0) / s,   a = c_skip - b c_skip_edm,
#
# (`consistency_weights`): a = 1, b = 0 at t_min (f(x, t_min) = x exactly), and a -> 0, b -> 1 away
# from it, so a student initialised from its teacher starts at the teacher's denoiser. (x_t is used
# where EDM has x_t / alpha_t: a is non-negligible only where alpha = 1 - O(s^2).) Consistency
# distillation draws n on a grid t_min = t_0 < ... < t_{N-1} = t_max (the Karras grid, `karras_time`),
# noises x to x_{t_{n+1}}, takes one teacher ODE step to t_n (`teacher_ode_step`: DDIM, which is
# Euler in (x / alpha, s), or Heun in the same variables), and regresses f_theta(x_{t_{n+1}}, t_{n+1})
# onto the target network's f_theta-(x_hat_{t_n}, t_n) (an EMA of theta, no gradient).


def consistency_weights(schedule, t, t_min, sigma_data: float = 0.5):
  """(a, b) [B] of f = a x_t + b D (see above)."""
  s, s0 = schedule.edm_sigma(jnp.asarray(t, jnp.float32)), schedule.edm_sigma(jnp.asarray(t_min, jnp.float32))
  sd2 = sigma_data ** 2
  b = (s - s0) / s
  return sd2 / ((s - s0) ** 2 + sd2) - b * sd2 / (s * s + sd2), b


def consistency_fn(model, x_t, t, cond: Any = None, *, t_min, sigma_data: float = 0.5):
  """f(x_t, t) [B, ...]: the consistency function built from `model`'s x0 prediction (a `core.Model`)."""
  model_lib.check(model)
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x_t.shape[0],))
  a, b = consistency_weights(model.schedule, t, t_min, sigma_data)
  return _b(a, x_t) * x_t + _b(b, x_t) * model.predict(x_t, t, cond).x0


TEACHER_SOLVERS = ("ddim", "heun")


def teacher_ode_step(teacher, x_t, t, s, cond: Any = None, solver: str = "ddim"):
  """One probability-flow ODE step of `teacher` from t to s < t (both [B]), s > 0 or s = 0 for DDIM.

  In y = x / alpha and the EDM level k = sigma / alpha the ODE is dy/dk = (y - D) / k
  (Karras et al. 2022, eq. 3 with s(t) = alpha); "ddim" is its Euler step, which is DDIM exactly,
  "heun" adds the trapezoidal correction (two teacher calls). No gradient flows into the teacher."""
  if solver not in TEACHER_SOLVERS:
    raise ValueError(f"unknown teacher solver {solver!r}; allowed: {list(TEACHER_SOLVERS)}")
  sch = teacher.schedule
  x0_a = teacher.predict(x_t, t, cond).x0
  x_s = ddim_step(sch, x0_a, x_t, t, s)
  if solver == "heun":
    a_t, a_s = _b(sch.alpha(t), x_t), _b(sch.alpha(s), x_t)
    k_t, k_s = _b(sch.edm_sigma(t), x_t), _b(sch.edm_sigma(s), x_t)
    y_t, y_s = x_t / a_t, x_s / a_s
    d_a = (y_t - x0_a) / k_t
    d_b = (y_s - teacher.predict(x_s, s, cond).x0) / k_s
    x_s = a_s * (y_t + (k_s - k_t) * 0.5 * (d_a + d_b))
  return jax.lax.stop_gradient(x_s)


def karras_time(schedule, j, n, t_min: float, t_max: float, rho: float = 7.0):
  """Time j of the n times t_0 = t_min < ... < t_{n-1} = t_max uniform in s^(1/rho) (Karras et al. 2022,
  eq. 5, ascending), s = sigma / alpha: float32 of j's shape; j and n may be traced."""
  s_lo = schedule.edm_sigma(jnp.float32(t_min)) ** (1.0 / rho)
  s_hi = schedule.edm_sigma(jnp.float32(t_max)) ** (1.0 / rho)
  frac = jnp.asarray(j, jnp.float32) / jnp.maximum(jnp.asarray(n, jnp.float32) - 1.0, 1.0)
  return schedule.t_from_edm_sigma((s_lo + frac * (s_hi - s_lo)) ** rho)


CONSISTENCY_METRICS = ("l2", "pseudo_huber")


def consistency_loss(pred, target, metric: str = "l2", c: float | None = None):
  """Per-example distance [B]: "l2" mean squared error over features; "pseudo_huber"
  sqrt(||d||^2 / D + c^2) - c with d over the D features (Song & Dhariwal 2023 use c = 0.00054 sqrt(D)
  on the summed norm; on the mean it is c = 0.00054, the default)."""
  if metric not in CONSISTENCY_METRICS:
    raise ValueError(f"unknown consistency metric {metric!r}; allowed: {list(CONSISTENCY_METRICS)}")
  msq = jnp.mean(jnp.reshape((pred - target) ** 2, (pred.shape[0], -1)), axis=1)
  if metric == "l2":
    return msq
  c = 0.00054 if c is None else c
  return msq / (jnp.sqrt(msq + c * c) + c)  # = sqrt(msq + c^2) - c without its cancellation near 0
