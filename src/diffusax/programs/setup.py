"""What the programs share: the model set-up, the checkpointer, the EMA restore and the sampling job.

    ModelSetup / model_setup(s, devices)   dataset description, mesh, network, abstract params, shardings
    build_module(s, num_classes)           the Linen network of the settings
    open_checkpointer(u, workdir)          WORKDIR/checkpoints
    state_shardings / to_global            a TrainState's shardings; this process' rows -> global arrays
    open_snapshots(u, workdir)             WORKDIR/ema_snapshots (power-function EMA snapshots, all kept)
    EmaOnlyState                           what --mode=phema writes: one EMA of parameters, no optimizer
    restore_ema(u, workdir, step)          the first EMA's params only (no optimizer, no training data)
    restore_guide(u, logger)               autoguidance: the guiding model of sample.guide_workdir and its EMA
    job_spec / default_out_dir / run_sample_job   the sampling job of the settings
    TraceCounts                            how often each jitted program function was traced

`programs/train.py`, `sample.py` and `evaluate.py` import this module and never
each other; nothing here imports them back. The model set-up reads the
dataset's description (shape, classes: `data.registry.describe`), never a
split, and builds no optimizer: the training program adds those
(`train.setup`). No module-level mutable state: trace counts live in a
`TraceCounts` the caller owns.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffusax import checkpoint as ckpt_lib
from diffusax import storage
from diffusax.core import schedules
from diffusax.data import registry
from diffusax.nn import bridge
from diffusax.parallel import mesh as mesh_lib
from diffusax.programs import settings as settings_lib
from diffusax.programs.logs import Logger
from diffusax.programs.settings import ConfigError, Settings
from diffusax.sampling import job as job_lib
from diffusax.training import state as state_lib

# The state subtree sampling and evaluation use: state.ema_params[0], the first EMA.
EMA_PART = ("ema_params", 0)
SNAPSHOT_DIR = "ema_snapshots"
PHEMA_KIND = "phema"  # meta["kind"] of a checkpoint that holds reconstructed EMA parameters only.
DISTILL_KIND = "distill"      # meta["kind"] of a distillation's student TrainState (--mode=distill).
DISTILLED_KIND = "distilled"  # meta["kind"] of a finished round's student EMA (EmaOnlyState).


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EmaOnlyState:
  """A checkpoint of parameters for sampling and evaluation only (post-hoc EMA): `ema_params[0]` is
  where `restore_ema` reads, as in a TrainState, and nothing else (no optimizer) is stored."""
  step: Any
  ema_params: Any


class TraceCounts(dict):
  """{name: times traced}; `wrap(name, fn)` counts each trace of `fn` under jit (tests read it)."""

  def wrap(self, name: str, fn: Callable) -> Callable:
    def wrapped(*a, **k):
      self[name] = self.get(name, 0) + 1
      return fn(*a, **k)
    return wrapped


@dataclasses.dataclass(frozen=True)
class ModelSetup:
  """Everything a program needs about the model before any device computation."""
  s: Settings
  mesh: Any
  module: Any
  schedule: Any
  data: registry.Description
  num_classes: int | None
  sample_shape: tuple
  abstract_params: Any      # ShapeDtypeStructs of the (unboxed) parameters.
  param_shardings: Any
  signature: dict
  param_init: Any = None    # Jitted key -> boxed parameters (`make_param_init`); traced once per set-up.
  sharding_summary: str = ""  # One line: which parameters are sharded and which replicated (logged once).
  latent: Any = None          # Latent diffusion: the stage-1 autoencoder (setup_latent.Latent), else None.
  cond_shape: tuple | None = None  # Conditional tasks: the condition image's per-example shape (task.*), else None.


def build_module(s: Settings, num_classes: int | None):
  """The network of model.name with its model.<name>.* options; class count and dtype from the program."""
  from diffusax import nn
  kwargs = dict(s.model_kwargs)
  kwargs["num_classes"] = num_classes if s.class_conditional else None
  kwargs["dtype"] = jnp.bfloat16 if s.model_dtype == "bfloat16" else jnp.float32
  if kwargs.get("low_res_channels", 0) and not s.task.enabled:
    raise ConfigError(f"model.{s.model_name}.low_res_channels={kwargs['low_res_channels']}: a super-resolution "
                      "network's condition comes from the task: set task.name (and leave low_res_channels at 0)")
  try:
    return nn.build(s.model_name, **kwargs)
  except ValueError as e:  # nn.build's own refusal of unknown options.
    raise ConfigError(f"model.{s.model_name}: {e}") from None


def make_param_init(s: Settings, module, sample_shape: tuple, cond_shape: tuple | None = None):
  """Jitted `key -> boxed params` of `module`, initialised on a batch of 2 zero examples of `sample_shape`
  (t = 0.5, labels 0). One function object per set-up: its `eval_shape` (the abstract parameters) and
  the state init that calls it share one trace of the network (jax caches the trace by function and
  argument types), instead of tracing the forward pass twice."""
  b = 2
  x_shape, cond = (b,) + tuple(sample_shape), s.class_conditional

  template = s.schedule

  def param_init(k):
    x = jnp.zeros(x_shape, jnp.float32)
    t = jnp.full((b,), 0.5, jnp.float32)
    y = jnp.zeros((b,), jnp.int32) if cond else None
    extra = {"w": jnp.zeros((b,), jnp.float32)} if getattr(module, "guidance_embed", False) else {}
    if cond_shape is not None:  # A conditional task's inputs (the image, its augmentation level, its flag).
      extra["low_res"] = jnp.zeros((b,) + tuple(cond_shape), jnp.float32)
      if getattr(module, "aug_embed", False):
        extra["aug_level"] = jnp.zeros((b,), jnp.float32)
      if getattr(module, "cond_dropout", False):
        extra["has_image"] = jnp.ones((b,), jnp.float32)
    params = module.init({"params": k, "dropout": k}, x, t, y, train=False, **extra)["params"]
    if isinstance(template, schedules.Learned):  # Its trained fields, next to the network's (nn.bridge).
      hidden = template.net["l2_w"].shape[0]
      sched = {"net": schedules.monotone_net_init(jax.random.fold_in(k, 0x5CED), hidden)}
      if s.learn_endpoints:
        sched.update(gamma_0=jnp.asarray(template.gamma_0, jnp.float32),
                     gamma_1=jnp.asarray(template.gamma_1, jnp.float32))
      params = {**params, bridge.SCHEDULE_PARAMS: sched}
    return params

  return jax.jit(param_init)


def abstract_init(s: Settings, module, sample_shape: tuple, param_init=None, cond_shape: tuple | None = None):
  """Boxed abstract parameters of `module` on examples of `sample_shape` (shapes only).

  Only the network's own refusals become ConfigErrors: `nn.InputShapeError`
  (it cannot take data of this shape) and `nn.OptionError` (its options
  contradict each other, named with model.<name>); any other error is a bug
  and propagates as it is.
  """
  from diffusax import nn
  param_init = param_init or make_param_init(s, module, sample_shape, cond_shape)
  try:
    return param_init.eval_shape(jax.random.key(0))
  except nn.InputShapeError as e:
    raise ConfigError(f"model {s.model_name!r} cannot take data of shape {tuple(sample_shape)}: {e}") from None
  except nn.OptionError as e:
    raise ConfigError(f"model.{s.model_name} options: {e}") from None


def describe_data(s: Settings) -> registry.Description:
  """The dataset's description, its shape at data.image_size when that is set (images are resized)."""
  try:
    d = registry.describe(s.data.name, s.data.data_dir)
  except ValueError as e:  # data.sources.DataError
    raise ConfigError(f"data: {e}") from None
  if d.transform != "image":
    used = [k for k in ("image_size", "random_crop", "random_flip") if getattr(s.data, k)]
    if used:
      raise ConfigError(f"data.{used[0]} applies to image datasets; {s.data.name!r} holds vectors of shape {d.shape}")
    return d
  if s.data.image_size:
    d = dataclasses.replace(d, shape=(s.data.image_size, s.data.image_size, d.shape[-1]))
  return d


