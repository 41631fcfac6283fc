"""Classifier-free and classifier guidance as model wrappers.

Both take a `core.Model` and return a `core.Model` of the same target and
schedule, whose denoiser is guided, so any sampler runs guided without knowing it:

    guided = guidance.cfg(model, null_cond=10, scale=2.0)
    x0 = samplers.sample(guided, x_T, key=k, method="ddim", num_steps=50, cond=labels)

Classifier-free guidance (Ho & Salimans 2022, eq. 6 with w their w):

    pred_w = pred(x_t, c) + w (pred(x_t, c) - pred(x_t, null))

formed in the model's own target space. At fixed (x_t, t) every target is an
affine function of any other with the prediction's coefficient independent of
the prediction (`targets`), and the weights (1 + w, -w) sum to one, so this is
the same guided eps, x0, v, score or flow: the space does not matter. w = 0 is
the conditional model; w is a traced array (scalar or [B]). Guided score:
grad log p(x_t | c) + w grad log p(c | x_t), i.e. sampling a sharpened p(c|x)^(1+w) p(x).

  * interval=(t_lo, t_hi): guidance only for t in [t_lo, t_hi], else w = 0
    (Kynkaanniemi et al. 2024).
  * rescale=phi: std rescaling (Lin et al. 2024, eq. 15-16), done in x0 space as in
    their Algorithm 2: x0_r = x0_w std(x0_c) / std(x0_w), x0 <- phi x0_r + (1 - phi) x0_w,
    std over all non-batch dimensions.
  * the conditional and null calls are one model call on the concatenated
    [x; x], [t; t], [cond; null] batch of 2B.

Classifier guidance (Dhariwal & Nichol 2021, Algorithm 2; Song et al. 2021, eq. 14):

    eps_s = eps_hat - s sigma(t) grad_x log p(c | x_t, t)
    <=> score_s = score_hat + s grad_x log p(c | x_t, t),

converted back to the model's target. With the exact classifier and s = 1 the
guided score is exactly grad log p(x_t | c).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

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


def cfg(model: Model, *, null_cond, scale, interval: Optional[tuple] = None, rescale=0.0) -> Model:
  """Classifier-free guidance (see module docstring): a Model whose denoiser is guided.

  Args:
    model: the conditional model; its denoiser gets cond, then null_cond, in one batched call.
    null_cond: the "no condition" value (e.g. the label num_classes); broadcast to
      each leaf of cond (a pytree) along the batch.
    scale: guidance weight w, scalar or [B], may be traced.
    interval: optional (t_lo, t_hi); guidance is on only for t_lo <= t <= t_hi.
    rescale: phi in [0, 1] (may be traced); a Python 0 skips the computation.
  With learned variance only the first C channels are guided; the variance
  channels are taken from the conditional call.
  """
  model_lib.check(model)
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
    w = jnp.broadcast_to(jnp.asarray(scale, F32), (b,))
    if interval is not None:
      lo, hi = interval
      w = jnp.where((t >= lo) & (t <= hi), w, 0.0)
    w = _per_example(w, out_c)
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
