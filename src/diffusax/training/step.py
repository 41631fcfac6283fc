"""The pure train step: `train_step(state, batch) -> (state, metrics)`.

At step k every draw comes from key = fold_in(base_key, k), split four ways
(time, noise, label dropout, network dropout), over the *global* batch, so the
result does not depend on how the batch is sharded or how many processes feed
it. The loss is `core.losses.diffusion_loss` averaged over the batch.

With `axis_name` (the pmap strategy) each device holds b = B / n rows and a
replica of the state: the draws are still made for the global batch of B rows
and device i takes rows [i b, (i + 1) b), and the gradients are averaged with
`pmean`, so the update equals the mesh strategy's up to float reduction order.
(Dropout masks inside the network are drawn per device, so with network
dropout > 0 the two strategies differ in which units are dropped.)

With `ordered_mesh` (mesh strategy, `mesh.ordered_reduction`) the batch sum
of the loss and its gradient is taken in a fixed order: each device computes
the sum over its own rows (under `jax.shard_map`), the n per-device sums are
all-gathered (a copy, no arithmetic) and added in device order,

    g = (((g_0 + g_1) + g_2) + ... + g_{n-1}) / B,

so the update does not depend on how the collective library orders its
all-reduce: two processes of two devices give bit for bit what one process of
four devices gives. It costs n copies of the gradient per device and needs
replicated parameters (fsdp = 1).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from diffusax.core import losses, process, schedules
from diffusax.core import targets as targets_lib
from diffusax.nn import bridge
from diffusax.parallel import mesh as mesh_lib
from diffusax.training import state as state_lib
from diffusax.training.state import TrainState


@dataclasses.dataclass(frozen=True)
class LossConfig:
  target: str = "eps"                 # what the network predicts: one of core.targets.TARGETS
  weighting: str = "uniform"          # core.losses.WEIGHTINGS
  weighting_params: tuple = ()        # e.g. (("gamma", 5.0),) for min_snr
  time_sampler: str = "uniform"       # core.losses.TIME_SAMPLERS
  t_min: float = 1e-5                 # lower end of continuous t
  label_dropout: float = 0.0          # p of replacing the label by the null class (CFG)
  null_class: int | None = None       # = num_classes for a class-conditional model, else None
  objective: str = "simple"           # OBJECTIVES: "simple" (the weighted loss), "hybrid" (+ lambda L_vlb)
  vlb_weight: float = 1e-3            # lambda of the hybrid objective (Nichol & Dhariwal 2021)
  vlb_steps: int = 1000               # T of L_vlb on a continuous schedule (a discrete one uses its own)
  decoder: str = "discretized"        # L_vlb's first-step decoder: discretized (8-bit images) or gaussian
  levels: int = 256                   # values per channel of the data: the decoders' bins (8-bit: 256)
  variance_minimisation: bool = False  # "vdm" + learned schedule: its interior minimises E[L^2] (VDM app. I.2)
  schedule_lr_factor: float = 1.0     # a learned schedule's optimizer updates are scaled by this

  def dt(self, schedule) -> float:
    """The step of L_vlb: 1 / T of a discrete schedule, else 1 / vlb_steps."""
    return 1.0 / getattr(schedule, "num_steps", self.vlb_steps)

  def __post_init__(self):
    targets_lib.check_target(self.target)
    losses.check_weighting(self.weighting)
    if self.time_sampler not in losses.TIME_SAMPLERS and self.time_sampler != "importance":
      raise ValueError(f"unknown time sampler {self.time_sampler!r}; allowed: "
                       f"{sorted(list(losses.TIME_SAMPLERS) + ['importance'])}")
    if self.time_sampler == "importance" and self.objective != "vlb":
      raise ValueError(f"time sampler 'importance' is for the pure L_vlb objective ('vlb'), got {self.objective!r}")
    if not 0.0 <= self.label_dropout <= 1.0:
      raise ValueError(f"label_dropout must lie in [0, 1], got {self.label_dropout}")
    if not 0.0 <= self.t_min < 1.0:
      raise ValueError(f"t_min must lie in [0, 1), got {self.t_min}")
    if self.objective not in OBJECTIVES:
      raise ValueError(f"unknown objective {self.objective!r}; allowed: {list(OBJECTIVES)}")
    if self.decoder not in ("discretized", "gaussian"):
      raise ValueError(f"unknown decoder {self.decoder!r}; allowed: ['discretized', 'gaussian']")


@dataclasses.dataclass(frozen=True)
class CondConfig:
  """A conditional task's image condition in the step (`core.conditioning`): the batch holds it as
  'cond_image' [B, h, w, c]; with aug_max > 0 it is corrupted to q(z_s | z), s ~ U[0, aug_max]
  (noise-conditioning augmentation, CDM sec. 4.3), s handed to the network as aug_level; with
  image_dropout > 0 it is replaced by zeros with probability image_dropout and the network told so
  (has_image). Draws: fold_in(step key, COND_STREAM), then conditioning's own per-part streams."""
  image_dropout: float = 0.0
  aug_max: float = 0.0

  def __post_init__(self):
    if not 0.0 <= self.image_dropout <= 1.0:
      raise ValueError(f"image_dropout must lie in [0, 1], got {self.image_dropout}")
    if not 0.0 <= self.aug_max < 1.0:
      raise ValueError(f"aug_max must lie in [0, 1), got {self.aug_max}")


