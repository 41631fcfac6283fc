"""PatchGAN discriminator (pix2pix's NLayerDiscriminator, Isola et al. 2017; as used by taming-transformers'
VQGAN and the latent-diffusion autoencoders, Esser et al. 2021).

    x [B, H, W, C] in [-1, 1] -> logits [B, h, w, 1] float32,  h = H // 2**num_layers - 2

one logit per overlapping patch (receptive field 70x70 for num_layers = 3). Layers, each conv 4x4 with
padding 1 and LeakyReLU slope 0.2:

    conv_0    stride 2 to base_channels, LeakyReLU (no norm)
    conv_n    n = 1 .. num_layers - 1: stride 2 to base_channels * min(2^n, 8), norm_n, LeakyReLU
    conv_L    L = num_layers: stride 1 to base_channels * min(2^L, 8), norm_L, LeakyReLU
    conv_out  stride 1 to 1 channel (the logits)

Norm: "group" (GroupNorm in float32 with the largest group count <= 32 dividing the width) or "none".
The original uses BatchNorm; it is not offered here because its running statistics would be hidden
mutable state outside the one immutable train state (and its batch statistics would couple the
examples of a batch). Kernels are initialised N(0, 0.02) as in taming's `weights_init`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from diffusax.nn import layers

F32 = jnp.float32
Dtype = Any

NORMS = ("group", "none")
_init = nn.initializers.normal(0.02)


def groups_for(channels: int, most: int = 32) -> int:
  """The largest group count <= `most` that divides `channels`."""
  return max(g for g in range(1, min(most, channels) + 1) if channels % g == 0)


def min_size(num_layers: int) -> int:
  """Smallest H (and W) giving at least one logit: H // 2**num_layers - 2 >= 1."""
  return 3 * 2 ** num_layers


class PatchDiscriminator(nn.Module):
  """PatchGAN logits for real/fake patches; see the module docstring. Call: `apply(variables, x)`."""
  base_channels: int = 64   # width of the first conv; later ones base * min(2^n, 8)
  num_layers: int = 3       # stride-2 convs (3: 70x70 receptive field)
  norm: str = "group"       # "group" (GroupNorm, <= 32 groups) or "none"
  dtype: Dtype = F32        # compute dtype
  param_dtype: Dtype = F32  # parameter dtype

  def _conv(self, features: int, stride: int, name: str) -> nn.Conv:
    return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)), dtype=self.dtype,
                   param_dtype=self.param_dtype, name=name,
                   kernel_init=layers.boxed(_init, (None, None, "conv_in", "conv_out")),
                   bias_init=layers.boxed(layers.zeros, ("conv_out",)))

  def _norm(self, channels: int, name: str):
    if self.norm == "none":
      return lambda h: h
    return nn.GroupNorm(num_groups=groups_for(channels), epsilon=1e-5, dtype=F32, param_dtype=self.param_dtype,
                        scale_init=layers.boxed(layers.ones, ("norm",)),
                        bias_init=layers.boxed(layers.zeros, ("norm",)), name=name)

  @nn.compact
  def __call__(self, x):
    if self.norm not in NORMS:
      raise layers.OptionError(f"PatchDiscriminator: unknown norm {self.norm!r}; allowed: {list(NORMS)}")
    if self.num_layers < 1 or self.base_channels < 1:
      raise layers.OptionError(f"PatchDiscriminator: num_layers and base_channels must be >= 1; got "
                               f"{self.num_layers}, {self.base_channels}")
    if x.ndim != 4:
      raise layers.InputShapeError(f"PatchDiscriminator expects x of shape [B, H, W, C]; got {tuple(x.shape)}")
    need = min_size(self.num_layers)
    if min(x.shape[1:3]) < need:
      raise layers.InputShapeError(
          f"PatchDiscriminator: image {x.shape[1]}x{x.shape[2]} is too small for num_layers={self.num_layers}; "
          f"H and W must be at least 3 * 2**{self.num_layers} = {need}")
    lrelu = lambda h: nn.leaky_relu(h, 0.2)  # noqa: E731
    h = lrelu(self._conv(self.base_channels, 2, "conv_0")(x.astype(self.dtype)))
    for n in range(1, self.num_layers + 1):
      c = self.base_channels * min(2 ** n, 8)
      h = self._conv(c, 2 if n < self.num_layers else 1, f"conv_{n}")(h)
      h = lrelu(self._norm(c, f"norm_{n}")(h)).astype(self.dtype)
    return self._conv(1, 1, "conv_out")(h).astype(F32)
