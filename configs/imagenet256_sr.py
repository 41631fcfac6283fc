"""ImageNet super-resolution 64 -> 256 for accelerators (the last stage of a CDM / Imagen-style cascade).
Documented, not trained here.

Prepare imagenet2012 as TFDS array_record (manual download; see configs/imagenet256_latent.py), then:
    python -m diffusax.main --config=configs/imagenet256_sr.py --workdir=$W/sr --config.data.data_dir=$DATA
    # a cascade: a 64x64 base stage (any class-conditional config at data.image_size=64) named by
    #   --config.cascade.base_workdir=$W/base64 with --mode=sample or --mode=eval

An ADM-style U-Net at 256x256 (ch 128, mult 1,1,2,2,4,4, attention at 16 and 8, scale-shift norm),
class-conditional; the 64x64 condition is the area average (factor 4), bilinearly resized and
concatenated, trained at q(z_s | z), s ~ U[0, 0.5], sampled at s = 0.1; bf16 compute.
"""
from diffusax.programs.defaults import base_config


def get_config():
  c = base_config()
  c.data.name = "imagenet2012"
  c.data.split = "train"
  c.data.eval_split = "validation"
  c.data.image_size = 256
  c.data.random_flip = True
  c.diffusion.schedule = "vp_cosine"
  c.diffusion.target = "v"
  c.model.name = "unet"
  c.model.unet.base_channels = 128
  c.model.unet.channel_mult = (1, 1, 2, 2, 4, 4)
  c.model.unet.num_res_blocks = 2
  c.model.unet.attn_resolutions = (16, 8)
  c.model.unet.num_head_channels = 64
  c.model.unet.scale_shift_norm = True
  c.model.unet.resblock_updown = True
  c.model.dtype = "bfloat16"
  c.model.class_conditional = True
  c.guidance.label_dropout = 0.1
  c.task.name = "super_resolution"
  c.task.factor = 4                        # 256x256 targets from 64x64 conditions.
  c.task.aug_max = 0.5
  c.optim.lr = 1e-4
  c.train.batch_size = 256
  c.train.num_steps = 500_000
  c.sample.method = "dpm_solver_pp_2m"
  c.sample.num_steps = 50
  c.sample.aug_level = 0.1
  c.sample.guidance_scale = 0.0
  c.eval.metrics = ("fd", "kid")
  return c
