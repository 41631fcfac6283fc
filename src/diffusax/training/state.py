"""The immutable training state and its EMA.

`TrainState` is a pytree of arrays only (no functions), so it can be jitted,
donated, sharded and saved by orbax as it is:

    step        int32 scalar: optimizer steps taken
    params      network parameters (unboxed)
    ema_params  tuple of parameter trees: one per classic EMA decay, then one per
                power-function EMA (training/power_ema.py), in that order
    opt_state   optax state
    rng         uint32 [2] raw key data of the run's base key; draws at step k
                use fold_in(base, k)
    aux         the objective's own state: () for most, {"vlb_history": ...} for
                importance-sampled L_vlb (`core.losses.importance_init`). A checkpoint
                written before this field existed restores with aux = () (checkpoint.py).
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
  aux: Any = ()

  def replace(self, **kw) -> "TrainState":
    return dataclasses.replace(self, **kw)


def create(params, tx, seed: int, num_ema: int, aux: Any = ()) -> TrainState:
  """A fresh state at step 0; each EMA starts equal to params."""
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=tuple(jax.tree.map(jnp.copy, params) for _ in range(num_ema)),
      opt_state=tx.init(params),
      rng=jax.random.key_data(jax.random.key(seed, impl="threefry2x32")),
      aux=aux,
  )


def base_key(state: TrainState):
  return jax.random.wrap_key_data(state.rng, impl="threefry2x32")


def ema_decay(decay, step, warmup: bool):
  """Effective EMA decay at `step`: min(decay, (1 + step) / (10 + step)) with warmup."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step)) if warmup else jnp.asarray(decay, jnp.float32)


def power_ema_decay(gamma: float, step):
  """beta_t = (1 - 1/t)^(gamma + 1) with t = step + 1 the number of optimizer steps after this update
  (EDM2 eq. 2-3; `power_ema.beta`): 0 at the first step, so the EMA starts at the first updated params."""
  t = jnp.asarray(step, jnp.float32) + 1.0
  return jnp.exp((gamma + 1.0) * jnp.log1p(-1.0 / t))


def update_ema(ema_params: Sequence[Any], params, decays: Sequence[float], step, warmup: bool,
               gammas: Sequence[float] = ()):
  """ema <- d * ema + (1 - d) * params (params after this step's update, `step` the state's step before it).

  The first len(decays) EMAs use the classic decay d (`ema_decay`), the next len(gammas) the
  power-function decay of exponent gamma (`power_ema_decay`).
  """
  if len(ema_params) != len(decays) + len(gammas):
    raise ValueError(f"{len(ema_params)} EMAs in the state for {len(decays)} decays and {len(gammas)} power EMAs")
  rates = [ema_decay(d, step, warmup) for d in decays] + [power_ema_decay(float(g), step) for g in gammas]
  return tuple(jax.tree.map(lambda e, p, dd=dd: (dd * e + (1.0 - dd) * p).astype(e.dtype), ema, params)
               for ema, dd in zip(ema_params, rates))
