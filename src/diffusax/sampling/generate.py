"""Generating samples from a trained network: one jitted function per sampler setting.

Sample i of a request starts from x_T = prior_std * N(0, I) drawn with
fold_in(key, i), so its starting point depends on its index and the key alone.
The sampler's own draws (stochastic methods) come from one key for the whole
batch, so with a stochastic method a sample does depend on the batch it was
generated in; `sampling.job` keys each sample by its index when that matters.
Guidance scale is a traced argument: changing it does not recompile.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusax import storage
from diffusax.core import samplers


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  method: str
  num_steps: int
  eta: float = 0.0
  clip_x0: float = 0.0  # > 0: clip x0_hat to [-clip_x0, clip_x0] at every step (0: off)
  spacing: str = ""     # grid spacing ("" = the method's default)
  order: int = 0        # UniPC's order (0 = its default)


def sampler_options(method: str, eta: float = 0.0, spacing: str = "", order: int = 0) -> dict:
  """The method options given by a sampler setting: eta where the method has it, spacing and order when set."""
  allowed = samplers.options_of(method)
  options = {"eta": eta} if "eta" in allowed else {}
  if spacing:
    options["spacing"] = spacing
  if order:
    options["order"] = order
  return options


def initial_noise(key, indices, shape, prior_std):
  """x_T for the given global sample indices: [len(indices), *shape] float32."""
  draw = lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
  return prior_std * jax.vmap(draw)(jnp.asarray(indices, jnp.uint32))


def make_generate(module, schedule, target: str, spec: SamplerSpec, *, null_class: int | None,
                  sample_shape: tuple, max_steps: int | None = None) -> Callable:
  """Returns jitted gen(params, indices [N], labels [N] | None, scale, key, n=None) -> samples [N, *shape]
  float32. With `max_steps`, n (a traced int32 <= max_steps) replaces spec.num_steps, so every step count
  shares one compile."""
  from diffusax.nn import bridge  # The only place this layer touches Flax.

  options = sampler_options(spec.method, spec.eta, spec.spacing, spec.order)

  def gen(params, indices, labels, scale, key, n=None):
    model, cond = bridge.condition(module, bridge.model(module, {"params": params}, target, schedule), labels,
                                   scale, null_class)
    x_T = initial_noise(jax.random.fold_in(key, 0), indices, sample_shape, model.schedule.prior_std)
    return samplers.sample(model, x_T, key=jax.random.fold_in(key, 1), method=spec.method,
                           num_steps=spec.num_steps if n is None else n, max_steps=max_steps, cond=cond,
                           options=options, clip_x0=spec.clip_x0 or None)

  return jax.jit(gen)


def condition(module, schedule, indices, labels, image, aug_level, key):
  """The `core.conditioning.Cond` of a conditional task's samples: the clean condition image [N, h, w, c]
  at q(z_s | z) with s = aug_level for a network trained with augmentation (noise from
  fold_in(key, index), so a sample's condition depends on its index alone; s = 0 leaves it clean),
  the labels when class-conditional."""
  from diffusax.core import conditioning, process
  image = jnp.asarray(image, jnp.float32)
  s = None
  if getattr(module, "aug_embed", False):
    s = jnp.full((image.shape[0],), aug_level, jnp.float32)
    eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), image.shape[1:], jnp.float32))(
        jnp.asarray(indices, jnp.uint32))
    image = jnp.where((s > 0)[:, None, None, None], process.q_sample(schedule, image, s, eps), image)
  return conditioning.complete(conditioning.Cond(label=labels, image=image, aug_level=s))


def guided_parts(module, labels, guide_on) -> tuple:
  """The parts of a conditional task's Cond that CFG guides on: 'label' when there are labels, 'image' when
  the network was trained with image dropout (`cond_dropout`), as far as `guide_on` names them."""
  have = {"label": labels is not None, "image": bool(getattr(module, "cond_dropout", False))}
  return tuple(p for p in guide_on if have.get(p))


def make_generate_conditional(module, schedule, target: str, spec: SamplerSpec, *, null_class: int | None,
                              sample_shape: tuple, guide_on=("label",)) -> Callable:
  """Returns jitted gen(params, indices [N], labels [N] | None, image [N, h, w, c], aug_level, scale, key)
  -> samples [N, *shape] of a conditional task's model (`condition`); CFG with weight `scale` on the
  `guided_parts` (`core.conditioning.cfg_on`)."""
  from diffusax.core import conditioning
  from diffusax.nn import bridge

  options = sampler_options(spec.method, spec.eta, spec.spacing, spec.order)

  def gen(params, indices, labels, image, aug_level, scale, key):
    model = bridge.model(module, {"params": params}, target, schedule)
    cond = condition(module, model.schedule, indices, labels, image, aug_level, jax.random.fold_in(key, 2))
    parts = guided_parts(module, labels, guide_on)
    if parts:
      model = conditioning.cfg_on(model, parts=parts, scale=scale, null_label=null_class)
    x_T = initial_noise(jax.random.fold_in(key, 0), indices, sample_shape, model.schedule.prior_std)
    return samplers.sample(model, x_T, key=jax.random.fold_in(key, 1), method=spec.method,
                           num_steps=spec.num_steps, cond=cond, options=options, clip_x0=spec.clip_x0 or None)

  return jax.jit(gen)


def to_uint8(x) -> np.ndarray:
  """[-1, 1] floats -> uint8 [0, 255], rounding to the nearest level."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, rows: int, upscale: int = 1) -> np.ndarray:
  """uint8 [N, H, W, C] -> one [rows*H, cols*W, C] grid (1 px gaps), nearest-upscaled."""
  n, h, w, c = images.shape
  cols = -(-n // rows)
  grid = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, c), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    grid[r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = images[i]
  if upscale > 1:
    grid = grid.repeat(upscale, 0).repeat(upscale, 1)
  return grid


def scatter_image(points: np.ndarray, size: int = 256, extent: float = 3.0) -> np.ndarray:
  """2-D points -> uint8 [size, size, 1] density image on [-extent, extent]^2 (dark = dense)."""
  h, _, _ = np.histogram2d(points[:, 1], points[:, 0], bins=size, range=[[-extent, extent], [-extent, extent]])
  h = h[::-1]
  img = 255 - np.clip(255 * np.sqrt(h / max(h.max(), 1)), 0, 255)
  return img.astype(np.uint8)[..., None]


def save_png(path: str, image: np.ndarray) -> None:
  from PIL import Image
  img = image[..., 0] if image.shape[-1] == 1 else image
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  storage.write_bytes(path, buf.getvalue())
