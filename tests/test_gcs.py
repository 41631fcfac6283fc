"""The programs on gs:// end to end, against the local GCS emulator (conftest `gcs`), in real processes.

One toy2d configuration throughout (tests/test_multiprocess.py's: 6 steps, a checkpoint every 3, 4 CPU
devices in all, mesh.ordered_reduction), so the two training runs below must give the same state bit for
bit, both with --workdir=gs://...:
  * multi: two processes of 2 devices joined on loopback, writing one checkpoint together;
  * cut: one process of 4 devices reading through 2 grain workers, a checkpoint every 2 steps, killed
    (-9) as it is about to save step 4 (the workers must exit with it), then resumed from step 2;
each checkpoint restored here by one process. Then --mode=sample into the cut run, killed between a
shard and its completion marker and restarted: the same shards as an uninterrupted job of the multi
run written to a local folder; and --mode=eval writing its JSON to gs://.
"""
import json
import os
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from diffusax import storage
from test_multiprocess import ROOT, STEPS, _args, _env, _state, _two_processes
from test_sample_job import _BLOCK_AFTER_SHARD
from test_train import _BLOCK_AT_SAVE, _children, _kill_when_ready

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="loopback multi-process launch script is for Linux")


def _run(args, gcs, devices=4, timeout=300):
  return subprocess.run([sys.executable, "-m", "diffusax.main", *args], cwd=ROOT, env={**_env(devices), **gcs["env"]},
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(gcs, tmp_path_factory):
  """{data_dir, multi and cut (gs:// workdirs, see the module docstring), multi_out (its stdout), tmp}."""
  tmp = tmp_path_factory.mktemp("gcs_runs")
  data_dir = str(tmp / "tfds")
  root = f"gs://bkt/{uuid.uuid4().hex[:8]}"
  multi, cut = storage.join(root, "multi"), storage.join(root, "cut")
  out = _two_processes(data_dir, multi)  # the environment (os.environ) points at the emulator
  # The cut run reads through 2 grain worker processes (the batches do not depend on the number of workers),
  # so the kill -9 also shows that the workers do not outlive their training process.
  # A checkpoint every 2 steps: killed at the save of step 4, mid-run (the workers stop before the last save).
  ready, extra = str(tmp / "ready"), ["--config.data.workers=2", "--config.train.ckpt_every=2"]
  p = subprocess.Popen([sys.executable, "-c", _BLOCK_AT_SAVE, "4", ready, *_args(data_dir, cut), *extra],
                       cwd=ROOT, env={**_env(4), **gcs["env"]}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while not os.path.exists(ready):
      assert p.poll() is None and time.time() < deadline, "the child did not reach the save of step 4"
      time.sleep(0.02)
    children = _children(p.pid)
    assert len(children) >= 2, children  # the 2 grain workers (and multiprocessing's resource tracker)
    _kill_when_ready(p, ready, "the save of step 4")
  finally:
    if p.poll() is None:
      p.kill()
  deadline = time.time() + 10  # the workers notice within ~1 s that their parent is gone, and exit
  while any(os.path.exists(f"/proc/{w}") for w in children) and time.time() < deadline:
    time.sleep(0.1)
  assert not [w for w in children if os.path.exists(f"/proc/{w}")], "grain workers outlived a kill -9"
  steps = sorted(int(d) for d in storage.listdir(storage.join(cut, "checkpoints")) if d.isdigit())
  assert steps == [2], steps
  r = _run([*_args(data_dir, cut), *extra], gcs)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step 2" in r.stdout, r.stdout
  return {"data_dir": data_dir, "multi": multi, "cut": cut, "multi_out": out, "tmp": tmp}


def _assert_same_state(a_wd, b_wd, step):
  for wd in (a_wd, b_wd):
    storage.refresh(wd)  # written by other processes since this one listed it
  a, b = _state(a_wd, step), _state(b_wd, step)
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_two_processes_and_a_killed_one_write_the_same_checkpoints_to_gs(runs):
  """2 processes x 2 devices and 1 process x 4 devices, killed and resumed: the same draws, the same rows
  per device, and (mesh.ordered_reduction) the per-device gradient sums added in device order, so the
  whole state is bit for bit the same after 6 steps, and so are the losses and gradient norms logged at
  steps 3 and 6 (the cut run's from its resumed part)."""
  multi, cut, out = runs["multi"], runs["cut"], runs["multi_out"]
  # Only process 0 writes: one progress line per log step, one metrics file.
  assert out.count(f"done: step {STEPS}") == 1, out
  # Each process holds full copies of the (replicated) state: process 0 checked that both processes'
  # copies are bit-identical after the last step.
  assert "replica check: " in out and "bit-identical on all 2 processes" in out, out
  _assert_same_state(multi, cut, STEPS)
  assert storage.listdir(storage.join(multi, "checkpoints")) == ["3", "6"]
  assert storage.listdir(storage.join(cut, "checkpoints")) == ["2", "4", "6"]
  names = set(storage.listdir(cut))
  assert {"checkpoints", "tb", "metrics.json", "samples.png", f"samples_{STEPS:07d}.png"} <= names, names
  assert storage.read_bytes(storage.join(cut, "samples.png"))[:8] == b"\x89PNG\r\n\x1a\n"
  assert any("tfevents" in n for n in storage.listdir(storage.join(cut, "tb")))
  hm = {h["step"]: h for h in storage.read_json(storage.join(multi, "metrics.json"))["history"]}
  hc = {h["step"]: h for h in storage.read_json(storage.join(cut, "metrics.json"))["history"]}
  assert sorted(hm) == sorted(hc) == [3, STEPS]  # the resumed run logs steps 3 and 6 (3 and 4 redone)
  for st in (3, STEPS):
    assert (hc[st]["loss"], hc[st]["grad_norm"]) == (hm[st]["loss"], hm[st]["grad_norm"])


def test_without_ordered_reduction_two_processes_differ_from_the_ordered_result(runs, tmp_path):
  """The negative control the README promises: the same two-process run with an all-reduce (whose
  summation order depends on the topology) is not bit-identical to the ordered result (which every
  topology reproduces, above), but differs only by summation order."""
  wd = str(tmp_path / "unordered")
  _two_processes(runs["data_dir"], wd, ordered=False)
  storage.refresh(runs["multi"])
  a, b = _state(wd, STEPS), _state(runs["multi"], STEPS)
  assert len(a) == len(b) > 0
  differ, total, worst = 0, 0, 0.0
  for x, y in zip(a, b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    total += x.size
    if np.issubdtype(x.dtype, np.floating):
      differ += int(np.sum(x != y))
      scale = max(float(np.max(np.abs(y))), 1e-30)
      worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y))) / scale)
  print(f"\nwithout mesh.ordered_reduction: {differ} of {total} values differ after {STEPS} steps "
        f"(largest difference {worst:.1e} of the array's scale)")
  assert differ > 0, "the all-reduce gave bit-identical states: the ordered reduction's test proves nothing"
  assert worst < 1e-4, "the runs differ by more than summation order can explain"


