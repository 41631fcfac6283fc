"""How the training loop holds the state and runs one step: `make_runner(setup)` -> `Runner`.

The strategy (`mesh.strategy`) decides: "mesh" jits the program's train step once over the (data,
fsdp) mesh with the state's shardings and donation; "pmap" keeps a replica per device and `pmean`s
gradients (parallel/pmap.py). `compile_ahead` compiles the mesh step for the first batch on a thread
while the training program initialises or restores the state (benchmarks/compile_time.py).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax

from diffusax import checkpoint as ckpt_lib
from diffusax.data import pipeline
from diffusax.parallel import mesh as mesh_lib
from diffusax.parallel import pmap as pmap_lib
from diffusax.programs.setup import to_global
from diffusax.training import step as step_lib

if TYPE_CHECKING:
  from diffusax.programs.train import Setup


@dataclasses.dataclass
class Runner:
  """The parallel strategy: how the state is held during the loop and how one step runs.

  to_run(state) / from_run(state) convert between the canonical global state
  (checkpoints, eval, sampling) and the loop's form; step(state, host_batch)
  runs one jitted step on this process' rows.
  """
  to_run: Any
  from_run: Any
  step: Any
  compile_ahead: Any = None  # (host batch) -> compiles the step for batches like it (see make_runner).


class _Ahead:
  """Runs `fn()` on a daemon thread; `result()` waits for it and re-raises its error.

  The train step's trace, lowering and compile (or persistent-cache load) then overlap the
  state's init or restore and the input pipeline's start: XLA and most of the loading run
  without the GIL, so a warm process reaches its first step seconds sooner (benchmarks/compile_time.py).
  """

  def __init__(self, fn):
    import threading
    self._out = {}

    def run():
      try:
        self._out["value"] = fn()
      except BaseException as e:  # noqa: BLE001 - handed to result().
        self._out["error"] = e

    self._thread = threading.Thread(target=run, name="diffusax-compile-ahead", daemon=True)
    self._thread.start()

  def result(self):
    self._thread.join()
    if "error" in self._out:
      raise self._out["error"]
    return self._out.get("value")


def cond_config(u: Setup) -> step_lib.CondConfig | None:
  """The train and eval steps' image condition of a conditional task (task.*), else None."""
  t = u.s.task
  return step_lib.CondConfig(image_dropout=t.image_dropout, aug_max=t.aug_max) if t.enabled else None


def compile_ahead(runner: Runner, it: pipeline.Loader) -> _Ahead | None:
  """Starts compiling `runner`'s step for `it`'s batches on a thread (None on the pmap path); the
  training program starts it before the state's init and waits on `.result()` before the first step."""
  if runner.compile_ahead is None:
    return None
  first = it.batches[it.position]  # Read without moving the iterator.
  return _Ahead(lambda: runner.compile_ahead(first))


def make_runner(u: Setup) -> Runner:
  """The strategy's Runner; its jitted step is traced once (counted as "train_step" in u.traces)."""
  s = u.s
  batch_keys = ("x", "label")
  if s.mesh_strategy == "pmap":
    devices = list(u.mesh.devices.flat)
    n = len(devices)
    fn = step_lib.make_train_step(u.module.apply, u.tx, u.lr_fn, u.schedule, s.loss, s.ema_decays, s.ema_warmup,
                                  axis_name=pmap_lib.AXIS, axis_size=n, ema_gammas=s.ema.gammas)
    pstep = jax.pmap(u.traces.wrap("train_step", fn), axis_name=pmap_lib.AXIS, devices=devices, donate_argnums=0)

    def step(state, batch):
      state, metrics = pstep(state, pmap_lib.split_batch({k: v for k, v in batch.items() if k in batch_keys}, n))
      return state, jax.tree.map(lambda m: m[0], metrics)

    return Runner(to_run=lambda st: pmap_lib.replicate(st, devices),
                  from_run=lambda st: pmap_lib.unreplicate(st, u.state_shardings), step=step)

  train_step = step_lib.make_train_step(u.module.apply, u.tx, u.lr_fn, u.schedule, s.loss, s.ema_decays,
                                        s.ema_warmup, ordered_mesh=u.mesh if s.mesh_ordered_reduction else None,
                                        ema_gammas=s.ema.gammas, cond=cond_config(u))
  batch_sh = {"x": mesh_lib.batch_sharding(u.mesh, 1 + len(u.sample_shape)),
              "label": mesh_lib.batch_sharding(u.mesh, 1)}
  if u.cond_shape is not None:
    batch_sh["cond_image"] = mesh_lib.batch_sharding(u.mesh, 1 + len(u.cond_shape))
  rep = mesh_lib.replicated(u.mesh)
  step_fn = jax.jit(u.traces.wrap("train_step", train_step), in_shardings=(u.state_shardings, batch_sh),
                    out_shardings=(u.state_shardings, rep), donate_argnums=0)

  ahead = {}  # batch signature -> compiled step (compile_ahead)

  def signature(batch):
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))

  def compile_ahead(host_batch):
    """Traces, lowers and compiles the step for the state shardings and global batches shaped like
    this process' `host_batch`, so its first call runs at once; other batches go through the jit."""
    host = {k: v for k, v in host_batch.items() if k in batch_sh}
    glob = {k: jax.ShapeDtypeStruct((v.shape[0] * jax.process_count(),) + tuple(v.shape[1:]), v.dtype,
                                    sharding=batch_sh[k]) for k, v in host.items()}
    state = ckpt_lib.abstract_like(u.abstract_state, u.state_shardings)
    ahead[signature(glob)] = step_fn.lower(state, glob).compile()

  def step(state, batch):
    glob = to_global({k: v for k, v in batch.items() if k in batch_sh}, u.mesh)
    fn = ahead.get(signature(glob), step_fn) if ahead else step_fn
    return fn(state, glob)

  return Runner(to_run=lambda st: st, from_run=lambda st: st, step=step, compile_ahead=compile_ahead)
