"""Checkpoints with orbax: the full TrainState plus JSON metadata.

Each checkpoint step holds two items:
  state  the TrainState pytree (params, EMA, optimizer, RNG), restored straight
         onto the target shardings given by an abstract state;
  meta   JSON: the data iterator position, the model signature (every parameter
         path with its shape and dtype, and the network settings) and free-form
         run information.
A restore reads `meta` first and refuses a checkpoint whose model signature
differs from the current model, naming the differences, before any array is read.
`restore(..., part=("ema_params", 0))` reads one subtree of the state only (the
first EMA, for sampling and evaluation): orbax opens only those arrays, the rest
(parameters, optimizer moments, other EMAs) is never read from disk.

Safety (see parallel/integrity.py for the checksum):
  * save: one jitted reduction gives a checksum and a finiteness flag per array;
    a state with a non-finite value is never written (`NonFiniteState` names the
    step and the first bad leaf); the checksums go into `meta`.
  * restore: the restored arrays are checksummed again and compared with `meta`;
    a mismatch, or an unreadable checkpoint, raises `CheckpointCorrupted` naming
    it, or with `fallback=True` moves it aside to `<step>.corrupt` and tries the
    next older one. A checkpoint whose meta records no checksums is refused
    (`CheckpointUnverified`) unless the Checkpointer allows unverified restores
    (config key train.allow_unverified_restore).
  * a save that fails (disk full, read-only, permissions) raises
    `CheckpointSaveError` naming the step, the cause and the last good step. An
    async save's error surfaces at the next save or wait; orbax writes into a
    temporary folder and renames it when complete, so earlier checkpoints stay
    intact and a half-written one is ignored on restore.
Multi-host: every process calls save/restore (orbax writes each array's shards
from the processes that hold them); the checksum reduction is a collective
whose replicated result every process sees; only process 0 renames folders.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from diffusax import storage
from diffusax.parallel import integrity


class CheckpointError(Exception):
  """A user-facing checkpoint failure; main prints its message on one line and exits non-zero."""


class CheckpointMismatch(CheckpointError, ValueError):
  """The checkpoint was written by a different model."""


class CheckpointCorrupted(CheckpointError):
  """The checkpoint's arrays do not match the checksums recorded when it was saved, or cannot be read."""


class CheckpointUnverified(CheckpointError):
  """The checkpoint records no checksums, and restoring unverified was not allowed."""


class CheckpointSaveError(CheckpointError):
  """A checkpoint could not be written (disk full, read-only, permissions)."""


class NonFiniteState(CheckpointError):
  """The state to save holds NaN or Inf; it is not written."""


def model_signature(abstract_params, model_settings: dict) -> dict:
  """{'params': {path: [shape, dtype]}, 'model': settings} for comparing checkpoints."""
  flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  shapes = {jax.tree_util.keystr(p): [list(map(int, x.shape)), str(np.dtype(x.dtype))] for p, x in flat}
  return {"params": shapes, "model": model_settings}


# Network options added after checkpoints were written, with the value that leaves the network as it was:
# at that value an option is the same as its absence (either side of a comparison), so checkpoints from
# before the option match. The programs also leave them out of new signatures at that value.
NEUTRAL_KWARGS = {"fourier_features": [], "guidance_embed": False, "low_res_channels": 0, "aug_embed": False,
                  "cond_dropout": False}


def _without_neutral(model: dict) -> dict:
  kw = model.get("kwargs")
  if not isinstance(kw, dict):
    return model
  return {**model, "kwargs": {k: v for k, v in kw.items() if not (k in NEUTRAL_KWARGS and v == NEUTRAL_KWARGS[k])}}


def signature_diff(saved: dict, current: dict, limit: int = 5) -> list[str]:
  out = []
  sm, cm = _without_neutral(saved.get("model", {})), _without_neutral(current.get("model", {}))
  for k in sorted(set(sm) | set(cm)):
    if sm.get(k) != cm.get(k):
      out.append(f"model.{k}: checkpoint {sm.get(k)!r}, now {cm.get(k)!r}")
  sp, cp = saved.get("params", {}), current.get("params", {})
  for k in sorted(set(sp) | set(cp)):
    if sp.get(k) != cp.get(k):
      out.append(f"param {k}: checkpoint {sp.get(k)}, now {cp.get(k)}")
  return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


