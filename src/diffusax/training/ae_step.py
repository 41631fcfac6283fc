"""The autoencoder's state and its jitted train step (latent diffusion, stage 1).

`AEState` is one immutable pytree of arrays, saved whole by orbax:

    step            int32 scalar: optimizer steps taken
    params          autoencoder parameters (encoder, quant convs, decoder)
    disc_params     patch discriminator parameters ({} without the adversarial term)
    ema_params      tuple of EMAs of the autoencoder parameters (the first is what stage 2 uses)
    opt_state       the autoencoder's optax state
    disc_opt_state  the discriminator's optax state
    rng             uint32 [2] raw key data; step k draws from fold_in(base, k)

One step on a batch x (losses in training/ae_losses.py):
  1. generator: z = mean + exp(logvar / 2) eps (eps from fold_in(base, k)), x_rec = D(z); the loss
     L_G = mean rec + kl_weight mean KL [+ disc_weight lambda mean g after disc_start] and its gradient;
     lambda, the adaptive weight, from the gradients of the mean rec and g terms with respect to the
     decoder's last-layer kernel (the last layer's input held fixed: those are exact gradients, since
     the kernel enters the output only there);
  2. discriminator (after disc_start): the hinge loss on x and on this step's x_rec (from the
     autoencoder's parameters before this step's update: one forward pass serves both updates).
The step comes in two compiled forms, chosen by the caller from the step number: before disc_start
(`adversarial=False`: no discriminator forward pass, no discriminator update, its optimizer state
unchanged) and from it on. (A `lax.cond` on the step inside one program was measured about 40x slower
per step on XLA:CPU than either branch alone: 20-30 s against 0.6 s for configs/photos_autoencoder.py.)
Each is a pure function of (state, batch), so a resumed run that crosses disc_start is bit-identical
to an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from diffusax.nn import autoencoder as ae_nn
from diffusax.training import ae_losses
from diffusax.training import state as state_lib


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AEState:
  step: Any
  params: Any
  disc_params: Any
  ema_params: Any
  opt_state: Any
  disc_opt_state: Any
  rng: Any

  def replace(self, **kw) -> "AEState":
    return dataclasses.replace(self, **kw)


def create(params, disc_params, tx, disc_tx, seed: int, num_ema: int) -> AEState:
  return AEState(step=jnp.zeros((), jnp.int32), params=params, disc_params=disc_params,
                 ema_params=tuple(jax.tree.map(jnp.copy, params) for _ in range(num_ema)),
                 opt_state=tx.init(params), disc_opt_state=disc_tx.init(disc_params),
                 rng=jax.random.key_data(jax.random.key(seed, impl="threefry2x32")))


@dataclasses.dataclass(frozen=True)
class AELossConfig:
  rec_loss: str = "l1"
  kl_weight: float = 1e-6
  disc_weight: float = 0.5
  disc_start: int = 0              # -1: no adversarial term (no discriminator)
  adaptive_max: float = 1e4
  perceptual_weight: float = 0.0   # LPIPS weight (0: off)

  @property
  def adversarial(self) -> bool:
    return self.disc_start >= 0 and self.disc_weight > 0


def with_last_kernel(params, kernel):
  """params with the decoder's last-layer kernel replaced by `kernel`."""
  dec = params["decoder"]
  return {**params, "decoder": {**dec, "conv_out": {**dec["conv_out"], "kernel": kernel}}}


def last_kernel(params):
  node = params
  for k in ae_nn.LAST_LAYER:
    node = node[k]
  return node


