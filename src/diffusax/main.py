"""diffusax entry point.

    python -m diffusax.main --config=configs/digits.py --workdir=runs/digits [--config.train.num_steps=100 ...]

Modes: `train` (default; resumes when the workdir has a checkpoint). Flags and
config errors are reported on one line (what was wrong, what is allowed) with
exit status 2, before any device work.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file with get_config(); "
                                "override keys with --config.KEY=VALUE.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and metrics.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"],
                  "train; sample (resumable sample shards from a checkpoint); eval (metrics JSON of a checkpoint).")

# XLA:CPU flag that sends convolutions and dots to Eigen instead of the default YNN fusions:
# measured ~2x faster U-Net train steps on a 2-core AVX2 machine (see benchmarks/README.md).
_CPU_EIGEN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot"


def _error(msg: str, code: int = 2):
  print(f"diffusax: error: {msg}", file=sys.stderr, flush=True)
  sys.exit(code)


def _parse_flags(argv):
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _error(str(e).strip().splitlines()[-1] if str(e).strip() else repr(e))
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    msg = " ".join(str(e).split())
    _error(f"bad --config override: {msg}")


def _apply_runtime(config) -> None:
  """Process-level settings that must precede the first device use and the first compile.

  XLA_FLAGS are read when the backend starts (first device use), so setting
  them here works although `jax` is already imported. The compilation cache
  directory must go through `jax.config`: JAX reads JAX_COMPILATION_CACHE_DIR
  only when it is imported, which has happened by now (the settings import it).
  Entries are written for programs that take >= 1 s to compile (JAX's
  `jax_persistent_cache_min_compile_time_secs` default): the train step, state
  init and samplers; a second process loads them (benchmarks/compile_time.py).
  """
  if config.runtime.xla_cpu_eigen_convs and "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _CPU_EIGEN_FLAG).strip()
  if config.runtime.compilation_cache_dir:
    import jax
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.runtime.compilation_cache_dir))


def main(argv) -> None:
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO.
  if len(argv) > 1:
    _error(f"unexpected arguments {argv[1:]}; use --config=... --workdir=...")
  if FLAGS.config is None:
    _error("--config is required, e.g. --config=configs/digits.py")
  if not FLAGS.workdir:
    _error("--workdir is required")
  config = FLAGS.config
  from diffusax.programs import settings as settings_lib
  try:
    settings_lib.check_keys(config)
  except settings_lib.ConfigError as e:
    _error(str(e))
  _apply_runtime(config)
  from diffusax.parallel import distributed  # Before any device use: joins the other processes, if any.
  try:
    distributed.initialize(config.runtime.distributed)
  except ValueError as e:
    _error(str(e))
  try:
    s = settings_lib.parse(config)
    if FLAGS.mode == "train":
      from diffusax.programs import train
      train.train_and_evaluate(s, FLAGS.workdir)
    elif FLAGS.mode == "sample":
      from diffusax.programs import sample
      sample.run(s, FLAGS.workdir)
    elif FLAGS.mode == "eval":
      from diffusax.programs import evaluate
      evaluate.run(s, FLAGS.workdir)
  except settings_lib.ConfigError as e:
    _error(str(e))
  except Exception as e:  # Known, user-facing failures from deeper layers.
    from diffusax.checkpoint import CheckpointError
    if isinstance(e, CheckpointError):  # Model mismatch, corrupted or unwritable checkpoint, NaN state.
      _error(str(e))
    raise


def run() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
