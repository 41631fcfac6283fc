"""The train step against an independent float64 numpy computation (tests/train_reference.py).

The step under test is `training.step.make_train_step(...)` jitted, as the
programs build it (with `training.optimizer.make` and `training.state.create`),
on a one-hidden-layer denoiser whose forward and backward pass numpy computes
by hand. Only the random draws (t, eps, dropped labels) are re-made with
jax.random from the keys the step documents; the arithmetic after them is
float64 numpy written from the formulas, never a call into diffusax.

Tolerances. The framework computes in float32 (unit roundoff u = 6e-8). The
loss is a mean of B * D squares of O(1) terms through a few well-conditioned
float32 ops each, so its relative error is a few u: rtol 1e-5 (measured:
<= 2.5e-7). Gradient leaves are sums over the batch with cancellation, so they
are compared with an absolute tolerance of 1e-5 times the leaf's largest entry,
since the size of the summands sets the float32 error, not the result
(measured: <= 8e-7). Parameters and EMAs after four AdamW steps are compared
with atol 2e-6: float32 storage of O(1) parameters has ulp 6e-8 and each step
adds an O(u) relative error to an update of size lr = 0.05 (measured: 2e-7).
Every tolerance can fail: the negative controls below give the same comparisons
a reference with one thing wrong (a weighting, a target, t_min, the sampler,
gamma, bias, the step's keys, label dropout, each group of the decay mask, the
clip norm x 1.1, no clip, no lr warmup, no EMA warmup) and require them to be
refused by >= 10x the tolerance (measured: loss >= 4e-3 relative, params >= 2e-3).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import train_reference as ref
from diffusax.core import schedules
from diffusax.nn import embeddings
from diffusax.parallel import mesh as mesh_lib
from diffusax.training import optimizer as optim_lib
from diffusax.training import state as state_lib
from diffusax.training import step as step_lib

D, H, F, C, B = 2, 8, 4, 3, 16   # data dim, hidden width, Fourier features, classes, batch
SEED = 7


class TinyDenoiser(nn.Module):
  """pred = tanh(x w_in + fourier(t) w_t + b_in + embed[y]) w_out + b_out (see train_reference).

  The Fourier frequencies W are `embeddings.FourierFeatures`' frozen 1-D parameter, with scale 1
  so that float32 arguments 2 pi t W stay O(1) (at the default scale 16 the float32 rounding of
  the argument alone is ~1e-5 absolute, larger than the loss tolerance).
  """
  hidden: int = H

  @nn.compact
  def __call__(self, x, t, y=None, train: bool = False):
    del train
    feat = embeddings.FourierFeatures(F, scale=1.0, name="fourier")(t)
    normal = nn.initializers.normal
    w_in = self.param("w_in", normal(0.8), (x.shape[1], self.hidden))
    w_t = self.param("w_t", normal(0.8), (F, self.hidden))
    b_in = self.param("b_in", normal(0.3), (self.hidden,))
    embed = self.param("embed", normal(0.5), (C + 1, self.hidden))
    w_out = self.param("w_out", normal(0.5), (self.hidden, x.shape[1]))
    b_out = self.param("b_out", normal(0.3), (x.shape[1],))
    h = jnp.tanh(x @ w_in + feat @ w_t + b_in + jnp.take(embed, y, axis=0))
    return h @ w_out + b_out


MODULE = TinyDenoiser()
# Which leaves AdamW decays, by name as documented in training/optimizer.py: matrices and kernels
# (here also the class table), not biases or the frozen Fourier frequencies.
DECAYED = {"fourier": {"W": False}, "w_in": True, "w_t": True, "b_in": False, "embed": True,
           "w_out": True, "b_out": False}


def to_np(tree):
  if isinstance(tree, collections.abc.Mapping):
    return {k: to_np(v) for k, v in tree.items()}
  return np.asarray(tree, np.float64)


@pytest.fixture(scope="module")
def params0():
  return init_params(MODULE, 3)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(11)
  labels = rng.integers(0, C, size=B).astype(np.int32)
  centers = np.array([[1.0, -0.5], [-1.0, 0.5], [0.3, 1.2]], np.float32)
  x = (centers[labels] + 0.3 * rng.standard_normal((B, D))).astype(np.float32)
  return {"x": x, "label": labels}


@functools.partial(jax.jit, static_argnums=(2, 3))
def raw_draws(seed, step, t_min, num_discrete):
  """The step's jax.random draws from the keys it documents: fold_in(key(seed), step) split into
  (time, noise, label dropout, network dropout); every time sampler's raw draw from the time key."""
  key = jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"), step)
  k_t, k_eps, k_label, _ = jax.random.split(key, 4)
  return dict(uniform=jax.random.uniform(k_t, (B,), jnp.float32, t_min, 1.0),
              scalar=jax.random.uniform(k_t, (), jnp.float32),
              index=jax.random.randint(k_t, (B,), 0, num_discrete),
              normal=jax.random.normal(k_t, (B,), jnp.float32),
              eps=jax.random.normal(k_eps, (B, D), jnp.float32),
              u_label=jax.random.uniform(k_label, (B,), jnp.float32))


