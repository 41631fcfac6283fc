"""KL autoencoder of latent diffusion (Rombach et al. 2022, "kl-f8"), laid out like diffusers' `AutoencoderKL`.

    encode:  x [B, H, W, in_channels] in [-1, 1]  -> mean, logvar [B, H/f, W/f, z_channels]
    decode:  z [B, H/f, W/f, z_channels]          -> x_rec [B, H, W, out_channels] float32
    f = 2 ** (len(block_out_channels) - 1)

The posterior is the diagonal Gaussian q(z|x) = N(mean, exp(logvar)) (diffusers'
`DiagonalGaussianDistribution`): [mean | logvar] = quant_conv(Encoder(x)) split on channels, logvar
clipped to `logvar_clip` = (-30, 20); a sample is z = mean + exp(logvar / 2) eps, eps ~ N(0, I).
Decoding applies post_quant_conv (1x1) and then the Decoder.

Encoder: conv_in 3x3 -> per level i: `layers_per_block` ResnetBlock2D to block_out_channels[i], then
(all but the last level) a Downsample2D: zero pad (0, 1) at the bottom/right and a 3x3 stride-2 conv
without padding -> MidBlock (resnet, attention, resnet) -> GroupNorm -> SiLU -> conv_out 3x3 to
2 z_channels. Decoder: conv_in 3x3 to block_out_channels[-1] -> MidBlock -> per level in reversed
width order `layers_per_block + 1` ResnetBlock2D, then (all but the last) Upsample2D: nearest 2x and
a 3x3 conv -> GroupNorm -> SiLU -> conv_out 3x3 to out_channels.

    ResnetBlock2D: h = conv2(SiLU(GN2(conv1(SiLU(GN1(x)))))); out = shortcut(x) + h
                   (shortcut a 1x1 conv when the width changes, else the identity)
    Attention:     h = GN(x) as N = H W tokens [B, N, C]; q, k, v = h W_{q,k,v} + b (one head of C);
                   out = x + (softmax(q k^T / sqrt(C)) v) W_o + b_o

Every GroupNorm has eps 1e-6 and runs in float32; attention logits and softmax are float32.

Parameter names make the diffusers mapping mechanical (`diffusax.nn.autoencoder_weights`): the
Flax path ("encoder", "down_blocks_0", "resnets_1", "conv1", "kernel") is the diffusers key
"encoder.down_blocks.0.resnets.1.conv1.weight" (a trailing "_<n>" becomes ".<n>"; kernel/scale ->
weight, bias -> bias); conv kernels are HWIO here and OIHW in PyTorch, dense kernels [in, out] here
and [out, in] there. With block_out_channels (128, 256, 512, 512), layers_per_block 2, z_channels 4
and norm_groups 32 this is Stable Diffusion's VAE (83.7M parameters).

`decode_features` stops before the decoder's conv_out and `last_layer(params, h)` applies it, so a
GAN loss can take gradients with respect to the last layer's kernel (`LAST_LAYER`) for the adaptive
weight of Esser et al. 2021 (eq. 7).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusax.nn import layers

F32 = jnp.float32
Dtype = Any

LAST_LAYER = ("decoder", "conv_out", "kernel")  # path of the decoder's last kernel in params
NORM_EPS = 1e-6


def group_norm(channels: int, num_groups: int, *, param_dtype: Dtype = F32, name: str | None = None) -> nn.GroupNorm:
  """GroupNorm with eps 1e-6 (diffusers' VAE) in float32, scale/bias labelled "norm"."""
  layers.check_groups(channels, num_groups, f"AutoencoderKL GroupNorm at width {channels}")
  return nn.GroupNorm(num_groups=num_groups, epsilon=NORM_EPS, dtype=F32, param_dtype=param_dtype,
                      use_fast_variance=False, scale_init=layers.boxed(layers.ones, ("norm",)),
                      bias_init=layers.boxed(layers.zeros, ("norm",)), name=name)


class ResnetBlock2D(nn.Module):
  """[B, H, W, C_in] -> [B, H, W, out_channels]: shortcut(x) + conv2(SiLU(GN(conv1(SiLU(GN(x))))))."""
  out_channels: int
  norm_groups: int = 32
  dtype: Dtype = F32
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, x):
    c_in, c = x.shape[-1], self.out_channels
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(group_norm(c_in, self.norm_groups, param_dtype=self.param_dtype, name="norm1")(x))
    h = layers.conv(c, 3, name="conv1", **kw)(h)
    h = nn.silu(group_norm(c, self.norm_groups, param_dtype=self.param_dtype, name="norm2")(h))
    h = layers.conv(c, 3, name="conv2", **kw)(h)
    if c_in != c:
      x = layers.conv(c, 1, name="conv_shortcut", **kw)(x)
    return x.astype(self.dtype) + h


