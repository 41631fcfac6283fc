"""Image-conditioned diffusion in the training program (`task.*`): each example becomes (target, condition
image) by data.tasks, the step conditions the network on it (noise-conditioning augmentation, CFG image
dropout), a conditional run resumes bit-identically, its grid and metrics come from held-out examples,
and what cannot work is refused before any device work.

One tiny DiT on the photos at 16x16 (super-resolution from 8x8): a few seconds of compile, shared by the
tests of this module (one pytest-xdist worker: `--dist loadfile`)."""
from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

import photos as photos_config  # noqa: E402
from diffusax.programs import settings as settings_lib  # noqa: E402
from diffusax.programs import train  # noqa: E402
from diffusax.programs.settings import ConfigError  # noqa: E402

SR = {"task.name": "super_resolution", "task.factor": 2, "task.aug_max": 0.3, "task.image_dropout": 0.2,
      "sample.aug_level": 0.1}


def _set(c, over):
  for k, v in over.items():
    *parents, leaf = k.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def _config(data_dir, **over):
  c = photos_config.get_config()
  c.data.data_dir = data_dir
  c.model.name = "dit"
  base = {"data.image_size": 16, "model.dit.patch_size": 4, "model.dit.hidden_size": 16, "model.dit.depth": 1,
          "model.dit.num_heads": 2, "model.dit.frequency_dim": 16, "train.batch_size": 8, "train.num_steps": 8,
          "train.log_every": 4, "train.ckpt_every": 4, "train.eval_every": 0, "train.eval_batches": 1,
          "sample.num_steps": 3, "sample.guidance_scale": 1.0, **SR}
  return _set(c, {**base, **over})


@pytest.fixture(scope="module")
def sr_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("tasks")
  data_dir, wd = str(root / "tfds"), str(root / "ref")
  result = train.train_and_evaluate(settings_lib.parse(_config(data_dir)), wd)
  return {"data_dir": data_dir, "workdir": wd, "result": result, "root": root}


def test_a_conditional_run_resumes_bit_identically(sr_run):
  """8 steps straight against 4 steps then a resume from the step-4 checkpoint alone: the condition
  (from each example's index), its augmentation level and its dropout are drawn from (seed, step), so every
  array of the step-8 state is identical."""
  import jax
  import orbax.checkpoint as ocp
  cut = str(sr_run["root"] / "cut")
  shutil.copytree(os.path.join(sr_run["workdir"], "checkpoints", "4"), os.path.join(cut, "checkpoints", "4"))
  train.train_and_evaluate(settings_lib.parse(_config(sr_run["data_dir"])), cut)
  restore = lambda wd: ocp.StandardCheckpointer().restore(os.path.join(wd, "checkpoints", "8", "state"))
  a, b = restore(sr_run["workdir"]), restore(cut)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_the_network_takes_the_condition_and_the_signature_names_the_task(sr_run):
  """The DiT was built with the task's inputs: 3 condition channels (the 8x8 low-resolution RGB image), the
  augmentation level and the has-image flag of image dropout; the checkpoint's signature records the task."""
  import json
  from diffusax.programs import setup as setup_lib
  s = settings_lib.parse(_config(sr_run["data_dir"]))
  u = setup_lib.model_setup(s)
  assert u.cond_shape == (8, 8, 3)
  assert (u.module.low_res_channels, u.module.aug_embed, u.module.cond_dropout) == (3, True, True)
  # The patch embedding sees x (3) + the resized condition (3) + has_image (1) channels.
  kernel = u.abstract_params["x_embedder"]["kernel"]
  assert kernel.shape[2] == 7, kernel.shape
  assert u.signature["model"]["task"] == {"name": "super_resolution", "factor": 2, "aug": True, "image_dropout": True}
  meta_dir = os.path.join(sr_run["workdir"], "checkpoints", "8")
  assert os.path.isdir(meta_dir)
  with open(os.path.join(sr_run["workdir"], "metrics.json")) as f:
    m = json.load(f)
  # Held-out metrics of the samples and of bicubic upsampling of the same 8x8 inputs (256 test crops).
  t = m["task"]
  assert t["task"] == "super_resolution" and t["examples"] == 256 and t["aug_level"] == 0.1
  assert 0 < t["model"]["psnr"] < 60 and -1 <= t["model"]["ssim"] <= 1
  assert 0 < t["posterior_mean"]["psnr"] < 60 and -1 <= t["posterior_mean"]["ssim"] <= 1
  assert 20 < t["bicubic"]["psnr"] < 60 and t["bicubic"]["ssim"] > 0.5


