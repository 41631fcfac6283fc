"""The immutable training state and its EMA.

`TrainState` is a pytree of arrays only (no functions), so it can be jitted,
donated, sharded and saved by orbax as it is:

    step        int32 scalar: optimizer steps taken
    params      network parameters (unboxed)
    ema_params  tuple of parameter trees, one per EMA decay
    opt_state   optax state
    rng         uint32 [2] raw key data of the run's base key; draws at step k
                use fold_in(base, k)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: Any
  params: Any
  ema_params: Any
  opt_state: Any
  rng: Any

  def replace(self, **kw) -> "TrainState":
    return dataclasses.replace(self, **kw)


def create(params, tx, seed: int, num_ema: int) -> TrainState:
  """A fresh state at step 0; each EMA starts equal to params."""
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=tuple(jax.tree.map(jnp.copy, params) for _ in range(num_ema)),
      opt_state=tx.init(params),
      rng=jax.random.key_data(jax.random.key(seed, impl="threefry2x32")),
  )


def base_key(state: TrainState):
  return jax.random.wrap_key_data(state.rng, impl="threefry2x32")


def ema_decay(decay, step, warmup: bool):
  """Effective EMA decay at `step`: min(decay, (1 + step) / (10 + step)) with warmup."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step)) if warmup else jnp.asarray(decay, jnp.float32)


def update_ema(ema_params: Sequence[Any], params, decays: Sequence[float], step, warmup: bool):
  """ema <- d * ema + (1 - d) * params for each decay d (params after this step's update)."""
  out = []
  for ema, d in zip(ema_params, decays):
    dd = ema_decay(d, step, warmup)
    out.append(jax.tree.map(lambda e, p: (dd * e + (1.0 - dd) * p).astype(e.dtype), ema, params))
  return tuple(out)
