"""Importance-sampled times for L_vlb (improved DDPM, Nichol & Dhariwal 2021, sec. 3.3), and the
checkpoint of a state written before TrainState had its `aux` field."""
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusax.core import losses


def _full_history(values):
  """A history whose every step holds `history` copies scaled by 1..history of the given L_t."""
  v = np.asarray(values, np.float64)
  h = 10
  hist = v[:, None] * np.linspace(0.5, 1.5, h)[None, :]
  return {"losses": jnp.asarray(hist, jnp.float32), "count": jnp.full((len(v),), h, jnp.int32)}, hist


def test_probabilities_uniform_until_full_then_root_mean_square():
  hist = losses.importance_init(4)
  np.testing.assert_allclose(losses.importance_probs(hist), 0.25)
  partial = {"losses": hist["losses"].at[:, :].set(1.0), "count": jnp.asarray([10, 10, 9, 10], jnp.int32)}
  np.testing.assert_allclose(losses.importance_probs(partial), 0.25)  # one step short of its 10 values
  full, arr = _full_history([1.0, 2.0, 4.0, 8.0])
  w = np.sqrt(np.mean(arr ** 2, axis=1))
  want = w / w.sum() * (1 - 1e-3) + 1e-3 / 4
  np.testing.assert_allclose(losses.importance_probs(full), want, rtol=1e-5)


def test_draws_follow_the_probabilities_and_the_weights_make_the_estimate_unbiased():
  values = np.asarray([0.2, 1.0, 3.0, 0.5, 6.0])
  full, _ = _full_history(values)
  n = 200_000
  idx, w = jax.jit(lambda k: losses.importance_t(k, n, full))(jax.random.key(0))
  idx, w = np.asarray(idx), np.asarray(w, np.float64)
  p = np.asarray(losses.importance_probs(full), np.float64)
  freq = np.bincount(idx, minlength=5) / n
  np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p * (1 - p) / n).max())
  np.testing.assert_allclose(w, 1.0 / (5 * p[idx]), rtol=1e-5)
  est = w * values[idx]  # E_p[L_t / (T p_t)] = mean_t L_t
  assert abs(est.mean() - values.mean()) < 4 * est.std() / math.sqrt(n)


def test_history_is_a_ring_of_the_last_values_in_batch_order():
  hist = losses.importance_init(3, history=4)
  steps = jnp.asarray([1, 1, 2, 1, 1, 1, 0], jnp.int32)
  vals = jnp.arange(1.0, 8.0)
  out = losses.importance_update(hist, steps, vals)
  np.testing.assert_array_equal(out["count"], [1, 5, 1])
  # Step 1 got 1, 2, 4, 5, 6 in that order: the fifth overwrote the first slot.
  np.testing.assert_array_equal(out["losses"][1], [6.0, 2.0, 4.0, 5.0])
  np.testing.assert_array_equal(out["losses"][2], [3.0, 0, 0, 0])
  np.testing.assert_array_equal(out["losses"][0], [7.0, 0, 0, 0])


def test_a_checkpoint_from_before_the_aux_field_restores_with_an_empty_aux(tmp_path):
  from diffusax import checkpoint
  from diffusax.training import state as state_lib

  @jax.tree_util.register_dataclass
  @dataclasses.dataclass(frozen=True)
  class OldState:  # TrainState as it was: no aux
    step: Any
    params: Any
    ema_params: Any
    opt_state: Any
    rng: Any

  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  new = state_lib.create(params, __import__("optax").adam(1e-3), 0, 1)
  old = OldState(new.step, new.params, new.ema_params, new.opt_state, new.rng)
  ck = checkpoint.Checkpointer(str(tmp_path / "ck"), async_save=False, log=lambda m: None)
  ck.save(3, old, {})
  ck.wait()
  state, _ = ck.restore(jax.eval_shape(lambda: new))
  assert isinstance(state, state_lib.TrainState) and state.aux == ()
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new), strict=True):
    np.testing.assert_array_equal(a, b)
  # And a state with an aux round-trips it.
  with_aux = new.replace(step=new.step + 1, aux={"vlb_history": losses.importance_init(5)})
  ck.save(4, with_aux, {})
  ck.wait()
  state, _ = ck.restore(jax.eval_shape(lambda: with_aux), step=4)
  np.testing.assert_array_equal(state.aux["vlb_history"]["count"], np.zeros(5))
  ck.close()
