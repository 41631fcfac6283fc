"""The sampling job: per-index samples, atomic shards, resume after SIGKILL with identical output."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from diffusax.programs import settings as settings_lib
from diffusax.programs import train
from diffusax.sampling import job as job_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import toy2d as toy2d_config  # noqa: E402

TOY = ["--config.model.mlp.hidden=32", "--config.model.mlp.depth=2", "--config.train.batch_size=64",
       "--config.train.log_every=10", "--config.train.eval_batches=1", "--config.sample.num_steps=4",
       "--config.sample.per_class=4"]


def _main(args):
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  return subprocess.run([sys.executable, "-m", "diffusax.main", *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  """A 20-step toy2d MLP run (its checkpoint is all the sampling tests need)."""
  root = tmp_path_factory.mktemp("sample_job")
  data_dir, wd = str(root / "tfds"), str(root / "run")
  r = _main(["--config=configs/toy2d.py", f"--workdir={wd}", f"--config.data.data_dir={data_dir}",
             "--config.train.num_steps=20", "--config.train.ckpt_every=20", *TOY])
  assert r.returncode == 0, r.stderr[-2000:]
  return data_dir, wd


def _settings(data_dir, **over):
  c = toy2d_config.get_config()
  c.data.data_dir = data_dir
  c.model.mlp.hidden, c.model.mlp.depth, c.train.batch_size = 32, 2, 64
  for k, v in over.items():
    a, b = k.split(".")
    c[a][b] = v
  return settings_lib.parse(c)


def test_samples_depend_on_index_not_batch(toy_run, tmp_path):
  """Same indices, different shard sizes: the same samples (deterministic and stochastic samplers)."""
  from diffusax.programs import setup as setup_lib
  from diffusax.programs.logs import Logger
  data_dir, wd = toy_run
  for method in ("ddim", "ddpm"):
    outs = []
    for shard in (16, 24):
      s = _settings(data_dir, **{"sample.method": method, "sample.num_steps": 5, "sample.num_samples": 48,
                                 "sample.shard_size": shard})
      u = train.setup(s)
      params, step = setup_lib.restore_ema(u, wd)
      spec = setup_lib.job_spec(u, step)
      out = str(tmp_path / f"{method}_{shard}")
      setup_lib.run_sample_job(u, params, spec, out, Logger(out, enabled=False))
      outs.append(job_lib.load(out))
    assert spec.per_sample_keys() == (method == "ddpm")
    np.testing.assert_array_equal(outs[0]["indices"], np.arange(48))
    np.testing.assert_allclose(outs[0]["samples"], outs[1]["samples"], rtol=1e-4, atol=1e-4)  # batch-size round-off only (amplified by an untrained net)
    assert np.std(outs[0]["samples"][:, 0]) > 0.1  # Distinct samples, not one repeated.


def test_shard_files_and_mismatched_job(toy_run, tmp_path):
  from diffusax.programs import setup as setup_lib
  from diffusax.programs.logs import Logger
  data_dir, wd = toy_run
  s = _settings(data_dir, **{"sample.num_samples": 10, "sample.shard_size": 4})
  u = train.setup(s)
  params, step = setup_lib.restore_ema(u, wd)
  spec = setup_lib.job_spec(u, step)
  out = str(tmp_path / "o")
  os.makedirs(out)
  open(os.path.join(out, ".shard_000001.npz.tmp123"), "w").write("partial")  # a killed writer's leftover
  setup_lib.run_sample_job(u, params, spec, out, Logger(out, enabled=False))
  assert sorted(os.listdir(out)) == ["job.json", "samples.png", "shard_000000.npz", "shard_000001.npz",
                                     "shard_000002.npz"]
  d = np.load(os.path.join(out, "shard_000002.npz"))
  assert d["samples"].shape == (2, 2) and d["samples"].dtype == np.float32
  assert list(d["indices"]) == [8, 9] and int(d["seed"]) == 0 and list(d["labels"]) == [-1, -1]
  other = setup_lib.job_spec(_u := train.setup(_settings(data_dir, **{"sample.num_samples": 10,
                                                                         "sample.shard_size": 4,
                                                                         "sample.seed": 1})), step)
  with pytest.raises(job_lib.JobMismatch, match=r"different job \(differs in \['seed'\]"):
    job_lib.prepare_dir(out, other)


def _sample_args(data_dir, wd, out, n=96):
  return ["--config=configs/toy2d.py", f"--workdir={wd}", "--mode=sample", f"--config.data.data_dir={data_dir}",
          *TOY, "--config.sample.method=ddpm", "--config.sample.num_steps=40",
          f"--config.sample.num_samples={n}", "--config.sample.shard_size=8", f"--config.sample.output_dir={out}"]


# The killed child: diffusax.main with storage.commit patched so that, once shard K is committed (locally:
# renamed into place), it writes READY and blocks. The test SIGKILLs it there: shards 0..K done on every
# run, and the job cannot finish before the kill. With a third argument "torn", shard K's file is
# written without its commit (on an object store: the shard without its marker, as a kill between the
# two leaves it), so shards 0..K-1 count and K must be redone.
_BLOCK_AFTER_SHARD = r"""
import sys, time
from diffusax import main, storage
from diffusax.sampling import job
k, ready, torn = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "torn"
commit = storage.commit