def draws(seed, step, loss, t_of_log_snr=None, num_discrete=None):
  """t [B], eps [B, D] and the label-dropout uniforms [B] (bernoulli(p) = [u < p]) of step `step`.

  The raw draws are jax.random (above); the maps from them to t are numpy float64."""
  r = {k: np.asarray(v, np.float64) for k, v in raw_draws(seed, step, loss.t_min, num_discrete or 1).items()}
  if loss.time_sampler == "uniform":
    t = r["uniform"]
  elif loss.time_sampler == "low_discrepancy":  # t_i = t_min + (1 - t_min) ((u + i / B) mod 1)
    t = loss.t_min + (1.0 - loss.t_min) * np.mod(r["scalar"] + np.arange(B) / B, 1.0)
  elif loss.time_sampler == "uniform_discrete":  # t = (i + 1) / T, i uniform in {0..T-1}
    t = (r["index"] + 1.0) / num_discrete
  elif loss.time_sampler == "log_normal":  # ln(sigma / alpha) ~ N(-1.2, 1.2^2), logSNR = -2 ln(sigma / alpha)
    t = np.clip(t_of_log_snr(-2.0 * (-1.2 + 1.2 * r["normal"])), 0.0, 1.0)
  else:
    raise AssertionError(loss.time_sampler)
  return t, r["eps"], r["u_label"]


def init_params(module, seed):
  x = jnp.zeros((2, D), jnp.float32)
  init = lambda k: mesh_lib.unbox(module.init(k, x, jnp.full((2,), 0.5), jnp.zeros((2,), jnp.int32))["params"])
  return jax.jit(init)(jax.random.key(seed))


def new_state(params, tx, num_ema):
  return jax.jit(lambda p: state_lib.create(p, tx, SEED, num_ema))(params)


def grad_probe():
  """An optimizer that keeps params as they are and stores the gradient it was given as its state."""
  return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                      lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


DDPM_BETAS = np.asarray(np.linspace(1e-3, 0.2, 20), np.float32)
SCHEDULES = {  # name -> (diffusax schedule, numpy reference of its coefficients, numpy t(logSNR))
    "vp_linear": (schedules.VPLinear(0.1, 20.0), ref.vp_linear, ref.vp_linear_t_from_log_snr),
    "flow": (schedules.Flow(), ref.flow, None),
    "ddpm": (schedules.Discrete.from_betas(DDPM_BETAS), lambda t: ref.discrete_at_knots(t, DDPM_BETAS), None),
}


# ---------------------------------------------------------------------------
# The loss and its gradient for every target, weighting and time sampler.

