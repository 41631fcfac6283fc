"""First-call compile time of the train step and the samplers, with and without the persistent cache.

Each measurement is a fresh process running the digits program's own pieces
(configs/digits.py; `runtime.*` applied as `diffusax.main` does, then
`programs.train.setup`): the state init (`train.init_state`), the train step
(`train.make_runner(...).step`, compiled on a thread by `train.compile_ahead` while
the state initialises, as the program does; its first call counts the wait for that
compile after init, and init's first call the time init took beside it), the
training program's sample grid
(`train.make_generator`: dpm_solver_pp_2m x 30 with CFG, 100 samples) and the
`--mode=sample` job's batch function (`sampling.job.make_sample_fn` jitted as
`job.run_job` does, one 256-sample shard). Reported per piece: its first call
(trace + compile or cache load + one run) and, for scale, its second call;
and `first_step_s`, the wall time from starting the process (interpreter,
imports, set-up, checkpointer, init) to the end of its first train step, in the
training program's order.

Cache settings, one process each, in this order per round:
  off    runtime.compilation_cache_dir = ""
  cold   a fresh empty cache directory (the first process fills it)
  warm   the same directory again (a second process should hit it)

    .venv/bin/python benchmarks/compile_time.py [--rounds 1]     (--report: reprint the JSON's table)
    .venv/bin/python benchmarks/compile_time.py --sequential --out benchmarks/compile_time_sequential.json

Reported: first-call seconds of each piece, the warm/off ratio (and cold/off, the cost of
writing the cache), and the cache directory's files and bytes after cold/warm.
Writes benchmarks/compile_time.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import harness

PIECES = ("init", "train_step", "sample_grid", "sample_job")
TOTALS = ("first_step_s", "process_s")


def _dir_stats(path: str) -> tuple[int, int]:
  files = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
  return len(files), sum(os.path.getsize(f) for f in files)


def worker(args) -> None:
  t_start = time.perf_counter()
  config = harness.load_config("digits", {"runtime.compilation_cache_dir": args.cache_dir, "mesh.shape": (1, 1)})
  harness.apply_runtime(config)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from diffusax.programs import setup as setup_lib
  from diffusax.programs import train
  from diffusax.sampling import job as job_lib

  s = harness.settings(config)
  u = train.setup(s, devices=jax.devices()[:1])
  out = {"cache_dir": args.cache_dir, "jax_compilation_cache_dir": jax.config.jax_compilation_cache_dir}

  def twice(name, f):
    t0 = time.perf_counter()
    jax.block_until_ready(f())
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(f())
    out[name] = {"first_s": first, "second_s": time.perf_counter() - t0}
    out[name]["compile_s"] = max(first - out[name]["second_s"], 0.0)

  # The training program's order up to its first step: checkpointer, init, runner, first batch, step.
  ckpt = train.open_checkpointer(u, tempfile.mkdtemp(prefix="diffusax_ct_"))
  times = {}

  def first(name, f):
    t0 = time.perf_counter()
    out_ = jax.block_until_ready(f())
    times[name] = time.perf_counter() - t0
    return out_

  runner = train.make_runner(u)
  it = train.make_iterator(u)
  # The step compiles on a thread while the state initialises (--sequential: after it, on first call).
  ahead = None if args.sequential else train.compile_ahead(runner, it)
  state = first("init", lambda: train.init_state(u))
  first("step_wait", ahead.result if ahead is not None else lambda: None)
  batch = next(it)
  box = {"state": runner.to_run(state)}

  def one_step():
    box["state"], m = runner.step(box["state"], batch)
    return box["state"], m

  first("train_step", one_step)
  times["train_step"] += times.pop("step_wait")  # The part of the step's compile that init did not hide.
  out["first_step_wall"] = time.time()
  for name, f in (("init", lambda: train.init_state(u)), ("train_step", one_step)):
    t0 = time.perf_counter()
    jax.block_until_ready(f())
    out[name] = {"first_s": times[name], "second_s": time.perf_counter() - t0}
    out[name]["compile_s"] = max(times[name] - out[name]["second_s"], 0.0)
  ckpt.close()
  params = box["state"].ema_params[0]
  gen = train.make_generator(u)
  labels = np.repeat(np.arange(u.num_classes), s.sample.per_class).astype(np.int32)
  key = jax.random.key(0)
  twice("sample_grid", lambda: gen(params, np.arange(len(labels)), labels, jnp.float32(1.0), key))
  spec = setup_lib.job_spec(u, step=0)
  fn = jax.jit(job_lib.make_sample_fn(u.module, u.schedule, s.loss.target, spec, null_class=s.loss.null_class))
  idx = np.arange(spec.shard_size, dtype=np.uint32)
  twice("sample_job", lambda: fn(params, idx, job_lib.labels_for(spec, idx), jnp.float32(1.0)))
  out["process_s"] = time.perf_counter() - t_start
  with open(args.worker_out, "w") as fh:
    json.dump(out, fh)


def _spawn(cache_dir: str, sequential: bool = False) -> dict:
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "out.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    start = time.time()
    subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--cache_dir", cache_dir,
                    "--worker_out", path] + (["--sequential"] if sequential else []), check=True, env=env)
    with open(path) as fh:
      out = json.load(fh)
    out["first_step_s"] = out.pop("first_step_wall") - start
    return out


def report(runs: dict, cache_files: list) -> dict:
  """Prints the table; returns {setting: {piece: min first-call seconds}} (+ steady second calls)."""
  best = {k: {p: min(run[p]["first_s"] for run in v) for p in PIECES} for k, v in runs.items()}
  steady = {p: min(run[p]["second_s"] for v in runs.values() for run in v) for p in PIECES}
  for k, v in runs.items():
    for total in TOTALS:
      best[k][total] = min(run[total] for run in v if total in run)
  print(f"\nfirst-call seconds (compile + one run; min of {len(runs['off'])} round(s)); digits config, "
        f"{harness.cpu_model()}")
  print(f"{'piece':13s}{'off':>8s}{'cold':>8s}{'warm':>8s}{'warm/off':>10s}{'cold/off':>10s}{'2nd call':>10s}")
  for p in PIECES + TOTALS:
    o, c, w = best["off"][p], best["cold"][p], best["warm"][p]
    print(f"{p:13s}{o:8.2f}{c:8.2f}{w:8.2f}{w / o:10.2f}{c / o:10.2f}"
          + (f"{steady[p]:10.2f}" if p in steady else ""))
  print(f"cache dir after cold / warm (files, bytes): {cache_files}")
  best["second_call_s"] = steady
  return best


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=1, help="rounds of (off, cold, warm) processes")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "compile_time.json"))
  ap.add_argument("--report", action="store_true", help="print the table of the JSON at --out again")
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--cache_dir", default="", help=argparse.SUPPRESS)
  ap.add_argument("--worker_out", default="", help=argparse.SUPPRESS)
  ap.add_argument("--sequential", action="store_true",
                  help="compile the train step on its first call, after init (not ahead on a thread)")
  args = ap.parse_args()
  if args.worker:
    return worker(args)
  if args.report:
    with open(args.out) as fh:
      d = json.load(fh)
    return report(d["runs"], d["cache_files"])
  runs = {"off": [], "cold": [], "warm": []}
  cache_files = []
  for r in range(args.rounds):
    cache = tempfile.mkdtemp(prefix="diffusax_cc_")
    try:
      runs["off"].append(_spawn("", args.sequential))
      runs["cold"].append(_spawn(cache, args.sequential))
      after_cold = _dir_stats(cache)
      runs["warm"].append(_spawn(cache, args.sequential))
      cache_files.append({"after_cold": after_cold, "after_warm": _dir_stats(cache)})
    finally:
      shutil.rmtree(cache, ignore_errors=True)
    print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]['train_step']['compile_s']:.1f}s" for k, v in runs.items())
          + " (train step compile)", flush=True)
  with open(args.out, "w") as fh:
    json.dump({"date": time.strftime("%Y-%m-%d"), "cpu": harness.cpu_model(), "rounds": args.rounds,
               "cores": len(os.sched_getaffinity(0)), "compile_ahead": not args.sequential,
               "best": report(runs, cache_files), "cache_files": cache_files, "runs": runs}, fh, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
