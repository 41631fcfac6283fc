"""Trained inpainting on the embedded `photos` (GLIDE-style: the masked image and the mask as inputs).

    python -m diffusax.main --config=configs/photos_inpaint.py --workdir=runs/photos_inpaint

Holes are one box or free-form strokes ("mixed"), drawn from (seed, example index): the held-out masks are
fixed. samples.png shows held-out masked inputs (holes mid-grey) | samples | ground truth; metrics.json
the held-out PSNR / SSIM of the completed images and the error on the known pixels (`task`).
"""
from diffusax.programs.defaults import sibling_config


def get_config():
  c = sibling_config(__file__, "photos")
  c.task.name = "inpainting"
  c.task.mask_kind = "mixed"               # One box or free-form strokes, probability 1/2 each.
  c.sample.guidance_scale = 0.0
  c.eval.metrics = ("fd", "kid", "class_accuracy")  # Bits/dim are not defined for a conditional model here.
  return c
