"""Conditional tasks: each example -> (target image 'x', condition), on the host in numpy.

A task is a batch transform applied after `pipeline.ImageTransform`, with its call signature
`(batch, seed, epochs, indices) -> batch`. It reads the float32 'x' [B, H, W, C] in [-1, 1], keeps
'x' as the target and every other key ('label') as it is, and adds its condition keys:

  generate                  nothing (unconditional, or class-conditional through 'label').
  super_resolution(factor)  'low_res' [B, H/f, W/f, C] = area_downsample(x, f).
  colorization              'gray'    [B, H, W, 1]   = luma(x) (ITU-R BT.601).
  inpainting(mask_kind)     'mask'    [B, H, W, 1]   1 = known pixel, 0 = to be filled;
                            'masked'  [B, H, W, C]   = x * mask (the hole set to 0).

Inpainting masks are a function of (seed, example index) alone, never of the epoch: an example
always gets the same mask, so the evaluation split's masks are fixed and identical between runs.

`area_downsample` and `bilinear_resize` are the resize conventions networks and evaluation share;
`make(name, **options)` builds a task from `TASKS`, `condition_shapes` says what it adds; each task's
`image(batch)` is the one dense condition the network sees (`image_shape`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

# ITU-R BT.601 luma weights of (R, G, B). They sum to 1, so luma maps [-1, 1] onto [-1, 1].
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
MASK_KINDS = ("box", "stroke", "mixed")
# The last entry of an inpainting mask's generator seed [seed, index, MASK_STREAM] ("mask" in ASCII).
# Distinct from the draws of pipeline.example_rng ([seed, epoch, index, 1]) and the epoch orders ([seed, epoch]).
MASK_STREAM = 0x6D61736B
# Free-form strokes: each segment's length as a fraction of min(H, W), and the largest turn between segments.
_SEGMENT_LENGTH = (0.1, 0.35)
_MAX_TURN = 0.6 * np.pi


# --- resizing and colour: plain numpy on [B, H, W, C] ---------------------------------------------

def _check_divisible(h: int, w: int, factor: int) -> None:
  if h % factor or w % factor:
    raise ValueError(f"super_resolution: image size {h}x{w} is not divisible by factor {factor}")


def area_downsample(x: np.ndarray, factor: int) -> np.ndarray:
  """[B, H, W, C] -> [B, H/f, W/f, C], the mean of each f x f block (area averaging):
  y[b, i, j, c] = mean_{p, q < f} x[b, f i + p, f j + q, c]. H and W must be divisible by f."""
  x = np.asarray(x)
  b, h, w, c = x.shape
  _check_divisible(h, w, factor)
  blocks = x.reshape(b, h // factor, factor, w // factor, factor, c)
  return blocks.mean(axis=(2, 4), dtype=np.float64).astype(np.result_type(x.dtype, np.float32))


def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(i0, i1, t) along one axis: output k reads (1 - t) x[i0] + t x[i1] at the source coordinate
  s = (k + 1/2) n_in / n_out - 1/2 (half-pixel centres), clamped to [0, n_in - 1] at the edges."""
  s = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
  i0 = np.floor(s).astype(np.int64)
  i1 = np.minimum(i0 + 1, n_in - 1)
  return i0, i1, s - i0


def bilinear_resize(x: np.ndarray, size) -> np.ndarray:
  """[B, H, W, C] -> [B, h, w, C] for size = (h, w) or an int side: bilinear interpolation with
  half-pixel centres (align_corners=False) and edge clamping, no antialiasing. For upsampling this is
  jax.image.resize(x, shape, "bilinear"); for downsampling it is the plain (aliasing) bilinear map."""
  x = np.asarray(x)
  h_out, w_out = (size, size) if np.isscalar(size) else tuple(size)
  out = x.astype(np.float64)
  i0, i1, t = _linear_weights(x.shape[1], int(h_out))
  out = out[:, i0] * (1 - t)[:, None, None] + out[:, i1] * t[:, None, None]
  j0, j1, t = _linear_weights(x.shape[2], int(w_out))
  out = out[:, :, j0] * (1 - t)[:, None] + out[:, :, j1] * t[:, None]
  return out.astype(np.result_type(x.dtype, np.float32))


