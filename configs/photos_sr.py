"""Super-resolution 16 -> 32 on the embedded `photos` (the second stage of configs/photos_cascade.py), with
noise-conditioning augmentation (Ho et al. 2021, CDM sec. 4.3).

    python -m diffusax.main --config=configs/photos_sr.py --workdir=runs/photos_sr

Each 32x32 crop is the target; its 16x16 area average is the condition, corrupted in training to
q(z_s | z) with s ~ U[0, 0.5] (the network sees s) and given at sample.aug_level at sampling. The same
class-conditional U-Net as configs/photos.py, with the condition resized bilinearly to 32x32 and
concatenated to its input. Writes samples.png (held-out 16x16 inputs | samples | ground truth) and
metrics.json with held-out PSNR / SSIM of the samples against bicubic upsampling of the same inputs
(`task`). Timing and figures: README, "Image-conditioned diffusion".
"""
from diffusax.programs.defaults import sibling_config


def get_config():
  c = sibling_config(__file__, "photos")    # Data, U-Net, schedule, optimizer and sampler of configs/photos.py.
  c.task.name = "super_resolution"
  c.task.factor = 2                        # 32x32 targets from 16x16 conditions.
  c.task.aug_max = 0.5                     # Training condition at q(z_s | z), s ~ U[0, 0.5] (vp_cosine time).
  c.sample.aug_level = 0.1                 # The condition's level at sampling (the ablation sweeps it).
  c.sample.guidance_scale = 0.0            # The label unguided: the condition image carries the content.
  c.eval.metrics = ("fd", "kid", "class_accuracy")  # Bits/dim are not defined for a conditional model here.
  return c