COND_STREAM = 0xC0D  # The conditional draws' key: fold_in(the step's key, COND_STREAM); the other four unchanged.


def cond_inputs(schedule, cond: CondConfig, image, key, *, train: bool) -> dict:
  """The network's keyword inputs of a condition image [B, h, w, c]: low_res, and aug_level / has_image
  when the task trains them. train=False: the clean image (s = 0), never dropped."""
  from diffusax.core import conditioning
  image = jnp.asarray(image, jnp.float32)
  b = image.shape[0]
  out = {}
  k_aug, k_drop = jax.random.split(key)
  if cond.aug_max > 0:
    if train:
      image, s = conditioning.augment(schedule, k_aug, image, cond.aug_max)
    else:
      s = jnp.zeros((b,), jnp.float32)
    out["aug_level"] = s
  if cond.image_dropout > 0:
    c = conditioning.Cond(image=image)
    if train:
      c = conditioning.drop(k_drop, c, label_p=0.0, image_p=cond.image_dropout)
    c = conditioning.complete(c)
    image, out["has_image"] = c.image, c.has_image
  out["low_res"] = image
  return out


# "simple": core.losses.diffusion_loss of a network with target-sized output; "hybrid": improved DDPM's
# L_simple + lambda L_vlb (core.losses.hybrid_loss) of a learned-variance network (2C output channels);
# "vdm": VDM's continuous-time negative ELBO in bits/dim (core.losses.vdm_terms), which also trains a
# learned schedule (core.schedules.Learned, its parameters in params["schedule"]).
OBJECTIVES = ("simple", "hybrid", "vdm", "vlb")  # "vlb": pure L_vlb (core.losses.vlb_objective), learned variances
IMPORTANCE = "importance"  # LossConfig.time_sampler of importance-sampled L_vlb (core.losses.importance_t)


def initial_aux(loss: LossConfig, schedule):
  """The TrainState's `aux` for this objective: the empty L_t history of importance sampling, else ()."""
  if loss.time_sampler == IMPORTANCE:
    return {"vlb_history": losses.importance_init(schedule.num_steps)}
  return ()


def per_example_loss(schedule, loss: LossConfig, out, x0, eps, t):
  """The training objective per example [B] of a network output at x_t = q_sample(x0, t, eps)."""
  wparams = dict(loss.weighting_params)
  if loss.objective == "vlb":
    return losses.vlb_objective(schedule, loss.target, out, x0, eps, t, dt=loss.dt(schedule), decoder=loss.decoder,
                                num_bins=loss.levels)
  if loss.objective == "hybrid":
    return losses.hybrid_loss(schedule, loss.target, out, x0, eps, t, dt=loss.dt(schedule),
                              vlb_weight=loss.vlb_weight, weighting=loss.weighting, decoder=loss.decoder,
                              num_bins=loss.levels, **wparams)[0]
  return losses.diffusion_loss(schedule, loss.target, out, x0, eps, t, weighting=loss.weighting, **wparams)


