"""Latent diffusion: the autoencoder's losses against float64 numpy, its training program (resume across the
discriminator's start is bit-identical), the latent statistics against numpy, and stage 2 on its latents.

One tiny stage-1 run on the embedded 8x8 digits (f = 2: 4x4x2 latents) serves every program test here.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusax.training import ae_losses

# --- losses against numpy ----------------------------------------------------------------------------


def test_kl_matches_the_gaussian_closed_form_with_full_covariances():
  """KL(N(m, S) || N(0, I)) = 1/2 (tr S + m^T m - k - log det S), written with the full covariance matrix."""
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(3, 2, 2, 2))
  logvar = rng.normal(size=(3, 2, 2, 2))
  got = np.asarray(ae_losses.kl_diag_gaussian(jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32)))
  for b in range(3):
    m = mean[b].ravel()
    cov = np.diag(np.exp(logvar[b].ravel()))
    k = len(m)
    want = 0.5 * (np.trace(cov) + m @ m - k - np.linalg.slogdet(cov)[1])
    np.testing.assert_allclose(got[b], want, rtol=1e-5)
  # Monte Carlo: E_q[log q(z) - log p(z)] for one example (independent of the formula above).
  m, lv = mean[0].ravel(), logvar[0].ravel()
  z = m + np.exp(0.5 * lv) * rng.normal(size=(200000, len(m)))
  logq = -0.5 * np.sum((z - m) ** 2 / np.exp(lv) + lv + np.log(2 * np.pi), 1)
  logp = -0.5 * np.sum(z ** 2 + np.log(2 * np.pi), 1)
  assert abs(np.mean(logq - logp) - got[0]) < 4 * np.std(logq - logp) / np.sqrt(len(z))


def test_hinge_losses_and_reconstruction_match_numpy():
  rng = np.random.default_rng(1)
  real, fake = rng.normal(size=(4, 3, 3, 1)), rng.normal(size=(4, 3, 3, 1))
  d = np.asarray(ae_losses.discriminator_hinge(jnp.asarray(real), jnp.asarray(fake)))
  want = 0.5 * (np.maximum(0, 1 - real).mean((1, 2, 3)) + np.maximum(0, 1 + fake).mean((1, 2, 3)))
  np.testing.assert_allclose(d, want, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(ae_losses.generator_hinge(jnp.asarray(fake))), -fake.mean((1, 2, 3)),
                             rtol=1e-6)
  x, y = rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 4, 4, 3))
  np.testing.assert_allclose(np.asarray(ae_losses.reconstruction(jnp.asarray(x), jnp.asarray(y), "l1")),
                             np.abs(x - y).sum((1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(ae_losses.reconstruction(jnp.asarray(x), jnp.asarray(y), "l2")),
                             ((x - y) ** 2).sum((1, 2, 3)), rtol=1e-5)


def test_adaptive_weight_on_a_linear_generator_matches_finite_differences():
  """A linear last layer W (x_rec = h W) and a linear discriminator D(x) = x a: lambda from the gradients of
  mean |x - h W| and -mean D(h W) with respect to W, by float64 central differences."""
  rng = np.random.default_rng(2)
  h, x, a = rng.normal(size=(5, 3)), rng.normal(size=(5, 4)), rng.normal(size=(4,))
  w = rng.normal(size=(3, 4))
  rec = lambda w: np.mean(np.abs(x - h @ w).sum(1))  # noqa: E731
  adv = lambda w: np.mean(-(h @ w) @ a)  # noqa: E731

  def fd(f, w, eps=1e-6):
    g = np.zeros_like(w)
    for i in np.ndindex(w.shape):
      e = np.zeros_like(w)
      e[i] = eps
      g[i] = (f(w + e) - f(w - e)) / (2 * eps)
    return g

  want = np.linalg.norm(fd(rec, w)) / (np.linalg.norm(fd(adv, w)) + 1e-4)
  wj, hj, xj, aj = (jnp.asarray(v, jnp.float32) for v in (w, h, x, a))
  g_rec = jax.grad(lambda w: jnp.mean(ae_losses.reconstruction(xj, hj @ w, "l1")))(wj)
  g_adv = jax.grad(lambda w: jnp.mean(ae_losses.generator_hinge((hj @ w @ aj)[:, None])))(wj)
  got = float(ae_losses.adaptive_weight(g_rec, g_adv))
  assert got == pytest.approx(want, rel=1e-4)
  assert float(ae_losses.adaptive_weight(g_rec, g_adv, max_weight=0.01)) == pytest.approx(0.01)


# --- the stage-1 program on digits ----------------------------------------------------------------------

AE_OVER = {"stage": "autoencoder", "autoencoder.net.block_out_channels": (8, 16), "autoencoder.net.layers_per_block": 1,
           "autoencoder.net.z_channels": 2, "autoencoder.net.norm_groups": 4, "autoencoder.net.in_channels": 1,
           "autoencoder.net.out_channels": 1, "autoencoder.disc.base_channels": 8, "autoencoder.disc.num_layers": 1,
           "autoencoder.disc_start": 2, "autoencoder.grid_examples": 4, "train.batch_size": 16,
           "train.num_steps": 4, "train.log_every": 2, "train.ckpt_every": 2, "train.eval_every": 0,
           "eval.num_samples": 64, "optim.lr": 1e-3, "ema.decays": (0.9,)}


def _config(data_dir, over):
  from diffusax.programs import defaults
  c = defaults.base_config()
  c.data.name = "sklearn_digits"
  c.data.data_dir = data_dir
  for k, v in over.items():
    node = c
    parts = k.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = v
  return c


def _checksums(workdir, step):
  from diffusax import checkpoint as ckpt_lib
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=None, async_save=False)
  try:
    return ck.read_meta(step)["checksums"]
  finally:
    ck.close()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("ae_tfds"))


@pytest.fixture(scope="module")
def ae_run(data_dir, tmp_path_factory):
  from diffusax.programs import autoencoder, settings
  wd = str(tmp_path_factory.mktemp("ae") / "run")
  s = settings.parse(_config(data_dir, AE_OVER))
  return {"workdir": wd, "result": autoencoder.train(s, wd), "settings": s}


def test_stage1_writes_grid_stats_and_metrics(ae_run):
  r, wd = ae_run["result"], ae_run["workdir"]
  assert r["step"] == 4 and os.path.exists(os.path.join(wd, "reconstructions.png"))
  rec = r["reconstruction"]
  assert rec["factor"] == 2 and rec["examples"] == 64
  assert np.isfinite(rec["autoencoder"]["psnr"]) and rec["bicubic_x2"]["psnr"] > 0 and rec["autoencoder"]["rfd"] is not None
  hist = json.load(open(os.path.join(wd, "metrics.json")))["history"]
  # The adversarial branch runs from disc_start = 2: no discriminator loss before, one after.
  assert hist[0]["d_loss"] == 0.0 and hist[0]["d_weight"] == 0.0 and hist[1]["d_loss"] > 0 and hist[1]["d_weight"] > 0


def test_eval_mode_and_import_of_diffusers_weights(ae_run, data_dir, tmp_path):
  """--mode=eval reports the run's reconstruction metrics again; the run's EMA written out in diffusers' layout
  (OIHW kernels, [out, in] linears, dotted names) and imported with autoencoder.init_from and num_steps=0
  gives a stage-1 workdir with the same parameters (digest) and latent statistics."""
  from flax import traverse_util
  from diffusax.nn import autoencoder_weights as aw
  from diffusax.programs import autoencoder, settings
  s, wd = ae_run["settings"], ae_run["workdir"]
  ev = autoencoder.evaluate(s, wd)
  assert ev["step"] == 4 and ev["reconstruction"]["autoencoder"] == ae_run["result"]["reconstruction"]["autoencoder"]
  u = autoencoder.ae_setup(s, training=False)
  params, _, _ = autoencoder.restore_ema(u, wd)
  sd = {}
  for path, v in traverse_util.flatten_dict(jax.device_get(params)).items():
    v = np.asarray(v)
    sd[aw.diffusers_key(path)] = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T if v.ndim == 2 else v
  np.savez(tmp_path / "vae.npz", **sd)
  wd2 = str(tmp_path / "imported")
  c = _config(data_dir, {**AE_OVER, "train.num_steps": 0, "autoencoder.init_from": str(tmp_path / "vae.npz")})
  out = autoencoder.train(settings.parse(c), wd2)
  assert out["step"] == 0
  mine = json.load(open(os.path.join(wd2, "latent_stats.json")))
  theirs = json.load(open(os.path.join(wd, "latent_stats.json")))
  assert mine["params_digest"] == theirs["params_digest"]
  assert {k: v for k, v in mine.items() if k != "step"} == {k: v for k, v in theirs.items() if k != "step"}


def test_resume_across_the_discriminator_start_is_bit_identical(ae_run, data_dir, tmp_path):
  """2 steps (the discriminator starts at step 2), then a new process-like run resumes to 4: every array of the
  final AEState (autoencoder, discriminator, both optimizers, EMA, RNG) equals the uninterrupted run's."""
  from diffusax.programs import autoencoder, settings
  wd = str(tmp_path / "resumed")
  autoencoder.train(settings.parse(_config(data_dir, {**AE_OVER, "train.num_steps": 2})), wd)
  assert not os.path.exists(os.path.join(wd, "checkpoints", "4"))
  autoencoder.train(ae_run["settings"], wd)
  assert _checksums(wd, 4) == _checksums(ae_run["workdir"], 4)
  assert json.load(open(os.path.join(wd, "latent_stats.json"))) == json.load(
      open(os.path.join(ae_run["workdir"], "latent_stats.json")))


