"""ConfigDict -> typed, validated settings. The only place a ConfigDict is read.

Everything is checked here, before any device work: unknown keys (with the
nearest valid ones), unknown names (schedule, target, weighting, sampler,
network), impossible values, and image sizes the network cannot take.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any

import ml_collections

from diffusax.checkpoint import NEUTRAL_KWARGS  # options left out of signatures at their neutral value
from diffusax.core import schedules
from diffusax.core import targets as targets_lib
from diffusax.programs.ae_settings import AESettings, LatentSettings  # noqa: F401 - part of this API
from diffusax.programs.task_settings import TaskSettings
from diffusax.programs.defaults import base_config
from diffusax.programs.distill_settings import DistillSettings, parse_distill  # noqa: F401 - part of this API
from diffusax.programs.errors import ConfigError, positive as _positive  # noqa: F401 - part of this API
from diffusax.training.optimizer import OptimConfig
from diffusax.training.step import LossConfig


MESH_STRATEGIES = ("mesh", "pmap")  # How the train step is parallelised (see programs/train.py).
# Network options that change how it computes, not its parameters: a checkpoint written with one
# value restores with another.
COMPUTE_ONLY_KWARGS = ("remat",)


def _flat_keys(c, prefix="") -> dict[str, Any]:
  out = {}
  for k, v in c.items():
    name = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict) and not name.endswith("kwargs"):
      out.update(_flat_keys(v, name + "."))
    else:
      out[name] = v
  return out


def check_keys(config: ml_collections.ConfigDict) -> None:
  """Refuses keys the schema does not declare, naming the nearest valid ones."""
  valid = _flat_keys(base_config())
  for k in _flat_keys(config):
    if k not in valid:
      near = difflib.get_close_matches(k, list(valid), n=3, cutoff=0.5)
      raise ConfigError(f"unknown config key {k!r}" + (f"; did you mean {near}?" if near else "")
                        + " (the schema is diffusax/programs/defaults.py)")


@dataclasses.dataclass(frozen=True)
class DataSettings:
  name: str
  data_dir: str
  split: str
  eval_split: str
  random_flip: bool
  random_crop: bool = False
  crop_min_scale: float = 0.5
  image_size: int = 0
  workers: int = 0
  prefetch: int = 2
  levels: int = 256


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  batch_size: int
  num_steps: int
  log_every: int
  eval_every: int
  ckpt_every: int
  keep_checkpoints: int
  async_checkpoints: bool
  eval_batches: int
  ckpt_fallback: bool
  full_eval: bool = False
  allow_unverified_restore: bool = False


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  method: str
  num_steps: int
  guidance_scale: float
  per_class: int
  eta: float
  num_samples: int = 1000
  shard_size: int = 256
  labels: tuple = ()
  seed: int = 0
  checkpoint_step: int = -1
  output_dir: str = ""
  guide_workdir: str = ""
  guide_step: int = -1
  guidance_interval: tuple = (0.0, 1.0)
  clip_x0: float = 0.0
  spacing: str = ""
  order: int = 0

  @property
  def interval(self) -> tuple | None:
    """The guidance interval, or None when it is all of [0, 1] (no masking traced)."""
    return None if tuple(self.guidance_interval) == (0.0, 1.0) else tuple(self.guidance_interval)


SWEEP_DEFAULT = (0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.10, 0.12, 0.15, 0.18, 0.21, 0.25)


@dataclasses.dataclass(frozen=True)
class EmaSettings:
  """Power-function EMAs (training/power_ema.py), their snapshots and the post-hoc reconstruction."""
  sigma_rels: tuple = ()
  snapshot_every: int = 0
  target_sigma_rel: float = 0.1
  target_step: int = -1
  reconstruct_from: tuple = ()
  sweep: tuple = SWEEP_DEFAULT

  @property
  def gammas(self) -> tuple:
    from diffusax.training import power_ema
    return tuple(power_ema.gamma_from_sigma_rel(v) for v in self.sigma_rels)


EVAL_METRICS = ("fd", "kid", "class_accuracy", "bpd_vlb", "bpd_ode")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  metrics: tuple = EVAL_METRICS
  num_samples: int = 900
  features: str = "auto"
  inception_weights: str = ""
  kid_subset_size: int = 1000
  bpd_examples: int = 128
  vlb_steps: int = 100
  ode_steps: int = 50
  ode_solver: str = "heun"
  hutchinson: str = "rademacher"
  t_min: float = 1e-3


@dataclasses.dataclass(frozen=True)
class Settings:
  seed: int
  data: DataSettings
  schedule_name: str
  schedule_kwargs: dict
  loss: LossConfig
  model_name: str
  model_kwargs: dict  # The options of model.<model_name>: every constructor field of that network.
  model_dtype: str
  class_conditional: bool
  optim: OptimConfig
  ema_decays: tuple
  ema_warmup: bool
  train: TrainSettings
  sample: SampleSettings
  mesh_shape: tuple
  mesh_strategy: str
  eval: EvalSettings = EvalSettings()
  mesh_ordered_reduction: bool = False
  mesh_strict: bool = False  # mesh.strict_sharding: refuse a parameter fsdp cannot split instead of replicating it
  ema: EmaSettings = EmaSettings()
  learn_endpoints: bool = False  # a learned schedule's gamma_0 and gamma_1 are trained too
  distill: DistillSettings = DistillSettings()
  stage: str = "diffusion"                 # "autoencoder": stage 1 of latent diffusion (programs/autoencoder.py)
  autoencoder: AESettings = AESettings()
  latent: LatentSettings = LatentSettings()  # stage 2: the autoencoder whose latents the model learns
  task: TaskSettings = TaskSettings()        # image-conditioned diffusion: the task and its condition

  @property
  def num_ema(self) -> int:
    """EMAs in the state: the classic decays, then the power-function sigma_rels."""
    return len(self.ema_decays) + len(self.ema.sigma_rels)

  @property
  def schedule(self) -> schedules.Schedule:
    return schedules.get(self.schedule_name, **self.schedule_kwargs)

  def model_settings(self) -> dict:
    """What identifies the network in a checkpoint."""
    kwargs = {k: v for k, v in self.model_kwargs.items() if k not in COMPUTE_ONLY_KWARGS
              and not (k in NEUTRAL_KWARGS and _jsonable(v) == NEUTRAL_KWARGS[k])}
    out = {"name": self.model_name, "kwargs": _jsonable(kwargs), "target": self.loss.target,
           "schedule": self.schedule_name, "class_conditional": self.class_conditional}
    if self.task.enabled:
      out["task"] = _jsonable(self.task.identity())
    return out


def _jsonable(v):
  if isinstance(v, dict):
    return {k: _jsonable(x) for k, x in sorted(v.items())}
  if isinstance(v, (tuple, list)):
    return [_jsonable(x) for x in v]
  return v


def parse(config: ml_collections.ConfigDict) -> Settings:
  """Validates `config` and returns typed Settings. Raises ConfigError."""
  check_keys(config)
  c = config
  try:
    sched_kwargs = dict(c.diffusion.schedule_kwargs)
    schedules.get(c.diffusion.schedule, **sched_kwargs)
    targets_lib.check_target(c.diffusion.target)
    wparams = ()
    if c.diffusion.weighting == "min_snr":
      wparams = (("gamma", float(c.diffusion.min_snr_gamma)),)
    elif c.diffusion.weighting == "sigmoid":
      wparams = (("bias", float(c.diffusion.sigmoid_bias)),)
    optim = OptimConfig(lr=float(c.optim.lr), warmup_steps=int(c.optim.warmup_steps), decay=c.optim.decay,
                        total_steps=max(1, int(c.train.num_steps)), end_lr_factor=float(c.optim.end_lr_factor),
                        b1=float(c.optim.b1), b2=float(c.optim.b2), eps=float(c.optim.eps),
                        weight_decay=float(c.optim.weight_decay), grad_clip=float(c.optim.grad_clip))
    loss = LossConfig(target=c.diffusion.target, weighting=c.diffusion.weighting, weighting_params=wparams,
                      time_sampler=c.diffusion.time_sampler, t_min=float(c.diffusion.t_min),
                      label_dropout=float(c.guidance.label_dropout), null_class=None,
                      objective=c.diffusion.objective, vlb_weight=float(c.diffusion.vlb_weight),
                      vlb_steps=_positive("diffusion.vlb_steps", c.diffusion.vlb_steps),
                      levels=int(c.data.levels) if isinstance(c.data.levels, int) else 256,
                      variance_minimisation=bool(c.diffusion.variance_minimisation),
                      schedule_lr_factor=float(c.diffusion.schedule_lr_factor))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _check_vdm(c, loss)
  from diffusax import nn  # Deferred, like the samplers below.
  if c.model.name not in nn.NETWORKS:
    raise ConfigError(f"unknown model.name {c.model.name!r}; allowed: {sorted(nn.NETWORKS)}")
  learn_sigma = bool(c.model[c.model.name].get("learn_sigma", False))  # A declared field of the network's block.
  if learn_sigma and loss.objective not in ("hybrid", "vlb"):
    raise ConfigError(f"model.{c.model.name}.learn_sigma=True: the variance channels are trained only by "
                      f"L_vlb; set diffusion.objective='hybrid' or 'vlb' (got {loss.objective!r}), or learn_sigma=False")
  if loss.objective in ("hybrid", "vlb") and not learn_sigma:
    have = "" if "learn_sigma" in c.model[c.model.name] else f" (model {c.model.name!r} has no learn_sigma option)"
    raise ConfigError(f"diffusion.objective={loss.objective!r} trains learned variances: set "
                      f"model.{c.model.name}.learn_sigma=True{have}")
  if loss.time_sampler == "importance" and c.mesh.ordered_reduction:
    raise ConfigError("diffusion.time_sampler='importance' does not support mesh.ordered_reduction=True")
  if c.model.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"model.dtype must be 'float32' or 'bfloat16', got {c.model.dtype!r}")
  from diffusax.core import samplers  # Deferred: samplers are optional for parsing tests.
  if c.sample.method not in samplers.METHODS:
    raise ConfigError(f"unknown sample.method {c.sample.method!r}; allowed: {sorted(samplers.METHODS)}")
  decays = tuple(float(d) for d in c.ema.decays)
  if not decays or any(not 0.0 <= d < 1.0 for d in decays):
    raise ConfigError(f"ema.decays must be a non-empty list of values in [0, 1), got {c.ema.decays!r}")
  from diffusax.programs import ae_settings
  stage = ae_settings.parse_stage(c)
  import_only = stage == "autoencoder" and bool(c.autoencoder.init_from)  # num_steps=0: import the weights only
  if stage == "autoencoder" and c.train.num_steps == 0 and not import_only:
    raise ConfigError("train.num_steps=0 imports published weights: set autoencoder.init_from to them, or train "
                      "for a positive number of steps")
  train = TrainSettings(
      batch_size=_positive("train.batch_size", c.train.batch_size),
      num_steps=_positive("train.num_steps", c.train.num_steps, allow_zero=import_only),
      log_every=_positive("train.log_every", c.train.log_every),
      eval_every=_positive("train.eval_every", c.train.eval_every, allow_zero=True),
      ckpt_every=_positive("train.ckpt_every", c.train.ckpt_every),
      keep_checkpoints=_positive("train.keep_checkpoints", c.train.keep_checkpoints),
      async_checkpoints=bool(c.train.async_checkpoints),
      eval_batches=_positive("train.eval_batches", c.train.eval_batches, allow_zero=True),
      ckpt_fallback=bool(c.train.ckpt_fallback), full_eval=bool(c.train.full_eval),
      allow_unverified_restore=bool(c.train.allow_unverified_restore))
  if c.mesh.strategy not in MESH_STRATEGIES:
    raise ConfigError(f"unknown mesh.strategy {c.mesh.strategy!r}; allowed: {list(MESH_STRATEGIES)}")
  if c.mesh.strategy == "pmap" and len(c.mesh.shape) == 2 and tuple(c.mesh.shape)[1] != 1:
    raise ConfigError(f"mesh.strategy='pmap' replicates the state over all devices: mesh.shape must be (-1, 1), "
                      f"got {tuple(c.mesh.shape)}")
  if c.mesh.ordered_reduction and (c.mesh.strategy != "mesh" or len(c.mesh.shape) != 2
                                   or tuple(c.mesh.shape)[1] != 1):
    raise ConfigError(f"mesh.ordered_reduction needs mesh.strategy='mesh' and replicated parameters "
                      f"(mesh.shape (N, 1) or (-1, 1)), got strategy {c.mesh.strategy!r}, shape "
                      f"{tuple(c.mesh.shape)}")
  from diffusax.parallel import distributed  # Deferred, like samplers.
  if c.runtime.distributed not in distributed.MODES:
    raise ConfigError(f"runtime.distributed must be one of {list(distributed.MODES)}, got {c.runtime.distributed!r}")
  sample = SampleSettings(method=c.sample.method, num_steps=_positive("sample.num_steps", c.sample.num_steps),
                          guidance_scale=float(c.sample.guidance_scale),
                          per_class=_positive("sample.per_class", c.sample.per_class), eta=float(c.sample.eta),
                          num_samples=_positive("sample.num_samples", c.sample.num_samples),
                          shard_size=_positive("sample.shard_size", c.sample.shard_size),
                          labels=tuple(int(v) for v in c.sample.labels), seed=int(c.sample.seed),
                          checkpoint_step=int(c.sample.checkpoint_step), output_dir=str(c.sample.output_dir),
                          guide_workdir=str(c.sample.guide_workdir), guide_step=int(c.sample.guide_step),
                          guidance_interval=_parse_interval(c.sample.guidance_interval),
                          clip_x0=_clip(c.sample.clip_x0), **_parse_grid(c.sample))
  ev = _parse_eval(c)
  return Settings(
      seed=int(c.seed),
      data=_parse_data(c),
      schedule_name=c.diffusion.schedule, schedule_kwargs=sched_kwargs, loss=loss,
      model_name=c.model.name, model_kwargs=dict(c.model[c.model.name]), model_dtype=c.model.dtype,
      class_conditional=bool(c.model.class_conditional), optim=optim, ema_decays=decays,
      ema_warmup=bool(c.ema.warmup), train=train, sample=sample, mesh_shape=tuple(c.mesh.shape),
      mesh_strategy=c.mesh.strategy, eval=ev, mesh_ordered_reduction=bool(c.mesh.ordered_reduction),
      mesh_strict=bool(c.mesh.strict_sharding),
      ema=_parse_ema(c), learn_endpoints=bool(c.diffusion.learn_endpoints), distill=parse_distill(c),
      stage=stage, autoencoder=ae_settings.parse_autoencoder(c), latent=ae_settings.parse_latent(c),
      task=_parse_task(c, loss))


def _parse_task(c, loss: LossConfig) -> TaskSettings:
  from diffusax.programs import task_settings
  task = task_settings.parse_task(c)
  if task.enabled:
    if loss.objective != "simple":
      raise ConfigError(f"task.name={task.name!r}: conditional tasks train the 'simple' objective, got "
                        f"diffusion.objective={loss.objective!r}")
    if c.latent.autoencoder_workdir:
      raise ConfigError(f"task.name={task.name!r} conditions on pixels; latent diffusion "
                        "(latent.autoencoder_workdir) does not take an image condition")
    if c.stage != "diffusion":
      raise ConfigError(f"task.name={task.name!r} is for diffusion models (stage='diffusion')")
    if c.mesh.strategy == "pmap" or c.mesh.ordered_reduction:
      raise ConfigError(f"task.name={task.name!r} runs on mesh.strategy='mesh' without mesh.ordered_reduction "
                        "(neither the pmap path nor the fixed-order reduction takes an image condition)")
    set_here = [k for k in ("low_res_channels", "aug_embed", "cond_dropout") if c.model[c.model.name].get(k)]
    if set_here:
      raise ConfigError(f"model.{c.model.name}.{set_here[0]} is set by the task (task.*), not by hand")
  return task


def _check_vdm(c, loss: LossConfig) -> None:
  """The VDM objective and the learned schedule: the settings where they are defined."""
  d = c.diffusion
  learned = d.schedule == "learned"
  if learned and loss.objective != "vdm":
    raise ConfigError(f"diffusion.schedule='learned' is trained by the VDM ELBO only: set "
                      f"diffusion.objective='vdm' (got {loss.objective!r}), or pick a fixed schedule")
  if not float(d.schedule_lr_factor) > 0:
    raise ConfigError(f"diffusion.schedule_lr_factor must be > 0, got {d.schedule_lr_factor!r}")
  for key in ("learn_endpoints", "variance_minimisation"):
    if d[key] and not learned:
      raise ConfigError(f"diffusion.{key}=True trains a learned schedule: set diffusion.schedule='learned' "
                        f"(got {d.schedule!r})")
  if loss.objective != "vdm":
    return
  sched = schedules.get(d.schedule, **dict(d.schedule_kwargs))
  if sched.kind != "vp":
    raise ConfigError(f"diffusion.objective='vdm' needs a VP schedule (vp_linear, vp_cosine, linear_log_snr, "
                      f"learned, ddpm_*), got {d.schedule!r} (kind {sched.kind!r})")
  if loss.target == "flow":
    raise ConfigError("diffusion.objective='vdm' needs a VP target: eps, x0, v or score (got 'flow')")
  if loss.t_min != 0.0:
    raise ConfigError(f"diffusion.objective='vdm' integrates over t in [0, 1]: set diffusion.t_min=0 "
                      f"(got {loss.t_min})")
  if loss.time_sampler not in ("uniform", "low_discrepancy"):
    raise ConfigError(f"diffusion.objective='vdm' estimates the integral over t ~ U[0, 1]: diffusion.time_sampler "
                      f"must be 'uniform' or 'low_discrepancy', got {loss.time_sampler!r}")
  if loss.weighting != "uniform":
    raise ConfigError(f"diffusion.objective='vdm' has its own weighting (gamma'(t) / 2 in eps space): leave "
                      f"diffusion.weighting='uniform', got {loss.weighting!r}")
  if c.mesh.ordered_reduction:
    raise ConfigError("diffusion.objective='vdm' does not support mesh.ordered_reduction=True")


def _parse_grid(c) -> dict:
  """sample.spacing and sample.order, checked against the method's options."""
  from diffusax.core import samplers
  allowed = samplers.options_of(c.method)
  spacing, order = str(c.spacing), c.order
  if spacing and spacing not in samplers.grid.SPACINGS:
    raise ConfigError(f"unknown sample.spacing {spacing!r}; allowed: {list(samplers.grid.SPACINGS)} or '' (the "
                      "method's default)")
  if spacing and "spacing" not in allowed:
    raise ConfigError(f"sample.method {c.method!r} has no spacing option; set sample.spacing=''")
  if not isinstance(order, int) or isinstance(order, bool) or order < 0:
    raise ConfigError(f"sample.order must be a non-negative integer, got {order!r}")
  if order and "order" not in allowed:
    raise ConfigError(f"sample.order={order}: sample.method {c.method!r} has no order (UniPC has); set sample.order=0")
  if order and not 1 <= order <= 3:
    raise ConfigError(f"sample.order={order}: UniPC's order is 1, 2 or 3")
  return {"spacing": spacing, "order": int(order)}


