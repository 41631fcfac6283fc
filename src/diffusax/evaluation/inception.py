"""The FID Inception-v3 in Flax Linen, its weight converter, and a batched feature extractor.

    net = load_fid_inception("pt_inception-2015-12-05-6726825d.pth")
    net.pool_features(images)  # uint8 [N, H, W, 1|3] or float [N, H, W, 1|3] in [0, 1] -> [N, 2048]
    net.logits(images)         # -> [N, 1008]

The network is the one FID is defined with: TensorFlow's 2015-12-05 Inception graph as ported by
pytorch-fid (`pytorch_fid.inception.fid_inception_v3`, torchvision's `Inception3` with the blocks
patched): Mixed_5b..5d are `FIDInceptionA` and Mixed_6b..6e `FIDInceptionC` (their 3x3 average pool
excludes the zero padding from the count), Mixed_7b is `FIDInceptionE_1` (same), Mixed_7c is
`FIDInceptionE_2` (a 3x3 *max* pool in the pool branch), 1008 logits, no auxiliary head.
Every convolution is `BasicConv2d`: conv (no bias) -> BatchNorm(eps=1e-3, running statistics) -> ReLU.
The input x in [0, 1] is resized to 299x299 by bilinear interpolation with half-pixel centres and no
antialiasing (= `F.interpolate(mode="bilinear", align_corners=False)`, up- and down-sizing), then
mapped to 2x - 1. Pool-3 features are the 2048-d global average of Mixed_7c; logits = fc(pool-3).

Layout is NHWC; torch's OIHW kernels are transposed to HWIO by the converter. Convolutions and the fc
layer run at `Precision.HIGHEST` so that GPUs/TPUs do not drop to TF32/bf16 passes; BatchNorm is kept
separate (not folded into the kernels) so the arithmetic follows pytorch-fid's.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusax.evaluation import torch_pickle

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS_FILE)
INPUT_SIZE = 299
MIN_SIZE = 75  # the smallest input the stride-2 stages reduce to 1x1 (resize_input=False only)
POOL_DIM = 2048
NUM_LOGITS = 1008
BN_EPS = 1e-3
PRECISION = jax.lax.Precision.HIGHEST


def resize_bilinear(x: jax.Array, size: int) -> jax.Array:
  """[N, H, W, C] -> [N, size, size, C], bilinear with half-pixel centres, no antialiasing.

  Source coordinate of output pixel i: (i + 1/2) * H/size - 1/2, clamped to the image (torch's
  align_corners=False); the weights of a jax "linear" kernel renormalised inside the image give the
  same clamp at the borders.
  """
  n, _, _, c = x.shape
  return jax.image.resize(x, (n, size, size, c), "linear", antialias=False, precision=PRECISION)


def avg_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average pool, padding 1, the padded zeros not counted (TF's SAME average pool)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
  """3x3 max pool; stride 2 without padding (floor mode), or stride 1 with padding 1 (-inf pad)."""
  pad = ((0, 0), (0, 0)) if stride == 2 else ((1, 1), (1, 1))
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=pad)


class BasicConv2d(nn.Module):
  """conv (no bias) -> BatchNorm(eps 1e-3, running stats) -> ReLU; `padding` = (pad_h, pad_w)."""
  features: int
  kernel: Sequence[int] = (1, 1)
  stride: int = 1
  padding: Sequence[int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, tuple(self.kernel), strides=self.stride, padding=((ph, ph), (pw, pw)),
                use_bias=False, precision=PRECISION, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
    return nn.relu(x)


def _cat(*xs):
  return jnp.concatenate(xs, axis=-1)


class InceptionA(nn.Module):
  """FIDInceptionA (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(no pad count)-1x1."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, name="branch1x1")(x)
    b5 = BasicConv2d(48, name="branch5x5_1")(x)
    b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, name="branch_pool")(avg_pool_3x3(x))
    return _cat(b1, b5, b3, bp)


class InceptionB(nn.Module):
  """torchvision InceptionB (35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool 3x3/2."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv2d(64, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return _cat(b3, bd, max_pool_3x3(x, 2))


class InceptionC(nn.Module):
  """FIDInceptionC (17x17): 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool(no pad count)-1x1."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, name="branch1x1")(x)
    b7 = BasicConv2d(c7, name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, name="branch_pool")(avg_pool_3x3(x))
    return _cat(b1, b7, bd, bp)


