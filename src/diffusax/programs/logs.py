"""Logging: a progress line with ETA on stdout and TensorBoard events (tensorboardX, no TensorFlow).

Events go to WORKDIR/tb through the storage layer: a local file is appended to; on an object store
(gs://, s3://), where an object cannot be appended to, `_ObjectEvents` keeps the current part in
memory and rewrites it whole at each flush, starting a new part (`<name>.<k>`, read by TensorBoard as
one more events file of the run) past `PART_BYTES`, so a flush uploads at most that much.
"""
from __future__ import annotations

import sys

import numpy as np

from diffusax import storage

PART_BYTES = 4 << 20


class _ObjectEvents:
  """A tensorboardX record file on an object store (see the module docstring)."""

  def __init__(self, path: str):
    self.path, self.part, self.buf, self.dirty = path, 0, bytearray(), False

  def write(self, data: bytes) -> None:
    self.buf += data
    self.dirty = True

  def flush(self) -> None:
    if not self.dirty:
      return
    name = self.path if self.part == 0 else f"{self.path}.{self.part}"
    storage.write_bytes(name, bytes(self.buf))
    self.dirty = False
    if len(self.buf) >= PART_BYTES:
      self.part, self.buf = self.part + 1, bytearray()

  def close(self) -> None:
    self.flush()


class _ObjectEventsFactory:
  def open(self, path):
    return _ObjectEvents(path)

  def directory_check(self, path):
    pass  # No folders on an object store.


def _register_object_stores() -> None:
  from tensorboardX import record_writer
  for scheme in ("gs", "s3"):
    record_writer.register_writer_factory(scheme, _ObjectEventsFactory())


def _fmt_time(s: float) -> str:
  s = int(max(s, 0))
  h, r = divmod(s, 3600)
  m, sec = divmod(r, 60)
  return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


class Logger:
  """Writes only when `enabled` (process 0 of a multi-process run)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.writer = None
    if enabled:
      from tensorboardX import SummaryWriter
      _register_object_stores()
      self.writer = SummaryWriter(storage.join(workdir, "tb"))

  def info(self, msg: str) -> None:
    if self.enabled:
      print(msg, flush=True)

  def progress(self, step: int, total: int, metrics: dict, eta_s: float) -> None:
    if not self.enabled:
      return
    width = 20
    filled = int(width * step / max(total, 1))
    bar = "#" * filled + "." * (width - filled)
    parts = [f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("steps_per_s", "images_per_s")]
    print(f"[{bar}] {step}/{total} | " + " | ".join(parts)
          + f" | {metrics.get('steps_per_s', 0):.1f} steps/s {metrics.get('images_per_s', 0):.0f} img/s"
          + f" | ETA {_fmt_time(eta_s)}", flush=True)
    self.scalars(metrics, step)

  def scalars(self, metrics: dict, step: int) -> None:
    if self.writer is not None:
      for k, v in metrics.items():
        if v is not None and np.isfinite(v):
          self.writer.add_scalar(k, float(v), step)
      self.writer.flush()

  def image(self, tag: str, img: np.ndarray, step: int) -> None:
    if self.writer is not None:
      self.writer.add_image(tag, img, step, dataformats="HWC")
      self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def error(msg: str) -> None:
  print(f"diffusax: error: {msg}", file=sys.stderr, flush=True)
