"""The settings of --mode=distill (programs/distill.py): `DistillSettings` and its parse from distill.*."""
from __future__ import annotations

import dataclasses

from diffusax.programs.errors import ConfigError, positive


@dataclasses.dataclass(frozen=True)
class DistillSettings:
  """--mode=distill (programs/distill.py); see programs/defaults.py for each field."""
  kind: str = "progressive"
  teacher_workdir: str = ""
  teacher_step: int = -1
  teacher_steps: int = 64
  student_steps: int = 1
  steps_per_round: int = 1000
  reset_optimizer: bool = True
  num_levels: int = 18
  teacher_solver: str = "heun"
  metric: str = "l2"
  target_decay: float = 0.95
  guidance_range: tuple = (0.0, 2.0)

  @property
  def rounds(self) -> tuple:
    """The student step count of each round: (teacher_steps / 2, ..., student_steps); guided: the
    w-conditioned stage (sampled with teacher_steps) first; consistency: (num_levels,)."""
    if self.kind == "consistency":
      return (self.num_levels,)
    out, n = [self.teacher_steps] if self.kind == "guided" else [], self.teacher_steps
    while n > self.student_steps:
      n //= 2
      out.append(n)
    return tuple(out)


def parse_distill(c) -> DistillSettings:
  """The distill.* section of config c, checked against the model section it constrains."""
  d = c.distill
  kinds = ("progressive", "guided", "consistency")
  if d.kind not in kinds:
    raise ConfigError(f"unknown distill.kind {d.kind!r}; allowed: {list(kinds)}")
  if d.teacher_solver not in ("ddim", "heun"):
    raise ConfigError(f"distill.teacher_solver must be 'ddim' or 'heun', got {d.teacher_solver!r}")
  if d.metric not in ("l2", "pseudo_huber"):
    raise ConfigError(f"distill.metric must be 'l2' or 'pseudo_huber', got {d.metric!r}")
  if not 0.0 <= float(d.target_decay) < 1.0:
    raise ConfigError(f"distill.target_decay must lie in [0, 1), got {d.target_decay!r}")
  teacher, student = positive("distill.teacher_steps", d.teacher_steps), positive("distill.student_steps", d.student_steps)
  rng = tuple(float(v) for v in d.guidance_range)
  if len(rng) != 2 or not 0.0 <= rng[0] <= rng[1]:
    raise ConfigError(f"distill.guidance_range must be (w_min, w_max) with 0 <= w_min <= w_max, got {d.guidance_range!r}")
  if d.kind == "guided":
    if not c.model[c.model.name].get("guidance_embed", False):
      raise ConfigError(f"distill.kind='guided' trains a w-conditioned student: set model.{c.model.name}.guidance_embed=True "
                        "(the teacher is read without it)")
    if not c.model.class_conditional:
      raise ConfigError("distill.kind='guided' distils classifier-free guidance: the teacher must be class-conditional")
  elif c.model[c.model.name].get("guidance_embed", False):
    raise ConfigError(f"model.{c.model.name}.guidance_embed=True is for distill.kind='guided' students")
  if d.kind in ("progressive", "guided") and (teacher <= student or teacher % student or (teacher // student) & (teacher // student - 1)):
    raise ConfigError(f"distill.teacher_steps={teacher} must be distill.student_steps={student} times a power of 2 "
                      "(>= 2): each round halves the step count")
  levels = positive("distill.num_levels", d.num_levels)
  if levels < 2:
    raise ConfigError(f"distill.num_levels must be >= 2 (the Karras grid's noise levels), got {levels}")
  return DistillSettings(kind=d.kind, teacher_workdir=str(d.teacher_workdir), teacher_step=int(d.teacher_step),
                         teacher_steps=teacher, student_steps=student,
                         steps_per_round=positive("distill.steps_per_round", d.steps_per_round),
                         reset_optimizer=bool(d.reset_optimizer), num_levels=levels,
                         teacher_solver=d.teacher_solver, metric=d.metric, target_decay=float(d.target_decay),
                         guidance_range=rng)
