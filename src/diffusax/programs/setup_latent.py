"""Latent diffusion, stage 2: the programs' view of the autoencoder whose latents a diffusion model learns.

A diffusion config with `latent.autoencoder_workdir` names a stage-1 run (programs/autoencoder.py).
From its checkpoint meta (no array read) this module rebuilds the autoencoder, reads its
`latent_stats.json` and refuses, before any device work:
  * a workdir without an autoencoder checkpoint, or without latent statistics;
  * statistics computed for other parameters (their `params_digest`, the sha256 of the checksums the
    checkpoint recorded for its first EMA, differs: the autoencoder was trained further since);
  * images the autoencoder cannot take (a side not divisible by its factor f).
The diffusion model then sees normalised latents z_n = (z - shift) * scale, with (shift, scale) from
the statistics by latent.normalize: "channel" (per-channel mean, 1 / std), "scalar" (0, LDM's 1 / std
over all entries), "none" (0, 1). Its checkpoints record the autoencoder's digest and the
normalisation in their signature, so a checkpoint refuses another autoencoder.

Training data: each split is encoded once (`latent_source`) into an array_record cache in the
autoencoder's workdir, AE_WORKDIR/latents/ (per example: the posterior mean and std, float32, and those of the flipped image
when data.random_flip), named by the autoencoder's digest, so a resumed run reads the same file and
another autoencoder gets its own. `LatentTransform` draws z = mean + std eps per example from
(seed, epoch, index) (latent.sample_posterior; else z = mean) and normalises it.
Sampling decodes: `decoding(fn, lat)` turns a latent sampler into one of images.
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusax import checkpoint as ckpt_lib
from diffusax import storage
from diffusax.data import pipeline, registry
from diffusax.parallel import mesh as mesh_lib
from diffusax.programs.errors import ConfigError
from diffusax.programs.setup import EMA_PART, json_tuples

AE_KIND = "autoencoder"  # meta["kind"] of a stage-1 checkpoint (programs/autoencoder.KIND)
STATS_FILE = "latent_stats.json"
CACHE_DIR = "latents"


def params_digest(checksums: dict, part: tuple = EMA_PART) -> str:
  """sha256 of the recorded checksums of one state part (default the first EMA), path-sorted."""
  import hashlib
  import json
  prefix = ckpt_lib.part_keystr(part)
  mine = {p[len(prefix):]: c for p, c in checksums.items() if p.startswith(prefix)}
  if not mine:
    raise ValueError(f"the checkpoint's meta records no checksums under {prefix}")
  return hashlib.sha256(json.dumps(sorted(mine.items())).encode()).hexdigest()


def build_autoencoder(net: dict, dtype: str = "float32"):
  """The AutoencoderKL of `autoencoder.net` options."""
  from diffusax import nn
  from diffusax.nn import autoencoder as ae_nn
  try:
    return ae_nn.AutoencoderKL(**dict(net), dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
  except (TypeError, nn.OptionError) as e:
    raise ConfigError(f"autoencoder.net: {e}") from None


@dataclasses.dataclass(frozen=True)
class Latent:
  """The stage-1 autoencoder of a latent diffusion model and how its latents are normalised."""
  workdir: str
  step: int
  module: Any
  image: registry.Description   # the pixel dataset (shape, classes, eval features)
  shape: tuple                  # one latent (H / f, W / f, z_channels)
  shift: tuple                  # per channel
  scale: tuple                  # per channel
  normalize: str
  sample_posterior: bool
  digest: str
  signature: dict               # the autoencoder's checkpoint signature
  stats: dict
  _cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  @property
  def tag(self) -> str:
    """What identifies the latent space: the autoencoder's parameters (digest) and the normalisation."""
    return f"{storage.resolve(self.workdir)}@{self.step}#{self.digest[:16]}/{self.normalize}"

  def identity(self) -> dict:
    """The part of a stage-2 checkpoint signature that names its latent space."""
    return {"autoencoder_digest": self.digest, "normalize": self.normalize, "shape": list(self.shape)}

  def description(self) -> registry.Description:
    """The dataset as the diffusion model sees it: latents of the image set's classes and features."""
    return dataclasses.replace(self.image, shape=tuple(self.shape), transform="latent")

  def to_images(self, ae_params, z_n):
    """Normalised latents [B, h, w, c] -> images [B, H, W, C] in about [-1, 1] (float32)."""
    z = z_n / jnp.asarray(self.scale, jnp.float32) + jnp.asarray(self.shift, jnp.float32)
    return self.module.apply({"params": ae_params}, z, method="decode")

  def params(self, mesh, log=print):
    """The autoencoder's first EMA on `mesh` (replicated), restored once and verified."""
    if "params" not in self._cache:
      ckpt = ckpt_lib.Checkpointer(storage.join(self.workdir, "checkpoints"), keep=None, async_save=False,
                                   replicated_sharding=mesh_lib.replicated(mesh), log=log)
      try:
        boxed = jax.eval_shape(lambda k: self.module.init(k, jnp.zeros((1,) + tuple(self.image.shape)))["params"],
                               jax.random.key(0))
        plain = mesh_lib.unbox(boxed)
        abstract = ckpt_lib.abstract_like(plain, jax.tree.map(lambda _: mesh_lib.replicated(mesh), plain))
        params, _ = ckpt.restore(abstract, self.signature, step=self.step, part=EMA_PART)
      finally:
        ckpt.close()
      self._cache["params"] = params
    return self._cache["params"]


