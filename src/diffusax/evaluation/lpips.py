"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"),
the "vgg" variant of the `lpips` package's version 0.1, in Flax Linen and without torch.

    net = load_lpips("vgg16-397923af.pth")   # torchvision VGG-16 weights; linear layers from `lpips`
    net(x, y)                                 # x, y [B, H, W, 3] in [-1, 1] -> distances [B]
    lpips_distance(net.params, x, y)          # the same as a pure function, for use inside a jitted loss

The distance (eq. 1 of the paper, with `lpips.LPIPS(net="vgg", version="0.1")`'s constants):

    s(x)      = (x - shift) / scale,   shift = (-.030, -.088, -.188), scale = (.458, .448, .450)  per RGB
    f^l(x)    = VGG-16 features at the taps l = relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of s(x)
                ([B, H_l, W_l, C_l], H_l = H / 2^l (floor), C_l = 64, 128, 256, 512, 512)
    n^l(x)    = f^l(x) / (||f^l(x)||_2 over channels + 1e-10)                (per pixel)
    d(x, y)   = sum_l mean_{h, w} sum_c w^l_c (n^l(x) - n^l(y))^2_{h, w, c},   w^l_c >= 0

The backbone is torchvision's `vgg16().features` cut after relu5_3 (conv3x3 pad 1 + ReLU blocks
64,64 | 128,128 | 256x3 | 512x3 | 512x3 with 2x2 stride-2 max pools between blocks, floor mode), so
H and W must be at least 16. The per-tap `w^l` are the 1x1 no-bias convolutions `lin{l}.model.1.weight`
[1, C_l, 1, 1] that the `lpips` wheel ships in `lpips/weights/v0.1/vgg.pth` (the VGG-16 backbone
itself it downloads through torchvision, so it must be supplied here as a file).

Layout is NHWC; torch's OIHW kernels are transposed to HWIO. Convolutions and the linear layers run in
float32 at `Precision.HIGHEST` (no TF32/bf16 passes on GPUs/TPUs).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusax.evaluation import torch_pickle

PRECISION = jax.lax.Precision.HIGHEST
SHIFT = (-0.030, -0.088, -0.188)  # lpips ScalingLayer.shift
SCALE = (0.458, 0.448, 0.450)  # lpips ScalingLayer.scale
NORM_EPS = 1e-10  # lpips.normalize_tensor's eps
# torchvision vgg16().features: (torch index of each conv, its output channels), blocks split by max pools.
VGG_BLOCKS = (((0, 64), (2, 64)),
              ((5, 128), (7, 128)),
              ((10, 256), (12, 256), (14, 256)),
              ((17, 512), (19, 512), (21, 512)),
              ((24, 512), (26, 512), (28, 512)))
TAP_NAMES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
TAP_CHANNELS = tuple(block[-1][1] for block in VGG_BLOCKS)  # (64, 128, 256, 512, 512)
MIN_SIZE = 2 ** (len(VGG_BLOCKS) - 1)  # four pools before relu5_3: H, W >= 16
LIN_WEIGHTS = os.path.join("weights", "v0.1", "vgg.pth")  # inside the installed `lpips` package


