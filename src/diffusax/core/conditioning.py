"""Image-conditioned diffusion: the condition of a cascade stage, its CFG dropout and guidance,
and noise-conditioning augmentation.

A super-resolution (or colourisation, inpainting) stage of a cascade models p(x | z) for a dense
condition z: the low-resolution image, the grayscale image, or a masked image with its mask
(Saharia et al. 2021, SR3; Ho et al. 2021, "Cascaded Diffusion Models", CDM). Its condition is a
`Cond` of named optional parts, handed by the samplers to `model.denoise(x_t, t, cond)` unchanged:

    cond = Cond(label=labels, image=z_s, aug_level=s)            # [B] int32, [B, h, w, c], [B] float32
    x = samplers.sample(model, x_T, key=k, method="ddim", num_steps=50, cond=cond)

Absent image. A part set to None is absent for the whole batch (no pytree leaf). Within a batch,
an image removed by CFG dropout is zeros AND flagged by the part `has_image` [B] float32
(1 = image given, 0 = no image): a zero image is a legitimate condition (a black low-resolution
image), so zeros alone cannot say "no image". `drop`, `uncond` and `cfg_on` always fill
`has_image` when an image is present (`complete`), so training and sampling hand the network the
same structure; a network reads `present(cond)` (ones where `has_image` is None) and feeds it as
an extra constant input channel or embedding. Dropping the image leaves `aug_level` as it was:
with has_image = 0 the network learns to ignore it, the same way at training and at sampling.

Noise-conditioning augmentation (CDM, sec. 4.3). The stage is trained on a corrupted condition
z_s ~ q(z_s | z) = N(alpha(s) z, sigma(s)^2 I), the forward process of the stage's schedule at an
augmentation time s ~ U[0, s_max] given to the network as `aug_level` (`augment`); at sampling s is
a fixed hyperparameter (`augment_at`; s = 0 returns z itself). The truncated form (CDM, sec. 4.3,
"truncated conditioning augmentation") stops the base model's reverse process at time s and feeds
its state x_s as z_s with aug_level s. The samplers' `t_min` does not do that alone: their last step
always maps the state at t_min to the clean end (E[x0 | x_{t_min}], `samplers.grid`); `sample_to`
runs the grid down to t_min = s and leaves that last step out (`truncate`).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusax.core import guidance, losses, process
from diffusax.core import model as model_lib
from diffusax.core import samplers
from diffusax.core.model import Model
from diffusax.core.samplers import driver
from diffusax.core.schedules import Discrete, Schedule

F32 = jnp.float32
PARTS = ("label", "image")  # the parts CFG can drop, in the order of their dropout draws (fold_in index)
TRUNCATED_SPACINGS = ("linspace", "log_snr", "karras")  # the grids whose last point is t_min


class Cond(NamedTuple):
  """The condition of a conditional stage; None parts are absent (no pytree leaf).

  label:     [B] int32 class labels (the null label stands for "no label").
  image:     [B, h, w, c] dense condition: low-resolution image, grayscale, masked image + mask.
  aug_level: [B] float32 augmentation time s of the image (`augment`); 0 = clean.
  has_image: [B] float32, 1 where the image is given, 0 where CFG dropped it (the image is then
             zeros); None = given everywhere (see the module docstring).
  """
  label: Any = None
  image: Any = None
  aug_level: Any = None
  has_image: Any = None


def present(cond: Cond):
  """has_image [B] float32: the part itself, or ones when it is None (needs an image)."""
  if cond.image is None:
    raise ValueError("present: the condition has no image part")
  if cond.has_image is not None:
    return jnp.asarray(cond.has_image, F32)
  return jnp.ones((jnp.shape(cond.image)[0],), F32)


def complete(cond: Cond) -> Cond:
  """`cond` with has_image filled (ones) where an image is present and the flag is None."""
  if not isinstance(cond, Cond):
    raise TypeError(f"expected a conditioning.Cond, got {type(cond).__name__}")
  return cond if cond.image is None else cond._replace(has_image=present(cond))


def _check_p(name: str, p):
  if isinstance(p, (int, float)) and not 0.0 <= p <= 1.0:
    raise ValueError(f"drop: {name} must lie in [0, 1], got {p}")


def drop(key, cond: Cond, *, label_p, image_p, null_label: Optional[int] = None) -> Cond:
  """Classifier-free-guidance dropout of each part with its own probability (training).

  Each example's label is replaced by `null_label` with probability label_p (`losses.drop_labels`),
  and, independently, its image by zeros with has_image = 0 with probability image_p. The draws of
  part j (`PARTS`) come from fold_in(key, j), so they are independent and the draws of one part do
  not depend on the other's probability. Absent parts stay absent; aug_level is unchanged.
  label_p, image_p: floats in [0, 1] (may be traced). null_label: needed when a label is present.
  """
  _check_p("label_p", label_p)
  _check_p("image_p", image_p)
  cond = complete(cond)
  if cond.label is not None:
    if null_label is None:
      raise ValueError("drop: the condition has a label; pass null_label (the 'no label' class)")
    cond = cond._replace(label=losses.drop_labels(jax.random.fold_in(key, 0), cond.label, label_p, null_label))
  if cond.image is not None:
    image = jnp.asarray(cond.image)
    gone = jax.random.bernoulli(jax.random.fold_in(key, 1), image_p, (image.shape[0],))
    cond = cond._replace(image=jnp.where(gone.reshape((-1,) + (1,) * (image.ndim - 1)), jnp.zeros_like(image), image),
                         has_image=jnp.where(gone, 0.0, cond.has_image).astype(F32))
  return cond


def _check_parts(parts: Sequence[str], fn: str) -> tuple:
  parts = (parts,) if isinstance(parts, str) else tuple(parts)
  unknown = sorted(set(parts) - set(PARTS))
  if not parts or unknown:
    raise ValueError(f"{fn}: parts must be a non-empty subset of {list(PARTS)}, got {list(parts)}")
  return parts


def uncond(cond: Cond, parts: Sequence[str] = ("label",), *, null_label: Optional[int] = None) -> Cond:
  """The condition with `parts` dropped for every example, as `drop` drops them: the label set to
  null_label; the image set to zeros with has_image = 0. The result has the structure of
  `complete(cond)`. A requested part that the condition lacks raises ValueError."""
  parts = _check_parts(parts, "uncond")
  cond = complete(cond)
  if "label" in parts:
    if cond.label is None:
      raise ValueError("uncond: cannot drop 'label': the condition has no label part")
    if null_label is None:
      raise ValueError("uncond: dropping 'label' needs null_label (the 'no label' class)")
    label = jnp.asarray(cond.label)
    cond = cond._replace(label=jnp.full_like(label, null_label))
  if "image" in parts:
    if cond.image is None:
      raise ValueError("uncond: cannot drop 'image': the condition has no image part")
    cond = cond._replace(image=jnp.zeros_like(jnp.asarray(cond.image)), has_image=jnp.zeros_like(cond.has_image))
  return cond


def cfg_on(model: Model, *, parts: Sequence[str], scale, null_label: Optional[int] = None,
           interval: Optional[tuple] = None, rescale=0.0) -> Model:
  """Classifier-free guidance on some parts of a `Cond`: a Model whose denoiser is

      pred_w = pred(x_t, cond) + w (pred(x_t, cond) - pred(x_t, uncond(cond, parts)))

  (Ho & Salimans 2022, eq. 6), from one model call on the doubled batch [cond; uncond(cond, parts)].
  parts: "label", "image" or both; scale, interval, rescale as in `guidance.cfg`.

  `guidance.cfg` broadcasts its null_cond to every leaf of the condition, so it cannot null one part
  of a Cond (it would write the null label into the image). Here the doubled condition is formed
  first and guidance.cfg gets a denoiser that uses it in place of cfg's own (dummy) condition: the
  combination, interval, rescale and learned-variance handling are guidance.cfg's.
  """
  model_lib.check(model)
  parts = _check_parts(parts, "cfg_on")
  interval = guidance.check_interval(interval, "cfg_on")
  if "label" in parts and null_label is None:
    raise ValueError("cfg_on: guidance on 'label' needs null_label (the 'no label' class)")

  def guided(x, t, cond):
    full = complete(cond)
    both = jax.tree.map(lambda c, u: jnp.concatenate([jnp.asarray(c), u], axis=0), full,
                        uncond(full, parts, null_label=null_label))
    inner = model.replace(denoise=lambda x2, t2, _: model.denoise(x2, t2, both))
    dummy = jnp.zeros((x.shape[0],), jnp.int32)
    return guidance.cfg(inner, null_cond=1, scale=scale, interval=interval, rescale=rescale).denoise(x, t, dummy)

  return model.replace(denoise=guided)


def _noised(schedule: Schedule, z, s, eps):
  """q_sample(schedule, z, s, eps), and z itself where s == 0 (s [B])."""
  z_s = process.q_sample(schedule, z, s, eps)
  return jnp.where((s == 0).reshape((-1,) + (1,) * (jnp.ndim(z) - 1)), z, z_s)


def augment(schedule: Schedule, key, z, s_max):
  """Noise-conditioning augmentation at training (CDM, sec. 4.3): (z_s, s).

  s [B] float32 ~ U[0, s_max] per example (from fold_in(key, 0)), eps ~ N(0, I) (fold_in(key, 1)),
  z_s = alpha(s) z + sigma(s) eps (`process.q_sample`), and z_s = z where s = 0. z: [B, ...].
  s_max: scalar in [0, 1] (may be traced). Pass s as Cond.aug_level.
  """
  if isinstance(s_max, (int, float)) and not 0.0 <= s_max <= 1.0:
    raise ValueError(f"augment: s_max must lie in [0, 1], got {s_max}")
  z = jnp.asarray(z)
  s = jnp.asarray(s_max, F32) * jax.random.uniform(jax.random.fold_in(key, 0), (z.shape[0],), F32)
  return augment_at(schedule, key, z, s)


def augment_at(schedule: Schedule, key, z, s):
  """(z_s, s [B] float32) at a given level s (scalar or [B]): z_s = alpha(s) z + sigma(s) eps with
  eps from fold_in(key, 1) as in `augment`; where s = 0, z_s is z exactly (no noise)."""
  z = jnp.asarray(z)
  s = jnp.asarray(s, F32)
  if s.ndim > 1 or (s.ndim == 1 and s.shape[0] != z.shape[0]):
    raise ValueError(f"augment_at: s must be a scalar or [B] with B = {z.shape[0]}, got shape {tuple(s.shape)}")
  s = jnp.broadcast_to(s, (z.shape[0],))
  eps = jax.random.normal(jax.random.fold_in(key, 1), z.shape, F32)
  return _noised(schedule, z, s, eps), s


def truncate(sampler: driver.Sampler) -> driver.Sampler:
  """The sampler without its last step: run for n steps, it returns its state at grid point t_{n-1}
  (the grid's t_min for `TRUNCATED_SPACINGS`) instead of the denoised mean there."""
  inner_step = sampler.step

  def step(state, i, last=None):
    if last is True:
      return state
    if last is False:
      return inner_step(state, i, False) if sampler.peel_last else inner_step(state, i)
    return jax.lax.cond(i >= state.n - 1, lambda st: st, lambda st: inner_step(st, i), state)

  return driver.Sampler(sampler.init, step, sampler.stochastic, peel_last=True)


def sample_to(model: Model, x_T, s, *, key, method: str, num_steps, cond: Any = None,
              options: Optional[dict] = None, clip_x0: Optional[float] = None, max_steps: Optional[int] = None):
  """x_s [B, ...]: the reverse process of `model` from t_max stopped at time s (truncated augmentation).

  num_steps steps of `method` on its grid from t_max down to t_min = s (a grid of num_steps + 1
  points whose last step, to the clean end, is left out: `truncate`). With an exact denoiser and
  enough steps x_s is distributed as q(x_s); feed it to the next stage as Cond(image=x_s,
  aug_level=s). s > 0 (may be traced); the schedule must be continuous and the spacing one of
  `TRUNCATED_SPACINGS` (their last grid point is t_min); other arguments as `samplers.sample`.
  """
  model_lib.check(model)
  options = dict(options or {})
  if "t_min" in options:
    raise ValueError("sample_to: t_min is set by s; leave it out of options")
  if isinstance(model.schedule, Discrete):
    raise ValueError("sample_to needs a continuous schedule (a Discrete grid ends on its first knot, not at s)")
  spacing = options.get("spacing", samplers.options_of(method)["spacing"])
  if spacing not in TRUNCATED_SPACINGS:
    raise ValueError(f"sample_to: spacing {spacing!r} does not end at t_min; allowed: {list(TRUNCATED_SPACINGS)}")
  if isinstance(s, (int, float)) and not 0.0 < s < 1.0:
    raise ValueError(f"sample_to: s must lie in (0, 1), got {s}")
  sampler = samplers.make(model, method=method, options={**options, "t_min": s}, cond=cond, clip_x0=clip_x0)
  return driver.run(truncate(sampler), x_T, key, num_steps + 1,
                    max_steps=None if max_steps is None else max_steps + 1)


def _shape_dtype(x):
  if not (hasattr(x, "shape") and hasattr(x, "dtype")):
    x = np.asarray(x)
  return tuple(x.shape), x.dtype


def check(cond: Cond, *, batch: int, image_shape: Optional[Sequence[int]] = None, needs_label: bool = False,
          needs_aug: bool = False) -> Cond:
  """Returns `cond` when it fits a stage, else one ValueError listing every problem and the expected shapes.

  batch: B. image_shape: (h, w, c) when the stage needs an image ([B, h, w, c]), None when it takes
  none (a present image must then still be [B, h, w, c]). needs_label: label [B] integer.
  needs_aug: aug_level [B] float. A present has_image must be [B] and come with an image.
  """
  if not isinstance(cond, Cond):
    raise TypeError(f"expected a conditioning.Cond, got {type(cond).__name__}")
  want_image = None if image_shape is None else (batch,) + tuple(int(v) for v in image_shape)
  expected = []
  if needs_label:
    expected.append(f"label [{batch}] int")
  if want_image is not None:
    expected.append(f"image {want_image}")
  if needs_aug:
    expected.append(f"aug_level [{batch}] float")
  problems = []

  def vector(name, value, needed, kind):
    if value is None:
      if needed:
        problems.append(f"{name} is missing")
      return
    shape, dtype = _shape_dtype(value)
    ok_kind = jnp.issubdtype(dtype, jnp.integer if kind == "int" else jnp.floating)
    if shape != (batch,) or not ok_kind:
      problems.append(f"{name} has shape {shape} and dtype {dtype}, expected [{batch}] {kind}")

  vector("label", cond.label, needs_label, "int")
  vector("aug_level", cond.aug_level, needs_aug, "float")
  vector("has_image", cond.has_image, False, "float")
  if cond.image is None:
    if want_image is not None:
      problems.append("image is missing")
    if cond.has_image is not None:
      problems.append("has_image is given without an image")
  else:
    shape, _ = _shape_dtype(cond.image)
    if want_image is not None and shape != want_image:
      problems.append(f"image has shape {shape}, expected {want_image}")
    elif want_image is None and (len(shape) != 4 or shape[0] != batch):
      problems.append(f"image has shape {shape}, expected [{batch}, h, w, c]")
  if problems:
    raise ValueError("condition does not fit: " + "; ".join(problems)
                     + (f" (expected {', '.join(expected)})" if expected else ""))
  return cond


__all__ = ["Cond", "PARTS", "TRUNCATED_SPACINGS", "augment", "augment_at", "cfg_on", "check", "complete", "drop",
           "present", "sample_to", "truncate", "uncond"]