class Attention(nn.Module):
  """Single-head self-attention over the H W positions with a residual: [B, H, W, C] -> same.

  q, k, v = GN(x) W + b with W [C, C] ("embed", "kv"); out = x + softmax(q k^T / sqrt(C)) v W_o + b_o
  with W_o [C, C] ("kv", "embed"). Logits and softmax in float32.
  """
  norm_groups: int = 32
  dtype: Dtype = F32
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = group_norm(c, self.norm_groups, param_dtype=self.param_dtype, name="group_norm")(x)
    h = h.reshape(b, hh * ww, c)
    q, k, v = (layers.dense(c, ("embed", "kv"), name=n, **kw)(h) for n in ("to_q", "to_k", "to_v"))
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=F32) / jnp.sqrt(F32(c))
    weights = nn.softmax(logits, axis=-1).astype(self.dtype)
    o = jnp.einsum("bqk,bkc->bqc", weights, v)
    o = layers.dense(c, ("kv", "embed"), name="to_out_0", **kw)(o)
    return x.astype(self.dtype) + o.reshape(b, hh, ww, c)


class MidBlock(nn.Module):
  """resnets_0 -> attentions_0 (when `attention`) -> resnets_1, all at the input width."""
  norm_groups: int = 32
  attention: bool = True
  dtype: Dtype = F32
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, x):
    kw = dict(norm_groups=self.norm_groups, dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]
    x = ResnetBlock2D(c, name="resnets_0", **kw)(x)
    if self.attention:
      x = Attention(name="attentions_0", **kw)(x)
    return ResnetBlock2D(c, name="resnets_1", **kw)(x)


class Downsample2D(nn.Module):
  """[B, H, W, C] -> [B, H/2, W/2, C]: zero pad one row/column at the bottom/right, 3x3 stride-2 conv."""
  dtype: Dtype = F32
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, x):
    return layers.conv(x.shape[-1], 3, stride=2, padding=((0, 1), (0, 1)), dtype=self.dtype,
                       param_dtype=self.param_dtype, name="conv")(x)


class Upsample2D(nn.Module):
  """[B, H, W, C] -> [B, 2H, 2W, C]: nearest-neighbour 2x, then a 3x3 conv."""
  dtype: Dtype = F32
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return layers.conv(x.shape[-1], 3, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


class DownEncoderBlock2D(nn.Module):
  """`num_layers` ResnetBlock2D (resnets_<j>) to out_channels, then downsamplers_0 when `downsample`."""
  out_channels: int
  num_layers: int
  downsample: bool
  norm_groups: int = 32
  dtype: Dtype = F32
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.norm_groups, name=f"resnets_{j}", **kw)(x)
    if self.downsample:
      x = Downsample2D(name="downsamplers_0", **kw)(x)
    return x


class UpDecoderBlock2D(nn.Module):
  """`num_layers` ResnetBlock2D (resnets_<j>) to out_channels, then upsamplers_0 when `upsample`."""
  out_channels: int
  num_layers: int
  upsample: bool
  norm_groups: int = 32
  dtype: Dtype = F32
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.norm_groups, name=f"resnets_{j}", **kw)(x)
    if self.upsample:
      x = Upsample2D(name="upsamplers_0", **kw)(x)
    return x


