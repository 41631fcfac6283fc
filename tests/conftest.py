"""Test-wide settings, applied before JAX is imported anywhere.

* 8 fake CPU devices so mesh tests run on one machine.
* XLA:CPU convolution/dot fusions sent back to Eigen: about 2x faster conv
  training steps on CPU (measured in benchmarks/README.md; the same flag as
  `runtime.xla_cpu_eigen_convs` in diffusax/main.py); numerics are unchanged.
* XLA:CPU's LLVM back end at optimisation level 0 without its expensive passes (the options the
  training program's one-off state init compiles with, programs/train.py INIT_COMPILER_OPTIONS):
  compiles dominate the suite's time and its arrays are small, so the suite runs about a third
  faster; results may differ from the default level in the last bits, which no test compares across.
* A persistent compilation cache in a fresh temporary directory for this test
  session (inherited by the subprocesses the tests start), so a program a test
  compiles again in a restarted or second process is loaded, not recompiled
  (entries for compiles of >= 1 s; the cache key covers the HLO, flags and devices).
"""
import os
import tempfile

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "xla_cpu_experimental_ynn_fusion_type" not in _flags:
  _flags += " --xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot"
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  _cache = tempfile.mkdtemp(prefix="diffusax-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory):
  """The embedded digits config (class-conditional, CFG grid) trained for 4 steps with a tiny DiT in place of
  its U-Net: the program path is the same and the compiles are a fraction of the U-Net's on XLA:CPU (the
  U-Net goes through the programs in tests/test_prepare.py, test_programs.py, test_train.py, test_vdm.py).

  Shared by the training-program and evaluation tests of tests/test_eval.py: one U-Net compile for
  all, on one pytest-xdist worker (`--dist loadfile`: the users of a shared run live in one module).
  Returns dict(data_dir, workdir, result, args, config) where `args` are the equivalent
  command-line overrides for `python -m diffusax.main`.
  """
  import sys
  root = tmp_path_factory.mktemp("tiny_digits")
  data_dir, wd = str(root / "tfds"), str(root / "run")
  over = {"model.name": "dit", "model.dit.patch_size": 4, "model.dit.hidden_size": 16, "model.dit.depth": 1,
          "model.dit.num_heads": 2, "model.dit.frequency_dim": 16, "train.batch_size": 16,
          "train.num_steps": 4, "train.log_every": 2, "train.eval_batches": 1, "sample.num_steps": 3,
          "sample.per_class": 2, "sample.guidance_scale": 2.0}
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
  import digits as digits_config
  from diffusax.programs import settings as settings_lib
  from diffusax.programs import train
  c = digits_config.get_config()
  c.data.data_dir = data_dir
  for k, v in over.items():
    a, b = k.rsplit(".", 1)
    node = c
    for part in a.split("."):
      node = node[part]
    node[b] = v
  result = train.train_and_evaluate(settings_lib.parse(c), wd)
  fmt = lambda v: repr(tuple(v)) if isinstance(v, tuple) else str(v)
  args = ["--config=configs/digits.py", f"--workdir={wd}", f"--config.data.data_dir={data_dir}"] + \
      [f"--config.{k}={fmt(v)}" for k, v in over.items()]
  return {"data_dir": data_dir, "workdir": wd, "result": result, "args": args, "config": c}


@pytest.fixture(scope="session")
def digits_dit_run(tmp_path_factory):
  """30 steps of the digits with a tiny DiT (tests/test_train.py `_digits_dit`: 2 grain workers, flips,
  class-conditional), tracking power-function EMAs of sigma_rel 0.05, 0.1 and 0.15 with a snapshot every
  10 steps and a checkpoint every 10. Shared by the grain resume test (its uninterrupted reference) and
  the post-hoc EMA / autoguidance program tests, all in tests/test_phema.py: one training run and one
  compile for both, on one pytest-xdist worker.
  Returns dict(config, data_dir, workdir, result)."""
  from test_train import _digits_dit
  from diffusax.programs import settings as settings_lib
  from diffusax.programs import train
  root = tmp_path_factory.mktemp("digits_dit")
  data_dir, wd = str(root / "tfds"), str(root / "run")
  c = _digits_dit(data_dir, **{"ema.sigma_rels": (0.05, 0.1, 0.15), "ema.snapshot_every": 10})
  result = train.train_and_evaluate(settings_lib.parse(c), wd)
  return {"config": c, "data_dir": data_dir, "workdir": wd, "result": result}


@pytest.fixture(scope="session")
def gcs():
  """A local, in-memory Google Cloud Storage emulator (`gcp-storage-emulator`, a dev dependency) with the
  bucket `bkt`, and this process' environment pointed at it: gcsfs (etils.epath's gs://) by
  STORAGE_EMULATOR_HOST, tensorstore (orbax's arrays) by TENSORSTORE_GCS_HTTP_URL, array_record
  (google-cloud-cpp, TFDS reads) by CLOUD_STORAGE_EMULATOR_ENDPOINT. Skipped, with the reason, when
  the dev packages (gcp-storage-emulator, gcsfs) are missing; an emulator that is installed but does not
  start fails the test with its output. Returns dict(url, env): `env` holds those variables for subprocesses."""
  from gcs_emulator import start
  server, env = start()
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield {"url": env["STORAGE_EMULATOR_HOST"], "env": env}
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.terminate()
    server.wait(10)
    os.remove(server.log_path)