class VGG16Features(nn.Module):
  """x [B, H, W, 3] (already scaled) -> the 5 LPIPS taps, tap l of shape [B, H >> l, W >> l, C_l].

  Conv modules are named `features_{i}` after their index i in torchvision's `vgg16().features`.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    taps = []
    for b, block in enumerate(VGG_BLOCKS):
      if b > 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for index, channels in block:
        x = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), precision=PRECISION,
                    name=f"features_{index}")(x)
        x = nn.relu(x)
      taps.append(x)
    return tuple(taps)


def _unit_normalize(f: jax.Array) -> jax.Array:
  """f [..., C] -> f / (sqrt(sum_c f^2) + 1e-10) (lpips.normalize_tensor over channels).

  The square root is taken through `where` so that a pixel whose features are all zero (every ReLU
  off) has a zero gradient there instead of inf * 0 = NaN; the values are those of the formula.
  """
  sq = jnp.sum(f * f, axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return f / (norm + NORM_EPS)


def lpips_distance(params: dict[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
  """LPIPS-vgg v0.1 distances [B] between images x, y [B, H, W, 3] in [-1, 1] (H, W >= 16).

  `params` = {"vgg": VGG16Features params, "lin": {"lin0".."lin4": w^l [C_l] >= 0}} as built by
  `params_from_state_dicts`. Pure and differentiable in x, y and params; jit it or call it inside a
  jitted loss. x and y run through VGG-16 as two batches of B rather than one of 2B, so that equal
  images give the same features bit for bit: d(x, x) == 0 and d(x, y) == d(y, x) exactly.
  """
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"LPIPS needs two image batches [B, H, W, 3] of one shape, got {x.shape} and {y.shape}")
  if min(x.shape[1:3]) < MIN_SIZE:
    raise ValueError(f"LPIPS-vgg needs images of at least {MIN_SIZE}x{MIN_SIZE}, "
                     f"got {x.shape[1]}x{x.shape[2]}")
  shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
  vgg = VGG16Features()
  taps_x = vgg.apply({"params": params["vgg"]}, (x - shift) / scale)
  taps_y = vgg.apply({"params": params["vgg"]}, (y - shift) / scale)
  total = jnp.zeros((x.shape[0],), jnp.float32)
  for l, (fx, fy) in enumerate(zip(taps_x, taps_y)):
    diff = jnp.square(_unit_normalize(fx) - _unit_normalize(fy))  # [B, H_l, W_l, C_l]
    weighted = jnp.einsum("bhwc,c->bhw", diff, params["lin"][f"lin{l}"], precision=PRECISION)
    total = total + jnp.mean(weighted, axis=(1, 2))
  return total


# ---------------------------------------------------------------------------------------------------
# state dicts -> params

def vgg_state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """The torchvision VGG-16 `features.*` keys LPIPS uses and their torch shapes (OIHW, [O])."""
  shapes, c_in = {}, 3
  for block in VGG_BLOCKS:
    for index, c_out in block:
      shapes[f"features.{index}.weight"] = (c_out, c_in, 3, 3)
      shapes[f"features.{index}.bias"] = (c_out,)
      c_in = c_out
  return shapes


def lin_state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """The keys of the lpips linear-layer file (`lpips/weights/v0.1/vgg.pth`) and their shapes."""
  return {f"lin{l}.model.1.weight": (1, c, 1, 1) for l, c in enumerate(TAP_CHANNELS)}


def _listed(what: str, keys: list[str]) -> str:
  return f"{what} keys {keys[:6]}" + (f" ({len(keys)} in all)" if len(keys) > 6 else "")


def _checked(sd: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], ignored_prefix: str | None,
             what: str, source: str) -> dict[str, np.ndarray]:
  """{key: float32 array} of exactly `shapes` from `sd`; ValueError naming the keys and `source`."""
  missing = sorted(k for k in shapes if k not in sd)
  extra = sorted(k for k in sd if k not in shapes and not (ignored_prefix and k.startswith(ignored_prefix)))
  if missing or extra:
    parts = [_listed(w, keys) for w, keys in (("missing", missing), ("unexpected", extra)) if keys]
    raise ValueError(f"{source}: not {what}: " + "; ".join(parts))
  out = {}
  for name, want in shapes.items():
    a = sd[name]
    if tuple(a.shape) != want:
      raise ValueError(f"{source}: {name} has shape {tuple(a.shape)}, {what} needs {want}")
    if not np.issubdtype(a.dtype, np.floating) and a.dtype.name != "bfloat16":
      raise ValueError(f"{source}: {name} has dtype {a.dtype}, a floating-point tensor is needed")
    a = np.asarray(a, np.float32)
    if not np.all(np.isfinite(a)):
      raise ValueError(f"{source}: {name} holds non-finite values")
    out[name] = a
  return out


def params_from_state_dicts(vgg_sd: dict[str, np.ndarray], lin_sd: dict[str, np.ndarray],
                            vgg_source: str = "VGG-16 state dict",
                            lin_source: str = "LPIPS linear layers") -> dict[str, Any]:
  """LPIPS params {"vgg": ..., "lin": ...} from a torchvision VGG-16 state dict and the lpips lin file.

  vgg_sd must hold every `features.{i}.weight` [O, I, 3, 3] / `.bias` [O] of `vgg_state_dict_shapes()`
  (`classifier.*` keys are ignored; any other key is refused); lin_sd exactly the five
  `lin{l}.model.1.weight` [1, C_l, 1, 1], all >= 0 (the lpips training clamps them so; it keeps
  d >= 0). Otherwise ValueError naming the keys and the source. Kernels OIHW -> HWIO, float32.
  """
  vgg = _checked(vgg_sd, vgg_state_dict_shapes(), "classifier.", "the torchvision VGG-16 weights", vgg_source)
  lin = _checked(lin_sd, lin_state_dict_shapes(), None, "the LPIPS-vgg v0.1 linear layers", lin_source)
  negative = sorted(k for k, a in lin.items() if np.any(a < 0))
  if negative:
    raise ValueError(f"{lin_source}: {negative} hold negative weights; LPIPS linear layers are >= 0")
  vgg_params = {}
  for block in VGG_BLOCKS:
    for index, _ in block:
      vgg_params[f"features_{index}"] = {
          "kernel": np.ascontiguousarray(vgg[f"features.{index}.weight"].transpose(2, 3, 1, 0)),
          "bias": vgg[f"features.{index}.bias"]}
  lin_params = {f"lin{l}": lin[f"lin{l}.model.1.weight"].reshape(-1) for l in range(len(TAP_CHANNELS))}
  return {"vgg": vgg_params, "lin": lin_params}


def default_lin_path() -> str | None:
  """`lpips/weights/v0.1/vgg.pth` of the installed `lpips` package, found without importing it (that
  would import torch); None if the package or the file is not there."""
  try:
    spec = importlib.util.find_spec("lpips")
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, LIN_WEIGHTS)
    if os.path.isfile(path):
      return path
  return None


class LPIPS:
  """LPIPS-vgg v0.1 with loaded weights: `net(x, y)` -> distances [B], one jitted function.

  `params` is the pytree `lpips_distance(params, x, y)` takes, for use inside a larger jitted loss.
  """

  def __init__(self, params: dict[str, Any]):
    self.params = jax.device_put(params)
    self._distance = jax.jit(lpips_distance)

  def __call__(self, x, y) -> jax.Array:
    """x, y [B, H, W, 3] in [-1, 1], H, W >= 16 -> [B] float32 distances."""
    return self._distance(self.params, x, y)


def load_lpips(vgg_path: str, lin_path: str | None = None) -> LPIPS:
  """LPIPS-vgg v0.1 from a torchvision VGG-16 state dict file and the lpips linear-layer file.

  vgg_path: `torch.save`d torchvision `vgg16()` state dict (e.g. `vgg16-397923af.pth`) or an .npz of
  its `features.*` keys. lin_path: `lpips/weights/v0.1/vgg.pth` (or an .npz of its keys); None takes
  that file from the installed `lpips` package (`pip install lpips`; not imported, torch not needed).
  No torch needed (`torch_pickle` reads both files). Raises ValueError if lin_path is None and no lpips
  package is installed, FileNotFoundError for a missing file, ValueError naming the file for anything
  that is not exactly these weights.
  """
  if lin_path is None:
    lin_path = default_lin_path()
    if lin_path is None:
      raise ValueError("LPIPS needs its linear-layer weights: pass lin_path= the lpips package's "
                       f"{LIN_WEIGHTS.replace(os.sep, '/')} (or an .npz of its lin{{0..4}}.model.1.weight "
                       "keys), or `pip install lpips` so that its shipped file is found")
  vgg_sd = torch_pickle.load_state_dict(vgg_path)
  lin_sd = torch_pickle.load_state_dict(lin_path)
  return LPIPS(params_from_state_dicts(vgg_sd, lin_sd, vgg_source=vgg_path, lin_source=lin_path))