def blocking_commit(path, data):
  last = path == job.shard_path(storage.dirname(path), k)
  if last and torn:
    storage.path(path).write_bytes(data)
  else:
    commit(path, data)
  if last:
    open(ready, "w").close()
    while True:
      time.sleep(60)

storage.commit = blocking_commit
sys.argv = ["diffusax.main", *sys.argv[4:]]
main.run()
"""


def test_resume_after_sigkill_gives_identical_samples(toy_run, tmp_path):
  data_dir, wd = toy_run
  ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
  r = _main(_sample_args(data_dir, wd, ref))
  assert r.returncode == 0, r.stderr[-2000:]
  assert "samples/s" in r.stdout and "ETA" in r.stdout
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  ready = str(tmp_path / "ready")
  p = subprocess.Popen([sys.executable, "-c", _BLOCK_AFTER_SHARD, "4", ready, "whole", *_sample_args(data_dir, wd, cut)],
                       cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while not os.path.exists(ready):
      assert p.poll() is None, f"the sampling job exited ({p.returncode}) before writing shard 4"
      assert time.time() < deadline, "the sampling job did not write shard 4 in 300 s"
      time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
  finally:
    if p.poll() is None:
      p.kill()
  assert p.returncode == -signal.SIGKILL
  assert job_lib.done_shards(cut) == set(range(5))  # of 12
  for f in os.listdir(cut):  # Every visible shard is complete.
    if f.startswith("shard_"):
      assert len(np.load(os.path.join(cut, f))["samples"]) == 8
  r = _main(_sample_args(data_dir, wd, cut))
  assert r.returncode == 0, r.stderr[-2000:]
  assert "resuming: 5/12 shards (40 samples) already in" in r.stdout, r.stdout
  assert job_lib.digest(cut) == job_lib.digest(ref)
  assert len(job_lib.load(cut)["samples"]) == 96


def test_sample_mode_errors_are_one_line(toy_run, tmp_path):
  data_dir, _ = toy_run
  r = _main(_sample_args(data_dir, str(tmp_path / "empty"), str(tmp_path / "o"), n=8))
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert "no checkpoint in" in r.stderr


def test_clip_x0_bounds_the_samples_and_is_part_of_the_job():
  import jax
  import jax.numpy as jnp
  from diffusax.sampling import job as job_lib
  """sample.clip_x0: the job's sampler clips x0_hat (an eps model of a flat prediction at t ~ 1 would
  otherwise amplify by 1 / alpha), and job.json and the default folder record it."""
  from diffusax.core import Model, schedules
  from diffusax.programs import setup as setup_lib
  sched = schedules.get("ddpm_cosine")
  spec = job_lib.JobSpec(num_samples=4, shard_size=4, seed=0, method="ddpm", num_steps=10, eta=0.0,
                         guidance_scale=0.0, sample_shape=(3,), clip_x0=1.0)
  assert spec.to_json()["clip_x0"] == 1.0
  assert setup_lib.default_out_dir("w", spec).endswith("_clip1_seed0")
  from diffusax.core import samplers
  m = Model(lambda x, t, c: jnp.zeros_like(x) + 0.3, "eps", sched)  # a poor eps model
  x_T = jax.random.normal(jax.random.key(0), (4, 3))
  free = samplers.sample(m, x_T, key=jax.random.key(1), method="ddpm", num_steps=10)
  clipped = samplers.sample(m, x_T, key=jax.random.key(1), method="ddpm", num_steps=10, clip_x0=spec.clip_x0)
  assert float(jnp.abs(free).max()) > 10 and float(jnp.abs(clipped).max()) <= 1.0 + 1e-6
