"""The first stage of configs/photos_cascade.py: a class-conditional U-Net on the embedded `photos` at 16x16.

    python -m diffusax.main --config=configs/photos_base16.py --workdir=runs/photos_base16

configs/photos.py with the crops resized to 16x16 (area) and a two-level U-Net (16 -> 8).
"""
from diffusax.programs.defaults import sibling_config


def get_config():
  c = sibling_config(__file__, "photos")
  c.data.image_size = 16                   # 32x32 crops resized to 16x16.
  c.model.unet.channel_mult = (1, 2)       # 16x16 -> 8x8.
  c.model.unet.attn_resolutions = (8,)
  return c
