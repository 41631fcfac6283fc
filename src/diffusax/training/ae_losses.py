"""Per-example losses of the KL autoencoder and its patch discriminator (latent diffusion, stage 1).

Every function returns one value per example, [B]; the caller averages. The conventions are those of
LDM's `LPIPSWithDiscriminator` (Rombach et al. 2022; Esser et al. 2021 for the adversarial weight), so
its published weights (kl_weight 1e-6, disc_weight 0.5) mean the same here:

    rec_b      = sum_pixels |x - x_rec|  (or squared)  [+ perceptual_weight * LPIPS(x, x_rec) * pixels]
    kl_b       = KL(N(mean, exp(logvar)) || N(0, I)) summed over latent entries
               = 1/2 sum (mean^2 + exp(logvar) - 1 - logvar)
    g_b        = -mean_patches D(x_rec)                                  (generator's hinge term)
    d_b        = 1/2 (mean_patches relu(1 - D(x)) + mean_patches relu(1 + D(x_rec)))   (hinge)
    lambda     = clip(||grad_W mean_b rec_b|| / (||grad_W mean_b g_b|| + 1e-4), 0, max_weight)
                 with W the decoder's last layer (Esser et al. 2021, eq. 7), not differentiated
    L_G        = mean_b rec_b + kl_weight mean_b kl_b + disc_weight * lambda * [step >= disc_start] mean_b g_b
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32
REC_LOSSES = ("l1", "l2")


def _sum_per_example(x):
  return jnp.sum(x.reshape(x.shape[0], -1).astype(F32), axis=1)


def _mean_per_example(x):
  return jnp.mean(x.reshape(x.shape[0], -1).astype(F32), axis=1)


def kl_diag_gaussian(mean, logvar):
  """KL(N(mean, diag exp(logvar)) || N(0, I)) per example [B], summed over every latent entry."""
  mean, logvar = mean.astype(F32), logvar.astype(F32)
  return 0.5 * _sum_per_example(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def reconstruction(x, x_rec, kind: str = "l1"):
  """sum over pixels of |x - x_rec| ("l1") or (x - x_rec)^2 ("l2"), per example [B]."""
  if kind not in REC_LOSSES:
    raise ValueError(f"unknown reconstruction loss {kind!r}; allowed: {list(REC_LOSSES)}")
  d = x_rec.astype(F32) - x.astype(F32)
  return _sum_per_example(jnp.abs(d) if kind == "l1" else jnp.square(d))


def generator_hinge(logits_fake):
  """The generator's adversarial term -mean_patches D(x_rec), per example [B]."""
  return -_mean_per_example(logits_fake)


def discriminator_hinge(logits_real, logits_fake):
  """1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))) per example [B] (patch means)."""
  return 0.5 * (_mean_per_example(jax.nn.relu(1.0 - logits_real)) + _mean_per_example(jax.nn.relu(1.0 + logits_fake)))


def adaptive_weight(grad_rec, grad_adv, max_weight: float = 1e4):
  """lambda = clip(||grad_rec|| / (||grad_adv|| + 1e-4), 0, max_weight), not differentiated.

  `grad_rec`, `grad_adv`: gradients of the batch-mean reconstruction and generator terms with respect
  to the decoder's last-layer kernel (arrays or trees of arrays)."""
  norm = lambda g: jnp.sqrt(sum(jnp.sum(jnp.square(v.astype(F32))) for v in jax.tree.leaves(g)))  # noqa: E731
  w = norm(grad_rec) / (norm(grad_adv) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))


def psnr(x, y, data_range: float = 2.0):
  """Peak signal-to-noise ratio in dB per example [B]: 10 log10(range^2 / mean (x - y)^2) (images in [-1, 1]:
  range 2)."""
  mse = _mean_per_example(jnp.square(x.astype(F32) - y.astype(F32)))
  return 10.0 * jnp.log10(data_range ** 2 / jnp.maximum(mse, 1e-20))
