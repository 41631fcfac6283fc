"""diffusax entry point.

    python -m diffusax.main --config=configs/digits.py --workdir=runs/digits [--config.train.num_steps=100 ...]

Modes (--mode): `train` (default; resumes when the workdir has a checkpoint; a config with
stage='autoencoder' trains latent diffusion's autoencoder, programs/autoencoder.py), `sample`,
`eval`, `phema` and `phema_sweep` (post-hoc EMA; programs/phema.py), `distill` (few-step
students of a trained model; programs/distill.py). Flags and
config errors are reported on one line (what was wrong, what is allowed) with
exit status 2, before any device work.
"""
from __future__ import annotations

import os
import re
import sys
import traceback

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file with get_config(); "
                                "override keys with --config.KEY=VALUE.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and metrics.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "phema", "phema_sweep", "distill"],
                  "train; sample (resumable sample shards from a checkpoint); eval (metrics JSON of a checkpoint); "
                  "phema (post-hoc EMA of ema.target_sigma_rel from the EMA snapshots, written as a checkpoint); "
                  "phema_sweep (evaluate post-hoc EMAs over ema.sweep: JSON and a PNG curve); "
                  "distill (progressive or consistency distillation of distill.teacher_workdir's model).")

# XLA:CPU flag that sends convolutions and dots to Eigen instead of the default YNN fusions:
# measured ~2x faster U-Net train steps on a 2-core AVX2 machine (see benchmarks/README.md).
_CPU_EIGEN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot"


def _error(msg: str, code: int = 2):
  print(f"diffusax: error: {msg}", file=sys.stderr, flush=True)
  sys.exit(code)


def _config_path(argv) -> str | None:
  """The value of --config in argv (the file part, before any ':' argument)."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1].split(":", 1)[0]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return None


def _reason(e: BaseException) -> str:
  """The last line of an error message, without an '[Errno N] ' prefix."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  last = lines[-1].replace("Configuration is not available because of an earlier failure to load: ", "") \
      if lines else type(e).__name__
  return re.sub(r"^\[Errno \d+\] ", "", last)


def _line_in(e: BaseException, path: str) -> int | None:
  """The line of `path` (the config file) where `e` was raised, if it was raised there."""
  want = os.path.realpath(path)
  if isinstance(e, SyntaxError) and e.filename and os.path.realpath(e.filename) == want:
    return e.lineno
  frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.realpath(f.filename) == want]
  return frames[-1].lineno if frames else None


def _override_error(e: BaseException, argv) -> str:
  """ml_collections reports an unknown override key as AttributeError(KeyError("'key'\\nDid you mean
  \"near\" instead of \"key\"?")) or KeyError(...): say it as a sentence, naming the flag."""
  inner = e.args[0] if isinstance(e, AttributeError) and e.args and isinstance(e.args[0], KeyError) else e
  text = str(inner.args[0]) if isinstance(inner, KeyError) and inner.args else str(inner)
  m = re.match(r"'([^']+)'", text)
  leaf = re.match(r"Attribute <class '(\w+)'>\.(\w+) does not exist.*lookup: ([\w.]+)", text)
  if leaf:  # e.g. --config.seed.x=3: a key under a value that is not a ConfigDict.
    kind, key, path = leaf.groups()
    flag = next((a for a in argv if a.startswith(f"--config.{path}")), f"--config.{path}")
    return f"bad override {flag}: config.{path[:-len(key) - 1]} holds a value of type {kind}; it has no key {key!r}"
  if not m:
    return f"bad --config override: {' '.join(text.split())}"
  key = m.group(1)
  flag, where = None, "config"
  for a in argv:
    path = a[len("--config."):].split("=", 1)[0] if a.startswith("--config.") else ""
    parts = path.split(".")
    if key in parts:
      flag, where = a, ".".join(["config"] + parts[:parts.index(key)])
      break
  near = re.search(r'Did you mean "([^"]+)"', text)
  return (f"bad override {flag or '--config...'}: {where} has no key {key!r}"
          + (f"; did you mean {near.group(1)!r}?" if near else ""))


def _not_the_none_config_warning(record) -> bool:
  """ml_collections logs a warning for a get_config() that returns None; the one-line error says it."""
  return "get_config() returned None" not in record.getMessage()


