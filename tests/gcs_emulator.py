"""Starts `gcp-storage-emulator` (in memory, bucket `bkt`) on a free loopback port; see conftest's `gcs`.

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


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(timeout: float = 20.0):
  """(the server process, the environment that points every GCS client at it)."""
  import importlib.util
  if importlib.util.find_spec("gcp_storage_emulator") is None:
    pytest.skip("gcp-storage-emulator is not installed (it is a dev dependency: pip install -e '.[dev]')")
  if importlib.util.find_spec("gcsfs") is None:  # Not imported here: it reads its settings when imported.
    pytest.skip("gcsfs is not installed (pip install -e '.[dev]' or '.[gcs]')")
  port = _free_port()
  log = tempfile.NamedTemporaryFile(prefix="gcs-emulator-", suffix=".log", delete=False)
  p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "start", "--host=127.0.0.1", f"--port={port}", "--in-memory",
                        f"--default-bucket={BUCKET}"], stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + timeout
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
      break
    except OSError:
      if p.poll() is not None or time.time() > deadline:
        p.kill()
        tail = open(log.name).read()[-1000:]
        pytest.skip(f"the GCS emulator did not start on 127.0.0.1:{port} in {timeout:.0f} s: {tail}")
      time.sleep(0.1)
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


def _serve() -> None:
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
  from gcp_storage_emulator.__main__ import main
  main()


if __name__ == "__main__":
  _serve()
