"""The config schema: every key a diffusax program reads, with its default and meaning.

`configs/*.py` start from `base_config()` and change values; they may not add
keys (the program refuses unknown keys and names the nearest valid ones).

Network options: one block per `diffusax.nn.NETWORKS` entry (`model.unet.*`,
`model.dit.*`, `model.mlp.*`), filled from that Linen module's own dataclass
fields and defaults (see `network_options`), so every option of every network
can be set from the command line, the schema cannot disagree with the
networks, and `--config.model.name=dit` switches network on any config. Only
the block of `model.name` is used.
"""
import dataclasses

import ml_collections
from ml_collections import config_dict

# Network fields the program sets itself, so not options: the class count comes from the data
# (model.class_conditional), the compute dtype from model.dtype; parameters are stored in float32.
PROGRAM_SET_FIELDS = ("num_classes", "dtype", "param_dtype")
_NONE_TYPES = {"int | None": int, "float | None": float, "str | None": str, "bool | None": bool}


def network_options(cls) -> ml_collections.ConfigDict:
  """The options of a network class: its dataclass fields (less Linen's and PROGRAM_SET_FIELDS) with
  their defaults. A field whose default is None becomes a typed placeholder (settable from the command
  line, e.g. `int | None` takes an int)."""
  c = ml_collections.ConfigDict()
  for f in dataclasses.fields(cls):
    if f.name in ("parent", "name") + PROGRAM_SET_FIELDS:
      continue
    default = f.default
    if default is None:
      kind = _NONE_TYPES.get(str(f.type))
      if kind is None:
        raise TypeError(f"{cls.__name__}.{f.name}: no config type for {f.type!r} with default None")
      c[f.name] = config_dict.placeholder(kind)
    else:
      c[f.name] = tuple(default) if isinstance(default, list) else default
  return c


