"""The one path layer: every file the programs read or write, on a local disk or an object store.

    storage.path("runs/x") / storage.path("gs://bucket/run")   -> etils.epath.Path
    storage.join(base, "checkpoints")                          -> str, the scheme kept
    storage.commit(p, data) / storage.committed(p)             a file published whole, or not at all
    storage.probe(workdir, "--workdir")                        one line naming the path and the cause

Local paths (no scheme) are expanded (`~`) and made absolute, and behave as
plain files. A path with a scheme (`gs://bucket/run`, `s3://...`) goes through
etils.epath, which reaches Google Cloud Storage through gcsfs and S3 through
s3fs (`pip install 'diffusax[gcs]'` / `'diffusax[s3]'`); orbax writes
checkpoints there itself (tensorstore's own GCS/S3 drivers) and TFDS
array_record files are read by array_record's own client.

Object stores have no directories and no atomic rename, so:
  * `makedirs` is a no-op there (an object's name is its folder): it never
    creates a bucket, so a misspelt bucket is an error, not a new bucket;
  * `commit(p, data)` publishes a file that a reader must see whole or not
    at all. Locally: write a temporary name beside p, fsync, rename over p,
    fsync the folder. On an object store: write p, then the marker
    `p.committed` (JSON: its byte count and sha256). `committed(p)` is true
    locally when p exists and there when the marker exists and p has the
    recorded size; a file without its marker is work to redo. A killed writer
    thus leaves either nothing that counts or a complete, recorded file.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
from typing import Any

MARKER_SUFFIX = ".committed"
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class StorageError(OSError):
  """A path that cannot be used (missing bucket, no credentials, no permission): one line for the user."""


def is_remote(path: Any) -> bool:
  """True for a path with a scheme (gs://, s3://, ...)."""
  return bool(_SCHEME.match(os.fspath(path)))


def resolve(path: Any) -> str:
  """Local: `~` expanded and absolute; remote: unchanged but for a trailing '/'."""
  p = os.fspath(path)
  if is_remote(p):
    return p.rstrip("/") if not p.endswith("://") else p
  return os.path.abspath(os.path.expanduser(p))


def path(p: Any):
  """The epath.Path of a local or remote path (resolved)."""
  from etils import epath
  return epath.Path(resolve(p))


def refresh(p: Any) -> None:
  """Forgets what fsspec has cached of p's listings, so that files written since by another process or
  client (orbax's tensorstore, another host) are seen. gcsfs caches each folder it lists and answers
  later lookups in it from that cache; every query below refreshes first."""
  if not is_remote(p):
    return
  import fsspec
  cls = fsspec.get_filesystem_class(resolve(p).split("://", 1)[0])
  q = cls._strip_protocol(resolve(p))
  below = q.rstrip("/") + "/"
  for fs in list(getattr(cls, "_cache", {}).values()):  # every instance (epath keeps its own)
    fs.invalidate_cache(q)  # q and its parents
    cache = getattr(fs, "dircache", None)
    if cache is not None:
      for k in [k for k in list(cache) if k.startswith(below)]:
        cache.pop(k, None)


def _fresh(p: Any):
  refresh(p)
  return path(p)


def join(base: Any, *parts: str) -> str:
  """base/parts... as a string; keeps a scheme ("gs://b/run" + "tb" -> "gs://b/run/tb")."""
  b = os.fspath(base)
  if is_remote(b):
    return "/".join([b.rstrip("/"), *(s.strip("/") for s in parts)])
  return os.path.join(b, *parts)


def basename(p: Any) -> str:
  return os.fspath(p).rstrip("/").rsplit("/", 1)[-1]


def dirname(p: Any) -> str:
  p = os.fspath(p).rstrip("/")
  return p.rsplit("/", 1)[0] if is_remote(p) else os.path.dirname(p)


def exists(p: Any) -> bool:
  return _fresh(p).exists()


def isfile(p: Any) -> bool:
  q = _fresh(p)
  return q.exists() and not q.is_dir()


def listdir(p: Any) -> list[str]:
  """Names in folder p; [] when it does not exist (an object store has a folder only while it holds objects)."""
  q = _fresh(p)
  try:
    return sorted(c.name for c in q.iterdir())
  except (FileNotFoundError, NotADirectoryError):
    return []


def makedirs(p: Any) -> None:
  """Creates folder p and its parents locally; nothing on an object store (see the module docstring)."""
  if not is_remote(p):
    os.makedirs(resolve(p), exist_ok=True)


def remove(p: Any) -> None:
  path(p).unlink(missing_ok=True)


def rmtree(p: Any) -> None:
  q = path(p)
  if q.exists():
    q.rmtree()


def read_bytes(p: Any) -> bytes:
  return _fresh(p).read_bytes()


def read_text(p: Any) -> str:
  return _fresh(p).read_text()


def read_json(p: Any) -> Any:
  return json.loads(read_text(p))


def write_bytes(p: Any, data: bytes) -> None:
  """A plain write (no commit protocol): for files a reader never takes as a sign of completion."""
  makedirs(dirname(resolve(p)))
  path(p).write_bytes(data)


def write_text(p: Any, text: str) -> None:
  write_bytes(p, text.encode())


def marker_path(p: Any) -> str:
  return resolve(p) + MARKER_SUFFIX


def _fsync_dir(d: str) -> None:
  try:
    fd = os.open(d, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def commit(p: Any, data: bytes, marker: bool = True) -> None:
  """Publishes `data` at p whole or not at all (see the module docstring).

  `marker=False` on an object store writes the object alone: one object appears only once its upload
  is complete (GCS, S3), which is enough for a file no reader takes as a sign that other files are
  complete (metrics.json, an evaluation's JSON); `committed` is then false for it there.
  """
  p = resolve(p)
  if not is_remote(p):
    d, name = os.path.split(p)
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{name}.tmp{os.getpid()}")
    with io.open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, p)
    _fsync_dir(d)
    return
  path(p).write_bytes(data)
  if marker:
    path(marker_path(p)).write_text(json.dumps({"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}))


def committed(p: Any, names: set[str] | None = None) -> bool:
  """Whether p was published by `commit` (locally: exists). `names`: the folder's listing, if at hand,
  saves a request per file on an object store (the size is then checked only when the marker is there)."""
  p = resolve(p)
  if not is_remote(p):
    return os.path.exists(p)
  if names is not None and (basename(p) not in names or basename(marker_path(p)) not in names):
    return False
  try:
    want = json.loads(_fresh(marker_path(p)).read_text())["bytes"]
    return _fresh(p).stat().length == want
  except (FileNotFoundError, KeyError, ValueError):
    return False


def uncommit(p: Any) -> None:
  """Removes p and its marker (a file to be redone)."""
  remove(p)
  if is_remote(p):
    remove(marker_path(p))


def remove_temporaries(folder: Any, pattern: str) -> None:
  """Removes the local temporaries `commit` leaves when killed (.NAME.tmpPID) of names matching `pattern`."""
  if is_remote(folder):
    return  # commit writes no temporaries there.
  rx = re.compile(r"\." + pattern + r"\.tmp\d+")
  for name in listdir(folder):
    if rx.fullmatch(name):
      remove(join(folder, name))


def move_tree(src: Any, dst: Any) -> None:
  """Moves folder src to dst: a rename locally; on an object store every object is copied, then src removed
  (not atomic there, which is why nothing decides completion by a folder's name)."""
  src, dst = resolve(src), resolve(dst)
  if not is_remote(src):
    os.rename(src, dst)
    return
  import fsspec
  fs, a = fsspec.core.url_to_fs(src)
  b = fsspec.core.url_to_fs(dst)[1]
  for f in fs.find(a):
    fs.copy(f, b + f[len(a):])
  fs.rm(a, recursive=True)


def copy_tree(src: str, dst: Any, last: str) -> None:
  """Copies local folder src into dst (local or remote) file by file, the file `last` (a path relative
  to src) after all others and with `commit`: `committed(join(dst, last))` then means the copy is whole."""
  files = []
  for root, _, names in os.walk(src):
    for n in names:
      files.append(os.path.relpath(os.path.join(root, n), src).replace(os.sep, "/"))
  if last not in files:
    raise FileNotFoundError(f"{os.path.join(src, last)} does not exist")
  for f in sorted(files, key=lambda f: (f == last, f)):
    with io.open(os.path.join(src, f), "rb") as fh:
      (commit if f == last else write_bytes)(join(dst, f), fh.read())


# --- start-up probe: one line naming the path and the cause ---------------------------------------

def _cause(e: BaseException) -> str:
  """The cause of a storage failure in words."""
  name = type(e).__name__
  text = " ".join(str(e).split())
  if isinstance(e, ModuleNotFoundError):
    return f"{text}; install it (pip install 'diffusax[gcs]' for gs://, 'diffusax[s3]' for s3://)"
  if "credential" in text.lower() or "DefaultCredentialsError" in name or "RefreshError" in name:
    return ("no usable credentials (" + text[:200] + "); on a TPU or GCE VM the VM's service account is used, "
            "elsewhere run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS")
  if isinstance(e, PermissionError) or getattr(e, "code", None) in (401, 403) or " 403" in text or "Forbidden" in text:
    return f"permission denied ({text[:200]}); the account needs object read/write access to the bucket"
  if isinstance(e, FileNotFoundError) or getattr(e, "code", None) == 404:
    return "the bucket does not exist (or is not visible to these credentials)"
  if isinstance(e, NotADirectoryError) or getattr(e, "errno", None) == errno.ENOTDIR:
    return "a part of it is a file, not a folder"
  return f"{name}: {text[:300]}"


def probe(p: Any, what: str) -> str:
  """Checks once, before any device work, that folder p can be written and read; returns it resolved.

  Locally: p is a folder or can be made one. On an object store: the bucket
  exists (no bucket is created) and a small object can be written, read back
  and deleted. Raises StorageError("{what}={p}: <cause>") otherwise.
  """
  given, p = os.fspath(p), resolve(p)
  if not is_remote(p):
    if os.path.exists(p) and not os.path.isdir(p):
      raise StorageError(f"{what}={given} is a file, not a directory")
    parent = p
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
      raise StorageError(f"{what}={given} cannot be created: {parent} is a file, not a directory")
    return p
  _bucket(p, what)
  name = join(p, f".diffusax_probe_{os.getpid()}")
  try:
    q = path(name)
    q.write_bytes(b"diffusax")
    if q.read_bytes() != b"diffusax":
      raise OSError("an object written there reads back different")
    q.unlink(missing_ok=True)
  except Exception as e:  # noqa: BLE001 - each backend raises its own types; all become one line.
    raise StorageError(f"{what}={p} cannot be used: {_cause(e)}") from None
  return p


def _bucket(p: str, what: str) -> str:
  scheme, rest = p.split("://", 1)
  bucket = rest.split("/", 1)[0]
  if not bucket:
    raise StorageError(f"{what}={p} names no bucket (expected {scheme}://BUCKET/PATH)")
  return f"{scheme}://{bucket}"


def probe_read(p: Any, what: str) -> str:
  """Checks that folder p on an object store can be listed (it may be empty or absent, its bucket may not).
  Raises StorageError("{what}={p}: <cause>"); local paths are returned resolved, unchecked."""
  p = resolve(p)
  if not is_remote(p):
    return p
  bucket = _bucket(p, what)
  try:
    try:
      next(iter(path(p).iterdir()), None)
    except FileNotFoundError:
      if not path(bucket).exists():
        raise
  except Exception as e:  # noqa: BLE001 - as in probe.
    raise StorageError(f"{what}={p} cannot be read: {_cause(e)}") from None
  return p
