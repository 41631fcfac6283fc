"""Annotated building blocks shared by the networks: Dense, Conv, GroupNorm and
multi-head self-attention, every parameter tagged with logical axis names.

Parameters are created through `nn.with_logical_partitioning`, so `init`
returns `nn.LogicallyPartitioned` boxes. `apply` accepts boxed or plain
variables (Linen unboxes on read); `unbox` strips the boxes and
`logical_spec` returns the tree of logical `PartitionSpec`s. The rules of
`diffusax.parallel.mesh` (`DEFAULT_RULES`, `param_shardings`) map these names
onto the (data, fsdp) mesh.

Logical axis names (`LOGICAL_AXES`):
  embed     feature/channel dim of dense and attention inputs and outputs
            (U-Net channels inside attention, DiT hidden size, time-embedding width)
  mlp       hidden dim of MLPs (time MLP, DiT MLP, adaLN modulation outputs)
  heads     attention heads
  kv        per-head feature dim of queries, keys and values
  conv_in   input channels of a convolution kernel [kh, kw, in, out]
  conv_out  output channels of a convolution kernel, and channel-sized biases
  vocab     rows of the class-embedding table (num_classes + 1 null row)
  norm      scale and bias vectors of GroupNorm / LayerNorm

Compute dtype (`dtype`) and parameter dtype (`param_dtype`) are separate:
kernels are stored in `param_dtype` and cast to `dtype` for the matmul/conv;
normalisation statistics and attention softmax always run in float32.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import meta

F32 = jnp.float32
Dtype = Any

LOGICAL_AXES = ("embed", "mlp", "heads", "kv", "conv_in", "conv_out", "vocab", "norm")

# DDPM's default_init: variance scaling 1.0, fan_avg, uniform (= Glorot uniform).
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zeros = nn.initializers.zeros
ones = nn.initializers.ones


def unbox(variables):
  """Strips `nn.LogicallyPartitioned` boxes: plain arrays, same tree (= `flax.linen.meta.unbox`)."""
  return meta.unbox(variables)


def logical_spec(variables):
  """Tree of `PartitionSpec`s of logical names (None for unboxed leaves) (= `nn.get_partition_spec`)."""
  return nn.get_partition_spec(variables)


def count_params(variables) -> int:
  """Total number of parameter entries (boxed, plain or `jax.ShapeDtypeStruct` leaves)."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(unbox(variables))))


def boxed(init, names: Sequence[str | None]):
  """`init` whose result is boxed with logical axis `names` (one per array dim)."""
  return nn.with_logical_partitioning(init, tuple(names))


def dense(features: int, names: tuple[str | None, str | None], *, dtype: Dtype = F32,
          param_dtype: Dtype = F32, zero_init: bool = False, kernel_init=None,
          name: str | None = None) -> nn.Dense:
  """`nn.Dense` with kernel [in, out] labelled `names` and bias labelled names[1]."""
  init = zeros if zero_init else (kernel_init or default_kernel_init)
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=boxed(init, names), bias_init=boxed(zeros, (names[1],)))


def conv(features: int, kernel_size: int = 3, *, stride: int = 1, dtype: Dtype = F32,
         param_dtype: Dtype = F32, zero_init: bool = False, padding=None,
         name: str | None = None) -> nn.Conv:
  """`nn.Conv` (NHWC), kernel [k, k, in, out] -> (None, None, "conv_in", "conv_out").

  Default padding is symmetric (k // 2 each side), as in PyTorch, so a stride-2
  3x3 conv halves even sizes exactly.
  """
  p = kernel_size // 2
  init = zeros if zero_init else default_kernel_init
  return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                 padding=((p, p), (p, p)) if padding is None else padding,
                 dtype=dtype, param_dtype=param_dtype, name=name,
                 kernel_init=boxed(init, (None, None, "conv_in", "conv_out")),
                 bias_init=boxed(zeros, ("conv_out",)))


class InputShapeError(ValueError):
  """The network cannot take inputs of this shape (rank, or a size its downsamplings or patches do not divide)."""


