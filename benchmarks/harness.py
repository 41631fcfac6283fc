"""What the benchmark scripts share: settings from a config file, a data-free
`programs.train.Setup`, an alternating timer and the same-run matmul peak.

Order matters: a script calls `apply_runtime(config)` before any device use, so
the `runtime.*` process settings (XLA flags, compilation cache) are applied in
the same order as `diffusax.main` applies them.
"""
from __future__ import annotations

import importlib.util
import os
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EIGEN_FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"


def load_config(name: str, overrides: dict | None = None):
  """configs/<name>.py get_config() with dotted-key overrides, e.g. {"model.unet.base_channels": 32}."""
  path = os.path.join(REPO, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"diffusax_bench_config_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = getattr(node, p)
    setattr(node, leaf, value)
  return c


def apply_runtime(config, clear_flags: bool = True) -> None:
  """Applies config.runtime as `diffusax.main` does: after the settings (and so jax) are imported,
  before the first device use.

  clear_flags: first drop any convolution-fusion flag inherited from the
  environment, so `runtime.xla_cpu_eigen_convs=False` really means off.
  """
  from diffusax.programs import settings as _  # noqa: F401 - imports jax first, as diffusax.main does.
  if clear_flags:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if EIGEN_FLAG_NAME not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags)
  from diffusax import main as main_lib
  main_lib._apply_runtime(config)


def settings(config):
  from diffusax.programs import settings as settings_lib
  return settings_lib.parse(config)


def setup_without_data(s, sample_shape: tuple, num_classes: int | None, devices=None):
  """`programs.train.Setup` for data of `sample_shape` without opening a dataset.

  `train.setup` without the training split: the program's own model set-up
  (`programs.setup.model_setup` on a given data description) and training
  set-up (`train.for_training`), for configs whose data is not on this
  machine (cifar10); the step and state built from it are the program's own
  (`train.make_runner`, `train.init_state`).
  """
  from diffusax.data import registry
  from diffusax.programs import setup as setup_lib
  from diffusax.programs import train

  data = registry.Description(name=s.data.name, shape=tuple(sample_shape), num_classes=num_classes,
                              transform="image" if len(sample_shape) == 3 else "vector", features=None)
  return train.for_training(setup_lib.model_setup(s, devices, data=data), source=None)


def alternate(calls: dict, repeats: int, budget_s: float | None = None) -> dict:
  """Runs each zero-argument callable in turn, `repeats` rounds (at least), timing each call.

  Every callable must block until its result is ready. One untimed warm-up
  round first. With budget_s, more rounds are run while the rounds fit in it.
  Returns {name: [seconds per call, ...]}.
  """
  t0 = time.perf_counter()
  for f in calls.values():
    f()
  once = time.perf_counter() - t0
  rounds = repeats if budget_s is None else max(repeats, int(budget_s / max(once, 1e-6)))
  out = {k: [] for k in calls}
  for _ in range(rounds):
    for k, f in calls.items():
      t0 = time.perf_counter()
      f()
      out[k].append(time.perf_counter() - t0)
  return out


def matmul_peak(n: int, dtype, repeats: int = 5):
  """Best FLOP/s of an n x n @ n x n jnp.dot over `repeats` calls (2 n^3 FLOPs each)."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(jnp.dot)
  jax.block_until_ready(f(a, b))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, b))
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as fh:
      for line in fh:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform
  return platform.processor() or "unknown"