def describe(s, image: registry.Description) -> Latent:
  """The Latent of s.latent (checkpoint meta and statistics only; no array is read)."""
  lt = s.latent
  wd = lt.autoencoder_workdir
  if s.data.random_crop:
    raise ConfigError("data.random_crop with latent.autoencoder_workdir: the latent cache holds each image's "
                      "centre square (and its mirror image with data.random_flip); crops are not encoded")
  d = storage.join(wd, "checkpoints")
  steps = sorted(int(n) for n in storage.listdir(d) if n.isdigit()) if storage.exists(d) else []
  if not steps:
    raise ConfigError(f"latent.autoencoder_workdir={wd}: no checkpoint in {d} (train the autoencoder first: a "
                      "config with stage='autoencoder', e.g. configs/photos_autoencoder.py)")
  step = steps[-1] if lt.autoencoder_step < 0 else lt.autoencoder_step
  if step not in steps:
    raise ConfigError(f"latent.autoencoder_step={step} is not in {d}; it has {steps}")
  ckpt = ckpt_lib.Checkpointer(d, keep=None, async_save=False)
  try:
    meta = ckpt.read_meta(step)
  finally:
    ckpt.close()
  if meta.get("kind") != AE_KIND:
    raise ConfigError(f"latent.autoencoder_workdir={wd}: step {step} is a {meta.get('kind') or 'diffusion'} "
                      "checkpoint, not an autoencoder's (stage='autoencoder')")
  model = meta["signature"]["model"]
  module = build_autoencoder(json_tuples(model["kwargs"]))
  if image.transform != "image":
    raise ConfigError(f"latent diffusion needs an image dataset; {s.data.name!r} holds vectors")
  from diffusax import nn
  try:
    shape = tuple(module.latent_shape(image.shape))
  except nn.InputShapeError as e:
    raise ConfigError(f"the autoencoder of {wd} cannot take images of shape {tuple(image.shape)}: {e}") from None
  stats_path = storage.join(wd, STATS_FILE)
  if not storage.exists(stats_path):
    raise ConfigError(f"latent.autoencoder_workdir={wd} has no {STATS_FILE}: run --mode=train on it again with "
                      "its config (a finished run only computes the latent statistics)")
  stats = storage.read_json(stats_path)
  digest = params_digest(meta.get("checksums", {}))
  if stats.get("params_digest") != digest:
    raise ConfigError(f"latent.autoencoder_workdir={wd}: its latent statistics were computed for other parameters "
                      f"(step {stats.get('step')}) than checkpoint step {step}: the autoencoder changed since; run "
                      f"--mode=train on it again to recompute them, or set latent.autoencoder_step={stats.get('step')}")
  c = len(stats["mean"])
  if lt.normalize == "channel":
    shift, scale = tuple(stats["mean"]), tuple(1.0 / max(v, 1e-12) for v in stats["std"])
  elif lt.normalize == "scalar":
    shift, scale = (0.0,) * c, (float(stats["scale"]),) * c
  else:
    shift, scale = (0.0,) * c, (1.0,) * c
  return Latent(workdir=wd, step=step, module=module, image=image, shape=shape, shift=shift, scale=scale,
                normalize=lt.normalize, sample_posterior=lt.sample_posterior, digest=digest,
                signature=meta["signature"], stats=stats)


