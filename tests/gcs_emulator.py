"""Starts `gcp-storage-emulator` (in memory, bucket `bkt`) on a free loopback port; see conftest's `gcs`.

The server binds port 0 itself (the kernel picks a free port) and writes the port it got to a file
the caller waits for: no port is picked, released and bound again, so no other program can take it
in between. With the dev packages installed, an emulator that does not start fails the test with its
output; only a missing package skips.

Run as a script, this file is the server: the emulator with one shim. Its object downloads lack the
`x-goog-generation` and `x-goog-metageneration` headers that GCS sends with every object's media
(https://cloud.google.com/storage/docs/xml-api/reference-headers#xgooggeneration); tensorstore, which
writes orbax's arrays, reads an object's generation from them and reports "Malformed
StorageGeneration" without. The shim adds them from the object's own metadata; nothing else changes.
"""
import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

BUCKET = "bkt"


def start(timeout: float = 20.0):
  """(the server process, the environment that points every GCS client at it)."""
  import importlib.util
  if importlib.util.find_spec("gcp_storage_emulator") is None:
    pytest.skip("gcp-storage-emulator is not installed (it is a dev dependency: pip install -e '.[dev]')")
  if importlib.util.find_spec("gcsfs") is None:  # Not imported here: it reads its settings when imported.
    pytest.skip("gcsfs is not installed (pip install -e '.[dev]' or '.[gcs]')")
  log = tempfile.NamedTemporaryFile(prefix="gcs-emulator-", suffix=".log", delete=False)
  port_file = log.name + ".port"
  p = subprocess.Popen([sys.executable, os.path.abspath(__file__), port_file], stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + timeout
  while not os.path.exists(port_file):  # Written (atomically) once the server listens.
    if p.poll() is not None or time.time() > deadline:
      p.kill()
      p.wait()
      tail = open(log.name).read()[-2000:]
      pytest.fail(f"the GCS emulator did not start in {timeout:.0f} s (exit code {p.returncode}); "
                  f"its output ({log.name}):\n{tail}", pytrace=False)
    time.sleep(0.05)
  port = int(open(port_file).read())
  os.remove(port_file)
  socket.create_connection(("127.0.0.1", port), timeout=5).close()  # Listening since before the file was written.
  p.log_path = log.name  # the emulator's request log ("METHOD /path HTTP/1.1" status per request)
  url = f"http://127.0.0.1:{port}"
  env = {
      "STORAGE_EMULATOR_HOST": url,
      # gcsfs' zonal/hierarchical-bucket probe speaks gRPC, which the emulator lacks (60 s timeouts).
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "TENSORSTORE_GCS_HTTP_URL": url,
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
      "FSSPEC_GCS_TOKEN": "anon",  # fsspec config for gcsfs: the emulator needs no credentials.
  }
  return p, env


def _serve(port_file: str) -> None:
  """The emulator on 127.0.0.1, a port the kernel picks (bound once), its port then written to port_file."""
  import logging
  from gcp_storage_emulator.handlers import objects
  download = objects.download

  def with_generation(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    except Exception:  # noqa: BLE001 - a missing object: the emulator's own 404 follows.
      pass
    return download(request, response, storage, *args, **kwargs)

  objects.download = with_generation  # Before the server module binds the handlers.
  from gcp_storage_emulator.server import create_server
  logging.basicConfig(level=logging.DEBUG)  # The request log, to stderr (the caller's log file), as its CLI does.
  server = create_server("127.0.0.1", 0, in_memory=True, default_bucket=BUCKET)
  server.start()  # Returns once its HTTPServer is bound and listening.
  port = server._api._httpd.server_address[1]  # noqa: SLF001 - the emulator has no public accessor.
  with open(port_file + ".tmp", "w") as f:
    f.write(str(port))
  os.replace(port_file + ".tmp", port_file)
  while True:  # Serves (in its thread) until the caller terminates this process.
    time.sleep(3600)


if __name__ == "__main__":
  _serve(sys.argv[1])
