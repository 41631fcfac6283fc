"""Latent diffusion at 256x256, stage 1 for accelerator users: the published Stable Diffusion kl-f8
autoencoder imported as a stage-1 workdir (no training), with its latent statistics on ImageNet.

Prepare ImageNet once (needs the manual download, network and TensorFlow; array_record format):
    pip install tensorflow-cpu && tfds build imagenet2012 --data_dir=$DATA --file_format=array_record
Get the VAE weights (e.g. a diffusers `vae/` folder with diffusion_pytorch_model.safetensors and
config.json; `pip install safetensors`), then:
    python -m diffusax.main --config=configs/imagenet256_autoencoder.py --workdir=$AE \
        --config.data.data_dir=$DATA --config.autoencoder.init_from=$VAE_FOLDER

train.num_steps=0 imports the weights (checked against config.json and every tensor's shape), writes the
checkpoint, then one pass over the training split gives latent_stats.json (the per-channel statistics
and LDM's scalar 1 / std of *these* latents, instead of the hard-coded 0.18215). Set train.num_steps > 0
(and autoencoder.lpips_vgg_weights) to fine-tune it instead. Not run here: documented for accelerators.
"""
from diffusax.programs.defaults import base_config


def get_config():
  c = base_config()
  c.stage = "autoencoder"
  c.data.name = "imagenet2012"
  c.data.split = "train"
  c.data.eval_split = "validation"
  c.data.image_size = 256                  # Centre square resized to 256.
  c.autoencoder.net.block_out_channels = (128, 256, 512, 512)  # kl-f8: 83.65M parameters.
  c.autoencoder.net.layers_per_block = 2
  c.autoencoder.net.z_channels = 4
  c.autoencoder.net.norm_groups = 32
  c.autoencoder.disc.base_channels = 64
  c.autoencoder.disc.num_layers = 3
  c.autoencoder.disc_start = 0             # When fine-tuning (LDM: 50001 when training from scratch).
  c.autoencoder.init_from = ""             # The diffusers VAE folder or .safetensors file.
  c.optim.lr = 4.5e-6
  c.ema.decays = (0.9999,)
  c.train.batch_size = 64
  c.train.num_steps = 0                    # Import only.
  c.eval.num_samples = 10000               # Validation images for PSNR / SSIM / rFD (Inception: set
  c.eval.features = "inception"            # eval.inception_weights).
  c.mesh.shape = (-1, 1)
  return c