def _clip(v) -> float:
  if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
    raise ConfigError(f"sample.clip_x0 must be 0 (off) or a positive bound on |x0_hat|, got {v!r}")
  return float(v)


def _parse_interval(v) -> tuple:
  try:
    lo, hi = (float(x) for x in v)
  except (TypeError, ValueError):
    raise ConfigError(f"sample.guidance_interval must be a pair (t_lo, t_hi), got {v!r}") from None
  if not 0.0 <= lo <= hi <= 1.0:
    raise ConfigError(f"sample.guidance_interval must satisfy 0 <= t_lo <= t_hi <= 1, got ({lo}, {hi})")
  return (lo, hi)


def _sigma_rel(name: str, v) -> float:
  from diffusax.training import power_ema
  try:
    power_ema.gamma_from_sigma_rel(float(v))
  except (TypeError, ValueError):
    raise ConfigError(f"{name} must be a relative std in (0, {power_ema.SIGMA_REL_MAX:.4f}] (1/sqrt(12), the "
                      f"uniform average), got {v!r}") from None
  return float(v)


def _parse_ema(c) -> EmaSettings:
  e = c.ema
  rels = tuple(_sigma_rel("ema.sigma_rels", v) for v in e.sigma_rels)
  if len(set(rels)) != len(rels):
    raise ConfigError(f"ema.sigma_rels has repeated values: {list(rels)}")
  every = _positive("ema.snapshot_every", e.snapshot_every, allow_zero=True)
  if every and not rels:
    raise ConfigError("ema.snapshot_every > 0 snapshots the power-function EMAs, but ema.sigma_rels is empty; "
                      "set e.g. ema.sigma_rels=(0.05, 0.1)")
  source = tuple(float(v) for v in e.reconstruct_from)
  missing = [v for v in source if v not in rels]
  if missing:
    raise ConfigError(f"ema.reconstruct_from {missing} are not tracked; ema.sigma_rels is {list(rels)}")
  sweep = tuple(_sigma_rel("ema.sweep", v) for v in e.sweep) or SWEEP_DEFAULT
  return EmaSettings(sigma_rels=rels, snapshot_every=every,
                     target_sigma_rel=_sigma_rel("ema.target_sigma_rel", e.target_sigma_rel),
                     target_step=int(e.target_step), reconstruct_from=source, sweep=sweep)