def model_setup(s: Settings, devices=None, data: registry.Description | None = None) -> ModelSetup:
  """Validates the model settings and computes shapes and shardings; no device computation, no data read.

  `devices`: the devices of the mesh (default all, over all processes); e.g. one
  device to sample from or evaluate a checkpoint written on a larger mesh.
  `data`: the dataset's description (default: `data.registry.describe`).
  """
  data = data or describe_data(s)
  latent = None
  if s.latent.enabled:  # Stage 2 of latent diffusion: the model's data are the autoencoder's latents.
    from diffusax.programs import setup_latent
    latent = setup_latent.describe(s, data)
    data = latent.description()
    if s.loss.objective == "vdm":
      raise ConfigError("diffusion.objective='vdm' models discrete pixel data; a latent model's data are continuous "
                        "latents (latent.autoencoder_workdir): use the 'simple' objective")
  s = settings_lib.with_null_class(s, data.num_classes)
  cond_shape = None
  if s.task.enabled:  # The task's condition image sets the network's extra inputs (and so its signature).
    if data.transform != "image":
      raise ConfigError(f"task.name={s.task.name!r} conditions on images; {s.data.name!r} holds vectors of shape "
                        f"{tuple(data.shape)}")
    cond_shape = s.task.image_shape(data.shape)
    s = dataclasses.replace(s, model_kwargs={**s.model_kwargs, **s.task.network_kwargs(data.shape)})
  # L_vlb's first-step decoder (hybrid objective): 8-bit images are discretised, vectors continuous.
  s = dataclasses.replace(s, loss=dataclasses.replace(
      s.loss, decoder="discretized" if data.transform == "image" else "gaussian"))
  model_settings = s.model_settings() if latent is None else {**s.model_settings(), "latent": latent.identity()}
  if s.loss.objective == "vdm" and data.transform != "image":
    raise ConfigError(f"diffusion.objective='vdm' models discrete data (images on data.levels values); dataset "
                      f"{s.data.name!r} holds continuous vectors of shape {tuple(data.shape)}")
  try:
    mesh = mesh_lib.make_mesh(s.mesh_shape, devices)
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None
  module = build_module(s, data.num_classes)
  param_init = make_param_init(s, module, data.shape, cond_shape)
  boxed = abstract_init(s, module, data.shape, param_init, cond_shape)
  abstract_params = mesh_lib.unbox(boxed)
  try:
    param_shardings = mesh_lib.param_shardings(boxed, mesh, strict=s.mesh_strict)
  except mesh_lib.ShardingError as e:
    why = " (mesh.strict_sharding=True refuses to replicate it)" if s.mesh_strict else ""
    raise ConfigError(f"{e}{why}") from None
  return ModelSetup(s=s, mesh=mesh, module=module, schedule=s.schedule, data=data, num_classes=data.num_classes,
                    sample_shape=tuple(data.shape), abstract_params=abstract_params,
                    param_shardings=param_shardings,
                    signature=ckpt_lib.model_signature(abstract_params, model_settings), param_init=param_init,
                    sharding_summary=mesh_lib.sharding_summary(mesh_lib.placements(boxed, mesh, strict=s.mesh_strict),
                                                               mesh), latent=latent, cond_shape=cond_shape)


