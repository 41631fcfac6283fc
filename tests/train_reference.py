"""A float64 numpy reference of the diffusion train step, written from the formulas (no diffusax).

The only JAX use is re-drawing the step's random numbers from the keys the
train step documents (key_k = fold_in(key(seed), k), split into time, noise,
label-dropout and network-dropout keys); every operation after a draw is
numpy float64.

Forward process x_t = alpha x0 + sigma eps and its coefficients:
  vp_linear  log alpha = -t^2 (b1 - b0) / 4 - t b0 / 2, sigma^2 = 1 - alpha^2 (Song et al. 2021, eq. 33)
  flow       alpha = 1 - t, sigma = t (rectified flow)
  discrete   alpha^2 = prod_{j <= i} (1 - beta_j) at t = i / T (Ho et al. 2020, eq. 4)

Targets (what the network predicts): eps, x0, v = alpha eps - sigma x0
(Salimans & Ho 2022), score = -eps / sigma, flow = alpha' x0 + sigma' eps.

Weightings are x0-space weights w(t) on ||x0_hat - x0||^2 and become
target-space weights w(t) / c(t), where c(t) = ||target_hat - target||^2 /
||x0_hat - x0||^2 at fixed x_t (derived by writing x0 through x_t and the target):
  eps:   x0 = (x_t - sigma eps) / alpha               -> c = alpha^2 / sigma^2 = SNR
  v:     v = alpha x_t / sigma - (alpha^2 + sigma^2) x0 / sigma -> c = (alpha^2 + sigma^2)^2 / sigma^2
  score: score = -(x_t - alpha x0) / sigma^2          -> c = alpha^2 / sigma^4
  flow:  flow = alpha' x0 + sigma' (x_t - alpha x0) / sigma -> c = (alpha' - sigma' alpha / sigma)^2
x0-space weights:
  snr      SNR(t)                                     (= the plain eps loss)
  min_snr  min(SNR(t), gamma)                         (Hang et al. 2023; eps space: min(SNR, gamma) / SNR)
  elbo     -1/2 dSNR/dt = -1/2 SNR dlogSNR/dt         (Kingma et al. 2021, eq. 17)
  sigmoid  SNR(t) sigmoid(bias - logSNR(t))           (Kingma & Gao 2023: sigmoid(b - lambda) in eps space)
and "uniform" is weight 1 in the target's own space.

The network (`forward`/`backward`) is the one-hidden-layer denoiser of
tests/test_train_reference.py:
  feat = [sin(2 pi t W), cos(2 pi t W)]                                [B, F]  (W frozen)
  h    = tanh(x @ w_in + feat @ w_t + b_in + embed[y])                 [B, H]
  pred = h @ w_out + b_out                                             [B, D]

Optimizer (optax conventions, Kingma & Ba 2015 / Loshchilov & Hutter 2019):
  g  <- g min(1, c / ||g||)                     global-norm clip (applied when ||g|| >= c)
  m  <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2,  k = number of updates so far + 1
  p  <- p - lr(k - 1) (m / (1 - b1^k) / (sqrt(v / (1 - b2^k)) + eps) + wd [p decayed] p)
  lr(s) = lr s / warmup for s < warmup, then end + (lr - end) (1 + cos(pi (s - warmup) / (total - warmup))) / 2,
          end for s >= total
EMA (after the update at step k): e <- d_k e + (1 - d_k) p, d_k = min(d, (1 + k) / (10 + k)) with warmup.
"""
from __future__ import annotations

import numpy as np

F64 = np.float64


# ---------------------------------------------------------------------------
# Schedules: t [B] float64 -> dict of alpha, sigma, d_alpha, d_sigma, log_snr, d_log_snr [B].

