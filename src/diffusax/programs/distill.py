"""Distillation (`--mode=distill`): few-step students of a trained model.

    python -m diffusax.main --config=configs/digits_distill.py --workdir=runs/digits_distill --mode=distill
    python -m diffusax.main --config=configs/digits_distill.py --workdir=runs/digits_distill/students/4 \
        --mode=eval --config.sample.num_steps=4

The config is the teacher's (network, schedule, target, data) plus `distill.*`;
the teacher is the first EMA of distill.teacher_workdir's checkpoint.

  * progressive (Salimans & Ho 2022): rounds of distill.steps_per_round steps; round r's
    student takes n_r = teacher_steps / 2^(r+1) DDIM steps on the grid t_i = t_max (1 - i / n_r)
    (`--config.sample.spacing=trailing`) and starts from its teacher; the teacher of round 0 is
    the given model, of round r > 0 the EMA of round r - 1's student. The optimizer (and its
    learning-rate schedule) restarts each round unless distill.reset_optimizer=False; EMAs restart
    at each round's start from the student's initial parameters.
  * consistency (Song et al. 2023): one round; the student (initialised from the teacher) is the
    consistency function of `core.distill`, its target network the EMA of decay distill.target_decay
    (the state's last EMA); sample it with `--config.sample.method=consistency`.

Outputs in WORKDIR: checkpoints/ (the student's TrainState of the current round; meta "kind":
"distill" with the round, its step count and the teacher's reference), students/<n>/ (each finished
round's student EMA, a workdir --mode=sample and --mode=eval read), samples_<n>steps.png (each
student's grid), samples.png (the last one's) and distill.json (rounds, their steps and wall time).

Preemption: SIGTERM/SIGINT end the run after the current step with a saved checkpoint (as training).
Determinism: step k draws from fold_in(seed key, k), the round and its teacher follow from the step,
and the teacher of round r > 0 is re-read from students/<n_{r-1}> (checksummed), so a run resumed
from any checkpoint, mid-round or at a round's end, is bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusax import checkpoint as ckpt_lib
from diffusax import storage
from diffusax.core import schedules
from diffusax.core.samplers import grid
from diffusax.data import pipeline
from diffusax.parallel import mesh as mesh_lib
from diffusax.programs import setup as setup_lib
from diffusax.programs.logs import Logger
from diffusax.programs.settings import ConfigError, Settings
from diffusax.sampling import generate
from diffusax.training import distill_step
from diffusax.training import optimizer as optim_lib
from diffusax.training import preemption
from diffusax.training import state as state_lib

STUDENTS = "students"
CONSISTENCY_GRIDS = (1, 2, 4)  # The consistency student's sample grids: these step counts.


def check(s: Settings) -> None:
  """Refusals that need no device work: the teacher's folder and what distillation supports."""
  d = s.distill
  if not d.teacher_workdir:
    raise ConfigError("--mode=distill needs distill.teacher_workdir, the trained model's run directory")
  folder = storage.join(d.teacher_workdir, "checkpoints")
  if not any(n.isdigit() for n in storage.listdir(folder)):
    raise ConfigError(f"distill.teacher_workdir={d.teacher_workdir}: no checkpoint in {folder}")
  if isinstance(s.schedule, (schedules.Discrete, schedules.Learned)):
    raise ConfigError(f"distillation needs a fixed continuous-time schedule; diffusion.schedule="
                      f"{s.schedule_name!r} is {'discrete' if isinstance(s.schedule, schedules.Discrete) else 'learned'}")
  if s.model_kwargs.get("learn_sigma"):
    raise ConfigError(f"model.{s.model_name}.learn_sigma=True: distillation trains deterministic students; "
                      "distil a model without learned variances")
  if d.kind != "consistency" and s.loss.target in ("eps", "score"):
    raise ConfigError(f"distill.kind={d.kind!r} with diffusion.target={s.loss.target!r}: a few-step student must "
                      "predict x0 near t = 1, where x0 = (x - sigma eps) / alpha divides by alpha ~ 0 (Salimans & Ho "
                      "2022, sec. 4); distil a teacher trained for 'v', 'x0' or 'flow'")
  if s.mesh_strategy != "mesh":
    raise ConfigError("--mode=distill runs with mesh.strategy='mesh'")


def students_dir(workdir: str, name) -> str:
  """WORKDIR/students/<name>: a progressive round's student by its step count, the consistency student
  as "consistency"."""
  return storage.join(workdir, STUDENTS, str(name))


