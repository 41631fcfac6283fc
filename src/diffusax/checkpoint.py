"""Checkpoints with orbax: the full TrainState plus JSON metadata.

Each checkpoint step holds two items:
  state  the TrainState pytree (params, EMA, optimizer, RNG), restored straight
         onto the target shardings given by an abstract state;
  meta   JSON: the data iterator position, the model signature (every parameter
         path with its shape and dtype, and the network settings) and free-form
         run information.
A restore reads `meta` first and refuses a checkpoint whose model signature
differs from the current model, naming the differences, before any array is read.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
  """The checkpoint was written by a different model."""


def model_signature(abstract_params, model_settings: dict) -> dict:
  """{'params': {path: [shape, dtype]}, 'model': settings} for comparing checkpoints."""
  flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  shapes = {jax.tree_util.keystr(p): [list(map(int, x.shape)), str(np.dtype(x.dtype))] for p, x in flat}
  return {"params": shapes, "model": model_settings}


def signature_diff(saved: dict, current: dict, limit: int = 5) -> list[str]:
  out = []
  sm, cm = saved.get("model", {}), current.get("model", {})
  for k in sorted(set(sm) | set(cm)):
    if sm.get(k) != cm.get(k):
      out.append(f"model.{k}: checkpoint {sm.get(k)!r}, now {cm.get(k)!r}")
  sp, cp = saved.get("params", {}), current.get("params", {})
  for k in sorted(set(sp) | set(cp)):
    if sp.get(k) != cp.get(k):
      out.append(f"param {k}: checkpoint {sp.get(k)}, now {cp.get(k)}")
  return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


class Checkpointer:
  """Saves and restores (TrainState, meta) under `directory`, keeping the last `keep`."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, meta: dict) -> None:
    self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def read_meta(self, step: int) -> dict:
    out = self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

  def restore(self, abstract_state, signature: dict | None = None, step: int | None = None):
    """Restores (state, meta) at `step` (default latest) onto abstract_state's shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    meta = self.read_meta(step)
    if signature is not None:
      diff = signature_diff(meta.get("signature", {}), signature)
      if diff:
        raise CheckpointMismatch(
            f"checkpoint {self.directory} step {step} was written by a different model:\n  "
            + "\n  ".join(diff) + "\nUse a new --workdir for this model, or the config that wrote it.")
    out = self.manager.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return out["state"], meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree, shardings) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or structs) carrying the given shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
