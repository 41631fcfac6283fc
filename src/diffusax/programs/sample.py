"""The sampling program (`--mode=sample`): EMA params of a checkpoint -> shards of samples.

    python -m diffusax.main --config=configs/digits.py --workdir=runs/digits --mode=sample \
        --config.sample.num_samples=1000 --config.sample.guidance_scale=2

Loads only the first EMA of the latest checkpoint (or sample.checkpoint_step)
onto the mesh (no training data, no optimizer, no other state is read), then
runs `diffusax.sampling.job` (resumable, sharded over every device of every
process) and writes samples.png from the finished set.
"""
from __future__ import annotations

import jax

from diffusax.programs import setup as setup_lib
from diffusax.programs import setup_task
from diffusax.programs.logs import Logger
from diffusax.programs.settings import ConfigError, Settings
from diffusax.sampling import job as job_lib


def run(s: Settings, workdir: str, devices=None) -> dict:
  setup_lib.check_guide(s)
  u = setup_lib.model_setup(s, devices)
  logger = Logger(workdir, enabled=jax.process_index() == 0)
  try:
    guide = setup_lib.restore_guide(u, logger)
    base = setup_task.restore_base(u, logger) if u.s.task.enabled else None
    params, step = setup_lib.restore_ema(u, workdir, u.s.sample.checkpoint_step, logger)
    spec = setup_lib.job_spec(u, step, guide=guide, base=base)
    out_dir = u.s.sample.output_dir or setup_lib.default_out_dir(workdir, spec)
    how = f"autoguidance by {guide.tag}" if guide is not None else "CFG"
    logger.info(f"sampling {spec.num_samples} samples from step {step} with {spec.method} x {spec.num_steps}, "
                f"w={spec.guidance_scale:g} ({how}), seed {spec.seed} -> {out_dir}")
    try:
      out = setup_lib.run_sample_job(u, params, spec, out_dir, logger, guide=guide, base=base)
    except job_lib.JobMismatch as e:
      raise ConfigError(str(e)) from None
    logger.info(f"done: {spec.num_samples} samples in {out_dir}")
    return {**out, "step": step}
  finally:
    logger.close()
