"""Flax Linen networks for diffusax; the core (`diffusax.core`) never imports this.

Denoisers share one call: `module.apply(variables, x, t, y=None, train=False)`
(`rngs={"dropout": key}` with train=True), x [B, H, W, C] (MLP: [B, D]),
t float [B] continuous in [0, 1], y int [B] in [0, num_classes] with row
num_classes the null class, or None. Outputs are float32 with the shape of x
(channels doubled with learn_sigma: [prediction | var_interp]).

  NETWORKS / build(name, **kwargs)   "unet", "dit", "mlp"
  NoisyClassifier                    logits for classifier guidance
  InputShapeError / OptionError      (ValueErrors) inputs of a shape the network cannot take /
                                     constructor options that contradict each other
  bridge.denoiser / classifier_log_prob   (module, variables) -> core callables
  AutoencoderKL / PatchDiscriminator  latent-diffusion KL autoencoder (diffusers layout; weights via
                                     autoencoder_weights.load_diffusers) and PatchGAN discriminator

Parameters carry logical axis names: `init` returns `nn.LogicallyPartitioned`
boxes; `apply` takes boxed or plain variables; `unbox(variables)` strips the
boxes, `logical_spec(variables)` gives the logical PartitionSpec tree.
`LOGICAL_AXES` lists the names, `LOGICAL_AXES_DOC` says what each labels.

Mixed precision: `dtype` is the compute dtype, `param_dtype` the storage dtype.
With dtype=bfloat16 and float32 params, convs/matmuls run in bf16 while
GroupNorm/LayerNorm statistics, attention logits/softmax, the time features,
the DiT residual stream and the final output stay float32. Tolerance
(`BF16_REL_TOL`): the relative RMS difference to float32 compute on the same
inputs and params is below 3e-2 (measured 1.1e-2 for a small U-Net, 4e-3 for
a small DiT, tests/test_nn_unet.py and test_nn_dit.py).
"""
from __future__ import annotations

import dataclasses

from diffusax.nn import bridge
from diffusax.nn.autoencoder import AutoencoderKL
from diffusax.nn.classifier import NoisyClassifier
from diffusax.nn.discriminator import PatchDiscriminator
from diffusax.nn.dit import DIT_CONFIGS, DiT
from diffusax.nn.layers import LOGICAL_AXES, InputShapeError, OptionError, count_params, logical_spec, unbox
from diffusax.nn.mlp import MLPDenoiser
from diffusax.nn.unet import UNet

BF16_REL_TOL = 3e-2  # relative RMS of bf16-compute vs float32-compute outputs (see above)

NETWORKS = {"unet": UNet, "dit": DiT, "mlp": MLPDenoiser}

LOGICAL_AXES_DOC = {
    "embed": "feature/channel dim of dense and attention inputs/outputs (DiT hidden, time-embedding width)",
    "mlp": "hidden dim of MLPs (time MLP, DiT MLP, adaLN modulation outputs)",
    "heads": "attention heads",
    "kv": "per-head feature dim of queries, keys and values",
    "conv_in": "input channels of a conv kernel [kh, kw, in, out]",
    "conv_out": "output channels of a conv kernel, channel-sized biases and time projections",
    "vocab": "class-table rows (num_classes + 1 with the null class); classifier logits",
    "norm": "GroupNorm / LayerNorm scale and bias",
}
assert tuple(LOGICAL_AXES_DOC) == LOGICAL_AXES


def fields(cls) -> tuple[str, ...]:
  """Constructor fields of a network class (without Linen's parent/name)."""
  return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name"))


def build(name: str, **kwargs):
  """NETWORKS[name](**kwargs), with plain errors for unknown names and fields."""
  if name not in NETWORKS:
    raise ValueError(f"unknown network {name!r}; allowed: {sorted(NETWORKS)}")
  cls = NETWORKS[name]
  allowed = fields(cls)
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ValueError(f"unknown {name} option(s) {unknown}; allowed: {list(allowed)}")
  return cls(**kwargs)


__all__ = ["NETWORKS", "build", "fields", "InputShapeError", "OptionError", "UNet", "DiT", "DIT_CONFIGS", "MLPDenoiser", "NoisyClassifier",
           "bridge", "LOGICAL_AXES", "LOGICAL_AXES_DOC", "unbox", "logical_spec", "count_params", "BF16_REL_TOL",
           "AutoencoderKL", "PatchDiscriminator"]
