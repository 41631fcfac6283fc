"""The pure train step: `train_step(state, batch) -> (state, metrics)`.

At step k every draw comes from key = fold_in(base_key, k), split four ways
(time, noise, label dropout, network dropout), over the *global* batch, so the
result does not depend on how the batch is sharded or how many processes feed
it. The loss is `core.losses.diffusion_loss` averaged over the batch.

With `axis_name` (the pmap strategy) each device holds b = B / n rows and a
replica of the state: the draws are still made for the global batch of B rows
and device i takes rows [i b, (i + 1) b), and the gradients are averaged with
`pmean`, so the update equals the mesh strategy's up to float reduction order.
(Dropout masks inside the network are drawn per device, so with network
dropout > 0 the two strategies differ in which units are dropped.)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from diffusax.core import losses, process
from diffusax.core import targets as targets_lib
from diffusax.training import state as state_lib
from diffusax.training.state import TrainState


@dataclasses.dataclass(frozen=True)
class LossConfig:
  target: str = "eps"                 # what the network predicts: one of core.targets.TARGETS
  weighting: str = "uniform"          # core.losses.WEIGHTINGS
  weighting_params: tuple = ()        # e.g. (("gamma", 5.0),) for min_snr
  time_sampler: str = "uniform"       # core.losses.TIME_SAMPLERS
  t_min: float = 1e-5                 # lower end of continuous t
  label_dropout: float = 0.0          # p of replacing the label by the null class (CFG)
  null_class: int | None = None       # = num_classes for a class-conditional model, else None

  def __post_init__(self):
    targets_lib.check_target(self.target)
    losses.check_weighting(self.weighting)
    if self.time_sampler not in losses.TIME_SAMPLERS:
      raise ValueError(f"unknown time sampler {self.time_sampler!r}; allowed: {sorted(losses.TIME_SAMPLERS)}")
    if not 0.0 <= self.label_dropout <= 1.0:
      raise ValueError(f"label_dropout must lie in [0, 1], got {self.label_dropout}")
    if not 0.0 <= self.t_min < 1.0:
      raise ValueError(f"t_min must lie in [0, 1), got {self.t_min}")


def step_keys(state: TrainState):
  """(k_time, k_noise, k_label, k_dropout) for this state's step."""
  key = jax.random.fold_in(state_lib.base_key(state), state.step)
  return tuple(jax.random.split(key, 4))


def make_train_step(apply_fn: Callable, tx: optax.GradientTransformation, lr_fn: Callable,
                    schedule, loss: LossConfig, ema_decays, ema_warmup: bool = True,
                    axis_name: str | None = None, axis_size: int = 1):
  """Builds the (unjitted) train step. `apply_fn(variables, x, t, y, train, rngs)` is a Flax apply.

  `axis_name`/`axis_size`: run under `pmap` over that axis of `axis_size` devices (see module doc).
  """
  ema_decays = tuple(float(d) for d in ema_decays)
  wparams = dict(loss.weighting_params)
  num_discrete = getattr(schedule, "num_steps", None)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict[str, Any]]:
    x = batch["x"]
    b = x.shape[0]
    n = axis_size if axis_name else 1
    k_t, k_eps, k_label, k_drop = step_keys(state)
    t = losses.sample_t(k_t, b * n, loss.time_sampler, schedule=schedule, num_steps=num_discrete,
                        t_min=loss.t_min)
    eps = jax.random.normal(k_eps, (b * n,) + x.shape[1:], jnp.float32)
    y = None
    if loss.null_class is not None:
      labels = batch["label"]
      if axis_name:
        labels = jax.lax.all_gather(labels, axis_name, tiled=True)
      y = losses.drop_labels(k_label, labels, loss.label_dropout, loss.null_class)
    if axis_name:  # This device's rows of the global draws.
      start = jax.lax.axis_index(axis_name) * b
      t, eps = (jax.lax.dynamic_slice_in_dim(v, start, b) for v in (t, eps))
      y = None if y is None else jax.lax.dynamic_slice_in_dim(y, start, b)
    x_t = process.q_sample(schedule, x, t, eps)

    def loss_fn(params):
      pred = apply_fn({"params": params}, x_t, t, y, train=True, rngs={"dropout": k_drop})
      per_example = losses.diffusion_loss(schedule, pred, loss.target, x, eps, t,
                                          weighting=loss.weighting, **wparams)
      return jnp.mean(per_example)

    value, grads = jax.value_and_grad(loss_fn)(state.params)
    if axis_name:
      value, grads = jax.lax.pmean((value, grads), axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state_lib.update_ema(state.ema_params, params, ema_decays, state.step, ema_warmup)
    metrics = {"loss": value, "grad_norm": optax.tree.norm(grads), "lr": lr_fn(state.step)}
    new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
    return new, metrics

  return train_step


def make_eval_loss(apply_fn: Callable, schedule, loss: LossConfig):
  """(params, batch, key) -> mean loss with fixed draws from `key`, no dropout, labels kept."""
  wparams = dict(loss.weighting_params)
  num_discrete = getattr(schedule, "num_steps", None)

  def eval_loss(params, batch, key):
    x = batch["x"]
    k_t, k_eps = jax.random.split(key)
    t = losses.sample_t(k_t, x.shape[0], loss.time_sampler, schedule=schedule, num_steps=num_discrete,
                        t_min=loss.t_min)
    eps = jax.random.normal(k_eps, x.shape, jnp.float32)
    x_t = process.q_sample(schedule, x, t, eps)
    y = batch["label"] if loss.null_class is not None else None
    pred = apply_fn({"params": params}, x_t, t, y, train=False)
    return jnp.mean(losses.diffusion_loss(schedule, pred, loss.target, x, eps, t,
                                          weighting=loss.weighting, **wparams))

  return eval_loss
