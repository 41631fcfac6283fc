"""The sampler type and the one loop that runs every sampler.

A sampler is a pair of pure functions (optax style) plus what `run` needs to know:

    state = sampler.init(x_T, key, n, max_steps)   # State(x, key, n, aux, table)
    state = sampler.step(state, i)                 # x_{t_i} -> x_{t_{i+1}}, i = 0 .. n - 1
    sampler.stochastic                             # does a step draw noise?
    sampler.peel_last                              # see below

Per-step scalars: one path. Everything a step needs besides x (its times and
`grid.Levels`, alpha and sigma, their ratios and reciprocals, the model's
conversion weights) is a function of (i, n) and the traced options only. Each
family gives `plan(levels, i, n) -> dict of scalars`; `init_state` evaluates it
for every i < max_steps at once (`jax.vmap`, before the loop) into
`State.table`, with the step's `grid.Levels` under the key "levels", and a step
reads row i (`row`). max_steps is a static bound (the step count itself when
that is a Python int), n may be traced, so a new step count, guidance scale,
eta or churn reuses the compiled program; rows i >= n are never read. XLA
fuses the row reads into the step's one elementwise kernel, as a hand-written
scan over precomputed coefficient arrays does.

`run` drives the steps with one `lax.fori_loop(0, n, ...)` (a `while` loop with
a traced trip count: a scan has a static length and would pay for padded
steps). Random draws of step i use `jax.random.fold_in(key, i)` (sub-draws fold
in again).

Keep `lax.cond` out of the loop body where possible: on XLA:CPU a cond splits
the step's elementwise fusion at its operands and results. Hence:

  * A sampler whose last step differs in control flow (Heun: one model call
    there, not two) sets `peel_last` and its `step(state, i, last)` takes a
    static Python bool `last`: `run` loops `step(., i, False)` over i < n - 1
    and calls `step(., n - 1, True)` once after the loop. `step(state, i)`
    (last=None, read from the row) stays valid for every i, for wrappers.
  * A draw switched by a traced option (churn, eta) goes through `add_noise`,
    whose skipped branch passes x through untouched.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusax.core.samplers import grid

F32 = jnp.float32


class State(NamedTuple):
  x: jax.Array        # [B, ...] float32, the current x_t
  key: jax.Array      # the sampling key (never split; folded with the step index)
  n: jax.Array        # int32 number of steps
  aux: Any = ()       # family-specific carry (multistep history)
  table: Any = None   # {"levels": grid.Levels, **plan}: leaves [max_steps], row i for step i


class Sampler(NamedTuple):
  init: Callable      # (x_T, key, n, max_steps) -> State
  step: Callable      # (State, i, last=None) -> State, any 0 <= i < n (wrappers call step(state, i))
  stochastic: bool    # whether a step draws noise (the sampling job then keys each sample by its index)
  peel_last: bool = False  # `run` calls step(., i, False) in the loop and step(., n - 1, True) after it


def init_state(x_T, key, n, max_steps: int, t_at: Callable, schedule, plan: Optional[Callable] = None,
               aux=()) -> State:
  """The loop's first state with its table of per-step scalars for i < max_steps (see module doc)."""
  n = jnp.asarray(n, jnp.int32)

  def one(i):
    i = jnp.minimum(i, n - 1)  # Rows past n (never read) repeat the last one: finite, no t outside the grid.
    lv = grid.levels(schedule, t_at, i, n)
    return {"levels": lv, **({} if plan is None else plan(lv, i, n))}

  table = jax.vmap(one)(jnp.arange(max_steps, dtype=jnp.int32))
  return State(jnp.asarray(x_T, F32), key, n, aux, table)


def tabulated_init(t_at: Callable, schedule, plan: Optional[Callable] = None,
                   aux: Optional[Callable] = None) -> Callable:
  """The `init(x_T, key, n, max_steps)` of a family: `init_state` with its grid and plan (aux(x) -> carry)."""
  def init(x_T, key, n, max_steps):
    x = jnp.asarray(x_T, F32)
    return init_state(x, key, n, max_steps, t_at, schedule, plan, () if aux is None else aux(x))
  return init


def row(state: State, i) -> dict:
  """The per-step scalars of step i: row i of the state's table ({"levels": grid.Levels, ...})."""
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), state.table)


def step_key(key, i, sub=None):
  k = jax.random.fold_in(key, i)
  return k if sub is None else jax.random.fold_in(k, sub)


def noise(key, shape):
  """N(0, I) of `shape`, float32."""
  return jax.random.normal(key, shape, F32)


