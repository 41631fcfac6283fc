"""The sampling program (`--mode=sample`): EMA params of a checkpoint -> shards of samples.

    python -m diffusax.main --config=configs/digits.py --workdir=runs/digits --mode=sample \
        --config.sample.num_samples=1000 --config.sample.guidance_scale=2

Loads the first EMA of the latest checkpoint (or sample.checkpoint_step) onto
the mesh, then runs `diffusax.sampling.job` (resumable, sharded over every
device of every process) and writes samples.png from the finished set.
"""
from __future__ import annotations

import os

import jax

from diffusax import checkpoint as ckpt_lib
from diffusax.programs import train
from diffusax.programs.logs import Logger
from diffusax.programs.settings import ConfigError, Settings
from diffusax.sampling import job as job_lib


def restore_ema(u: train.Setup, workdir: str, step: int = -1, logger: Logger | None = None):
  """(first EMA params on the mesh, checkpoint step) from WORKDIR/checkpoints."""
  ckpt = train.open_checkpointer(u, workdir, logger)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise ConfigError(f"no checkpoint in {ckpt.directory}; train first (--mode=train) or pass the run's --workdir")
    if step >= 0 and step not in steps:
      raise ConfigError(f"sample.checkpoint_step={step} is not in {ckpt.directory}; it has {sorted(steps)}")
    abstract = ckpt_lib.abstract_like(u.abstract_state, u.state_shardings)
    state, _ = ckpt.restore(abstract, u.signature, step=None if step < 0 else step)
  finally:
    ckpt.close()
  return state.ema_params[0], int(state.step)


def job_spec(u: train.Setup, step: int, num_samples: int | None = None) -> job_lib.JobSpec:
  s = u.s
  ncls = u.num_classes if s.class_conditional else None
  if ncls and s.sample.labels and not all(0 <= v < ncls for v in s.sample.labels):
    raise ConfigError(f"sample.labels must lie in [0, {ncls}), got {list(s.sample.labels)}")
  if not ncls and s.sample.labels:
    raise ConfigError("sample.labels given but the model is unconditional")
  return job_lib.JobSpec(num_samples=num_samples or s.sample.num_samples, shard_size=s.sample.shard_size,
                         seed=s.sample.seed, method=s.sample.method, num_steps=s.sample.num_steps,
                         eta=s.sample.eta, guidance_scale=s.sample.guidance_scale, labels=tuple(s.sample.labels),
                         num_classes=ncls, checkpoint_step=step, sample_shape=tuple(u.sample_shape))


def default_out_dir(workdir: str, spec: job_lib.JobSpec) -> str:
  return os.path.join(workdir, "samples", f"step{spec.checkpoint_step}_{spec.method}{spec.num_steps}"
                      f"_w{spec.guidance_scale:g}_seed{spec.seed}")


def generate(u: train.Setup, params, spec: job_lib.JobSpec, out_dir: str, logger: Logger,
             sample_fn=None) -> dict:
  """Runs (or finishes) the job and writes its grid; returns the job's summary with the grid path.

  `sample_fn`: `job_lib.make_sample_fn`'s function for `spec`, when the caller keeps one to reuse
  (the same function object is jitted without retracing); default: a new one.
  """
  s = u.s
  fn = sample_fn or job_lib.make_sample_fn(u.module, u.schedule, s.loss.target, spec, null_class=s.loss.null_class)
  is_image = len(u.sample_shape) == 3
  out = job_lib.run_job(fn, params, spec, out_dir, u.mesh, log=logger.info, is_image=is_image)
  if jax.process_index() == 0:
    out["grid"] = job_lib.write_grid(out_dir, s.sample.per_class, spec.num_classes, is_image)
  return out


def run(s: Settings, workdir: str) -> dict:
  u = train.setup(s)
  logger = Logger(workdir, enabled=jax.process_index() == 0)
  try:
    params, step = restore_ema(u, workdir, u.s.sample.checkpoint_step, logger)
    spec = job_spec(u, step)
    out_dir = u.s.sample.output_dir or default_out_dir(workdir, spec)
    logger.info(f"sampling {spec.num_samples} samples from step {step} with {spec.method} x {spec.num_steps}, "
                f"w={spec.guidance_scale:g}, seed {spec.seed} -> {out_dir}")
    try:
      out = generate(u, params, spec, out_dir, logger)
    except job_lib.JobMismatch as e:
      raise ConfigError(str(e)) from None
    logger.info(f"done: {spec.num_samples} samples in {out_dir}")
    return {**out, "step": step}
  finally:
    logger.close()
