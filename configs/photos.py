"""A class-conditional U-Net on the embedded RGB `photos` (32x32 crops of 10 photographs), with CFG.

    python -m diffusax.main --config=configs/photos.py --workdir=runs/photos

Builds the photos as a local TFDS dataset on first use (data/photos.py: no network, a few seconds),
trains 900 steps (826 s in all, 13.8 min, on 2 idle CPU cores at 1.4 steps/s, the dataset's
build included; see the README), and writes samples.png (one row per class, EMA params,
classifier-free guidance) and metrics.json into the workdir. `--mode=eval` reports fd_photos /
kid_photos on the photos classifier's features against half A of the test crops (half B: the
real-data baseline) and the class accuracy of conditional samples.
"""
from diffusax.programs.defaults import base_config


def get_config():
  c = base_config()
  c.data.name = "photos"                   # Embedded: 4000 train / 1000 test 32x32 RGB crops, 10 classes.
  c.data.random_flip = True                # Horizontal flips: a flipped crop is still from its photograph.
  c.diffusion.schedule = "vp_cosine"       # Continuous cosine schedule.
  c.diffusion.target = "v"                 # v-prediction: well-conditioned at both ends of t.
  c.diffusion.weighting = "uniform"        # Plain MSE on v.
  c.model.name = "unet"
  c.model.unet.base_channels = 32          # Small ADM U-Net: 32x32 -> 16x16 -> 8x8.
  c.model.unet.channel_mult = (1, 2, 2)
  c.model.unet.num_res_blocks = 1
  c.model.unet.attn_resolutions = (8,)
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
  c.train.batch_size = 32
  c.train.num_steps = 900
  c.train.log_every = 100
  c.train.eval_every = 450
  c.train.ckpt_every = 450
  c.sample.method = "dpm_solver_pp_2m"
  c.sample.num_steps = 30
  c.sample.guidance_scale = 1.0            # guided = cond + w (cond - uncond).
  c.sample.per_class = 10
  c.eval.num_samples = 500                 # As many as a real half of the 1000 test crops.
  c.eval.kid_subset_size = 500
  return c
