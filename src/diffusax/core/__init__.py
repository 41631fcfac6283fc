"""Pure-JAX diffusion math. Never imports flax, optax, orbax or ml_collections."""
from diffusax.core import guidance, likelihood, losses, process, samplers, schedules, targets

__all__ = ["guidance", "likelihood", "losses", "process", "samplers", "schedules", "targets"]