class Encoder(nn.Module):
  """x [B, H, W, C_in] -> moments [B, H/f, W/f, 2 z_channels] (before quant_conv)."""
  block_out_channels: tuple
  layers_per_block: int
  z_channels: int
  norm_groups: int
  mid_attention: bool
  dtype: Dtype = F32
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    blk = dict(norm_groups=self.norm_groups, **kw)
    h = layers.conv(self.block_out_channels[0], 3, name="conv_in", **kw)(x.astype(self.dtype))
    last = len(self.block_out_channels) - 1
    for i, c in enumerate(self.block_out_channels):
      down = DownEncoderBlock2D(c, self.layers_per_block, i != last, name=f"down_blocks_{i}", **blk)
      h = down(h)
    h = MidBlock(attention=self.mid_attention, name="mid_block", **blk)(h)
    h = nn.silu(group_norm(h.shape[-1], self.norm_groups, param_dtype=self.param_dtype, name="conv_norm_out")(h))
    return layers.conv(2 * self.z_channels, 3, name="conv_out", **kw)(h)


class Decoder(nn.Module):
  """z [B, h, w, z_channels] -> x_rec [B, f h, f w, out_channels] (`features=True`: the input of
  conv_out, i.e. SiLU(GN(h)) [B, f h, f w, block_out_channels[0]] in float32)."""
  block_out_channels: tuple
  layers_per_block: int
  out_channels: int
  norm_groups: int
  mid_attention: bool
  dtype: Dtype = F32
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, z, features: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    blk = dict(norm_groups=self.norm_groups, **kw)
    widths = tuple(reversed(self.block_out_channels))
    h = layers.conv(widths[0], 3, name="conv_in", **kw)(z.astype(self.dtype))
    h = MidBlock(attention=self.mid_attention, name="mid_block", **blk)(h)
    for i, c in enumerate(widths):
      h = UpDecoderBlock2D(c, self.layers_per_block + 1, i != len(widths) - 1, name=f"up_blocks_{i}", **blk)(h)
    h = nn.silu(group_norm(h.shape[-1], self.norm_groups, param_dtype=self.param_dtype, name="conv_norm_out")(h))
    if features:
      return h
    return layers.conv(self.out_channels, 3, name="conv_out", **kw)(h)


