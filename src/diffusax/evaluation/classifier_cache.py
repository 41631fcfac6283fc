"""The on-disk cache of the evaluation classifiers (digits, photos): flax msgpack params plus a JSON
side-car. A cached file is trusted only if its side-car names the same fields (version, seed, steps);
both files are committed (storage.commit: locally a temporary name renamed into place; on an object
store a completion marker), side-car last, so a killed write is never read back.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from flax import serialization

from diffusax import storage


def load_or_train(path: str, want: dict, template: Any, train_and_score: Callable[[], tuple[Any, float]],
                  log: Callable[[str], Any], what: str) -> tuple[Any, dict]:
  """(params, info): the cached params at `path` if its side-car matches `want`, else
  `train_and_score()` -> (params, test accuracy), cached. info = want + test_accuracy + path."""
  side = path + ".json"
  if storage.committed(path) and storage.committed(side):
    info = storage.read_json(side)
    if all(info.get(k) == v for k, v in want.items()):
      return serialization.from_bytes(template, storage.read_bytes(path)), {**info, "path": path}
  log(f"training the {what} evaluation classifier ({want['steps']} steps) -> {path}")
  params, acc = train_and_score()
  info = {**want, "test_accuracy": float(acc)}
  storage.commit(path, serialization.to_bytes(params))
  storage.commit(side, json.dumps(info).encode())
  return params, {**info, "path": path}