@dataclasses.dataclass
class _Run:
  u: setup_lib.ModelSetup
  tx: object
  abstract_state: object
  shardings: object
  step: object      # jitted distillation step
  first_step: object  # the first round's step (guided: its teacher is the plain CFG network), else `step`
  teacher_setup: object  # the first round's teacher's ModelSetup (guided: without guidance_embed), else u
  fresh: object     # teacher params -> the first round's state
  next_round: object  # state at a round's end -> the next round's start
  rounds: tuple
  per_round: int
  names: tuple      # students/<name> of each round


def _build(s: Settings, devices) -> _Run:
  d = s.distill
  u = setup_lib.model_setup(s, devices)
  s = u.s
  guided = d.kind == "guided"
  ut = setup_lib.model_setup(dataclasses.replace(s, model_kwargs={**s.model_kwargs, "guidance_embed": False}),
                             devices, data=u.data) if guided else u
  rounds, per = d.rounds, d.steps_per_round
  total = per * len(rounds)
  tx, lr_fn = optim_lib.make(dataclasses.replace(s.optim, total_steps=per if d.reset_optimizer else total))
  consistency = d.kind == "consistency"
  num_ema = len(s.ema_decays) + (1 if consistency else 0)
  create = lambda p: state_lib.create(p, tx, s.seed, num_ema)
  abstract_state = jax.eval_shape(create, u.abstract_params)
  shardings = setup_lib.state_shardings(abstract_state, u.param_shardings, u.mesh)
  models = distill_step.flax_models(u.module, s.loss.target, u.schedule)
  rep = mesh_lib.replicated(u.mesh)
  batch_sh = {"x": mesh_lib.batch_sharding(u.mesh, 1 + len(u.sample_shape)), "label": mesh_lib.batch_sharding(u.mesh, 1)}

  def make(kind, teacher_u):
    fn = distill_step.make_distill_step(
        kind, models, distill_step.flax_models(teacher_u.module, s.loss.target, u.schedule), tx, lr_fn,
        label_dropout=0.0 if guided else s.loss.label_dropout, null_class=s.loss.null_class,
        ema_decays=s.ema_decays, t_max=grid.default_t_max(u.schedule), t_min=grid.default_t_min(u.schedule),
        teacher_solver=d.teacher_solver, metric=d.metric, target_decay=d.target_decay,
        w_range=d.guidance_range if guided else None)  # sigma_data 0.5, boundary t_min: the sampler's defaults.
    return jax.jit(fn, in_shardings=(shardings, teacher_u.param_shardings, batch_sh, rep, rep),
                   out_shardings=(shardings, rep), donate_argnums=0)

  step = make("progressive" if guided else d.kind, u)
  first = make("guided", ut) if guided else step

  def fresh(teacher_params):
    if not guided:
      return create(teacher_params)
    # The w-conditioned student: the teacher's parameters, plus its guidance embedding at initialisation
    # (zero output: the student starts as the conditional teacher).
    init = mesh_lib.unbox(u.param_init(jax.random.fold_in(jax.random.key(s.seed), 0x1A17)))
    return create({**init, **teacher_params})

  def next_round(st):
    p = st.ema_params[0]
    return st.replace(params=p, ema_params=tuple(jax.tree.map(jnp.copy, p) for _ in st.ema_params),
                      opt_state=tx.init(p) if d.reset_optimizer else st.opt_state)

  names = ("consistency",) if consistency else (("guided",) if guided else ()) + tuple(str(n) for n in rounds[guided:])
  return _Run(u=u, tx=tx, abstract_state=abstract_state, shardings=shardings, step=step, first_step=first,
              teacher_setup=ut, fresh=jax.jit(fresh, out_shardings=shardings),
              next_round=jax.jit(next_round, out_shardings=shardings, donate_argnums=0), rounds=rounds,
              per_round=per, names=names)


def _plan(s: Settings) -> dict:
  """What a checkpoint of this distillation must agree with to be resumed."""
  d = s.distill
  return {"kind": d.kind, "rounds": list(d.rounds), "steps_per_round": d.steps_per_round,
          "teacher": f"{storage.resolve(d.teacher_workdir)}@{teacher_step(s)}"}


def teacher_step(s: Settings) -> int:
  """The teacher's checkpoint step: distill.teacher_step, or the latest one there now (-1). Recorded in the
  plan, so a run resumed after the teacher's run has written more checkpoints keeps its teacher."""
  d = s.distill
  if d.teacher_step >= 0:
    return d.teacher_step
  return max(int(n) for n in storage.listdir(storage.join(d.teacher_workdir, "checkpoints")) if n.isdigit())


