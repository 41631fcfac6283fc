"""DPM-Solver++(3M) and UniPC: multistep solvers of order 3 of the PF-ODE in data prediction.

Both write the exact solution from t_i to t_{i+1} (lambda = log(alpha / sigma), h = lambda_{i+1} - lambda_i)
    x_{i+1} = (sigma_{i+1}/sigma_i) x_i + sigma_{i+1} int e^lambda x0_hat(lambda) dlambda
and approximate x0_hat by the current and earlier outputs m_i, m_{i-1}, m_{i-2}. Every coefficient is a
function of the grid alone, so each step is x_{i+1} = c_x x_i + sum_k a_k m_{i-k}, the a_k tabulated per
step (`driver`): one network call per step, no recompile for a new step count.

DPM-Solver++(3M) (Lu et al. 2022b, the multistep third-order update; phi = expm1(-h),
r0 = h_{i-1}/h, r1 = h_{i-2}/h):
    D1_0 = (m_i - m_{i-1}) / r0,  D1_1 = (m_{i-1} - m_{i-2}) / r1
    D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1),  D2 = (D1_0 - D1_1) / (r0 + r1)
    x_{i+1} = c_x x_i - alpha_{i+1} phi m_i + alpha_{i+1} (phi/h + 1) D1 - alpha_{i+1} ((phi + h)/h^2 - 1/2) D2
Order 1 at the first step, 2 (DPM-Solver++(2M)) at the second; below 15 steps the second-to-last step is
of order <= 2 ("lower order final").

UniPC (Zhao et al. 2023, UniPC-p with B(h) = expm1(-h), "bh2"): the predictor UniP-p
    x_{i+1} = c_x x_i - alpha_{i+1} phi m_i - alpha_{i+1} B(h) sum_{k<p} rho_k (m_{i-k} - m_i)/r_k,
    r_k = (lambda_{i-k} - lambda_i)/h, rho solving sum_k rho_k r_k^(j-1) = b_j (j < p; p = 2: rho = 1/2),
    b_j = j! phi_{j+1}(h) h / B(h) (the phi-function recursion of the paper, eq. 8-10);
and the corrector UniC, once m_{i+1} = x0_hat(x_{i+1}) is known: x_{i+1} recomputed from x_i with the same
sum over the earlier outputs plus rho_p (m_{i+1} - m_i), rho solving the full p x p system (p = 1:
rho = 1/2). The corrected x_{i+1} goes on; m_{i+1} (evaluated before the correction) is kept, so the
corrector costs no network call. Order p = min(order, i + 1, n - i) (warm-up, lower order final).

Both return m_{n-1} = x0_hat at the last step, as DPM-Solver++(2M) does.
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusax.core.samplers import driver, grid
from diffusax.core.samplers.model import Bound


def _earlier(m: Bound, t_at, i, n, back: int) -> list:
  """The grid.Levels of points i - 1, ..., i - back (clamped at 0)."""
  return [grid.levels(m.schedule, t_at, jnp.maximum(i - k, 0), n) for k in range(1, back + 1)]


def dpm_solver_pp_3m(m: Bound, *, spacing: str = "log_snr", t_min=None, t_max=None):
  t_at = grid.make(m.schedule, spacing, t_min, t_max)

  def plan(lv, i, n):
    lam, lam_next = 0.5 * lv.log_snr, 0.5 * jnp.where(lv.last, lv.log_snr, lv.log_snr_next)
    lam1, lam2 = (0.5 * e.log_snr for e in _earlier(m, t_at, i, n, 2))
    h = jnp.where(lv.last, 1.0, lam_next - lam)
    r0, r1 = (lam - lam1) / h, (lam1 - lam2) / h
    p = jnp.minimum(3, i + 1)
    p = jnp.where(n < 15, jnp.minimum(p, n - i), p)
    a = lv.alpha_next
    phi = jnp.expm1(-h)
    first = (-a * phi, 0.0 * h, 0.0 * h)
    r0s = jnp.where(p >= 2, r0, 1.0)
    second = (-a * phi * (1.0 + 0.5 / r0s), a * phi * 0.5 / r0s, 0.0 * h)
    r1s = jnp.where(p >= 3, r1, 1.0)
    b1 = a * (phi + h) / h                                  # alpha (phi/h + 1)
    b2 = -a * ((phi + h - 0.5 * h * h) / (h * h))          # -alpha ((phi + h)/h^2 - 1/2)
    s = r0s + r1s
    e0 = b1 * (1.0 + r0s / s) + b2 / s
    e1 = -b1 * r0s / s - b2 / s
    third = (-a * phi + e0 / r0s, -e0 / r0s + e1 / r1s, -e1 / r1s)
    coef = [jnp.where(p >= 3, c3, jnp.where(p == 2, c2, c1)) for c1, c2, c3 in zip(first, second, third)]
    return dict(w=m.weights(lv.t), c_x=lv.sigma_next / lv.sigma, a0=coef[0], a1=coef[1], a2=coef[2])

  init = driver.tabulated_init(t_at, m.schedule, plan, aux=lambda x: (jnp.zeros_like(x), jnp.zeros_like(x)))

  def step(state, i, last=None):
    c = driver.row(state, i)
    x0 = m.predict(state.x, c["levels"].t, c["w"]).x0
    m1, m2 = state.aux
    x = jnp.where(c["levels"].last, x0, c["c_x"] * state.x + c["a0"] * x0 + c["a1"] * m1 + c["a2"] * m2)
    return state._replace(x=x, aux=(x0, m1))

  return driver.Sampler(init, step, stochastic=False)


def _b(hh, count: int) -> list:
  """b_1..b_count of UniPC (B(h) = expm1(hh), hh = -h): the phi-function recursion."""
  phi1 = jnp.expm1(hh)
  g, fact, out = phi1 / hh - 1.0, 1.0, []
  for j in range(1, count + 1):
    out.append(g * fact / phi1)
    fact *= j + 1
    g = g / hh - 1.0 / fact
  return out


def _solve(rows: list, rhs: list) -> list:
  """The solution of a 1x1, 2x2 or 3x3 system (rows of scalars), by Cramer's rule (vmapped scalars)."""
  if len(rows) == 1:
    return [rhs[0] / rows[0][0]]
  if len(rows) == 2:
    (a, b), (c, d) = rows
    det = a * d - b * c
    return [(rhs[0] * d - b * rhs[1]) / det, (a * rhs[1] - rhs[0] * c) / det]
  mat = jnp.stack([jnp.stack(r) for r in rows])
  return list(jnp.linalg.solve(mat, jnp.stack(rhs)))


