"""Latent diffusion, stage 2: a class-conditional U-Net on the 8x8x8 latents of configs/photos_autoencoder.py.

    python -m diffusax.main --config=configs/photos_autoencoder.py --workdir=runs/photos_ae
    python -m diffusax.main --config=configs/photos_latent.py --workdir=runs/photos_latent \
        --config.latent.autoencoder_workdir=runs/photos_ae
    python -m diffusax.main --config=configs/photos_latent.py --workdir=runs/photos_latent \
        --config.latent.autoencoder_workdir=runs/photos_ae --mode=eval

The training split is encoded once (posterior mean and std of each crop and of its mirror image, into
runs/photos_ae/latents/); each step draws z ~ q(z|x), normalised per channel by the autoencoder's
latent statistics. Samples are decoded: samples.png, --mode=sample's shards and --mode=eval's
fd_photos / class accuracy are of 32x32 images. Likelihoods (bpd) are not defined for a latent model.
"""
from diffusax.programs.defaults import base_config


def get_config():
  c = base_config()
  c.data.name = "photos"
  c.data.random_flip = True                  # Both orientations are encoded; each draw picks one.
  c.data.eval_split = "test"
  c.latent.autoencoder_workdir = "runs/photos_ae"
  c.latent.normalize = "channel"
  c.diffusion.schedule = "vp_cosine"
  c.diffusion.target = "v"
  c.model.name = "unet"
  c.model.unet.base_channels = 64            # 8x8 -> 4x4: cheap at this size, so wider than the pixel model.
  c.model.unet.channel_mult = (1, 2)
  c.model.unet.num_res_blocks = 1
  c.model.unet.attn_resolutions = (4,)
  c.model.unet.num_heads = 4
  c.model.unet.num_groups = 16
  c.model.unet.dropout = 0.0
  c.model.class_conditional = True
  c.guidance.label_dropout = 0.1
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.optim.decay = "cosine"
  c.optim.end_lr_factor = 0.05
  c.ema.decays = (0.999,)
  c.train.batch_size = 64
  c.train.num_steps = 1500
  c.train.log_every = 100
  c.train.eval_every = 500
  c.train.ckpt_every = 500
  c.sample.method = "dpm_solver_pp_2m"
  c.sample.num_steps = 30
  c.sample.guidance_scale = 1.0
  c.sample.per_class = 10
  c.eval.metrics = ("fd", "kid", "class_accuracy")
  c.eval.num_samples = 500
  c.eval.kid_subset_size = 500
  return c