def test_the_grid_shows_condition_sample_and_ground_truth(sr_run):
  """samples.png: three rows of 8 held-out examples (condition nearest-upscaled, sample, ground truth),
  16x16 images upscaled 4x with 1-pixel gaps; its bottom row is the test split's first crops."""
  from PIL import Image
  from diffusax.data import pipeline
  img = np.asarray(Image.open(os.path.join(sr_run["workdir"], "samples.png")))
  up, side = 4, 16
  assert img.shape == (3 * (side + 1) * up - up, 8 * (side + 1) * up - up, 3), img.shape
  source = pipeline.open_source("photos", "test", sr_run["data_dir"])
  truth = pipeline.ImageTransform(image_size=side, train=False)(pipeline.read(source, np.arange(8)), 0, np.zeros(8),
                                                                np.arange(8))["x"]
  from diffusax.sampling import generate
  cell = img[2 * (side + 1) * up:2 * (side + 1) * up + side * up:up, 0:side * up:up]
  np.testing.assert_array_equal(cell, generate.to_uint8(truth[0]))
  # The top row's first cell is the 8x8 area average of that crop, each value repeated 2x2.
  low = truth[0].reshape(8, 2, 8, 2, 3).mean(axis=(1, 3))
  top = img[0:side * up:up, 0:side * up:up]
  np.testing.assert_allclose(top.astype(int), generate.to_uint8(low.repeat(2, 0).repeat(2, 1)).astype(int), atol=1)


def test_a_checkpoint_of_another_task_is_refused(sr_run, tmp_path):
  """Sampling or resuming the super-resolution checkpoint as a colorization model (other network inputs,
  another task in the signature) is refused by the signature check, before any step."""
  from diffusax.checkpoint import CheckpointMismatch
  wd = str(tmp_path / "run")
  shutil.copytree(os.path.join(sr_run["workdir"], "checkpoints", "8"), os.path.join(wd, "checkpoints", "8"))
  traces = train.TraceCounts()
  over = {"task.name": "colorization", "task.aug_max": 0.0, "task.image_dropout": 0.0, "sample.aug_level": 0.0,
          "train.num_steps": 12}
  with pytest.raises(CheckpointMismatch, match="different model"):
    train.train_and_evaluate(settings_lib.parse(_config(sr_run["data_dir"], **over)), wd, traces=traces)
  assert "train_step" not in traces


@pytest.mark.parametrize("over,match", [
    ({"task.name": "deblur"}, r"unknown task.name 'deblur'; allowed: \['generate', 'super_resolution'"),
    ({"task.name": "inpainting", "task.mask_kind": "blob"}, r"unknown task.mask_kind 'blob'"),
    ({"task.aug_max": 0.0}, r"sample.aug_level=0.1: a model trained without noise-conditioning augmentation"),
    ({"task.name": "generate", "task.aug_max": 0.0, "sample.aug_level": 0.0},
     r"task.image_dropout conditions on an image, and task.name='generate' has none"),
    ({"task.aug_max": 1.0}, r"task.aug_max must lie in \[0, 1\)"),
    ({"task.image_dropout": 1.5}, r"task.image_dropout must lie in \[0, 1\]"),
    ({"task.factor": 0}, r"task.factor must be a positive integer"),
    ({"model.name": "mlp"}, r"model.name must be 'unet' or 'dit', not 'mlp'"),
    ({"diffusion.objective": "hybrid", "model.dit.learn_sigma": True},
     r"conditional tasks train the 'simple' objective"),
    ({"mesh.strategy": "pmap", "mesh.shape": (-1, 1)}, r"runs on mesh.strategy='mesh'"),
    ({"model.dit.low_res_channels": 3}, r"model.dit.low_res_channels is set by the task"),
    ({"latent.autoencoder_workdir": "/nowhere"}, r"latent diffusion .* does not take an image condition"),
])
def test_settings_that_cannot_work_are_refused(tmp_path, over, match):
  with pytest.raises(ConfigError, match=match):
    settings_lib.parse(_config(str(tmp_path), **over))


def test_a_task_the_data_cannot_take_is_refused_before_device_work(tmp_path):
  """Super-resolution by a factor that does not divide the image, colorization of grey digits: one
  ConfigError from the model set-up, naming the sizes or channels."""
  from diffusax.programs import setup as setup_lib
  s = settings_lib.parse(_config(str(tmp_path), **{"task.factor": 3}))
  with pytest.raises(ConfigError, match=r"task: super_resolution: image size 16x16 is not divisible by factor 3"):
    setup_lib.model_setup(s)
  import digits as digits_config
  c = digits_config.get_config()
  c.data.data_dir = str(tmp_path)
  c.task.name = "colorization"
  with pytest.raises(ConfigError, match=r"colorization needs 3 \(RGB\) channels"):
    setup_lib.model_setup(settings_lib.parse(c))


def _base_config(data_dir, **over):
  """The base stage of the tiny cascade: the photos at 8x8, class-conditional, the same tiny DiT."""
  c = photos_config.get_config()
  c.data.data_dir = data_dir
  c.model.name = "dit"
  base = {"data.image_size": 8, "model.dit.patch_size": 4, "model.dit.hidden_size": 16, "model.dit.depth": 1,
          "model.dit.num_heads": 2, "model.dit.frequency_dim": 16, "train.batch_size": 8, "train.num_steps": 4,
          "train.log_every": 4, "train.ckpt_every": 4, "train.eval_every": 0, "train.eval_batches": 1,
          "sample.num_steps": 3}
  return _set(c, {**base, **over})