def _sample(wd, data_dir, extra=()):
  return [*_args(data_dir, wd), "--mode=sample", "--config.sample.method=ddpm", "--config.sample.num_steps=8",
          "--config.sample.num_samples=24", "--config.sample.shard_size=4", *extra]


def test_sampling_into_gs_killed_between_a_shard_and_its_marker_gives_the_same_set(runs, gcs):
  from diffusax.sampling import job as job_lib
  ref_out = str(runs["tmp"] / "ref_samples")
  r = _run(_sample(runs["multi"], runs["data_dir"], [f"--config.sample.output_dir={ref_out}"]), gcs)
  assert r.returncode == 0, r.stderr[-3000:]
  ready = str(runs["tmp"] / "ready_sample")
  p = subprocess.Popen([sys.executable, "-c", _BLOCK_AFTER_SHARD, "3", ready, "torn",
                        *_sample(runs["cut"], runs["data_dir"])], cwd=ROOT, env={**_env(4), **gcs["env"]},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    _kill_when_ready(p, ready, "the write of shard 3")
  finally:
    if p.poll() is None:
      p.kill()
  (out,) = [storage.join(runs["cut"], "samples", d) for d in storage.listdir(storage.join(runs["cut"], "samples"))]
  names = set(storage.listdir(out))
  assert "shard_000003.npz" in names and "shard_000003.npz.committed" not in names  # torn: no marker
  assert job_lib.done_shards(out) == set(range(3))  # of 6: shard 3 does not count
  r = _run(_sample(runs["cut"], runs["data_dir"]), gcs)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resuming: 3/6 shards (12 samples) already in gs://" in r.stdout, r.stdout
  assert job_lib.done_shards(out) == set(range(6))
  assert job_lib.digest(out) == job_lib.digest(ref_out)
  assert storage.exists(storage.join(out, "samples.png"))


def test_eval_writes_its_json_to_gs(runs, gcs):
  r = _run([*_args(runs["data_dir"], runs["cut"]), "--mode=eval", "--config.eval.metrics=('bpd_ode',)",
            "--config.eval.bpd_examples=8", "--config.eval.ode_steps=4"], gcs)
  assert r.returncode == 0, r.stderr[-3000:]
  got = storage.read_json(storage.join(runs["cut"], "eval", f"eval_{STEPS:07d}.json"))
  assert got["step"] == STEPS and np.isfinite(got["metrics"]["bpd_ode"])


def test_a_missing_bucket_is_one_line_before_any_work(gcs, capsys):
  """main's start-up probe (the CLI's other one-line errors run as processes in tests/test_cli_errors.py)."""
  from diffusax import main
  with pytest.raises(SystemExit) as e:
    main._check_workdir("gs://no-such-bucket-x/run")
  assert e.value.code == 2
  assert capsys.readouterr().err.splitlines() == [
      "diffusax: error: --workdir=gs://no-such-bucket-x/run cannot be used: the bucket does not exist (or is not "
      "visible to these credentials)"]