class InceptionD(nn.Module):
  """torchvision InceptionD (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool 3x3/2."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, name="branch3x3_1")(x)
    b3 = BasicConv2d(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return _cat(b3, b7, max_pool_3x3(x, 2))


class InceptionE(nn.Module):
  """FIDInceptionE_1 (pool="avg", no pad count) / FIDInceptionE_2 (pool="max") at 8x8."""
  pool: str

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(320, name="branch1x1")(x)
    b3 = BasicConv2d(384, name="branch3x3_1")(x)
    b3 = _cat(BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3))
    bd = BasicConv2d(448, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = _cat(BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd))
    pooled = avg_pool_3x3(x) if self.pool == "avg" else max_pool_3x3(x, 1)
    bp = BasicConv2d(192, name="branch_pool")(pooled)
    return _cat(b1, b3, bd, bp)


class FIDInceptionV3(nn.Module):
  """x [N, H, W, 3] in [0, 1] -> (pool-3 [N, 2048], logits [N, 1008]).

  resize_input=False feeds x as it is (H, W >= 75): the FID definition needs the 299x299 resize;
  without it the network is only good for cheap tests.
  """
  resize_input: bool = True

  @nn.compact
  def __call__(self, x):
    if self.resize_input:
      x = resize_bilinear(x, INPUT_SIZE)
    x = 2.0 * x - 1.0
    x = BasicConv2d(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = max_pool_3x3(x, 2)
    x = BasicConv2d(80, name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = max_pool_3x3(x, 2)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_LOGITS, precision=PRECISION, name="fc")(pool)
    return pool, logits


# ---------------------------------------------------------------------------------------------------
# state dict <-> Flax variables

_LEAF_TO_TORCH = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
                  ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def _variable_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  """{(collection, module..., leaf): shape} of FIDInceptionV3, without computing anything."""
  shapes = jax.eval_shape(FIDInceptionV3(resize_input=False).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32))
  return {tuple(k.key for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}


def _torch_name(path: tuple[str, ...]) -> str:
  return ".".join(path[1:-1] + (_LEAF_TO_TORCH[(path[0], path[-1])],))


def _to_torch_layout(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  if path[-1] == "kernel" and len(shape) == 4:  # HWIO -> OIHW
    return (shape[3], shape[2], shape[0], shape[1])
  if path[-1] == "kernel":  # Dense [in, out] -> Linear [out, in]
    return (shape[1], shape[0])
  return shape


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """The keys of the FID Inception state dict and their torch shapes (BN num_batches_tracked aside)."""
  return {_torch_name(p): _to_torch_layout(p, s) for p, s in _variable_shapes().items()}


def variables_from_state_dict(sd: dict[str, np.ndarray], source: str = "state dict") -> dict[str, Any]:
  """{"params", "batch_stats"} of FIDInceptionV3 from a pytorch-fid state dict of numpy arrays.

  Every expected key must be present with its exact shape and no other key may appear (the
  `*.bn.num_batches_tracked` counters are allowed and ignored); otherwise ValueError naming the keys
  and `source`. Conv weights OIHW -> HWIO, fc weight [out, in] -> [in, out], all float32.
  """
  expected = _variable_shapes()
  names = {_torch_name(p): p for p in expected}
  bns = {n.rsplit(".", 1)[0] for n in names if n.endswith(".running_mean")}
  extra = sorted(k for k in sd if k not in names
                 and not (k.endswith(".num_batches_tracked") and k.rsplit(".", 1)[0] in bns))
  missing = sorted(k for k in names if k not in sd)
  if missing or extra:
    def listed(what, keys):
      return f"{what} keys {keys[:6]}" + (f" ({len(keys)} in all)" if len(keys) > 6 else "")
    parts = [listed(what, keys) for what, keys in (("missing", missing), ("unexpected", extra)) if keys]
    raise ValueError(f"{source}: not the FID Inception-v3 weights ({FID_WEIGHTS_FILE}): " + "; ".join(parts))
  out: dict[str, Any] = {}
  for name, path in names.items():
    a = sd[name]
    want = _to_torch_layout(path, expected[path])
    if tuple(a.shape) != want:
      raise ValueError(f"{source}: {name} has shape {tuple(a.shape)}, the FID Inception-v3 needs {want}")
    if not np.issubdtype(a.dtype, np.floating) and a.dtype.name != "bfloat16":
      raise ValueError(f"{source}: {name} has dtype {a.dtype}, a floating-point tensor is needed")
    a = np.asarray(a, np.float32)
    if path[-1] == "kernel":
      a = a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = np.ascontiguousarray(a)
  return out


# ---------------------------------------------------------------------------------------------------
# batched extractor

def _check_images(images: np.ndarray, min_size: int) -> None:
  """Shape and dtype of an image batch: uint8 or float [N, H, W, 1|3], H and W >= min_size."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"Inception features need images [N, H, W, C] with C = 1 or 3, got shape {images.shape}")
  if min(images.shape[1:3]) < min_size:
    raise ValueError(f"images of {images.shape[1]}x{images.shape[2]} are too small for the Inception "
                     f"network without input resizing (at least {min_size}x{min_size})")
  if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")


