"""Two processes joined by jax.distributed on loopback (gloo): the shared helpers, and the launcher's port.

launch/local_multiprocess.sh starts 2 processes with 2 fake CPU devices each; the
reference is one process with 4 devices. Same config, same global batch of 64,
each process reading its own half of every batch, gradients added in device
order (mesh.ordered_reduction), so the two runs must agree bit for bit. Those
tests are in tests/test_gcs.py, where the runs write their checkpoints to gs://
(the shared storage of a pod) and share their training runs: the equality (with
a kill -9 and resume of the one-process run) and the negative control (without
the option, an all-reduce whose summation order depends on the topology, the
two-process run differs from the ordered result).
"""
import errno
import os
import socket
import subprocess
import sys

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
