"""Reconstruction quality of an autoencoder (latent diffusion, stage 1): PSNR, SSIM and reconstruction
FD, with the bicubic down-and-up baseline of the same factor.

    metrics(real, rec, features=None) -> {"psnr", "ssim", "rfd"}   uint8 images [N, H, W, C]
    bicubic(real, factor) -> uint8 images: each image downsampled by `factor` and upsampled back
                             (PIL bicubic both ways), the baseline an autoencoder must beat

PSNR is 10 log10(255^2 / MSE) per image on the 8-bit values, averaged over images; SSIM is
scikit-image's `structural_similarity` (Wang et al. 2004; 7x7 uniform window, data range 255,
colour channels averaged) averaged over images; rFD is the Fréchet distance between the features of
the reconstructions and of the originals (`features(uint8 images) -> [N, D]`, e.g. the dataset's
own classifier), None without features.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def psnr(real: np.ndarray, rec: np.ndarray) -> np.ndarray:
  """Per-image PSNR in dB of uint8 images [N, ...] (inf for an exact copy)."""
  d = real.astype(np.float64) - rec.astype(np.float64)
  mse = np.mean(d.reshape(len(d), -1) ** 2, axis=1)
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(255.0 ** 2 / mse)


def ssim(real: np.ndarray, rec: np.ndarray) -> np.ndarray:
  """Per-image SSIM of uint8 images [N, H, W, C] (scikit-image, data range 255, channels averaged)."""
  from skimage.metrics import structural_similarity
  win = min(7, real.shape[1], real.shape[2])
  win -= 1 - win % 2  # odd
  return np.array([structural_similarity(a, b, data_range=255, channel_axis=-1, win_size=win)
                   for a, b in zip(real, rec)])


def bicubic(real: np.ndarray, factor: int) -> np.ndarray:
  """Each uint8 image [H, W, C] resized to (H/f, W/f) and back with PIL's bicubic filter."""
  from PIL import Image
  out = []
  for im in real:
    h, w, c = im.shape
    p = Image.fromarray(im[..., 0] if c == 1 else im)
    p = p.resize((w // factor, h // factor), Image.BICUBIC).resize((w, h), Image.BICUBIC)
    a = np.asarray(p)
    out.append(a[..., None] if c == 1 else a)
  return np.stack(out)


def metrics(real: np.ndarray, rec: np.ndarray, features: Callable | None = None,
            real_features: np.ndarray | None = None) -> dict:
  """{"psnr": mean dB, "ssim": mean, "rfd": Fréchet distance of features (None without features)}."""
  from diffusax.evaluation import distances
  if real.shape != rec.shape or real.dtype != np.uint8 or rec.dtype != np.uint8:
    raise ValueError(f"need uint8 images of one shape, got {real.dtype} {real.shape} and {rec.dtype} {rec.shape}")
  p = psnr(real, rec)
  out = {"psnr": float(np.mean(np.minimum(p, 100.0))), "ssim": float(np.mean(ssim(real, rec))), "rfd": None}
  if features is not None:
    fr = features(real) if real_features is None else real_features
    out["rfd"] = float(distances.frechet_distance_from_features(features(rec), fr))
  return out


def feature_fn(kind: str | None, data_dir: str, inception_weights: str = "", log=print) -> Callable | None:
  """uint8 images -> [N, D] features for rFD: the embedded dataset's own classifier ("digits", "photos"),
  else the FID Inception network when its weights are given, else None (no rFD)."""
  if kind in ("digits", "photos"):
    if kind == "digits":
      from diffusax.evaluation import digits_classifier as mod
    else:
      from diffusax.evaluation import photos_classifier as mod
    params, _ = mod.load_or_train(data_dir, log=log)
    return lambda images: mod.apply(params, images)[1]
  if inception_weights:
    from diffusax.evaluation import inception
    net = inception.load_fid_inception(inception_weights)
    return net.pool_features
  return None