def _write_student(r: _Run, workdir: str, k: int, state, logger: Logger) -> str:
  """Round k's student EMA as the checkpoint of workdir students/<n_k> (kept when already there: a resumed
  run writes the same arrays)."""
  out = students_dir(workdir, r.names[k])
  ckpt = ckpt_lib.Checkpointer(storage.join(out, "checkpoints"), keep=1, async_save=False,
                               replicated_sharding=mesh_lib.replicated(r.u.mesh), log=logger.info)
  try:
    step = int(state.step)
    if step not in ckpt.all_steps():
      ema = setup_lib.EmaOnlyState(step=jnp.asarray(step, jnp.int32), ema_params=(state.ema_params[0],))
      ckpt.save(step, ema, {"kind": setup_lib.DISTILLED_KIND, "signature": r.u.signature, "step": step,
                            "distill": {"round": k, "student_steps": r.rounds[k]}})
      ckpt.wait()
  finally:
    ckpt.close()
  return out


def _grid(r: _Run, gen, params, n: int, workdir: str, logger: Logger, step: int) -> str:
  """The student's sample grid with n steps of sample.method (one row per class)."""
  u, s = r.u, r.u.s
  conditional = bool(u.num_classes and s.class_conditional)
  labels = np.repeat(np.arange(u.num_classes), s.sample.per_class).astype(np.int32) if conditional else None
  rows = u.num_classes if conditional else s.sample.per_class
  count = len(labels) if conditional else s.sample.per_class ** 2
  key = jax.random.fold_in(jax.random.key(s.seed), 0x5A4D)
  x = np.asarray(gen(params, np.arange(count), labels, jnp.float32(s.sample.guidance_scale), key, jnp.int32(n)))
  img = generate.image_grid(generate.to_uint8(x), rows, upscale=max(1, 64 // u.sample_shape[0]))
  path = storage.join(workdir, f"samples_{n}steps.png")
  if jax.process_index() == 0:
    generate.save_png(path, img)
    generate.save_png(storage.join(workdir, "samples.png"), img)
    logger.image(f"samples_{n}steps", img, step)
  return path


def run(s: Settings, workdir: str, devices=None) -> dict:
  """Runs (or resumes) the distillation of the settings into `workdir`; returns the summary of distill.json."""
  check(s)
  if s.latent.enabled:
    raise ConfigError("--mode=distill of a latent diffusion model (latent.autoencoder_workdir) is not supported: "
                      "its students would need the latent training data and decoded grids; distil a pixel model")
  try:
    source = pipeline.open_source(s.data.name, s.data.split, s.data.data_dir)
  except pipeline.DataError as e:  # Other failures keep their own type and traceback.
    raise ConfigError(f"data: {e}") from None
  if len(source) < s.train.batch_size:
    raise ConfigError(f"train.batch_size {s.train.batch_size} exceeds the {len(source)} training examples")
  r = _build(s, devices)
  u, s = r.u, r.u.s
  d = s.distill
  try:
    mesh_lib.check_batch(s.train.batch_size, u.mesh, jax.process_count())
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None
  storage.makedirs(workdir)
  logger = Logger(workdir, enabled=jax.process_index() == 0)
  ckpt = setup_lib.open_checkpointer(u, workdir, logger)
  it = pipeline.Loader(source, s.train.batch_size, seed=s.seed, process_index=jax.process_index(),
                       process_count=jax.process_count(),
                       transform=pipeline.make_transform(u.data.transform, s.data, train=True),
                       workers=s.data.workers, prefetch=s.data.prefetch)
  plan = _plan(s)
  try:
    if ckpt.latest_step() is not None:
      meta = ckpt.read_meta(ckpt.latest_step())
      if meta.get("kind") != setup_lib.DISTILL_KIND:
        raise ConfigError(f"{ckpt.directory} holds a {meta.get('kind', 'training')!r} checkpoint, not a distillation; "
                          "distil into another --workdir")
      if meta.get("distill") != plan:
        raise ConfigError(f"{ckpt.directory} holds the distillation {meta.get('distill')}; these settings ask for "
                          f"{plan}: distil into another --workdir")
      state, meta = ckpt.restore(ckpt_lib.abstract_like(r.abstract_state, r.shardings), u.signature,
                                 fallback=s.train.ckpt_fallback)
      it.restore(meta["data"])
      logger.info(f"resumed the distillation at step {int(state.step)} from {ckpt.directory}")
      teacher = None
    else:
      teacher, tstep = setup_lib.restore_ema(r.teacher_setup, d.teacher_workdir, int(plan["teacher"].rsplit("@", 1)[1]),
                                             logger)
      logger.info(f"teacher: {d.teacher_workdir} step {tstep}")
      state = r.fresh(teacher)
    summary = _loop(r, state, teacher, it, ckpt, workdir, logger, plan)
  finally:
    it.close()
    ckpt.close()
    logger.close()
  return summary


def _loop(r: _Run, state, teacher, it, ckpt, workdir: str, logger: Logger, plan: dict) -> dict:
  u, s, d = r.u, r.u.s, r.u.s.distill
  per, total = r.per_round, r.per_round * len(r.rounds)
  info = storage.join(workdir, "distill.json")
  counts = CONSISTENCY_GRIDS if d.kind == "consistency" else tuple(max(n, 1) for n in r.rounds)
  spec = generate.SamplerSpec(s.sample.method, max(counts), s.sample.eta, s.sample.clip_x0, s.sample.spacing,
                              s.sample.order)
  gen = generate.make_generate(u.module, u.schedule, s.loss.target, spec, null_class=s.loss.null_class,
                               sample_shape=u.sample_shape, max_steps=max(counts))
  log = storage.read_json(info) if storage.exists(info) else {"rounds": {}}

  def save(st, k):
    ckpt.save(int(st.step), st, {"data": it.state(), "signature": u.signature, "step": int(st.step),
                                 "kind": setup_lib.DISTILL_KIND, "distill": plan,
                                 "round": k, "student_steps": r.rounds[k]})

  with preemption.StopRequest(multi_process=jax.process_count() > 1) as stop:
    for k in range(int(state.step) // per, len(r.rounds)):
      n, lo, hi = r.rounds[k], k * per, (k + 1) * per
      if k > 0 and int(state.step) == lo:  # Round k - 1 just ended (here or before a restart).
        teacher_dir = _write_student(r, workdir, k - 1, state, logger)
        teacher, _ = setup_lib.restore_ema(u, teacher_dir, -1, logger)
        state = r.next_round(state)
      elif teacher is None:  # Resumed mid-round: the round's teacher is re-read.
        wd, ts = ((d.teacher_workdir, int(plan["teacher"].rsplit("@", 1)[1])) if k == 0
                  else (students_dir(workdir, r.names[k - 1]), -1))
        teacher, _ = setup_lib.restore_ema(r.teacher_setup if k == 0 else u, wd, ts, logger)
      what = {"consistency": f"consistency student on {n} noise levels",
              "guided": f"w-conditioned student of the CFG teacher, w in {list(d.guidance_range)}"}.get(
                  r.names[k], f"student of {n} steps")
      logger.info(f"round {k + 1}/{len(r.rounds)}: {what}, steps {lo}..{hi}")
      t0, wall0, step0 = time.perf_counter(), time.perf_counter(), int(state.step)
      start = step0
      nn_, lo_ = jnp.int32(n), jnp.int32(lo)
      for step in range(int(state.step), hi):
        state, metrics = (r.first_step if k == 0 else r.step)(state, teacher, setup_lib.to_global(
            {k_: v for k_, v in next(it).items() if k_ in ("x", "label")}, u.mesh), nn_, lo_)
        done = step + 1
        if done % s.train.log_every == 0 or done == hi:
          m = {key: float(v) for key, v in jax.device_get(metrics).items()}
          now = time.perf_counter()
          rate = (done - step0) / max(now - t0, 1e-9)
          m.update(round=k + 1, student_steps=n, steps_per_s=rate, images_per_s=rate * s.train.batch_size)
          logger.progress(done, total, m, eta_s=(total - done) / max(rate, 1e-9))
          t0, step0 = now, done
        stopping = stop.requested(done)
        if done % s.train.ckpt_every == 0 or done == hi or stopping:
          save(state, k)
        if stopping and done != hi:
          ckpt.wait()
          logger.info(f"stopped by signal {stop.signum} after step {done}; checkpoint saved in {ckpt.directory}; "
                      "run again to resume")
          return {**log, "plan": plan, "step": done, "preempted": True}
      ckpt.wait()
      entry = log["rounds"].get(r.names[k], {})
      entry.update(round=k + 1, steps=per, loss_last=float(metrics["loss"]))
      # The process that ended the round: a round resumed mid-way counts from its restart.
      entry["wall_s"] = time.perf_counter() - wall0
      entry["steps_timed"] = hi - start
      log["rounds"][r.names[k]] = entry
      for m in (CONSISTENCY_GRIDS if d.kind == "consistency" else (n,)):
        entry.setdefault("samples", {})[str(m)] = _grid(r, gen, state.ema_params[0], m, workdir, logger,
                                                        int(state.step))
      if jax.process_index() == 0:
        storage.commit(info, json.dumps({**log, "plan": plan}, indent=1).encode(), marker=False)
  _write_student(r, workdir, len(r.rounds) - 1, state, logger)
  log.update(plan=plan, step=int(state.step), final_student=students_dir(workdir, r.names[-1]))
  if jax.process_index() == 0:
    storage.commit(info, json.dumps(log, indent=1).encode(), marker=False)
  logger.info(f"done: {len(r.rounds)} round(s), the last student in {students_dir(workdir, r.names[-1])} "
              f"and {ckpt.directory}")
  return log
