"""Noisy-image classifier for classifier guidance (Dhariwal & Nichol 2021, sec. 4).

    x [B, H, W, C] (noisy x_t), t [B] in [0, 1] -> logits [B, num_classes] float32

The U-Net's encoder half (`diffusax.nn.unet.UNetEncoder`: conv_in, the
downsampling levels, the middle block) conditioned on t through the same
time embedding, then GroupNorm, SiLU, global average pooling and a
zero-initialised Dense head (ADM's `EncoderUNetModel` with "adaptive"
pooling; zero init gives uniform predictions at start).
`diffusax.nn.bridge.classifier_log_prob` turns it into log p(y | x_t, t).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffusax.nn import embeddings, layers, unet

F32 = jnp.float32
Dtype = Any


class NoisyClassifier(nn.Module):
  """Time-conditioned encoder classifier; call `apply(variables, x, t, train=False)`."""
  num_classes: int                         # number of logits
  base_channels: int = 128                 # width of the first level
  channel_mult: Sequence[int] = (1, 2, 2, 2)  # width multiplier per level
  num_res_blocks: int = 2                  # ResBlocks per level
  attn_resolutions: Sequence[int] = (16,)  # feature-map sizes with self-attention
  num_heads: int = 1                       # heads per attention block ...
  num_head_channels: int = -1              # ... or channels per head when > 0
  dropout: float = 0.0                     # dropout inside ResBlocks
  resblock_updown: bool = True             # ADM classifiers downsample in ResBlocks
  conv_resample: bool = True               # stride-2 convs when not resblock_updown
  scale_shift_norm: bool = True            # ADM scale-shift time conditioning
  time_embedding: str = "sinusoidal"       # "sinusoidal" (of 1000 t) or "fourier" (of t)
  time_scale: float = 1000.0               # sinusoidal features see t * time_scale
  num_groups: int = 32                     # GroupNorm groups (must divide every width)
  dtype: Dtype = F32                       # compute dtype
  param_dtype: Dtype = F32                 # parameter dtype

  @nn.compact
  def __call__(self, x, t, train: bool = False):
    if x.ndim != 4:
      raise layers.InputShapeError(f"NoisyClassifier expects x of shape [B, H, W, C]; got {tuple(x.shape)}")
    unet.check_resolution(x.shape, len(self.channel_mult), "NoisyClassifier")
    unet.check_widths(self.base_channels, self.channel_mult, self.num_groups, "NoisyClassifier")
    b = x.shape[0]
    t = embeddings.batch_times(t, b)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    emb = embeddings.TimeEmbedding(4 * self.base_channels, self.base_channels, self.time_embedding,
                                   self.time_scale, name="time_embed", **kw)(t)
    h, _ = unet.UNetEncoder(self.base_channels, tuple(self.channel_mult), self.num_res_blocks,
                            tuple(self.attn_resolutions), self.num_heads, self.num_head_channels,
                            self.dropout, self.resblock_updown, self.conv_resample, self.scale_shift_norm,
                            self.num_groups, name="encoder", **kw)(x, emb, train)
    h = nn.silu(layers.group_norm(h.shape[-1], self.num_groups, param_dtype=self.param_dtype, name="norm_out")(h))
    h = jnp.mean(h.astype(F32), axis=(1, 2))
    logits = layers.dense(self.num_classes, ("embed", "vocab"), zero_init=True, name="head", **kw)(h)
    return logits.astype(F32)
