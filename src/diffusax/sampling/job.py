"""A resumable, sharded batch sampling job.

The job draws samples 0 .. N-1 in shards of `shard_size` consecutive global
indices; shard k holds indices [k S, min((k + 1) S, N)). Every sample depends
only on (seed, its global index, its label):

  * x_T of sample i is prior_std * N(0, I) drawn with fold_in(fold_in(key, 0), i)
    (`generate.initial_noise`);
  * samplers that draw noise while sampling (ddpm, euler_maruyama, pc, ddim with
    eta > 0) run per sample (vmapped over the batch) with the key
    fold_in(fold_in(key, 1), i), so their draws do not depend on the batch either.

A shard is computed as one batch (padded to a multiple of the device count,
split over every device of every process by the mesh's batch sharding), so a
restarted job recomputes exactly the same batches and its files are
bit-identical to an uninterrupted run's. Process 0 writes each shard as
`shard_KKKKKK.npz` {samples (uint8 images [n, H, W, C] or float32 vectors [n, D]),
labels [n] (-1 when unconditional), indices [n], seed} with `storage.commit`:
locally through a temporary name, fsync and rename, so a shard file is either
complete or absent; on an object store (gs://, no rename there) the shard and
then its marker `shard_KKKKKK.npz.committed`, so a shard counts only once its
marker is written and a shard without one is redone. A restarted job skips the
committed shards, after checking that `job.json` in the output directory
(committed the same way) describes the same job. Labels: sample i gets
labels[i mod len(labels)] when labels are given, else i mod num_classes
(balanced classes).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusax import storage
from diffusax.core import guidance, samplers
from diffusax.parallel import mesh as mesh_lib
from diffusax.sampling import generate

_SHARD = re.compile(r"^shard_(\d{6})\.npz$")


class JobMismatch(ValueError):
  """The output directory holds shards of a different job."""


@dataclasses.dataclass(frozen=True)
class JobSpec:
  """What identifies the set of samples (written to job.json)."""
  num_samples: int
  shard_size: int
  seed: int
  method: str
  num_steps: int
  eta: float
  guidance_scale: float
  labels: tuple = ()              # explicit labels, cycled; () = balanced i mod num_classes
  num_classes: int | None = None  # None: unconditional
  checkpoint_step: int = -1
  sample_shape: tuple = ()
  guide: str = ""                 # autoguidance: "<guide workdir>@<step>"; "" = CFG (or none)
  guidance_interval: tuple = (0.0, 1.0)
  clip_x0: float = 0.0            # > 0: x0_hat clipped to [-clip_x0, clip_x0] at every step
  spacing: str = ""               # the sampler's grid spacing ("" = the method's default)
  order: int = 0                  # UniPC's order (0 = its default)
  decoder: str = ""               # latent diffusion: the autoencoder that decodes the samples ("" = pixels)
  task: str = ""                  # a conditional task's model (its signature's task, JSON); "" = generate
  conditions: str = ""            # where a task's conditions come from: "held_out:<split>" (example i mod N),
                                  # or "cascade:<base workdir>@<step>" (the base stage's sample i)
  cond_shape: tuple = ()          # the condition image's per-example shape
  aug_level: float = 0.0          # the condition's augmentation level s at sampling
  truncated: bool = False         # cascade: the base stopped at s, its x_s the condition (CDM's truncated form)
  base_guidance_scale: float = 0.0  # cascade: the base stage's CFG scale

  @property
  def num_shards(self) -> int:
    return -(-self.num_samples // self.shard_size)

  def sampler_options(self) -> dict:
    """The method options of the job's sampler (`samplers.options_of`): eta where the method has it,
    spacing and order when set."""
    return generate.sampler_options(self.method, self.eta, self.spacing, self.order)

  def per_sample_keys(self) -> bool:
    """Whether the sampler draws noise (as the method declares), so each sample needs its own key."""
    return samplers.stochastic(self.method, self.sampler_options())

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["labels"], d["sample_shape"] = list(self.labels), list(self.sample_shape)
    d["guidance_interval"] = [float(v) for v in self.guidance_interval]
    d["cond_shape"] = list(self.cond_shape)
    return d


@dataclasses.dataclass(frozen=True)
class Guide:
  """The guiding network of autoguidance: a Linen module and its target (the schedule is the main model's)."""
  module: object
  target: str


def labels_for(spec: JobSpec, indices: np.ndarray) -> np.ndarray | None:
  """int32 labels of the given global indices (None when unconditional)."""
  if spec.num_classes is None:
    return None
  idx = np.asarray(indices, np.int64)
  if spec.labels:
    return np.asarray(spec.labels, np.int32)[idx % len(spec.labels)]
  return (idx % spec.num_classes).astype(np.int32)


def make_sample_fn(module, schedule, target: str, spec: JobSpec, *, null_class: int | None,
                   guide: Guide | None = None, stream: int | None = None, t_stop: float | None = None) -> Callable:
  """fn(params, indices [B] uint32, labels [B] int32 | None, scale) -> float32 samples [B, *shape].

  Guidance with weight `scale` (spec.guidance_interval applies): with `guide`,
  autoguidance (`core.guidance.autoguidance`, params = (main params, guide params));
  else CFG against the null class when the model is conditional.
  `stream`: the job's draws come from fold_in(key(seed), stream) instead of key(seed) (a cascade's base
  stage: its noise independent of the next stage's). `t_stop` > 0: the reverse process stops at that time
  and returns x_{t_stop} (`core.conditioning.sample_to`; truncated conditioning augmentation).
  """
  from diffusax.core import conditioning
  from diffusax.nn import bridge
  options = spec.sampler_options()
  shape = tuple(spec.sample_shape)
  base = jax.random.key(spec.seed)
  if stream is not None:
    base = jax.random.fold_in(base, stream)
  k_noise, k_loop = jax.random.fold_in(base, 0), jax.random.fold_in(base, 1)
  interval = None if tuple(spec.guidance_interval) == (0.0, 1.0) else tuple(spec.guidance_interval)

  def run(params, x_T, labels, scale, key):
    if guide is not None:
      params, guide_params = params
    model = bridge.model(module, {"params": params}, target, schedule)
    if guide is not None:
      # The guide predicts on the main model's process (a learned schedule: the main model's).
      weak = bridge.model(guide.module, {"params": guide_params}, guide.target, schedule).replace(
          schedule=model.schedule)
      model = guidance.autoguidance(model, weak, scale=scale, interval=interval)
    else:  # CFG, or a w-conditioned network's own guidance input (`bridge.condition`).
      model, labels = bridge.condition(module, model, labels, scale, null_class, interval)
    if t_stop:
      return conditioning.sample_to(model, x_T, t_stop, key=key, method=spec.method, num_steps=spec.num_steps,
                                    cond=labels, options=options, clip_x0=spec.clip_x0 or None)
    return samplers.sample(model, x_T, key=key, method=spec.method, num_steps=spec.num_steps, cond=labels,
                           options=options, clip_x0=spec.clip_x0 or None)

  def fn(params, indices, labels, scale):
    main = params[0] if guide is not None else params
    x_T = generate.initial_noise(k_noise, indices, shape, bridge.bind_schedule(schedule, main).prior_std)
    if not spec.per_sample_keys():
      return run(params, x_T, labels, scale, k_loop)
    one = lambda x, y, i: run(params, x[None], None if y is None else y[None], scale,
                              jax.random.fold_in(k_loop, i))[0]
    if labels is None:
      return jax.vmap(lambda x, i: one(x, None, i))(x_T, indices)
    return jax.vmap(one)(x_T, labels, indices)

  return fn


def make_conditional_sample_fn(module, schedule, target: str, spec: JobSpec, *, null_class: int | None,
                               guide_on=("label",)) -> Callable:
  """fn(params, indices [B] uint32, labels [B] int32 | None, scale, image [B, h, w, c]) -> float32 samples of a
  conditional task's model given each sample's clean condition image.

  The condition goes in at spec.aug_level (`generate.condition`: noise from fold_in(key(seed) -> 2, i)),
  or as it is when spec.truncated (a truncated cascade's x_s, already at that level). CFG with weight
  `scale` on `generate.guided_parts` (`core.conditioning.cfg_on`). Draws per sample index as in
  make_sample_fn."""
  from diffusax.core import conditioning
  from diffusax.nn import bridge
  options = spec.sampler_options()
  shape = tuple(spec.sample_shape)
  base = jax.random.key(spec.seed)
  k_noise, k_loop, k_cond = (jax.random.fold_in(base, i) for i in range(3))

  def run(params, x_T, labels, image, s, scale, key):
    model = bridge.model(module, {"params": params}, target, schedule)
    cond = conditioning.complete(conditioning.Cond(label=labels, image=image, aug_level=s))
    parts = generate.guided_parts(module, labels, guide_on)
    if parts:
      model = conditioning.cfg_on(model, parts=parts, scale=scale, null_label=null_class)
    return samplers.sample(model, x_T, key=key, method=spec.method, num_steps=spec.num_steps, cond=cond,
                           options=options, clip_x0=spec.clip_x0 or None)

  def fn(params, indices, labels, scale, image):
    x_T = generate.initial_noise(k_noise, indices, shape, bridge.bind_schedule(schedule, params).prior_std)
    if spec.truncated:  # x_s of the base stage: the condition at level s as it is.
      s = jnp.full((image.shape[0],), spec.aug_level, jnp.float32) if getattr(module, "aug_embed", False) else None
      c = conditioning.Cond(image=jnp.asarray(image, jnp.float32), aug_level=s)
    else:
      c = generate.condition(module, bridge.bind_schedule(schedule, params), indices, None, image, spec.aug_level,
                             k_cond)
    image, s = c.image, c.aug_level
    if not spec.per_sample_keys():
      return run(params, x_T, labels, image, s, scale, k_loop)
    one = lambda x, y, z, a, i: run(params, x[None], None if y is None else y[None], z[None],
                                    None if a is None else a[None], scale, jax.random.fold_in(k_loop, i))[0]
    return jax.vmap(one, in_axes=(0, None if labels is None else 0, 0, None if s is None else 0, 0))(
        x_T, labels, image, s, indices)

  return fn


def make_cascade_fn(base_fn: Callable, sr_fn: Callable) -> Callable:
  """fn((sr params, base params), indices, labels, scale) -> (samples, base samples): the base stage's
  sample i (`make_sample_fn` with its own stream and scale) is the condition of the super-resolution
  stage's sample i (`make_conditional_sample_fn`); both in one program."""
  def fn(params, indices, labels, scale):
    sr_params, base_params = params
    low = base_fn(base_params, indices, labels)
    return sr_fn(sr_params, indices, labels, scale, low), low
  return fn


def to_storage(x: np.ndarray, is_image: bool) -> np.ndarray:
  return generate.to_uint8(x) if is_image else np.asarray(x, np.float32)


def shard_path(out_dir: str, k: int) -> str:
  return storage.join(out_dir, f"shard_{k:06d}.npz")


def _npz(data: dict) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **data)
  return buf.getvalue()