def step_keys(state: TrainState):
  """(k_time, k_noise, k_label, k_dropout) for this state's step."""
  key = jax.random.fold_in(state_lib.base_key(state), state.step)
  return tuple(jax.random.split(key, 4))


def make_train_step(apply_fn: Callable, tx: optax.GradientTransformation, lr_fn: Callable,
                    schedule, loss: LossConfig, ema_decays, ema_warmup: bool = True,
                    axis_name: str | None = None, axis_size: int = 1, ordered_mesh=None, ema_gammas=(),
                    cond: CondConfig | None = None):
  """Builds the (unjitted) train step. `apply_fn(variables, x, t, y, train, rngs)` is a Flax apply.

  `cond`: a conditional task's image condition (batch['cond_image'], `CondConfig`), else None.
  `axis_name`/`axis_size`: run under `pmap` over that axis of `axis_size` devices (see module doc).
  `ordered_mesh`: a (data, fsdp) mesh with fsdp = 1 over which the gradient is
  reduced in fixed device order (see module doc); jit the step over that mesh.
  `ema_gammas`: exponents of the power-function EMAs kept after the classic ones in
  state.ema_params (`state.update_ema`).
  """
  if ordered_mesh is not None:
    if axis_name:
      raise ValueError("ordered_mesh is for the mesh strategy; the pmap strategy reduces with pmean")
    if ordered_mesh.shape[mesh_lib.FSDP] != 1:
      raise ValueError(f"a fixed-order gradient reduction needs replicated parameters (fsdp = 1), got mesh "
                       f"{dict(ordered_mesh.shape)}")
  ema_decays = tuple(float(d) for d in ema_decays)
  ema_gammas = tuple(float(g) for g in ema_gammas)
  num_discrete = getattr(schedule, "num_steps", None)
  vdm = loss.objective == "vdm"
  importance = loss.time_sampler == IMPORTANCE
  if (vdm or importance) and ordered_mesh is not None:
    raise ValueError("the vdm objective and importance sampling are not implemented with the fixed-order reduction")
  if importance and not num_discrete:
    raise ValueError("importance-sampled times need a discrete schedule (its T steps)")
  if cond is not None and (axis_name or ordered_mesh is not None or vdm or importance or loss.objective != "simple"):
    raise ValueError("an image condition is implemented for the 'simple' objective on the mesh strategy "
                     "(without the fixed-order reduction)")

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict[str, Any]]:
    x = batch["x"]
    b = x.shape[0]
    n = axis_size if axis_name else 1
    k_t, k_eps, k_label, k_drop = step_keys(state)
    if importance:
      t_idx, t_weight = losses.importance_t(k_t, b * n, state.aux["vlb_history"])
      t = (t_idx.astype(jnp.float32) + 1.0) / num_discrete
    else:
      t = losses.sample_t(k_t, b * n, loss.time_sampler, schedule=schedule, num_steps=num_discrete,
                          t_min=loss.t_min)
      t_weight = jnp.ones((b * n,), jnp.float32)
    eps = jax.random.normal(k_eps, (b * n,) + x.shape[1:], jnp.float32)
    y = None
    if loss.null_class is not None:
      labels = batch["label"]
      if axis_name:
        labels = jax.lax.all_gather(labels, axis_name, tiled=True)
      y = losses.drop_labels(k_label, labels, loss.label_dropout, loss.null_class)
    if axis_name:  # This device's rows of the global draws.
      start = jax.lax.axis_index(axis_name) * b
      t, eps, t_weight = (jax.lax.dynamic_slice_in_dim(v, start, b) for v in (t, eps, t_weight))
      y = None if y is None else jax.lax.dynamic_slice_in_dim(y, start, b)
    if vdm:
      eps_0 = jax.random.normal(jax.random.fold_in(k_eps, 1), (b * n,) + x.shape[1:], jnp.float32)
      if axis_name:
        eps_0 = jax.lax.dynamic_slice_in_dim(eps_0, jax.lax.axis_index(axis_name) * b, b)
      value, grads = _vdm_value_and_grad(apply_fn, schedule, loss, state.params, x, t, eps, eps_0, y, k_drop)
      return finish(state, value, grads)
    x_t = process.q_sample(schedule, x, t, eps)
    extra = {}
    if cond is not None:
      key = jax.random.fold_in(state_lib.base_key(state), state.step)
      extra = cond_inputs(schedule, cond, batch["cond_image"], jax.random.fold_in(key, COND_STREAM), train=True)

    def loss_sum(params, x_t, t, y, x, eps):
      pred = apply_fn({"params": params}, x_t, t, y, train=True, rngs={"dropout": k_drop}, **extra)
      return jnp.sum(per_example_loss(schedule, loss, pred, x, eps, t))

    if importance:  # The weighted objective; the history takes the unweighted L_t of the global batch.
      def weighted(p):
        pred = apply_fn({"params": p}, x_t, t, y, train=True, rngs={"dropout": k_drop})
        per = per_example_loss(schedule, loss, pred, x, eps, t)
        return jnp.sum(t_weight * per) / b, per

      (value, per), grads = jax.value_and_grad(weighted, has_aux=True)(state.params)
      if axis_name:
        per = jax.lax.all_gather(per, axis_name, tiled=True)
      hist = losses.importance_update(state.aux["vlb_history"], t_idx, per)
      return finish(state, value, grads, {**state.aux, "vlb_history": hist})
    if ordered_mesh is None:
      value, grads = jax.value_and_grad(lambda p: loss_sum(p, x_t, t, y, x, eps) / b)(state.params)
    else:
      value, grads = _ordered_value_and_grad(loss_sum, ordered_mesh, state.params, (x_t, t, y, x, eps))
      value, grads = jax.tree.map(lambda v: v / b, (value, grads))
    return finish(state, value, grads)

  def finish(state, value, grads, aux=None):
    if axis_name:
      value, grads = jax.lax.pmean((value, grads), axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if loss.schedule_lr_factor != 1.0 and isinstance(updates, dict) and bridge.SCHEDULE_PARAMS in updates:
      f = loss.schedule_lr_factor
      updates = {**updates, bridge.SCHEDULE_PARAMS: jax.tree.map(lambda u: u * f, updates[bridge.SCHEDULE_PARAMS])}
    params = optax.apply_updates(state.params, updates)
    ema = state_lib.update_ema(state.ema_params, params, ema_decays, state.step, ema_warmup, ema_gammas)
    metrics = {"loss": value, "grad_norm": optax.tree.norm(grads), "lr": lr_fn(state.step)}
    new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                        aux=state.aux if aux is None else aux)
    return new, metrics

  return train_step