def test_latent_statistics_match_numpy(ae_run, data_dir):
  """Per-channel mean / std of z = mean + std eps over the whole training split, recomputed in float64 from the
  encoder's outputs with the documented draws (eps of example i from fold_in(key(seed ^ 0x57A7), i))."""
  from diffusax.data import pipeline
  from diffusax.programs import autoencoder
  s, wd = ae_run["settings"], ae_run["workdir"]
  u = autoencoder.ae_setup(s, training=False)
  params, step, meta = autoencoder.restore_ema(u, wd)
  src = pipeline.open_source(s.data.name, "train", s.data.data_dir)
  x = pipeline.make_transform("image", s.data, train=False)(pipeline.read(src, np.arange(len(src))), 0,
                                                             np.zeros(len(src), np.int64), np.arange(len(src)))["x"]
  mean, logvar = u.ae.apply({"params": params}, jnp.asarray(x), method="encode")
  key = jax.random.key(s.seed ^ 0x57A7)
  eps = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, i), mean.shape[1:])) for i in range(len(x))])
  z = np.asarray(mean, np.float64) + np.exp(0.5 * np.asarray(logvar, np.float64)) * eps
  stats = json.load(open(os.path.join(wd, "latent_stats.json")))
  np.testing.assert_allclose(stats["mean"], z.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["std"], z.std((0, 1, 2)), rtol=1e-4)
  assert stats["scale"] == pytest.approx(1.0 / z.std(), rel=1e-4)
  assert stats["num_examples"] == len(src) and stats["step"] == step
  assert stats["params_digest"] == autoencoder.params_digest(meta["checksums"])


