"""The programs on gs:// (the local GCS emulator) against a local workdir: wall time and requests.

Runs, each a fresh `python -m diffusax.main` process, local then gs:// per round:
  train    configs/toy2d.py (hidden 64, batch 64), 200 steps, a checkpoint every 50 (4 + EMA), log every 50
  sample   --mode=sample of that run: 96 samples in 12 shards of 8 (ddpm, 20 steps)
The emulator (tests/gcs_emulator.py: gcp-storage-emulator in memory on loopback) answers without
network latency, so the time ratio is the client-side cost of the object-store path (HTTP, JSON, the
commit markers), not what a real bucket costs; the request counts (from the emulator's log, by
method) are what a real bucket's latency multiplies.

    .venv/bin/python benchmarks/storage.py [--rounds 2]      (needs the dev extra: gcsfs, gcp-storage-emulator)

Writes benchmarks/storage.json and prints a table.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

TRAIN = ["--config=configs/toy2d.py", "--config.model.mlp.hidden=64", "--config.model.mlp.depth=2",
         "--config.train.batch_size=64", "--config.train.num_steps=200", "--config.train.ckpt_every=50",
         "--config.train.log_every=50", "--config.train.eval_batches=1", "--config.sample.num_steps=4",
         "--config.sample.per_class=8"]
SAMPLE = ["--mode=sample", "--config.sample.method=ddpm", "--config.sample.num_steps=20",
          "--config.sample.num_samples=96", "--config.sample.shard_size=8"]
_REQ = re.compile(r'"(GET|POST|PUT|PATCH|DELETE|HEAD) ')


def _requests(log: str, start: int) -> tuple[dict, int]:
  with open(log) as f:
    f.seek(start)
    text = f.read()
    end = f.tell()
  return dict(collections.Counter(_REQ.findall(text))), end


def _run(args, env) -> float:
  t = time.perf_counter()
  r = subprocess.run([sys.executable, "-m", "diffusax.main", *args], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=900)
  if r.returncode:
    raise SystemExit(r.stderr[-3000:])
  return time.perf_counter() - t


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=2)
  a = ap.parse_args()
  from gcs_emulator import start
  server, genv = start()
  env = {**os.environ, **genv, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.path.join(REPO, "src")}
  tmp = tempfile.mkdtemp(prefix="diffusax_bench_storage.")
  data_dir = os.path.join(tmp, "tfds")
  rows, pos = [], 0
  try:
    for r in range(a.rounds):
      for where in ("local", "gs"):
        wd = os.path.join(tmp, f"run{r}") if where == "local" else f"gs://bkt/bench/{uuid.uuid4().hex[:8]}"
        _, pos = _requests(server.log_path, pos)
        row = {"round": r, "where": where}
        row["train_s"] = _run([*TRAIN, f"--workdir={wd}", f"--config.data.data_dir={data_dir}"], env)
        row["train_requests"], pos = _requests(server.log_path, pos)
        row["sample_s"] = _run([*TRAIN, *SAMPLE, f"--workdir={wd}", f"--config.data.data_dir={data_dir}"], env)
        row["sample_requests"], pos = _requests(server.log_path, pos)
        rows.append(row)
        print(json.dumps(row), flush=True)
  finally:
    server.terminate()
    server.wait(10)
    os.remove(server.log_path)

  def mean(where, key):
    v = [x[key] for x in rows if x["where"] == where]
    return sum(v) / len(v)

  summary = {k: {"local_s": round(mean("local", k), 2), "gs_s": round(mean("gs", k), 2),
                 "gs_over_local": round(mean("gs", k) / mean("local", k), 3)} for k in ("train_s", "sample_s")}
  last = [x for x in rows if x["where"] == "gs"][-1]
  summary["train_requests"] = last["train_requests"]
  summary["sample_requests"] = last["sample_requests"]
  out = {"what": __doc__.split("\n\n")[0], "rounds": a.rounds, "rows": rows, "summary": summary}
  with open(os.path.join(REPO, "benchmarks", "storage.json"), "w") as f:
    json.dump(out, f, indent=1)
  print(f"{'program':8s} {'local s':>8s} {'gs:// s':>8s} {'ratio':>6s}  requests on gs:// (last round)")
  for k, req in (("train_s", "train_requests"), ("sample_s", "sample_requests")):
    s = summary[k]
    print(f"{k[:-2]:8s} {s['local_s']:8.2f} {s['gs_s']:8.2f} {s['gs_over_local']:6.2f}  {summary[req]}")


if __name__ == "__main__":
  main()
