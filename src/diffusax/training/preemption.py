"""Preemption: SIGTERM/SIGINT ask the training loop to stop after the current step.

The handler only sets a flag; the loop reads it (a Python bool, no device sync)
after each step, saves a checkpoint, waits for it and returns, so the process
exits 0 and the next start resumes from that step.

Multi-process: a signal may reach only some processes, or reach them during
different steps, and all must stop at the same step to write the checkpoint
together. There no handler is installed: the loop asks JAX's preemption sync
service (`multihost_utils.reached_preemption_sync_point`, fed by SIGTERM to any
process) and all stop at the step it agrees on. SIGINT keeps its default
(KeyboardInterrupt: the run stops without saving and resumes from the last
checkpoint); launch/local_multiprocess.sh turns a Ctrl-C into SIGTERM.
(The multi-process path is not covered by the tests.)
"""
from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """Context manager installing the handlers; `requested(step)` says whether to stop now."""

  def __init__(self, multi_process: bool = False):
    self.flag = False
    self.signum: int | None = None
    self._multi = multi_process
    self._old = {}

  def _handle(self, signum, frame):
    del frame
    if self.flag and signum == signal.SIGINT:  # A second Ctrl-C: stop at once.
      raise KeyboardInterrupt
    self.flag, self.signum = True, signum

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in SIGNALS:
        if self._multi:
          continue  # Left to JAX's preemption notifier (see module doc).
        self._old[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old = {}

  def requested(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        self.flag, self.signum = True, signal.SIGTERM
    return self.flag