def vdm_per_example(apply_fn, loss: LossConfig, params, x, t, eps, eps_0, y, rngs, gammas):
  """VDM's negative ELBO per example [B] in bits/dim at the schedule values `gammas` =
  (gamma_t [B], gamma'(t) [B], gamma_0, gamma_1) (`core.losses.vdm_gammas`)."""
  g_t = gammas[0].reshape((-1,) + (1,) * (x.ndim - 1))
  x_t = jnp.sqrt(jax.nn.sigmoid(-g_t)) * x + jnp.sqrt(jax.nn.sigmoid(g_t)) * eps
  pred = apply_fn({"params": params}, x_t, t, y, train=rngs is not None, rngs=rngs)
  terms = losses.vdm_terms(loss.target, pred, x, eps, eps_0, *gammas, levels=loss.levels)
  return terms.total / (x[0].size * jnp.log(2.0))


def _vdm_value_and_grad(apply_fn, schedule, loss: LossConfig, params, x, t, eps, eps_0, y, k_drop):
  """(mean bits/dim, gradient) of the VDM objective.

  The network's gradient is that of the mean loss. A learned schedule enters the loss only through
  the per-example values gamma(t_i), gamma'(t_i) and the ends gamma_0, gamma_1, so one backward pass
  gives d mean(L) / d(those values); the schedule's gradient is then the cheap vjp of
  `losses.vdm_gammas` with these cotangents: the ELBO's gradient, or, with variance minimisation, for
  the interior (the net) the gradient of E[L^2]: example i's loss depends on its own values only, so
  d mean(L^2) / d gamma(t_i) = 2 L_i d mean(L) / d gamma(t_i) (VDM app. I.2). The continuous-time ELBO
  depends on the ends only, so the ends keep the ELBO's gradient."""
  learned = isinstance(schedule, schedules.Learned)
  rngs = {"dropout": k_drop}
  if learned:
    gammas, sched_vjp = jax.vjp(
        lambda sp: losses.vdm_gammas(dataclasses.replace(schedule, **sp), t), params[bridge.SCHEDULE_PARAMS])
  else:
    gammas = losses.vdm_gammas(schedule, t)

  def mean_loss(p, g):
    per = vdm_per_example(apply_fn, loss, p, x, t, eps, eps_0, y, rngs, g)
    return jnp.mean(per), per

  (value, per), (grads, g_gammas) = jax.value_and_grad(mean_loss, argnums=(0, 1), has_aux=True)(params, gammas)
  if learned:
    sched_grads = sched_vjp(g_gammas)[0]
    if loss.variance_minimisation:
      two_l = 2.0 * jax.lax.stop_gradient(per)
      var = sched_vjp((g_gammas[0] * two_l, g_gammas[1] * two_l,
                       jnp.zeros_like(g_gammas[2]), jnp.zeros_like(g_gammas[3])))[0]
      sched_grads = {**sched_grads, "net": var["net"]}
    grads = {**grads, bridge.SCHEDULE_PARAMS: sched_grads}
  return value, grads


