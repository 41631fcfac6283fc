"""MLP denoiser on a 2-D mixture of 8 Gaussians: seconds on CPU.

    python -m diffusax.main --config=configs/toy2d.py --workdir=runs/toy2d

Writes samples.png (a density image of 4096 samples) and metrics.json.
"""
from diffusax.programs.defaults import base_config


def get_config():
  c = base_config()
  c.data.name = "toy_gmm2d"                # Embedded: 8 Gaussians (std 0.1) on a circle of radius 2.
  c.data.eval_split = "test"
  c.diffusion.schedule = "vp_cosine"
  c.diffusion.target = "eps"
  c.model.name = "mlp"
  c.model.mlp.hidden = 256
  c.model.mlp.depth = 3
  c.model.class_conditional = False
  c.guidance.label_dropout = 0.0
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 50
  c.optim.decay = "cosine"
  c.ema.decays = (0.99,)
  c.train.batch_size = 256
  c.train.num_steps = 3000
  c.train.log_every = 200
  c.train.eval_every = 0
  c.train.ckpt_every = 500
  c.sample.method = "dpm_solver_pp_2m"
  c.sample.num_steps = 25
  c.sample.per_class = 64
  return c
