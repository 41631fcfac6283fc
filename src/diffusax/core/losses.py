"""Per-example diffusion losses [B], loss weightings and time samplers.

A loss compares the model output with the true value of its target at
x_t = alpha x0 + sigma eps, averaged over the non-batch dimensions:

    loss_b = w(t_b) * mean_d (pred - target)^2

Weightings (`WEIGHTINGS`) are given as the weight on the **x0-space** error
||x0_hat - x0||^2 and applied in the model's own target space by dividing by
`targets.x0_mse_factor` (the exact ratio of the two errors at fixed x_t), so
the same weighting means the same objective whatever the model predicts:

    uniform   weight 1 in the model's own target space (DDPM's L_simple for eps)
    snr       SNR(t) in x0 space = the unweighted eps loss
    min_snr   min(SNR(t), gamma) in x0 space (Hang et al. 2023)
    elbo      -1/2 dlogSNR/dt * SNR(t) in x0 space: the continuous-time ELBO
              (Kingma et al. 2021, eq. 17) per dimension, in nats, for t ~ U(0, 1)
    sigmoid   SNR(t) * sigmoid(bias - logSNR(t)) (Kingma & Gao 2023, eps-space sigmoid)
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusax.core import targets as targets_lib
from diffusax.core.process import batch_time, check_same_shape
from diffusax.core.schedules import Schedule

F32 = jnp.float32


# ---------------------------------------------------------------------------
# Weightings: functions (schedule, t [B], **params) -> x0-space weight [B].

def _w_snr(schedule, t, **_):
  return schedule.snr(t)


def _w_min_snr(schedule, t, gamma=5.0, **_):
  return jnp.minimum(schedule.snr(t), gamma)


def _w_elbo(schedule, t, **_):
  return -0.5 * schedule.d_log_snr(t) * schedule.snr(t)


def _w_sigmoid(schedule, t, bias=-1.0, **_):
  return schedule.snr(t) * jax.nn.sigmoid(bias - schedule.log_snr(t))


WEIGHTINGS: dict[str, Callable | None] = {
    "uniform": None,
    "snr": _w_snr,
    "min_snr": _w_min_snr,
    "elbo": _w_elbo,
    "sigmoid": _w_sigmoid,
}


def check_weighting(name: str) -> str:
  if name not in WEIGHTINGS:
    raise ValueError(f"unknown loss weighting {name!r}; allowed: {sorted(WEIGHTINGS)}")
  return name


def target_weight(schedule: Schedule, target: str, t, weighting: str = "uniform", **params):
  """The weight [B] applied to the target-space squared error for `weighting`."""
  check_weighting(weighting)
  unknown = sorted(set(params) - {"gamma", "bias"})
  if unknown:  # the weighting functions take **_; a misspelt setting would otherwise be ignored
    raise ValueError(f"unknown loss weighting parameter(s) {unknown}; allowed: ['bias' (sigmoid), 'gamma' (min_snr)]")
  targets_lib.check_target(target)
  t = jnp.asarray(t, F32)
  if weighting == "uniform":
    return jnp.ones_like(t)
  a, s, da, ds = targets_lib.coefficients(schedule, t)
  w_x0 = WEIGHTINGS[weighting](schedule, t, **params)
  return w_x0 / targets_lib.x0_mse_factor(target, a, s, da, ds)


def target_value(schedule: Schedule, target: str, x0, eps, t):
  """The true value of `target` for (x0, eps) at time t [B]; float32 [B, ...]."""
  targets_lib.check_target(target)
  x0, eps = jnp.asarray(x0), jnp.asarray(eps)
  check_same_shape(x0, eps, "x0", "eps")
  tb = batch_time(t, x0, "t", "x0")
  a, s, da, ds = targets_lib.coefficients(schedule, tb)
  return targets_lib.from_x0_eps(target, x0, eps, a, s, da, ds)


def diffusion_loss(schedule: Schedule, target: str, pred, x0, eps, t, *,
                   weighting: str = "uniform", **weighting_params):
  """Per-example weighted squared error [B] (float32) of a `target` prediction.

  Argument order, as in every loss: schedule, names, arrays, t, then keyword options.

  Args:
    target: what `pred` predicts, one of targets.TARGETS.
    pred: model output at x_t = q_sample(schedule, x0, t, eps), shape of x0.
    x0, eps: [B, ...]; t: [B].
    weighting: a name in WEIGHTINGS; extra parameters (gamma, bias) by keyword.
  """
  check_weighting(weighting)
  targets_lib.check_target(target)
  pred = jnp.asarray(pred)
  x0 = jnp.asarray(x0)
  check_same_shape(pred, x0, "pred", "x0")
  t = jnp.asarray(t, F32)
  if t.ndim != 1 or t.shape[0] != x0.shape[0]:
    raise ValueError(f"t must have shape [B] = [{x0.shape[0]}], got {tuple(t.shape)}")
  true = target_value(schedule, target, x0, eps, t)
  err = jnp.square(pred.astype(F32) - true)
  per_ex = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
  return target_weight(schedule, target, t, weighting, **weighting_params) * per_ex


# ---------------------------------------------------------------------------
# The VLB term of a learned-variance model (improved DDPM, Nichol & Dhariwal 2021).

def vlb_loss(schedule: Schedule, x0_hat, var_interp, x0, x_t, t, *, dt: float, decoder: str = "discretized",
             num_bins: int = 256):
  """L_t [B] in bits per dimension for a learned-variance model at x_t, t (improved DDPM's L_vlb term).

  Arguments as in every loss: the model's outputs (x0_hat, var_interp), the data (x0, x_t), t [B].

  For s = max(t - dt, 0) > 0: KL(q(x_s | x_t, x0) || N(mu(x_t, x0_hat), Sigma)), the model mean being
  the posterior mean with the model's x0 and log Sigma from `process.learned_variance_log_var`; for s = 0
  (the first step): the decoder's -log p(x0 | x_t) with mean x0_hat (the posterior mean at s = 0)
  and that variance, discretised to `num_bins` levels on [-1, 1] (8-bit data: 256) or a Gaussian
  density (decoder="gaussian"). Averaged over dimensions and divided by ln 2, as in their code;
  x0_hat is used as given (the hybrid loss stops its gradient). L_vlb = sum_t L_t ~ (1 / dt) E_t[L_t].
  """
  from diffusax.core import likelihood  # likelihood does not import losses
  from diffusax.core import process
  if decoder not in ("discretized", "gaussian"):
    raise ValueError(f"unknown decoder {decoder!r}; allowed: ['discretized', 'gaussian']")
  x0, x_t, x0_hat = (jnp.asarray(v, F32) for v in (x0, x_t, x0_hat))
  check_same_shape(x0_hat, x0, "x0_hat", "x0")
  check_same_shape(jnp.asarray(var_interp), x0, "var_interp", "x0")
  t = jnp.asarray(t, F32)
  s = jnp.maximum(t - dt, 0.0)
  first = s <= 0.0
  s_safe = jnp.where(first, jnp.minimum(t, dt) * 0.5, s)  # any 0 < s < t: the KL branch is not used there
  log_var = process.learned_variance_log_var(schedule, t, jnp.where(first, 0.0, s), var_interp, dt)
  first_b = first.reshape((-1,) + (1,) * (x0.ndim - 1))
  # Each branch is evaluated on harmless inputs where it is not used: a where() passes the unused
  # branch's gradient on as 0 * grad, which is NaN when that branch overflows (the decoder's bin mass
  # of a far-off mean at a large t, the KL at s = 0).
  mean_q, var_q = process.posterior(schedule, x0, x_t, t, s_safe)
  mean_p, _ = process.posterior(schedule, x0_hat, x_t, t, s_safe)
  kl = likelihood.normal_kl(mean_q, var_q, mean_p, jnp.exp(jnp.where(first_b, jnp.log(var_q), log_var)))
  log_scale = jnp.where(first_b, 0.5 * log_var, 0.0)
  dec_mean = jnp.where(first_b, x0_hat, x0)
  if decoder == "discretized":
    nll = -likelihood.discretized_gaussian_log_likelihood(x0, dec_mean, log_scale, num_bins)
  else:
    nll = -likelihood.gaussian_log_likelihood(x0, dec_mean, log_scale)
  per = jnp.where(first_b, nll, kl)
  return jnp.mean(per.reshape(per.shape[0], -1), axis=1) / jnp.log(2.0)


def _split_learned_variance(out, x0):
  """A learned-variance output [B, ..., 2C] -> (prediction, var_interp), each x0's shape."""
  out = jnp.asarray(out)
  c = x0.shape[-1]
  if out.shape[:-1] != x0.shape[:-1] or out.shape[-1] != 2 * c:
    raise ValueError(f"a learned-variance output needs 2C = {2 * c} channels on the last axis of x0's shape; "
                     f"got out.shape={tuple(out.shape)}, x0.shape={tuple(x0.shape)}")
  return out[..., :c], out[..., c:]


def hybrid_loss(schedule: Schedule, target: str, out, x0, eps, t, *, dt: float, vlb_weight: float = 1e-3,
                weighting: str = "uniform", decoder: str = "discretized", num_bins: int = 256, **weighting_params):
  """L_hybrid = L_simple + lambda L_vlb per example [B] (Nichol & Dhariwal 2021, sec. 3.1), and its parts.

  `out` [B, ..., 2C] is a learned-variance network's output: the `target` prediction, then var_interp.
  L_simple is `diffusion_loss` of the prediction; L_vlb = L_t / dt (the sum over the 1 / dt steps,
  estimated at this t; their code's vb * T / 1000 with lambda = 1e-3) with the prediction's gradient
  stopped, so L_vlb trains only the variance channels. Returns (total [B], {"simple", "vlb"} [B]).
  """
  pred, var_interp = _split_learned_variance(out, x0)
  simple = diffusion_loss(schedule, target, pred, x0, eps, t, weighting=weighting, **weighting_params)
  from diffusax.core import process
  x_t = process.q_sample(schedule, x0, t, eps)
  a, sg, da, ds = targets_lib.coefficients(schedule, jnp.asarray(t, F32))
  x0_hat = targets_lib.to_x0_eps(target, jax.lax.stop_gradient(pred.astype(F32)), x_t, a, sg, da, ds)[0]
  vlb = vlb_loss(schedule, x0_hat, var_interp, x0, x_t, t, dt=dt, decoder=decoder, num_bins=num_bins) / dt
  return simple + vlb_weight * vlb, {"simple": simple, "vlb": vlb}


def vlb_objective(schedule: Schedule, target: str, out, x0, eps, t, *, dt: float, decoder: str = "discretized",
                  num_bins: int = 256):
  """Pure L_vlb per example [B] in bits/dim (Nichol & Dhariwal 2021, sec. 3.3): L_t / dt of `vlb_loss`
  with the gradient reaching the mean (the prediction) as well as the variance channels. `out` is a
  learned-variance output [B, ..., 2C]; t on the knots of the 1 / dt steps (unbiased for t uniform over
  them; with `importance_t`, weight each example by its returned weight)."""
  from diffusax.core import process
  pred, var_interp = _split_learned_variance(out, x0)
  x_t = process.q_sample(schedule, x0, t, eps)
  a, sg, da, ds = targets_lib.coefficients(schedule, jnp.asarray(t, F32))
  x0_hat = targets_lib.to_x0_eps(target, pred.astype(F32), x_t, a, sg, da, ds)[0]
  return vlb_loss(schedule, x0_hat, var_interp, x0, x_t, t, dt=dt, decoder=decoder, num_bins=num_bins) / dt


# ---------------------------------------------------------------------------
# Importance-sampled times for L_vlb (improved DDPM, Nichol & Dhariwal 2021, sec. 3.3).
#
# A history of the last `history` values of L_t for each of the T steps; p_t is proportional to
# sqrt(E[L_t^2]) (mixed with uniform_prob of the uniform distribution, as in their sampler), and uniform
# until every step has its full history. An example drawn with probability p_t is weighted 1 / (T p_t),
# so E_p[L_t / (T p_t)] = (1 / T) sum_t L_t, the uniform average, whatever the history.

def importance_init(num_steps: int, history: int = 10) -> dict:
  """The empty history: {"losses": float32 [T, history], "count": int32 [T]}."""
  return {"losses": jnp.zeros((num_steps, history), F32), "count": jnp.zeros((num_steps,), jnp.int32)}


def importance_probs(hist: dict, uniform_prob: float = 1e-3):
  """p [T]: proportional to sqrt(mean of the squared history) once every step's history is full, else uniform."""
  losses_, count = hist["losses"], hist["count"]
  n, h = losses_.shape
  w = jnp.sqrt(jnp.mean(jnp.square(losses_), axis=1))
  full = jnp.all(count >= h) & (jnp.sum(w) > 0)
  p = w / jnp.where(full, jnp.sum(w), 1.0)
  p = p * (1.0 - uniform_prob) + uniform_prob / n
  return jnp.where(full, p, jnp.full((n,), 1.0 / n, F32))


def importance_t(key, batch_size: int, hist: dict, uniform_prob: float = 1e-3):
  """(step index i [B] int32 in 0..T-1, weight [B] = 1 / (T p_i)); the time of step i is (i + 1) / T."""
  p = importance_probs(hist, uniform_prob)
  i = jax.random.categorical(key, jnp.log(p), shape=(batch_size,)).astype(jnp.int32)
  return i, 1.0 / (p.shape[0] * p[i])


def importance_update(hist: dict, steps, values) -> dict:
  """The history with `values` [B] (L_t of each example, unweighted) appended at their `steps` [B],
  in batch order, each step's history a ring of its last `history` values."""
  steps, values = jnp.asarray(steps, jnp.int32), jax.lax.stop_gradient(jnp.asarray(values, F32))
  h = hist["losses"].shape[1]

  def put(j, hs):
    losses_, count = hs
    i = steps[j]
    return losses_.at[i, count[i] % h].set(values[j]), count.at[i].add(1)

  losses_, count = jax.lax.fori_loop(0, steps.shape[0], put, (hist["losses"], hist["count"]))
  return {"losses": losses_, "count": count}


# ---------------------------------------------------------------------------
# The continuous-time ELBO of a VP model (VDM, Kingma et al. 2021).

class VDMTerms(NamedTuple):
  """The negative ELBO of each example [B] in nats (summed over dimensions), by its three terms."""
  diffusion: jnp.ndarray       # 1/2 gamma'(t) ||eps - eps_hat||^2: the t ~ U[0, 1] estimate of L_inf (eq. 17)
  prior: jnp.ndarray           # KL(q(z_1 | x) || N(0, sigma_1^2 I))
  reconstruction: jnp.ndarray  # -log p(x | z_0) under the discrete decoder over `levels` values

  @property
  def total(self):
    return self.diffusion + self.prior + self.reconstruction


def discrete_decoder_nll(x0, z_0, gamma_0, levels: int = 256):
  """-log p(x | z_0) [B] in nats: VDM's decoder for data on `levels` values v_k = 2k/(levels-1) - 1.

  p(x_i = v_k | z_0) is proportional to q(z_0,i | v_k) = N(z_0,i; alpha_0 v_k, sigma_0^2), i.e. a
  softmax over k of -1/2 ((z_0 / alpha_0 - v_k) alpha_0 / sigma_0)^2 (Kingma et al. 2021, eq. 13 and
  app. C). x0 is snapped to its nearest level (data given on the 8-bit grid of a coarser set, e.g. the
  digits' 17 values stored as round(v * 255 / 16), decode to their own level)."""
  if not isinstance(levels, (int, np.integer)) or levels < 2:
    raise ValueError(f"levels must be an integer >= 2, got {levels!r}")
  x0, z_0 = jnp.asarray(x0, F32), jnp.asarray(z_0, F32)
  check_same_shape(x0, z_0, "x0", "z_0")
  g0 = jnp.asarray(gamma_0, F32)
  k = jnp.clip(jnp.round((x0 + 1.0) * 0.5 * (levels - 1)), 0, levels - 1).astype(jnp.int32)
  v = jnp.linspace(-1.0, 1.0, levels, dtype=F32)
  inv_scale = jnp.exp(-0.5 * g0)  # alpha_0 / sigma_0 = sqrt(SNR_0)
  z_scaled = z_0 / jnp.sqrt(jax.nn.sigmoid(-g0))  # z_0 / alpha_0
  logits = -0.5 * jnp.square((z_scaled[..., None] - v) * inv_scale)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, k[..., None], axis=-1)[..., 0]
  return jnp.sum(nll.reshape(nll.shape[0], -1), axis=1)


