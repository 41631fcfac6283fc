"""Few-step sampling on the digits, measured (issue #18): distilled students against solvers on the teacher.

The teacher is the README's digits model (configs/digits.py, 2000 steps). The students:

    python -m diffusax.main --config=configs/digits_distill.py --workdir=runs/digits_distill --mode=distill
    python -m diffusax.main --config=configs/digits_consistency.py --workdir=runs/digits_cd --mode=distill

Every row is fd_digits and class accuracy of 900 class-balanced samples (the --mode=eval metrics and
reference: half A of the real digits; half B's distance to it is the real-data floor), no guidance
(w = 0: the conditional model, one network call per step), the same seed for every row:

  * the teacher with DDIM, DPM-Solver++(2M), DPM-Solver++(3M) and UniPC(bh2, order 2) at 1, 2, 4, 8
    network calls on their default grids, DDIM on the students' trailing grid, and DDIM at 64;
  * each progressive student (students/<n>) with its n DDIM steps on the trailing grid;
  * the consistency student with 1, 2, 4 and 8 steps of the multistep consistency sampler;
  * guided (w = 1, the README grid's weight): the teacher with CFG (2 network calls per step) by DDIM
    and DPM-Solver++(2M) at 1, 2, 4, 8 steps and DDIM at 64, against the guided students
    (configs/digits_guided.py, students/<n>, w as their input: one call per step).

    .venv/bin/python benchmarks/distillation.py --teacher=runs/digits --progressive=runs/digits_distill \
        --consistency=runs/digits_cd --guided=runs/digits_guided --out=runs/bench18

Writes benchmarks/distillation.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "configs"))

CALLS = (1, 2, 4, 8)
SOLVERS = ("ddim", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "unipc")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--teacher", required=True)
  ap.add_argument("--progressive", required=True)
  ap.add_argument("--consistency", required=True)
  ap.add_argument("--guided", default="")
  ap.add_argument("--out", required=True)
  ap.add_argument("--data_dir", default="")
  ap.add_argument("--num_samples", type=int, default=900)
  ap.add_argument("--parts", default="teacher,teacher_trailing,progressive,consistency,guided",
                  help="which rows to (re)measure; the others are kept from an existing distillation.json")
  a = ap.parse_args()
  import digits
  from diffusax.programs import evaluate, setup as setup_lib
  from diffusax.programs import settings as settings_lib
  from diffusax.programs.logs import Logger
  c = digits.get_config()
  if a.data_dir:
    c.data.data_dir = a.data_dir
  c.eval.metrics = ("fd", "class_accuracy")
  c.eval.num_samples = a.num_samples
  c.sample.guidance_scale = 0.0
  base = settings_lib.parse(c)
  u = setup_lib.model_setup(base)
  logger = Logger(a.out, enabled=False)
  rows = []

  gbase = gu = None
  if a.guided:
    import digits_guided
    cg = digits_guided.get_config()
    cg.data.data_dir, cg.eval.metrics, cg.eval.num_samples = c.data.data_dir, c.eval.metrics, c.eval.num_samples
    gbase = settings_lib.parse(cg)
    gu = setup_lib.model_setup(gbase)

  def measure(who, workdir, method, steps, spacing="", w=0.0, student_w=False):
    b, mu = (gbase, gu) if student_w else (base, u)
    s = dataclasses.replace(b, sample=dataclasses.replace(b.sample, method=method, num_steps=steps,
                                                              spacing=spacing, guidance_scale=w))
    uw = dataclasses.replace(mu, s=settings_lib.with_null_class(s, mu.num_classes))
    params, step = setup_lib.restore_ema(uw, workdir)
    t0 = time.perf_counter()
    m = evaluate.Evaluator(uw).evaluate(params, step, os.path.join(a.out, who, f"{method}{steps}"), logger)["metrics"]
    nfe = steps * (2 if w and not student_w else 1)
    row = {"model": who, "method": method, "spacing": spacing or "default", "steps": steps, "nfe": nfe, "w": w,
           "fd_digits": m["fd_digits"], "class_accuracy": m["class_accuracy"],
           "fd_digits_real_baseline": m.get("fd_digits_real_baseline"), "seconds": round(time.perf_counter() - t0, 1)}
    rows.append(row)
    print(json.dumps(row), flush=True)

  parts = set(a.parts.split(","))
  if "teacher" in parts:
    for method in SOLVERS:
      for n in CALLS:
        measure("teacher", a.teacher, method, n)
    measure("teacher", a.teacher, "ddim", 64)
  if "teacher_trailing" in parts:  # The students' own grid, t_i = t_max (1 - i / n), for the teacher too.
    for n in CALLS:
      measure("teacher", a.teacher, "ddim", n, "trailing")
  if "progressive" in parts:
    for n in CALLS:
      measure("progressive", os.path.join(a.progressive, "students", str(n)), "ddim", n, "trailing")
  if "consistency" in parts:
    for n in CALLS:
      measure("consistency", os.path.join(a.consistency, "students", "consistency"), "consistency", n)
  if a.guided and "teacher" in parts:
    for method in ("ddim", "dpm_solver_pp_2m"):
      for n in CALLS:
        measure("teacher_cfg", a.teacher, method, n, w=1.0)
    measure("teacher_cfg", a.teacher, "ddim", 64, w=1.0)
  if a.guided and "guided" in parts:
    for n in CALLS:
      measure("guided", os.path.join(a.guided, "students", str(n)), "ddim", n, "trailing", w=1.0, student_w=True)
  cost = {}
  for name, wd in (("teacher", a.teacher), ("progressive", a.progressive), ("consistency", a.consistency),
                   ("guided", a.guided)):
    if not wd:
      continue
    path = os.path.join(wd, "metrics.json" if name == "teacher" else "distill.json")
    if os.path.exists(path):
      cost[name] = json.load(open(path))
  summary = {
      "teacher_train": {"steps": cost.get("teacher", {}).get("step"),
                        "history_steps_per_s": [h.get("steps_per_s") for h in cost.get("teacher", {}).get("history", [])]},
      "distill_rounds": {k: v.get("rounds") for k, v in cost.items() if k != "teacher"}}
  path = os.path.join(HERE, "distillation.json")
  key = lambda r: (r["model"], r["method"], r["spacing"], r["steps"], r["w"])
  if os.path.exists(path):  # Rows of the parts not measured this time are kept.
    mine = {key(r) for r in rows}
    rows = [r for r in json.load(open(path))["rows"] if key(r) not in mine] + rows
  out = {"rows": rows, "cost": summary, "num_samples": a.num_samples}
  with open(path, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
