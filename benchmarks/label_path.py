"""Is the label-only path as fast as before image conditioning? The training program's own train step and
a CFG sampler of a label-conditioned model, at this checkout and at a reference commit (default 74d0a09,
the last before the image-conditioning work), side by side.

    python benchmarks/label_path.py [--ref 74d0a09] [--cases digits,photos] [--rounds 20]

The reference commit's tree is extracted with `git archive` into a temporary folder, and each tree runs
in its own worker process (its `src` first on sys.path; the worker checks that it imported the tree it
was given). Each worker builds, for each case, the program's own set-up on the embedded data
(`train.setup`, `train.init_state`, `train.make_runner`: jit with donation, EMA, clipping) and a
DPM-Solver++(2M) x 30 sampler with classifier-free guidance (w = 1) on 10 labels (`nn.bridge.model`,
`bridge.condition`, `core.samplers.sample`), and reports XLA facts of the compiled train step (cost-analysis
FLOPs and bytes accessed, the optimized module's instruction count). The parent then alternates the two
workers' calls, one of each kind per round, the order swapping every round, so that both trees are timed
side by side on the same (shared, noisy) machine. Reported per case: fastest and median seconds of each,
and this tree / reference (fastest and median).

Writes benchmarks/label_path.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CASES = {"digits": "digits", "photos": "photos"}  # case -> config file, each on its embedded data.


# ----------------------------------------------------------------------------- worker
def _config(tree: str, name: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"label_path_config_{name}", os.path.join(tree, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def prepare(tree: str, name: str) -> tuple[dict, dict]:
  import inspect

  import jax
  import jax.numpy as jnp
  import numpy as np

  from diffusax.core import samplers
  from diffusax.nn import bridge
  from diffusax.programs import settings as settings_lib
  from diffusax.programs import train

  s = settings_lib.parse(_config(tree, CASES[name]))
  u = train.setup(s, devices=jax.devices()[:1])
  host = next(train.make_iterator(u))
  runner = train.make_runner(u)
  box = {"state": runner.to_run(train.init_state(u))}

  def step():
    box["state"], m = runner.step(box["state"], host)
    jax.block_until_ready((box["state"], m))

  step()
  facts = {"batch": int(host["x"].shape[0]), "shape": list(host["x"].shape[1:])}
  step_fn = inspect.getclosurevars(runner.step).nonlocals.get("step_fn")
  if step_fn is not None:
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), box["state"])
    gb = train.to_global({k: host[k] for k in ("x", "label")}, u.mesh)
    compiled = step_fn.lower(abstract, gb).compile()
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    text = compiled.as_text()
    facts.update(step_flops=float(ca.get("flops", float("nan"))),
                 step_bytes_accessed=float(ca.get("bytes accessed", float("nan"))),
                 step_hlo_instructions=len(re.findall(r"^\s+(?:ROOT\s+)?%?[\w.\-]+ = ", text, re.M)))

  # A copy: the train step donates the state. The sampler's cost does not depend on the values.
  params = jax.tree.map(jnp.copy, box["state"].params)
  labels = jnp.arange(10, dtype=jnp.int32) % u.num_classes
  x_T = jax.random.normal(jax.random.key(0), (10,) + tuple(host["x"].shape[1:]), jnp.float32)

  @jax.jit
  def sample(params, x_T, labels):
    model = bridge.model(u.module, {"params": params}, u.s.loss.target, u.schedule)
    model, cond = bridge.condition(u.module, model, labels, 1.0, u.s.loss.null_class)
    return samplers.sample(model, x_T, key=jax.random.key(1), method="dpm_solver_pp_2m", num_steps=30, cond=cond)

  def sampler():
    jax.block_until_ready(sample(params, x_T, labels))

  sampler()
  return facts, {"train_step": step, "sampler": sampler}


def worker(args) -> None:
  sys.path.insert(0, os.path.join(args.tree, "src"))
  from diffusax import main as main_lib
  from diffusax.programs import settings as _  # noqa: F401 - jax first, as diffusax.main does.
  import diffusax
  say = lambda obj: print("@@" + json.dumps(obj), flush=True)  # noqa: E731
  imported = os.path.realpath(diffusax.__file__)
  if not imported.startswith(os.path.realpath(args.tree) + os.sep):
    raise SystemExit(f"worker for {args.tree} imported diffusax from {imported}")
  main_lib._apply_runtime(_config(args.tree, "digits"))
  cases, facts = {}, {}
  for name in args.cases.split(","):
    facts[name], cases[name] = prepare(args.tree, name)
  say({"ready": facts, "diffusax": imported})
  for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == "quit":
      break
    t0 = time.perf_counter()
    cases[cmd[1]][cmd[2]]()
    say({"s": time.perf_counter() - t0})


# ----------------------------------------------------------------------------- parent
class _Worker:
  def __init__(self, tree: str, cases: str):
    env = {**os.environ, "PYTHONPATH": os.path.join(tree, "src")}
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", "--tree", tree,
                                  "--cases", cases], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=env, cwd=tree)

  def read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith("@@"):
        return json.loads(line[2:])
    raise RuntimeError(f"worker exited with {self.proc.wait()}")

  def ask(self, case: str, call: str) -> float:
    self.proc.stdin.write(f"time {case} {call}\n")
    self.proc.stdin.flush()
    return self.read()["s"]

  def close(self):
    try:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.close()
    except OSError:
      pass
    self.proc.wait()


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--ref", default="74d0a09", help="the reference commit (default: the last before image conditioning)")
  ap.add_argument("--cases", default="digits,photos")
  ap.add_argument("--rounds", type=int, default=20)
  ap.add_argument("--out", default=os.path.join(HERE, "label_path.json"))
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--tree", default=REPO, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    return worker(args)
  import numpy as np
  head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                        check=True).stdout.strip()
  dirty = bool(subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no", "--", "src",
                               "configs"], capture_output=True, text=True, check=True).stdout.strip())
  ref = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", args.ref], capture_output=True, text=True,
                       check=True).stdout.strip()
  with tempfile.TemporaryDirectory(prefix="diffusax_ref_") as tmp:
    subprocess.run(f"git -C {REPO} archive {ref} | tar -x -C {tmp}", shell=True, check=True)
    workers, ready = {}, {}
    for k, tree in (("this", REPO), ("ref", tmp)):  # One after the other: the first builds any missing dataset.
      workers[k] = _Worker(tree, args.cases)
      ready[k] = workers[k].read()
    times = {(k, c, call): [] for k in workers for c in args.cases.split(",") for call in ("train_step", "sampler")}
    for r in range(args.rounds):
      order = list(workers) if r % 2 == 0 else list(reversed(workers))
      for c in args.cases.split(","):
        for call in ("train_step", "sampler"):
          for k in order:
            times[(k, c, call)].append(workers[k].ask(c, call))
    for w in workers.values():
      w.close()
  out = {"this": head + ("+uncommitted" if dirty else ""), "ref": ref, "rounds": args.rounds, "cases": {}}
  for c in args.cases.split(","):
    row = {"facts_this": ready["this"]["ready"][c], "facts_ref": ready["ref"]["ready"][c]}
    for call in ("train_step", "sampler"):
      a, b = times[("this", c, call)], times[("ref", c, call)]
      row[call] = {"this_s_min": min(a), "ref_s_min": min(b), "this_s_median": float(np.median(a)),
                   "ref_s_median": float(np.median(b)), "ratio_min": min(a) / min(b),
                   "ratio_median": float(np.median(a) / np.median(b))}
    out["cases"][c] = row
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  print(f"this tree {out['this']} against {ref} ({args.rounds} rounds, alternating)")
  print(f"{'case':8s} {'call':11s} {'this min':>9s} {'ref min':>9s} {'ratio min':>9s} {'ratio med':>9s}  step FLOPs / bytes / HLO instr.")
  for c, row in out["cases"].items():
    for call in ("train_step", "sampler"):
      t = row[call]
      facts = ""
      if call == "train_step":
        ft, fr = row["facts_this"], row["facts_ref"]
        facts = " ".join(f"{ft.get(k, float('nan')):.4g}/{fr.get(k, float('nan')):.4g}"
                         for k in ("step_flops", "step_bytes_accessed", "step_hlo_instructions"))
      print(f"{c:8s} {call:11s} {t['this_s_min']:9.4f} {t['ref_s_min']:9.4f} {t['ratio_min']:9.3f} "
            f"{t['ratio_median']:9.3f}  {facts}")


if __name__ == "__main__":
  main()
