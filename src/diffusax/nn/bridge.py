"""From Flax `(module, variables)` to the callables the pure core consumes.

The core takes a `diffusax.core.Model(denoise, target, schedule, learned_variance)`:
`denoise(x_t, t, cond) -> output` is built here, and what the output means (its
target name in `diffusax.core.targets.TARGETS`, its schedule, whether it carries
variance channels) comes from the caller, who trained the network for it:

    model = core.Model(bridge.denoiser(module, {"params": params}), "eps", schedule)

  * `model(module, variables, target, schedule)` -> the `core.Model` of a trained network, with
    learned_variance from the module's own `learn_sigma` (so no caller can disagree with it).
  * `denoiser(module, variables)` -> denoise(x_t [B, ...], t scalar or [B],
    cond labels [B] or None, or {"label": labels, "w": w [B]} for a `guidance_embed` network,
    or a `core.conditioning.Cond` for an image-conditioned network: `cond_kwargs`)
    -> [B, ...] float32 (2x channels with learn_sigma; `split_variance` separates
    [prediction | var_interp]).
  * `condition(module, model, labels, scale, null_class)` -> (model, cond): how a sampler guides
    with weight `scale`: CFG against the null class, or the w input of a w-conditioned network.
  * `classifier_log_prob(module, variables)` -> log_prob(x_t, t, labels) ->
    log p(labels | x_t, t) [B], for classifier guidance (its gradient in x_t).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusax.core import conditioning

F32 = jnp.float32


def cond_kwargs(module: nn.Module, cond: conditioning.Cond) -> dict:
  """The module keyword arguments of a Cond's non-label parts; absent (None) parts are left out.

  image -> low_res [B, h, w, c] (the network resizes it to its resolution); aug_level -> aug_level [B];
  has_image -> has_image [B] only for a network with `cond_dropout` (`conditioning.present`: ones when
  None); any other network ignores the flag (a dropped image is zeros either way).
  """
  if cond.image is None and cond.has_image is not None:
    raise ValueError("the Cond has has_image but no image part")
  kwargs = {}
  if cond.image is not None:
    kwargs["low_res"] = cond.image
    if getattr(module, "cond_dropout", False):
      kwargs["has_image"] = conditioning.present(cond)
  if cond.aug_level is not None:
    kwargs["aug_level"] = cond.aug_level
  return kwargs


def denoiser(module: nn.Module, variables, *, train: bool = False, rngs=None) -> Callable:
  """denoise(x_t, t, cond) = module.apply(variables, x_t, t, cond, train=train).

  `variables` is the full dict ({"params": ...}), boxed or unboxed; `rngs`
  (e.g. {"dropout": key}) only matters with train=True. A `conditioning.Cond` is applied as
  module.apply(variables, x_t, t, cond.label, train=train, **cond_kwargs(module, cond)).
  """
  if train and rngs is None and getattr(module, "dropout", 0.0):
    raise ValueError("denoiser(train=True) with dropout needs rngs={'dropout': key}")

  def denoise(x_t, t, cond=None):
    t = jnp.broadcast_to(jnp.asarray(t, F32), (x_t.shape[0],))
    if isinstance(cond, conditioning.Cond):
      return module.apply(variables, x_t, t, cond.label, train=train, rngs=rngs, **cond_kwargs(module, cond))
    if isinstance(cond, dict):  # Named parts: {"label": y, "w": guidance weight} (a w-conditioned student).
      extra = {k: v for k, v in cond.items() if k != "label"}
      return module.apply(variables, x_t, t, cond.get("label"), train=train, rngs=rngs, **extra)
    return module.apply(variables, x_t, t, cond, train=train, rngs=rngs)

  return denoise


SCHEDULE_PARAMS = "schedule"  # params[SCHEDULE_PARAMS]: the trained fields of a learned schedule


def bind_schedule(schedule, params):
  """The schedule of a model with these params: a learned schedule (`core.schedules.Learned`) takes
  its trained fields from params["schedule"] (the net; gamma_0 and gamma_1 when they are trained too);
  any other schedule is returned as it is. The networks ignore that entry of their params."""
  from diffusax.core import schedules
  if not isinstance(schedule, schedules.Learned):
    return schedule
  if SCHEDULE_PARAMS not in params:
    raise ValueError(f"a learned schedule needs its parameters in params[{SCHEDULE_PARAMS!r}]; "
                     f"the params have {sorted(params)}")
  return dataclasses.replace(schedule, **params[SCHEDULE_PARAMS])


def model(module: nn.Module, variables, target: str, schedule):
  """core.Model(denoiser(module, variables), target, schedule, learned_variance=module.learn_sigma),
  a learned schedule bound to variables["params"] (`bind_schedule`)."""
  from diffusax.core import Model
  schedule = bind_schedule(schedule, variables["params"])
  return Model(denoiser(module, variables), target, schedule,
               learned_variance=bool(getattr(module, "learn_sigma", False)))


def condition(module, model, labels, scale, null_class, interval=None):
  """(model, cond) for sampling with guidance weight `scale` (scalar or [B]): a `guidance_embed` network
  takes w = scale as its input (one call per step, no CFG); otherwise CFG against `null_class` when
  conditional, else the model unguided."""
  from diffusax.core import guidance
  if getattr(module, "guidance_embed", False):
    b = jnp.shape(labels)[0] if labels is not None else None
    w = jnp.asarray(scale, F32) if b is None else jnp.broadcast_to(jnp.asarray(scale, F32), (b,))
    return model, {"label": labels, "w": w}
  if null_class is not None:
    return guidance.cfg(model, null_cond=null_class, scale=scale, interval=interval), labels
  return model, labels


def split_variance(output):
  """[..., 2C] -> (prediction [..., C], var_interp [..., C]) for learn_sigma networks."""
  if output.shape[-1] % 2:
    raise ValueError(f"learned-variance output needs an even channel count; got {output.shape[-1]}")
  return jnp.split(output, 2, axis=-1)


def classifier_log_prob(module: nn.Module, variables) -> Callable:
  """log_prob(x_t, t, labels) = log softmax(module(x_t, t))[labels]: [B] float32."""

  def log_prob(x_t, t, labels):
    t = jnp.broadcast_to(jnp.asarray(t, F32), (x_t.shape[0],))
    logits = module.apply(variables, x_t, t, train=False)
    logp = jax.nn.log_softmax(logits.astype(F32), axis=-1)
    return jnp.take_along_axis(logp, jnp.asarray(labels, jnp.int32)[:, None], axis=-1)[:, 0]

  return log_prob