def follow_params(opt_state, param_sh, mesh):
  """Shardings of an optax state: every subtree shaped like the params (Adam's moments) takes the params'
  shardings, the rest (counts) is replicated."""
  ptd = jax.tree.structure(param_sh)
  rep = mesh_lib.replicated(mesh)
  is_params = lambda x: jax.tree.structure(x) == ptd  # noqa: E731
  return jax.tree.map(lambda x: param_sh if is_params(x) else rep, opt_state, is_leaf=is_params)


def state_shardings(abstract_state, param_sh, mesh):
  """Shardings for a TrainState: params/EMA/optimizer moments follow the params, the rest replicated."""
  rep = mesh_lib.replicated(mesh)
  return state_lib.TrainState(step=rep, params=param_sh, ema_params=tuple(param_sh for _ in abstract_state.ema_params),
                              opt_state=follow_params(abstract_state.opt_state, param_sh, mesh), rng=rep,
                              aux=jax.tree.map(lambda _: rep, abstract_state.aux))


def to_global(batch: dict, mesh) -> dict:
  """This process' rows -> global arrays sharded over (data, fsdp)."""
  return {k: jax.make_array_from_process_local_data(mesh_lib.batch_sharding(mesh, v.ndim), v)
          for k, v in batch.items()}


def open_checkpointer(u: ModelSetup, workdir: str, logger: Logger | None = None) -> ckpt_lib.Checkpointer:
  s = u.s
  return ckpt_lib.Checkpointer(storage.join(workdir, "checkpoints"), keep=s.train.keep_checkpoints,
                               async_save=s.train.async_checkpoints,
                               replicated_sharding=mesh_lib.replicated(u.mesh),
                               log=logger.info if logger is not None else print,
                               allow_unverified=s.train.allow_unverified_restore)


