"""The settings of image-conditioned diffusion (`task.*`, `sample.aug_level`): which conditional task
turns each example into (target, condition) (`data.tasks`), CFG dropout of the image condition and
noise-conditioning augmentation (`core.conditioning`). See programs/defaults.py for each field."""
from __future__ import annotations

import dataclasses

from diffusax.programs.errors import ConfigError, positive

MASK_KINDS = ("box", "stroke", "mixed")


@dataclasses.dataclass(frozen=True)
class TaskSettings:
  name: str = "generate"       # data.tasks.TASKS name
  factor: int = 2              # super_resolution: the condition is the image area-downsampled by this factor
  mask_kind: str = "box"       # inpainting masks
  image_dropout: float = 0.0   # P(image condition dropped) at training (CFG on the image)
  aug_max: float = 0.0         # noise-conditioning augmentation at training: s ~ U[0, aug_max]
  aug_level: float = 0.0       # the augmentation level s of the condition at sampling (sample.aug_level)
  base_workdir: str = ""       # cascade.base_workdir: the base stage whose samples are the conditions
  base_step: int = -1          # cascade.base_step
  base_guidance_scale: float = 1.0  # cascade.base_guidance_scale: the base stage's CFG scale
  truncated: bool = False      # cascade.truncated: the base stops at s = aug_level, its x_s the condition

  @property
  def enabled(self) -> bool:
    return self.name != "generate"

  def options(self) -> dict:
    """The data.tasks options of this task."""
    return {"super_resolution": {"factor": self.factor}, "inpainting": {"mask_kind": self.mask_kind}}.get(self.name, {})

  def make(self):
    from diffusax.data import tasks
    return tasks.make(self.name, **self.options())

  def image_shape(self, data_shape) -> tuple | None:
    """The condition image's per-example shape for data of `data_shape` (H, W, C); ConfigError if the task
    cannot take such data."""
    from diffusax.data import tasks
    try:
      return tasks.image_shape(self.name, data_shape, **self.options())
    except ValueError as e:
      raise ConfigError(f"task: {e}") from None

  def network_kwargs(self, data_shape) -> dict:
    """The network options the task sets: the condition's channels, the augmentation-level input, the
    has-image input of image dropout."""
    shape = self.image_shape(data_shape)
    if shape is None:
      return {}
    return {"low_res_channels": int(shape[-1]), "aug_embed": self.aug_max > 0, "cond_dropout": self.image_dropout > 0}

  def identity(self) -> dict:
    """What identifies the task in a checkpoint's signature (the model learned p(x | this condition))."""
    if not self.enabled:
      return {}
    return {"name": self.name, **self.options(), "aug": self.aug_max > 0, "image_dropout": self.image_dropout > 0}


def parse_task(c) -> TaskSettings:
  from diffusax.data import tasks
  t = c.task
  if t.name not in tasks.TASKS:
    raise ConfigError(f"unknown task.name {t.name!r}; allowed: {list(tasks.TASKS)}")
  if t.mask_kind not in MASK_KINDS:
    raise ConfigError(f"unknown task.mask_kind {t.mask_kind!r}; allowed: {list(MASK_KINDS)}")
  for k in ("image_dropout",):
    if not 0.0 <= float(t[k]) <= 1.0:
      raise ConfigError(f"task.{k} must lie in [0, 1], got {t[k]}")
  if not 0.0 <= float(t.aug_max) < 1.0:
    raise ConfigError(f"task.aug_max must lie in [0, 1) (the largest augmentation time s), got {t.aug_max}")
  if not 0.0 <= float(c.sample.aug_level) < 1.0:
    raise ConfigError(f"sample.aug_level must lie in [0, 1), got {c.sample.aug_level}")
  name = str(t.name)
  if name == "generate" and (t.image_dropout or t.aug_max or c.sample.aug_level):
    used = [k for k, v in (("task.image_dropout", t.image_dropout), ("task.aug_max", t.aug_max),
                           ("sample.aug_level", c.sample.aug_level)) if v]
    raise ConfigError(f"{used[0]} conditions on an image, and task.name='generate' has none: pick a conditional "
                      f"task ({[n for n in tasks.TASKS if n != 'generate']})")
  if float(c.sample.aug_level) > 0 and not float(t.aug_max) > 0:
    raise ConfigError(f"sample.aug_level={c.sample.aug_level}: a model trained without noise-conditioning "
                      "augmentation (task.aug_max=0) never saw a noisy condition; train with task.aug_max > 0 "
                      "or sample at aug_level 0")
  if c.model.name == "mlp" and name != "generate":
    raise ConfigError(f"task.name={name!r} conditions on an image: model.name must be 'unet' or 'dit', not 'mlp'")
  k = c.cascade
  if k.base_workdir and name != "super_resolution":
    raise ConfigError(f"cascade.base_workdir is the base stage of a super-resolution model; task.name is {name!r}")
  if k.truncated and not (k.base_workdir and float(c.sample.aug_level) > 0):
    raise ConfigError("cascade.truncated stops the base stage at s = sample.aug_level: it needs "
                      "cascade.base_workdir and sample.aug_level > 0")
  return TaskSettings(name=name, factor=positive("task.factor", t.factor), mask_kind=str(t.mask_kind),
                      image_dropout=float(t.image_dropout), aug_max=float(t.aug_max),
                      aug_level=float(c.sample.aug_level), base_workdir=str(k.base_workdir),
                      base_step=int(k.base_step), base_guidance_scale=float(k.base_guidance_scale),
                      truncated=bool(k.truncated))