# --- stage 2 on the latents ---------------------------------------------------------------------------

LATENT_OVER = {"model.name": "dit", "model.dit.patch_size": 2, "model.dit.hidden_size": 16, "model.dit.depth": 1,
               "model.dit.num_heads": 2, "model.dit.frequency_dim": 16, "train.batch_size": 16,
               "train.num_steps": 2, "train.log_every": 1, "train.eval_batches": 1, "train.eval_every": 0,
               "sample.num_steps": 2, "sample.per_class": 1, "data.random_flip": True}


def test_stage2_trains_samples_and_refuses_what_cannot_work(ae_run, data_dir, tmp_path):
  from diffusax.programs import evaluate, sample, settings, setup_latent, train
  from diffusax.programs.errors import ConfigError
  wd = str(tmp_path / "latent")
  c = _config(data_dir, {**LATENT_OVER, "latent.autoencoder_workdir": ae_run["workdir"]})
  s = settings.parse(c)
  out = train.train_and_evaluate(s, wd)
  assert out["step"] == 2 and np.isfinite(out["eval_loss_ema"])
  # Both orientations of the training split and the test split are cached once in the autoencoder's workdir.
  cached = sorted(os.listdir(os.path.join(ae_run["workdir"], "latents")))
  assert any("_train_" in n and "_v2_" in n for n in cached) and any("_test_" in n and "_v1_" in n for n in cached)
  # --mode=sample writes decoded 8x8x1 digits.
  c.sample.num_samples, c.sample.shard_size = 6, 3
  res = sample.run(settings.parse(c), wd)
  shard = np.load(os.path.join(res["out_dir"], "shard_000000.npz"))
  assert shard["samples"].shape == (3, 8, 8, 1) and shard["samples"].dtype == np.uint8
  assert json.load(open(os.path.join(res["out_dir"], "job.json")))["decoder"].startswith(
      os.path.realpath(ae_run["workdir"]))
  # The latent posterior draws are a function of (seed, epoch, index) alone.
  tf = setup_latent.LatentTransform(shift=(0.0, 0.0), scale=(1.0, 1.0))
  batch = {"mean": np.zeros((2, 2, 4, 4, 2), np.float32), "std": np.ones((2, 2, 4, 4, 2), np.float32)}
  a = tf(batch, 0, np.array([3, 3]), np.array([5, 6]))["x"]
  np.testing.assert_array_equal(a, tf(batch, 0, np.array([3, 3]), np.array([5, 6]))["x"])
  assert not np.array_equal(a[0], a[1])
  # Refusals, before any device work.
  with pytest.raises(ConfigError, match="bits/dim are not defined"):
    c2 = c.copy_and_resolve_references()
    c2.eval.metrics = ("fd", "bpd_vlb")
    evaluate.run(settings.parse(c2), wd)
  stats_path = os.path.join(ae_run["workdir"], "latent_stats.json")
  original = open(stats_path).read()
  try:
    with open(stats_path, "w") as f:
      f.write(json.dumps({**json.loads(original), "params_digest": "0" * 64}))
    with pytest.raises(ConfigError, match="computed for other parameters"):
      train.train_and_evaluate(s, str(tmp_path / "other"))
  finally:
    with open(stats_path, "w") as f:
      f.write(original)
  with pytest.raises(ConfigError, match="no checkpoint"):
    c3 = c.copy_and_resolve_references()
    c3.latent.autoencoder_workdir = str(tmp_path / "nothing")
    train.train_and_evaluate(settings.parse(c3), str(tmp_path / "x"))
  with pytest.raises(ConfigError, match="not an autoencoder"):
    c4 = c.copy_and_resolve_references()
    c4.latent.autoencoder_workdir = wd  # a diffusion run
    train.train_and_evaluate(settings.parse(c4), str(tmp_path / "y"))


