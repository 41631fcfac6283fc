"""Latent diffusion at 256x256, stage 2 for accelerator users: class-conditional DiT-B/2 on the 32x32x4
latents of configs/imagenet256_autoencoder.py (Peebles & Xie 2023's latent DiT, with CFG).

    python -m diffusax.main --config=configs/imagenet256_latent.py --workdir=$RUN \
        --config.data.data_dir=$DATA --config.latent.autoencoder_workdir=$AE
    python -m diffusax.main --config=configs/imagenet256_latent.py --workdir=$RUN --mode=eval \
        --config.data.data_dir=$DATA --config.latent.autoencoder_workdir=$AE \
        --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth

The first run encodes ImageNet's training split once (posterior mean and std of each image and its
mirror image) into $AE/latents/; samples are decoded by the autoencoder. Not run here: documented for
accelerators (mesh over all devices; fsdp for larger DiTs).
"""
from diffusax.programs.defaults import base_config


def get_config():
  c = base_config()
  c.data.name = "imagenet2012"
  c.data.split = "train"
  c.data.eval_split = "validation"
  c.data.image_size = 256
  c.data.random_flip = True
  c.latent.autoencoder_workdir = ""        # The stage-1 workdir (required).
  c.latent.normalize = "channel"
  c.diffusion.schedule = "vp_linear"
  c.diffusion.target = "eps"
  c.model.name = "dit"
  c.model.dit.patch_size = 2               # DiT-B/2: 256 tokens of the 32x32 latent.
  c.model.dit.hidden_size = 768
  c.model.dit.depth = 12
  c.model.dit.num_heads = 12
  c.model.class_conditional = True
  c.guidance.label_dropout = 0.1
  c.optim.lr = 1e-4
  c.ema.decays = (0.9999,)
  c.train.batch_size = 256
  c.train.num_steps = 400000
  c.train.eval_every = 50000
  c.train.ckpt_every = 10000
  c.sample.method = "dpm_solver_pp_2m"
  c.sample.num_steps = 50
  c.sample.guidance_scale = 1.5
  c.eval.metrics = ("fd", "kid", "class_accuracy")
  c.eval.features = "inception"
  c.eval.num_samples = 10000
  c.mesh.shape = (-1, 1)
  return c