def _ordered_value_and_grad(loss_sum, mesh, params, rows):
  """(sum of loss over the batch, its gradient), each summed over devices in device order.

  `rows` are arrays (or None) whose leading axis is the batch, sharded over the
  mesh's batch axes; `params` are replicated.
  """
  axes = mesh_lib.BATCH_AXES
  n = mesh_lib.batch_size_per_axis(mesh)

  def ordered_sum(v):  # v: [n, ...] per-device partial sums, added strictly left to right.
    return jax.lax.fori_loop(1, n, lambda i, acc: acc + v[i], v[0])

  present = {i: r for i, r in enumerate(rows) if r is not None}

  def local(params, present):
    args = [present.get(i) for i in range(len(rows))]
    value, grads = jax.value_and_grad(loss_sum)(params, *args)
    gathered = jax.lax.all_gather((value, grads), axes)
    return jax.tree.map(ordered_sum, gathered)

  specs = {i: P(axes) for i in present}
  # check_vma=False: under varying-axis typing the gradient of the replicated params would be
  # psum-ed implicitly (an all-reduce in the collective library's order); without it each device's
  # gradient is its own partial sum, and the all-gather + ordered adds make it identical everywhere.
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), specs), out_specs=P(), check_vma=False)(params, present)


def make_eval_loss(apply_fn: Callable, schedule, loss: LossConfig, cond: CondConfig | None = None):
  """(params, batch, key) -> mean loss with fixed draws from `key`, no dropout, labels kept (and a
  conditional task's clean condition image)."""
  num_discrete = getattr(schedule, "num_steps", None)

  sampler = "uniform_discrete" if loss.time_sampler == IMPORTANCE else loss.time_sampler  # unweighted

  def eval_loss(params, batch, key):
    x = batch["x"]
    k_t, k_eps = jax.random.split(key)
    t = losses.sample_t(k_t, x.shape[0], sampler, schedule=schedule, num_steps=num_discrete, t_min=loss.t_min)
    eps = jax.random.normal(k_eps, x.shape, jnp.float32)
    y = batch["label"] if loss.null_class is not None else None
    if loss.objective == "vdm":
      eps_0 = jax.random.normal(jax.random.fold_in(k_eps, 1), x.shape, jnp.float32)
      gammas = losses.vdm_gammas(bridge.bind_schedule(schedule, params), t)
      return jnp.mean(vdm_per_example(apply_fn, loss, params, x, t, eps, eps_0, y, None, gammas))
    x_t = process.q_sample(schedule, x, t, eps)
    extra = {} if cond is None else cond_inputs(schedule, cond, batch["cond_image"], key, train=False)
    pred = apply_fn({"params": params}, x_t, t, y, train=False, **extra)
    return jnp.mean(per_example_loss(schedule, loss, pred, x, eps, t))

  return eval_loss