class OptionError(ValueError):
  """The network's constructor options contradict each other (e.g. num_groups not dividing a width)."""


def check_groups(channels: int, num_groups: int, where: str = "GroupNorm") -> None:
  if num_groups <= 0 or channels % num_groups:
    raise OptionError(
        f"{where}: {channels} channels are not divisible by num_groups={num_groups}; "
        f"set num_groups to a divisor of every width (base_channels * channel_mult)")


def group_norm(channels: int, num_groups: int, *, param_dtype: Dtype = F32,
               name: str | None = None) -> nn.GroupNorm:
  """GroupNorm computed in float32 (like ADM's GroupNorm32), scale/bias labelled "norm"."""
  check_groups(channels, num_groups)
  return nn.GroupNorm(num_groups=num_groups, epsilon=1e-5, dtype=F32, param_dtype=param_dtype,
                      scale_init=boxed(ones, ("norm",)), bias_init=boxed(zeros, ("norm",)),
                      name=name)


def layer_norm(*, affine: bool = False, param_dtype: Dtype = F32, name: str | None = None):
  """LayerNorm in float32, eps 1e-6 (DiT: no affine; adaLN supplies scale and shift)."""
  return nn.LayerNorm(epsilon=1e-6, use_scale=affine, use_bias=affine, dtype=F32,
                      param_dtype=param_dtype, scale_init=boxed(ones, ("norm",)),
                      bias_init=boxed(zeros, ("norm",)), name=name)


def resolve_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
  """Number of heads: channels // num_head_channels when that is > 0, else num_heads."""
  if num_head_channels > 0:
    if channels % num_head_channels:
      raise OptionError(f"attention: {channels} channels not divisible by num_head_channels={num_head_channels}")
    return channels // num_head_channels
  if num_heads <= 0 or channels % num_heads:
    raise OptionError(f"attention: {channels} channels not divisible by num_heads={num_heads}")
  return num_heads


class SelfAttention(nn.Module):
  """Multi-head self-attention over tokens: [B, N, C] -> [B, N, C].

  q, k, v = x W_{q,k,v} + b with W: [C, heads, kv] ("embed", "heads", "kv");
  out = softmax(q k^T / sqrt(kv)) v W_o + b_o with W_o: [heads, kv, C]
  ("heads", "kv", "embed"). 4 C^2 + 4 C parameters, like DDPM's NIN q/k/v/proj
  and DiT's qkv + proj linears. Logits and softmax in float32.
  """
  num_heads: int
  zero_out: bool = False       # zero-init output projection (DDPM/ADM zero_module)
  dtype: Dtype = F32
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    h = self.num_heads
    if c % h:
      raise OptionError(f"attention: {c} channels not divisible by num_heads={h}")
    d = c // h
    qkv_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0, out_axis=(1, 2))
    out_init = zeros if self.zero_out else nn.initializers.variance_scaling(
        1.0, "fan_avg", "uniform", in_axis=(0, 1), out_axis=2)
    x = x.astype(self.dtype)

    def proj(name):
      w = self.param(f"{name}_kernel", boxed(qkv_init, ("embed", "heads", "kv")), (c, h, d), self.param_dtype)
      b = self.param(f"{name}_bias", boxed(zeros, ("heads", "kv")), (h, d), self.param_dtype)
      return jnp.einsum("bnc,chd->bnhd", x, w.astype(self.dtype)) + b.astype(self.dtype)

    q, k, v = proj("query"), proj("key"), proj("value")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=F32) / jnp.sqrt(F32(d))
    weights = nn.softmax(logits, axis=-1).astype(self.dtype)
    o = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    wo = self.param("out_kernel", boxed(out_init, ("heads", "kv", "embed")), (h, d, c), self.param_dtype)
    bo = self.param("out_bias", boxed(zeros, ("embed",)), (c,), self.param_dtype)
    return jnp.einsum("bqhd,hdc->bqc", o, wo.astype(self.dtype)) + bo.astype(self.dtype)
