"""Starting JAX's multi-process runtime when a run is launched on several processes.

`initialize(mode)` must run before the first device use. Modes (config key
`runtime.distributed`):

  "auto"  initialise when the environment says the run is multi-process:
          JAX_COORDINATOR_ADDRESS is set (launch/local_multiprocess.sh, or set
          by hand with JAX_NUM_PROCESSES and JAX_PROCESS_ID), or SLURM runs more
          than one task (SLURM_NTASKS > 1; launch/slurm_gpu.sbatch), or a Cloud
          TPU pod slice has more than one worker (TPU_WORKER_HOSTNAMES lists
          several hosts; launch/tpu_pod.sh).
  "on"    always call `jax.distributed.initialize()` (JAX detects the cluster).
  "off"   never (one process).

On CPU the cross-process collectives use gloo. Everything else in diffusax
reads `jax.process_index()` / `jax.process_count()` and works unchanged.
"""
from __future__ import annotations

import os

MODES = ("auto", "on", "off")

_ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM = "JAX_NUM_PROCESSES"
_ENV_ID = "JAX_PROCESS_ID"


def wanted(mode: str, environ=os.environ) -> bool:
  """Whether `initialize(mode)` would start the multi-process runtime in this environment."""
  if mode not in MODES:
    raise ValueError(f"runtime.distributed must be one of {list(MODES)}, got {mode!r}")
  if mode == "off":
    return False
  if mode == "on":
    return True
  if environ.get(_ENV_ADDRESS):
    return True
  if int(environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in environ:
    return True
  hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  return len(hosts) > 1


def initialize(mode: str = "auto", environ=os.environ) -> bool:
  """Starts `jax.distributed` when `wanted(mode)`; returns whether it did. Idempotent."""
  if not wanted(mode, environ):
    return False
  import jax
  if jax.distributed.is_initialized():
    return True
  kw = {}
  if environ.get(_ENV_ADDRESS):
    kw["coordinator_address"] = environ[_ENV_ADDRESS]
    if environ.get(_ENV_NUM):
      kw["num_processes"] = int(environ[_ENV_NUM])
    if environ.get(_ENV_ID):
      kw["process_id"] = int(environ[_ENV_ID])
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kw)
  return True