def luma(x: np.ndarray) -> np.ndarray:
  """[..., 3] RGB -> [..., 1]: Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601), on values as given."""
  x = np.asarray(x)
  if x.shape[-1] != 3:
    raise ValueError(f"colorization needs 3 (RGB) channels, got an image of shape {tuple(x.shape)}")
  y = x.astype(np.float64) @ np.asarray(LUMA_WEIGHTS)
  return y[..., None].astype(np.result_type(x.dtype, np.float32))


# --- inpainting masks: from (seed, example index) only --------------------------------------------

def box_hole(rng: np.random.Generator, h: int, w: int, min_frac: float, max_frac: float) -> np.ndarray:
  """bool [h, w], True on one rectangle of area a h w, a ~ U[min_frac, max_frac], aspect ratio
  log-uniform in [1/3, 3], placed uniformly. Rounding moves the area by at most h/2 pixels."""
  area = rng.uniform(min_frac, max_frac) * h * w
  lo, hi = max(1, int(np.ceil(area / w))), max(1, min(h, int(area)))  # Rows that leave 1 <= width <= w.
  rows = int(np.clip(round(np.sqrt(area * np.exp(rng.uniform(np.log(1 / 3), np.log(3))))), lo, max(lo, hi)))
  cols = int(np.clip(round(area / rows), 1, w))
  top, left = int(rng.integers(0, h - rows + 1)), int(rng.integers(0, w - cols + 1))
  hole = np.zeros((h, w), bool)
  hole[top:top + rows, left:left + cols] = True
  return hole


def _stamp_segment(hole: np.ndarray, p: np.ndarray, q: np.ndarray, radius: float) -> None:
  """Sets the pixels within `radius` of the segment p-q (the union of discs stamped along it)."""
  lo = np.maximum(np.floor(np.minimum(p, q) - radius), 0).astype(int)
  hi = np.minimum(np.ceil(np.maximum(p, q) + radius) + 1, hole.shape).astype(int)
  ii, jj = np.mgrid[lo[0]:hi[0], lo[1]:hi[1]]
  d = q - p
  t = np.clip(((ii - p[0]) * d[0] + (jj - p[1]) * d[1]) / max(float(d @ d), 1e-12), 0.0, 1.0)
  near = (ii - p[0] - t * d[0]) ** 2 + (jj - p[1] - t * d[1]) ** 2 <= radius ** 2
  hole[lo[0]:hi[0], lo[1]:hi[1]] |= near


def stroke_hole(rng: np.random.Generator, h: int, w: int, max_strokes: int, max_vertices: int,
                min_width: float, max_width: float) -> np.ndarray:
  """bool [h, w], True on free-form strokes (LaMa / GLIDE-style irregular masks): 1..max_strokes thick
  polylines, each a random walk of 1..max_vertices - 1 segments from a uniform start, lengths
  U[0.1, 0.35] min(h, w), turns U[-0.6 pi, 0.6 pi], vertices clipped to the image, one width
  U[min_width, max_width] min(h, w) per stroke."""
  side = min(h, w)
  hole = np.zeros((h, w), bool)
  for _ in range(int(rng.integers(1, max_strokes + 1))):
    radius = max(0.5 * rng.uniform(min_width, max_width) * side, np.sqrt(0.5))  # Covers a pixel at least.
    p = rng.uniform([0, 0], [h - 1, w - 1])
    angle = rng.uniform(0, 2 * np.pi)
    for _ in range(int(rng.integers(1, max_vertices))):
      angle += rng.uniform(-_MAX_TURN, _MAX_TURN)
      q = np.clip(p + rng.uniform(*_SEGMENT_LENGTH) * side * np.array([np.sin(angle), np.cos(angle)]),
                  0, [h - 1, w - 1])
      _stamp_segment(hole, p, q, radius)
      p = q
  return hole