@pytest.mark.parametrize("truncated", [False, True])
def test_cascade_sampling_is_sharded_resumable_and_keeps_each_low_res_sample(sr_run, tmp_path, truncated):
  """--mode=sample of the super-resolution model with cascade.base_workdir: the base stage's sample i (8x8,
  its own noise stream) conditions sample i (16x16). Shards hold both; a shard removed and the job run
  again gives bit-identical files; the non-truncated low-res samples equal the base model's own
  sampling job (same seed, the base's stream), so the stages are chained, not re-drawn."""
  from diffusax.programs import sample as sample_program
  from diffusax.sampling import job as job_lib
  base_wd = str(sr_run["root"] / "base")
  if not os.path.isdir(base_wd):
    train.train_and_evaluate(settings_lib.parse(_base_config(sr_run["data_dir"])), base_wd)
  out_dir = str(tmp_path / "cascade")
  over = {"cascade.base_workdir": base_wd, "cascade.truncated": truncated, "sample.num_samples": 12,
          "sample.shard_size": 4, "sample.output_dir": out_dir, "cascade.base_guidance_scale": 0.5}
  s = settings_lib.parse(_config(sr_run["data_dir"], **over))
  sample_program.run(s, sr_run["workdir"])
  first = job_lib.digest(out_dir)
  d = job_lib.load(out_dir)
  assert d["samples"].shape == (12, 16, 16, 3) and d["conditions"].shape == (12, 8, 8, 3)
  np.testing.assert_array_equal(d["labels"], np.arange(12) % 10)
  assert os.path.exists(os.path.join(out_dir, "samples.png"))
  os.remove(os.path.join(out_dir, "shard_000001.npz"))
  sample_program.run(s, sr_run["workdir"])
  assert job_lib.digest(out_dir) == first
  np.testing.assert_array_equal(job_lib.load(out_dir)["conditions"], d["conditions"])
  if not truncated:
    from diffusax.programs import setup as setup_lib
    from diffusax.programs import setup_task
    u = setup_lib.model_setup(s)
    stage = setup_task.restore_base(u)
    spec = job_lib.JobSpec(num_samples=12, shard_size=4, seed=0, method=s.sample.method, num_steps=3, eta=0.0,
                           guidance_scale=0.5, num_classes=10, sample_shape=(8, 8, 3))
    fn = job_lib.make_sample_fn(stage.setup.module, stage.setup.schedule, stage.setup.s.loss.target, spec,
                                null_class=10, stream=setup_task.BASE_STREAM)
    import jax.numpy as jnp
    low = fn(stage.params, np.arange(12, dtype=np.uint32), np.arange(12, dtype=np.int32) % 10, jnp.float32(0.5))
    from diffusax.sampling import generate
    np.testing.assert_array_equal(generate.to_uint8(low), d["conditions"])


@pytest.mark.parametrize("method", ["dpm_solver_pp_2m", "ddpm"])
def test_held_out_super_resolution_job_conditions_on_the_test_crops(sr_run, tmp_path, method):
  """--mode=sample without a base stage: sample i is conditioned on test crop i mod 1000's 8x8 area average
  (stored beside it) and carries that crop's label; with a stochastic sampler (per-sample keys, vmapped)
  too, where sample i does not depend on the shard it was drawn in."""
  from diffusax.data import pipeline
  from diffusax.programs import sample as sample_program
  from diffusax.sampling import generate
  from diffusax.sampling import job as job_lib
  out_dir = str(tmp_path / "sr")
  s = settings_lib.parse(_config(sr_run["data_dir"], **{"sample.num_samples": 6, "sample.shard_size": 4,
                                                       "sample.output_dir": out_dir, "sample.method": method}))
  sample_program.run(s, sr_run["workdir"])
  d = job_lib.load(out_dir)
  source = pipeline.open_source("photos", "test", sr_run["data_dir"])
  ex = pipeline.read(source, np.arange(6))
  x = pipeline.ImageTransform(image_size=16, train=False)(ex, 0, np.zeros(6), np.arange(6))["x"]
  low = x.reshape(6, 8, 2, 8, 2, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(d["conditions"].astype(int), generate.to_uint8(low).astype(int), atol=1)
  np.testing.assert_array_equal(d["labels"], np.asarray(ex["label"]))
  if method == "ddpm":  # Shards of 3 instead of 4: the same samples.
    other = str(tmp_path / "sr3")
    s3 = settings_lib.parse(_config(sr_run["data_dir"], **{"sample.num_samples": 6, "sample.shard_size": 3,
                                                          "sample.output_dir": other, "sample.method": method}))
    sample_program.run(s3, sr_run["workdir"])
    np.testing.assert_array_equal(job_lib.load(other)["samples"], d["samples"])
