"""A two-stage cascade on the embedded `photos` (Ho et al. 2021, CDM): configs/photos_base16.py generates
16x16 crops from class labels, configs/photos_sr.py upsamples them to 32x32.

    python -m diffusax.main --config=configs/photos_base16.py --workdir=runs/photos_base16
    python -m diffusax.main --config=configs/photos_sr.py --workdir=runs/photos_sr
    python -m diffusax.main --config=configs/photos_cascade.py --workdir=runs/photos_sr --mode=sample
    python -m diffusax.main --config=configs/photos_cascade.py --workdir=runs/photos_sr --mode=eval

--workdir is the super-resolution stage's; cascade.base_workdir names the base stage's. Sample i of the
job is the base stage's sample i (label i mod 10, its own noise stream) upsampled by the second stage
with its condition at q(z_s | z), s = sample.aug_level (cascade.truncated=True: the base stops at s and
its x_s is the condition). The shards hold both; samples.png shows each 16x16 sample over its 32x32
result; --mode=eval gives fd_photos and class accuracy of the 32x32 samples.
"""
from diffusax.programs.defaults import sibling_config


def get_config():
  c = sibling_config(__file__, "photos_sr")
  c.cascade.base_workdir = "runs/photos_base16"  # The base stage (configs/photos_base16.py).
  c.cascade.base_guidance_scale = 1.0      # CFG on the label in the base stage (as configs/photos.py samples).
  c.sample.aug_level = 0.1                 # The second stage's condition level.
  return c
