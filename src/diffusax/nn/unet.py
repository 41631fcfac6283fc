"""DDPM / ADM U-Net (Ho et al. 2020; Nichol & Dhariwal 2021; Dhariwal & Nichol 2021).

    x [B, H, W, C], t [B] in [0, 1], y [B] int or None -> [B, H, W, C_out] float32
    optional: low_res [B, h, w, c_lr], aug_level [B] float, has_image [B] float (see below)

Structure (ADM's `UNetModel`): conv_in; per level `num_res_blocks` ResBlocks
(self-attention after each when the feature map is r x r with r in
`attn_resolutions`), then a downsampling (stride-2 conv, avg-pool, or a BigGAN
ResBlock with `resblock_updown`) except at the last level; a middle
ResBlock-attention-ResBlock; the mirrored decoder with `num_res_blocks + 1`
ResBlocks per level, each consuming one skip connection; GroupNorm, SiLU,
zero-initialised conv_out.

Conditioning: emb = TimeEmbedding(t) [+ ClassEmbedding(y)] [+ AugEmbedding(aug_level)],
width 4 x base_channels. Each ResBlock maps SiLU(emb) to either a per-channel bias
(DDPM) or a scale and shift applied after its second GroupNorm,
h = GN(h) (1 + scale) + shift (ADM, `scale_shift_norm=True`).

Learned variance (`learn_sigma=True`): 2 C_out output channels; [..., :C_out]
is the target prediction, [..., C_out:] the raw improved-DDPM interpolation
value var_interp (about [-1, 1]; `core.Prediction.var_interp`), log Sigma = f log beta +
(1 - f) log beta_tilde with f = (var_interp + 1)/2 (Nichol & Dhariwal 2021, eq. 15) - the sampler maps it.

Image condition (`low_res_channels > 0`; a `core.conditioning.Cond` through `bridge.denoiser`):
the call kwarg `low_res` [B, h, w, low_res_channels] (low-resolution image, grayscale, masked
image + mask) is resized bilinearly to H x W (`jax.image.resize` "bilinear", half-pixel centres;
antialiased when h > H) and concatenated to x along channels (ADM `SuperResModel`). With
`cond_dropout`, the flag has_image [B] (0 where CFG dropped the image, which is then zeros) follows
as one constant channel: conv_in sees C + low_res_channels (+ 1) channels. With `aug_embed`, the
augmentation time s = aug_level [B] of a noise-augmented image (CDM, Ho et al. 2021, sec. 4.3) is
embedded like t (sinusoidal of time_scale * s -> Dense -> SiLU -> Dense, params "aug_embed") and
added to emb. With all three off the parameters are those of the label-only network.

With ch=128, mult (1, 2, 2, 2), 2 res blocks, attention at 16, 1 head,
scale_shift_norm=False on 32x32x3 this is the DDPM CIFAR-10 model: 35.7M
parameters.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffusax.nn import embeddings, layers

F32 = jnp.float32
Dtype = Any


def _upsample(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_pool(x):
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


class ResBlock(nn.Module):
  """[B, H, W, C_in], emb [B, E] -> [B, H', W', out_channels] (H' = 2H, H/2 or H).

  h = conv(SiLU(GN(x))) (resampled first when up/down); h += Dense(SiLU(emb))
  or GN(h)(1 + scale) + shift; h = zero_conv(dropout(SiLU(GN(h)))); returns
  skip(x) + h with skip a 1x1 conv only when the channel count changes.
  """
  out_channels: int
  dropout: float = 0.0
  num_groups: int = 32
  scale_shift_norm: bool = True
  up: bool = False
  down: bool = False
  dtype: Dtype = F32
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, x, emb, train: bool = False):
    c_in, c = x.shape[-1], self.out_channels
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(layers.group_norm(c_in, self.num_groups, param_dtype=self.param_dtype, name="norm_0")(x))
    if self.up or self.down:
      resample = _upsample if self.up else _avg_pool
      h, x = resample(h), resample(x)
    h = layers.conv(c, 3, name="conv_0", **kw)(h)
    e = layers.dense(2 * c if self.scale_shift_norm else c, ("embed", "conv_out"), name="emb", **kw)(nn.silu(emb))
    e = e[:, None, None, :]
    norm_1 = layers.group_norm(c, self.num_groups, param_dtype=self.param_dtype, name="norm_1")
    if self.scale_shift_norm:
      scale, shift = jnp.split(e.astype(F32), 2, axis=-1)
      h = nn.silu(norm_1(h) * (1.0 + scale) + shift)
    else:
      h = nn.silu(norm_1(h + e))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = layers.conv(c, 3, zero_init=True, name="conv_1", **kw)(h)
    if c_in != c:
      x = layers.conv(c, 1, name="skip", **kw)(x)
    return x.astype(self.dtype) + h


def res_block_class(remat: bool):
  """ResBlock, or ResBlock under `nn.remat` (`jax.checkpoint`): the backward pass recomputes the
  block's activations instead of storing them. Same parameter names and outputs; less activation
  memory for more compute (one more forward pass of every block)."""
  return nn.remat(ResBlock, static_argnums=(3,)) if remat else ResBlock  # 3: `train` (self is 0).


class AttentionBlock(nn.Module):
  """x + SelfAttention(GN(x)) over the H*W positions: [B, H, W, C] -> same."""
  num_heads: int = 1
  num_head_channels: int = -1
  num_groups: int = 32
  dtype: Dtype = F32
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    heads = layers.resolve_heads(c, self.num_heads, self.num_head_channels)
    h = layers.group_norm(c, self.num_groups, param_dtype=self.param_dtype, name="norm")(x)
    h = layers.SelfAttention(heads, zero_out=True, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="attn")(h.reshape(b, hh * ww, c))
    return x.astype(self.dtype) + h.reshape(b, hh, ww, c)


class UNetEncoder(nn.Module):
  """conv_in, the downsampling levels and the middle block of the U-Net.

  x [B, H, W, C_in], emb [B, E] -> (h [B, H/2^(L-1), W/2^(L-1), C_top], skips);
  skips is the list of every intermediate [B, h, w, c] for the decoder.
  """
  base_channels: int
  channel_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  num_heads: int = 1
  num_head_channels: int = -1
  dropout: float = 0.0
  resblock_updown: bool = False
  conv_resample: bool = True
  scale_shift_norm: bool = True
  num_groups: int = 32
  dtype: Dtype = F32
  param_dtype: Dtype = F32
  remat: bool = False

  @nn.compact
  def __call__(self, x, emb, train: bool = False):
    Block = res_block_class(self.remat)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = dict(dropout=self.dropout, num_groups=self.num_groups, scale_shift_norm=self.scale_shift_norm, **kw)
    attn = dict(num_heads=self.num_heads, num_head_channels=self.num_head_channels, num_groups=self.num_groups, **kw)
    h = layers.conv(self.base_channels * self.channel_mult[0], 3, name="conv_in", **kw)(x.astype(self.dtype))
    skips = [h]
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = Block(self.base_channels * mult, name=f"down_{level}_{i}", **block)(h, emb, train)
        if h.shape[1] in self.attn_resolutions:
          h = AttentionBlock(name=f"down_{level}_{i}_attn", **attn)(h)
        skips.append(h)
      if level != len(self.channel_mult) - 1:
        name = f"down_{level}_resample"
        if self.resblock_updown:
          h = Block(h.shape[-1], down=True, name=name, **block)(h, emb, train)
        elif self.conv_resample:
          h = layers.conv(h.shape[-1], 3, stride=2, name=name, **kw)(h)
        else:
          h = _avg_pool(h)
        skips.append(h)
    h = Block(h.shape[-1], name="mid_0", **block)(h, emb, train)
    h = AttentionBlock(name="mid_attn", **attn)(h)
    h = Block(h.shape[-1], name="mid_1", **block)(h, emb, train)
    return h, skips


def check_resolution(shape, levels: int, where: str = "UNet") -> None:
  """Raises layers.InputShapeError unless H and W are divisible by 2**(levels - 1)."""
  f = 2 ** (levels - 1)
  hh, ww = shape[1], shape[2]
  if hh % f or ww % f:
    raise layers.InputShapeError(
        f"{where}: input resolution {hh}x{ww} is not divisible by 2**{levels - 1} = {f} "
        f"(channel_mult has {levels} levels, so {levels - 1} downsamplings); allowed sizes are "
        f"multiples of {f}, e.g. {f * max(1, hh // f)} or {f * (hh // f + 1)}")


def check_widths(base_channels: int, channel_mult: Sequence[int], num_groups: int, where: str = "UNet") -> None:
  for m in channel_mult:
    layers.check_groups(base_channels * m, num_groups, f"{where} GroupNorm at width {base_channels}*{m}")


def fourier_features(x, exponents: Sequence[int]):
  """[B, ..., C] -> [B, ..., 2 C len(exponents)]: sin(2^n 2 pi x) then cos(2^n 2 pi x) for each n
  (VDM's input features, Kingma et al. 2021, app. B: fine detail of x visible to the first layer)."""
  x = jnp.asarray(x, F32)
  w = jnp.asarray([2.0 ** n * 2.0 * jnp.pi for n in exponents], F32)
  h = (x[..., None] * w).reshape(x.shape[:-1] + (-1,))  # [..., C * N], channel-major
  return jnp.concatenate([jnp.sin(h), jnp.cos(h)], axis=-1)


class UNet(nn.Module):
  """ADM/DDPM U-Net denoiser; see the module docstring for shapes and options.

  Call: `apply(variables, x, t, y=None, train=False, low_res=None, w=None, aug_level=None,
  has_image=None)` (w: the guidance weight of a guidance_embed network; low_res, aug_level,
  has_image: the image condition's parts, each required exactly when its option is on); with
  train=True pass `rngs={"dropout": key}` when dropout > 0.
  """
  out_channels: int | None = None          # None -> channels of x
  base_channels: int = 128                 # width of the first level
  channel_mult: Sequence[int] = (1, 2, 2, 2)  # width multiplier per level
  num_res_blocks: int = 2                  # ResBlocks per level (decoder: +1)
  attn_resolutions: Sequence[int] = (16,)  # feature-map heights (r means r x r) with self-attention
  num_heads: int = 1                       # heads per attention block ...
  num_head_channels: int = -1              # ... or channels per head when > 0
  dropout: float = 0.0                     # dropout inside ResBlocks
  num_classes: int | None = None           # class table gets num_classes + 1 rows (null class)
  resblock_updown: bool = False            # BigGAN-style up/down ResBlocks
  conv_resample: bool = True               # stride-2 / upsample convs, else pool / nearest only
  scale_shift_norm: bool = True            # ADM scale-shift (True) or DDPM additive (False) time conditioning
  learn_sigma: bool = False                # 2x output channels: [prediction | var_interp]
  time_embedding: str = "sinusoidal"       # "sinusoidal" (of 1000 t) or "fourier" (of t)
  time_scale: float = 1000.0               # sinusoidal features see t * time_scale
  fourier_scale: float = 16.0              # std of random Fourier frequencies
  num_groups: int = 32                     # GroupNorm groups (must divide every width)
  low_res_channels: int = 0                # > 0: expect `low_res` [B, h, w, low_res_channels] (the image condition)
  aug_embed: bool = False                  # an augmentation level aug_level [B], embedded and added to the time
                                           # embedding (noise-conditioning augmentation, CDM sec. 4.3)
  cond_dropout: bool = False               # has_image [B] as one more input channel (image dropped for CFG)
  fourier_features: Sequence[int] = ()     # exponents n: sin and cos of 2^n 2 pi x appended to the input (VDM)
  remat: bool = False                      # recompute ResBlock activations in backward (memory for compute)
  guidance_embed: bool = False             # a guidance-weight input w, embedded and added to the time
                                           # embedding (guided distillation's student)
  dtype: Dtype = F32                       # compute dtype
  param_dtype: Dtype = F32                 # parameter dtype

  @nn.compact
  def __call__(self, x, t, y=None, train: bool = False, low_res=None, w=None, aug_level=None, has_image=None):
    if x.ndim != 4:
      raise layers.InputShapeError(f"UNet expects x of shape [B, H, W, C]; got {tuple(x.shape)}")
    b, c = x.shape[0], x.shape[-1]
    check_resolution(x.shape, len(self.channel_mult))
    check_widths(self.base_channels, self.channel_mult, self.num_groups)
    t = embeddings.batch_times(t, b)
    y = embeddings.check_labels(y, self.num_classes, b)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    emb_dim = 4 * self.base_channels
    emb = embeddings.TimeEmbedding(emb_dim, self.base_channels, self.time_embedding, self.time_scale,
                                   self.fourier_scale, name="time_embed", **kw)(t)
    if y is not None:
      emb = emb + embeddings.ClassEmbedding(self.num_classes, emb_dim, name="class_embed", **kw)(y)
    w = embeddings.check_guidance(w, self.guidance_embed, b)
    if w is not None:
      emb = emb + embeddings.GuidanceEmbedding(emb_dim, self.base_channels, name="guidance_embed", **kw)(w)
    aug_level = embeddings.check_aug_level(aug_level, self.aug_embed, b, "UNet")
    if aug_level is not None:
      emb = emb + embeddings.TimeEmbedding(emb_dim, self.base_channels, "sinusoidal", self.time_scale,
                                           name="aug_embed", **kw)(aug_level)
    x = embeddings.image_input(x, low_res, has_image, channels=self.low_res_channels,
                               cond_dropout=self.cond_dropout, where="UNet")
    if self.fourier_features:
      x = jnp.concatenate([x.astype(F32), fourier_features(x[..., :c], self.fourier_features)], axis=-1)

    h, skips = UNetEncoder(self.base_channels, tuple(self.channel_mult), self.num_res_blocks,
                           tuple(self.attn_resolutions), self.num_heads, self.num_head_channels,
                           self.dropout, self.resblock_updown, self.conv_resample, self.scale_shift_norm,
                           self.num_groups, name="encoder", remat=self.remat, **kw)(x, emb, train)
    Block = res_block_class(self.remat)
    block = dict(dropout=self.dropout, num_groups=self.num_groups, scale_shift_norm=self.scale_shift_norm, **kw)
    attn = dict(num_heads=self.num_heads, num_head_channels=self.num_head_channels, num_groups=self.num_groups, **kw)
    for level in reversed(range(len(self.channel_mult))):
      width = self.base_channels * self.channel_mult[level]
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
        h = Block(width, name=f"up_{level}_{i}", **block)(h, emb, train)
        if h.shape[1] in self.attn_resolutions:
          h = AttentionBlock(name=f"up_{level}_{i}_attn", **attn)(h)
      if level:
        name = f"up_{level}_resample"
        if self.resblock_updown:
          h = Block(width, up=True, name=name, **block)(h, emb, train)
        else:
          h = _upsample(h)
          if self.conv_resample:
            h = layers.conv(width, 3, name=name, **kw)(h)
    out_c = (self.out_channels or c) * (2 if self.learn_sigma else 1)
    h = nn.silu(layers.group_norm(h.shape[-1], self.num_groups, param_dtype=self.param_dtype, name="norm_out")(h))
    out = layers.conv(out_c, 3, zero_init=True, name="conv_out", **kw)(h)
    return out.astype(F32)
