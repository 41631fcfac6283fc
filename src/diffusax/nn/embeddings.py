"""Time and class embeddings shared by the U-Net, DiT, classifier and MLP, and the checks and input
layout of the dense-image condition (`diffusax.core.conditioning.Cond`) the U-Net and DiT share.

Time is continuous, t in [0, 1] (t = 0 data, t = 1 prior), float [B] or scalar.
A discrete-step model passes t = (i + 1) / T; the sinusoidal features see
t * time_scale (1000 by default), i.e. the DDPM step index i + 1.

  * `sinusoidal(s, dim)`: [B] -> [B, dim] = [cos(s f_j), sin(s f_j)],
    f_j = max_period^(-j / (dim/2)) (Vaswani et al. 2017; ADM's
    `timestep_embedding`).
  * `FourierFeatures`: random Fourier features [sin(2 pi t W), cos(2 pi t W)]
    with W ~ N(0, scale^2) drawn once at init (Tancik et al. 2020; Song et al.
    2021, NCSN++ `GaussianFourierProjection`). W lives in `params` (so EMA and
    checkpoints carry it) but is frozen by `stop_gradient`; exclude it from
    weight decay.
  * `TimeEmbedding`: features -> Dense -> SiLU -> Dense: [B] -> [B, dim].
  * `ClassEmbedding`: table of num_classes + 1 rows; row num_classes is the
    null class used for classifier-free guidance (labels == num_classes).
  * `check_aug_level`: the augmentation time s [B] of a noise-augmented image condition (CDM,
    Ho et al. 2021, sec. 4.3); a network embeds it with its own `TimeEmbedding` (sinusoidal of
    time_scale * s) added to the time embedding.
  * `image_input`: x [B, H, W, C] with the image condition [B, h, w, c] resized to H x W
    (`jax.image.resize` "bilinear": half-pixel centres, triangle kernel, antialiased when
    shrinking) and, for a network trained with image dropout, has_image [B] as one constant
    channel concatenated on channels: [B, H, W, C + c (+ 1)].
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusax.nn import layers

F32 = jnp.float32
Dtype = Any
TIME_EMBEDDINGS = ("sinusoidal", "fourier")


def sinusoidal(s, dim: int, max_period: float = 10000.0):
  """Sinusoidal features of s [B] (already scaled): [B, dim] float32, [cos | sin]."""
  if dim % 2:
    raise layers.OptionError(f"sinusoidal embedding dim must be even; got {dim}")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=F32) / half)
  args = jnp.asarray(s, F32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def batch_times(t, batch: int):
  """t as float32 [B]: a scalar is broadcast; a [B] array is checked."""
  t = jnp.asarray(t, F32)
  if t.ndim == 0:
    return jnp.broadcast_to(t, (batch,))
  if t.shape != (batch,):
    raise ValueError(f"t must be a scalar or of shape ({batch},); got {tuple(t.shape)}")
  return t


class FourierFeatures(nn.Module):
  """Random Fourier features of t [B]: [B, dim] float32 (W frozen, see module doc)."""
  dim: int
  scale: float = 16.0
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, t):
    if self.dim % 2:
      raise layers.OptionError(f"Fourier embedding dim must be even; got {self.dim}")
    w = self.param("W", layers.boxed(nn.initializers.normal(self.scale), ("mlp",)),
                   (self.dim // 2,), self.param_dtype)
    w = jax.lax.stop_gradient(w).astype(F32)
    args = 2.0 * jnp.pi * jnp.asarray(t, F32)[:, None] * w[None]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class TimeEmbedding(nn.Module):
  """t [B] in [0, 1] -> [B, dim]: features(t) -> Dense(dim) -> SiLU -> Dense(dim).

  Fields:
    dim: output width (4 x base channels in DDPM/ADM, hidden size in DiT).
    features_dim: width of the sinusoidal/Fourier features (None -> dim // 4).
    kind: "sinusoidal" (of t * time_scale) or "fourier" (of t, scale fourier_scale).
  """
  dim: int
  features_dim: int | None = None
  kind: str = "sinusoidal"
  time_scale: float = 1000.0
  fourier_scale: float = 16.0
  kernel_init: Any = None
  dtype: Dtype = F32
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, t):
    fdim = self.features_dim or self.dim // 4
    if self.kind == "sinusoidal":
      f = sinusoidal(t * self.time_scale, fdim)
    elif self.kind == "fourier":
      f = FourierFeatures(fdim, self.fourier_scale, self.param_dtype, name="fourier")(t)
    else:
      raise layers.OptionError(f"unknown time_embedding {self.kind!r}; allowed: {list(TIME_EMBEDDINGS)}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
    h = layers.dense(self.dim, ("embed", "mlp"), name="dense_0", **kw)(f.astype(self.dtype))
    h = layers.dense(self.dim, ("mlp", "embed"), name="dense_1", **kw)(nn.silu(h))
    return h


class GuidanceEmbedding(nn.Module):
  """The guidance weight w [B] of a w-conditioned (guided-distillation) student -> [B, dim], added to the
  time embedding (Meng et al. 2023): sinusoidal features of w * scale -> Dense -> SiLU -> Dense, the last
  layer zero-initialised, so a student initialised from its teacher starts as the teacher (conditional)."""
  dim: int
  features_dim: int = 64
  scale: float = 250.0  # w in [0, ~4] spans the sinusoidal frequencies as t * 1000 does for t in [0, 1]
  dtype: Dtype = F32
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, w):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    f = sinusoidal(jnp.asarray(w, F32) * self.scale, self.features_dim)
    h = layers.dense(self.dim, ("embed", "mlp"), name="dense_0", **kw)(f.astype(self.dtype))
    return layers.dense(self.dim, ("mlp", "embed"), zero_init=True, name="dense_1", **kw)(nn.silu(h))


def check_guidance(w, guidance_embed: bool, batch: int):
  """Validates the guidance weight against the network's setting; returns float32 [B] or None."""
  if not guidance_embed:
    if w is not None:
      raise ValueError("a guidance weight w was given but the network has guidance_embed=False")
    return None
  if w is None:
    raise ValueError("the network is w-conditioned (guidance_embed=True): pass the guidance weight w, "
                     "a scalar or [B] (cond={'label': y, 'w': w} through diffusax.nn.bridge)")
  return batch_times(w, batch)


def check_labels(y, num_classes: int | None, batch: int):
  """Validates labels against the class setting; returns int32 [B] or None."""
  if num_classes is None:
    if y is not None:
      raise ValueError("labels y were given but the network has num_classes=None")
    return None
  if y is None:
    raise ValueError(f"the network is class-conditional (num_classes={num_classes}); pass labels y "
                     f"in [0, {num_classes}] ({num_classes} is the null class)")
  y = jnp.asarray(y)
  if y.shape != (batch,):
    raise ValueError(f"labels y must have shape ({batch},); got {tuple(y.shape)}")
  if not jnp.issubdtype(y.dtype, jnp.integer):
    raise ValueError(f"labels y must be integers; got dtype {y.dtype}")
  return y.astype(jnp.int32)


class ClassEmbedding(nn.Module):
  """y [B] int in [0, num_classes] -> [B, dim]; row num_classes is the null class.

  The table has num_classes + 1 rows, labelled ("vocab", "embed").
  """
  num_classes: int
  dim: int
  stddev: float = 1.0
  dtype: Dtype = F32
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, y):
    table = self.param("embedding", layers.boxed(nn.initializers.normal(self.stddev), ("vocab", "embed")),
                       (self.num_classes + 1, self.dim), self.param_dtype)
    return jnp.take(table, y, axis=0).astype(self.dtype)


