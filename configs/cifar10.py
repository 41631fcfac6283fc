"""DDPM-style CIFAR-10 (Ho et al. 2020, with ADM options) for accelerator runs.

Prepare the data once (needs network and TensorFlow, array_record format):
    pip install tensorflow-cpu && tfds build cifar10 --data_dir=$DATA --file_format=array_record
Train:
    python -m diffusax.main --config=configs/cifar10.py --workdir=$WORKDIR --config.data.data_dir=$DATA

The network is the 35.7M-parameter DDPM U-Net (ch 128, mult 1,2,2,2, 2 res
blocks, attention at 16x16, dropout 0.1); 1000 linear-beta steps; eps target.
"""
from diffusax.programs.defaults import base_config


def get_config():
  c = base_config()
  c.data.name = "cifar10"
  c.data.split = "train"
  c.data.eval_split = "test"
  c.data.random_flip = True                # As in DDPM.
  c.diffusion.schedule = "ddpm_linear"     # beta 1e-4 .. 0.02 over 1000 steps.
  c.diffusion.schedule_kwargs.num_steps = 1000
  c.diffusion.target = "eps"
  c.diffusion.weighting = "uniform"        # L_simple.
  c.diffusion.time_sampler = "uniform_discrete"
  c.model.name = "unet"
  c.model.unet.base_channels = 128
  c.model.unet.channel_mult = (1, 2, 2, 2)
  c.model.unet.num_res_blocks = 2
  c.model.unet.attn_resolutions = (16,)
  c.model.unet.num_heads = 1
  c.model.unet.dropout = 0.1
  c.model.unet.remat = False               # Recompute ResBlock activations in backward: less activation
                                           # memory for one more forward pass (not part of the checkpoint signature).
  c.model.unet.scale_shift_norm = False    # DDPM adds the time embedding (ADM: scale-shift, +2.6M params).
  c.model.dtype = "bfloat16"               # bf16 compute, fp32 params (use float32 on CPU).
  c.model.class_conditional = False        # DDPM is unconditional; set True for CFG (label_dropout below).
  c.guidance.label_dropout = 0.1
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 5000
  c.optim.decay = "constant"
  c.optim.grad_clip = 1.0
  c.ema.decays = (0.9999,)
  c.train.batch_size = 128
  c.train.num_steps = 800_000
  c.train.log_every = 500
  c.train.eval_every = 50_000
  c.train.ckpt_every = 10_000
  c.sample.method = "ddim"
  c.sample.num_steps = 100
  c.sample.per_class = 8
  c.runtime.xla_cpu_eigen_convs = True     # Only affects the CPU backend.
  return c