def vdm_terms(target: str, pred, x0, eps, eps_0, gamma_t, d_gamma_t, gamma_0, gamma_1, *, levels: int = 256):
  """The terms of VDM's continuous-time negative ELBO per example from the schedule's gamma values.

  With gamma = -logSNR (increasing in t), alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma), and a
  `target` prediction `pred` at x_t = alpha_t x0 + sigma_t eps:

      diffusion      = 1/2 gamma'(t) ||eps - eps_hat(x_t, t)||^2        (eq. 17, one draw of t ~ U[0, 1])
      prior          = KL(N(alpha_1 x0, sigma_1^2) || N(0, sigma_1^2)) = 1/2 SNR_1 ||x0||^2
      reconstruction = -log p(x0 | z_0), z_0 = alpha_0 x0 + sigma_0 eps_0   (`discrete_decoder_nll`)

  Everything the schedule contributes enters through gamma_t, d_gamma_t [B] and the scalars gamma_0,
  gamma_1, so a caller can take the gradient with respect to these per-example values (VDM's
  variance minimisation, `training.step`). Returns `VDMTerms` of [B] arrays in nats.
  """
  targets_lib.check_target(target)
  if target == "flow":
    raise ValueError("the VDM ELBO is for VP schedules; target 'flow' needs a flow schedule: use eps, x0, v or score")
  pred, x0, eps, eps_0 = (jnp.asarray(v, F32) for v in (pred, x0, eps, eps_0))
  for name, arr in (("pred", pred), ("eps", eps), ("eps_0", eps_0)):
    check_same_shape(arr, x0, name, "x0")
  g_t, dg_t = (batch_time(v, x0, n, "x0") for v, n in ((gamma_t, "gamma_t"), (d_gamma_t, "d_gamma_t")))
  a_t, s_t = jnp.sqrt(jax.nn.sigmoid(-g_t)), jnp.sqrt(jax.nn.sigmoid(g_t))  # [B, 1, ...] or scalars
  x_t = a_t * x0 + s_t * eps
  eps_hat = targets_lib.to_x0_eps(target, pred, x_t, a_t, s_t, None, None)[1]
  sq = jnp.sum(jnp.square(eps - eps_hat).reshape(x0.shape[0], -1), axis=1)
  diffusion = 0.5 * jnp.broadcast_to(dg_t.reshape(-1), sq.shape) * sq
  g0, g1 = jnp.asarray(gamma_0, F32), jnp.asarray(gamma_1, F32)
  prior = 0.5 * jnp.exp(-g1) * jnp.sum(jnp.square(x0).reshape(x0.shape[0], -1), axis=1)
  z_0 = jnp.sqrt(jax.nn.sigmoid(-g0)) * x0 + jnp.sqrt(jax.nn.sigmoid(g0)) * eps_0
  return VDMTerms(diffusion, prior, discrete_decoder_nll(x0, z_0, g0, levels))


