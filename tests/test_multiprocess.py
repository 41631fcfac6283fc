"""Two processes joined by jax.distributed on loopback (gloo) against one process on the same global batch.

launch/local_multiprocess.sh starts 2 processes with 2 fake CPU devices each; the
reference is one process with 4 devices. Same config, same global batch of 64,
each process reading its own half of every batch, gradients added in device
order (mesh.ordered_reduction), so the two runs must agree bit for bit.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


def _env(devices=None):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
  flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
  if devices:
    flags += f" --xla_force_host_platform_device_count={devices}"
  env.update(XLA_FLAGS=flags.strip(), PYTHON=sys.executable, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  return env


def _args(data_dir, wd):
  return ["--config=configs/toy2d.py", f"--workdir={wd}", f"--config.data.data_dir={data_dir}",
          "--config.model.mlp.hidden=32", "--config.model.mlp.depth=2", "--config.train.batch_size=64",
          f"--config.train.num_steps={STEPS}", "--config.train.log_every=3", "--config.train.ckpt_every=3",
          "--config.train.eval_batches=1", "--config.sample.num_steps=2", "--config.sample.per_class=4",
          "--config.mesh.ordered_reduction=True"]


def _state(wd, step):
  """The saved arrays, restored onto this process' first device whatever topology wrote them."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(wd, "checkpoints", str(step), "state")
  ckptr = ocp.StandardCheckpointer()
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                        ckptr.metadata(path).item_metadata)
  return jax.tree.leaves(ckptr.restore(path, target))


@pytest.mark.skipif(sys.platform != "linux", reason="loopback multi-process launch script is for Linux")
def test_two_processes_match_each_other_and_one_process(tmp_path):
  data_dir = str(tmp_path / "tfds")
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  p = subprocess.Popen(["bash", "launch/local_multiprocess.sh", "2", *_args(data_dir, multi),
                        "--config.train.async_checkpoints=False"],
                       cwd=ROOT, env={**_env(), "CPU_DEVICES_PER_PROCESS": "2"},
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    out, err = p.communicate(timeout=300)
  finally:
    if p.poll() is None:
      p.kill()
  assert p.returncode == 0, err[-3000:]
  # Only process 0 writes: one progress line per log step, one metrics file.
  assert out.count("done: step 6") == 1, out
  r = subprocess.run([sys.executable, "-m", "diffusax.main", *_args(data_dir, single)], cwd=ROOT, env=_env(4),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  # Each process holds full copies of the (replicated) state: process 0 checked that both processes'
  # copies are bit-identical after the last step.
  assert "replica check: " in out and "bit-identical on all 2 processes" in out, out
  # The processes wrote one checkpoint together. Against one process of 4 devices: the same draws, the
  # same rows per device, and (mesh.ordered_reduction) the per-device gradient sums added in device
  # order, so the whole state is bit for bit the same.
  n = 0
  for step in (3, STEPS):
    a, b = _state(multi, step), _state(single, step)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
      x, y = np.asarray(x), np.asarray(y)
      assert x.dtype == y.dtype and x.shape == y.shape
      np.testing.assert_array_equal(x, y)
      n += x.size
  print(f"\n2 processes x 2 devices vs 1 process x 4 devices: {n} values after 3 and {STEPS} steps, all identical")
  import json
  hm = json.load(open(os.path.join(multi, "metrics.json")))["history"]
  hs = json.load(open(os.path.join(single, "metrics.json")))["history"]
  assert [h["step"] for h in hm] == [h["step"] for h in hs]
  assert [(h["loss"], h["grad_norm"]) for h in hm] == [(h["loss"], h["grad_norm"]) for h in hs]
