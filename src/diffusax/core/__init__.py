"""Pure-JAX diffusion math. Never imports flax, optax, orbax or ml_collections."""
from diffusax.core import likelihood, losses, process, schedules, targets

__all__ = ["likelihood", "losses", "process", "schedules", "targets"]