def vdm_gammas(schedule: Schedule, t):
  """(gamma(t) [B], gamma'(t) [B], gamma(0), gamma(1)) of a VP schedule, gamma = -logSNR."""
  if schedule.kind != "vp":
    raise ValueError(f"the VDM ELBO needs a VP schedule, got kind {schedule.kind!r} ({type(schedule).__name__})")
  t = jnp.asarray(t, F32)
  g_t, dg_t = jax.jvp(lambda u: -schedule.log_snr(u), (t,), (jnp.ones_like(t),))
  return g_t, dg_t, -schedule.log_snr(jnp.zeros((), F32)), -schedule.log_snr(jnp.ones((), F32))


def vdm_loss(schedule: Schedule, target: str, pred, x0, eps, t, *, eps_0, levels: int = 256) -> VDMTerms:
  """VDM's continuous-time negative ELBO per example (`vdm_terms`) at t [B] ~ U[0, 1] of any VP schedule.

  E_{t, eps, eps_0}[total] is the negative ELBO of x0 in nats; / (D ln 2) gives bits per dimension.
  """
  return vdm_terms(target, pred, x0, eps, eps_0, *vdm_gammas(schedule, t), levels=levels)


# ---------------------------------------------------------------------------
# Time samplers: (key, batch_size, ...) -> t [B] float32 in [t_min, 1].