WPARAMS = {"min_snr": (("gamma", 2.0),), "sigmoid": (("bias", 0.5),)}
TARGETS = ("eps", "x0", "v", "score", "flow")
WEIGHTINGS = ("uniform", "snr", "min_snr", "elbo", "sigmoid")
LOSS_CASES = (
    [("vp_linear", tg, w, "uniform", 1e-5) for tg in TARGETS for w in WEIGHTINGS]
    + [("flow", tg, w, "uniform", 1e-5) for tg in ("flow", "x0") for w in ("uniform", "min_snr", "elbo")]
    + [("vp_linear", "eps", "uniform", "low_discrepancy", 1e-3), ("vp_linear", "v", "min_snr", "log_normal", 1e-5),
       ("vp_linear", "x0", "snr", "uniform", 1e-2),
       ("ddpm", "eps", "uniform", "uniform_discrete", 1e-5), ("ddpm", "x0", "snr", "uniform_discrete", 1e-5)])
DROPOUT_CASES = [("vp_linear", "eps", "uniform", "uniform", 1e-5, p) for p in (0.5, 1.0)]


def reference_loss(params, batch, loss, schedule_name, step=0):
  """(loss, gradient tree, t) of the step at `step` from `params`, in float64 numpy."""
  sched, sched_ref, t_of_lsnr = SCHEDULES[schedule_name]
  t, eps, u_label = draws(SEED, step, loss, t_of_lsnr, getattr(sched, "num_steps", None))
  y = batch["label"]
  if loss.label_dropout:
    y = np.where(u_label < loss.label_dropout, loss.null_class, y)
  value, grads, _ = ref.loss_and_grads(to_np(params), batch["x"].astype(np.float64), eps, t, y, sched_ref,
                                       loss.target, loss.weighting, **dict(loss.weighting_params))
  return value, grads, t


def loss_case(schedule_name, target, weighting, sampler, t_min, label_dropout=0.0):
  return step_lib.LossConfig(target=target, weighting=weighting, weighting_params=WPARAMS.get(weighting, ()),
                             time_sampler=sampler, t_min=t_min, label_dropout=label_dropout, null_class=C)


@pytest.fixture(scope="module")
def probed(params0, batch):
  """{case: (loss, grad_norm, gradient tree)} of one train step from params0 for every case.

  All cases are traced into one jitted function (one compile instead of one per case); each
  is `make_train_step` with a probe optimizer that stores the gradient the step hands it."""
  cases = {case: loss_case(*case) for case in LOSS_CASES + DROPOUT_CASES}
  fns = {case: step_lib.make_train_step(MODULE.apply, grad_probe(), optax.constant_schedule(0.0),
                                        SCHEDULES[case[0]][0], loss, (0.9,))
         for case, loss in cases.items()}

  def all_steps(state, batch):
    out = {}
    for case, fn in fns.items():
      new, metrics = fn(state, batch)
      out[case] = (metrics["loss"], metrics["grad_norm"], new.opt_state)
    return out

  state = new_state(params0, grad_probe(), 1)
  out = jax.jit(all_steps)(state, batch)
  return {case: (float(v), float(g), to_np(tree)) for case, (v, g, tree) in out.items()}


def assert_grads_close(got, want, rel=1e-5):
  for path, g, w in zip(_paths(want), ref.tree_leaves(got), ref.tree_leaves(want)):
    np.testing.assert_allclose(g, w, rtol=0, atol=rel * np.abs(w).max() + 1e-30, err_msg=path)


def _paths(tree, prefix=""):  # in the order of ref.tree_leaves
  if isinstance(tree, dict):
    return [p for k in sorted(tree) for p in _paths(tree[k], f"{prefix}/{k}")]
  return [prefix]


