"""The training program: `train_and_evaluate(settings, workdir)`.

Set-up order: open the training split, then the shared model set-up
(`programs.setup.model_setup`: dataset description, mesh, the network init
evaluated abstractly for parameter shardings), then what training adds
(optimizer, abstract TrainState and its shardings); then either restore the
latest checkpoint in the workdir onto those shardings or initialise under
`jit` with them as out_shardings. The full evaluation (train.full_eval) is
handed in by the caller (`evaluator=`); this module imports no other program. The train step is jitted once with the state
donated. The loop syncs with the host only at log, eval and checkpoint steps.

Strategies (`mesh.strategy`): "mesh" jits the step over the (data, fsdp) mesh
with parameters and optimizer state sharded over fsdp; "pmap" keeps a replica
per device and `pmean`s gradients (parallel/pmap.py); `programs/runner.py` holds both. Either way checkpoints,
eval and sampling use the canonical global state on the mesh, so a checkpoint
restores onto any mesh shape or strategy.

Preemption: SIGTERM/SIGINT end the loop after the current step with a saved
checkpoint and a normal return (training/preemption.py). Checkpoints are
checksummed and never written with non-finite values (checkpoint.py).
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusax import checkpoint as ckpt_lib
from diffusax import storage
from diffusax.data import pipeline
from diffusax.parallel import integrity
from diffusax.parallel import mesh as mesh_lib
from diffusax.programs import settings as settings_lib
from diffusax.programs import setup as setup_lib
from diffusax.programs import setup_latent, setup_task
from diffusax.programs.logs import Logger
from diffusax.programs.settings import ConfigError, Settings
from diffusax.programs.runner import Runner, compile_ahead, cond_config, make_runner  # noqa: F401 (re-exported)
from diffusax.programs.setup import (ModelSetup, TraceCounts, open_checkpointer, state_shardings,  # noqa: F401
                                     to_global)  # (re-exported: part of this module's API)
from diffusax.sampling import generate
from diffusax.training import optimizer as optim_lib
from diffusax.training import preemption
from diffusax.training import state as state_lib
from diffusax.training import step as step_lib


@dataclasses.dataclass(frozen=True)
class Setup(ModelSetup):
  """The model set-up plus what training adds: the training split, the optimizer, the state's shardings.

  `traces` counts the tracings of the jitted functions built from it ("init",
  "train_step", "eval_loss"); `init_fn` is the state init, compiled once on first use.
  """
  source: Any = None
  tx: Any = None
  lr_fn: Any = None
  abstract_state: Any = None
  state_shardings: Any = None
  traces: TraceCounts = dataclasses.field(default_factory=TraceCounts)
  init_fn: Any = None


def setup(s: Settings, devices=None, traces: TraceCounts | None = None) -> Setup:
  """Validates everything and computes shapes and shardings; no device computation.

  `devices`: see `setup.model_setup`. `traces`: the caller's trace counter (default a new one).
  """
  try:
    source = pipeline.open_source(s.data.name, s.data.split, s.data.data_dir)
    num_classes = pipeline.num_classes(s.data.name, s.data.data_dir)
  except pipeline.DataError as e:  # Other failures keep their own type and traceback.
    raise ConfigError(f"data: {e}") from None
  m = setup_lib.model_setup(s, devices)
  try:
    mesh_lib.check_batch(m.s.train.batch_size, m.mesh, jax.process_count())
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None
  if m.s.train.batch_size > len(source):
    raise ConfigError(f"train.batch_size {m.s.train.batch_size} exceeds the {len(source)} training examples")
  if s.data.eval_split and s.train.eval_batches:
    try:
      n_eval = len(pipeline.open_source(s.data.name, s.data.eval_split, s.data.data_dir))
    except pipeline.DataError as e:
      raise ConfigError(f"data.eval_split: {e}") from None
    if m.s.train.batch_size > n_eval:
      raise ConfigError(f"data.eval_split {s.data.eval_split!r} has {n_eval} examples, fewer than one batch "
                        f"(train.batch_size {m.s.train.batch_size}): the eval loss needs a full batch; set "
                        f"train.eval_batches=0 or data.eval_split='' to skip it, or a smaller batch")
  return for_training(m, source, traces)


def for_training(m: ModelSetup, source, traces: TraceCounts | None = None) -> Setup:
  """The training set-up on a model set-up: optimizer, abstract TrainState and its shardings, and the
  state init (compiled once; the persistent compilation cache serves it to later processes)."""
  s = m.s
  settings_lib.time_sampler_check(s)
  if s.model_kwargs.get("guidance_embed"):
    raise ConfigError(f"model.{s.model_name}.guidance_embed=True: a w-conditioned network is trained by "
                      "--mode=distill with distill.kind='guided' (from a CFG teacher), not by --mode=train")
  if s.mesh_strategy == "pmap" and jax.process_count() > 1:
    raise ConfigError(f"mesh.strategy='pmap' runs in one process; this run has {jax.process_count()} "
                      "processes: use mesh.strategy='mesh'")
  traces = TraceCounts() if traces is None else traces
  tx, lr_fn = optim_lib.make(s.optim)
  aux = step_lib.initial_aux(s.loss, m.schedule)
  abstract_state = jax.eval_shape(lambda p: state_lib.create(p, tx, s.seed, s.num_ema, aux), m.abstract_params)
  shardings = state_shardings(abstract_state, m.param_shardings, m.mesh)
  fields = {f.name: getattr(m, f.name) for f in dataclasses.fields(ModelSetup)}
  return Setup(**fields, source=source, tx=tx, lr_fn=lr_fn, abstract_state=abstract_state,
               state_shardings=shardings, traces=traces,
               init_fn=_make_init(m, tx, shardings, traces))


# XLA options of the one-off state init. Its program is hundreds of small RNG fusions (one per
# parameter initializer; the forward pass is dead code), and optimising them dominated start-up:
# digits measured 8 s at the default level against ~1.5 s at level 0 (benchmarks/compile_time.py).
# It runs once per run, so its speed does not matter. The RNG bits are integer arithmetic and the
# same; a float transform may round differently (digits: 1 ulp in 2 of 840 arrays against the
# default level), so fresh runs start from that slightly different, still fixed, init.
INIT_COMPILER_OPTIONS = (("xla_backend_optimization_level", 0), ("xla_llvm_disable_expensive_passes", True))


def _make_init(m: ModelSetup, tx, shardings, traces: TraceCounts):
  """Lazily compiled `seed key -> fresh TrainState` on `shardings` (params from fold_in(key, 0x1A17)).

  Calls the set-up's `param_init` (its trace is reused, not redone) and compiles with
  INIT_COMPILER_OPTIONS on the first call; later calls reuse the executable.
  """
  s = m.s

  def init(seed_key):
    params = mesh_lib.unbox(m.param_init(jax.random.fold_in(seed_key, 0x1A17)))
    return state_lib.create(params, tx, s.seed, s.num_ema, step_lib.initial_aux(s.loss, m.schedule))

  jitted = jax.jit(traces.wrap("init", init), out_shardings=shardings)
  compiled = []

  def run(seed_key):
    if not compiled:
      compiled.append(jitted.lower(seed_key).compile(compiler_options=dict(INIT_COMPILER_OPTIONS)))
    return compiled[0](seed_key)

  return run


def init_state(u: Setup):
  """A fresh TrainState on the state shardings (the set-up's one compiled init)."""
  return u.init_fn(jax.random.key(u.s.seed))


def make_iterator(u: Setup, seed_offset: int = 0, source=None, *, train: bool = True) -> pipeline.Loader:
  """This process' batches of the training source (or `source`), augmented when `train`, through grain
  with data.workers / data.prefetch (evaluation reads in this process: a few batches)."""
  s = u.s
  transform = (setup_latent.transform(u.latent, train) if u.latent is not None
               else pipeline.make_transform(u.data.transform, s.data, train=train))
  if s.task.enabled:  # The condition of each example (from its index alone; data.tasks).
    from diffusax.data import tasks
    transform = tasks.Conditioned(transform, s.task.make())
  return pipeline.Loader(source if source is not None else u.source, s.train.batch_size,
                         seed=s.seed + seed_offset, process_index=jax.process_index(),
                         process_count=jax.process_count(), transform=transform,
                         workers=s.data.workers if train else 0, prefetch=s.data.prefetch if train else 0)


def write_samples(u: Setup, params, step: int, workdir: str, logger: Logger, gen=None) -> str:
  """Generates the sample grid with EMA params and writes it as PNG."""
  s = u.s
  if s.task.enabled:  # Conditions | samples | ground truth of held-out examples.
    return setup_task.write_samples(u, params, step, workdir, logger, gen)
  if gen is None:
    gen = make_generator(u)
  if u.num_classes and s.class_conditional:
    labels = np.repeat(np.arange(u.num_classes), s.sample.per_class).astype(np.int32)
    rows = u.num_classes
  else:
    labels = None
    rows = s.sample.per_class
  n = len(labels) if labels is not None else (s.sample.per_class ** 2 if len(u.sample_shape) == 3 else 4096)
  key = jax.random.fold_in(jax.random.key(s.seed), 0x5A4D)
  x = gen(params, np.arange(n), labels, jnp.float32(s.sample.guidance_scale), key)
  if u.latent is not None:  # Latent samples, shown decoded.
    x = setup_latent.decoder(u.latent)(u.latent.params(u.mesh, logger.info), x)
  x = np.asarray(x)
  if len(u.sample_shape) == 3:
    img = generate.image_grid(generate.to_uint8(x), rows, upscale=max(1, 64 // u.sample_shape[0]))
  else:
    img = generate.scatter_image(x)
  path = storage.join(workdir, "samples.png")
  if jax.process_index() == 0:
    generate.save_png(path, img)
    generate.save_png(storage.join(workdir, f"samples_{step:07d}.png"), img)
    logger.image("samples", img, step)
  return path


def make_generator(u: Setup):
  s = u.s
  if s.task.enabled:
    return setup_task.make_generator(u)
  spec = generate.SamplerSpec(s.sample.method, s.sample.num_steps, s.sample.eta, s.sample.clip_x0,
                              s.sample.spacing, s.sample.order)
  return generate.make_generate(u.module, u.schedule, s.loss.target, spec,
                                null_class=s.loss.null_class, sample_shape=u.sample_shape)


def evaluate_loss(u: Setup, eval_fn, params, eval_source) -> float:
  if eval_source is None or u.s.train.eval_batches == 0:
    return float("nan")
  it = make_iterator(u, source=eval_source, seed_offset=1, train=False)
  vals = []
  for i in range(min(u.s.train.eval_batches, it.batches_per_epoch)):
    batch = to_global({k: v for k, v in next(it).items() if k in ("x", "label", "cond_image")}, u.mesh)
    vals.append(eval_fn(params, batch, jax.random.fold_in(jax.random.key(u.s.seed + 1), i)))
  it.close()
  return float(np.mean([float(v) for v in vals]))


def train_and_evaluate(s: Settings, workdir: str, devices=None, *, evaluator=None,
                       traces: TraceCounts | None = None) -> dict:
  """Trains (resuming from the workdir when it has a checkpoint), then samples and evaluates.

  On SIGTERM/SIGINT it saves after the current step and returns early with
  result["preempted"] = True (no final eval or samples). `devices`: see `setup`.
  `evaluator`: with train.full_eval, the evaluation to run at every eval
  interval and at the end, as a factory `(setup, traces) -> object with
  .evaluate(params, step, workdir, logger) -> dict` (`programs.evaluate.Evaluator`;
  the caller hands it in, so this program does not import the evaluation one).
  Built before training, so its refusals come before any device work.
  `traces`: the caller's trace counter (tests read it).
  """
  u = setup(s, devices, traces)
  s = u.s
  ev = None
  if s.train.full_eval:
    if evaluator is None:
      raise ConfigError("train.full_eval=True needs the evaluation program: run through diffusax.main, or "
                        "pass evaluator=diffusax.programs.evaluate.Evaluator")
    ev = evaluator(u, u.traces)  # Compiles on first use, then serves every eval interval.
  storage.makedirs(workdir)
  logger = Logger(workdir, enabled=jax.process_index() == 0)
  logger.info(u.sharding_summary)
  ckpt = snaps = None
  try:
    ckpt = open_checkpointer(u, workdir, logger)
    if s.ema.snapshot_every:
      snaps = setup_lib.open_snapshots(u, workdir, logger)
    return _train_loop(u, workdir, logger, ckpt, ev, snaps)
  except BaseException:
    # Stop the background writers (orbax, the event file) so the process can exit with the error
    # instead of hanging on their threads; a failed save is not retried.
    for c in (ckpt, snaps):
      if c is not None:
        try:
          c.manager.close()
        except Exception:  # noqa: BLE001 - the same failure again.
          pass
    logger.close()
    raise


def _check_replicas(state, step: int, logger: Logger) -> None:
  """Every process must hold bit-identical copies of the replicated arrays (else: a fault or
  non-deterministic arithmetic); the checkpoint is already written either way."""
  n, bad = integrity.diverged_replicas(state)
  if bad:
    raise RuntimeError(f"after step {step} the copies of {len(bad)} of {n} replicated arrays differ between "
                       f"devices or processes, first {bad[0]}; the checkpoint was saved from process 0's copy")
  logger.info(f"replica check: {n} replicated arrays are bit-identical on all {jax.process_count()} processes")


def _snapshot_writer(u: Setup, snaps: ckpt_lib.Checkpointer | None, logger: Logger):
  """(state, step) -> writes the power-function EMAs of `state` as snapshot `step` (once per step).

  A snapshot is its own small orbax item (WORKDIR/ema_snapshots/<step>: the tuple of
  power EMAs, meta with their sigma_rels, exponents, the model signature and checksums).
  A resumed run that reaches a step whose snapshot is already written (the run was
  killed after the snapshot, before the next checkpoint) leaves it: the resumed run
  is bit-identical, so it would write the same arrays.
  """
  if snaps is None:
    return lambda state, step: None
  s, first = u.s, len(u.s.ema_decays)
  have = set(snaps.all_steps())
  reported = []

  def write(state, step: int) -> None:
    if step in have:
      return
    emas = tuple(state.ema_params[first:])
    if not reported:
      nbytes = sum(x.nbytes for x in jax.tree.leaves(emas))
      logger.info(f"EMA snapshots every {s.ema.snapshot_every} steps in {snaps.directory}: "
                  f"{len(emas)} power EMAs (sigma_rel {list(s.ema.sigma_rels)}), {nbytes / 2**20:.2f} MiB per snapshot")
      reported.append(nbytes)
    snaps.save(step, emas, {"kind": "ema_snapshot", "step": step, "signature": u.signature,
                            "sigma_rels": list(s.ema.sigma_rels), "gammas": list(s.ema.gammas)})
    have.add(step)

  write.bytes = reported
  return write


def _train_loop(u: Setup, workdir: str, logger: Logger, ckpt: ckpt_lib.Checkpointer, evaluator=None,
                snaps: ckpt_lib.Checkpointer | None = None) -> dict:
  """`evaluator`: the object built by train_and_evaluate's factory, run at every eval interval and at the end.
  `snaps`: the EMA snapshot store when ema.snapshot_every > 0."""
  s = u.s
  if u.latent is not None:  # The training split as latents (encoded once into the autoencoder's cache).
    logger.info(f"latent diffusion on the autoencoder {u.latent.tag}: latents {u.latent.shape}")
    u = dataclasses.replace(u, source=setup_latent.latent_source(u, s.data.split, train=True, log=logger.info))
  it = make_iterator(u)
  abstract = ckpt_lib.abstract_like(u.abstract_state, u.state_shardings)
  latest = ckpt.latest_step()
  kind = ckpt.read_meta(latest).get("kind") if latest is not None else None
  if kind in (setup_lib.PHEMA_KIND, setup_lib.DISTILLED_KIND):
    raise ConfigError(f"{ckpt.directory} holds {'post-hoc EMA' if kind == setup_lib.PHEMA_KIND else 'distilled'} "
                      f"parameters written by --mode={'phema' if kind == setup_lib.PHEMA_KIND else 'distill'} (no "
                      "optimizer state): sample or evaluate them, or train in another --workdir")
  if kind == setup_lib.DISTILL_KIND:
    raise ConfigError(f"{ckpt.directory} holds a distillation's student: resume it with --mode=distill, sample or "
                      "evaluate it, or train in another --workdir")
  snapshot = _snapshot_writer(u, snaps, logger)
  runner = make_runner(u)
  if ckpt.latest_step() is not None:  # A refused checkpoint stops the run before any tracing.
    state, meta = ckpt.restore(abstract, u.signature, fallback=s.train.ckpt_fallback)
    it.restore(meta["data"])
    logger.info(f"resumed from step {int(state.step)} in {ckpt.directory}")
    ahead = compile_ahead(runner, it) if int(state.step) < s.train.num_steps else None
  else:
    ahead = compile_ahead(runner, it) if s.train.num_steps > 0 else None
    state = init_state(u)
  if ahead is not None:
    ahead.result()
  eval_fn = jax.jit(u.traces.wrap("eval_loss", step_lib.make_eval_loss(u.module.apply, u.schedule, s.loss,
                                                                        cond_config(u))))
  eval_source = None
  if s.data.eval_split and u.latent is not None:
    eval_source = setup_latent.latent_source(u, s.data.eval_split, train=False, log=logger.info)
  elif s.data.eval_split:
    try:
      eval_source = pipeline.open_source(s.data.name, s.data.eval_split, s.data.data_dir)
    except pipeline.DataError as e:  # Other failures keep their own type and traceback.
      raise ConfigError(f"data.eval_split: {e}") from None
  gen = make_generator(u)

  def save(st):  # st in canonical (global) form.
    meta = {"data": it.state(), "signature": u.signature, "step": int(st.step)}
    ckpt.save(int(st.step), st, meta)

  start = int(state.step)
  total = s.train.num_steps
  t0, step0 = time.perf_counter(), start
  history = []
  run_state = runner.to_run(state)
  del state
  preempted = False
  with preemption.StopRequest(multi_process=jax.process_count() > 1) as stop:
    for step in range(start, total):
      run_state, metrics = runner.step(run_state, next(it))
      done = step + 1
      if done % s.train.log_every == 0 or done == total:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        rate = (done - step0) / max(now - t0, 1e-9)
        m.update(steps_per_s=rate, images_per_s=rate * s.train.batch_size)
        history.append({"step": done, **m})
        logger.progress(done, total, m, eta_s=(total - done) / max(rate, 1e-9))
        t0, step0 = now, done
      if stop.requested(done):
        preempted = done != total
        break
      if s.ema.snapshot_every and done % s.ema.snapshot_every == 0:
        snapshot(runner.from_run(run_state), done)
      if done % s.train.ckpt_every == 0 and done != total:
        save(runner.from_run(run_state))
      if s.train.eval_every and done % s.train.eval_every == 0 and done != total:
        ema = runner.from_run(run_state).ema_params[0]
        ev = evaluate_loss(u, eval_fn, ema, eval_source)
        logger.scalars({"eval_loss_ema": ev}, done)
        write_samples(u, ema, done, workdir, logger, gen)
        if evaluator is not None:
          evaluator.evaluate(ema, done, workdir, logger)
  it.close()  # grain's workers stop here; the position is kept for the final save.
  state = runner.from_run(run_state)
  if int(state.step) != start or ckpt.latest_step() != int(state.step):
    save(state)
  ckpt.wait()
  if snaps is not None:
    snaps.wait()
  final_step = int(state.step)
  if jax.process_count() > 1:
    _check_replicas(state, final_step, logger)
  if preempted:
    logger.info(f"stopped by signal {stop.signum} after step {final_step}; checkpoint saved in "
                f"{ckpt.directory}; run again to resume")
    logger.close()
    ckpt.close()
    if snaps is not None:
      snaps.close()
    return {"step": final_step, "preempted": True, "checkpoint": storage.join(ckpt.directory, str(final_step))}
  ev = evaluate_loss(u, eval_fn, state.ema_params[0], eval_source)
  grid = write_samples(u, state.ema_params[0], final_step, workdir, logger, gen)
  result = {"step": final_step, "eval_loss_ema": ev, "samples": grid, "preempted": False,
            "train_loss_last": history[-1]["loss"] if history else None,
            "checkpoint": storage.join(ckpt.directory, str(final_step))}
  if snaps is not None:
    result["ema_snapshots"] = {"directory": snaps.directory, "steps": snaps.all_steps(),
                               "bytes_per_snapshot": snapshot.bytes[0] if snapshot.bytes else None}
  logger.scalars({"eval_loss_ema": ev}, final_step)
  if evaluator is not None:
    result["eval"] = evaluator.evaluate(state.ema_params[0], final_step, workdir, logger)["metrics"]
  if s.task.enabled:  # Held-out samples against the ground truth (and super-resolution's bicubic baseline).
    result["task"] = setup_task.metrics(u, state.ema_params[0], gen)
    logger.info(f"task metrics: {json.dumps(result['task'])}")
  if jax.process_index() == 0:
    storage.commit(storage.join(workdir, "metrics.json"), json.dumps({**result, "history": history}, indent=1).encode(), marker=False)
  logger.info(f"done: step {final_step}, eval loss (EMA) {ev:.5f}, samples in {grid}")
  logger.close()
  ckpt.close()
  if snaps is not None:
    snaps.close()
  return result
