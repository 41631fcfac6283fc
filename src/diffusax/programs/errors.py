"""The programs' refusal type and the checks every settings section shares (no other diffusax import)."""
from __future__ import annotations


class ConfigError(ValueError):
  """A config that cannot run; the message says what was given and what is allowed."""


def positive(name, v, allow_zero=False):
  """v if it is a positive (or, with allow_zero, non-negative) Python int, else a ConfigError naming `name`."""
  if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (v == 0 and not allow_zero):
    raise ConfigError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got {v!r}")
  return v