@pytest.mark.parametrize("schedule_name,target,weighting,sampler,t_min", LOSS_CASES)
def test_loss_and_gradient_match_numpy(probed, params0, batch, schedule_name, target, weighting, sampler, t_min):
  case = (schedule_name, target, weighting, sampler, t_min)
  loss = loss_case(*case)
  value, gnorm, grads = probed[case]
  want, want_grads, t = reference_loss(params0, batch, loss, schedule_name)
  assert t.min() >= t_min and t.max() <= 1.0
  np.testing.assert_allclose(value, want, rtol=1e-5)
  np.testing.assert_allclose(gnorm, ref.global_norm(want_grads), rtol=1e-5)
  assert_grads_close(grads, want_grads)
  assert np.all(grads["fourier"]["W"] == 0.0), "the Fourier frequencies are frozen"


def test_weightings_and_targets_are_told_apart(probed, params0, batch):
  """Negative control: each vp_linear case's loss is refused by every other case's reference, except
  eps with 'uniform' vs 'snr', which are the same objective by definition (SNR / SNR = 1)."""
  cases = [c for c in LOSS_CASES if c[0] == "vp_linear" and c[3] == "uniform" and c[4] == 1e-5]
  want = {c: reference_loss(params0, batch, loss_case(*c), "vp_linear")[0] for c in cases}
  same = {("eps", "uniform"), ("eps", "snr")}
  for c in cases:
    for other in cases:
      if other != c and not {c[1:3], other[1:3]} <= same:
        assert abs(probed[c][0] - want[other]) > 100 * 1e-5 * abs(want[other]), (c, other)


@pytest.mark.parametrize("case,wrong", [
    (("vp_linear", "x0", "snr", "uniform", 1e-2), dict(t_min=1e-5)),
    (("vp_linear", "eps", "uniform", "low_discrepancy", 1e-3), dict(time_sampler="uniform")),
    (("vp_linear", "v", "min_snr", "log_normal", 1e-5), dict(weighting_params=(("gamma", 5.0),))),
    (("vp_linear", "eps", "sigmoid", "uniform", 1e-5), dict(weighting_params=(("bias", -1.0),))),
    (("vp_linear", "flow", "elbo", "uniform", 1e-5), dict(step=1)),
], ids=["t_min_ignored", "sampler_not_stratified", "gamma_default", "bias_default", "draws_of_step_1"])
def test_loss_comparison_fails_for_a_wrong_reference(probed, params0, batch, case, wrong):
  """Negative controls: the loss tolerance refuses a reference with one setting (or the step's keys) wrong."""
  wrong = dict(wrong)
  step = wrong.pop("step", 0)
  loss = dataclasses.replace(loss_case(*case), **wrong)
  want = reference_loss(params0, batch, loss, case[0], step=step)[0]
  assert abs(probed[case][0] - want) > 100 * 1e-5 * abs(want)


# ---------------------------------------------------------------------------
# Label dropout (classifier-free guidance training).

@pytest.mark.parametrize("p", [0.5, 1.0])
def test_label_dropout_matches_numpy(probed, params0, batch, p):
  case = DROPOUT_CASES[[c[-1] for c in DROPOUT_CASES].index(p)]
  loss = loss_case(*case)
  value, gnorm, grads = probed[case]
  want, want_grads, _ = reference_loss(params0, batch, loss, case[0])
  np.testing.assert_allclose(value, want, rtol=1e-5)
  assert_grads_close(grads, want_grads)
  # The null-class row of the table gets a gradient exactly when some label was dropped.
  _, _, u_label = draws(SEED, 0, loss, None)
  dropped = u_label < p
  assert (p == 1.0 and dropped.all()) or (0 < dropped.sum() < B), "the draw must drop some labels and keep some"
  assert np.abs(grads["embed"][C]).max() > 0
  # Negative control: the same step without dropping labels is a different loss.
  undropped, _, _ = reference_loss(params0, batch, dataclasses.replace(loss, label_dropout=0.0), case[0])
  assert abs(undropped - value) > 100 * 1e-5 * abs(value)


# ---------------------------------------------------------------------------
# Clipping, AdamW with its decay mask, warmup + cosine learning rate and the EMA, over a few steps.