def check_aug_level(aug_level, aug_embed: bool, batch: int, where: str):
  """Validates the augmentation level s against the network's `aug_embed`; returns float32 [B] or None."""
  if not aug_embed:
    if aug_level is not None:
      raise ValueError(f"aug_level was given but the {where} has aug_embed=False")
    return None
  if aug_level is None:
    raise ValueError(f"the {where} has aug_embed=True: pass aug_level of shape [{batch}] (the augmentation "
                     f"time s of the image condition, 0 = clean)")
  if jnp.shape(aug_level) != (batch,):
    raise ValueError(f"{where}: aug_level must have shape [{batch}] (one level per example); "
                     f"got {tuple(jnp.shape(aug_level))}")
  return jnp.asarray(aug_level, F32)


def image_input(x, low_res, has_image, *, channels: int, cond_dropout: bool, where: str):
  """x [B, H, W, C] -> [B, H, W, C + channels (+ 1)] float32 with the image condition, or x unchanged
  when channels == 0 (then low_res and has_image must be None).

  low_res [B, h, w, channels] is resized to H x W by `jax.image.resize(..., "bilinear")` (half-pixel
  centres; an image already H x W is kept as it is) and concatenated after x (ADM `SuperResModel`).
  With cond_dropout, has_image [B] (1 = image given, 0 = dropped for CFG, the image then zeros) follows
  as one constant channel, so the network can tell "no image" from a black image.
  """
  b, hh, ww, _ = x.shape
  if not channels:
    if low_res is not None:
      raise ValueError(f"low_res was given but the {where} has low_res_channels=0")
    if cond_dropout:
      raise layers.OptionError(f"{where}: cond_dropout=True flags a dropped image condition; it needs "
                               f"low_res_channels > 0")
    if has_image is not None:
      raise ValueError(f"has_image was given but the {where} has cond_dropout=False")
    return x
  if low_res is None or jnp.ndim(low_res) != 4 or low_res.shape[0] != b or low_res.shape[-1] != channels:
    got = None if low_res is None else tuple(jnp.shape(low_res))
    raise ValueError(f"{where} with low_res_channels={channels} needs low_res of shape "
                     f"[{b}, h, w, {channels}]; got {got}")
  parts = [x.astype(F32), jax.image.resize(jnp.asarray(low_res, F32), (b, hh, ww, channels), "bilinear")]
  if not cond_dropout:
    if has_image is not None:
      raise ValueError(f"has_image was given but the {where} has cond_dropout=False")
  else:
    if has_image is None:
      raise ValueError(f"the {where} has cond_dropout=True: pass has_image of shape [{b}] "
                       f"(1 = image given, 0 = dropped)")
    if jnp.shape(has_image) != (b,):
      raise ValueError(f"{where}: has_image must have shape [{b}] (one flag per example); "
                       f"got {tuple(jnp.shape(has_image))}")
    parts.append(jnp.broadcast_to(jnp.asarray(has_image, F32)[:, None, None, None], (b, hh, ww, 1)))
  return jnp.concatenate(parts, axis=-1)