class AutoencoderKL(nn.Module):
  """KL autoencoder (see the module docstring). Methods, via `apply(variables, ..., method=...)`:

    encode(x) -> (mean, logvar)            x [B, H, W, in_channels] -> [B, H/f, W/f, z_channels] x 2, float32
    decode(z) -> x_rec                     [B, H/f, W/f, z_channels] -> [B, H, W, out_channels] float32
    decode_features(z) -> h                the decoder's conv_out input [B, H, W, block_out_channels[0]]
    __call__(x, key=None) -> (x_rec, mean, logvar)   z = mean + exp(logvar / 2) N(0, I) from `key`
                                           (key None: z = mean)
  """
  block_out_channels: tuple = (64, 128, 128)  # width per level; f = 2 ** (len - 1)
  layers_per_block: int = 1                   # ResnetBlock2D per encoder level (decoder: + 1)
  z_channels: int = 4                         # latent channels (diffusers' latent_channels)
  in_channels: int = 3                        # image channels into the encoder
  out_channels: int = 3                       # image channels out of the decoder
  norm_groups: int = 32                       # GroupNorm groups, must divide every width (norm_num_groups)
  mid_attention: bool = True                  # attention in both mid blocks (mid_block_add_attention)
  logvar_clip: tuple = (-30.0, 20.0)          # posterior logvar clipped to [lo, hi]
  dtype: Dtype = F32                          # compute dtype
  param_dtype: Dtype = F32                    # parameter dtype

  @property
  def factor(self) -> int:
    """Downsampling factor f = 2 ** (len(block_out_channels) - 1)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @nn.nowrap
  def latent_shape(self, image_shape) -> tuple[int, int, int]:
    """(H, W[, C]) or [B, H, W, C] -> (H/f, W/f, z_channels); InputShapeError unless f divides H and W."""
    hh, ww = self._check_image(tuple(image_shape), "image")
    return hh // self.factor, ww // self.factor, self.z_channels

  @nn.nowrap
  def _check_image(self, shape: tuple, what: str) -> tuple[int, int]:
    f = self.factor
    if len(shape) not in (2, 3, 4):
      raise layers.InputShapeError(f"AutoencoderKL: {what} shape must be (H, W), (H, W, C) or (B, H, W, C); got {shape}")
    hh, ww = shape[1:3] if len(shape) == 4 else shape[:2]
    if hh % f or ww % f:
      raise layers.InputShapeError(
          f"AutoencoderKL: {what} size {hh}x{ww} is not divisible by the downsampling factor f = {f} "
          f"(block_out_channels has {len(self.block_out_channels)} levels); allowed sizes are multiples of {f}, "
          f"e.g. {f * max(1, hh // f)} or {f * (hh // f + 1)}")
    return hh, ww

  @nn.nowrap
  def check_options(self) -> None:
    """OptionError for widths, group counts, block counts or a clip range that do not fit together."""
    widths = tuple(self.block_out_channels)
    if not widths or any(int(c) <= 0 for c in widths):
      raise layers.OptionError(f"AutoencoderKL: block_out_channels must be a non-empty tuple of positive widths; got {widths}")
    for c in widths:
      layers.check_groups(c, self.norm_groups, f"AutoencoderKL GroupNorm at width {c} (block_out_channels {widths})")
    if self.layers_per_block < 1 or self.z_channels < 1 or self.in_channels < 1 or self.out_channels < 1:
      raise layers.OptionError(
          f"AutoencoderKL: layers_per_block, z_channels, in_channels and out_channels must be >= 1; got "
          f"{self.layers_per_block}, {self.z_channels}, {self.in_channels}, {self.out_channels}")
    lo, hi = self.logvar_clip
    if not lo < hi:
      raise layers.OptionError(f"AutoencoderKL: logvar_clip must be (lo, hi) with lo < hi; got {self.logvar_clip}")

  def setup(self):
    self.check_options()
    kw = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
              norm_groups=self.norm_groups, mid_attention=self.mid_attention, dtype=self.dtype,
              param_dtype=self.param_dtype)
    self.encoder = Encoder(z_channels=self.z_channels, **kw)
    self.decoder = Decoder(out_channels=self.out_channels, **kw)
    conv = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.quant_conv = layers.conv(2 * self.z_channels, 1, **conv)
    self.post_quant_conv = layers.conv(self.z_channels, 1, **conv)

  def encode(self, x):
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise layers.InputShapeError(f"AutoencoderKL.encode expects x of shape [B, H, W, {self.in_channels}]; "
                                   f"got {tuple(x.shape)}")
    self._check_image(x.shape, "input")
    moments = self.quant_conv(self.encoder(x)).astype(F32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *self.logvar_clip)

  def _check_latent(self, z, where):
    if z.ndim != 4 or z.shape[-1] != self.z_channels:
      raise layers.InputShapeError(f"AutoencoderKL.{where} expects z of shape [B, h, w, {self.z_channels}]; "
                                   f"got {tuple(z.shape)}")

  def decode(self, z):
    self._check_latent(z, "decode")
    return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(F32)

  def decode_features(self, z):
    self._check_latent(z, "decode_features")
    return self.decoder(self.post_quant_conv(z.astype(self.dtype)), features=True)

  def __call__(self, x, key=None):
    mean, logvar = self.encode(x)
    z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, F32)
    return self.decode(z), mean, logvar


def last_layer(params, h):
  """The decoder's conv_out applied to `decode_features` output, in float32:
  h [B, H, W, C] -> x_rec [B, H, W, out_channels], 3x3 SAME conv with params["decoder"]["conv_out"]
  (kernel HWIO [3, 3, C, out], bias [out]); boxed or plain params (the "params" collection). Equal to
  `decode` for float32 compute."""
  p = layers.unbox(params)["decoder"]["conv_out"]
  out = jax.lax.conv_general_dilated(jnp.asarray(h, F32), jnp.asarray(p["kernel"], F32), (1, 1),
                                     ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return out + jnp.asarray(p["bias"], F32)