def vp_linear(t, b0=0.1, b1=20.0):
  t = np.asarray(t, F64)
  la = -0.25 * t * t * (b1 - b0) - 0.5 * t * b0
  dla = -0.5 * t * (b1 - b0) - 0.5 * b0
  a = np.exp(la)
  s2 = -np.expm1(2.0 * la)
  s = np.sqrt(s2)
  da = a * dla
  ds = -a * da / s                     # from sigma^2 = 1 - alpha^2
  log_snr = 2.0 * la - np.log(s2)
  d_log_snr = 2.0 * dla / s2           # 2 dla + 2 alpha^2 dla / sigma^2
  return dict(alpha=a, sigma=s, d_alpha=da, d_sigma=ds, log_snr=log_snr, d_log_snr=d_log_snr)


def vp_linear_t_from_log_snr(log_snr, b0=0.1, b1=20.0):
  """Inverse of vp_linear's logSNR: alpha^2 = sigmoid(lambda), so -2 log alpha = softplus(-lambda) =: c,
  and (b1 - b0) t^2 / 2 + b0 t = c is solved for t >= 0."""
  c = np.logaddexp(0.0, -np.asarray(log_snr, F64))
  d = b1 - b0
  return (-b0 + np.sqrt(b0 * b0 + 2.0 * d * c)) / d


def flow(t):
  t = np.asarray(t, F64)
  one = np.ones_like(t)
  return dict(alpha=1.0 - t, sigma=t, d_alpha=-one, d_sigma=one, log_snr=2.0 * np.log((1.0 - t) / t),
              d_log_snr=-2.0 / (1.0 - t) - 2.0 / t)


def discrete_at_knots(t, betas):
  """A DDPM schedule at its knots t = i / T only (i = 1..T); derivatives are left undefined (nan)."""
  t = np.asarray(t, F64)
  betas = np.asarray(betas, F64)
  i = np.rint(t * betas.size).astype(int)
  assert np.allclose(i / betas.size, t, rtol=0, atol=1e-6) and i.min() >= 1, "t must lie on the knots"
  abar = np.cumprod(1.0 - betas)[i - 1]
  nan = np.full_like(t, np.nan)
  return dict(alpha=np.sqrt(abar), sigma=np.sqrt(1.0 - abar), d_alpha=nan, d_sigma=nan,
              log_snr=np.log(abar) - np.log1p(-abar), d_log_snr=nan)


# ---------------------------------------------------------------------------
# Targets and weightings.

def target_value(target, x0, eps, c):
  a, s, da, ds = (c[k][:, None] for k in ("alpha", "sigma", "d_alpha", "d_sigma"))
  return {"eps": lambda: eps, "x0": lambda: x0, "v": lambda: a * eps - s * x0,
          "score": lambda: -eps / s, "flow": lambda: da * x0 + ds * eps}[target]()


def x0_mse_factor(target, c):
  a, s, da, ds = c["alpha"], c["sigma"], c["d_alpha"], c["d_sigma"]
  return {"eps": lambda: a * a / (s * s), "x0": lambda: np.ones_like(a),
          "v": lambda: (a * a + s * s) ** 2 / (s * s), "score": lambda: a * a / s**4,
          "flow": lambda: (da - ds * a / s) ** 2}[target]()


def x0_weight(weighting, c, gamma=5.0, bias=-1.0):
  snr = np.exp(c["log_snr"])
  return {"snr": lambda: snr, "min_snr": lambda: np.minimum(snr, gamma),
          "elbo": lambda: -0.5 * c["d_log_snr"] * snr,
          "sigmoid": lambda: snr / (1.0 + np.exp(-(bias - c["log_snr"])))}[weighting]()


def target_weight(target, weighting, c, **params):
  if weighting == "uniform":
    return np.ones_like(c["alpha"])
  return x0_weight(weighting, c, **params) / x0_mse_factor(target, c)


# ---------------------------------------------------------------------------
# The one-hidden-layer network: params is a dict of float64 arrays (see module doc).