def done_shards(out_dir: str) -> set[int]:
  """The committed shards in out_dir (one listing; on an object store each needs its marker)."""
  names = set(storage.listdir(out_dir))
  return {int(m.group(1)) for f in names if (m := _SHARD.match(f))
          and storage.committed(storage.join(out_dir, f), names)}


def prepare_dir(out_dir: str, spec: JobSpec) -> set[int]:
  """Creates or checks `out_dir` (job.json), removes stale temporaries; returns the finished shards."""
  storage.makedirs(out_dir)
  meta = storage.join(out_dir, "job.json")
  want = spec.to_json()
  if storage.committed(meta):
    # Keys added to JobSpec later read as their defaults in an older job.json.
    have = {**JobSpec(0, 1, 0, "", 0, 0.0, 0.0).to_json(), **storage.read_json(meta)}
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if diff:
      raise JobMismatch(f"{out_dir} holds samples of a different job (differs in {diff}: "
                        + ", ".join(f"{k} {have.get(k)!r} there, {want.get(k)!r} now" for k in diff[:4])
                        + "); use another sample.output_dir or remove it")
  else:
    storage.commit(meta, json.dumps(want, indent=1).encode())
  storage.remove_temporaries(out_dir, r"shard_\d{6}\.npz")
  return {k for k in done_shards(out_dir) if k < spec.num_shards}


