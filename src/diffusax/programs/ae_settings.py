"""The settings of latent diffusion: stage 1 (`autoencoder.*`, programs/autoencoder.py) and stage 2
(`latent.*`, programs/setup_latent.py). See programs/defaults.py for each field."""
from __future__ import annotations

import dataclasses

from diffusax.programs.errors import ConfigError, positive

STAGES = ("diffusion", "autoencoder")
NORMALIZATIONS = ("channel", "scalar", "none")


@dataclasses.dataclass(frozen=True)
class AESettings:
  net: dict = dataclasses.field(default_factory=dict)   # AutoencoderKL options
  disc: dict = dataclasses.field(default_factory=dict)  # PatchDiscriminator options
  rec_loss: str = "l1"
  kl_weight: float = 1e-6
  disc_weight: float = 0.5
  disc_start: int = 0
  disc_lr: float = 0.0
  adaptive_max: float = 1e4
  perceptual_weight: float = 1.0
  lpips_vgg_weights: str = ""
  lpips_lin_weights: str = ""
  init_from: str = ""
  grid_examples: int = 8

  @property
  def adversarial(self) -> bool:
    return self.disc_start >= 0 and self.disc_weight > 0

  @property
  def perceptual(self) -> bool:
    return bool(self.lpips_vgg_weights) and self.perceptual_weight > 0

  def model_settings(self) -> dict:
    """What identifies the autoencoder in a checkpoint (and how stage 2 rebuilds it)."""
    from diffusax.programs.settings import _jsonable
    return {"name": "autoencoder", "kwargs": _jsonable(dict(self.net)), "disc": _jsonable(dict(self.disc))
            if self.adversarial else None}


@dataclasses.dataclass(frozen=True)
class LatentSettings:
  autoencoder_workdir: str = ""
  autoencoder_step: int = -1
  normalize: str = "channel"
  sample_posterior: bool = True

  @property
  def enabled(self) -> bool:
    return bool(self.autoencoder_workdir)


def parse_stage(c) -> str:
  if c.stage not in STAGES:
    raise ConfigError(f"unknown stage {c.stage!r}; allowed: {list(STAGES)}")
  return c.stage


def parse_autoencoder(c) -> AESettings:
  a = c.autoencoder
  from diffusax.training import ae_losses
  if a.rec_loss not in ae_losses.REC_LOSSES:
    raise ConfigError(f"unknown autoencoder.rec_loss {a.rec_loss!r}; allowed: {list(ae_losses.REC_LOSSES)}")
  for key in ("kl_weight", "disc_weight", "perceptual_weight", "disc_lr"):
    if not float(a[key]) >= 0:
      raise ConfigError(f"autoencoder.{key} must be >= 0, got {a[key]!r}")
  if not float(a.adaptive_max) > 0:
    raise ConfigError(f"autoencoder.adaptive_max must be > 0, got {a.adaptive_max!r}")
  if int(a.disc_start) < -1:
    raise ConfigError(f"autoencoder.disc_start must be a step >= 0, or -1 for no adversarial term; got {a.disc_start}")
  if a.lpips_lin_weights and not a.lpips_vgg_weights:
    raise ConfigError("autoencoder.lpips_lin_weights needs autoencoder.lpips_vgg_weights (the VGG-16 backbone)")
  return AESettings(net=dict(a.net), disc=dict(a.disc), rec_loss=a.rec_loss, kl_weight=float(a.kl_weight),
                    disc_weight=float(a.disc_weight), disc_start=int(a.disc_start), disc_lr=float(a.disc_lr),
                    adaptive_max=float(a.adaptive_max), perceptual_weight=float(a.perceptual_weight),
                    lpips_vgg_weights=str(a.lpips_vgg_weights), lpips_lin_weights=str(a.lpips_lin_weights),
                    init_from=str(a.init_from), grid_examples=positive("autoencoder.grid_examples", a.grid_examples))


def parse_latent(c) -> LatentSettings:
  lt = c.latent
  if lt.normalize not in NORMALIZATIONS:
    raise ConfigError(f"unknown latent.normalize {lt.normalize!r}; allowed: {list(NORMALIZATIONS)}")
  if lt.autoencoder_workdir and c.stage != "diffusion":
    raise ConfigError("latent.autoencoder_workdir is for the diffusion model of stage 2 (stage='diffusion'); "
                      "an autoencoder run does not read another autoencoder")
  return LatentSettings(autoencoder_workdir=str(lt.autoencoder_workdir), autoencoder_step=int(lt.autoencoder_step),
                        normalize=lt.normalize, sample_posterior=bool(lt.sample_posterior))