@dataclasses.dataclass(frozen=True)
class InpaintingTask:
  """'mask' [B, H, W, 1] float32 (1 = known, 0 = hole) and 'masked' = x * mask [B, H, W, C].

  mask_kind "box": one rectangle of area fraction U[min_frac, max_frac] (box_hole); "stroke":
  free-form strokes (stroke_hole; widths as fractions of min(H, W)); "mixed": either with probability
  1/2. Drawn from `np.random.default_rng([seed, index, MASK_STREAM])`: not the epoch, not the batch.
  Every mask has at least one known and one unknown pixel.
  """
  mask_kind: str = "box"
  min_frac: float = 0.1
  max_frac: float = 0.5
  max_strokes: int = 4
  max_vertices: int = 6
  min_width: float = 0.05
  max_width: float = 0.15

  def __post_init__(self):
    if self.mask_kind not in MASK_KINDS:
      raise ValueError(f"inpainting: unknown mask_kind {self.mask_kind!r}; allowed: {list(MASK_KINDS)}")
    if not 0 < self.min_frac <= self.max_frac < 1:
      raise ValueError(f"inpainting: need 0 < min_frac <= max_frac < 1, got {self.min_frac}, {self.max_frac}")
    if not 0 < self.min_width <= self.max_width:
      raise ValueError(f"inpainting: need 0 < min_width <= max_width, got {self.min_width}, {self.max_width}")
    if self.max_strokes < 1 or self.max_vertices < 2:
      raise ValueError(f"inpainting: need max_strokes >= 1 and max_vertices >= 2, "
                       f"got {self.max_strokes}, {self.max_vertices}")

  def mask(self, seed: int, index: int, h: int, w: int) -> np.ndarray:
    """float32 [h, w, 1] of example `index`: 1 = known, 0 = to be filled."""
    _check_mask_size(h, w)
    rng = np.random.default_rng([int(seed), int(index), MASK_STREAM])
    kind = self.mask_kind
    if kind == "mixed":
      kind = "box" if rng.random() < 0.5 else "stroke"
    if kind == "box":
      hole = box_hole(rng, h, w, self.min_frac, self.max_frac)
    else:
      hole = stroke_hole(rng, h, w, self.max_strokes, self.max_vertices, self.min_width, self.max_width)
    if hole.all() or not hole.any():  # Strokes may cover all or (after clipping) nothing: flip one pixel.
      hole.flat[int(rng.integers(h * w))] = not hole.any()
    return (~hole).astype(np.float32)[..., None]

  def condition_shapes(self, image_shape) -> dict:
    h, w, c = image_shape
    _check_mask_size(h, w)
    return {"mask": (h, w, 1), "masked": (h, w, c)}

  def image(self, batch: dict) -> np.ndarray:
    """The network's dense condition [B, H, W, C + 1]: the masked image, then the mask."""
    return np.concatenate([batch["masked"], batch["mask"]], axis=-1)

  def __call__(self, batch: dict, seed: int, epochs: np.ndarray, indices: np.ndarray) -> dict:
    del epochs  # The same example gets the same mask in every epoch.
    x = np.asarray(batch["x"], np.float32)
    _, h, w, _ = x.shape
    mask = np.stack([self.mask(seed, i, h, w) for i in indices])
    return {**batch, "mask": mask, "masked": x * mask}


def _check_mask_size(h: int, w: int) -> None:
  if h * w < 2:
    raise ValueError(f"inpainting needs at least 2 pixels (one known, one to fill), got an image of {h}x{w}")


# --- the other tasks ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GenerateTask:
  """The identity: no condition keys ('label', when present, conditions as before)."""

  def condition_shapes(self, image_shape) -> dict:
    del image_shape
    return {}

  def image(self, batch: dict):
    del batch
    return None

  def __call__(self, batch: dict, seed: int, epochs: np.ndarray, indices: np.ndarray) -> dict:
    del seed, epochs, indices
    return dict(batch)


