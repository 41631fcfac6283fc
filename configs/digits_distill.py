"""Progressive distillation (Salimans & Ho 2022) of the README's digits model: 64 -> 32 -> ... -> 1 steps.

    python -m diffusax.main --config=configs/digits.py --workdir=runs/digits              # the teacher
    python -m diffusax.main --config=configs/digits_distill.py --workdir=runs/digits_distill --mode=distill
    python -m diffusax.main --config=configs/digits_distill.py --workdir=runs/digits_distill/students/4 \
        --mode=eval --config.sample.num_steps=4

The network, schedule and target are the teacher's (configs/digits.py); each round halves the
student's DDIM steps on the grid t_i = t_max (1 - i / n) (sample.spacing "trailing"), starting from
its teacher, for distill.steps_per_round steps with a fresh optimizer. WORKDIR/students/<n> holds
each round's student (sample and evaluate it with --config.sample.num_steps=<n>).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits  # noqa: E402


def get_config():
  c = digits.get_config()
  c.distill.kind = "progressive"
  c.distill.teacher_workdir = "runs/digits"
  c.distill.teacher_steps = 64
  c.distill.student_steps = 1
  c.distill.steps_per_round = 500
  c.optim.lr = 3e-4                        # Students start at their teacher: a small step, annealed
  c.optim.warmup_steps = 0                 # to 0 within each round (the optimizer restarts per round).
  c.optim.decay = "cosine"
  c.optim.end_lr_factor = 0.0
  c.train.ckpt_every = 250
  c.sample.method = "ddim"                 # A student is sampled with its own steps of DDIM ...
  c.sample.spacing = "trailing"            # ... on the grid it was trained on.
  c.sample.num_steps = 1                   # The last round's student.
  c.sample.guidance_scale = 0.0            # The conditional model (CFG would double the network calls).
  return c