def _parse_data(c) -> DataSettings:
  d = c.data
  for key in ("workers", "prefetch", "image_size"):
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise ConfigError(f"data.{key} must be an integer >= 0, got {v!r}")
  if 0 < d.image_size < 4:
    raise ConfigError(f"data.image_size must be 0 (as stored) or >= 4, got {d.image_size}")
  if not 0.0 < float(d.crop_min_scale) <= 1.0:
    raise ConfigError(f"data.crop_min_scale must be in (0, 1], got {d.crop_min_scale}")
  levels = d.levels
  if isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= 256:
    raise ConfigError(f"data.levels must be an integer in [2, 256] (the values per channel; 8-bit: 256), got {levels!r}")
  return DataSettings(name=d.name, data_dir=d.data_dir, split=d.split, eval_split=d.eval_split,
                      random_flip=bool(d.random_flip), random_crop=bool(d.random_crop),
                      crop_min_scale=float(d.crop_min_scale), image_size=int(d.image_size),
                      workers=int(d.workers), prefetch=int(d.prefetch), levels=levels)


def _parse_eval(c) -> EvalSettings:
  """The eval.* keys, checked against their allowed values."""
  metrics = tuple(c.eval.metrics)
  bad = sorted(set(metrics) - set(EVAL_METRICS))
  if bad:
    raise ConfigError(f"unknown eval.metrics {bad}; allowed: {list(EVAL_METRICS)}")
  for key, allowed in (("features", ("auto", "digits", "photos", "inception")), ("ode_solver", ("euler", "heun", "rk4")),
                       ("hutchinson", ("rademacher", "gaussian", "exact"))):
    if c.eval[key] not in allowed:
      raise ConfigError(f"unknown eval.{key} {c.eval[key]!r}; allowed: {list(allowed)}")
  if not 0.0 < float(c.eval.t_min) < 1.0:
    raise ConfigError(f"eval.t_min must be in (0, 1), got {c.eval.t_min!r}")
  weights = str(c.eval.inception_weights)
  if weights:
    from diffusax import storage  # local: the only filesystem check of this module
    weights = storage.resolve(weights) if storage.is_remote(weights) else os.path.expanduser(weights)
    if os.path.splitext(weights)[1].lower() not in (".pth", ".npz"):
      raise ConfigError(f"eval.inception_weights must be a .pth (pt_inception-2015-12-05-6726825d.pth) "
                        f"or .npz file, got {weights!r}")
    if not storage.isfile(weights):
      raise ConfigError(f"eval.inception_weights {weights!r} does not exist (the FID Inception weights: "
                        "pt_inception-2015-12-05-6726825d.pth from pytorch-fid's fid_weights release)")
  return EvalSettings(metrics=metrics, num_samples=_positive("eval.num_samples", c.eval.num_samples),
                      features=c.eval.features, inception_weights=weights,
                      kid_subset_size=_positive("eval.kid_subset_size", c.eval.kid_subset_size),
                      bpd_examples=_positive("eval.bpd_examples", c.eval.bpd_examples),
                      vlb_steps=_positive("eval.vlb_steps", c.eval.vlb_steps),
                      ode_steps=_positive("eval.ode_steps", c.eval.ode_steps), ode_solver=c.eval.ode_solver,
                      hutchinson=c.eval.hutchinson, t_min=float(c.eval.t_min))


def with_null_class(s: Settings, num_classes: int | None) -> Settings:
  """Fills the loss' null class from the dataset's class count (None when unconditional)."""
  if s.class_conditional and not num_classes:
    raise ConfigError(f"model.class_conditional=True but dataset {s.data.name!r} has no labels; "
                      "set --config.model.class_conditional=False")
  null = num_classes if s.class_conditional else None
  return dataclasses.replace(s, loss=dataclasses.replace(s.loss, null_class=null))


def time_sampler_check(s: Settings) -> None:
  if s.loss.time_sampler in ("uniform_discrete", "importance") and not hasattr(s.schedule, "num_steps"):
    raise ConfigError(f"diffusion.time_sampler={s.loss.time_sampler!r} needs a discrete schedule "
                      f"(ddpm_linear or ddpm_cosine), got {s.schedule_name!r}")
