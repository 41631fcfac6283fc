"""Consistency distillation (Song et al. 2023) of the README's digits model: one- and few-step sampling.

    python -m diffusax.main --config=configs/digits.py --workdir=runs/digits              # the teacher
    python -m diffusax.main --config=configs/digits_consistency.py --workdir=runs/digits_cd --mode=distill
    python -m diffusax.main --config=configs/digits_consistency.py --workdir=runs/digits_cd --mode=eval \
        --config.sample.num_steps=2

The student (initialised from the teacher, the teacher's network) is the consistency function
f = c_skip x + (1 - c_skip) x0_hat with f(x, t_min) = x (`core.distill`); its target network is the
EMA of decay distill.target_decay; the teacher takes one Heun step between adjacent levels of a
Karras grid of distill.num_levels noise levels. Sample with the multistep consistency sampler
(sample.method "consistency", 1, 2, 4 ... steps on the trailing grid).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits  # noqa: E402


def get_config():
  c = digits.get_config()
  c.distill.kind = "consistency"
  c.distill.teacher_workdir = "runs/digits"
  c.distill.num_levels = 18                # N of the Karras grid (the paper's CIFAR-10 setting).
  c.distill.teacher_solver = "heun"
  c.distill.metric = "l2"
  c.distill.target_decay = 0.95            # mu of the target network.
  c.distill.steps_per_round = 1500
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 0
  c.optim.decay = "cosine"
  c.optim.end_lr_factor = 0.0
  c.train.ckpt_every = 500
  c.sample.method = "consistency"
  c.sample.num_steps = 1
  c.sample.guidance_scale = 0.0            # The conditional model.
  return c
