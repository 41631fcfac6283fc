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
  """configs/<name>.py get_config() with dotted-key overrides, e.g. {"model.kwargs.base_channels": 32}."""
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

  Mirrors `train.setup` (mesh, abstract init, parameter shardings, abstract
  state, state shardings) for configs whose data is not on this machine
  (cifar10); the step and state built from it are the program's own
  (`train.make_runner`, `train.init_state`).
  """
  import jax
  import jax.numpy as jnp

  from diffusax import checkpoint as ckpt_lib
  from diffusax.parallel import mesh as mesh_lib
  from diffusax.programs import settings as settings_lib
  from diffusax.programs import train
  from diffusax.training import optimizer as optim_lib
  from diffusax.training import state as state_lib

  s = settings_lib.with_null_class(s, num_classes)
  mesh = mesh_lib.make_mesh(s.mesh_shape, devices)
  module = train.build_module(s, num_classes)
  x = jax.ShapeDtypeStruct((2,) + tuple(sample_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  y = jax.ShapeDtypeStruct((2,), jnp.int32) if s.class_conditional else None
  boxed = jax.eval_shape(lambda k, x, t, y: module.init({"params": k, "dropout": k}, x, t, y, train=False),
                         jax.random.key(0), x, t, y)["params"]
  param_sh = mesh_lib.param_shardings(boxed, mesh)
  tx, lr_fn = optim_lib.make(s.optim)
  abstract_params = mesh_lib.unbox(boxed)
  abstract_state = jax.eval_shape(lambda p: state_lib.create(p, tx, s.seed, len(s.ema_decays)), abstract_params)
  shardings = train.state_shardings(abstract_state, param_sh, mesh)
  return train.Setup(s=s, mesh=mesh, module=module, schedule=s.schedule, source=None, num_classes=num_classes,
                     sample_shape=tuple(sample_shape), tx=tx, lr_fn=lr_fn, abstract_state=abstract_state,
                     state_shardings=shardings,
                     signature=ckpt_lib.model_signature(abstract_params, s.model_settings()))


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