OPT_LOSS = ("vp_linear", "v", "min_snr", "uniform", 1e-5)
OPT_STEPS = 4
EMA_DECAYS = (0.999, 0.05)  # the warmup (1 + k) / (10 + k) binds for the first, the decay itself for the second


def opt_config(clip_norm):
  # eps = 1e-3 is comparable to the clipped gradient entries (~1e-2), so the update depends on the
  # gradient's size and not only its sign (Adam is invariant to the scale of g when eps << |g|:
  # clipping would then be invisible) and no near-zero entry can flip an update by its rounding.
  return optim_lib.OptimConfig(lr=0.05, warmup_steps=2, decay="cosine", total_steps=6, end_lr_factor=0.1,
                               b1=0.8, b2=0.95, eps=1e-3, weight_decay=0.3, grad_clip=clip_norm)


def step_batch(batch, k):
  return {name: np.roll(v, k, axis=0) for name, v in batch.items()}


def reference_run(params0, batch, c, decayed=DECAYED, clip_norm=None, lr_warmup=True, ema_warmup=True):
  """Params, EMAs, losses and lrs after each of OPT_STEPS steps, in float64 numpy."""
  loss = loss_case(*OPT_LOSS)
  clip_norm = c.grad_clip if clip_norm is None else clip_norm
  p = to_np(params0)
  emas = [p for _ in EMA_DECAYS]
  opt = ref.adamw_init(p)
  out = []
  for k in range(OPT_STEPS):
    bk = step_batch(batch, k)
    t, eps, _ = draws(SEED, k, loss, None)
    value, grads, _ = ref.loss_and_grads(p, bk["x"].astype(np.float64), eps, t, bk["label"], ref.vp_linear,
                                         loss.target, loss.weighting, **dict(loss.weighting_params))
    lr = ref.lr_at(k, c.lr, c.warmup_steps if lr_warmup else 0, c.total_steps, c.end_lr_factor)
    p, opt = ref.adamw_update(p, ref.clip(grads, clip_norm), opt, lr, c.b1, c.b2, c.eps, c.weight_decay, decayed)
    emas = [ref.ema_update(e, p, d, k, ema_warmup) for e, d in zip(emas, EMA_DECAYS)]
    out.append(dict(params=p, emas=emas, loss=value, lr=lr, grad_norm=ref.global_norm(grads)))
  return out


@pytest.fixture(scope="module")
def optimizer_run(params0, batch):
  """(config, per-step results) of the programs' train step with training.optimizer.make."""
  loss = loss_case(*OPT_LOSS)
  g0 = reference_loss(params0, batch, loss, "vp_linear")[1]
  c = opt_config(clip_norm=0.5 * ref.global_norm(g0))  # clipping binds at step 0
  tx, lr_fn = optim_lib.make(c)
  fn = step_lib.make_train_step(MODULE.apply, tx, lr_fn, SCHEDULES["vp_linear"][0], loss, EMA_DECAYS)
  step = jax.jit(fn)
  state = new_state(params0, tx, len(EMA_DECAYS))
  out = []
  for k in range(OPT_STEPS):
    state, metrics = step(state, step_batch(batch, k))
    out.append(dict(params=to_np(state.params), emas=[to_np(e) for e in state.ema_params],
                    loss=float(metrics["loss"]), lr=float(metrics["lr"]), grad_norm=float(metrics["grad_norm"])))
  return c, out


PARAM_ATOL = 2e-6


def max_param_error(got, want):
  """Largest |difference| over all steps of params and EMAs."""
  err = 0.0
  for g, w in zip(got, want):
    for a, b in zip(ref.tree_leaves(g["params"]), ref.tree_leaves(w["params"])):
      err = max(err, np.abs(a - b).max())
    for ge, we in zip(g["emas"], w["emas"]):
      for a, b in zip(ref.tree_leaves(ge), ref.tree_leaves(we)):
        err = max(err, np.abs(a - b).max())
  return err


