"""Diffusion Transformer with adaLN-zero conditioning (Peebles & Xie 2023).

    x [B, H, W, C], t [B] in [0, 1], y [B] int or None -> [B, H, W, C_out] float32
    optional: low_res [B, h, w, c_lr], aug_level [B] float, has_image [B] float (see below)

x is cut into non-overlapping p x p patches by a stride-p conv to
N = (H/p)(W/p) tokens of width `hidden_size`, plus fixed 2-D sin-cos position
embeddings. The condition c = TimeEmbedding(t) [+ ClassEmbedding(y)]
[+ AugEmbedding(aug_level)] (frequency features of 1000 t, 256 wide) drives each block:

    shift1, scale1, gate1, shift2, scale2, gate2 = Dense(SiLU(c))   (zero init)
    x = x + gate1 * Attn(LN(x) (1 + scale1) + shift1)
    x = x + gate2 * MLP(LN(x) (1 + scale2) + shift2)

so every block starts as the identity ("adaLN-zero"); the final layer,
LN(x)(1 + scale) + shift -> Dense(p p C_out), is zero-initialised too, so the
network outputs exactly zero at init. Tokens are then folded back to
[B, H, W, C_out]. With `learn_sigma`, C_out = 2 C: [prediction | var_interp] as in
the U-Net (see `diffusax.nn.unet`).

Image condition, as in the U-Net (a `core.conditioning.Cond` through `bridge.denoiser`): with
`low_res_channels > 0` the kwarg `low_res` [B, h, w, low_res_channels] is resized bilinearly to
H x W (`jax.image.resize` "bilinear", half-pixel centres) and concatenated to x on channels BEFORE
patchify, then (`cond_dropout`) has_image [B] as one constant channel: the patch conv sees
C + low_res_channels (+ 1) channels; C_out stays C. With `aug_embed`, aug_level [B] (CDM sec. 4.3)
is embedded like t (params "aug_embedder") and added to c. With these off the parameters are those
of the label-only network.

Published sizes (Table 1; 32x32x4 latents, p = 2, 1000 classes,
learn_sigma): S (384 wide, 12 deep, 6 heads) 33M, B (768, 12, 12) 130M.
`DIT_CONFIGS` holds the four published shapes.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from diffusax.nn import embeddings, layers

F32 = jnp.float32
Dtype = Any

DIT_CONFIGS = {
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}

_xavier = nn.initializers.xavier_uniform()
_normal002 = nn.initializers.normal(0.02)


def sincos_pos_embed(dim: int, gh: int, gw: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding [gh * gw, dim] (MAE / DiT convention)."""
  if dim % 4:
    raise layers.OptionError(f"DiT hidden_size must be divisible by 4 for 2-D position embeddings; got {dim}")

  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  grid_h, grid_w = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64), indexing="ij")
  emb = np.concatenate([one_d(dim // 2, grid_w), one_d(dim // 2, grid_h)], axis=1)
  return emb.astype(np.float32)


def _modulate(x, shift, scale):
  return x * (1.0 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
  """Tokens [B, N, D], condition c [B, D] -> [B, N, D] (adaLN-zero block)."""
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = F32
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, x, c):
    d = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mod = layers.dense(6 * d, ("embed", "mlp"), zero_init=True, name="adaLN_modulation", **kw)(nn.silu(c))
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod.astype(F32), 6, axis=-1)
    h = _modulate(layers.layer_norm(name="norm1")(x), shift1, scale1)
    h = layers.SelfAttention(self.num_heads, name="attn", **kw)(h)
    x = x + gate1[:, None] * h.astype(F32)
    h = _modulate(layers.layer_norm(name="norm2")(x), shift2, scale2)
    h = layers.dense(int(d * self.mlp_ratio), ("embed", "mlp"), kernel_init=_xavier, name="fc1", **kw)(h)
    h = nn.gelu(h, approximate=True)
    h = layers.dense(d, ("mlp", "embed"), kernel_init=_xavier, name="fc2", **kw)(h)
    return x + gate2[:, None] * h.astype(F32)


class DiT(nn.Module):
  """Diffusion Transformer; see the module docstring for shapes and options.

  Call: `apply(variables, x, t, y=None, train=False, w=None, low_res=None, aug_level=None,
  has_image=None)` (the last three: the image condition's parts, each required exactly when its
  option is on). The residual stream is
  kept in float32; matmuls run in `dtype`. DiT has no dropout, so `train` only
  exists for the shared call signature.
  """
  patch_size: int = 2                    # p: tokens are p x p patches
  hidden_size: int = 384                 # token width D
  depth: int = 12                        # number of adaLN-zero blocks
  num_heads: int = 6                     # attention heads (D divisible by it)
  mlp_ratio: float = 4.0                 # MLP hidden = mlp_ratio * D
  num_classes: int | None = None         # class table gets num_classes + 1 rows (null class)
  learn_sigma: bool = False              # 2x output channels: [prediction | var_interp]
  out_channels: int | None = None        # None -> channels of x
  time_embedding: str = "sinusoidal"     # "sinusoidal" (of 1000 t) or "fourier" (of t)
  time_scale: float = 1000.0             # sinusoidal features see t * time_scale
  frequency_dim: int = 256               # width of the time features
  guidance_embed: bool = False           # a guidance-weight input w added to the conditioning (guided distillation)
  low_res_channels: int = 0              # > 0: expect `low_res` [B, h, w, low_res_channels] (the image condition)
  aug_embed: bool = False                # an augmentation level aug_level [B] added to the conditioning (CDM sec. 4.3)
  cond_dropout: bool = False             # has_image [B] as one more input channel (image dropped for CFG)
  dtype: Dtype = F32                     # compute dtype
  param_dtype: Dtype = F32               # parameter dtype

  @nn.compact
  def __call__(self, x, t, y=None, train: bool = False, w=None, low_res=None, aug_level=None, has_image=None):
    del train
    if x.ndim != 4:
      raise layers.InputShapeError(f"DiT expects x of shape [B, H, W, C]; got {tuple(x.shape)}")
    b, hh, ww, c = x.shape
    p, d = self.patch_size, self.hidden_size
    if hh % p or ww % p:
      raise layers.InputShapeError(f"DiT: input resolution {hh}x{ww} is not divisible by patch_size={p}; "
                       f"allowed sizes are multiples of {p}")
    if d % self.num_heads:
      raise layers.OptionError(f"DiT: hidden_size={d} is not divisible by num_heads={self.num_heads}")
    t = embeddings.batch_times(t, b)
    y = embeddings.check_labels(y, self.num_classes, b)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gh, gw = hh // p, ww // p
    aug_level = embeddings.check_aug_level(aug_level, self.aug_embed, b, "DiT")
    x = embeddings.image_input(x, low_res, has_image, channels=self.low_res_channels,
                               cond_dropout=self.cond_dropout, where="DiT")

    h = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", name="x_embedder", **kw,
                kernel_init=layers.boxed(_xavier, (None, None, "conv_in", "conv_out")),
                bias_init=layers.boxed(layers.zeros, ("conv_out",)))(x.astype(self.dtype))
    h = h.reshape(b, gh * gw, d).astype(F32) + jnp.asarray(sincos_pos_embed(d, gh, gw))[None]
    cond = embeddings.TimeEmbedding(d, self.frequency_dim, self.time_embedding, self.time_scale,
                                    kernel_init=_normal002, name="t_embedder", **kw)(t).astype(F32)
    if y is not None:
      cond = cond + embeddings.ClassEmbedding(self.num_classes, d, stddev=0.02, name="y_embedder",
                                              **kw)(y).astype(F32)
    w = embeddings.check_guidance(w, self.guidance_embed, b)
    if w is not None:
      cond = cond + embeddings.GuidanceEmbedding(d, self.frequency_dim, name="w_embedder", **kw)(w).astype(F32)
    if aug_level is not None:
      cond = cond + embeddings.TimeEmbedding(d, self.frequency_dim, "sinusoidal", self.time_scale,
                                             kernel_init=_normal002, name="aug_embedder", **kw)(aug_level).astype(F32)
    for i in range(self.depth):
      h = DiTBlock(self.num_heads, self.mlp_ratio, name=f"block_{i}", **kw)(h, cond)

    out_c = (self.out_channels or c) * (2 if self.learn_sigma else 1)
    mod = layers.dense(2 * d, ("embed", "mlp"), zero_init=True, name="final_adaLN", **kw)(nn.silu(cond))
    shift, scale = jnp.split(mod.astype(F32), 2, axis=-1)
    h = _modulate(layers.layer_norm(name="final_norm")(h), shift, scale)
    h = layers.dense(p * p * out_c, ("embed", None), zero_init=True, name="final_linear", **kw)(h)
    h = h.astype(F32).reshape(b, gh, gw, p, p, out_c).transpose(0, 1, 3, 2, 4, 5)
    return h.reshape(b, hh, ww, out_c)