class Checkpointer:
  """Saves and restores (TrainState, meta) under `directory`, keeping the last `keep`.

  `log` receives one-line notices (e.g. a corrupted checkpoint skipped with fallback).
  `allow_unverified`: restore a checkpoint whose meta records no checksums (with a
  warning) instead of refusing it with `CheckpointUnverified`.
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
               replicated_sharding=None, log: Callable[[str], None] = print, allow_unverified: bool = False):
    self.directory = storage.resolve(directory)
    self.allow_unverified = allow_unverified
    # Step folders are created synchronously: a failure to create one (read-only disk) then raises in
    # save() itself, instead of leaving orbax's commit thread waiting minutes for a folder that never comes.
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "meta"))
    except (OSError, ValueError) as e:
      raise CheckpointSaveError(f"cannot use checkpoint directory {self.directory}: {_one_line(e)}") from None
    self._audit = integrity.make_audit(replicated_sharding)
    self._log = log
    self._pending: int | None = None  # Step whose (async) write has not been confirmed yet.
    self._last_good = self.latest_step()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def audit(self, state) -> tuple[dict[str, str], list[str]]:
    """({leaf path: checksum}, [non-finite leaf paths]) of a state."""
    return integrity.audit(state, self._audit)

  def _failed(self, step: int, e: BaseException) -> CheckpointSaveError:
    good = (f"The last good checkpoint (step {self._last_good}) is intact; fix the disk (space, permissions) "
            "and run again to resume from it." if self._last_good is not None else
            "No checkpoint has been written in this directory; fix the disk (space, permissions) and run again.")
    return CheckpointSaveError(f"could not write checkpoint step {step} in {self.directory}: {_one_line(e)}. {good}")

  def save(self, step: int, state, meta: dict) -> None:
    """Checks finiteness, records checksums in meta, then saves (async when configured)."""
    step = int(step)
    self._confirm()  # The previous save must have succeeded before this one counts on it.
    checks, bad = self.audit(state)
    if bad:
      raise NonFiniteState(f"the state at step {step} has non-finite values (first in {bad[0]}"
                           + (f", and {len(bad) - 1} more arrays" if len(bad) > 1 else "")
                           + "); it was not saved. Lower the learning rate or check the data; "
                           + (f"the last good checkpoint is step {self._last_good}." if self._last_good is not None
                              else "no checkpoint has been written in this directory yet."))
    meta = {**meta, "checksums": checks, "checksum_method": integrity.METHOD}
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for I/O failures.
      raise self._failed(step, e) from e
    self._pending = step

  def _confirm(self) -> None:
    """Waits for the pending async save and turns its failure into CheckpointSaveError."""
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._failed(step, e) from e
    if self.manager.latest_step() != step:
      raise self._failed(step, RuntimeError("the checkpoint was not finalised"))
    self._last_good = step

  def read_meta(self, step: int) -> dict:
    out = self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

  def restore(self, abstract_state, signature: dict | None = None, step: int | None = None,
              fallback: bool = False, part: tuple = ()):
    """Restores (state, meta) at `step` (default latest) onto abstract_state's shardings.

    The arrays are verified against the checksums in meta. With `fallback`, a
    corrupted latest checkpoint is moved aside and the next older one is tried.
    `part`: the path of one subtree of the saved state to read alone, as
    attribute names then sequence indices, e.g. ("ema_params", 0) for
    state.ema_params[0]; `abstract_state` is then that subtree's abstract value
    and the subtree is returned (verified against the same recorded checksums).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    while True:
      try:
        return self._restore_verified(abstract_state, signature, step, tuple(part))
      except CheckpointCorrupted as e:
        older = [s for s in self.all_steps() if s < step]
        if not fallback or not older:
          hint = (f" Set --config.train.ckpt_fallback=True to resume from the newest checkpoint that verifies "
                  f"(older steps: {sorted(older)})." if older and not fallback else "")
          raise CheckpointCorrupted(f"{e}{hint}") from None
        self._log(f"warning: {e}; moving it to {step}.corrupt and trying step {max(older)}")
        self._set_aside(step)
        step = max(older)

  def _restore_verified(self, abstract_state, signature, step, part=()):
    where = f"checkpoint {storage.join(self.directory, str(step))}"
    try:
      meta = self.read_meta(step)
    except Exception as e:  # noqa: BLE001
      raise CheckpointCorrupted(f"{where} is unreadable: meta: {_one_line(e)}") from None
    if signature is not None:
      diff = signature_diff(meta.get("signature", {}), signature)
      if diff:
        raise CheckpointMismatch(
            f"checkpoint {self.directory} step {step} was written by a different model:\n  "
            + "\n  ".join(diff) + "\nUse a new --workdir for this model, or the config that wrote it.")
    recorded = meta.get("checksums")
    if recorded is None and not self.allow_unverified:  # Refused before any array is read.
      raise CheckpointUnverified(
          f"{where} records no checksums in its meta (written by a diffusax from before checksums, or its "
          "meta was replaced), so its arrays cannot be verified. To restore it anyway, set "
          "--config.train.allow_unverified_restore=True")
    try:
      if part:
        state = self._restore_part(int(step), abstract_state, part)
      else:
        absent = self._absent_empty_fields(int(step), abstract_state)
        target = abstract_state if not absent else {
            f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state) if f.name not in absent}
        out = self.manager.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        state = out["state"]
        if absent:  # Fields added to the state since: empty (no arrays), so nothing to read or verify.
          state = type(abstract_state)(**state, **{n: getattr(abstract_state, n) for n in absent})
    except Exception as e:  # noqa: BLE001 - a damaged file fails deep inside tensorstore.
      raise CheckpointCorrupted(f"{where} is unreadable: {_one_line(e)}") from None
    if recorded is None:
      self._log(f"warning: {where} has no checksums; restored unverified (train.allow_unverified_restore)")
      return state, meta
    checks, _ = self.audit(state)
    prefix = part_keystr(part)
    checks = {prefix + p: c for p, c in checks.items()}
    bad = [p for p in checks if recorded.get(p) != checks[p]]
    if bad:
      raise CheckpointCorrupted(
          f"{where} is corrupted: array {bad[0]} has checksum {checks[bad[0]]} but {recorded.get(bad[0])} "
          f"was recorded at save" + (f" ({len(bad)} arrays differ)" if len(bad) > 1 else ""))
    return state, meta

  def _absent_empty_fields(self, step: int, abstract_state) -> list[str]:
    """Fields of a dataclass state that hold no arrays here and that the saved state lacks (a checkpoint
    written before the field existed, e.g. TrainState.aux): restored as they are in `abstract_state`."""
    if not dataclasses.is_dataclass(abstract_state):
      return []
    empty = [f.name for f in dataclasses.fields(abstract_state) if not jax.tree.leaves(getattr(abstract_state, f.name))]
    if not empty:
      return []
    saved = ocp.PyTreeCheckpointHandler().metadata(storage.path(self.directory) / str(step) / "state")
    saved = getattr(saved, "tree", saved)
    return [n for n in empty if isinstance(saved, dict) and n not in saved]

  def _restore_part(self, step: int, abstract, part: tuple):
    """Reads only the subtree at `part` of the saved state (orbax partial restore).

    The saved tree's structure (from the checkpoint's metadata, no array read)
    gives the siblings along the path: dict levels keep only the key on the
    path, list levels (tuples are saved as lists) keep their length with every
    other entry a placeholder that is not read.
    """
    path = storage.path(self.directory) / str(step) / "state"
    reader = ocp.PyTreeCheckpointHandler()  # On the item's folder: the manager's handler registry is not involved.
    saved = reader.metadata(path)
    saved = getattr(saved, "tree", saved)
    skip = lambda tree: jax.tree.map(lambda _: ocp.PLACEHOLDER, tree)  # noqa: E731

    def target(node, keys):
      if not keys:
        return abstract
      key, rest = keys[0], keys[1:]
      if isinstance(node, (list, tuple)):
        return [target(v, rest) if i == key else skip(v) for i, v in enumerate(node)]
      return {key: target(node[key], rest)}

    try:
      item = target(saved, part)
    except (KeyError, IndexError, TypeError):
      raise KeyError(f"the saved state has no part {part_keystr(part)!r}") from None
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    node = reader.restore(path, args=args)
    for key in part:
      node = node[key]
    return node

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      src = storage.join(self.directory, str(step))
      dst = src + ".corrupt"
      n = 1
      while storage.exists(dst):
        dst, n = f"{src}.corrupt{n}", n + 1
      storage.move_tree(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"diffusax_set_aside_{step}")
    self.manager.reload()
    if self._last_good == step:
      self._last_good = self.latest_step()

  def wait(self) -> None:
    self._confirm()
    self.manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= 400 else text[:400] + " ..."


def part_keystr(part: tuple) -> str:
  """jax keystr of a state subtree: attribute names then sequence indices, ("ema_params", 0) -> ".ema_params[0]"."""
  return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in part)


def abstract_like(tree, shardings) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or structs) carrying the given shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
