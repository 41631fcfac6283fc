"""What the programs share about conditional tasks (`task.*`): the held-out conditions, the sample
grid (condition | sample | ground truth) and the held-out metrics of a conditional model.

Held-out example i (of `data.eval_split`, else the training split) is the condition of sample i, with
its label; sample i's noise comes from fold_in(key, i) (`sampling.generate`), so a grid or a metric
is a function of (seed, indices) alone.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusax import storage
from diffusax.data import pipeline, tasks
from diffusax.programs.errors import ConfigError
from diffusax.sampling import generate

GRID_EXAMPLES = 8  # Columns of a conditional task's sample grid.
METRIC_EXAMPLES = 256  # Held-out examples of the end-of-training task metrics.


def held_out(u, n: int) -> dict:
  """The first n held-out examples through the evaluation transform and the task: 'x', 'label',
  'cond_image' and the task's own keys (numpy)."""
  s = u.s
  split = s.data.eval_split or s.data.split
  source = pipeline.open_source(s.data.name, split, s.data.data_dir)
  n = min(n, len(source))
  idx = np.arange(n)
  base = pipeline.make_transform(u.data.transform, s.data, train=False)
  return tasks.Conditioned(base, s.task.make())(pipeline.read(source, idx), s.seed, np.zeros(n, np.int64), idx)


def view(u, batch: dict) -> np.ndarray:
  """uint8 [N, H, W, C] pictures of the conditions: the low-resolution image (nearest-upscaled), the
  luma as grey RGB, the masked image (holes mid-grey)."""
  name, x = u.s.task.name, batch["x"]
  if name == "super_resolution":
    f = x.shape[1] // batch["low_res"].shape[1]
    img = batch["low_res"].repeat(f, 1).repeat(f, 2)
  elif name == "colorization":
    img = np.repeat(batch["gray"], x.shape[-1], axis=-1)
  else:
    img = batch["masked"]
  return generate.to_uint8(img)


def make_generator(u, spec: generate.SamplerSpec | None = None):
  """The conditional generator of the config's sampler (or `spec`)."""
  s = u.s
  spec = spec or generate.SamplerSpec(s.sample.method, s.sample.num_steps, s.sample.eta, s.sample.clip_x0,
                                      s.sample.spacing, s.sample.order)
  return generate.make_generate_conditional(u.module, u.schedule, s.loss.target, spec, null_class=s.loss.null_class,
                                            sample_shape=u.sample_shape)


def generate_for(u, gen, params, batch: dict, key=None) -> np.ndarray:
  """float32 samples [N, *shape] for the held-out `batch` (its conditions and labels), noise per index."""
  s = u.s
  n = len(batch["x"])
  labels = jnp.asarray(batch["label"], jnp.int32) if s.loss.null_class is not None else None
  key = jax.random.fold_in(jax.random.key(s.seed), 0x7A5C) if key is None else key
  return np.asarray(gen(params, np.arange(n), labels, jnp.asarray(batch["cond_image"]),
                        jnp.float32(s.task.aug_level), jnp.float32(s.sample.guidance_scale), key))


