"""Latent diffusion, stage 1 at f = 8: a KL autoencoder on the embedded 64x64 RGB `photos64`.

    python -m diffusax.main --config=configs/photos64_autoencoder.py --workdir=runs/photos64_ae

64x64x3 -> 8x8x4 latents (48x fewer values); otherwise as configs/photos_autoencoder.py.
"""
from diffusax.programs.defaults import sibling_config


def get_config():
  c = sibling_config(__file__, "photos_autoencoder")
  c.data.name = "photos64"
  c.autoencoder.net.block_out_channels = (32, 64, 64, 64)  # 4 levels: f = 8.
  c.autoencoder.disc.num_layers = 3
  c.train.batch_size = 16
  return c