def open_snapshots(u: ModelSetup, workdir: str, logger: Logger | None = None) -> ckpt_lib.Checkpointer:
  """The power-function EMA snapshots (every one kept; checksummed and signed like checkpoints)."""
  s = u.s
  return ckpt_lib.Checkpointer(storage.join(workdir, SNAPSHOT_DIR), keep=None, async_save=s.train.async_checkpoints,
                               replicated_sharding=mesh_lib.replicated(u.mesh),
                               log=logger.info if logger is not None else print,
                               allow_unverified=s.train.allow_unverified_restore)


def restore_ema(u: ModelSetup, workdir: str, step: int = -1, logger: Logger | None = None):
  """(first EMA params on the mesh, checkpoint step) from WORKDIR/checkpoints.

  Reads state.ema_params[0] alone (orbax partial restore): no parameters,
  optimizer moments or other EMAs are read, and no optimizer is built. The
  arrays are verified against the checksums recorded at save.
  """
  params, step, _ = restore_ema_with_meta(u, workdir, step, logger)
  return params, step


def restore_ema_with_meta(u, workdir: str, step: int = -1, logger: Logger | None = None):
  """`restore_ema` plus the checkpoint's meta. `u`: any set-up with s, mesh, abstract_params,
  param_shardings and signature (a ModelSetup, or the autoencoder's AESetup)."""
  ckpt = open_checkpointer(u, workdir, logger)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise ConfigError(f"no checkpoint in {ckpt.directory}; train first (--mode=train) or pass the run's --workdir")
    if step >= 0 and step not in steps:
      raise ConfigError(f"sample.checkpoint_step={step} is not in {ckpt.directory}; it has {sorted(steps)}")
    step = max(steps) if step < 0 else step
    abstract = ckpt_lib.abstract_like(u.abstract_params, u.param_shardings)
    params, meta = ckpt.restore(abstract, u.signature, step=step, part=EMA_PART)
  finally:
    ckpt.close()
  return params, int(step), meta


@dataclasses.dataclass(frozen=True)
class GuideModel:
  """The guiding model of autoguidance: its set-up, first-EMA params and where they came from."""
  setup: ModelSetup
  params: Any
  step: int
  workdir: str

  @property
  def tag(self) -> str:
    return f"{storage.resolve(self.workdir)}@{self.step}"

  @property
  def guide(self) -> job_lib.Guide:
    return job_lib.Guide(self.setup.module, self.setup.s.loss.target)


