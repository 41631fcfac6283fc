"""The on-disk cache of the evaluation classifiers (digits, photos): flax msgpack params plus a JSON
side-car. A cached file is trusted only if its side-car names the same fields (version, seed, steps);
both files are written to a temporary name and renamed, so a killed write is never read back.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

from flax import serialization


def load_or_train(path: str, want: dict, template: Any, train_and_score: Callable[[], tuple[Any, float]],
                  log: Callable[[str], Any], what: str) -> tuple[Any, dict]:
  """(params, info): the cached params at `path` if its side-car matches `want`, else
  `train_and_score()` -> (params, test accuracy), cached. info = want + test_accuracy + path."""
  side = path + ".json"
  if os.path.exists(path) and os.path.exists(side):
    info = json.load(open(side))
    if all(info.get(k) == v for k, v in want.items()):
      with open(path, "rb") as f:
        return serialization.from_bytes(template, f.read()), {**info, "path": path}
  log(f"training the {what} evaluation classifier ({want['steps']} steps) -> {path}")
  params, acc = train_and_score()
  info = {**want, "test_accuracy": float(acc)}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  for p, data, mode in ((path, serialization.to_bytes(params), "wb"), (side, json.dumps(info), "w")):
    tmp = f"{p}.tmp{os.getpid()}"
    with open(tmp, mode) as f:
      f.write(data)
    os.replace(tmp, p)
  return params, {**info, "path": path}