# --- the encoded dataset -------------------------------------------------------------------------

FIELDS = ("mean", "std")


@dataclasses.dataclass(frozen=True)
class LatentSource:
  """Random access to encoded examples: {"mean", "std" [V, h, w, c] (V views: 1, or 2 with flips), "label"}."""
  mean: np.ndarray   # [N, V, h, w, c] float32
  std: np.ndarray
  label: np.ndarray | None

  def __len__(self) -> int:
    return len(self.mean)

  def __getitems__(self, idx):
    idx = np.asarray(idx)
    out = {"mean": self.mean[idx], "std": self.std[idx]}
    if self.label is not None:
      out["label"] = self.label[idx]
    return [{k: v[i] for k, v in out.items()} for i in range(len(idx))]

  def __getitem__(self, i):
    return self.__getitems__([i])[0]


@dataclasses.dataclass(frozen=True)
class LatentTransform:
  """{"mean", "std" [B, V, h, w, c], "label"} -> {"x": normalised z [B, h, w, c], "label"}.

  Training: the flipped view with probability 1/2 when there are two (data.random_flip), and
  z = mean + std eps with eps from `example_rng(seed, epoch, index, 2)` (sample_posterior); else the
  first view's mean."""
  shift: tuple
  scale: tuple
  sample_posterior: bool = True
  train: bool = True

  def __call__(self, batch: dict, seed: int, epochs: np.ndarray, indices: np.ndarray) -> dict:
    mean, std = np.asarray(batch["mean"]), np.asarray(batch["std"])
    out = []
    for m, sd, e, i in zip(mean, std, epochs, indices):
      if not self.train:
        out.append(m[0])
        continue
      rng = pipeline.example_rng(seed, e, i, 2)
      v = int(rng.integers(m.shape[0])) if m.shape[0] > 1 else 0
      z = m[v]
      if self.sample_posterior:
        z = z + sd[v] * rng.standard_normal(z.shape).astype(np.float32)
      out.append(z)
    x = (np.stack(out) - np.asarray(self.shift, np.float32)) * np.asarray(self.scale, np.float32)
    result = {"x": x.astype(np.float32)}
    if "label" in batch:
      result["label"] = np.asarray(batch["label"]).astype(np.int32)
    return result


def transform(lat: Latent, train: bool) -> LatentTransform:
  return LatentTransform(shift=lat.shift, scale=lat.scale, sample_posterior=lat.sample_posterior, train=train)


def _cache_path(lat: Latent, name: str, split: str, views: int, image_size: int) -> str:
  """AE_WORKDIR/latents/<dataset>_<split>_s<size>_v<views>_<digest>.array_record: shared by every stage-2 run
  of that autoencoder (the cache holds the posterior before normalisation)."""
  safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
  return storage.join(lat.workdir, CACHE_DIR, f"{safe}_{split}_s{image_size}_v{views}_{lat.digest[:16]}.array_record")