def check_guide(s: Settings) -> None:
  """Refuses a sample.guide_workdir without checkpoints before any device work (a look at the folder only)."""
  wd = s.sample.guide_workdir
  d = storage.join(wd, "checkpoints") if wd else ""
  if wd and not any(n.isdigit() for n in storage.listdir(d)):
    raise ConfigError(f"sample.guide_workdir={wd}: no checkpoint in {d} (the guiding model's run directory)")


def checkpoint_model(u: ModelSetup, wd: str, step: int, wd_key: str, step_key: str, logger: Logger | None = None):
  """(step, the model part of its signature) of another run's checkpoint (step < 0: the latest), refused
  with the config keys that named it when there is none or the step is missing."""
  ckpt = open_checkpointer(u, wd, logger)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise ConfigError(f"{wd_key}={wd}: no checkpoint in {ckpt.directory}")
    step = max(steps) if step < 0 else step
    if step not in steps:
      raise ConfigError(f"{step_key}={step} is not in {ckpt.directory}; it has {sorted(steps)}")
    return step, ckpt.read_meta(step).get("signature", {}).get("model", {})
  finally:
    ckpt.close()


def restore_guide(u: ModelSetup, logger: Logger | None = None) -> GuideModel | None:
  """The guiding model of sample.guide_workdir (None when it is ""), EMA params on u's mesh.

  Its network is rebuilt from its own checkpoint's signature (model name and
  options, target, class conditioning), so it may be smaller or differently
  configured than the main model; its dataset, schedule and conditioning must
  match the main model's (refused otherwise, before any array is read).
  """
  s = u.s
  wd = s.sample.guide_workdir
  if not wd:
    return None
  step, model = checkpoint_model(u, wd, s.sample.guide_step, "sample.guide_workdir", "sample.guide_step", logger)
  mine = u.signature["model"]
  for key in ("schedule", "class_conditional"):
    if model.get(key) != mine.get(key):
      raise ConfigError(f"sample.guide_workdir={wd}: the guiding model has {key} {model.get(key)!r}, the main "
                        f"model {mine.get(key)!r}; autoguidance needs a guide of the same task")
  from diffusax import nn
  if model.get("name") not in nn.NETWORKS:
    raise ConfigError(f"sample.guide_workdir={wd}: its checkpoint names no known network ({model.get('name')!r})")
  gs = dataclasses.replace(s, model_name=model["name"],
                           model_kwargs={**(dict(s.model_kwargs) if s.model_name == model["name"] else {}),
                                         **json_tuples(model.get("kwargs", {}))},
                           loss=dataclasses.replace(s.loss, target=model["target"]))
  gu = model_setup(gs, list(u.mesh.devices.flat), data=u.data)
  params, step = restore_ema(gu, wd, step, logger)
  return GuideModel(setup=gu, params=params, step=step, workdir=wd)


def json_tuples(v):
  """JSON lists (from a signature) back to the tuples the network options use."""
  if isinstance(v, dict):
    return {k: json_tuples(x) for k, x in v.items()}
  if isinstance(v, list):
    return tuple(json_tuples(x) for x in v)
  return v


def job_spec(u: ModelSetup, step: int, num_samples: int | None = None,
             guide: GuideModel | None = None, base=None) -> job_lib.JobSpec:
  s = u.s
  ncls = u.num_classes if s.class_conditional else None
  if ncls and s.sample.labels and not all(0 <= v < ncls for v in s.sample.labels):
    raise ConfigError(f"sample.labels must lie in [0, {ncls}), got {list(s.sample.labels)}")
  if not ncls and s.sample.labels:
    raise ConfigError("sample.labels given but the model is unconditional")
  fields = {}
  if s.task.enabled:
    from diffusax.programs import setup_task
    fields = setup_task.job_fields(u, base)
  return job_lib.JobSpec(**fields, num_samples=num_samples or s.sample.num_samples, shard_size=s.sample.shard_size,
                         seed=s.sample.seed, method=s.sample.method, num_steps=s.sample.num_steps,
                         eta=s.sample.eta, guidance_scale=s.sample.guidance_scale, labels=tuple(s.sample.labels),
                         num_classes=ncls, checkpoint_step=step, sample_shape=tuple(u.sample_shape),
                         guide=guide.tag if guide is not None else "",
                         guidance_interval=tuple(s.sample.guidance_interval), clip_x0=s.sample.clip_x0,
                         spacing=s.sample.spacing, order=s.sample.order,
                         decoder=u.latent.tag if u.latent is not None else "")