def _parse_flags(argv):
  path = _config_path(argv[1:])
  logging.get_absl_logger().addFilter(_not_the_none_config_warning)
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if "Error whilst parsing config file" in text:  # ml_collections wraps a TypeError/ValueError of the file.
      lines = re.findall(r'File "([^"]+)", line (\d+)', text)
      line = next((int(n) for f, n in reversed(lines) if path and os.path.realpath(f) == os.path.realpath(path)),
                  None)
      _error(f"error in config file {path}" + (f", line {line}" if line else "") + f": {_reason(e)}")
    _error(_reason(e) if text.strip() else repr(e))
  except OSError as e:  # An override applied to a config file that could not be loaded.
    _error(f"cannot load --config={path}: {_reason(e)}")
  except (AttributeError, KeyError) as e:
    line = _line_in(e, path) if path else None
    if line is not None:
      _error(f"error in config file {path}, line {line}: {type(e).__name__}: {e}")
    _error(_override_error(e, argv))
  except Exception as e:  # noqa: BLE001 - only errors raised inside the config file are reported here.
    line = _line_in(e, path) if path else None
    if line is None:
      raise
    _error(f"error in config file {path}, line {line}: {type(e).__name__}: {e}")
  value = FLAGS["config"].value
  if value is None and path:
    _error(f"--config={path}: get_config() returned None (a missing return?)")
  if value is not None and not isinstance(value, ml_collections.ConfigDict):
    try:
      value.lock  # ml_collections defers the OSError of an unloadable file to the first access.
    except OSError as e:
      _error(f"cannot load --config={path}: {_reason(e)}")
    _error(f"--config={path}: get_config() returned {type(value).__name__}, not a ConfigDict")
  return rest


def _check_workdir(workdir: str) -> None:
  """Refuses a --workdir that is a file or cannot be created (under a file, or without permission); on an
  object store (gs://, s3://) one small object is written, read and deleted (storage.probe)."""
  from diffusax import storage
  try:
    storage.probe(workdir, "--workdir")
  except storage.StorageError as e:
    _error(str(e))
  if storage.is_remote(workdir):
    return
  path = storage.resolve(workdir)
  if not os.path.exists(path):
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
      _error(f"--workdir={workdir} cannot be created: no permission to write in {parent}")


def _check_data_dir(config) -> None:
  """A remote data.data_dir: its bucket must exist and be readable (a local one is checked by the data layer)."""
  from diffusax import storage
  data_dir = config.data.data_dir if "data" in config and "data_dir" in config.data else ""
  if data_dir and storage.is_remote(data_dir):
    try:
      storage.probe_read(data_dir, "--config.data.data_dir")
    except storage.StorageError as e:
      _error(str(e))


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
  _check_workdir(FLAGS.workdir)
  config = FLAGS.config
  from diffusax.programs import settings as settings_lib
  try:
    settings_lib.check_keys(config)
  except settings_lib.ConfigError as e:
    _error(str(e))
  _check_data_dir(config)
  _apply_runtime(config)
  from diffusax.parallel import distributed  # Before any device use: joins the other processes, if any.
  try:
    distributed.initialize(config.runtime.distributed)
  except ValueError as e:
    _error(str(e))
  try:
    s = settings_lib.parse(config)
    if s.stage == "autoencoder":  # Latent diffusion's stage 1: train or evaluate the autoencoder.
      from diffusax.programs import autoencoder
      if FLAGS.mode not in ("train", "eval"):
        _error(f"--mode={FLAGS.mode} is for diffusion models; an autoencoder (stage='autoencoder') has "
               "--mode=train and --mode=eval")
      (autoencoder.train if FLAGS.mode == "train" else autoencoder.evaluate)(s, FLAGS.workdir)
    elif FLAGS.mode == "train":
      from diffusax.programs import train
      evaluator = None
      if s.train.full_eval:  # The training loop gets the evaluator from here; it never imports evaluate.
        from diffusax.programs import evaluate
        evaluator = evaluate.Evaluator
      train.train_and_evaluate(s, FLAGS.workdir, evaluator=evaluator)
    elif FLAGS.mode == "sample":
      from diffusax.programs import sample
      sample.run(s, FLAGS.workdir)
    elif FLAGS.mode == "eval":
      from diffusax.programs import evaluate
      evaluate.run(s, FLAGS.workdir)
    elif FLAGS.mode == "phema":
      from diffusax.programs import phema
      phema.run(s, FLAGS.workdir)
    elif FLAGS.mode == "distill":
      from diffusax.programs import distill
      distill.run(s, FLAGS.workdir)
    elif FLAGS.mode == "phema_sweep":
      from diffusax.programs import evaluate, phema
      phema.sweep(s, FLAGS.workdir, evaluate.Evaluator)
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
