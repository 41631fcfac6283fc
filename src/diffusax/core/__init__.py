"""Pure-JAX diffusion math. Never imports flax, optax, orbax or ml_collections.

`Model(denoise, target, schedule, learned_variance=False)` is the one type of "a model the core can use";
samplers, guidance and both likelihood routes take it first.
"""
from diffusax.core import distill, guidance, likelihood, losses, model, process, samplers, schedules, targets
from diffusax.core.model import Model, Prediction

__all__ = ["Model", "Prediction", "distill", "guidance", "likelihood", "losses", "model", "process", "samplers",
           "schedules", "targets"]
