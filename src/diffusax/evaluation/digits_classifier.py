"""A small classifier for the embedded 8x8 digits: features for a digits
Fréchet distance and predictions for the class accuracy of conditional samples.

    x [B, 8, 8, 1] in [-1, 1] -> (logits [B, 10], features [B, 128])

flatten -> Dense(512) -> ReLU -> Dense(128) -> ReLU (the features) -> Dense(10)
(an MLP: it trains in seconds on a CPU, where a small CNN took minutes). Trained with AdamW on the `train` split
(1437 images) with random one-pixel shifts, for a fixed number of steps from a
fixed seed, so the same (version, seed) gives the same parameters. The
parameters are cached as flax msgpack in `<data_dir>/diffusax_digits_classifier/`
next to the dataset; a cached file is trusted only if its JSON side-car names
the same version, seed and step count.
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
TRAIN_STEPS = 3000
BATCH = 128


class DigitsNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(512)(x))
    feats = nn.relu(nn.Dense(FEATURE_DIM)(x))
    return nn.Dense(NUM_CLASSES)(feats), feats


def to_float(images_uint8) -> np.ndarray:
  """uint8 [B, 8, 8, 1] -> float32 in [-1, 1] (the diffusion data scaling)."""
  return np.asarray(images_uint8, np.float32) / 127.5 - 1.0


def load_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images [N, 8, 8, 1], int32 labels [N]) of the embedded digits."""
  from diffusax.data import pipeline
  src = pipeline.open_source("sklearn_digits", split, data_dir)
  batch = pipeline.read(src, np.arange(len(src)))
  return np.asarray(batch["image"], np.uint8), np.asarray(batch["label"], np.int32)


def _shift(x, key):
  """Random translation by up to one pixel (zero = -1 padding), per image."""
  b = x.shape[0]
  pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
  off = jax.random.randint(key, (b, 2), 0, 3)
  return jax.vmap(lambda p, o: jax.lax.dynamic_slice(p, (o[0], o[1], 0), x.shape[1:]))(pad, off)


def train(images, labels, seed: int = 0, steps: int = TRAIN_STEPS):
  """Trains DigitsNet on uint8 images [N, 8, 8, 1] and labels [N]; returns params."""
  net = DigitsNet()
  x_all = jnp.asarray(to_float(images))
  y_all = jnp.asarray(labels, jnp.int32)
  key = jax.random.key(seed)
  params = net.init(jax.random.fold_in(key, 0), x_all[:1])["params"]
  tx = optax.adamw(optax.cosine_decay_schedule(3e-3, steps), weight_decay=1e-4)
  opt = tx.init(params)

  def loss_fn(p, x, y):
    logits, _ = net.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, i):
    p, o = carry
    k = jax.random.fold_in(key, i + 1)
    idx = jax.random.randint(jax.random.fold_in(k, 0), (BATCH,), 0, x_all.shape[0])
    x = _shift(x_all[idx], jax.random.fold_in(k, 1))
    g = jax.grad(loss_fn)(p, x, y_all[idx])
    upd, o = tx.update(g, o, p)
    return (optax.apply_updates(p, upd), o), None

  (params, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(steps)))((params, opt))
  return params


@jax.jit
def _apply(params, x):
  return DigitsNet().apply({"params": params}, x)


def apply(params, x, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """x float [N, 8, 8, 1] in [-1, 1] (or uint8) -> (logits [N, 10], features [N, 128]) numpy."""
  x = np.asarray(x)
  if x.dtype == np.uint8:
    x = to_float(x)
  outs = [_apply(params, jnp.asarray(x[i:i + batch_size], jnp.float32)) for i in range(0, len(x), batch_size)]
  return (np.concatenate([np.asarray(o[0]) for o in outs]), np.concatenate([np.asarray(o[1]) for o in outs]))


def cache_path(data_dir: str, seed: int = 0) -> str:
  return storage.join(storage.resolve(data_dir), "diffusax_digits_classifier", f"{VERSION}_seed{seed}.msgpack")


def load_or_train(data_dir: str, seed: int = 0, log=print):
  """Cached params for (VERSION, seed), training and caching them on first use (~seconds on CPU).

  Returns (params, info) with info = {"test_accuracy", "version", "seed", "steps", "path"}.
  """
  want = {"version": VERSION, "seed": seed, "steps": TRAIN_STEPS}
  template = DigitsNet().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]

  def train_and_score():
    images, labels = load_split(data_dir, "train")
    params = train(images, labels, seed, steps=TRAIN_STEPS)
    ti, tl = load_split(data_dir, "test")
    return params, np.mean(np.argmax(apply(params, ti)[0], -1) == tl)

  return classifier_cache.load_or_train(cache_path(data_dir, seed), want, template, train_and_score, log, "digits")


def real_halves(data_dir: str, seed: int = 0, name: str = "sklearn_digits") -> tuple[np.ndarray, np.ndarray]:
  """All 1797 real digits (train + test, uint8) split into two random halves (A: 899, B: 898)."""
  if name != "sklearn_digits":
    raise ValueError(f"the digits classifier's real halves are those of sklearn_digits, not {name!r}")
  a, _ = load_split(data_dir, "train")
  b, _ = load_split(data_dir, "test")
  x = np.concatenate([a, b])
  perm = np.random.default_rng([seed, 0xD161]).permutation(len(x))
  h = (len(x) + 1) // 2
  return x[perm[:h]], x[perm[h:]]
