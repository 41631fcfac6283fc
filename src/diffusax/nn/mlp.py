"""MLP denoiser for low-dimensional toy data (2-D mixtures, swiss rolls).

    x [B, D], t [B] in [0, 1], y [B] int or None -> [B, D_out] float32

    emb = TimeEmbedding(t) [+ ClassEmbedding(y)]                  [B, hidden]
    h   = Dense(x)                                                 [B, hidden]
    h   = h + Dense(SiLU(Dense(SiLU(h)) + emb))      (depth times, residual)
    out = Dense(SiLU(h))                                           [B, D_out]

D_out = D (x2 with learn_sigma: [prediction | var_interp], as in the U-Net).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from diffusax.nn import embeddings, layers

F32 = jnp.float32
Dtype = Any


class MLPDenoiser(nn.Module):
  """Residual MLP denoiser; call `apply(variables, x, t, y=None, train=False)`."""
  hidden: int = 256                      # width of every hidden layer
  depth: int = 3                         # number of residual blocks
  num_classes: int | None = None         # class table gets num_classes + 1 rows (null class)
  learn_sigma: bool = False              # 2x outputs: [prediction | var_interp]
  out_dim: int | None = None             # None -> D of x
  time_embedding: str = "sinusoidal"     # "sinusoidal" (of 1000 t) or "fourier" (of t)
  time_scale: float = 1000.0             # sinusoidal features see t * time_scale
  fourier_scale: float = 16.0            # std of random Fourier frequencies
  dtype: Dtype = F32                     # compute dtype
  param_dtype: Dtype = F32               # parameter dtype

  @nn.compact
  def __call__(self, x, t, y=None, train: bool = False):
    del train
    if x.ndim != 2:
      raise layers.InputShapeError(f"MLPDenoiser expects x of shape [B, D]; got {tuple(x.shape)}")
    b, dim = x.shape
    t = embeddings.batch_times(t, b)
    y = embeddings.check_labels(y, self.num_classes, b)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    emb = embeddings.TimeEmbedding(self.hidden, self.hidden, self.time_embedding, self.time_scale,
                                   self.fourier_scale, name="time_embed", **kw)(t)
    if y is not None:
      emb = emb + embeddings.ClassEmbedding(self.num_classes, self.hidden, name="class_embed", **kw)(y)
    h = layers.dense(self.hidden, (None, "embed"), name="dense_in", **kw)(x.astype(self.dtype))
    for i in range(self.depth):
      u = layers.dense(self.hidden, ("embed", "mlp"), name=f"block_{i}_0", **kw)(nn.silu(h))
      u = layers.dense(self.hidden, ("mlp", "embed"), name=f"block_{i}_1", **kw)(nn.silu(u + emb))
      h = h + u
    out = (self.out_dim or dim) * (2 if self.learn_sigma else 1)
    return layers.dense(out, ("embed", None), name="dense_out", **kw)(nn.silu(h)).astype(F32)