def _write_records(path: str, rows: list[bytes]) -> None:
  """An array_record file of `rows`, committed (written locally then copied up on an object store)."""
  import tempfile
  from array_record.python.array_record_module import ArrayRecordWriter
  with tempfile.TemporaryDirectory(prefix="diffusax_latents.") as tmp:
    local = os.path.join(tmp, "part.array_record")
    w = ArrayRecordWriter(local, "group_size:1")
    for r in rows:
      w.write(r)
    w.close()
    with open(local, "rb") as f:
      storage.commit(path, f.read())


def _read_records(path: str) -> list[bytes]:
  """Every record of an array_record file; one on an object store is read through a local copy."""
  import tempfile
  from array_record.python.array_record_data_source import ArrayRecordDataSource

  def read(local):
    src = ArrayRecordDataSource(local)
    try:
      return [src[i] for i in range(len(src))]
    finally:
      if hasattr(src, "close"):
        src.close()

  if not storage.is_remote(path):
    return read(storage.resolve(path))
  with tempfile.TemporaryDirectory(prefix="diffusax_latents.") as tmp:
    local = os.path.join(tmp, "part.array_record")
    with open(local, "wb") as f:
      f.write(storage.read_bytes(path))
    return read(local)


def _row(mean: np.ndarray, std: np.ndarray, label: int) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, mean=mean.astype(np.float32), std=std.astype(np.float32), label=np.int64(label))
  return buf.getvalue()


def latent_source(u, split: str, train: bool, log=print) -> LatentSource:
  """The encoded `split` (from its cache in AE_WORKDIR/latents, written on first use by process 0).
  `u`: the model set-up (`setup.ModelSetup` with `.latent`)."""
  s, lat = u.s, u.latent
  views = 2 if (train and s.data.random_flip) else 1
  path = _cache_path(lat, s.data.name, split, views, s.data.image_size)
  if not storage.committed(path):
    _encode_split(u, split, path, views, log)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"diffusax_latents_{split}")
  rows = [np.load(io.BytesIO(r)) for r in _read_records(path)]
  mean = np.stack([r["mean"] for r in rows])
  std = np.stack([r["std"] for r in rows])
  labels = np.array([int(r["label"]) for r in rows], np.int32)
  return LatentSource(mean=mean, std=std, label=labels if (labels >= 0).all() else None)


