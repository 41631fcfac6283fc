"""What the programs share about conditional tasks (`task.*`): the held-out conditions, the sample
grid (condition | sample | ground truth) and the held-out metrics of a conditional model.

Held-out example i (of `data.eval_split`, else the training split) is the condition of sample i, with
its label; sample i's noise comes from fold_in(key, i) (`sampling.generate`), so a grid or a metric
is a function of (seed, indices) alone.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusax import storage
from diffusax.data import pipeline, tasks
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


def make_generator(u):
  s = u.s
  spec = generate.SamplerSpec(s.sample.method, s.sample.num_steps, s.sample.eta, s.sample.clip_x0,
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
  """Held-out quality of a conditional model: PSNR and SSIM of its samples against the ground truth;
  super-resolution also the bicubic upsampling of the same low-resolution inputs; inpainting also the
  error on the known pixels (RMS in [-1, 1] units; the sampler regenerates them)."""
  from diffusax.evaluation import reconstruction
  gen = gen or make_generator(u)
  batch = held_out(u, n)
  out = generate_for(u, gen, params, batch)
  real, fake = generate.to_uint8(batch["x"]), generate.to_uint8(out)
  result = {"examples": int(len(real)), "split": u.s.data.eval_split or u.s.data.split, "task": u.s.task.name,
            "aug_level": u.s.task.aug_level, "sampler": f"{u.s.sample.method} x {u.s.sample.num_steps}",
            "model": {"psnr": float(np.mean(reconstruction.psnr(real, fake))),
                      "ssim": float(np.mean(reconstruction.ssim(real, fake)))}}
  if u.s.task.name == "super_resolution":
    base = upsample_bicubic(generate.to_uint8(batch["low_res"]), real.shape[1:3])
    result["bicubic"] = {"psnr": float(np.mean(reconstruction.psnr(real, base))),
                         "ssim": float(np.mean(reconstruction.ssim(real, base)))}
  if u.s.task.name == "inpainting":
    m = batch["mask"]
    err = (out - batch["x"]) * m
    result["known_rms"] = float(np.sqrt(np.sum(err ** 2) / max(np.sum(m) * out.shape[-1], 1)))
  return result
