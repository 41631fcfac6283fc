"""A small, briefly trained digits U-Net: the guiding model of autoguidance for configs/digits.py.

    python -m diffusax.main --config=configs/digits_small.py --workdir=runs/digits_small
    python -m diffusax.main --config=configs/digits.py --workdir=runs/digits --mode=eval \
        --config.sample.guide_workdir=runs/digits_small --config.sample.guidance_scale=1

Autoguidance (Karras et al. 2024) guides a model with a weaker version of itself
trained on the same data with the same schedule and conditioning: here 1/8 of the
main model's parameters (base 16 channels, one ResBlock per level) and 1/4 of its
steps. Everything else is configs/digits.py.
"""
from diffusax.programs.defaults import sibling_config


def get_config():
  c = sibling_config(__file__, "digits")
  c.model.unet.base_channels = 16          # 16-32 channels, one ResBlock per level (~0.14M params).
  c.model.unet.num_res_blocks = 1
  c.model.unet.num_groups = 4
  c.train.num_steps = 500                  # A quarter of the main model's steps.
  c.train.eval_every = 0
  c.train.ckpt_every = 500
  c.optim.warmup_steps = 50
  return c
