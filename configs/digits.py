"""The embedded default: a class-conditional U-Net on scikit-learn's 8x8 digits, with CFG.

    python -m diffusax.main --config=configs/digits.py --workdir=runs/digits

Builds the digits as a local TFDS dataset on first use (no network), trains on
2 CPU cores in a few minutes, and writes samples.png (one row per class, EMA
params, classifier-free guidance) and metrics.json into the workdir.
"""
from diffusax.programs.defaults import base_config


def get_config():
  c = base_config()
  c.data.name = "sklearn_digits"           # Embedded: 1437 train / 360 test 8x8 grey digits.
  c.diffusion.schedule = "vp_cosine"       # Continuous cosine schedule.
  c.diffusion.target = "v"                 # v-prediction: well-conditioned at both ends of t.
  c.diffusion.weighting = "uniform"        # Plain MSE on v.
  c.model.name = "unet"
  c.model.unet.base_channels = 32          # Small ADM U-Net (1.1M params): 8x8 -> 4x4.
  c.model.unet.channel_mult = (1, 2)
  c.model.unet.num_res_blocks = 2
  c.model.unet.attn_resolutions = (4,)
  c.model.unet.num_heads = 2
  c.model.unet.num_groups = 8
  c.model.unet.dropout = 0.0
  c.model.unet.remat = False               # Recompute ResBlock activations in backward: less activation
                                           # memory for one more forward pass (not part of the checkpoint signature).
  c.model.class_conditional = True         # Labels with a null class for CFG.
  c.guidance.label_dropout = 0.1
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.optim.decay = "cosine"
  c.optim.end_lr_factor = 0.05
  c.ema.decays = (0.999,)
  c.train.batch_size = 64
  c.train.num_steps = 2000
  c.train.log_every = 100
  c.train.eval_every = 1000
  c.train.ckpt_every = 1000
  c.sample.method = "dpm_solver_pp_2m"
  c.sample.num_steps = 30
  c.sample.guidance_scale = 1.0            # guided = cond + w (cond - uncond).
  c.sample.per_class = 10
  return c
