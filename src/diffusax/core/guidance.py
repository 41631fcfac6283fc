"""Guidance as model wrappers: classifier-free, autoguidance, classifier guidance.

Each takes a `core.Model` and returns a `core.Model` of the same target and
schedule, whose denoiser is guided, so any sampler runs guided without knowing it:

    guided = guidance.cfg(model, null_cond=10, scale=2.0)
    auto = guidance.autoguidance(model, small_model, scale=1.5, interval=(0.1, 0.9))
    x0 = samplers.sample(guided, x_T, key=k, method="ddim", num_steps=50, cond=labels)

Classifier-free guidance (Ho & Salimans 2022, eq. 6 with w their w):

    pred_w = pred(x_t, c) + w (pred(x_t, c) - pred(x_t, null))

formed in the model's own target space. At fixed (x_t, t) every target is an
affine function of any other with the prediction's coefficient independent of
the prediction (`targets`), and the weights (1 + w, -w) sum to one, so this is
the same guided eps, x0, v, score or flow: the space does not matter. w = 0 is
the conditional model; w is a traced array (scalar or [B]). Guided score:
grad log p(x_t | c) + w grad log p(c | x_t), i.e. sampling a sharpened p(c|x)^(1+w) p(x).

  * rescale=phi: std rescaling (Lin et al. 2024, eq. 15-16), done in x0 space as in
    their Algorithm 2: x0_r = x0_w std(x0_c) / std(x0_w), x0 <- phi x0_r + (1 - phi) x0_w,
    std over all non-batch dimensions.
  * the conditional and null calls are one model call on the concatenated
    [x; x], [t; t], [cond; null] batch of 2B.

Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version
of itself", eq. 1): the unconditional call of CFG is replaced by a weaker model
of the same task (smaller, or trained for less time), given the same condition:

    pred_w = D_main + w (D_main - D_guide) = D_guide + (1 + w) (D_main - D_guide),

with the scale in the CFG convention above (w = 0 is the main model), so a
`sample.guidance_scale` means the same for both wrappers; the paper's weight is
1 + w. Both models share the schedule; their targets may differ: the guide's
prediction is converted to the main model's target at (x_t, t) through
(x0, eps), an affine map, so the formula holds in every target space.

Guidance interval (Kynkaanniemi et al. 2024, "Applying guidance in a limited
interval improves sample and distribution quality in diffusion models"), for
`cfg` and `autoguidance`: interval=(t_lo, t_hi) keeps w for t_lo <= t <= t_hi
(t the schedule's continuous time, 0 <= t_lo <= t_hi <= 1; the paper states
its interval in EDM sigma, `Schedule.t_from_edm_sigma` converts) and sets w = 0,
the unguided model, elsewhere.

With learned variance only the first C channels are guided; the variance
channels come from the conditional (CFG) or main (autoguidance) model.

Classifier guidance (Dhariwal & Nichol 2021, Algorithm 2; Song et al. 2021, eq. 14):

    eps_s = eps_hat - s sigma(t) grad_x log p(c | x_t, t)
    <=> score_s = score_hat + s grad_x log p(c | x_t, t),

converted back to the model's target. With the exact classifier and s = 1 the
guided score is exactly grad log p(x_t | c).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusax.core import model as model_lib
from diffusax.core import targets as targets_lib
from diffusax.core.model import Model

F32 = jnp.float32


def _per_example(w, x):
  w = jnp.asarray(w, F32)
  return w.reshape(w.shape + (1,) * (x.ndim - w.ndim)) if w.ndim == 1 else w


def _std(x):
  flat = x.reshape(x.shape[0], -1)
  return jnp.std(flat, axis=1).reshape((-1,) + (1,) * (x.ndim - 1))


def check_interval(interval, fn: str = "guidance") -> Optional[tuple]:
  """None, or (t_lo, t_hi) with 0 <= t_lo <= t_hi <= 1 (checked where the values are concrete).

  Raises a ValueError naming `fn` and what was given otherwise.
  """
  if interval is None:
    return None
  try:
    lo, hi = interval
  except (TypeError, ValueError):
    raise ValueError(f"{fn}: interval must be None or a pair (t_lo, t_hi), got {interval!r}") from None
  if not any(isinstance(v, jax.core.Tracer) for v in (lo, hi)):
    try:
      flo, fhi = float(lo), float(hi)
    except (TypeError, ValueError):
      raise ValueError(f"{fn}: interval must be a pair of numbers (t_lo, t_hi), got {interval!r}") from None
    if not 0.0 <= flo <= fhi <= 1.0:
      raise ValueError(f"{fn}: interval (t_lo, t_hi) needs 0 <= t_lo <= t_hi <= 1, got {interval!r}")
  return lo, hi


def scale_at(scale, t, interval: Optional[tuple]):
  """The guidance weight per example, float32 [B] for t [B]: `scale` (scalar or [B]) broadcast,
  and 0 where t lies outside interval = (t_lo, t_hi) (Kynkaanniemi et al. 2024); None keeps it everywhere."""
  w = jnp.broadcast_to(jnp.asarray(scale, F32), t.shape)
  if interval is None:
    return w
  lo, hi = interval
  return jnp.where((t >= lo) & (t <= hi), w, 0.0)


def _describe(schedule) -> str:
  """A short name for a schedule in messages: scalar fields by value, arrays by shape."""
  parts = []
  for f in dataclasses.fields(schedule):
    v = getattr(schedule, f.name)
    if isinstance(v, jax.core.Tracer):
      parts.append(f"{f.name}=<traced>")
    elif np.size(v) == 1:
      parts.append(f"{f.name}={float(np.asarray(v)):g}")
    else:
      parts.append(f"{f.name}=<array {tuple(np.shape(v))}>")
  return f"{type(schedule).__name__}({', '.join(parts)})"


def _check_same_schedule(main, guide):
  """The guide must use the main model's schedule: same type, same leaf shapes, equal concrete values
  (a traced leaf, e.g. a schedule passed through jit, is not compared)."""
  sm, sg = main.schedule, guide.schedule
  if type(sm) is not type(sg):
    raise TypeError(f"autoguidance: the main and guiding models must share the schedule; "
                    f"main has {type(sm).__name__}, guide has {type(sg).__name__}")
  differ = []
  for f in dataclasses.fields(sm):
    a, b = getattr(sm, f.name), getattr(sg, f.name)
    if jnp.shape(a) != jnp.shape(b) or not (isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer)
                                            or np.array_equal(np.asarray(a), np.asarray(b))):
      differ.append(f.name)
  if differ:
    raise ValueError(f"autoguidance: the main and guiding models must share the schedule; main has "
                     f"{_describe(sm)}, guide has {_describe(sg)} (they differ in {', '.join(differ)})")


def cfg(model: Model, *, null_cond, scale, interval: Optional[tuple] = None, rescale=0.0) -> Model:
  """Classifier-free guidance (see module docstring): a Model whose denoiser is guided.

  Args:
    model: the conditional model; its denoiser gets cond, then null_cond, in one batched call.
    null_cond: the "no condition" value (e.g. the label num_classes); broadcast to
      each leaf of cond (a pytree) along the batch.
    scale: guidance weight w, scalar or [B], may be traced.
    interval: optional (t_lo, t_hi), 0 <= t_lo <= t_hi <= 1; guidance is on only for
      t_lo <= t <= t_hi (`scale_at`), else the conditional model.
    rescale: phi in [0, 1] (may be traced); a Python 0 skips the computation.
  With learned variance only the first C channels are guided; the variance
  channels are taken from the conditional call.
  """
  model_lib.check(model)
  interval = check_interval(interval, "cfg")
  use_rescale = not (isinstance(rescale, (int, float)) and rescale == 0)
  target, schedule, denoise = model.target, model.schedule, model.denoise

  def guided(x, t, cond):
    b = x.shape[0]
    null = jax.tree.map(lambda c, n: jnp.broadcast_to(jnp.asarray(n, jnp.asarray(c).dtype), jnp.shape(c)),
                        cond, jax.tree.map(lambda _: null_cond, cond))
    both = jax.tree.map(lambda c, n: jnp.concatenate([jnp.asarray(c), n], axis=0), cond, null)
    out = denoise(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both)
    out_c, out_u = out[:b], out[b:]
    var = None
    if model.learned_variance:
      c = out.shape[-1] // 2
      out_c, var, out_u = out_c[..., :c], out_c[..., c:], out_u[..., :c]
    w = _per_example(scale_at(scale, t, interval), out_c)
    pred = out_c.astype(F32) + w * (out_c.astype(F32) - out_u.astype(F32))
    if use_rescale:
      phi = jnp.asarray(rescale, F32)
      if target == "x0":
        x0_c, x0_w = out_c.astype(F32), pred
      else:
        co = targets_lib.coefficients(schedule, t)
        x0_c = targets_lib.to_x0_eps(target, out_c, x, *co)[0]
        x0_w = targets_lib.to_x0_eps(target, pred, x, *co)[0]
      x0_r = x0_w * _std(x0_c) / jnp.maximum(_std(x0_w), 1e-12)
      x0 = phi * x0_r + (1.0 - phi) * x0_w
      if target == "x0":
        pred = x0
      else:
        a, s = _per_example(co[0], x), _per_example(co[1], x)
        pred = targets_lib.from_x0_eps(target, x0, (x - a * x0) / s, *co)
    pred = pred.astype(out.dtype)
    return pred if var is None else jnp.concatenate([pred, var.astype(out.dtype)], axis=-1)

  return model.replace(denoise=guided)


def autoguidance(model: Model, guide: Model, *, scale, interval: Optional[tuple] = None) -> Model:
  """Autoguidance (Karras et al. 2024, eq. 1; see module docstring): a Model whose denoiser is

      pred_w = D_main + w (D_main - D_guide) = D_guide + (1 + w) (D_main - D_guide)

  in the main model's target space. The scale follows the CFG convention of `cfg`
  (w = 0 is the main model; the paper's guidance weight is 1 + w).

  Args:
    model: the main model; its target, schedule and learned-variance flag are the result's.
    guide: the guiding model (smaller or less trained) with the same schedule: same type
      and, where the schedules' leaves are concrete, equal values (else TypeError /
      ValueError naming both). Its target may differ: its prediction is converted to
      the main model's target at (x_t, t). Both get the same cond.
    scale: w, scalar or [B], may be traced (changing it does not recompile).
    interval: optional (t_lo, t_hi), 0 <= t_lo <= t_hi <= 1; guidance is on only for
      t_lo <= t <= t_hi (`scale_at`), else the main model.
  With learned variance on the main model only its first C channels are guided and
  its variance channels are kept; of a guide with learned variance only the first C
  channels are used.
  """
  model_lib.check(model)
  model_lib.check(guide)
  _check_same_schedule(model, guide)
  interval = check_interval(interval, "autoguidance")
  target, schedule = model.target, model.schedule

  def guided(x, t, cond):
    out = jnp.asarray(model.denoise(x, t, cond))
    out_m, var = model.split(out, x)
    out_g, _ = guide.split(jnp.asarray(guide.denoise(x, t, cond)), x)
    out_m, out_g = out_m.astype(F32), out_g.astype(F32)
    if guide.target != target:
      out_g = targets_lib.convert(guide.target, target, out_g, x, *targets_lib.coefficients(schedule, t))
    w = _per_example(scale_at(scale, t, interval), out_m)
    # Where w = 0 the main output exactly, even where the guide's converted output is not finite.
    pred = jnp.where(w != 0, out_m + w * (out_m - out_g), out_m).astype(out.dtype)
    return pred if var is None else jnp.concatenate([pred, var.astype(out.dtype)], axis=-1)

  return model.replace(denoise=guided)


def classifier_guidance(model: Model, log_prob_fn: Callable, *, scale) -> Model:
  """Classifier guidance: a Model whose prediction follows the guided score (see module docstring).

  Args:
    model: receives cond unchanged.
    log_prob_fn: (x_t [B, ...], t [B], labels) -> [B] log p(labels | x_t, t),
      differentiable in x_t; labels is the sampler's cond.
    scale: s, scalar or [B], may be traced.
  """
  model_lib.check(model)
  target, schedule, denoise = model.target, model.schedule, model.denoise

  def guided(x, t, cond):
    raw = denoise(x, t, cond)
    out, var = model.split(jnp.asarray(raw), x)
    grad = jax.grad(lambda y: jnp.sum(log_prob_fn(y, t, cond)))(x.astype(F32))
    co = targets_lib.coefficients(schedule, t)
    x0, eps = targets_lib.to_x0_eps(target, out, x, *co)
    a = _per_example(co[0], x)
    s = _per_example(co[1], x)
    shift = _per_example(jnp.broadcast_to(jnp.asarray(scale, F32), (x.shape[0],)), x) * grad
    eps = eps - s * shift
    x0 = x0 + (s * s / a) * shift
    pred = targets_lib.from_x0_eps(target, x0, eps, *co).astype(raw.dtype)
    return pred if var is None else jnp.concatenate([pred, var.astype(raw.dtype)], axis=-1)

  return model.replace(denoise=guided)
