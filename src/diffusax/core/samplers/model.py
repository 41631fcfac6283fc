"""What a sampler family sees of the model: a `core.Model` bound to this run's condition and clipping.

Samplers never interpret the raw output themselves: `Bound.predict(x, t, w)`
evaluates the network once and returns the implied (x0_hat, eps_hat,
var_interp) (`core.model.Model.predict`), so each sampler works with every
target. For samplers that need another linear combination, `output` (the
network call), `x0_eps` and `combine(x, out, w, k_x0, k_eps)` = k_x0 x0_hat +
k_eps eps_hat as one multiply-add (the flow samplers' velocity), with the
conversion weights `weights(t)` tabulated per step.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax.numpy as jnp

from diffusax.core import targets as targets_lib
from diffusax.core.model import ConversionWeights, Model, Prediction


class Bound(NamedTuple):
  """A model with the sampler's condition (passed to every call unchanged) and x0 clipping (or None)."""
  model: Model
  cond: Any = None
  clip_x0: Optional[float] = None

  @property
  def schedule(self):
    return self.model.schedule

  @property
  def target(self) -> str:
    return self.model.target

  @property
  def learned_variance(self) -> bool:
    return self.model.learned_variance

  def weights(self, t) -> ConversionWeights:
    return self.model.weights(t)

  def output(self, x, t):
    """One network call: (prediction of the target, var_interp or None), float32 [B, ...]."""
    return self.model.output(x, t, self.cond)

  def x0_eps(self, x, out, w: ConversionWeights):
    return self.model.x0_eps(x, out, w, self.clip_x0)

  def combine(self, x, out, w: ConversionWeights, k_x0, k_eps):
    """k_x0 x0_hat + k_eps eps_hat (scalars k), as one multiply-add per operand when nothing is clipped."""
    if self.clip_x0 is not None:
      x0, eps = self.x0_eps(x, out, w)
      return k_x0 * x0 + k_eps * eps
    x = jnp.asarray(x, jnp.float32)
    a_, b_, c_, d_ = (targets_lib.expand(v, x, "weights.w") for v in w.w)
    k_x0, k_eps = targets_lib.expand(k_x0, x, "k_x0"), targets_lib.expand(k_eps, x, "k_eps")
    return (k_x0 * a_ + k_eps * c_) * x + (k_x0 * b_ + k_eps * d_) * out

  def predict(self, x, t, w: Optional[ConversionWeights] = None) -> Prediction:
    return self.model.predict(x, t, self.cond, weights=w, clip_x0=self.clip_x0)
