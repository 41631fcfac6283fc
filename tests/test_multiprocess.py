"""Two processes joined by jax.distributed on loopback (gloo) against one process on the same global batch.

launch/local_multiprocess.sh starts 2 processes with 2 fake CPU devices each; the
reference is one process with 4 devices. Same config, same global batch of 64,
each process reading its own half of every batch, gradients added in device
order (mesh.ordered_reduction), so the two runs must agree bit for bit: that test
is tests/test_gcs.py::test_two_processes_write_one_checkpoint_to_gs, where the
two processes write their checkpoint to gs:// (the shared storage of a pod) and
share the reference run with the other gs:// tests. Here: the negative control
(without the option, an all-reduce whose summation order depends on the
topology, the same pair of runs, writing to a local folder, differs) and the
launcher's port.
"""
import errno
import os
import socket
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


def _args(data_dir, wd, ordered=True, steps=STEPS):
  return ["--config=configs/toy2d.py", f"--workdir={wd}", f"--config.data.data_dir={data_dir}",
          "--config.model.mlp.hidden=32", "--config.model.mlp.depth=2", "--config.train.batch_size=64",
          f"--config.train.num_steps={steps}", "--config.train.log_every=3", "--config.train.ckpt_every=3",
          "--config.train.eval_batches=1", "--config.sample.num_steps=2", "--config.sample.per_class=4",
          f"--config.mesh.ordered_reduction={ordered}"]


def _two_processes(data_dir, wd, ordered=True, steps=STEPS) -> str:
  """Runs launch/local_multiprocess.sh with 2 processes x 2 devices (coordinator port: the script's
  reserved free port); returns stdout."""
  p = subprocess.Popen(["bash", "launch/local_multiprocess.sh", "2", *_args(data_dir, wd, ordered, steps),
                        "--config.train.async_checkpoints=False"],
                       cwd=ROOT, env={**_env(), "CPU_DEVICES_PER_PROCESS": "2"},
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    out, err = p.communicate(timeout=300)
  finally:
    if p.poll() is None:
      p.kill()
  assert p.returncode == 0, err[-3000:]
  return out


def _one_process(data_dir, wd, ordered=True, steps=STEPS) -> None:
  r = subprocess.run([sys.executable, "-m", "diffusax.main", *_args(data_dir, wd, ordered, steps)], cwd=ROOT,
                     env=_env(4), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]


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
def test_without_ordered_reduction_the_topologies_differ(tmp_path):
  """The negative control the README promises: the same two runs (3 steps) with an all-reduce."""
  data_dir = str(tmp_path / "tfds")
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  _two_processes(data_dir, multi, ordered=False, steps=3)
  _one_process(data_dir, single, ordered=False, steps=3)
  a, b = _state(multi, 3), _state(single, 3)
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
  print(f"\nwithout mesh.ordered_reduction: {differ} of {total} values differ after 3 steps "
        f"(largest difference {worst:.1e} of the array's scale)")
  assert differ > 0, "the all-reduce gave bit-identical states: the ordered reduction's test proves nothing"
  assert worst < 1e-4, "the runs differ by more than summation order can explain"


def test_the_launchers_port_cannot_be_taken_while_reserved():
  """launch/local_multiprocess.sh holds its coordinator port (diffusax.parallel.port) for the whole run: a
  plain bind of it fails, a SO_REUSEPORT listener as the coordinator's gRPC server binds beside it."""
  from diffusax.parallel import port
  held = port.reserve()
  p = held.getsockname()[1]
  try:
    other = socket.socket()
    with pytest.raises(OSError) as e:
      other.bind(("127.0.0.1", p))
    assert e.value.errno == errno.EADDRINUSE
    other.close()
    server = socket.socket(held.family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if held.family == socket.AF_INET6:
      server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    server.bind(("::" if held.family == socket.AF_INET6 else "0.0.0.0", p))
    server.listen()
    client = socket.create_connection(("127.0.0.1", p), timeout=5)
    conn, _ = server.accept()
    conn.close(), client.close(), server.close()
  finally:
    held.close()