def test_the_steps_adaptive_weight_equals_full_network_gradients():
  """The step takes lambda's gradients through the last layer alone (its input held fixed); the same
  gradients through the whole autoencoder (jax.grad of the losses in every parameter, then the last kernel)
  must give the same lambda: the kernel enters the output only in the last layer."""
  import optax
  from diffusax.nn import autoencoder as ae_nn
  from diffusax.nn import discriminator as disc_nn
  from diffusax.training import ae_step, state as state_lib
  ae = ae_nn.AutoencoderKL(block_out_channels=(8, 16), z_channels=2, norm_groups=4, in_channels=1, out_channels=1)
  disc = disc_nn.PatchDiscriminator(base_channels=8, num_layers=1)
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1), minval=-1, maxval=1)
  params = jax.tree.map(jnp.asarray, ae.init(jax.random.key(2), x)["params"])
  params = jax.tree.map(lambda p: p.unbox() if hasattr(p, "unbox") else p, params,
                        is_leaf=lambda p: hasattr(p, "unbox"))
  dparams = jax.tree.map(lambda p: p.unbox() if hasattr(p, "unbox") else p, disc.init(jax.random.key(3), x)["params"],
                         is_leaf=lambda p: hasattr(p, "unbox"))
  tx = optax.sgd(0.0)
  cfg = ae_step.AELossConfig(disc_start=0, disc_weight=0.5)
  step = jax.jit(ae_step.make_ae_step(ae, disc, tx, tx, lambda s: 0.0, lambda s: 0.0, cfg, (0.9,)))
  state = ae_step.create(params, dparams, tx, tx, seed=7, num_ema=1)
  _, m = step(state, {"x": x})
  eps = jax.random.normal(jax.random.fold_in(state_lib.base_key(state), 0), (4, 4, 4, 2))

  def x_rec(p):
    mean, logvar = ae.apply({"params": p}, x, method="encode")
    return ae.apply({"params": p}, mean + jnp.exp(0.5 * logvar) * eps, method="decode")

  kernel = lambda g: g["decoder"]["conv_out"]["kernel"]  # noqa: E731
  g_rec = kernel(jax.grad(lambda p: jnp.mean(ae_losses.reconstruction(x, x_rec(p))))(params))
  g_adv = kernel(jax.grad(lambda p: jnp.mean(ae_losses.generator_hinge(disc.apply({"params": dparams}, x_rec(p)))))(params))
  want = float(jnp.linalg.norm(g_rec) / (jnp.linalg.norm(g_adv) + 1e-4))
  assert float(m["d_weight"]) == pytest.approx(want, rel=2e-4)
  assert float(m["d_loss"]) > 0


def test_autoencoder_parameters_shard_over_fsdp(data_dir):
  """Abstract only: on a (2, 4) mesh the autoencoder's and discriminator's kernels split over fsdp."""
  from diffusax.programs import autoencoder, settings
  over = {**AE_OVER, "mesh.shape": (2, 4), "autoencoder.net.block_out_channels": (16, 32), "autoencoder.disc.base_channels": 16}
  u = autoencoder.ae_setup(settings.parse(_config(data_dir, over)))
  specs = [sh.spec for sh in jax.tree.leaves(u.param_shardings)]
  assert sum(any(a is not None for a in sp) for sp in specs) > len(specs) // 2
  assert any(any(a is not None for a in sh.spec) for sh in jax.tree.leaves(u.disc_shardings))
  state_specs = jax.tree.leaves(u.state_shardings.opt_state)
  assert any(any(a is not None for a in sh.spec) for sh in state_specs)  # Adam moments follow the params.
