"""The training program: config errors, end-to-end runs of main, resume, compile counts."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from diffusax.programs import evaluate
from diffusax.programs import settings as settings_lib
from diffusax.programs import setup as setup_lib
from diffusax.programs import train
from diffusax.programs.settings import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import digits as digits_config  # noqa: E402
import toy2d as toy2d_config  # noqa: E402


def _toy(data_dir, **over):
  c = toy2d_config.get_config()
  c.data.data_dir = data_dir
  c.model.mlp.hidden = 32
  c.model.mlp.depth = 2
  c.train.batch_size = 64
  c.train.num_steps = 30
  c.train.log_every = 10
  c.train.ckpt_every = 10
  c.train.eval_batches = 1
  c.sample.num_steps = 4
  c.sample.per_class = 4
  return _override(c, over)


def _override(c, values: dict):
  """Sets dotted keys of config c, e.g. {"train.batch_size": 64}; returns c."""
  for k, v in values.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


# ---------------------------------------------------------------------------
# Bad input: refused before any device work, with what was wrong and what is allowed.

@pytest.mark.parametrize("key,value,match", [
    ("diffusion.schedule", "vp_linaer", r"unknown schedule 'vp_linaer'; allowed: \['ddpm_cosine'"),
    ("diffusion.target", "noise", r"unknown target 'noise'; allowed: \['eps', 'x0', 'v', 'score', 'flow'\]"),
    ("diffusion.weighting", "snr2", r"unknown loss weighting 'snr2'; allowed"),
    ("sample.method", "ddmp", r"unknown sample.method 'ddmp'; allowed"),
    ("ema.decays", (1.5,), r"ema.decays must be .* in \[0, 1\)"),
    ("model.dtype", "float16", r"model.dtype must be 'float32' or 'bfloat16'"),
    ("train.batch_size", 0, r"train.batch_size must be a positive integer, got 0"),
    ("model.mlp.learn_sigma", True, r"model.mlp.learn_sigma=True: the variance channels are trained only by "
                                    r"L_vlb; set diffusion.objective='hybrid' or 'vlb' \(got 'simple'\)"),
    ("diffusion.objective", "hybrid", r"diffusion.objective='hybrid' trains learned variances: set "
                                      r"model.mlp.learn_sigma=True"),
    ("diffusion.objective", "elbo", r"unknown objective 'elbo'; allowed: \['simple', 'hybrid', 'vdm', 'vlb'\]"),
    ("diffusion.schedule", "learned", r"diffusion.schedule='learned' is trained by the VDM ELBO only"),
    ("diffusion.variance_minimisation", True, r"diffusion.variance_minimisation=True trains a learned schedule"),
    ("diffusion.time_sampler", "importance", r"time sampler 'importance' is for the pure L_vlb objective"),
    ("data.levels", 1, r"data.levels must be an integer in \[2, 256\]"),
    ("data.workers", -1, r"data.workers must be an integer >= 0, got -1"),
    ("data.prefetch", -2, r"data.prefetch must be an integer >= 0, got -2"),
    ("data.crop_min_scale", 0.0, r"data.crop_min_scale must be in \(0, 1\], got 0.0"),
    ("ema.sigma_rels", (0.05, 0.3), r"ema.sigma_rels must be a relative std in \(0, 0.2887\]"),
    ("ema.snapshot_every", 100, r"ema.snapshot_every > 0 snapshots the power-function EMAs, but ema.sigma_rels is empty"),
    ("ema.reconstruct_from", (0.2,), r"ema.reconstruct_from \[0.2\] are not tracked"),
    ("sample.guidance_interval", (0.8, 0.2), r"sample.guidance_interval must satisfy 0 <= t_lo <= t_hi <= 1"),
    ("sample.clip_x0", -1.0, r"sample.clip_x0 must be 0 \(off\) or a positive bound on \|x0_hat\|, got -1.0"),
])
def test_bad_settings_are_refused(data_dir, key, value, match):
  with pytest.raises(ConfigError, match=match):
    settings_lib.parse(_toy(data_dir, **{key: value}))


@pytest.mark.parametrize("over,match", [
    ({"diffusion.t_min": 1e-4}, r"diffusion.objective='vdm' integrates over t in \[0, 1\]: set diffusion.t_min=0"),
    ({"diffusion.schedule": "ve"}, r"diffusion.objective='vdm' needs a VP schedule"),
    ({"diffusion.target": "flow", "diffusion.schedule": "linear_log_snr"}, r"needs a VP target: eps, x0, v or score"),
    ({"diffusion.time_sampler": "log_normal"}, r"time_sampler must be 'uniform' or 'low_discrepancy'"),
    ({"diffusion.weighting": "snr"}, r"has its own weighting"),
    ({"mesh.ordered_reduction": True}, r"does not support mesh.ordered_reduction"),
    ({"model.mlp.learn_sigma": True}, r"learn_sigma=True: the variance channels are trained only by L_vlb"),
])
def test_vdm_settings_where_it_is_not_defined_are_refused(data_dir, over, match):
  base = {"diffusion.objective": "vdm", "diffusion.schedule": "learned", "diffusion.t_min": 0.0,
          "diffusion.time_sampler": "low_discrepancy"}
  with pytest.raises(ConfigError, match=match):
    settings_lib.parse(_toy(data_dir, **{**base, **over}))


def test_unknown_config_key_names_nearest():
  c = toy2d_config.get_config()
  with c.unlocked():
    c.train.batchsize = 3
  with pytest.raises(ConfigError, match=r"unknown config key 'train.batchsize'; did you mean \['train.batch_size'"):
    settings_lib.parse(c)


@pytest.mark.parametrize("over,match", [
    ({"data.name": "no_such_dataset_xyz"}, r"data: unknown dataset 'no_such_dataset_xyz'"),
    ({"data.name": "mnist"}, r"data: dataset 'mnist' is not prepared"),
    ({"train.batch_size": 60}, r"batch size 60 does not divide over the 8 data-parallel devices"),
    ({"mesh.shape": (3, 2)}, r"mesh shape \(3, 2\) needs 6 devices but 8 are available"),
    ({"model.mlp.widht": 3}, r"unknown config key 'model.mlp.widht'; did you mean \['model.mlp.depth', "
                             r"'model.mlp.hidden'"),
    ({"model.mlp.time_embedding": "wavelet"}, r"model.mlp options: unknown time_embedding 'wavelet'"),
    ({"train.full_eval": True}, r"fd/kid on this dataset need Inception features: set eval.inception_weights"),
    ({"data.image_size": 16}, r"data.image_size applies to image datasets; 'toy_gmm2d' holds vectors of shape \(2,\)"),
])
def test_setup_refuses_before_device_work(data_dir, tmp_path, over, match):
  traces = train.TraceCounts()
  with pytest.raises(ConfigError, match=match):
    train.train_and_evaluate(settings_lib.parse(_toy(data_dir, **over)), str(tmp_path / "w"),
                             evaluator=evaluate.Evaluator, traces=traces)
  assert traces == {}
  assert not (tmp_path / "w").exists(), "nothing may be written for a refused config"


def test_an_eval_split_smaller_than_a_batch_is_refused_before_training(data_dir, tmp_path):
  c = digits_config.get_config()
  c.data.data_dir = data_dir
  c.train.batch_size = 400  # 1437 train digits, 360 test
  with pytest.raises(ConfigError, match=r"data.eval_split 'test' has 360 examples, fewer than one batch"):
    train.train_and_evaluate(settings_lib.parse(c), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_image_size_the_unet_cannot_take(data_dir, tmp_path):
  c = digits_config.get_config()
  c.data.data_dir = data_dir
  c.model.unet.channel_mult = (1, 2, 2, 2, 2)  # 8x8 cannot be halved 4 times.
  with pytest.raises(ConfigError, match=r"cannot take data of shape \(8, 8, 1\)"):
    train.train_and_evaluate(settings_lib.parse(c), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------
# In-process runs.

def test_train_compiles_once_and_resumes_in_process(data_dir, tmp_path):
  wd = str(tmp_path / "run")
  traces = train.TraceCounts()
  out = train.train_and_evaluate(settings_lib.parse(_toy(data_dir)), wd, traces=traces)
  assert out["step"] == 30 and np.isfinite(out["eval_loss_ema"])
  assert traces["train_step"] == traces["init"] == 1, traces
  hist = json.load(open(os.path.join(wd, "metrics.json")))["history"]
  assert [h["step"] for h in hist] == [10, 20, 30]
  assert all(np.isfinite(h["loss"]) and h["lr"] > 0 for h in hist)
  assert os.path.exists(os.path.join(wd, "samples.png"))
  # Continue to 40 steps: resumes from 30, one new compile of the step in this new program instance.
  # With train.full_eval the evaluation program also runs at step 35 (eval_every) and after step 40.
  full = {"train.num_steps": 40, "train.full_eval": True, "train.eval_every": 5,
          "eval.metrics": ("bpd_vlb", "bpd_ode"), "eval.bpd_examples": 16, "eval.vlb_steps": 8,
          "eval.ode_steps": 4}
  out = train.train_and_evaluate(settings_lib.parse(_toy(data_dir, **full)), wd, evaluator=evaluate.Evaluator,
                                 traces=traces)
  assert out["step"] == 40 and traces["train_step"] == 2 and traces["init"] == 1  # resumed: no init
  assert sorted(os.listdir(os.path.join(wd, "eval"))) == ["eval_0000035.json", "eval_0000040.json"]
  for step in (35, 40):
    rec = json.load(open(os.path.join(wd, "eval", f"eval_{step:07d}.json")))
    assert rec["step"] == step and set(rec["metrics"]) == {"bpd_vlb", "bpd_ode"}
    # 2-D data in [-1, 1]-ish scale: finite, and the VLB (an upper bound on the NLL) above the ODE estimate
    # is not guaranteed for a 35-step model, so only sanity here; the bounds are tested in test_likelihood*.
    assert all(np.isfinite(v) for v in rec["metrics"].values())
  assert out["eval"] == rec["metrics"]
  # One evaluator for the run: the second evaluation reuses the compiled likelihood functions.
  assert traces["eval_bpd_vlb"] == traces["eval_bpd_ode"] == 1, traces


def test_importance_sampled_vlb_keeps_its_history_in_the_checkpoint_and_resumes_bit_identically(data_dir, tmp_path):
  """Pure L_vlb with importance-sampled times on a 20-step discrete schedule: uniform until every step
  has 10 values of L_t, then p_t ~ sqrt(E[L_t^2]). 16 steps uninterrupted against a resume from the
  step-8 checkpoint alone: the history is part of the state, so every array is bit-identical."""
  import shutil

  import jax
  over = {"model.mlp.learn_sigma": True, "diffusion.objective": "vlb", "diffusion.time_sampler": "importance",
          "diffusion.schedule": "ddpm_linear", "diffusion.schedule_kwargs": {"num_steps": 20},
          "sample.method": "ddpm", "train.num_steps": 16, "train.ckpt_every": 8, "train.log_every": 8,
          "sample.num_steps": 4}
  ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
  out = train.train_and_evaluate(settings_lib.parse(_toy(data_dir, **over)), ref)
  assert out["step"] == 16 and np.isfinite(out["train_loss_last"])
  shutil.copytree(os.path.join(ref, "checkpoints", "8"), os.path.join(cut, "checkpoints", "8"))
  train.train_and_evaluate(settings_lib.parse(_toy(data_dir, **over)), cut)
  a, b = _restore_state(ref, 16), _restore_state(cut, 16)
  hist = a["aux"]["vlb_history"]
  assert int(np.sum(hist["count"])) == 16 * 64 and np.all(np.asarray(hist["count"]) >= 10)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The history at step 8 differs from the one at 16 (it was updated), and is non-zero where counted.
  h8 = _restore_state(ref, 8)["aux"]["vlb_history"]
  assert int(np.sum(h8["count"])) == 8 * 64


def test_hybrid_objective_trains_learned_variances_end_to_end(data_dir, tmp_path):
  """toy2d with a learned-variance MLP and L_hybrid: trains (and its eval loss) and samples with the
  ancestral sampler, which reads the variance channels (the VLB with them: tests/test_likelihood.py)."""
  import jax
  import orbax.checkpoint as ocp
  over = {"model.mlp.learn_sigma": True, "diffusion.objective": "hybrid", "diffusion.vlb_steps": 100,
          "sample.method": "ddpm", "train.num_steps": 20}
  wd = str(tmp_path / "run")
  out = train.train_and_evaluate(settings_lib.parse(_toy(data_dir, **over)), wd)
  assert out["step"] == 20 and np.isfinite(out["train_loss_last"]) and np.isfinite(out["eval_loss_ema"])
  assert os.path.exists(os.path.join(wd, "samples.png"))
  params = ocp.StandardCheckpointer().restore(os.path.join(wd, "checkpoints", "20", "state"))["params"]
  shapes = {tuple(np.shape(leaf)) for leaf in jax.tree.leaves(params)}
  assert (32, 4) in shapes and (32, 2) not in shapes  # the output layer: [eps | var_interp] for 2-D data


def _digits_dit(data_dir, **over):
  """The digits with a tiny DiT (a fast compile), flips read by 2 grain workers, batch 64: 22 batches
  per epoch of the 1437 training digits."""
  c = digits_config.get_config()
  c.data.data_dir = data_dir
  c.model.name = "dit"
  for k, v in {"patch_size": 4, "hidden_size": 16, "depth": 1, "num_heads": 2, "frequency_dim": 16}.items():
    c.model.dit[k] = v
  vals = {"data.workers": 2, "data.prefetch": 2, "data.random_flip": True, "train.batch_size": 64,
          "train.num_steps": 30, "train.log_every": 10, "train.ckpt_every": 10, "train.eval_every": 0,
          "train.eval_batches": 1, "sample.num_steps": 2, "sample.per_class": 1, "sample.guidance_scale": 0.0,
          **over}
  return _override(c, vals)


def test_checkpoint_from_another_model_is_refused(data_dir, tmp_path):
  from diffusax.checkpoint import CheckpointMismatch
  wd = str(tmp_path / "run")
  train.train_and_evaluate(settings_lib.parse(_toy(data_dir, **{"train.num_steps": 10})), wd)
  traces = train.TraceCounts()
  with pytest.raises(CheckpointMismatch, match=r"different model(?s:.*)hidden"):
    train.train_and_evaluate(settings_lib.parse(_toy(data_dir, **{"model.mlp.hidden": 48})), wd, traces=traces)
  assert "train_step" not in traces
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["10"], "the old checkpoint must stay intact"


# ---------------------------------------------------------------------------
# The command line, in subprocesses.

def _main(args, **kw):
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  return subprocess.run([sys.executable, "-m", "diffusax.main", *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=600, **kw)


# The misspelt override's one-line error: tests/test_cli_errors.py (one forked process per case).


def _toy_args(data_dir, wd, steps, extra=()):
  return ["--config=configs/toy2d.py", f"--workdir={wd}", f"--config.data.data_dir={data_dir}",
          "--config.model.mlp.hidden=32", "--config.model.mlp.depth=2", "--config.train.batch_size=64",
          f"--config.train.num_steps={steps}", "--config.train.log_every=10", "--config.train.eval_batches=1",
          "--config.sample.num_steps=4", "--config.sample.per_class=4", *extra]


def _restore_state(wd, step):
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer().restore(os.path.join(wd, "checkpoints", str(step), "state"))


# The killed child: diffusax.main with Checkpointer.save patched so that the save of step AT first waits
# for the earlier (async) checkpoints to be committed, then writes READY and blocks. The test SIGKILLs it
# there: the same point on every run (checkpoints 20 and 40 on disk, steps 41-60 done and lost), and the
# job cannot finish before the kill.
_BLOCK_AT_SAVE = r"""
import sys, time
from diffusax import checkpoint, main
at, ready = int(sys.argv[1]), sys.argv[2]
save = checkpoint.Checkpointer.save

