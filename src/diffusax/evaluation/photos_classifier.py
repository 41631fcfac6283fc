"""A small classifier for the embedded RGB `photos`: features for a photos Fréchet distance / KID
and predictions for the class accuracy of conditional samples.

    x [B, 32, 32, 3] in [-1, 1] -> (logits [B, 10], features [B, 128])
    (64x64 input, `photos64`, is first reduced to 32x32 by 2x2 block means)

2x2 means (16x16x3) -> conv3x3/2(32) -> ReLU -> conv3x3/2(64) -> ReLU -> conv3x3(64) -> ReLU
-> flatten (4x4x64) -> Dense(128) -> ReLU (the features) -> Dense(10). (A CNN at full 32x32
resolution trained several times slower on the shared 2-core CPU; an MLP reached only 62-66%.) Trained with AdamW on the `photos` train split
(4000 crops) with random horizontal flips and random shifts of up to 2 pixels (edge padding), for
a fixed number of steps from a fixed seed, so the same (version, seed) gives the same parameters.
The parameters are cached as flax msgpack in `<data_dir>/diffusax_photos_classifier/` next to the
dataset; a cached file is trusted only if its JSON side-car names the same version, seed and steps.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusax import storage
from diffusax.evaluation import classifier_cache

VERSION = "v1"
NUM_CLASSES = 10
FEATURE_DIM = 128
SIZE = 32
TRAIN_STEPS = 600
BATCH = 64
SHIFT = 2
DEFAULT_COMPILER_OPTIONS = (("xla_backend_optimization_level", 2), ("xla_llvm_disable_expensive_passes", False))


class PhotosNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    b = x.shape[0]
    x = x.reshape(b, 16, 2, 16, 2, 3).mean(axis=(2, 4))  # 2x2 means: 16x16x3.
    x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))  # 8x8x32
    x = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2))(x))  # 4x4x64
    x = nn.relu(nn.Conv(64, (3, 3))(x)).reshape(b, -1)    # 4x4x64 -> 1024
    feats = nn.relu(nn.Dense(FEATURE_DIM)(x))
    return nn.Dense(NUM_CLASSES)(feats), feats


def to_input(images) -> np.ndarray:
  """uint8 or float [-1, 1] images [B, 32k, 32k, 3] -> float32 [B, 32, 32, 3] in [-1, 1] (k x k block means)."""
  x = np.asarray(images)
  x = x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32)
  b, h, w, c = x.shape
  if h != w or h % SIZE or c != 3:
    raise ValueError(f"the photos classifier takes RGB images of side a multiple of {SIZE}, got {x.shape}")
  k = h // SIZE
  return x.reshape(b, SIZE, k, SIZE, k, c).mean(axis=(2, 4)) if k > 1 else x


def load_split(data_dir: str, split: str, name: str = "photos") -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images [N, S, S, 3], int32 labels [N]) of an embedded photos set."""
  from diffusax.data import pipeline
  src = pipeline.open_source(name, split, data_dir)
  batch = pipeline.read(src, np.arange(len(src)))
  return np.asarray(batch["image"], np.uint8), np.asarray(batch["label"], np.int32)


def _augment(x, key):
  """Random horizontal flip and a random shift by up to SHIFT pixels (edge padding), per image."""
  b = x.shape[0]
  kf, ks = jax.random.split(key)
  flip = jax.random.bernoulli(kf, 0.5, (b,))
  x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
  pad = jnp.pad(x, ((0, 0), (SHIFT, SHIFT), (SHIFT, SHIFT), (0, 0)), mode="edge")
  off = jax.random.randint(ks, (b, 2), 0, 2 * SHIFT + 1)
  return jax.vmap(lambda p, o: jax.lax.dynamic_slice(p, (o[0], o[1], 0), x.shape[1:]))(pad, off)


def train(images, labels, seed: int = 0, steps: int = TRAIN_STEPS):
  """Trains PhotosNet on uint8 images [N, 32, 32, 3] and labels [N]; returns params."""
  net = PhotosNet()
  x_all = jnp.asarray(to_input(images))
  y_all = jnp.asarray(labels, jnp.int32)
  key = jax.random.key(seed)
  params = net.init(jax.random.fold_in(key, 0), x_all[:1])["params"]
  tx = optax.adamw(optax.cosine_decay_schedule(3e-3, steps), weight_decay=1e-4)
  opt = tx.init(params)

  def loss_fn(p, x, y):
    logits, _ = net.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, i):  # The data are a carried argument, not a closed-over constant (XLA would fold 49 MB).
    p, o, x_all, y_all = carry
    k = jax.random.fold_in(key, i + 1)
    idx = jax.random.randint(jax.random.fold_in(k, 0), (BATCH,), 0, x_all.shape[0])
    x = _augment(x_all[idx], jax.random.fold_in(k, 1))
    g = jax.grad(loss_fn)(p, x, y_all[idx])
    upd, o = tx.update(g, o, p)
    return (optax.apply_updates(p, upd), o, x_all, y_all), None

  carry = (params, opt, x_all, y_all)
  # Execution-bound (hundreds of steps in one scan): compiled at XLA's default CPU optimisation level even
  # where a process lowers the level for faster compiles (the test suite), so the cached parameters and
  # the time to train them are the same everywhere.
  run = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(steps))).lower(carry).compile(
      compiler_options=dict(DEFAULT_COMPILER_OPTIONS))
  (params, *_), _ = run(carry)
  return params


@jax.jit
def _apply(params, x):
  return PhotosNet().apply({"params": params}, x)


def apply(params, x, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
  """x [N, 32k, 32k, 3] (uint8, or float in [-1, 1]) -> (logits [N, 10], features [N, 128]) numpy.

  Fixed batches (the last one padded) so that any N compiles once.
  """
  x = to_input(x)
  n = len(x)
  pad = (-n) % batch_size
  x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], np.float32)]) if pad else x
  outs = [_apply(params, jnp.asarray(x[i:i + batch_size])) for i in range(0, len(x), batch_size)]
  return (np.concatenate([np.asarray(o[0]) for o in outs])[:n], np.concatenate([np.asarray(o[1]) for o in outs])[:n])


def cache_path(data_dir: str, seed: int = 0) -> str:
  return storage.join(storage.resolve(data_dir), "diffusax_photos_classifier", f"{VERSION}_seed{seed}.msgpack")


def load_or_train(data_dir: str, seed: int = 0, log=print):
  """Cached params for (VERSION, seed), training and caching them on first use (~seconds on CPU).

  Returns (params, info) with info = {"test_accuracy", "version", "seed", "steps", "path"}.
  """
  want = {"version": VERSION, "seed": seed, "steps": TRAIN_STEPS}
  template = PhotosNet().init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]

  def train_and_score():
    images, labels = load_split(data_dir, "train")
    params = train(images, labels, seed, steps=TRAIN_STEPS)
    ti, tl = load_split(data_dir, "test")
    return params, np.mean(np.argmax(apply(params, ti)[0], -1) == tl)

  return classifier_cache.load_or_train(cache_path(data_dir, seed), want, template, train_and_score, log, "photos")


def real_halves(data_dir: str, seed: int = 0, name: str = "photos") -> tuple[np.ndarray, np.ndarray]:
  """The test crops of `name` (photos or photos64; uint8) in two random disjoint halves (A: 500, B: 500)."""
  x, _ = load_split(data_dir, "test", name)
  perm = np.random.default_rng([seed, 0xF070]).permutation(len(x))
  h = (len(x) + 1) // 2
  return x[perm[:h]], x[perm[h:]]
