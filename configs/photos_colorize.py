"""Colourisation on the embedded `photos`: the luma (ITU-R BT.601) of each 32x32 crop in, its RGB out.

    python -m diffusax.main --config=configs/photos_colorize.py --workdir=runs/photos_colorize

The U-Net of configs/photos.py with the grey image as an extra input channel. samples.png shows held-out
grey inputs | samples | ground truth; metrics.json the held-out PSNR / SSIM of the samples (`task`).
"""
from diffusax.programs.defaults import sibling_config


def get_config():
  c = sibling_config(__file__, "photos")
  c.task.name = "colorization"
  c.sample.guidance_scale = 0.0            # The label unguided: the grey image carries the content.
  c.eval.metrics = ("fd", "kid", "class_accuracy")  # Bits/dim are not defined for a conditional model here.
  return c
