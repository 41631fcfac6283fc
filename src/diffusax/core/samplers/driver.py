"""The sampler type and the one loop that runs every sampler.

A sampler is a pair of pure functions plus its grid (optax style):

    state = sampler.init(x_T, key, n)      # State(x, key, n, aux, table)
    state = sampler.step(state, i)         # x_{t_i} -> x_{t_{i+1}}, i = 0 .. n - 1
    lv    = sampler.levels(state, i)       # grid.Levels of step i (for wrappers)

`run` drives it with one `lax.fori_loop(0, n, ...)`. With a traced n this
lowers to a single `while` loop with a traced trip count (the "equivalent" of a
scan allowed by the design: a scan has a static length and would pay for padded
steps); the time of step i is computed from (i, n), so a new n or any traced
option (eta, churn, guidance scale) reuses the compiled loop. Random draws of
step i use `jax.random.fold_in(key, i)` (sub-draws fold in again).

Keep `lax.cond` out of the loop body where possible: on XLA:CPU a cond splits
the step's elementwise fusion at its operands and results, so they are written
to and read back from memory every step (Heun's "no corrector on the last
step" cond made it 2.7-4x a bare scan at 64x32x32x3). Hence:

  * A sampler whose last step differs in control flow (Heun: one model call
    there, not two) also gives `step_at(state, i, last)` with `last` a static
    Python bool. `run` loops `step_at(., i, False)` over i < n - 1 and calls
    `step_at(., n - 1, True)` once after the loop: no branch on "last" inside
    the loop (the step is traced twice, the program is still compiled once).
    `step(state, i)` stays valid for every i, for wrappers such as inpainting.
  * A draw switched by a traced option (churn, eta) goes through `add_noise`,
    whose skipped branch passes x through untouched.

Per-step scalars (`plan`, `coefs`). Everything a step needs besides x (its
times, alpha and sigma, their ratios and reciprocals, the model's conversion
coefficients) is a function of (i, n) and the traced options only. A sampler
that gives `plan(i, n, last=None) -> pytree of scalars` reads them with
`coefs(state, plan, i, last)`: when n is a concrete int, `init_state` has
already computed them for every step at once (`jax.vmap` over i, before the
loop) into `State.table`, and the step slices entry i of each, which XLA fuses
into the step's one elementwise kernel, as a hand-written scan over precomputed
coefficient arrays does. With a traced n there is no table and the step
computes `plan(i, n, last)` itself. On XLA:CPU each scalar exp, sqrt or divide
left in the loop body is a small kernel of its own every step; with a trivial
denoiser at 64x32x32x3 the table made Heun and flow Heun steps 5-14% faster
(`benchmarks/sampler_overhead.py`).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


class State(NamedTuple):
  x: jax.Array        # [B, ...] float32, the current x_t
  key: jax.Array      # the sampling key (never split; folded with the step index)
  n: jax.Array        # int32 number of steps
  aux: Any = ()       # family-specific carry (multistep history)
  table: Any = None   # the sampler's `plan` for every step i < n ([n] leaves), when n is static


class Sampler(NamedTuple):
  init: Callable      # (x_T, key, n) -> State
  step: Callable      # (State, i) -> State, any 0 <= i < n (wrappers call this one)
  levels: Callable    # (State, i) -> grid.Levels
  step_at: Optional[Callable] = None  # (State, i, last: static bool) -> State; lets `run` peel the last step


def init_state(x_T, key, n, aux=(), plan: Optional[Callable] = None) -> State:
  """The loop's first state; with a plan and a concrete n, its table of per-step scalars (see module doc)."""
  table = None
  n_static = _concrete_int(n)
  if plan is not None and n_static is not None:
    table = jax.vmap(lambda i: plan(i, jnp.int32(n_static)))(jnp.arange(n_static, dtype=jnp.int32))
  return State(jnp.asarray(x_T, F32), key, jnp.asarray(n, jnp.int32), aux, table)


def coefs(state: State, plan: Callable, i, last=None):
  """The per-step scalars of step i: row i of the state's table, or `plan(i, n, last)` without one."""
  if state.table is None:
    return plan(i, state.n, last)
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


def _concrete_int(n) -> Optional[int]:
  if isinstance(n, jax.core.Tracer):
    return None
  try:
    return int(np.asarray(n))
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def check_num_steps(num_steps, max_steps=None, need_max=False):
  """Validates the step count; returns it as int32 (clipped to [1, max_steps] when traced)."""
  if max_steps is not None and (not isinstance(max_steps, (int, np.integer)) or max_steps < 1):
    raise ValueError(f"max_steps must be a static int >= 1, got {max_steps!r}")
  c = _concrete_int(num_steps)
  if c is not None:
    if c < 1:
      raise ValueError(f"num_steps must be >= 1, got {c}")
    if max_steps is not None and c > max_steps:
      raise ValueError(f"num_steps={c} exceeds max_steps={max_steps}")
  if need_max and max_steps is None:
    if c is None:
      raise ValueError("return_trajectory with a traced num_steps needs a static max_steps (the buffer size)")
    max_steps = c
  n = jnp.asarray(num_steps, jnp.int32)
  if c is None:
    n = jnp.clip(n, 1, max_steps if max_steps is not None else jnp.iinfo(jnp.int32).max)
  return n, max_steps


def run(sampler: Sampler, x_T, key, num_steps, *, return_trajectory: bool = False,
        max_steps: Optional[int] = None):
  """Runs `sampler` for num_steps (int or traced int32) from x_T [B, ...].

  Returns x0 [B, ...] in x_T's dtype, or (x0, trajectory) with trajectory
  [max_steps + 1, B, ...]: trajectory[k] is x after k steps for k <= n and the
  final sample for k > n.
  """
  x_T = jnp.asarray(x_T)
  out_dtype = x_T.dtype if jnp.issubdtype(x_T.dtype, jnp.floating) else F32
  n_static = _concrete_int(num_steps)  # a Python int lets `init` tabulate the per-step scalars
  n, max_steps = check_num_steps(num_steps, max_steps, need_max=return_trajectory)
  state = sampler.init(x_T, key, n if n_static is None else n_static)
  if sampler.step_at is None:
    step, stop = sampler.step, n
  else:
    step, stop = (lambda s, i: sampler.step_at(s, i, False)), n - 1
  if not return_trajectory:
    state = jax.lax.fori_loop(0, stop, lambda i, s: step(s, i), state)
    if sampler.step_at is not None:
      state = sampler.step_at(state, n - 1, True)
    return state.x.astype(out_dtype)
  traj = jnp.zeros((max_steps + 1,) + state.x.shape, F32).at[0].set(state.x)

  def body(i, carry):
    s, tr = carry
    s = step(s, i)
    return s, jax.lax.dynamic_update_index_in_dim(tr, s.x, i + 1, 0)
  state, traj = jax.lax.fori_loop(0, stop, body, (state, traj))
  if sampler.step_at is not None:
    state = sampler.step_at(state, n - 1, True)
    traj = jax.lax.dynamic_update_index_in_dim(traj, state.x, n, 0)
  k = jnp.arange(max_steps + 1).reshape((-1,) + (1,) * state.x.ndim)
  traj = jnp.where(k > n, state.x[None], traj)
  return state.x.astype(out_dtype), traj.astype(out_dtype)