def _coefficients(h, rks: list, alpha, p_pred: int, corrector: bool):
  """(coefficient of m_0, [coefficients of the earlier m_k], coefficient of the new output) of one UniPC
  update of order p from a step of size h > 0, the earlier points at r_k = rks[k]: the predictor (the sum
  over k < p) or the corrector (that sum plus the new output)."""
  hh = -h
  phi1 = jnp.expm1(hh)
  k = p_pred - 1
  if corrector:
    nodes = rks[:k] + [jnp.ones_like(h)]
    b = _b(hh, p_pred)
    rho = [0.5 * jnp.ones_like(h)] if p_pred == 1 else _solve([[r ** j for r in nodes] for j in range(p_pred)], b)
  else:
    nodes = rks[:k]
    if k == 0:
      rho = []
    elif k == 1:
      rho = [0.5 * jnp.ones_like(h)]
    else:
      b = _b(hh, k)
      rho = _solve([[r ** j for r in nodes] for j in range(k)], b)
  scale = -alpha * phi1  # B(h) = phi1 (bh2)
  earlier = [scale * rho[j] / rks[j] for j in range(k)]
  new = scale * rho[k] if corrector else 0.0 * h
  c0 = -alpha * phi1 - sum(earlier) - new
  return c0, earlier, new