def blocking_save(self, step, state, meta):
  if int(step) == at and self.directory.endswith("checkpoints"):  # not the EMA snapshots
    self.wait()
    open(ready, "w").close()
    while True:
      time.sleep(60)
  return save(self, step, state, meta)

checkpoint.Checkpointer.save = blocking_save
sys.argv = ["diffusax.main", *sys.argv[3:]]
main.run()
"""


def _children(pid: int) -> list[int]:
  """Live child processes of pid (Linux /proc)."""
  out = []
  for d in os.listdir("/proc"):
    if d.isdigit():
      try:
        stat = open(f"/proc/{d}/stat").read()
      except OSError:
        continue
      if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
        out.append(int(d))
  return out


def _kill_when_ready(p, ready: str, what: str, timeout: float = 300) -> None:
  deadline = time.time() + timeout
  while not os.path.exists(ready):
    assert p.poll() is None, f"the child exited ({p.returncode}) before reaching {what}"
    assert time.time() < deadline, f"the child did not reach {what} in {timeout} s"
    time.sleep(0.02)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert p.returncode == -signal.SIGKILL


# kill -9 mid-run with grain workers alive, then resume bit-identically: tests/test_gcs.py (on gs://, the
# shared storage of a pod; the helpers above are shared with it).


@pytest.mark.parametrize("name", ["digits", "digits_small", "digits_iddpm", "toy2d", "cifar10"])
def test_every_config_parses_and_its_network_builds(name):
  import importlib
  import jax
  import jax.numpy as jnp
  cfg = importlib.import_module(name).get_config()
  s = settings_lib.parse(cfg)
  ncls = {"toy2d": None}.get(name, 10) if s.class_conditional else None
  module = setup_lib.build_module(s, ncls)
  shape = {"toy2d": (2,), "cifar10": (32, 32, 3)}.get(name, (8, 8, 1))
  x = jax.ShapeDtypeStruct((2,) + shape, jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  y = jax.ShapeDtypeStruct((2,), jnp.int32) if ncls else None
  out = jax.eval_shape(lambda k, x, t, y: module.apply(module.init(k, x, t, y), x, t, y), jax.random.key(0), x, t, y)
  channels = 2 if s.model_kwargs.get("learn_sigma") else 1  # learned variance: [prediction | var_interp]
  assert out.shape == (2,) + shape[:-1] + (shape[-1] * channels,)
  if name == "cifar10":  # The DDPM CIFAR-10 U-Net: 35.7M parameters (Ho et al. 2020).
    params = jax.eval_shape(module.init, jax.random.key(0), x, t, y)["params"]
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert round(n / 1e6, 1) == 35.7, n


def test_weight_decay_spares_vectors_and_the_frozen_fourier_frequencies():
  import jax
  import jax.numpy as jnp
  from diffusax.training import optimizer
  tx, _ = optimizer.make(optimizer.OptimConfig(lr=0.1, weight_decay=0.5, grad_clip=0.0))
  params = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,)), "fourier": {"W": jnp.ones((4,))}}
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  # Zero gradient: Adam's step is 0, so the update is pure decoupled decay, -lr * wd * p on kernels only.
  np.testing.assert_allclose(updates["kernel"], -0.05 * np.ones((2, 3)), rtol=1e-6)
  assert not np.any(updates["bias"]) and not np.any(updates["fourier"]["W"])


def test_remat_is_a_compute_option_not_part_of_the_checkpoint_signature():
  base = digits_config.get_config()
  other = digits_config.get_config()
  other.model.unet.remat = True
  wider = digits_config.get_config()
  wider.model.unet.base_channels = 48
  sig = lambda c: settings_lib.parse(c).model_settings()  # noqa: E731
  assert sig(other) == sig(base) != sig(wider)