def make_ae_step(ae, disc, tx, disc_tx, lr_fn: Callable, disc_lr_fn: Callable, cfg: AELossConfig,
                 ema_decays, ema_warmup: bool = True, lpips_fn: Callable | None = None, adversarial: bool = True):
  """Builds the (unjitted) step `(state, batch, lpips_params) -> (state, metrics)`.

  `adversarial`: the form from cfg.disc_start on (ignored, as False, when cfg.adversarial is False);
  the metrics of both forms have the same keys (the adversarial ones 0 before the start).

  `ae`, `disc`: the Linen autoencoder and patch discriminator; `lpips_fn(lpips_params, x, y) -> [B]`
  (evaluation/lpips.py) when cfg.perceptual_weight > 0, else None (lpips_params is then ignored).
  """
  ema_decays = tuple(float(d) for d in ema_decays)
  perceptual = lpips_fn is not None and cfg.perceptual_weight > 0

  def rec_terms(x, x_rec, lp):
    rec = ae_losses.reconstruction(x, x_rec, cfg.rec_loss)
    if perceptual:  # LDM adds the image's LPIPS at every pixel before the sum over pixels.
      rec = rec + cfg.perceptual_weight * lpips_fn(lp, x, x_rec) * (x[0].size // x.shape[-1])
    return rec

  def gen_loss(params, disc_params, x, eps, lp, adversarial: bool):
    mean, logvar = ae.apply({"params": params}, x, method="encode")
    z = mean + jnp.exp(0.5 * logvar) * eps
    h = ae.apply({"params": params}, z, method="decode_features")
    x_rec = ae_nn.last_layer(params, h)
    rec = jnp.mean(rec_terms(x, x_rec, lp))
    kl = jnp.mean(ae_losses.kl_diag_gaussian(mean, logvar))
    loss = rec + cfg.kl_weight * kl
    zero = jnp.zeros((), jnp.float32)
    g, lam = zero, zero
    if adversarial:
      g = jnp.mean(ae_losses.generator_hinge(disc.apply({"params": disc_params}, x_rec)))
      hs, kernel = jax.lax.stop_gradient(h), last_kernel(params)
      out = lambda k: ae_nn.last_layer(with_last_kernel(params, k), hs)  # noqa: E731
      g_rec = jax.grad(lambda k: jnp.mean(rec_terms(x, out(k), lp)))(kernel)
      g_adv = jax.grad(lambda k: jnp.mean(ae_losses.generator_hinge(disc.apply({"params": disc_params}, out(k)))))(kernel)
      lam = ae_losses.adaptive_weight(g_rec, g_adv, cfg.adaptive_max)
      loss = loss + cfg.disc_weight * lam * g
    return loss, {"rec": rec, "kl": kl, "g_loss": g, "d_weight": lam, "x_rec": x_rec}

  def disc_update(state, x, x_rec):
    def d_loss(dp):
      real = disc.apply({"params": dp}, x)
      fake = disc.apply({"params": dp}, jax.lax.stop_gradient(x_rec))
      return jnp.mean(ae_losses.discriminator_hinge(real, fake)), (jnp.mean(real), jnp.mean(fake))

    (value, (real, fake)), grads = jax.value_and_grad(d_loss, has_aux=True)(state.disc_params)
    updates, opt = disc_tx.update(grads, state.disc_opt_state, state.disc_params)
    return optax.apply_updates(state.disc_params, updates), opt, {"d_loss": value, "logits_real": real,
                                                                   "logits_fake": fake}

  def step(state: AEState, batch: dict, lpips_params=None):
    x = batch["x"].astype(jnp.float32)
    key = jax.random.fold_in(state_lib.base_key(state), state.step)
    f = ae.factor
    eps = jax.random.normal(key, (x.shape[0], x.shape[1] // f, x.shape[2] // f, ae.z_channels), jnp.float32)

    on = cfg.adversarial and adversarial
    (loss, aux), grads = jax.value_and_grad(gen_loss, has_aux=True)(state.params, state.disc_params, x, eps,
                                                                    lpips_params, on)
    x_rec = aux.pop("x_rec")
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state_lib.update_ema(state.ema_params, params, ema_decays, state.step, ema_warmup)
    metrics = {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads), "lr": lr_fn(state.step),
               "psnr": jnp.mean(ae_losses.psnr(x, x_rec))}
    disc_params, disc_opt = state.disc_params, state.disc_opt_state
    if cfg.adversarial:
      zero = jnp.zeros((), jnp.float32)
      dm = {"d_loss": zero, "logits_real": zero, "logits_fake": zero}
      if on:
        disc_params, disc_opt, dm = disc_update(state, x, x_rec)
      metrics.update(dm, disc_lr=disc_lr_fn(state.step))
    new = state.replace(step=state.step + 1, params=params, disc_params=disc_params, ema_params=ema,
                        opt_state=opt_state, disc_opt_state=disc_opt)
    return new, metrics

  return step
