"""Stage 1 of latent diffusion: the KL autoencoder (`stage = "autoencoder"`).

    python -m diffusax.main --config=configs/photos_autoencoder.py --workdir=runs/photos_ae
    python -m diffusax.main --config=configs/photos_autoencoder.py --workdir=runs/photos_ae --mode=eval

`--mode=train` trains `nn.AutoencoderKL` with its patch discriminator (training/ae_step.py: L1 + KL
[+ LPIPS] + the adaptive-weighted hinge GAN from autoencoder.disc_start), resuming bit-identically
from WORKDIR/checkpoints (an `AEState`: autoencoder, discriminator, both optimizers, EMAs, RNG; meta
kind "autoencoder" with the data position). With autoencoder.init_from it starts from published
diffusers weights (train.num_steps=0: only imports them). At the end it writes

  reconstructions.png   held-out inputs (top) over their EMA reconstructions (posterior mean, bottom)
  latent_stats.json     per-channel mean and std of z ~ q(z|x) over the whole training split (and
                        LDM's scalar 1 / std), with the digest of the EMA parameters they belong to
                        (`params_digest`, from the checksums the checkpoint recorded): stage 2
                        (programs/setup_latent.py) refuses an autoencoder whose parameters changed
  metrics.json          losses, and the reconstruction metrics of `evaluate`

`--mode=eval` reports PSNR, SSIM and reconstruction FD (the dataset's own classifier features, or
Inception with eval.inception_weights) of the first EMA on the held-out split, beside the bicubic
down-and-up baseline of the same factor, in WORKDIR/eval/eval_<step>.json.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusax import checkpoint as ckpt_lib
from diffusax import storage
from diffusax.data import pipeline
from diffusax.parallel import mesh as mesh_lib
from diffusax.programs import setup as setup_lib
from diffusax.programs import setup_latent
from diffusax.programs.setup_latent import STATS_FILE, build_autoencoder, params_digest  # noqa: F401 - shared
from diffusax.programs.logs import Logger
from diffusax.programs.settings import ConfigError, Settings
from diffusax.sampling import generate
from diffusax.training import ae_step as step_lib
from diffusax.training import optimizer as optim_lib
from diffusax.training import preemption

KIND = setup_latent.AE_KIND  # meta["kind"] of a stage-1 checkpoint


def abstract_params(module, shape: tuple, what: str = "autoencoder.net"):
  """Boxed abstract parameters of `module` on images of `shape` (H, W, C)."""
  from diffusax import nn
  try:
    return jax.eval_shape(lambda k: module.init(k, jnp.zeros((1,) + tuple(shape), jnp.float32))["params"],
                          jax.random.key(0))
  except nn.InputShapeError as e:
    raise ConfigError(f"{what} cannot take images of shape {tuple(shape)}: {e}") from None
  except nn.OptionError as e:
    raise ConfigError(f"{what} options: {e}") from None


def signature(module, shape: tuple, model_settings: dict) -> tuple[Any, Any, dict]:
  """(boxed abstract params, unboxed, checkpoint signature) of an autoencoder on images of `shape`."""
  boxed = abstract_params(module, shape)
  plain = mesh_lib.unbox(boxed)
  return boxed, plain, ckpt_lib.model_signature(plain, model_settings)


@dataclasses.dataclass(frozen=True)
class AESetup:
  s: Settings
  mesh: Any
  ae: Any
  disc: Any
  data: Any
  signature: dict
  abstract_params: Any      # ShapeDtypeStructs of the (unboxed) autoencoder parameters
  param_shardings: Any
  disc_shardings: Any
  abstract_state: Any = None
  state_shardings: Any = None
  tx: Any = None
  disc_tx: Any = None
  lr_fn: Any = None
  disc_lr_fn: Any = None


def ae_setup(s: Settings, devices=None, training: bool = True) -> AESetup:
  """Validates the stage-1 settings; shapes and shardings only, no device computation."""
  data = setup_lib.describe_data(s)
  if data.transform != "image":
    raise ConfigError(f"stage='autoencoder' trains on images; dataset {s.data.name!r} holds vectors")
  if s.mesh_strategy != "mesh":
    raise ConfigError("stage='autoencoder' runs with mesh.strategy='mesh'")
  try:
    mesh = mesh_lib.make_mesh(s.mesh_shape, devices)
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None
  a = s.autoencoder
  ae = build_autoencoder(a.net, s.model_dtype)
  boxed, plain, sig = signature(ae, data.shape, a.model_settings())
  disc, disc_boxed = None, {}
  if a.adversarial:
    from diffusax.nn import discriminator as disc_nn
    try:
      disc = disc_nn.PatchDiscriminator(**dict(a.disc))
    except TypeError as e:
      raise ConfigError(f"autoencoder.disc: {e}") from None
    disc_boxed = abstract_params(disc, data.shape, "autoencoder.disc")
  u = AESetup(s=s, mesh=mesh, ae=ae, disc=disc, data=data, signature=sig, abstract_params=plain,
              param_shardings=mesh_lib.param_shardings(boxed, mesh, strict=s.mesh_strict),
              disc_shardings=mesh_lib.param_shardings(disc_boxed, mesh, strict=s.mesh_strict) if disc_boxed else {})
  if not training:
    return u
  try:
    mesh_lib.check_batch(s.train.batch_size, mesh, jax.process_count())
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None
  tx, lr_fn = optim_lib.make(s.optim)
  disc_optim = dataclasses.replace(s.optim, lr=a.disc_lr or s.optim.lr)
  disc_tx, disc_lr_fn = optim_lib.make(disc_optim)
  disc_plain = mesh_lib.unbox(disc_boxed)
  abstract = jax.eval_shape(lambda p, d: step_lib.create(p, d, tx, disc_tx, s.seed, s.num_ema), plain, disc_plain)
  return dataclasses.replace(u, abstract_state=abstract, state_shardings=_state_shardings(u, abstract), tx=tx,
                             disc_tx=disc_tx, lr_fn=lr_fn, disc_lr_fn=disc_lr_fn)


def _state_shardings(u: AESetup, abstract):
  rep = mesh_lib.replicated(u.mesh)
  return step_lib.AEState(step=rep, params=u.param_shardings, disc_params=u.disc_shardings,
                          ema_params=tuple(u.param_shardings for _ in abstract.ema_params),
                          opt_state=setup_lib.follow_params(abstract.opt_state, u.param_shardings, u.mesh),
                          disc_opt_state=setup_lib.follow_params(abstract.disc_opt_state, u.disc_shardings, u.mesh),
                          rng=rep)


def _init_state(u: AESetup, logger: Logger):
  s, a = u.s, u.s.autoencoder
  x = jnp.zeros((1,) + tuple(u.data.shape), jnp.float32)

  def init(key):
    params = mesh_lib.unbox(u.ae.init(jax.random.fold_in(key, 0xAE), x)["params"])
    disc = mesh_lib.unbox(u.disc.init(jax.random.fold_in(key, 0xD15C), x)["params"]) if u.disc is not None else {}
    return params, disc

  params, disc = jax.jit(init, out_shardings=(u.param_shardings, u.disc_shardings or None))(jax.random.key(s.seed))
  if a.init_from:
    from diffusax.nn import autoencoder_weights
    try:
      loaded = autoencoder_weights.load_diffusers(a.init_from, u.ae)
    except (ValueError, OSError) as e:
      raise ConfigError(f"autoencoder.init_from={a.init_from}: {e}") from None
    params = jax.tree.map(lambda v, sh: jax.device_put(np.asarray(v, np.float32), sh), loaded, u.param_shardings)
    logger.info(f"autoencoder initialised from {a.init_from}")
  fn = jax.jit(lambda p, d: step_lib.create(p, d, u.tx, u.disc_tx, s.seed, s.num_ema), out_shardings=u.state_shardings)
  return fn(params, disc)


def _lpips(u: AESetup, logger: Logger):
  a = u.s.autoencoder
  if not a.perceptual:
    logger.info("LPIPS perceptual term: off (set autoencoder.lpips_vgg_weights to a torchvision VGG-16 state dict "
                "to use it)" if a.perceptual_weight > 0 else "LPIPS perceptual term: off (perceptual_weight 0)")
    return None, None
  from diffusax.evaluation import lpips
  try:
    net = lpips.load_lpips(a.lpips_vgg_weights, a.lpips_lin_weights or None)
  except (ValueError, OSError) as e:
    raise ConfigError(f"autoencoder.lpips_vgg_weights: {e}") from None
  logger.info(f"LPIPS perceptual term: on, weight {a.perceptual_weight}")
  return lpips.lpips_distance, jax.device_put(net.params, mesh_lib.replicated(u.mesh))


def write_grid(u: AESetup, rec_fn, params, images: np.ndarray, path: str, logger: Logger | None = None,
               step: int = 0) -> str:
  rec = setup_latent.reconstruct(u.mesh, rec_fn, params, images)
  img = generate.image_grid(np.concatenate([images, rec]), 2, upscale=max(1, 64 // images.shape[1]))
  if jax.process_index() == 0:
    generate.save_png(path, img)
    if logger is not None:
      logger.image("reconstructions", img, step)
  return path


def reconstruction_metrics(u: AESetup, rec_fn, params, logger: Logger) -> dict:
  return setup_latent.reconstruction_metrics(u.s, u.ae, u.mesh, rec_fn, params, u.data.features, logger)


def latent_stats(u: AESetup, params, digest: str, step: int, logger: Logger) -> dict:
  """Per-channel mean and std of z = mean + std eps over the whole training split (unaugmented view;
  eps of example i from fold_in(key(seed ^ 0x57A7), i)); sums in float64 over float32 batch sums."""
  s = u.s
  src = pipeline.open_source(s.data.name, s.data.split, s.data.data_dir)
  n = len(src)
  transform = pipeline.make_transform("image", s.data, train=False)
  key = jax.random.key(s.seed ^ 0x57A7)
  ndev = u.mesh.devices.size
  batch = -(-min(s.train.batch_size * 4, n) // ndev) * ndev
  sh = mesh_lib.batch_sharding(u.mesh, 4)
  sh1 = mesh_lib.batch_sharding(u.mesh, 1)

  @jax.jit
  def sums(params, x, idx, valid):
    mean, logvar = u.ae.apply({"params": params}, x, method="encode")
    eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), mean.shape[1:], jnp.float32))(idx)
    z = (mean + jnp.exp(0.5 * logvar) * eps) * valid[:, None, None, None]
    return jnp.sum(z, axis=(0, 1, 2)), jnp.sum(jnp.square(z), axis=(0, 1, 2))

  total = total_sq = None
  for lo in range(0, n, batch):
    idx = np.arange(lo, lo + batch)
    valid = (idx < n).astype(np.float32)
    idx = np.minimum(idx, n - 1)
    x = transform(pipeline.read(src, idx), s.seed, np.zeros(batch, np.int64), idx)["x"]
    a, b = sums(params, jax.device_put(x, sh), jax.device_put(idx.astype(np.uint32), sh1), jax.device_put(valid, sh1))
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    total, total_sq = (a, b) if total is None else (total + a, total_sq + b)
  lat = tuple(u.ae.latent_shape(u.data.shape))
  count = n * lat[0] * lat[1]
  mean = total / count
  var = np.maximum(total_sq / count - mean ** 2, 0.0)
  all_mean = float(np.mean(mean))
  all_var = float(np.mean(var + mean ** 2) - all_mean ** 2)
  out = {"step": int(step), "params_digest": digest, "split": s.data.split, "num_examples": int(n),
         "latent_shape": list(lat), "mean": mean.tolist(), "std": np.sqrt(var).tolist(),
         "mean_all": all_mean, "std_all": float(np.sqrt(all_var)), "scale": float(1.0 / np.sqrt(all_var)),
         "posterior": "sample"}
  logger.info(f"latent statistics over {n} training examples: mean {np.round(mean, 3).tolist()}, std "
              f"{np.round(np.sqrt(var), 3).tolist()}, scalar 1/std {out['scale']:.4f}")
  return out


def train(s: Settings, workdir: str, devices=None) -> dict:
  """Trains (or resumes, or imports) the autoencoder, then writes the grid, latent statistics and metrics."""
  u = ae_setup(s, devices)
  try:
    source = pipeline.open_source(s.data.name, s.data.split, s.data.data_dir)
  except pipeline.DataError as e:
    raise ConfigError(f"data: {e}") from None
  if s.train.batch_size > len(source):
    raise ConfigError(f"train.batch_size {s.train.batch_size} exceeds the {len(source)} training examples")
  storage.makedirs(workdir)
  logger = Logger(workdir, enabled=jax.process_index() == 0)
  ckpt = None
  try:
    lpips_fn, lpips_params = _lpips(u, logger)
    ckpt = setup_lib.open_checkpointer(u, workdir, logger)  # (an AESetup has what it reads: s, mesh)
    return _loop(u, source, workdir, logger, ckpt, lpips_fn, lpips_params)
  except BaseException:
    if ckpt is not None:
      try:
        ckpt.manager.close()
      except Exception:  # noqa: BLE001
        pass
    logger.close()
    raise


def _loop(u: AESetup, source, workdir: str, logger: Logger, ckpt, lpips_fn, lpips_params) -> dict:
  s, a = u.s, u.s.autoencoder
  latest = ckpt.latest_step()
  if latest is not None:
    kind = ckpt.read_meta(latest).get("kind")
    if kind != KIND:
      raise ConfigError(f"{ckpt.directory} holds a {kind or 'diffusion'} checkpoint, not an autoencoder's: use "
                        "another --workdir for stage 1")
  transform = pipeline.make_transform("image", s.data, train=True)
  it = pipeline.Loader(source, s.train.batch_size, seed=s.seed, process_index=jax.process_index(),
                       process_count=jax.process_count(), transform=transform, workers=s.data.workers,
                       prefetch=s.data.prefetch)
  if latest is not None:
    if a.init_from:
      logger.info(f"resuming from step {latest}: autoencoder.init_from is not read again")
    abstract = ckpt_lib.abstract_like(u.abstract_state, u.state_shardings)
    state, meta = ckpt.restore(abstract, u.signature, fallback=s.train.ckpt_fallback)
    it.restore(meta["data"])
    logger.info(f"resumed from step {int(state.step)} in {ckpt.directory}")
  else:
    state = _init_state(u, logger)
  cfg = step_lib.AELossConfig(rec_loss=a.rec_loss, kl_weight=a.kl_weight, disc_weight=a.disc_weight,
                              disc_start=a.disc_start if a.adversarial else -1, adaptive_max=a.adaptive_max,
                              perceptual_weight=a.perceptual_weight if lpips_fn is not None else 0.0)
  rep = mesh_lib.replicated(u.mesh)
  batch_sh = {"x": mesh_lib.batch_sharding(u.mesh, 4)}
  lp_sh = None if lpips_params is None else jax.tree.map(lambda _: rep, lpips_params)
  # Two forms, before and from disc_start (training/ae_step.py), each compiled on first use.
  step_fns = [jax.jit(step_lib.make_ae_step(u.ae, u.disc, u.tx, u.disc_tx, u.lr_fn, u.disc_lr_fn, cfg, s.ema_decays,
                                            s.ema_warmup, lpips_fn=lpips_fn, adversarial=on),
                      in_shardings=(u.state_shardings, batch_sh, lp_sh), out_shardings=(u.state_shardings, rep),
                      donate_argnums=0) for on in (False, True)]
  rec_fn = setup_latent.reconstruct_fn(u.ae)
  grid_images = setup_latent.held_out(s, a.grid_examples)

  def save(st):
    ckpt.save(int(st.step), st, {"kind": KIND, "data": it.state(), "signature": u.signature, "step": int(st.step)})

  start, total = int(state.step), s.train.num_steps
  t0, step0, history, preempted = time.perf_counter(), start, [], False
  if start < total and a.adversarial:
    logger.info(f"adversarial term from step {a.disc_start} (discriminator {u.disc.base_channels} channels, "
                f"{u.disc.num_layers} layers)")
  with preemption.StopRequest(multi_process=jax.process_count() > 1) as stop:
    for step in range(start, total):
      batch = setup_lib.to_global({"x": next(it)["x"]}, u.mesh)
      state, metrics = step_fns[cfg.adversarial and step >= cfg.disc_start](state, batch, lpips_params)
      done = step + 1
      if done % s.train.log_every == 0 or done == total:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        rate = (done - step0) / max(now - t0, 1e-9)
        m.update(steps_per_s=rate, images_per_s=rate * s.train.batch_size)
        history.append({"step": done, **m})
        logger.progress(done, total, m, eta_s=(total - done) / max(rate, 1e-9))
        t0, step0 = now, done
      if stop.requested(done):
        preempted = done != total
        break
      if done % s.train.ckpt_every == 0 and done != total:
        save(state)
      if s.train.eval_every and done % s.train.eval_every == 0 and done != total:
        write_grid(u, rec_fn, state.ema_params[0], grid_images, storage.join(workdir, "reconstructions.png"),
                   logger, done)
  it.close()
  if int(state.step) != start or ckpt.latest_step() != int(state.step):
    save(state)
  ckpt.wait()
  final = int(state.step)
  if preempted:
    logger.info(f"stopped by signal {stop.signum} after step {final}; checkpoint saved in {ckpt.directory}; "
                "run again to resume")
    logger.close()
    ckpt.close()
    return {"step": final, "preempted": True}
  digest = params_digest(ckpt.read_meta(final)["checksums"])
  ema = state.ema_params[0]
  grid = write_grid(u, rec_fn, ema, grid_images, storage.join(workdir, "reconstructions.png"), logger, final)
  stats_path = storage.join(workdir, STATS_FILE)
  have = storage.read_json(stats_path) if storage.exists(stats_path) else {}
  if have.get("params_digest") != digest or have.get("step") != final:
    stats = latent_stats(u, ema, digest, final, logger)
    if jax.process_index() == 0:
      storage.commit(stats_path, json.dumps(stats, indent=1).encode(), marker=False)
  rec = reconstruction_metrics(u, rec_fn, ema, logger)
  result = {"step": final, "preempted": False, "reconstructions": grid, "latent_stats": stats_path,
            "reconstruction": rec, "train_loss_last": history[-1]["loss"] if history else None,
            "checkpoint": storage.join(ckpt.directory, str(final))}
  if jax.process_index() == 0:
    storage.commit(storage.join(workdir, "metrics.json"), json.dumps({**result, "history": history}, indent=1).encode(),
                   marker=False)
  r = rec["autoencoder"]
  b = rec[f"bicubic_x{rec['factor']}"]
  logger.info(f"done: step {final}; held-out PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}, rFD {r['rfd']} "
              f"(bicubic x{rec['factor']}: {b['psnr']:.2f} dB, {b['ssim']:.3f}, {b['rfd']}); grid {grid}")
  logger.close()
  ckpt.close()
  return result


def restore_ema(u: AESetup, workdir: str, step: int = -1, logger: Logger | None = None):
  """(first EMA params, step, meta) of a stage-1 checkpoint (`setup.restore_ema_with_meta`: only those arrays
  are read, and verified; a checkpoint of another model is refused by its signature before any is read)."""
  return setup_lib.restore_ema_with_meta(u, workdir, step, logger)


def evaluate(s: Settings, workdir: str, devices=None) -> dict:
  """--mode=eval of a stage-1 workdir: reconstruction metrics of its first EMA, beside bicubic."""
  u = ae_setup(s, devices, training=False)
  logger = Logger(workdir, enabled=jax.process_index() == 0)
  try:
    params, step, _ = restore_ema(u, workdir, s.sample.checkpoint_step, logger)
    t0 = time.perf_counter()
    rec = reconstruction_metrics(u, setup_latent.reconstruct_fn(u.ae), params, logger)
    result = {"step": step, "reconstruction": rec, "seconds": round(time.perf_counter() - t0, 1)}
    if jax.process_index() == 0:
      path = storage.join(workdir, "eval", f"eval_{step:07d}.json")
      storage.commit(path, json.dumps(result, indent=1).encode(), marker=False)
      result["path"] = path
    r = rec["autoencoder"]
    logger.info(f"eval at step {step}: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}, rFD {r['rfd']}")
    return result
  finally:
    logger.close()
