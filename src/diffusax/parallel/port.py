"""A free TCP port for the coordinator of a local multi-process run, held so that no other program
takes it between the pick and the coordinator's bind.

    python -m diffusax.parallel.port PID    prints a port and holds it until process PID exits

The socket is bound (never listening) on [::]:0, or 0.0.0.0:0 without IPv6, with SO_REUSEPORT. JAX's
coordination service is a gRPC server, and gRPC sets SO_REUSEPORT on Linux, so the coordinator binds the
same port beside it (same user); any other bind of the port fails with EADDRINUSE, and the kernel does not
hand a bound port to an outgoing connection. Holding the socket never receives a connection: only
listening sockets do. If the coordinator could not bind beside it, process 0 fails at start on every
try (no race). Used by launch/local_multiprocess.sh.
"""
from __future__ import annotations

import os
import socket
import sys
import time


def reserve() -> socket.socket:
  """A socket bound to a free port with SO_REUSEPORT; its port is `s.getsockname()[1]`."""
  try:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    addr = ("::", 0)
  except OSError:  # No IPv6 on this machine.
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    addr = ("0.0.0.0", 0)
  s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
  s.bind(addr)
  return s


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def main(argv) -> None:
  if len(argv) != 2 or not argv[1].isdigit():
    print("usage: python -m diffusax.parallel.port PID", file=sys.stderr)
    sys.exit(2)
  parent = int(argv[1])
  s = reserve()
  print(s.getsockname()[1], flush=True)
  while _alive(parent):
    time.sleep(0.5)
  s.close()


if __name__ == "__main__":
  main(sys.argv)
