"""VDM (Kingma et al. 2021): the learned schedule and the continuous-time ELBO, against closed forms.

References, derived independently of the code under test:
  * Gaussian data x ~ N(0, c^2) per dimension with its exact denoiser: E_eps ||eps - eps_hat||^2 per
    dimension at SNR rho is (rho^2 c^4 + rho x^2) / (rho c^2 + 1)^2, and integrating 1/2 of it over
    gamma = -log rho from gamma_0 to gamma_1 gives, with u = rho c^2 + 1,
        L_inf(x) = 1/2 [ln u - (x^2 / c^2 - 1) / u]  from u(gamma_1) to u(gamma_0),
    which depends on the schedule's ends only.
  * Data uniform on L levels with its exact (mixture) denoiser: the ELBO is tight up to the end terms,
    so E[total] per dimension -> ln L nats when SNR_0 is large and SNR_1 small.
  * The decoder: p(v_k | z_0) = N(z_0; alpha_0 v_k, sigma_0^2) / sum_j N(z_0; alpha_0 v_j, sigma_0^2),
    evaluated in float64 numpy.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusax.core import losses, schedules

G0, G1 = -8.0, 6.0


def _random_learned(seed, scale=3.0, hidden=16):
  """A learned schedule with large random weights (a strongly bent interior), ends G0, G1."""
  k = jax.random.split(jax.random.key(seed), 5)
  net = {"l1_w": scale * jax.random.normal(k[0], ()), "l1_b": scale * jax.random.normal(k[1], ()),
         "l2_w": scale * jax.random.normal(k[2], (hidden,)), "l2_b": scale * jax.random.normal(k[3], (hidden,)),
         "l3_w": scale * jax.random.normal(k[4], (hidden,))}
  return schedules.Learned(net, G0, G1)


def test_the_monotone_network_stays_monotone_and_keeps_its_ends_under_random_parameters():
  t = jnp.linspace(0.0, 1.0, 4001)
  inner = t[1:-1:50]

  @jax.jit
  def curves(net):
    sched = schedules.Learned(net, G0, G1)
    return (sched.gamma(t), sched.d_gamma(t), sched.alpha(t), sched.sigma(t),
            sched.t_from_log_snr(sched.log_snr(inner)))

  for seed in range(6):
    g, dg, a, s, back = (np.asarray(v, np.float64) for v in curves(_random_learned(seed).net))
    assert np.all(np.diff(g) > 0), seed
    assert abs(g[0] - G0) < 1e-4 and abs(g[-1] - G1) < 1e-4
    assert np.all(dg > 0)
    # The VP identities and the inverse.
    np.testing.assert_allclose(a * a + s * s, 1.0, atol=1e-6)
    np.testing.assert_allclose(np.log(a * a / (s * s)), -g, atol=2e-3, rtol=1e-4)
    np.testing.assert_allclose(back, inner, atol=2e-5)


def test_gamma_derivative_by_jvp_against_finite_differences():
  t = np.linspace(0.02, 0.98, 25)
  h = 1e-4
  for sched in (_random_learned(7, scale=1.0), schedules.LinearLogSNR(G0, G1)):
    g64 = lambda u: np.asarray(jax.jit(sched.gamma)(jnp.asarray(u, jnp.float32)), np.float64)
    fd = (g64(t + h) - g64(t - h)) / (2 * h)
    np.testing.assert_allclose(np.asarray(sched.d_gamma(t)), fd, rtol=2e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(sched.d_log_snr(t)), -fd, rtol=2e-2, atol=1e-2)
  np.testing.assert_allclose(schedules.LinearLogSNR(G0, G1).d_gamma(t), G1 - G0, rtol=1e-6)


def _gaussian_eps_denoiser(c):
  def eps_hat(x_t, gamma_t):
    rho = jnp.exp(-gamma_t)[:, None]
    s = jnp.sqrt(jax.nn.sigmoid(gamma_t))[:, None]
    # eps_hat = E[eps | z] = z * sigma / (alpha^2 c^2 + sigma^2) = z / sigma / (rho c^2 + 1).
    return x_t / s / (rho * c * c + 1.0)
  return eps_hat


def _mc_diffusion(sched, x, eps_hat_fn, key, n):
  """n draws of (t, eps) of the VDM diffusion term at the fixed data x [D]: [n] per-draw values."""
  k1, k2 = jax.random.split(key)
  t = jax.random.uniform(k1, (n,))
  x0 = jnp.broadcast_to(x, (n,) + x.shape)
  eps = jax.random.normal(k2, x0.shape)
  g_t, dg_t, g0, g1 = losses.vdm_gammas(sched, t)
  x_t = jnp.sqrt(jax.nn.sigmoid(-g_t))[:, None] * x0 + jnp.sqrt(jax.nn.sigmoid(g_t))[:, None] * eps
  pred = eps_hat_fn(x_t, g_t)
  return losses.vdm_terms("eps", pred, x0, eps, jnp.zeros_like(eps), g_t, dg_t, g0, g1).diffusion


def test_continuous_elbo_on_gaussian_data_is_the_closed_form_for_every_interior_with_the_same_ends():
  c = 0.6
  x = jnp.asarray([-1.1, -0.3, 0.2, 0.9], jnp.float32)
  xs = np.asarray(x, np.float64)
  u = lambda g: np.exp(-g) * c * c + 1.0
  f = lambda uu: np.log(uu) - (xs ** 2 / c ** 2 - 1.0) / uu
  ref = float(np.sum(0.5 * (f(u(G0)) - f(u(G1)))))
  variances = []
  # A schedule whose gamma jumps near t = 1/2 (a steep sigmoid unit): gamma' is large on a short interval.
  steep = schedules.Learned({"l1_w": jnp.float32(1.0), "l1_b": jnp.float32(0.0), "l2_w": jnp.full((1,), 40.0),
                             "l2_b": jnp.full((1,), -20.0), "l3_w": jnp.full((1,), 20.0)}, G0, G1)
  for sched in (schedules.LinearLogSNR(G0, G1), _random_learned(1, scale=2.0), steep):
    draws = np.asarray(jax.jit(lambda k, s=sched: _mc_diffusion(s, x, _gaussian_eps_denoiser(c), k, 200_000))(
        jax.random.key(3)), np.float64)
    se = draws.std() / math.sqrt(draws.size)
    assert abs(draws.mean() - ref) < 4 * se + 1e-3 * abs(ref), (type(sched).__name__, draws.mean(), ref, se)
    variances.append(draws.var())
  # Same expectation, different Monte Carlo variance: the interior changes only the estimator's spread.
  assert variances[2] > 3 * variances[0], variances


def test_elbo_of_the_exact_denoiser_of_discrete_data_is_its_entropy():
  levels = 5
  v = jnp.linspace(-1.0, 1.0, levels)

  def eps_hat(x_t, gamma_t):  # Exact E[eps | x_t] of data uniform on the levels, per dimension.
    a = jnp.sqrt(jax.nn.sigmoid(-gamma_t))[:, None, None]
    s = jnp.sqrt(jax.nn.sigmoid(gamma_t))[:, None, None]
    logits = -0.5 * jnp.square((x_t[..., None] - a * v) / s)
    x0_hat = jnp.sum(jax.nn.softmax(logits, axis=-1) * v, axis=-1)
    return (x_t - a[..., 0] * x0_hat) / s[..., 0]

  n, d = 100_000, 2
  for sched in (schedules.LinearLogSNR(-9.0, 9.0), schedules.Learned(_random_learned(2, 1.5).net, -9.0, 9.0)):
    def run(key, sched=sched):
      k = jax.random.split(key, 4)
      x0 = v[jax.random.randint(k[0], (n, d), 0, levels)]
      t = losses.low_discrepancy_t(k[1], n, 0.0, 1.0)
      eps, eps_0 = jax.random.normal(k[2], x0.shape), jax.random.normal(k[3], x0.shape)
      g = losses.vdm_gammas(sched, t)
      x_t = jnp.sqrt(jax.nn.sigmoid(-g[0]))[:, None] * x0 + jnp.sqrt(jax.nn.sigmoid(g[0]))[:, None] * eps
      return losses.vdm_terms("eps", eps_hat(x_t, g[0]), x0, eps, eps_0, *g, levels=levels).total
    total = np.asarray(jax.jit(run)(jax.random.key(0)), np.float64) / d
    se = total.std() / math.sqrt(n)
    # The bound is above the entropy by the end terms only (here < 1e-3 nats per dimension).
    assert abs(total.mean() - math.log(levels)) < 4 * se + 2e-3, (total.mean(), math.log(levels), se)


def test_decoder_against_the_normalised_gaussian_densities():
  rng = np.random.default_rng(0)
  levels, g0 = 17, -3.0
  vals = np.linspace(-1, 1, levels)
  k = rng.integers(0, levels, (3, 4, 4, 1))
  x0 = vals[k]
  # The digits are stored as round(v * 255 / 16) / 127.5 - 1: off the 17-level grid by < 1/255.
  x0_stored = np.round(k * 255.0 / 16.0) / 127.5 - 1.0
  a0, s0 = math.sqrt(1 / (1 + math.exp(g0))), math.sqrt(1 / (1 + math.exp(-g0)))
  z0 = a0 * x0 + s0 * rng.normal(size=x0.shape)
  dens = np.exp(-0.5 * ((z0[..., None] - a0 * vals) / s0) ** 2)
  p = np.take_along_axis(dens / dens.sum(-1, keepdims=True), k[..., None], -1)[..., 0]
  ref = -np.log(p).reshape(3, -1).sum(1)
  got = losses.discrete_decoder_nll(jnp.asarray(x0_stored, jnp.float32), jnp.asarray(z0, jnp.float32), g0, levels)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  # A nearly noiseless z_0 decodes with certainty.
  assert float(jnp.max(losses.discrete_decoder_nll(jnp.asarray(x0, jnp.float32), jnp.asarray(x0 * 0.99999, jnp.float32),
                                                    -20.0, levels))) < 1e-4


def test_vdm_loss_refuses_where_it_is_not_defined():
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="VP schedule"):
    losses.vdm_loss(schedules.VE(), "eps", x, x, x, jnp.full((2,), 0.5), eps_0=x)
  with pytest.raises(ValueError, match="target 'flow'"):
    losses.vdm_loss(schedules.LinearLogSNR(), "flow", x, x, x, jnp.full((2,), 0.5), eps_0=x)
  with pytest.raises(ValueError, match="gamma_1 must exceed gamma_0"):
    schedules.LinearLogSNR(2.0, 1.0)


def _mlp_problem(learn_endpoints):
  """A small MLP denoiser with a learned schedule on 4-D data on 17 levels, and one batch."""
  from diffusax.nn import MLPDenoiser, bridge
  module = MLPDenoiser(hidden=16, depth=1)
  k = jax.random.split(jax.random.key(0), 6)
  params = dict(module.init(k[0], jnp.zeros((2, 4)), jnp.zeros((2,)))["params"])
  sched = {"net": _random_learned(3, scale=1.0).net}
  if learn_endpoints:
    sched.update(gamma_0=jnp.float32(G0), gamma_1=jnp.float32(G1))
  params[bridge.SCHEDULE_PARAMS] = sched
  b = 8
  x = jnp.round(jax.random.uniform(k[1], (b, 4), minval=-1, maxval=1) * 8) / 8
  t = losses.low_discrepancy_t(k[2], b, 0.0, 1.0)
  eps, eps_0 = jax.random.normal(k[3], x.shape), jax.random.normal(k[4], x.shape)
  return module, params, (x, t, eps, eps_0), schedules.Learned(sched["net"], G0, G1)


def test_vdm_gradients_are_those_of_the_elbo_and_with_variance_minimisation_of_the_squared_loss():
  """The train step's one-backward-pass gradients against autodiff of the loss written directly
  (learned ends: their gradient is the ELBO's in both modes, the net's that of E[L^2] with variance
  minimisation)."""
  from diffusax.nn import bridge
  from diffusax.training import step as step_lib
  module, params, (x, t, eps, eps_0), template = _mlp_problem(True)
  cfgs = [step_lib.LossConfig(target="v", t_min=0.0, objective="vdm", levels=17, variance_minimisation=v)
          for v in (False, True)]

  def direct(p):  # Per-example bits/dim with the schedule bound to p: autodiff through everything.
    sched = bridge.bind_schedule(template, p)
    x_t = jnp.sqrt(jax.nn.sigmoid(sched.log_snr(t)))[:, None] * x + jnp.sqrt(jax.nn.sigmoid(-sched.log_snr(t)))[:, None] * eps
    pred = module.apply({"params": p}, x_t, t, None)
    return losses.vdm_loss(sched, "v", pred, x, eps, t, eps_0=eps_0, levels=17).total / (4 * math.log(2))

  apply = lambda v, *a, train=False, rngs=None: module.apply(v, *a)
  ours = jax.jit(lambda p: [step_lib._vdm_value_and_grad(apply, template, c, p, x, t, eps, eps_0, None,
                                                         jax.random.key(1)) for c in cfgs])(params)
  (ref_value, ref_grads), sq_grads = jax.jit(lambda p: (jax.value_and_grad(lambda q: jnp.mean(direct(q)))(p),
                                                        jax.grad(lambda q: jnp.mean(direct(q) ** 2))(p)))(params)
  key = bridge.SCHEDULE_PARAMS
  for (value, grads), var_min in zip(ours, (False, True)):
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    want = dict(ref_grads)
    if var_min:
      want[key] = {**ref_grads[key], "net": sq_grads[key]["net"]}
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=2e-3, atol=1e-6 * float(jnp.max(jnp.abs(w)) + 1e-12), err_msg=str(path))
  # The two modes differ where they should: the check above can tell them apart.
  a, e = ours[1][1][key]["net"]["l2_w"], ref_grads[key]["net"]["l2_w"]
  assert float(jnp.max(jnp.abs(a - e))) > 0.1 * float(jnp.max(jnp.abs(e)))
  assert float(jnp.abs(ref_grads[key]["gamma_0"])) > 0 and float(jnp.abs(ref_grads[key]["gamma_1"])) > 0


def test_fourier_features_of_the_input():
  from diffusax.nn import UNet, unet
  x = np.asarray([[-1.0, -0.3], [0.125, 0.9]], np.float32).reshape(1, 2, 2, 1)
  f = np.asarray(unet.fourier_features(jnp.asarray(x), (3, 4)))
  want = [np.sin(2.0 ** 3 * 2 * np.pi * x[..., 0]), np.sin(2.0 ** 4 * 2 * np.pi * x[..., 0]),
          np.cos(2.0 ** 3 * 2 * np.pi * x[..., 0]), np.cos(2.0 ** 4 * 2 * np.pi * x[..., 0])]
  np.testing.assert_allclose(f, np.stack(want, -1), atol=2e-5)
  net = UNet(base_channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4,
             fourier_features=(3, 4))
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,))))
  kernel = shapes["params"]["encoder"]["conv_in"]["kernel"]
  kernel = getattr(kernel, "value", kernel)
  assert kernel.shape[-2] == 1 + 4  # the image channel and its four features


def test_vdm_trains_the_schedule_samples_and_evaluates_end_to_end(tmp_path):
  """A tiny digits DiT with the VDM objective and a learned schedule (learned ends, variance
  minimisation): the schedule's parameters train (in params["schedule"], and in the EMA), samples are
  written, --mode=eval's bpd_vlb is the continuous bound over 17 values (the PF-ODE on a learned schedule:
  tests/test_likelihood_ode.py), and vector data is refused."""
  import json
  import os

  from diffusax.nn import bridge
  from diffusax.programs import evaluate, settings as settings_lib, train
  from diffusax.programs.settings import ConfigError
  from test_train import _digits_dit, _restore_state, _toy
  over = {"data.workers": 0, "data.random_flip": False, "data.levels": 17, "diffusion.objective": "vdm",
          "diffusion.schedule": "learned", "diffusion.schedule_kwargs": {"gamma_0": -10.0, "gamma_1": 6.0, "hidden": 16},
          "diffusion.learn_endpoints": True, "diffusion.variance_minimisation": True, "diffusion.target": "eps",
          "diffusion.t_min": 0.0, "diffusion.time_sampler": "low_discrepancy", "train.num_steps": 8,
          "train.ckpt_every": 8, "train.log_every": 4, "optim.warmup_steps": 0, "optim.lr": 1e-2,
          "eval.metrics": ("bpd_vlb",), "eval.bpd_examples": 8, "eval.vlb_steps": 4,
          "train.full_eval": True, "train.eval_every": 0}
  data_dir, wd = str(tmp_path / "tfds"), str(tmp_path / "run")
  out = train.train_and_evaluate(settings_lib.parse(_digits_dit(data_dir, **over)), wd, evaluator=evaluate.Evaluator)
  assert out["step"] == 8 and np.isfinite(out["train_loss_last"]) and os.path.exists(out["samples"])
  state = _restore_state(wd, 8)
  sched = state["params"][bridge.SCHEDULE_PARAMS]
  assert float(sched["gamma_0"]) != -10.0 and float(sched["gamma_1"]) != 6.0  # the ends trained
  init = schedules.monotone_net_init(jax.random.key(0), 16)
  assert not np.allclose(sched["net"]["l2_w"], init["l2_w"])
  assert bridge.SCHEDULE_PARAMS in state["ema_params"][0]
  rec = json.load(open(os.path.join(wd, "eval", "eval_0000008.json")))
  assert rec["likelihood"]["bound"] == "vdm_continuous" and rec["likelihood"]["levels"] == 17
  assert all(np.isfinite(v) for v in rec["metrics"].values())
  with pytest.raises(ConfigError, match="diffusion.objective='vdm' models discrete data"):
    train.train_and_evaluate(settings_lib.parse(_toy(data_dir, **{k: v for k, v in over.items() if k.startswith("diffusion")}
                                                     )), str(tmp_path / "toy"))


def test_schedule_lr_factor_scales_only_the_schedules_updates():
  import optax

  from diffusax.nn import bridge
  from diffusax.training import state as state_lib
  from diffusax.training import step as step_lib
  module, params, (x, _, _, _), template = _mlp_problem(True)
  apply = lambda v, *a, train=False, rngs=None: module.apply(v, *a)
  deltas = []
  for f in (1.0, 3.0):
    cfg = step_lib.LossConfig(target="eps", t_min=0.0, objective="vdm", levels=17, time_sampler="low_discrepancy",
                              schedule_lr_factor=f)
    tx = optax.sgd(1e-2)
    st = state_lib.create(params, tx, 0, 1)
    new, _ = jax.jit(step_lib.make_train_step(apply, tx, lambda s: 1e-2, template, cfg, (0.9,)))(st, {"x": x})
    deltas.append(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new.params, params))
  key = bridge.SCHEDULE_PARAMS
  for a, b in zip(jax.tree.leaves(deltas[0][key]), jax.tree.leaves(deltas[1][key])):
    np.testing.assert_allclose(b, 3.0 * a, rtol=1e-4, atol=2e-6)  # deltas of float32 params: rounding
  net0 = {k: v for k, v in deltas[0].items() if k != key}
  net1 = {k: v for k, v in deltas[1].items() if k != key}
  for a, b in zip(jax.tree.leaves(net0), jax.tree.leaves(net1)):
    np.testing.assert_array_equal(a, b)
  assert float(np.abs(deltas[0][key]["gamma_0"])) > 0


def test_an_option_added_later_leaves_the_signature_of_older_checkpoints():
  """UNet.fourier_features came after checkpoints existed: at its default it is not in the signature
  (a checkpoint from before still matches), set it is."""
  import sys
  import os
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
  import digits
  from diffusax.programs import settings as settings_lib
  c = digits.get_config()
  assert "fourier_features" not in settings_lib.parse(c).model_settings()["kwargs"]
  c.model.unet.fourier_features = (3, 4)
  assert settings_lib.parse(c).model_settings()["kwargs"]["fourier_features"] == [3, 4]
  # Either way round: a signature that records the option at its neutral value matches one without it.
  from diffusax import checkpoint
  with_it = {"model": {"kwargs": {"a": 1, "fourier_features": []}}, "params": {}}
  without = {"model": {"kwargs": {"a": 1}}, "params": {}}
  assert checkpoint.signature_diff(with_it, without) == checkpoint.signature_diff(without, with_it) == []
  assert checkpoint.signature_diff({"model": {"kwargs": {"a": 1, "fourier_features": [3]}}, "params": {}}, without)