def test_adamw_clip_lr_and_ema_match_numpy(optimizer_run, params0, batch):
  c, got = optimizer_run
  want = reference_run(params0, batch, c)
  for k, (g, w) in enumerate(zip(got, want)):
    np.testing.assert_allclose(g["loss"], w["loss"], rtol=1e-5, err_msg=f"step {k}")
    np.testing.assert_allclose(g["grad_norm"], w["grad_norm"], rtol=1e-5, err_msg=f"step {k}")
    np.testing.assert_allclose(g["lr"], w["lr"], rtol=1e-6, err_msg=f"step {k}")
  assert got[0]["lr"] == 0.0 and got[1]["lr"] > 0.0
  assert want[0]["grad_norm"] > c.grad_clip, "clipping must bind at step 0"
  assert max_param_error(got, want) < PARAM_ATOL
  # The frozen Fourier frequencies: no gradient and no decay, so bit for bit unchanged.
  w0 = np.asarray(params0["fourier"]["W"])
  assert all(np.array_equal(g["params"]["fourier"]["W"], w0) for g in got)
  # Every other leaf moved (lr > 0 from step 1).
  moved = [np.abs(a - b).max() for a, b in zip(ref.tree_leaves(got[-1]["params"]), ref.tree_leaves(to_np(params0)))]
  assert sorted(moved)[1] > 1e-3


def _mask(**changes):
  return {k: changes.get(k, v) if not isinstance(v, dict) else {"W": changes.get("W", v["W"])}
          for k, v in DECAYED.items()}


WRONG_REFERENCES = {
    "decay_none": dict(decayed=ref.tree_map(lambda d: False, DECAYED)),
    "decay_biases_too": dict(decayed=_mask(b_in=True, b_out=True)),
    "decay_fourier_W_too": dict(decayed=_mask(W=True)),
    "no_decay_on_class_table": dict(decayed=_mask(embed=False)),
    "clip_norm_x1.1": dict(clip_norm=1.1),
    "no_clip": dict(clip_norm=0.0),
    "no_lr_warmup": dict(lr_warmup=False),
    "no_ema_warmup": dict(ema_warmup=False),
}


@pytest.mark.parametrize("perturbation", sorted(WRONG_REFERENCES))
def test_the_comparison_fails_for_a_wrong_reference(optimizer_run, params0, batch, perturbation):
  """Negative controls: each perturbed reference is refused by the same tolerance (measured: the
  smallest, clip norm x 1.1, is off by 2e-3 = 1000 x PARAM_ATOL)."""
  c, got = optimizer_run
  kw = dict(WRONG_REFERENCES[perturbation])
  if "clip_norm" in kw:
    kw["clip_norm"] *= c.grad_clip
  err = max_param_error(got, reference_run(params0, batch, c, **kw))
  assert err > 10 * PARAM_ATOL, err


def test_decay_mask_of_the_real_networks():
  """optimizer.decay_mask on diffusax's own MLP (with Fourier time features), U-Net and DiT: kernels
  and embedding tables are decayed; biases (also attention's 2-D [heads, head_dim] query/key/value
  biases), norm scales and the frozen Fourier W are not."""
  from diffusax.nn import dit, mlp, unet
  nets = [(mlp.MLPDenoiser(hidden=16, depth=1, num_classes=C, time_embedding="fourier"), (2, D)),
          (unet.UNet(base_channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), num_groups=4,
                     num_classes=C), (2, 8, 8, 1)),
          (dit.DiT(patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=C), (2, 8, 8, 1))]
  seen = set()
  for net, shape in nets:
    abstract = jax.eval_shape(lambda k: mesh_lib.unbox(net.init(
        k, jnp.zeros(shape), jnp.full((2,), 0.5), jnp.zeros((2,), jnp.int32))["params"]), jax.random.key(0))
    flat = jax.tree_util.tree_flatten_with_path(optim_lib.decay_mask(abstract))[0]
    names = {jax.tree_util.keystr(path): bool(m) for path, m in flat}
    for path, decayed in names.items():
      leaf = path.rsplit("'", 2)[-2]
      seen.add(leaf)
      assert decayed == (leaf.endswith("kernel") or leaf == "embedding"), (type(net).__name__, path, decayed)
  assert {"kernel", "bias", "embedding", "W", "scale", "query_bias", "query_kernel"} <= seen, seen


