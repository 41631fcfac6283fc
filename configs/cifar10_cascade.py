"""A CIFAR-10 cascade for accelerators (CDM's shape at small scale): a class-conditional base at 16x16, then
super-resolution 16 -> 32 with noise-conditioning augmentation. Documented, not trained here.

Prepare the data once (see configs/cifar10.py), then:
    python -m diffusax.main --config=configs/cifar10_cascade.py:base --workdir=$W/base --config.data.data_dir=$DATA
    python -m diffusax.main --config=configs/cifar10_cascade.py:sr --workdir=$W/sr --config.data.data_dir=$DATA
    python -m diffusax.main --config=configs/cifar10_cascade.py:sr --workdir=$W/sr --config.data.data_dir=$DATA \
        --config.cascade.base_workdir=$W/base --mode=eval

Both stages: the ADM U-Net of configs/cifar10.py (ch 128, scale-shift norm, class-conditional with CFG),
cosine schedule, v target. Stage 2 sees the 16x16 condition bilinearly resized and concatenated, trained at
q(z_s | z), s ~ U[0, 0.5], sampled at s = 0.1 (sweep sample.aug_level: CDM found the best level per stage).
"""
from diffusax.programs.defaults import sibling_config


def get_config(stage: str = "sr"):
  c = sibling_config(__file__, "cifar10")
  c.diffusion.schedule = "vp_cosine"
  c.diffusion.schedule_kwargs = {}         # (cifar10.py's ddpm_linear step count does not apply.)
  c.diffusion.target = "v"
  c.model.unet.scale_shift_norm = True
  c.model.class_conditional = True
  c.guidance.label_dropout = 0.1
  c.sample.method = "dpm_solver_pp_2m"
  c.sample.num_steps = 50
  if stage == "base":
    c.data.image_size = 16                 # 32x32 images area-resized to 16x16.
    c.model.unet.channel_mult = (1, 2, 2)  # 16 -> 8 -> 4.
    c.model.unet.attn_resolutions = (8,)
    return c
  if stage != "sr":
    raise ValueError(f"configs/cifar10_cascade.py takes 'base' or 'sr', got {stage!r}")
  c.task.name = "super_resolution"
  c.task.factor = 2
  c.task.aug_max = 0.5
  c.sample.aug_level = 0.1
  c.sample.guidance_scale = 0.0
  c.eval.metrics = ("fd", "kid")
  return c