def write_samples(u, params, step: int, workdir: str, logger, gen=None) -> str:
  """samples.png: the conditions (top row), the samples (middle) and the ground truth (bottom) of the first
  held-out examples."""
  gen = gen or make_generator(u)
  batch = held_out(u, GRID_EXAMPLES)
  out = generate_for(u, gen, params, batch)
  rows = np.concatenate([view(u, batch), generate.to_uint8(out), generate.to_uint8(batch["x"])])
  img = generate.image_grid(rows, 3, upscale=max(1, 64 // u.sample_shape[0]))
  path = storage.join(workdir, "samples.png")
  if jax.process_index() == 0:
    generate.save_png(path, img)
    generate.save_png(storage.join(workdir, f"samples_{step:07d}.png"), img)
    logger.image("samples", img, step)
  return path


def upsample_bicubic(low: np.ndarray, size: tuple) -> np.ndarray:
  """uint8 [N, h, w, C] -> [N, H, W, C], PIL's bicubic filter (the super-resolution baseline)."""
  from PIL import Image
  out = []
  for im in low:
    c = im.shape[-1]
    p = Image.fromarray(im[..., 0] if c == 1 else im).resize((size[1], size[0]), Image.BICUBIC)
    a = np.asarray(p)
    out.append(a[..., None] if c == 1 else a)
  return np.stack(out)


def metrics(u, params, gen=None, n: int = METRIC_EXAMPLES) -> dict:
  """Held-out quality of a conditional model: PSNR and SSIM of its samples against the ground truth, and of
  its posterior mean E[x | condition] (DDIM's single step from the prior: the x0-prediction, the
  MSE-optimal estimate, blurred where the samples are sharp);
  super-resolution also the bicubic upsampling of the same low-resolution inputs; inpainting also the
  error on the known pixels (RMS in [-1, 1] units; the sampler regenerates them)."""
  from diffusax.evaluation import reconstruction
  gen = gen or make_generator(u)
  batch = held_out(u, n)
  out = generate_for(u, gen, params, batch)
  real, fake = generate.to_uint8(batch["x"]), generate.to_uint8(out)
  # The posterior mean E[x | condition]: one DDIM step from t_max, i.e. the model's x0-prediction at the prior.
  mean = generate.to_uint8(generate_for(u, make_generator(u, generate.SamplerSpec("ddim", 1)), params, batch))
  quality = lambda x: {"psnr": float(np.mean(reconstruction.psnr(real, x))),  # noqa: E731
                       "ssim": float(np.mean(reconstruction.ssim(real, x)))}
  result = {"examples": int(len(real)), "split": u.s.data.eval_split or u.s.data.split, "task": u.s.task.name,
            "aug_level": u.s.task.aug_level, "sampler": f"{u.s.sample.method} x {u.s.sample.num_steps}",
            "model": quality(fake), "posterior_mean": quality(mean)}
  if u.s.task.name == "super_resolution":
    base = upsample_bicubic(generate.to_uint8(batch["low_res"]), real.shape[1:3])
    result["bicubic"] = {"psnr": float(np.mean(reconstruction.psnr(real, base))),
                         "ssim": float(np.mean(reconstruction.ssim(real, base)))}
  if u.s.task.name == "inpainting":
    m = batch["mask"]
    err = (out - batch["x"]) * m
    result["known_rms"] = float(np.sqrt(np.sum(err ** 2) / max(np.sum(m) * out.shape[-1], 1)))
  return result


# --- sampling jobs of a conditional model: conditions from the held-out split, or a cascade's base stage ---

@dataclasses.dataclass(frozen=True)
class BaseStage:
  """A cascade's first stage (cascade.base_workdir): its set-up (network rebuilt from its checkpoint's
  signature), EMA parameters on the main model's mesh, and checkpoint step."""
  setup: Any
  params: Any
  step: int
  workdir: str

  @property
  def tag(self) -> str:
    return f"cascade:{self.workdir}@{self.step}"


def restore_base(u, logger=None) -> BaseStage | None:
  """The base stage of cascade.base_workdir (None when it is ""): a model of the same data at the
  super-resolution stage's condition resolution, rebuilt from its own checkpoint's signature."""
  from diffusax import nn
  from diffusax.programs import setup as setup_lib
  s = u.s
  wd = s.task.base_workdir
  if not wd:
    return None
  step, model = setup_lib.checkpoint_model(u, wd, s.task.base_step, "cascade.base_workdir", "cascade.base_step", logger)
  if model.get("task"):
    raise ConfigError(f"cascade.base_workdir={wd}: its model is itself conditional (task {model['task']}); a "
                      "cascade's base stage generates from labels alone")
  if model.get("class_conditional") != s.class_conditional:
    raise ConfigError(f"cascade.base_workdir={wd}: the base model has class_conditional "
                      f"{model.get('class_conditional')!r}, this stage {s.class_conditional!r}")
  if model.get("name") not in nn.NETWORKS:
    raise ConfigError(f"cascade.base_workdir={wd}: its checkpoint names no known network ({model.get('name')!r})")
  from diffusax.programs.task_settings import TaskSettings
  bs = dataclasses.replace(s, model_name=model["name"], model_kwargs=setup_lib.json_tuples(model.get("kwargs", {})),
                           schedule_name=model.get("schedule", s.schedule_name), schedule_kwargs={},
                           loss=dataclasses.replace(s.loss, target=model["target"]), task=TaskSettings())
  data = dataclasses.replace(u.data, shape=tuple(u.cond_shape))
  bu = setup_lib.model_setup(bs, list(u.mesh.devices.flat), data=data)
  params, step = setup_lib.restore_ema(bu, wd, step, logger)
  return BaseStage(setup=bu, params=params, step=step, workdir=wd)


def job_fields(u, base: BaseStage | None) -> dict:
  """The JobSpec fields of a conditional model's sampling job."""
  t = u.s.task
  split = u.s.data.eval_split or u.s.data.split
  return {"task": json.dumps(t.identity(), sort_keys=True), "cond_shape": tuple(u.cond_shape),
          "conditions": base.tag if base is not None else f"held_out:{split}", "aug_level": t.aug_level,
          "truncated": bool(t.truncated), "base_guidance_scale": t.base_guidance_scale if base is not None else 0.0}


def job_fn(u, spec, base: BaseStage | None = None) -> Callable:
  """The sampling job's function of a conditional model: conditions from the held-out split (run_job's
  inputs_for), or the cascade of `base` then this stage."""
  from diffusax.sampling import job as job_lib
  s = u.s
  sr = job_lib.make_conditional_sample_fn(u.module, u.schedule, s.loss.target, spec, null_class=s.loss.null_class)
  if base is None:
    return sr
  b = base.setup
  base_spec = dataclasses.replace(spec, sample_shape=tuple(u.cond_shape), guidance_scale=spec.base_guidance_scale)
  base_fn = job_lib.make_sample_fn(b.module, b.schedule, b.s.loss.target, base_spec, null_class=b.s.loss.null_class,
                                   stream=BASE_STREAM, t_stop=s.task.aug_level if s.task.truncated else None)
  scale = jnp.float32(spec.base_guidance_scale)
  return job_lib.make_cascade_fn(lambda p, i, y: base_fn(p, i, y, scale), sr)


BASE_STREAM = 0xBA5E  # A cascade's base stage draws from fold_in(key(seed), BASE_STREAM).


def held_out_inputs(u) -> Callable:
  """inputs_for(indices) -> (labels, condition images) of held-out examples indices mod N (run_job)."""
  source = pipeline.open_source(u.s.data.name, u.s.data.eval_split or u.s.data.split, u.s.data.data_dir)
  batch = held_out(u, len(source))
  n = len(batch["x"])

  def inputs_for(indices):
    idx = np.asarray(indices, np.int64) % n
    return np.asarray(batch["label"], np.int32)[idx], batch["cond_image"][idx]

  return inputs_for


def write_grid(out_dir: str, columns: int = GRID_EXAMPLES) -> str:
  """samples.png of a conditional job: its first conditions (nearest-upscaled to the samples' size) over
  their samples."""
  from diffusax.sampling import job as job_lib
  d = job_lib.load(out_dir)
  x, c = d["samples"][:columns], d["conditions"][:columns]
  if c.shape[-1] == x.shape[-1] + 1:  # Inpainting: the masked image (its last channel is the mask).
    c = c[..., :x.shape[-1]]
  elif c.shape[-1] != x.shape[-1]:  # Colourisation: the grey image as RGB.
    c = np.repeat(c[..., :1], x.shape[-1], axis=-1)
  f = x.shape[1] // c.shape[1]
  c = c.repeat(f, 1).repeat(f, 2)
  img = generate.image_grid(np.concatenate([c, x]), 2, upscale=max(1, 64 // x.shape[1]))
  path = storage.join(out_dir, "samples.png")
  generate.save_png(path, img)
  return path