def unipc(m: Bound, *, order: int = 2, corrector: bool = True, spacing: str = "log_snr", t_min=None, t_max=None):
  if order not in (1, 2, 3):
    raise ValueError(f"unipc order must be 1, 2 or 3, got {order!r}")
  t_at = grid.make(m.schedule, spacing, t_min, t_max)

  def orders(i, n):
    return jnp.minimum(jnp.minimum(jnp.int32(order), i + 1), n - i)

  def select(p, per_order: list):
    """per_order[q - 1] is a list of arrays for order q; the entries of order p (traced)."""
    out = per_order[0]
    for q in range(2, len(per_order) + 1):
      out = [jnp.where(p == q, b, a) for a, b in zip(out, per_order[q - 1])]
    return out

  def pad(c0, earlier, new):
    return [c0, *earlier, *([0.0 * c0] * (order - 1 - len(earlier))), new]

  def plan(lv, i, n):
    lam, lam_next = 0.5 * lv.log_snr, 0.5 * jnp.where(lv.last, lv.log_snr, lv.log_snr_next)
    prev = _earlier(m, t_at, i, n, order)
    back = [0.5 * e.log_snr for e in prev]  # lambda_{i-1}, ..., lambda_{i-order}
    # Predictor from i to i + 1 (order p_i): earlier points i - 1, i - 2.
    h = jnp.where(lv.last, 1.0, lam_next - lam)
    rks = [(lb - lam) / h for lb in back[:order - 1]]
    p = orders(i, n)
    pred = select(p, [pad(*_coefficients(h, [jnp.where(p > j, r, -1.0) for j, r in enumerate(rks, 1)],
                                         lv.alpha_next, q, False)) for q in range(1, order + 1)])
    out = dict(w=m.weights(lv.t), c_x=lv.sigma_next / lv.sigma, p0=pred[0], p_earlier=jnp.stack(pred[1:-1])
               if order > 1 else jnp.zeros((0,)))
    # Corrector of x_i (from x_{i-1}, order p_{i-1}), with m_i: earlier points i - 2, ..., from i - 1.
    use = i > 0
    hc = jnp.where(use, lam - back[0], 1.0)
    rkc = [(lb - back[0]) / hc for lb in back[1:order]]
    q = jnp.where(use, orders(i - 1, n), 1)
    corr = select(q, [pad(*_coefficients(hc, [jnp.where(q > j, r, -1.0) for j, r in enumerate(rkc, 1)],
                                         lv.alpha, qq, True)) for qq in range(1, order + 1)])
    out.update(use_c=use, cc_x=lv.sigma / prev[0].sigma, c0=corr[0], c_new=corr[-1],
               c_earlier=jnp.stack(corr[1:-1]) if order > 1 else jnp.zeros((0,)))
    return out

  def init(x_T, key, n, max_steps):
    x = jnp.asarray(x_T, jnp.float32)
    aux = (jnp.zeros_like(x), tuple(jnp.zeros_like(x) for _ in range(order)))  # x_{i-1}, (m_{i-1}, ...)
    return driver.init_state(x, key, n, max_steps, t_at, m.schedule, plan, aux)

  def step(state, i, last=None):
    c = driver.row(state, i)
    x_prev, hist = state.aux
    x0 = m.predict(state.x, c["levels"].t, c["w"]).x0
    x = state.x
    if corrector:
      fixed = c["cc_x"] * x_prev + c["c0"] * hist[0] + c["c_new"] * x0
      for k in range(1, order):
        fixed = fixed + c["c_earlier"][k - 1] * hist[k]
      x = jnp.where(c["use_c"], fixed, x)
    nxt = c["c_x"] * x + c["p0"] * x0
    for k in range(1, order):
      nxt = nxt + c["p_earlier"][k - 1] * hist[k - 1]
    nxt = jnp.where(c["levels"].last, x0, nxt)
    return state._replace(x=nxt, aux=(x, (x0, *hist[:-1])))

  return driver.Sampler(init, step, stochastic=False)
