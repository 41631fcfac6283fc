"""The pure distillation steps: `step(state, teacher_params, batch, n, round_start) -> (state, metrics)`.

The student's `TrainState` is the one of diffusion training (params, EMAs,
optimizer, RNG); the teacher's parameters are an argument (never donated,
never in the student's checkpoint: the program reloads them from the round's
teacher checkpoint). `n` is the student's step count of the round and
`round_start` the global step the round began at, both traced int32 scalars,
so every round reuses one compiled step. EMAs warm up from the round's start.

At global step k every draw comes from fold_in(base_key, k), split four ways
(time, noise, label dropout, guidance weight), over the global batch:

  * progressive (Salimans & Ho 2022, Algorithm 2): i ~ U{1..n}, t = t_max i / n, the student's
    x0 prediction at z_t regressed onto `core.distill.progressive_target` (two teacher DDIM
    steps of t_max / (2n)), weighted by max(SNR, 1).
  * guided (Meng et al. 2023, stage one): w ~ U[w_range], t ~ U[t_min, t_max]; the w-conditioned
    student's x0 at z_t (cond {"label": y, "w": w}) regressed onto the CFG-guided teacher's
    x0 = x0_c + w (x0_c - x0_u), weighted by max(SNR, 1). With `w_range` a progressive step
    conditions teacher and student on the same w (stage two: progressive distillation of that student).
  * consistency (Song et al. 2023, Algorithm 2): j ~ U{0..n-2} on the Karras grid
    t_0 = t_min < ... < t_{n-1} = t_max of n levels; f_student(z_{t_{j+1}}, t_{j+1}) regressed onto
    f_target(x_hat_{t_j}, t_j), x_hat_{t_j} one teacher ODE step from z_{t_{j+1}}, with f_target
    the student's last EMA (ema_params[-1], decay `target_decay`, not warmed up).

Labels are dropped to the null class with `label_dropout` (the program passes the teacher's CFG
probability, so a student of a conditional teacher keeps its unconditional branch; 0 for guided).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from diffusax.core import distill, guidance, losses, process
from diffusax.nn import bridge
from diffusax.training import state as state_lib
from diffusax.training.state import TrainState

KINDS = ("progressive", "guided", "consistency")


def make_distill_step(kind: str, student: Callable, teacher: Callable, tx: optax.GradientTransformation,
                      lr_fn: Callable, *, label_dropout: float, null_class: int | None,
                      ema_decays, t_max: float, t_min: float, teacher_solver: str = "ddim",
                      metric: str = "l2", sigma_data: float = 0.5, target_decay: float = 0.95,
                      w_range: tuple | None = None):
  """Builds the (unjitted) step of `kind` (see module doc).

  `student(params)` and `teacher(teacher_params)` return the `core.Model` of those parameters
  (`flax_models` for Linen networks; any denoiser, e.g. an exact one, can be the teacher); the
  student's schedule is the one its times are drawn on. With kind "consistency" the state holds
  len(ema_decays) + 1 EMAs, the last one the target network (decay target_decay); `t_min` is the
  consistency boundary and the grid's lower end.
  """
  if kind not in KINDS:
    raise ValueError(f"unknown distillation kind {kind!r}; allowed: {list(KINDS)}")
  ema_decays = tuple(float(d) for d in ema_decays)
  consistency = kind == "consistency"
  if kind == "guided" and (w_range is None or null_class is None):
    raise ValueError("guided distillation needs w_range and a class-conditional (CFG-trained) teacher")
  if consistency and w_range is not None:
    raise ValueError("consistency distillation takes no guidance weight (w_range=None)")

  def step(state: TrainState, teacher_params, batch: dict, n, round_start):
    x = batch["x"]
    b = x.shape[0]
    key = jax.random.fold_in(state_lib.base_key(state), state.step)
    k_t, k_eps, k_label, k_w = jax.random.split(key, 4)
    eps = jax.random.normal(k_eps, x.shape, jnp.float32)
    y = None
    if null_class is not None:
      y = losses.drop_labels(k_label, batch["label"], label_dropout, null_class)
    schedule = student(state.params).schedule
    teacher_model = teacher(teacher_params)
    nf = jnp.asarray(n, jnp.float32)
    cond = y
    if w_range is not None:
      w = jax.random.uniform(k_w, (b,), jnp.float32, w_range[0], w_range[1])
      cond = {"label": y, "w": w}
    if kind == "guided":
      t = jax.random.uniform(k_t, (b,), jnp.float32, t_min, t_max)
      z = process.q_sample(schedule, x, t, eps)
      guided = guidance.cfg(teacher_model, null_cond=null_class, scale=w)
      tgt = jax.lax.stop_gradient(guided.predict(z, t, y).x0)

      def loss_fn(p):
        x0 = student(p).predict(z, t, cond).x0
        return jnp.mean(distill.progressive_loss(schedule, x0, tgt, t))
    elif consistency:
      j = jax.random.randint(k_t, (b,), 0, n - 1)
      t_of = lambda idx: distill.karras_time(schedule, idx, n, t_min, t_max)
      t_next, t_cur = t_of(j + 1), t_of(j)
      z = process.q_sample(schedule, x, t_next, eps)
      x_cur = distill.teacher_ode_step(teacher_model, z, t_next, t_cur, y, teacher_solver)
      tgt = jax.lax.stop_gradient(distill.consistency_fn(student(state.ema_params[-1]), x_cur, t_cur, y,
                                                         t_min=t_min, sigma_data=sigma_data))

      def loss_fn(p):
        pred = distill.consistency_fn(student(p), z, t_next, y, t_min=t_min, sigma_data=sigma_data)
        return jnp.mean(distill.consistency_loss(pred, tgt, metric))
      t = t_next
    else:
      i = jax.random.randint(k_t, (b,), 1, n + 1)
      t = t_max * i.astype(jnp.float32) / nf
      dt = jnp.full((b,), t_max, jnp.float32) / nf
      z = process.q_sample(schedule, x, t, eps)
      tgt = distill.progressive_target(teacher_model, z, t, dt, cond)

      def loss_fn(p):
        x0 = student(p).predict(z, t, cond).x0
        return jnp.mean(distill.progressive_loss(schedule, x0, tgt, t))

    value, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    local = state.step - round_start
    emas = state.ema_params
    if consistency:
      classic = state_lib.update_ema(emas[:-1], params, ema_decays, local, True)
      target_net = state_lib.update_ema(emas[-1:], params, (target_decay,), local, False)
      emas = tuple(classic) + tuple(target_net)
    else:
      emas = state_lib.update_ema(emas, params, ema_decays, local, True)
    metrics = {"loss": value, "grad_norm": optax.tree.norm(grads), "lr": lr_fn(local), "t_mean": jnp.mean(t)}
    return state.replace(step=state.step + 1, params=params, ema_params=emas, opt_state=opt_state), metrics

  return step


def flax_models(module, target: str, schedule) -> Callable:
  """params -> the `core.Model` of a Linen network trained for `target` on `schedule`."""
  return lambda params: bridge.model(module, {"params": params}, target, schedule)
