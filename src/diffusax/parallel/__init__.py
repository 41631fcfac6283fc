"""Device mesh, axis names, sharding rules, multi-process start-up and state checksums.

Mesh axis names: `DATA` ("data") and `FSDP` ("fsdp"); see `mesh`. They are loaded
on first use, so `python -m diffusax.parallel.port` starts without importing jax.
"""
__all__ = ["AXES", "BATCH_AXES", "DATA", "DEFAULT_RULES", "FSDP"]


def __getattr__(name):
  if name in __all__:
    from diffusax.parallel import mesh
    return getattr(mesh, name)
  raise AttributeError(f"module 'diffusax.parallel' has no attribute {name!r}")
