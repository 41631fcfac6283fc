"""Optimizer from typed settings: AdamW, linear warmup then cosine or constant, clipping."""
from __future__ import annotations

import dataclasses

import jax
import optax

DECAYS = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 2e-4
  warmup_steps: int = 0
  decay: str = "constant"     # "cosine" to end_lr_factor * lr at total_steps, or "constant".
  total_steps: int = 1
  end_lr_factor: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip: float = 1.0      # Global-norm clip; 0 disables.

  def __post_init__(self):
    if self.decay not in DECAYS:
      raise ValueError(f"unknown lr decay {self.decay!r}; allowed: {list(DECAYS)}")
    if self.lr <= 0:
      raise ValueError(f"learning rate must be > 0, got {self.lr}")
    if self.warmup_steps < 0 or self.total_steps < 1:
      raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {self.warmup_steps}, {self.total_steps}")


def lr_schedule(c: OptimConfig) -> optax.Schedule:
  if c.decay == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if c.warmup_steps else c.lr, peak_value=c.lr, warmup_steps=c.warmup_steps,
        decay_steps=max(c.total_steps, c.warmup_steps + 1), end_value=c.lr * c.end_lr_factor)
  if c.warmup_steps:
    return optax.join_schedules([optax.linear_schedule(0.0, c.lr, c.warmup_steps), optax.constant_schedule(c.lr)],
                                [c.warmup_steps])
  return optax.constant_schedule(c.lr)


def decay_mask(params):
  """Weight decay applies to matrices and kernels (ndim >= 2) only: not to biases, norm scales, or
  the frozen random Fourier frequencies of the time embedding (1-D), which decay would shrink.

  Biases are told by name as well as by rank: attention's query/key/value biases are
  [heads, head_dim] ('query_bias', ...), 2-D but biases all the same."""
  def decayed(path, p):
    name = str(getattr(path[-1], "key", path[-1])) if path else ""
    return p.ndim >= 2 and not name.endswith("bias")
  return jax.tree_util.tree_map_with_path(decayed, params)


def make(c: OptimConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  sched = lr_schedule(c)
  parts = [optax.clip_by_global_norm(c.grad_clip)] if c.grad_clip > 0 else []
  parts.append(optax.adamw(sched, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts), sched
