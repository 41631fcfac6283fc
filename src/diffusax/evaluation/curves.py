"""Small line plots drawn with PIL (no matplotlib): a metric against a swept setting.

    img = line_plot(xs, ys, best=i, points=[(x, y), ...], title=..., xlabel=..., ylabel=...)

Returns uint8 [H, W, 3]: the curve with a dot per value, the best value ringed
and labelled, optional extra points drawn as crosses (e.g. trained EMAs beside
their reconstructions), axes with 5 ticks each.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
  return list(np.linspace(lo, hi, n))


def line_plot(xs: Sequence[float], ys: Sequence[float], *, best: int | None = None,
              points: Sequence[tuple] = (), title: str = "", xlabel: str = "", ylabel: str = "",
              size: tuple = (640, 420)) -> np.ndarray:
  from PIL import Image, ImageDraw
  xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
  if xs.shape != ys.shape or not len(xs):
    raise ValueError(f"need as many x as y values, got {xs.shape} and {ys.shape}")
  w, h = size
  left, right, top, bottom = 70, 20, 30, 50
  px = np.concatenate([xs, [p[0] for p in points]]) if points else xs
  py = np.concatenate([ys, [p[1] for p in points]]) if points else ys
  x0, x1 = float(px.min()), float(px.max())
  y0, y1 = float(py.min()), float(py.max())
  if x1 == x0:
    x0, x1 = x0 - 1.0, x1 + 1.0
  pad = 0.08 * (y1 - y0) if y1 > y0 else 1.0
  y0, y1 = y0 - pad, y1 + pad
  to_px = lambda x, y: (left + (x - x0) / (x1 - x0) * (w - left - right),  # noqa: E731
                        top + (y1 - y) / (y1 - y0) * (h - top - bottom))
  img = Image.new("RGB", size, "white")
  d = ImageDraw.Draw(img)
  d.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
  for t in _ticks(x0, x1):
    x, _ = to_px(t, y0)
    d.line([x, h - bottom, x, h - bottom + 4], fill=(0, 0, 0))
    d.text((x - 14, h - bottom + 6), f"{t:.3g}", fill=(0, 0, 0))
  for t in _ticks(y0, y1):
    _, y = to_px(x0, t)
    d.line([left - 4, y, left, y], fill=(0, 0, 0))
    d.text((4, y - 6), f"{t:.4g}", fill=(0, 0, 0))
  d.text((left, 8), title, fill=(0, 0, 0))
  d.text(((w - left) // 2, h - 18), xlabel, fill=(0, 0, 0))
  d.text((4, top - 20), ylabel, fill=(0, 0, 0))
  order = np.argsort(xs)
  line = [to_px(xs[i], ys[i]) for i in order]
  if len(line) > 1:
    d.line(line, fill=(30, 90, 200), width=2)
  for x, y in line:
    d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(30, 90, 200))
  for px_, py_ in points:
    x, y = to_px(px_, py_)
    d.line([x - 5, y - 5, x + 5, y + 5], fill=(200, 40, 40), width=2)
    d.line([x - 5, y + 5, x + 5, y - 5], fill=(200, 40, 40), width=2)
  if best is not None:
    x, y = to_px(xs[best], ys[best])
    d.ellipse([x - 8, y - 8, x + 8, y + 8], outline=(0, 150, 0), width=2)
    d.text((x + 10, y - 18), f"best {xs[best]:.3g}: {ys[best]:.4g}", fill=(0, 120, 0))
  return np.asarray(img, np.uint8)