def add_noise(x, scale, enabled, key, i, sub=None):
  """x + scale * z, z ~ N(0, I) from step_key(key, i, sub), when the traced bool `enabled`; else x, no draw.

  The key derivation and the draw sit inside the cond's true branch and the
  false branch passes x through, which XLA aliases: a skipped draw costs no
  buffer. (Making z itself the cond's result, zeros when disabled, writes and
  reads a full buffer every step and splits the step's fusion in two.)
  """
  return jax.lax.cond(enabled, lambda y: y + scale * noise(step_key(key, i, sub), y.shape), lambda y: y, x)


def reciprocal(s):
  """1 / s of a scalar, kept a scalar: `x * reciprocal(s)` stays one multiply per element.

  XLA folds x * (1 / s) back into x / s, and an elementwise divide costs several times a
  multiply (on the CPU here one divide over 64x32x32x3 took about as long as the rest of
  an Euler step); the optimization barrier stops that fold.
  """
  return jax.lax.optimization_barrier(1.0 / s)


def branch(pred, on_true: Callable, on_false: Callable):
  """lax.cond(pred, on_true, on_false), or just the taken branch when pred is a static Python bool."""
  if isinstance(pred, (bool, np.bool_)):
    return on_true() if pred else on_false()
  return jax.lax.cond(pred, on_true, on_false)


def concrete_int(n) -> Optional[int]:
  """n as a Python int when it is a concrete value, else None (a tracer)."""
  if isinstance(n, jax.core.Tracer):
    return None
  try:
    return int(np.asarray(n))
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def check_num_steps(num_steps, max_steps: Optional[int] = None) -> int:
  """Validates the step count against its static bound; returns the bound (max_steps, or num_steps if static).

  A concrete num_steps must lie in [1, max_steps]; a traced one needs max_steps
  (the table's size). A traced num_steps outside [1, max_steps] cannot raise
  inside jit: `run` then returns NaN samples rather than a silently clipped count.
  """
  if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer))
                                or max_steps < 1):
    raise ValueError(f"max_steps must be a static int >= 1, got {max_steps!r}")
  c = concrete_int(num_steps)
  if c is None:
    if max_steps is None:
      raise ValueError("a traced num_steps needs a static max_steps (the size of the per-step table); "
                       "pass max_steps=<largest step count you will use>")
    return int(max_steps)
  if c < 1:
    raise ValueError(f"num_steps must be >= 1, got {c}")
  if max_steps is not None and c > max_steps:
    raise ValueError(f"num_steps={c} exceeds max_steps={max_steps}")
  return int(max_steps) if max_steps is not None else c


def run(sampler: Sampler, x_T, key, num_steps, *, max_steps: Optional[int] = None,
        return_trajectory: bool = False):
  """Runs `sampler` for num_steps (int or traced int32 with a static max_steps) from x_T [B, ...].

  Returns x0 [B, ...] in x_T's dtype, or (x0, trajectory) with trajectory
  [max_steps + 1, B, ...]: trajectory[k] is x after k steps for k <= n and the
  final sample for k > n. A traced num_steps outside [1, max_steps] gives NaN.
  """
  x_T = jnp.asarray(x_T)
  out_dtype = x_T.dtype if jnp.issubdtype(x_T.dtype, jnp.floating) else F32
  bound = check_num_steps(num_steps, max_steps)
  traced = concrete_int(num_steps) is None
  n = jnp.asarray(num_steps, jnp.int32)
  if traced:  # Out of range cannot raise in jit; run a valid count and poison the result instead.
    valid = (n >= 1) & (n <= bound)
    n = jnp.clip(n, 1, bound)
  state = sampler.init(x_T, key, n, bound)
  if sampler.peel_last:
    step, stop = (lambda s, i: sampler.step(s, i, False)), n - 1
  else:
    step, stop = sampler.step, n
  if not return_trajectory:
    state = jax.lax.fori_loop(0, stop, lambda i, s: step(s, i), state)
    if sampler.peel_last:
      state = sampler.step(state, n - 1, True)
    x = state.x
    x = jnp.where(valid, x, jnp.nan) if traced else x
    return x.astype(out_dtype)
  traj = jnp.zeros((bound + 1,) + state.x.shape, F32).at[0].set(state.x)

  def body(i, carry):
    s, tr = carry
    s = step(s, i)
    return s, jax.lax.dynamic_update_index_in_dim(tr, s.x, i + 1, 0)
  state, traj = jax.lax.fori_loop(0, stop, body, (state, traj))
  if sampler.peel_last:
    state = sampler.step(state, n - 1, True)
    traj = jax.lax.dynamic_update_index_in_dim(traj, state.x, n, 0)
  k = jnp.arange(bound + 1).reshape((-1,) + (1,) * state.x.ndim)
  traj = jnp.where(k > n, state.x[None], traj)
  x = state.x
  if traced:
    x, traj = jnp.where(valid, x, jnp.nan), jnp.where(valid, traj, jnp.nan)
  return x.astype(out_dtype), traj.astype(out_dtype)
