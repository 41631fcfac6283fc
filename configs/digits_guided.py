"""Guided distillation (Meng et al. 2023) of the README's digits model: one few-step network for every w.

    python -m diffusax.main --config=configs/digits.py --workdir=runs/digits              # the CFG teacher
    python -m diffusax.main --config=configs/digits_guided.py --workdir=runs/digits_guided --mode=distill
    python -m diffusax.main --config=configs/digits_guided.py --workdir=runs/digits_guided/students/4 \
        --mode=eval --config.sample.num_steps=4 --config.sample.guidance_scale=1

Stage one trains a w-conditioned student (the teacher's U-Net plus an embedding of w, added to the
time embedding, zero at initialisation) to match the CFG-guided teacher x0_c + w (x0_c - x0_u) for
w ~ U[distill.guidance_range]; stage two distils it progressively (64 -> 32 -> ... -> 1 steps) with
teacher and student given the same w. A student samples with one network call per step at any w
(sample.guidance_scale is its w input; no CFG).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_distill  # noqa: E402


def get_config():
  c = digits_distill.get_config()
  c.distill.kind = "guided"
  c.distill.guidance_range = (0.0, 2.0)
  c.model.unet.guidance_embed = True       # The student's w input (the teacher is read without it).
  c.distill.steps_per_round = 300          # 7 rounds (stage one, then 64 -> 1): 2100 steps.
  c.train.ckpt_every = 150
  c.sample.guidance_scale = 1.0            # The w the README's digits grid uses.
  return c