@dataclasses.dataclass(frozen=True)
class SuperResolutionTask:
  """'low_res' [B, H/f, W/f, C] float32 = area_downsample(x, factor) (mean of each f x f block)."""
  factor: int

  def __post_init__(self):
    if isinstance(self.factor, bool) or not isinstance(self.factor, (int, np.integer)) or self.factor < 1:
      raise ValueError(f"super_resolution: factor must be an integer >= 1, got {self.factor!r}")

  def condition_shapes(self, image_shape) -> dict:
    h, w, c = image_shape
    _check_divisible(h, w, self.factor)
    return {"low_res": (h // self.factor, w // self.factor, c)}

  def image(self, batch: dict) -> np.ndarray:
    """The network's dense condition: 'low_res' [B, H/f, W/f, C]."""
    return batch["low_res"]

  def __call__(self, batch: dict, seed: int, epochs: np.ndarray, indices: np.ndarray) -> dict:
    del seed, epochs, indices
    return {**batch, "low_res": area_downsample(np.asarray(batch["x"], np.float32), self.factor)}


@dataclasses.dataclass(frozen=True)
class ColorizationTask:
  """'gray' [B, H, W, 1] float32 = luma(x) = 0.299 R + 0.587 G + 0.114 B; x must be RGB."""

  def condition_shapes(self, image_shape) -> dict:
    h, w, c = image_shape
    if c != 3:
      raise ValueError(f"colorization needs 3 (RGB) channels, got an image of shape {tuple(image_shape)}")
    return {"gray": (h, w, 1)}

  def image(self, batch: dict) -> np.ndarray:
    """The network's dense condition: 'gray' [B, H, W, 1]."""
    return batch["gray"]

  def __call__(self, batch: dict, seed: int, epochs: np.ndarray, indices: np.ndarray) -> dict:
    del seed, epochs, indices
    return {**batch, "gray": luma(np.asarray(batch["x"], np.float32))}


# Tasks by the name a config's `task` gives.
TASKS = {
    "generate": GenerateTask,
    "super_resolution": SuperResolutionTask,
    "colorization": ColorizationTask,
    "inpainting": InpaintingTask,
}


def make(name: str, **options):
  """The task `name` with `options` (its dataclass fields); unknown or missing ones are refused."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; allowed: {list(TASKS)}")
  fields = dataclasses.fields(TASKS[name])
  allowed = [f.name for f in fields]
  bad = sorted(set(options) - set(allowed))
  if bad:
    raise ValueError(f"task {name!r} takes no option(s) {bad}; allowed: {allowed or 'none'}")
  missing = [f.name for f in fields if f.name not in options
             and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
  if missing:
    raise ValueError(f"task {name!r} needs option(s) {missing}; allowed: {allowed}")
  return TASKS[name](**options)


def image_shape(name: str, image_shape, **options) -> tuple | None:
  """Per-example shape of the one dense condition image a task hands the network (`task.image(batch)`):
  the low-resolution image, the luma, or the masked image with its mask as a last channel; None for
  `generate`."""
  shapes = condition_shapes(name, image_shape, **options)
  if not shapes:
    return None
  if "mask" in shapes:
    h, w, c = shapes["masked"]
    return (h, w, c + 1)
  (shape,) = shapes.values()
  return shape


def condition_shapes(name: str, image_shape, **options) -> dict[str, tuple]:
  """{condition key: per-example shape} that task `name` adds for images of shape (H, W, C),
  e.g. super_resolution with factor 4 on (32, 32, 3): {'low_res': (8, 8, 3)}. Refuses what the task
  cannot take (a factor not dividing the size, colorization of non-RGB, a 1-pixel inpainting)."""
  return make(name, **options).condition_shapes(tuple(int(s) for s in image_shape))


@dataclasses.dataclass(frozen=True)
class Conditioned:
  """A batch transform followed by a task: `base` (e.g. pipeline.ImageTransform) makes 'x', then `task`
  adds its condition keys and 'cond_image' = task.image(...) (the network's one dense condition).
  Picklable, for grain's workers."""
  base: object
  task: object

  def __call__(self, batch: dict, seed: int, epochs: np.ndarray, indices: np.ndarray) -> dict:
    out = self.task(self.base(batch, seed, epochs, indices), seed, epochs, indices)
    image = self.task.image(out)
    if image is not None:
      out["cond_image"] = np.asarray(image, np.float32)
    return out