def uniform_t(key, batch_size: int, t_min: float = 1e-5, t_max: float = 1.0):
  return jax.random.uniform(key, (batch_size,), F32, t_min, t_max)


def low_discrepancy_t(key, batch_size: int, t_min: float = 1e-5, t_max: float = 1.0):
  """Stratified: t_i = (u + i / B) mod 1, mapped to [t_min, t_max] (Kingma et al. 2021)."""
  u = jax.random.uniform(key, (), F32)
  t = jnp.mod(u + jnp.arange(batch_size, dtype=F32) / batch_size, 1.0)
  return t_min + (t_max - t_min) * t


def uniform_discrete_t(key, batch_size: int, num_steps: int):
  """t = (i + 1) / T with i uniform in {0, ..., T-1}: the knots of a `Discrete` schedule."""
  i = jax.random.randint(key, (batch_size,), 0, num_steps)
  return (i.astype(F32) + 1.0) / num_steps


def log_normal_t(key, batch_size: int, schedule: Schedule, p_mean: float = -1.2, p_std: float = 1.2,
                 t_min: float = 1e-5):
  """EDM's training noise: ln(sigma/alpha) ~ N(p_mean, p_std^2), mapped back to t (Karras et al. 2022).

  Clipped to [t_min, 1] like the other time samplers (a draw below t_min lands on t_min).
  """
  log_sigma = p_mean + p_std * jax.random.normal(key, (batch_size,), F32)
  return jnp.clip(schedule.t_from_log_snr(-2.0 * log_sigma), t_min, 1.0)