def _encode_split(u, split: str, path: str, views: int, log) -> None:
  s, lat = u.s, u.latent
  try:
    src = pipeline.open_source(s.data.name, split, s.data.data_dir)
  except pipeline.DataError as e:
    raise ConfigError(f"data: {e}") from None
  n = len(src)
  params = lat.params(u.mesh, log)
  ndev = u.mesh.devices.size
  batch = -(-min(256, n) // ndev) * ndev
  sh = mesh_lib.batch_sharding(u.mesh, 4)
  tf = pipeline.make_transform("image", s.data, train=False)

  @jax.jit
  def encode(params, x):
    mean, logvar = lat.module.apply({"params": params}, x, method="encode")
    return mean, jnp.exp(0.5 * logvar)

  means, stds, labels = [], [], []
  for lo in range(0, n, batch):
    idx = np.minimum(np.arange(lo, lo + batch), n - 1)
    raw = pipeline.read(src, idx)
    x = tf(raw, s.seed, np.zeros(batch, np.int64), idx)["x"]
    per_view = []
    for v in range(views):
      xv = x[:, :, ::-1] if v else x
      m, sd = encode(params, jax.device_put(np.ascontiguousarray(xv), sh))
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        m, sd = multihost_utils.process_allgather((m, sd), tiled=True)
      per_view.append((np.asarray(m), np.asarray(sd)))
    keep = min(batch, n - lo)
    means.append(np.stack([p[0] for p in per_view], 1)[:keep])
    stds.append(np.stack([p[1] for p in per_view], 1)[:keep])
    labels.append(np.asarray(raw["label"])[:keep] if "label" in raw else np.full(keep, -1))
  mean, std, label = np.concatenate(means), np.concatenate(stds), np.concatenate(labels)
  if jax.process_index() == 0:
    _write_records(path, [_row(mean[i], std[i], int(label[i])) for i in range(n)])
  log(f"encoded {n} examples of split {split!r} ({views} view{'s' if views > 1 else ''}) into {path}")


# --- reconstructions --------------------------------------------------------------------------------

def reconstruct_fn(module):
  """Jitted (params, x [B, H, W, C] in [-1, 1]) -> the decoded posterior mean."""
  def rec(params, x):
    mean, _ = module.apply({"params": params}, x, method="encode")
    return module.apply({"params": params}, mean, method="decode")
  return jax.jit(rec)


def held_out(s, n: int | None = None) -> np.ndarray:
  """uint8 held-out images (data.eval_split, else the training split) in the evaluation view."""
  split = s.data.eval_split or s.data.split
  try:
    src = pipeline.open_source(s.data.name, split, s.data.data_dir)
  except pipeline.DataError as e:
    raise ConfigError(f"data.eval_split: {e}") from None
  return pipeline.eval_images(src, len(src) if n is None else min(n, len(src)), s.data.image_size)


def reconstruct(mesh, rec_fn, params, images: np.ndarray, batch: int = 250) -> np.ndarray:
  """uint8 reconstructions of uint8 images, in fixed-size batches (the last padded): one compile."""
  from diffusax.sampling import generate
  x = images.astype(np.float32) / 127.5 - 1.0
  ndev = mesh.devices.size
  batch = -(-min(batch, len(x)) // ndev) * ndev
  sh = mesh_lib.batch_sharding(mesh, 4)
  out = []
  for i in range(0, len(x), batch):
    part = x[i:i + batch]
    pad = batch - len(part)
    if pad:
      part = np.concatenate([part, np.zeros((pad,) + part.shape[1:], np.float32)])
    y = rec_fn(params, jax.device_put(part, sh))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      y = multihost_utils.process_allgather(y, tiled=True)
    out.append(generate.to_uint8(np.asarray(y))[:batch - pad])
  return np.concatenate(out)


def reconstruction_metrics(s, module, mesh, rec_fn, params, features: str | None, logger) -> dict:
  """PSNR, SSIM and rFD of the autoencoder on the held-out split (eval.num_samples of it at most), beside the
  bicubic down-and-up baseline of its factor (evaluation/reconstruction.py)."""
  from diffusax.evaluation import reconstruction
  real = held_out(s, s.eval.num_samples)
  feats = reconstruction.feature_fn(features, s.data.data_dir, s.eval.inception_weights, logger.info)
  fr = feats(real) if feats is not None else None
  rec = reconstruct(mesh, rec_fn, params, real)
  f = module.factor
  return {"examples": int(len(real)), "split": s.data.eval_split or s.data.split, "factor": int(f),
          "autoencoder": reconstruction.metrics(real, rec, feats, fr),
          f"bicubic_x{f}": reconstruction.metrics(real, reconstruction.bicubic(real, f), feats, fr),
          "features": features or ("inception" if s.eval.inception_weights else None)}


# --- decoding samples --------------------------------------------------------------------------------

def decoding(sample_fn: Callable, lat: Latent) -> Callable:
  """fn((params, ae_params), indices, labels, scale) -> images, from a latent sampler of the same call."""
  key = ("decoding", id(sample_fn))
  if key not in lat._cache:  # One wrapper per sampler, so a second job with it does not retrace.
    def fn(params, indices, labels, scale):
      params, ae_params = params
      return lat.to_images(ae_params, sample_fn(params, indices, labels, scale))
    lat._cache[key] = (sample_fn, fn)
  return lat._cache[key][1]


def decoder(lat: Latent) -> Callable:
  """Jitted (ae_params, normalised latents) -> images in about [-1, 1] (one per Latent)."""
  if "decoder" not in lat._cache:
    lat._cache["decoder"] = jax.jit(lat.to_images)
  return lat._cache["decoder"]