@pytest.mark.parametrize("c", [
    optim_lib.OptimConfig(lr=3e-4, warmup_steps=10, decay="cosine", total_steps=50, end_lr_factor=0.1),
    optim_lib.OptimConfig(lr=1e-3, warmup_steps=0, decay="cosine", total_steps=40, end_lr_factor=0.0),
    optim_lib.OptimConfig(lr=2e-4, warmup_steps=8, decay="constant", total_steps=100),
], ids=["warmup_cosine", "cosine", "warmup_constant"])
def test_lr_schedule_values(c):
  sched = optim_lib.lr_schedule(c)
  steps = sorted({0, 1, c.warmup_steps // 2, c.warmup_steps, c.warmup_steps + 1,
                  (c.warmup_steps + c.total_steps) // 2, c.total_steps - 1, c.total_steps, c.total_steps + 7})
  got = np.array([float(sched(k)) for k in steps])
  want = np.array([ref.lr_at(k, c.lr, c.warmup_steps, c.total_steps, c.end_lr_factor, c.decay) for k in steps])
  # float32 schedule arithmetic: absolute error ~u lr (1 + cos near the end of the cosine cancels).
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=2e-7 * c.lr)
  # Spot values from the formula, by hand: peak at the end of warmup, the end value from total_steps on.
  assert got[steps.index(c.warmup_steps)] == pytest.approx(c.lr, rel=1e-6)
  end = c.lr * (c.end_lr_factor if c.decay == "cosine" else 1.0)
  assert got[-1] == pytest.approx(end, rel=1e-6, abs=1e-12)


# ---------------------------------------------------------------------------
# A learnable problem: the loss falls.

def test_loss_of_a_learnable_problem_falls():
  """eps-prediction on three tight clusters, one per class: given y, x0 is nearly a point mu_y,
  so eps = (x_t - alpha mu_y) / sigma is (nearly) a function of (x_t, t, y) and its loss can
  approach ~0, while a network that has not learned predicts ~0 with loss E eps^2 = 1."""
  num_steps, k, bsz = 200, 25, 64
  module = TinyDenoiser(hidden=32)
  loss = step_lib.LossConfig(target="eps", weighting="uniform", null_class=C)
  c = optim_lib.OptimConfig(lr=1e-2, warmup_steps=10, decay="cosine", total_steps=num_steps, end_lr_factor=0.1,
                            b2=0.99, grad_clip=1.0)
  tx, lr_fn = optim_lib.make(c)
  step = jax.jit(step_lib.make_train_step(module.apply, tx, lr_fn, SCHEDULES["vp_linear"][0], loss, (0.99,)))
  state = new_state(init_params(module, 5), tx, 1)
  rng = np.random.default_rng(2)
  centers = np.array([[1.0, -0.5], [-1.0, 0.5], [0.3, 1.2]], np.float32)
  labels = rng.integers(0, C, size=(num_steps, bsz)).astype(np.int32)
  xs = (centers[labels] + 0.05 * rng.standard_normal((num_steps, bsz, D))).astype(np.float32)
  losses = []
  for i in range(num_steps):
    state, metrics = step(state, {"x": xs[i], "label": labels[i]})
    losses.append(metrics["loss"])
  losses = np.asarray(jax.device_get(losses), np.float64)
  first, last = losses[:k].mean(), losses[-k:].mean()
  # Learned, not just rescaled: well below the loss 1 of the best prediction that ignores x_t
  # (eps_hat = 0; a run gives ~0.1), and at most half the loss of the first steps.
  assert last < 0.3, (first, last)
  assert last < 0.5 * first, (first, last)