def default_out_dir(workdir: str, spec: job_lib.JobSpec) -> str:
  guided = f"_auto{spec.guide.rsplit('@', 1)[1]}" if spec.guide else ""
  interval = "" if tuple(spec.guidance_interval) == (0.0, 1.0) else "_t{:g}-{:g}".format(*spec.guidance_interval)
  clip = f"_clip{spec.clip_x0:g}" if spec.clip_x0 else ""
  clip += (f"_{spec.spacing}" if spec.spacing else "") + (f"_order{spec.order}" if spec.order else "")
  if spec.task:  # A conditional model: where the conditions come from and their level.
    clip += ("_cascade" + ("_trunc" if spec.truncated else "") + f"_bw{spec.base_guidance_scale:g}"
             if spec.conditions.startswith("cascade:") else "_heldout") + f"_s{spec.aug_level:g}"
  return storage.join(workdir, "samples", f"step{spec.checkpoint_step}_{spec.method}{spec.num_steps}"
                      f"_w{spec.guidance_scale:g}{guided}{interval}{clip}_seed{spec.seed}")


def job_fn(u: ModelSetup, spec: job_lib.JobSpec, guide: GuideModel | None = None, base=None):
  """The sampling job's function of `spec`: `job_lib.make_sample_fn`, or a conditional task's
  (`setup_task.job_fn`: held-out conditions, or the cascade of `base` then this model)."""
  s = u.s
  if s.task.enabled:
    from diffusax.programs import setup_task
    return setup_task.job_fn(u, spec, base)
  return job_lib.make_sample_fn(u.module, u.schedule, s.loss.target, spec, null_class=s.loss.null_class,
                                guide=guide.guide if guide is not None else None)


def run_sample_job(u: ModelSetup, params, spec: job_lib.JobSpec, out_dir: str, logger: Logger,
                   sample_fn=None, guide: GuideModel | None = None, base=None) -> dict:
  """Runs (or finishes) the job and writes its grid; returns the job's summary with the grid path.

  `sample_fn`: `job_lib.make_sample_fn`'s function for `spec`, when the caller keeps one to reuse
  (the same function object is jitted without retracing); default: a new one.
  `guide`: autoguidance's guiding model (`restore_guide`); `params` are then the main model's alone.
  """
  s = u.s
  fn = sample_fn or job_fn(u, spec, guide, base)
  if guide is not None:
    params = (params, guide.params)
  if s.task.enabled:  # A conditional model: the held-out conditions, or the cascade's base stage.
    from diffusax.programs import setup_task
    inputs_for = None if base is not None else setup_task.held_out_inputs(u)
    if base is not None:
      params = (params, base.params)
    out = job_lib.run_job(fn, params, spec, out_dir, u.mesh, log=logger.info, inputs_for=inputs_for)
    if jax.process_index() == 0:
      out["grid"] = setup_task.write_grid(out_dir)
    return out
  if u.latent is not None:  # Latent samples are decoded to images inside the same jitted function.
    from diffusax.programs import setup_latent
    fn = setup_latent.decoding(fn, u.latent)
    params = (params, u.latent.params(u.mesh, logger.info))
  is_image = len(u.sample_shape) == 3
  out = job_lib.run_job(fn, params, spec, out_dir, u.mesh, log=logger.info, is_image=is_image)
  if jax.process_index() == 0:
    out["grid"] = job_lib.write_grid(out_dir, s.sample.per_class, spec.num_classes, is_image)
  return out