def fourier(t, w):
  arg = 2.0 * np.pi * np.asarray(t, F64)[:, None] * np.asarray(w, F64)[None]
  return np.concatenate([np.sin(arg), np.cos(arg)], axis=1)


def forward(p, x, t, y):
  feat = fourier(t, p["fourier"]["W"])
  h = np.tanh(x @ p["w_in"] + feat @ p["w_t"] + p["b_in"] + p["embed"][y])
  return h @ p["w_out"] + p["b_out"], (x, feat, h, y)


def backward(p, cache, d_pred):
  """Gradients of sum(d_pred * pred) with respect to every parameter (W is frozen: zero)."""
  x, feat, h, y = cache
  d_pre = (d_pred @ p["w_out"].T) * (1.0 - h * h)
  d_embed = np.zeros_like(p["embed"])
  np.add.at(d_embed, y, d_pre)
  return {"fourier": {"W": np.zeros_like(p["fourier"]["W"])}, "w_in": x.T @ d_pre, "w_t": feat.T @ d_pre,
          "b_in": d_pre.sum(0), "embed": d_embed, "w_out": h.T @ d_pred, "b_out": d_pred.sum(0)}


def loss_and_grads(p, x0, eps, t, y, schedule, target, weighting, **wparams):
  """Mean over the batch of w(t) mean_d (pred - target)^2, and its gradient; also the per-example loss."""
  c = schedule(t)
  x_t = c["alpha"][:, None] * x0 + c["sigma"][:, None] * eps
  pred, cache = forward(p, x_t, t, y)
  r = pred - target_value(target, x0, eps, c)
  w = target_weight(target, weighting, c, **wparams)
  per_example = w * np.mean(r * r, axis=1)
  b, d = r.shape
  grads = backward(p, cache, (2.0 / (b * d)) * w[:, None] * r)
  return per_example.mean(), grads, per_example


# ---------------------------------------------------------------------------
# Pytrees of nested dicts.

def tree_map(f, *trees):
  if isinstance(trees[0], dict):
    return {k: tree_map(f, *(tr[k] for tr in trees)) for k in trees[0]}
  return f(*trees)


def tree_leaves(tree):
  if isinstance(tree, dict):
    return [leaf for k in sorted(tree) for leaf in tree_leaves(tree[k])]
  return [tree]


def global_norm(tree):
  return float(np.sqrt(sum(np.sum(np.square(g)) for g in tree_leaves(tree))))


# ---------------------------------------------------------------------------
# Optimizer, learning rate and EMA.

def lr_at(step, lr, warmup, total, end_factor=0.0, decay="cosine"):
  step = float(step)
  if warmup and step < warmup:
    return lr * step / warmup
  if decay == "constant":
    return lr
  end = lr * end_factor
  frac = min(max(step - warmup, 0.0) / (total - warmup), 1.0)
  return end + (lr - end) * 0.5 * (1.0 + np.cos(np.pi * frac))


def clip(grads, max_norm):
  norm = global_norm(grads)
  if max_norm <= 0 or norm < max_norm:
    return grads
  return tree_map(lambda g: g * (max_norm / norm), grads)


def adamw_init(params):
  return {"m": tree_map(np.zeros_like, params), "v": tree_map(np.zeros_like, params), "k": 0}


def adamw_update(params, grads, state, lr, b1, b2, eps, wd, decayed):
  """One AdamW step at learning rate `lr`; `decayed` is a tree of bools like params (True: decay)."""
  k = state["k"] + 1
  m = tree_map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
  v = tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], grads)

  def step(p, m, v, dec):
    u = (m / (1 - b1**k)) / (np.sqrt(v / (1 - b2**k)) + eps)
    if dec:
      u = u + wd * p
    return p - lr * u

  return tree_map(step, params, m, v, decayed), {"m": m, "v": v, "k": k}


def ema_update(ema, params, decay, step, warmup=True):
  d = min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay
  return tree_map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