TIME_SAMPLERS = {
    "uniform": uniform_t,
    "low_discrepancy": low_discrepancy_t,
    "uniform_discrete": uniform_discrete_t,
    "log_normal": log_normal_t,
}


def sample_t(key, batch_size: int, method: str, *, schedule: Schedule | None = None,
             num_steps: int | None = None, t_min: float = 1e-5, p_mean: float = -1.2, p_std: float = 1.2):
  """Draws t [B] by name: one of TIME_SAMPLERS."""
  if method == "uniform":
    return uniform_t(key, batch_size, t_min)
  if method == "low_discrepancy":
    return low_discrepancy_t(key, batch_size, t_min)
  if method == "uniform_discrete":
    if num_steps is None and schedule is not None and hasattr(schedule, "num_steps"):
      num_steps = schedule.num_steps
    if not num_steps or num_steps < 1:
      raise ValueError("time sampler 'uniform_discrete' needs num_steps >= 1 (or a Discrete schedule)")
    return uniform_discrete_t(key, batch_size, num_steps)
  if method == "log_normal":
    if schedule is None:
      raise ValueError("time sampler 'log_normal' needs the schedule")
    return log_normal_t(key, batch_size, schedule, p_mean, p_std, t_min)
  raise ValueError(f"unknown time sampler {method!r}; allowed: {sorted(TIME_SAMPLERS)}")


# ---------------------------------------------------------------------------
# Classifier-free guidance training.

def drop_labels(key, labels, p, null_class: int):
  """Replaces each label by `null_class` with probability p (label dropout for CFG).

  labels: int [B]; p: float (may be traced); returns int [B] of the same dtype.
  """
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  if isinstance(p, (int, float)) and not 0.0 <= p <= 1.0:
    raise ValueError(f"drop_labels: p must lie in [0, 1], got {p}")
  drop = jax.random.bernoulli(key, p, labels.shape)
  return jnp.where(drop, jnp.asarray(null_class, labels.dtype), labels)
