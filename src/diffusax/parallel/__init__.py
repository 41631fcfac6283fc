"""Device mesh, axis names, sharding rules, multi-process start-up and state checksums.

Mesh axis names: `DATA` ("data") and `FSDP` ("fsdp"); see `mesh`.
"""
from diffusax.parallel.mesh import AXES, BATCH_AXES, DATA, DEFAULT_RULES, FSDP

__all__ = ["AXES", "BATCH_AXES", "DATA", "DEFAULT_RULES", "FSDP"]