def sibling_config(config_file: str, name: str) -> ml_collections.ConfigDict:
  """get_config() of the config file `name`.py beside `config_file` (a config's own __file__): for
  configs that start from another one (configs/digits_small.py from configs/digits.py). Config files
  are loaded by path, not imported as a package, so this reads the sibling by path too."""
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"diffusax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                         # Root of every random draw: fold_in(seed, step, ...).

  c.data = ml_collections.ConfigDict()
  c.data.name = "sklearn_digits"     # TFDS name, or an embedded one (diffusax.data.registry.EMBEDDED).
  c.data.data_dir = "~/tensorflow_datasets"  # Where TFDS datasets live / the embedded one is built.
  c.data.split = "train"             # Training split.
  c.data.eval_split = "test"         # Held-out split for the eval loss ("" to skip).
  c.data.random_flip = False         # Random horizontal flips (images only).
  c.data.random_crop = False         # Random square crops (area in [crop_min_scale, 1]) resized to image_size.
  c.data.crop_min_scale = 0.5        # Smallest crop area, as a fraction of the largest square.
  c.data.image_size = 0              # Model resolution: images are resized to it (0 = as stored).
  c.data.workers = 0                 # grain worker processes for reading and augmenting (0 = this process).
  c.data.prefetch = 2                # Batches read ahead (per worker when workers > 0; 0 = on demand).
  c.data.levels = 256                # Values per channel the data takes (8-bit: 256; the digits hold 17):
                                     # the bins of the likelihood's decoders and dequantisation.

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "vp_cosine"  # core.schedules.SCHEDULES name.
  c.diffusion.schedule_kwargs = ml_collections.ConfigDict()  # Its settings, e.g. {"s": 0.008}.
  c.diffusion.target = "eps"         # Network output: eps, x0, v, score or flow.
  c.diffusion.weighting = "uniform"  # core.losses.WEIGHTINGS name.
  c.diffusion.min_snr_gamma = 5.0    # gamma of the min_snr weighting.
  c.diffusion.sigmoid_bias = -1.0    # bias of the sigmoid weighting.
  c.diffusion.time_sampler = "uniform"  # core.losses.TIME_SAMPLERS name, or "importance" (objective "vlb":
                                     # p_t ~ sqrt(E[L_t^2]) from a history kept in the checkpoint).
  c.diffusion.t_min = 1e-4           # Smallest continuous training time.
  c.diffusion.objective = "simple"   # "simple": the weighted loss above; "hybrid": + vlb_weight * L_vlb
                                     # (improved DDPM), which trains learned variances (model.<net>.learn_sigma);
                                     # "vlb": pure L_vlb (learned variances, mean and variance by the VLB);
                                     # "vdm": the continuous-time negative ELBO in bits/dim (Kingma et al. 2021),
                                     # which also trains a learned schedule (diffusion.schedule = "learned").
  c.diffusion.learn_endpoints = False  # Learned schedule: train gamma_0 and gamma_1 too (else fixed at the
                                     # schedule_kwargs values).
  c.diffusion.variance_minimisation = False  # Learned schedule: train its interior to minimise the variance
                                     # of the loss (VDM app. I.2) instead of by the ELBO's gradient.
  c.diffusion.schedule_lr_factor = 1.0  # Learned schedule: its optimizer updates times this (Adam moves a
                                     # parameter about lr per step: gamma_0 by at most lr * steps otherwise).
  c.diffusion.vlb_weight = 1e-3      # lambda of the hybrid objective (Nichol & Dhariwal 2021).
  c.diffusion.vlb_steps = 1000       # Steps T of L_vlb on continuous schedules (discrete ones use theirs).

  c.model = ml_collections.ConfigDict()
  c.model.name = "unet"              # diffusax.nn.NETWORKS name: unet, dit, mlp.
  from diffusax import nn            # Deferred: only the schema needs the network classes.
  for name, cls in nn.NETWORKS.items():  # model.<name>.*: that network's constructor options (see diffusax.nn).
    c.model[name] = network_options(cls)
  c.model.dtype = "float32"          # Compute dtype: float32 or bfloat16 (params stay float32).
  c.model.class_conditional = True   # Condition on labels (adds a null class for CFG).

  c.guidance = ml_collections.ConfigDict()
  c.guidance.label_dropout = 0.1     # P(label -> null class) in training, for classifier-free guidance.

  c.task = ml_collections.ConfigDict()  # Image-conditioned diffusion: each example -> (target, condition image).
  c.task.name = "generate"           # data.tasks.TASKS: generate (no image), super_resolution, colorization, inpainting.
  c.task.factor = 2                  # super_resolution: the condition is the image area-downsampled by this factor.
  c.task.mask_kind = "box"           # inpainting: holes are one "box", free-form "stroke"s, or "mixed".
  c.task.image_dropout = 0.0         # P(the condition image is dropped) in training, for CFG on the image.
  c.task.aug_max = 0.0               # Noise-conditioning augmentation (CDM): the condition is trained at
                                     # q(z_s | z), s ~ U[0, aug_max], s given to the network (0: off).

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-4                  # Peak learning rate (AdamW).
  c.optim.warmup_steps = 0           # Linear warmup steps.
  c.optim.decay = "constant"         # After warmup: constant or cosine (to end_lr_factor * lr).
  c.optim.end_lr_factor = 0.0        # Final lr / peak lr for cosine.
  c.optim.b1 = 0.9                   # Adam beta1.
  c.optim.b2 = 0.999                 # Adam beta2.
  c.optim.eps = 1e-8                 # Adam epsilon.
  c.optim.weight_decay = 0.0         # Decoupled weight decay, on kernels and matrices only (ndim >= 2).
  c.optim.grad_clip = 1.0            # Global-norm gradient clip (0 disables).

  c.ema = ml_collections.ConfigDict()
  c.ema.decays = (0.9999,)           # One EMA of the params per decay; the first is used for samples.
  c.ema.warmup = True                # Effective decay min(decay, (1+step)/(10+step)).
  c.ema.sigma_rels = ()              # Power-function EMAs (EDM2) to track, by relative std in (0, 0.2887],
                                     # kept after the classic ones; e.g. (0.05, 0.1) for post-hoc EMA.
  c.ema.snapshot_every = 0           # Steps between snapshots of the power EMAs in WORKDIR/ema_snapshots
                                     # (0: none); --mode=phema reconstructs any sigma_rel from them.
  c.ema.target_sigma_rel = 0.1       # --mode=phema: sigma_rel of the EMA to reconstruct.
  c.ema.target_step = -1             # --mode=phema: its end step, a snapshot step (-1: the latest snapshot).
  c.ema.reconstruct_from = ()        # --mode=phema: the tracked sigma_rels whose snapshots are used (() = all).
  c.ema.sweep = ()                   # --mode=phema_sweep: sigma_rels to reconstruct and evaluate (FD curve);
                                     # () = 12 values from 0.02 to 0.25.

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128           # Global batch, split over all data-parallel devices.
  c.train.num_steps = 10000          # Total optimizer steps.
  c.train.log_every = 100            # Steps between logged metrics (the only host syncs).
  c.train.eval_every = 2000          # Steps between eval loss + sample grid (0: only at the end).
  c.train.full_eval = False          # Also run the full evaluation of --mode=eval (eval.metrics: samples,
                                     # fd/kid, class accuracy, bits/dim; JSON in WORKDIR/eval) on the EMA
                                     # params at every eval_every and after the last step. Slow: off by default.
  c.train.ckpt_every = 1000          # Steps between checkpoints (and always at the end).
  c.train.keep_checkpoints = 3       # Checkpoints kept.
  c.train.async_checkpoints = True   # Write checkpoints in the background.
  c.train.eval_batches = 4           # Held-out batches in the eval loss.
  c.train.ckpt_fallback = False      # If the latest checkpoint fails its checksums, resume from the newest
                                     # one that verifies (the bad one is renamed <step>.corrupt); else stop.
  c.train.allow_unverified_restore = False  # Restore a checkpoint whose meta records no checksums (its
                                     # arrays cannot be verified; a warning is logged); else it is refused.

  c.sample = ml_collections.ConfigDict()
  c.sample.method = "dpm_solver_pp_2m"  # core.samplers.METHODS name.
  c.sample.num_steps = 50            # Sampler steps.
  c.sample.guidance_scale = 1.0      # CFG scale w (0: conditional only; guided = cond + w (cond - uncond)).
  c.sample.per_class = 10            # Grid columns per class row (conditional); grid side otherwise.
  c.sample.eta = 0.0                 # DDIM eta.
  c.sample.spacing = ""              # The sampler's time grid (core.samplers.grid.SPACINGS; "" = the method's
                                     # default); "trailing" for distilled students (t_i = t_max (1 - i / n)).
  c.sample.order = 0                 # UniPC's order (1-3; 0 = its default, 2).
  c.sample.num_samples = 1000        # --mode=sample: samples to generate (global indices 0..N-1).
  c.sample.shard_size = 256          # --mode=sample: samples per .npz shard (= one batch over all devices).
  c.sample.labels = ()               # --mode=sample: labels cycled over indices; () = balanced (i mod classes).
  c.sample.seed = 0                  # --mode=sample/eval: sample i's noise is fold_in(key(seed), i).
  c.sample.checkpoint_step = -1      # --mode=sample/eval: checkpoint step to load (-1: the latest).
  c.sample.output_dir = ""           # --mode=sample: shard folder ("" = WORKDIR/samples/step<S>_<method><n>_w<w>_seed<seed>).
  c.sample.guide_workdir = ""        # Autoguidance (EDM2): the guiding model's workdir (a smaller or less-trained
                                     # model of the same data and schedule); guidance_scale then weighs
                                     # main - guide instead of CFG's cond - uncond. "" = CFG (or none).
  c.sample.guide_step = -1           # The guiding model's checkpoint step (-1: its latest).
  c.sample.clip_x0 = 0.0             # > 0: clip x0_hat to [-clip_x0, clip_x0] at every sampler step (1.0 for
                                     # data in [-1, 1]: DDPM's "clip denoised"); 0: off.
  c.sample.guidance_interval = (0.0, 1.0)  # Guide (CFG or autoguidance) only for t in [lo, hi]
                                     # (Kynkaanniemi et al. 2024); outside, the unguided model.
  c.sample.aug_level = 0.0           # Conditional tasks: the condition image at q(z_s | z) with this s (needs a
                                     # model trained with task.aug_max > 0; 0: the clean condition).

  c.cascade = ml_collections.ConfigDict()  # --mode=sample / eval of a super-resolution model as a cascade's stage 2.
  c.cascade.base_workdir = ""        # The base stage's workdir: its sample i is the condition of sample i
                                     # ("" = the held-out split's low-resolution images).
  c.cascade.base_step = -1           # Its checkpoint step (-1: the latest).
  c.cascade.base_guidance_scale = 1.0  # The base stage's CFG scale (the labels are the job's).
  c.cascade.truncated = False        # Truncated conditioning augmentation (CDM): the base stops at
                                     # s = sample.aug_level and its x_s is the condition (else its x_0 at q(z_s | z)).

  c.eval = ml_collections.ConfigDict()
  c.eval.metrics = ("fd", "kid", "class_accuracy", "bpd_vlb", "bpd_ode")  # --mode=eval: what to compute.
  c.eval.num_samples = 900           # Generated samples for fd/kid/class_accuracy (digits: ~ a real half).
  c.eval.features = "auto"           # fd/kid features: auto (the dataset's own classifier: digits, photos; else inception), digits, photos, inception.
  c.eval.inception_weights = ""      # Path of the FID Inception weights (pt_inception-2015-12-05-*.pth or .npz).
  c.eval.kid_subset_size = 1000      # KID subset size (capped at the set sizes); 100 subsets.
  c.eval.bpd_examples = 128          # Held-out (data.eval_split) examples for bits/dim.
  c.eval.vlb_steps = 100             # Time steps of the discrete VLB (discrete schedules: their own T).
  c.eval.ode_steps = 50              # Steps of the probability-flow ODE solver for bpd_ode.
  c.eval.ode_solver = "heun"         # PF-ODE solver: euler, heun or rk4.
  c.eval.hutchinson = "rademacher"   # Divergence: rademacher or gaussian (Hutchinson), or exact (small data).
  c.eval.t_min = 1e-3                # Smallest time of the VLB grid and the ODE.

  c.distill = ml_collections.ConfigDict()  # --mode=distill (programs/distill.py); the model is the teacher's.
  c.distill.kind = "progressive"     # "progressive" (Salimans & Ho 2022), "guided" (Meng et al. 2023: a
                                     # w-conditioned student of a CFG teacher, then progressive rounds of it;
                                     # set model.<name>.guidance_embed=True) or "consistency" (Song et al. 2023).
  c.distill.teacher_workdir = ""     # The teacher's run directory (its first EMA is the teacher).
  c.distill.teacher_step = -1        # The teacher's checkpoint step (-1: its latest).
  c.distill.teacher_steps = 64       # progressive: the teacher's DDIM steps; round r's student takes
                                     # teacher_steps / 2^(r+1).
  c.distill.student_steps = 1        # progressive: the last round's student steps (a power-of-2 divisor).
  c.distill.steps_per_round = 1000   # Optimizer steps per round (consistency: in all).
  c.distill.reset_optimizer = True   # progressive: a fresh optimizer (and learning-rate schedule) per round.
  c.distill.num_levels = 18          # consistency: N, the Karras grid of noise levels (t_min .. t_max).
  c.distill.teacher_solver = "heun"  # consistency: the teacher's ODE step, "ddim" (Euler) or "heun".
  c.distill.metric = "l2"            # consistency: "l2" or "pseudo_huber".
  c.distill.target_decay = 0.95      # consistency: EMA decay of the target network theta^-.
  c.distill.guidance_range = (0.0, 2.0)  # guided: w ~ U[w_min, w_max] (guided = cond + w (cond - uncond)).

  c.stage = "diffusion"              # What --mode=train trains: "diffusion", or "autoencoder" (latent
                                     # diffusion's stage 1, programs/autoencoder.py: the KL autoencoder of
                                     # autoencoder.* with its patch discriminator, then its latent statistics).

  c.autoencoder = ml_collections.ConfigDict()  # stage = "autoencoder" (LDM's first stage, Rombach et al. 2022).
  from diffusax.nn import autoencoder as ae_nn, discriminator as disc_nn
  c.autoencoder.net = network_options(ae_nn.AutoencoderKL)  # The autoencoder's options (diffusers' AutoencoderKL
                                     # layout: block_out_channels gives f = 2^(len - 1), z_channels, ...).
  c.autoencoder.disc = network_options(disc_nn.PatchDiscriminator)  # The patch discriminator's options.
  c.autoencoder.rec_loss = "l1"      # Pixel reconstruction term, summed over pixels: "l1" or "l2".
  c.autoencoder.kl_weight = 1e-6     # Weight of KL(q(z|x) || N(0, I)) (summed over latent entries).
  c.autoencoder.disc_weight = 0.5    # Weight of the adaptive-weighted adversarial term (hinge, patch GAN).
  c.autoencoder.disc_start = 0       # Step from which the adversarial term and the discriminator train
                                     # (-1: never; no discriminator is built).
  c.autoencoder.disc_lr = 0.0        # Discriminator learning rate (0: optim.lr); same warmup/decay shape.
  c.autoencoder.adaptive_max = 1e4   # Upper clamp of the adaptive weight ||grad rec|| / ||grad adv||.
  c.autoencoder.perceptual_weight = 1.0  # Weight of LPIPS (VGG) in the reconstruction term; it is used only
                                     # when autoencoder.lpips_vgg_weights names weights (else off, logged).
  c.autoencoder.lpips_vgg_weights = ""  # torchvision VGG-16 state dict (vgg16-397923af.pth or .npz) for LPIPS.
  c.autoencoder.lpips_lin_weights = ""  # LPIPS linear layers (default: vgg.pth inside the installed lpips package).
  c.autoencoder.init_from = ""       # Start from published weights: a diffusers AutoencoderKL folder or
                                     # .safetensors/.bin file (net options must match); with train.num_steps=0
                                     # it is only imported (checkpoint and latent statistics, no training).
  c.autoencoder.grid_examples = 8    # Held-out examples shown (input | reconstruction) in reconstructions.png.

  c.latent = ml_collections.ConfigDict()  # Latent diffusion, stage 2: the diffusion model learns the latents.
  c.latent.autoencoder_workdir = ""  # A stage-1 run directory ("" = pixel-space diffusion).
  c.latent.autoencoder_step = -1     # Its checkpoint step (-1: the latest); it must match its latent statistics.
  c.latent.normalize = "channel"     # Latent scaling from the stage-1 statistics: "channel" ((z - mean_c) / std_c),
                                     # "scalar" (LDM's z / std over all entries), "none" (raw latents).
  c.latent.sample_posterior = True   # Train on z ~ q(z|x) (fresh draw per example and epoch); False: its mean.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1)             # (data, fsdp) device mesh over all processes' devices; one -1 takes
                                     # the rest. Params/optimizer state are sharded over fsdp, the batch over both.
  c.mesh.strategy = "mesh"           # "mesh": jit over the (data, fsdp) mesh; "pmap": replicated state,
                                     # pmean of gradients over all devices (mesh.shape must then be (-1, 1)).
  c.mesh.ordered_reduction = False   # Mesh strategy, fsdp = 1: add the per-device gradient sums in device
                                     # order (all-gather, then a fixed sequence of adds) instead of an
                                     # all-reduce, so any process/device topology with the same number of
                                     # data-parallel devices trains bit-identically. Costs one gradient copy
                                     # per device in memory and an all-gather instead of an all-reduce.
  c.mesh.strict_sharding = False     # True: a parameter whose sharding rules ask for fsdp (size > 1) but none of
                                     # whose dimensions divides by it is refused (ConfigError naming it) instead
                                     # of replicated over fsdp (parallel/mesh.py; the run logs what it replicated).

  c.runtime = ml_collections.ConfigDict()
  c.runtime.xla_cpu_eigen_convs = True  # XLA:CPU only: convs/dots via Eigen, ~2x faster conv training on CPU.
  c.runtime.compilation_cache_dir = ""  # Persistent XLA compilation cache directory ("" = off).
  c.runtime.distributed = "auto"     # jax.distributed start-up: "auto" when launched multi-process
                                     # (see diffusax.parallel.distributed), "on", or "off".
  return c