def _unit_float(images: np.ndarray) -> np.ndarray:
  """Checked uint8 or float [n, H, W, 1|3] -> float32 [n, H, W, 3] in [0, 1] (uint8 / 255; grey repeated)."""
  if images.dtype == np.uint8:
    x = images.astype(np.float32) / np.float32(255.0)
  else:
    x = images.astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-3 or hi > 1.0 + 1e-3:
      raise ValueError(f"float images must lie in [0, 1] (got values in [{lo:.3g}, {hi:.3g}]); "
                       "pass uint8 images or map [-1, 1] data with (x + 1) / 2")
  return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


class FIDInception:
  """The FID Inception-v3 with loaded weights, run in fixed-size batches by one jitted function.

  The last batch is zero-padded to `batch_size`, so each input size (H, W) compiles once; `traces`
  counts the compilations.
  """

  def __init__(self, variables: dict[str, Any], batch_size: int = 50, resize_input: bool = True):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.batch_size, self.resize_input = int(batch_size), bool(resize_input)
    self.module = FIDInceptionV3(resize_input=self.resize_input)
    self.variables = jax.device_put(variables)
    self.traces = 0

    def apply(v, x):
      self.traces += 1
      return self.module.apply(v, x)

    self._apply = jax.jit(apply)

  def features(self, images) -> tuple[np.ndarray, np.ndarray]:
    """images uint8 [N, H, W, 1|3], or float in [0, 1] -> (pool-3 [N, 2048], logits [N, 1008]) float32."""
    images = np.asarray(images)
    _check_images(images, 1 if self.resize_input else MIN_SIZE)
    n, b = len(images), self.batch_size
    pools, logits = [], []
    for lo in range(0, n, b):
      x = _unit_float(images[lo:lo + b])
      m = len(x)
      if m < b:
        x = np.concatenate([x, np.zeros((b - m,) + x.shape[1:], x.dtype)])
      p, l = self._apply(self.variables, x)
      pools.append(np.asarray(p)[:m])
      logits.append(np.asarray(l)[:m])
    if not pools:
      return np.zeros((0, POOL_DIM), np.float32), np.zeros((0, NUM_LOGITS), np.float32)
    return np.concatenate(pools), np.concatenate(logits)

  def pool_features(self, images) -> np.ndarray:
    """[N, 2048] pool-3 features (the FID / KID features)."""
    return self.features(images)[0]

  def logits(self, images) -> np.ndarray:
    """[N, 1008] logits (softmax of these is what the Inception score uses)."""
    return self.features(images)[1]


def load_fid_inception(path: str, batch_size: int = 50, resize_input: bool = True) -> FIDInception:
  """The FID Inception-v3 from `pt_inception-2015-12-05-6726825d.pth` (or an .npz of the same keys).

  No torch needed (`torch_pickle` reads the file). Raises FileNotFoundError for a missing file and
  ValueError naming the file for anything that is not exactly these weights.
  """
  sd = torch_pickle.load_state_dict(path)
  return FIDInception(variables_from_state_dict(sd, source=path), batch_size, resize_input)
