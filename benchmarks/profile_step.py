"""Where the train step's time goes on this backend: a `jax.profiler` trace of a few steps, by op.

Builds a case of train_step.py (the program's own step), runs a few steps under
`jax.profiler.trace`, reads the Perfetto JSON the trace writes and sums event
durations per XLA instruction name, then labels each instruction from the
compiled HLO text (convolution, dot, YNN/custom fusions by what they contain;
loop fusions by their name, e.g. transpose_copy_fusion). Prints the top
instructions and a summary by category as fractions of the summed op time,
beside the untraced step time. Caveat: XLA:CPU's trace holds Eigen
convolutions (runtime.xla_cpu_eigen_convs on) as their dispatch only, so
their compute shows as the gap between the untraced step and the op sum.

    .venv/bin/python benchmarks/profile_step.py [--case c32] [--eigen on] [--steps 5]

Writes benchmarks/profile_step_<case>_<eigen>.json (on a GPU _gpu.json, bf16 at the GPU batch;
or --out) with the category table. Uses
train_step.py's compilation cache directory, so after a train_step.py run it
starts in seconds.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import inspect
import json
import os
import re
import tempfile
import time

import harness


def hlo_kinds(hlo_text: str) -> dict:
  """instruction name -> category, from the compiled (optimized) HLO module text."""
  kinds = {}
  comp_body = {}
  current = None
  for line in hlo_text.splitlines():
    m = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if m and "=" not in line.split("{")[0]:
      current = m.group(1)
      comp_body[current] = []
      continue
    if current is not None:
      comp_body[current].append(line)

  def classify_line(line: str) -> str | None:
    if " convolution(" in line:
      return "conv"
    if " dot(" in line:
      return "dot"
    if "custom-call(" in line:
      return "custom-call"
    return None

  for body in comp_body.values():
    for line in body:
      m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+.*?\s([\w\-]+)\(", line)
      if not m:
        continue
      name, op = m.group(1), m.group(2)
      cat = classify_line(line)
      if op == "fusion":
        called = re.search(r"calls=%?([\w.\-]+)", line)
        kind = re.search(r"kind=(\w+)", line)
        inner = [classify_line(b) for b in comp_body.get(called.group(1), [])] if called else []
        inner = [c for c in inner if c]
        if inner:
          cat = inner[0] + " (fused)"
        else:
          has_reduce = any(" reduce(" in b for b in comp_body.get(called.group(1), [])) if called else False
          cat = f"fusion {kind.group(1) if kind else ''}{' +reduce' if has_reduce else ''}".strip()
      elif cat is None:
        cat = op
      kinds[name] = cat
  return kinds


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--case", default="c32")
  ap.add_argument("--eigen", default="on", choices=("on", "off"))
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--top", type=int, default=25)
  ap.add_argument("--out", default="", help="JSON path (default: benchmarks/profile_step_<case>_<eigen|gpu>.json)")
  ap.add_argument("--cache_dir", default=os.path.join(tempfile.gettempdir(), "diffusax_benchmark_cache"),
                  help="runtime.compilation_cache_dir (shared with train_step.py); '' = off")
  args = ap.parse_args()
  harness.apply_runtime(harness.load_config("digits", {"runtime.xla_cpu_eigen_convs": args.eigen == "on",
                                                      "runtime.compilation_cache_dir": args.cache_dir}))
  import jax
  import numpy as np

  import train_step as ts
  from diffusax.programs import train

  cfg, over, shape, b_cpu, b_gpu = ts.CASES[args.case]
  gpu = jax.default_backend() != "cpu"  # On a GPU: bf16 compute (float32 params) at train_step.py's GPU batch.
  batch = b_gpu if gpu else b_cpu
  s = harness.settings(harness.load_config(cfg, {**over, "train.batch_size": batch, "mesh.shape": (1, 1),
                                                 "model.dtype": "bfloat16" if gpu else "float32"}))
  if args.case.startswith("digits"):
    u = train.setup(s, devices=jax.devices()[:1])
    host = next(train.make_iterator(u))
  else:
    u = harness.setup_without_data(s, shape, None, devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    host = {"x": rng.uniform(-1, 1, (batch,) + shape).astype(np.float32),
            "label": rng.integers(0, 10, batch).astype(np.int32)}
  runner = train.make_runner(u)
  state = runner.to_run(train.init_state(u))
  step_fn = inspect.getclosurevars(runner.step).nonlocals["step_fn"]
  for _ in range(2):
    state, m = runner.step(state, host)
  jax.block_until_ready(state)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
  gb = train.to_global({k: host[k] for k in ("x", "label")}, u.mesh)
  kinds = hlo_kinds(step_fn.lower(abstract, gb).compile().as_text())
  tdir = tempfile.mkdtemp(prefix="diffusax_profile_")
  t0 = time.perf_counter()
  with jax.profiler.trace(tdir, create_perfetto_trace=True):
    for _ in range(args.steps):
      state, m = runner.step(state, host)
      jax.block_until_ready(state)
  wall = (time.perf_counter() - t0) / args.steps
  path = glob.glob(os.path.join(tdir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
  events = json.load(gzip.open(path))
  events = events["traceEvents"] if isinstance(events, dict) else events
  # Untraced step time, for comparison with the sum of traced op durations.
  untraced = []
  for _ in range(3):
    t1 = time.perf_counter()
    state, m = runner.step(state, host)
    jax.block_until_ready(state)
    untraced.append(time.perf_counter() - t1)
  step_s = min(untraced)
  per_name = {}
  for e in events:
    if e.get("ph") == "X" and "dur" in e and e.get("name") in kinds:
      per_name[e["name"]] = per_name.get(e["name"], 0.0) + e["dur"] / 1e6 / args.steps
  total = sum(per_name.values())
  if not per_name:  # Event names that are not HLO instruction names (a GPU trace's kernels, say): list them raw.
    raw = {}
    for e in events:
      if e.get("ph") == "X" and "dur" in e:
        raw[e.get("name", "?")] = raw.get(e.get("name", "?"), 0.0) + e["dur"] / 1e6 / args.steps
    print(f"no trace event is named after an HLO instruction; top {args.top} raw events (ms/step):")
    for n, t in sorted(raw.items(), key=lambda kv: -kv[1])[:args.top]:
      print(f"{n[:70]:70s}{t * 1e3:9.2f}")
    per_name, kinds, total = {n: t for n, t in raw.items()}, {n: "raw event" for n in raw}, sum(raw.values()) or 1.0
  cats = {}
  for n, t in per_name.items():
    cat = kinds[n]
    if cat.startswith("fusion kLoop"):  # Name loop fusions by what they fuse (transpose_copy, add_divide...).
      cat = "loop " + re.sub(r"(\.\d+)?$", "", n)
    cats[cat] = cats.get(cat, 0.0) + t
  print(f"{args.case}, eigen {args.eigen}: {step_s * 1e3:.0f} ms/step untraced, {wall * 1e3:.0f} traced "
        f"(with the profiler's own stop); traced ops sum {total * 1e3:.0f} ms/step."
        + (" XLA:CPU records Eigen convolutions\nas their dispatch only: their compute is most of the gap."
           if args.eigen == "on" else ""))
  print(f"{'category':34s}{'ms/step':>9s}{'share':>7s}")
  small = 0.0
  for c, t in sorted(cats.items(), key=lambda kv: -kv[1]):
    if t < 0.01 * total:
      small += t
      continue
    print(f"{c:34s}{t * 1e3:9.1f}{t / total:7.1%}")
  print(f"{'(categories under 1% each)':34s}{small * 1e3:9.1f}{small / total:7.1%}")
  print(f"\ntop {args.top} instructions")
  for n, t in sorted(per_name.items(), key=lambda kv: -kv[1])[:args.top]:
    print(f"{n:40s}{kinds[n]:28s}{t * 1e3:9.1f}{t / total:7.1%}")
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                f"profile_step_{args.case}_{'gpu' if gpu else args.eigen}.json")
  with open(out, "w") as fh:
    json.dump({"case": args.case, "backend": jax.default_backend(), "batch": batch,
               "model_dtype": "bfloat16" if gpu else "float32", "eigen": args.eigen, "step_ms_untraced": step_s * 1e3, "wall_ms": wall * 1e3, "ops_ms": total * 1e3,
               "categories_ms": {c: t * 1e3 for c, t in cats.items()},
               "top": {n: [kinds[n], t * 1e3] for n, t in sorted(per_name.items(), key=lambda kv: -kv[1])[:50]}},
              fh, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