def _fmt(s: float) -> str:
  s = int(max(s, 0))
  return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_job(sample_fn: Callable, params, spec: JobSpec, out_dir: str, mesh, *, log=print,
            is_image: bool = True, inputs_for: Callable | None = None) -> dict:
  """Generates every missing shard of `spec` into out_dir; returns {"out_dir", "num_samples", "shards"}.

  Multi-process: every process runs this with the same arguments; the shard
  list is process 0's, inputs are split over the mesh, process 0 writes.
  `inputs_for(indices) -> (labels | None, image)`: a conditional task's inputs of those global indices
  (the held-out examples' labels and condition images), passed as sample_fn's labels and fifth argument.
  With spec.cond_shape, sample_fn returns (samples, conditions) and each shard also holds the conditions
  (uint8 images) as 'conditions'.
  """
  pid, nproc = jax.process_index(), jax.process_count()
  done = prepare_dir(out_dir, spec) if pid == 0 else set()
  if nproc > 1:
    from jax.experimental import multihost_utils
    flags = np.zeros(spec.num_shards, np.int32)
    flags[list(done)] = 1
    done = set(np.nonzero(multihost_utils.broadcast_one_to_all(flags))[0].tolist())
  todo = [k for k in range(spec.num_shards) if k not in done]
  ndev = mesh.devices.size
  pad = -(-spec.shard_size // ndev) * ndev
  local = pad // nproc
  sh = mesh_lib.batch_sharding(mesh, 1)
  out_sh = mesh_lib.batch_sharding(mesh, 1 + len(spec.sample_shape))
  conditional = spec.num_classes is not None
  with_cond = bool(spec.cond_shape)
  cond_sh = mesh_lib.batch_sharding(mesh, 1 + len(spec.cond_shape)) if with_cond else None
  if with_cond and inputs_for is not None:  # Return the condition beside the sample, as a cascade does.
    inner = sample_fn
    sample_fn = lambda p, i, y, w, z: (inner(p, i, y, w, z), z)  # noqa: E731
  fn = jax.jit(sample_fn, out_shardings=(out_sh, cond_sh) if with_cond else out_sh)
  scale = jnp.float32(spec.guidance_scale)
  have = sum(min(spec.shard_size, spec.num_samples - k * spec.shard_size) for k in done)
  if done:
    log(f"resuming: {len(done)}/{spec.num_shards} shards ({have} samples) already in {out_dir}")
  t0, made = time.perf_counter(), 0
  for k in todo:
    lo, hi = k * spec.shard_size, min((k + 1) * spec.shard_size, spec.num_samples)
    idx = np.arange(lo, lo + pad, dtype=np.uint32)
    idx[hi - lo:] = hi - 1  # padding repeats the last index and is cropped
    lab = labels_for(spec, idx)
    extra = ()
    part = slice(pid * local, (pid + 1) * local)
    if inputs_for is not None:
      held_lab, image = inputs_for(idx)
      lab = held_lab if conditional else None
      extra = (jax.make_array_from_process_local_data(cond_sh, np.asarray(image, np.float32)[part]),)
    g_idx = jax.make_array_from_process_local_data(sh, idx[part])
    g_lab = jax.make_array_from_process_local_data(sh, lab[part]) if conditional else None
    out = fn(params, g_idx, g_lab, scale, *extra)
    x, low = out if with_cond else (out, None)
    if nproc > 1:
      from jax.experimental import multihost_utils
      x = multihost_utils.process_allgather(x, tiled=True)
      low = None if low is None else multihost_utils.process_allgather(low, tiled=True)
    x = np.asarray(x)[:hi - lo]
    if pid == 0:
      data = {"samples": to_storage(x, is_image), "indices": idx[:hi - lo].astype(np.int64),
              "labels": lab[:hi - lo] if conditional else np.full(hi - lo, -1, np.int32),
              "seed": np.int64(spec.seed)}
      if low is not None:
        data["conditions"] = to_storage(np.asarray(low)[:hi - lo], is_image)
      storage.commit(shard_path(out_dir, k), _npz(data))
    made += hi - lo
    have += hi - lo
    rate = made / max(time.perf_counter() - t0, 1e-9)
    bar = int(20 * have / spec.num_samples)
    log(f"[{'#' * bar}{'.' * (20 - bar)}] {have}/{spec.num_samples} samples | shard {k + 1}/{spec.num_shards}"
        f" | {rate:.1f} samples/s | ETA {_fmt((spec.num_samples - have) / max(rate, 1e-9))}")
  return {"out_dir": out_dir, "num_samples": spec.num_samples, "shards": spec.num_shards}


def load(out_dir: str) -> dict:
  """All shards of a finished job in index order: {samples, labels, indices}. Raises if any is missing."""
  spec = storage.read_json(storage.join(out_dir, "job.json"))
  n = -(-spec["num_samples"] // spec["shard_size"])
  done = done_shards(out_dir)
  missing = [k for k in range(n) if k not in done]
  if missing:
    raise FileNotFoundError(f"{out_dir}: shards {missing[:5]}{'...' if len(missing) > 5 else ''} missing; "
                            "run the sampling job again to finish it")
  parts = [dict(np.load(io.BytesIO(storage.read_bytes(shard_path(out_dir, k))))) for k in range(n)]
  keys = ("samples", "labels", "indices") + (("conditions",) if all("conditions" in p for p in parts) else ())
  out = {key: np.concatenate([p[key] for p in parts]) for key in keys}
  if not np.array_equal(out["indices"], np.arange(spec["num_samples"])):
    raise ValueError(f"{out_dir}: shard indices are not 0..{spec['num_samples'] - 1}")
  return out


def digest(out_dir: str) -> str:
  """sha256 over every shard's samples, labels and indices in index order."""
  d = load(out_dir)
  h = hashlib.sha256()
  for key in ("samples", "labels", "indices"):
    h.update(np.ascontiguousarray(d[key]).tobytes())
  return h.hexdigest()


def write_grid(out_dir: str, per_class: int, num_classes: int | None, is_image: bool) -> str:
  """samples.png: per_class samples of each class in one row per class (images), or a density image."""
  d = load(out_dir)
  path = storage.join(out_dir, "samples.png")
  if not is_image:
    img = generate.scatter_image(d["samples"])
  elif num_classes:
    rows = [d["samples"][d["labels"] == c][:per_class] for c in range(num_classes)]
    rows = [r for r in rows if len(r)]
    cols = max(len(r) for r in rows)
    rows = [np.concatenate([r, np.full((cols - len(r),) + r.shape[1:], 255, np.uint8)]) for r in rows]
    img = generate.image_grid(np.concatenate(rows), len(rows), upscale=max(1, 64 // d["samples"].shape[1]))
  else:
    x = d["samples"][:per_class * per_class]
    img = generate.image_grid(x, max(1, -(-len(x) // per_class)), upscale=max(1, 64 // x.shape[1]))
  generate.save_png(path, img)
  return path
