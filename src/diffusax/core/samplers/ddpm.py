"""Ancestral DDPM (Ho et al. 2020) and DDIM (Song et al. 2021): one Gaussian step.

From the model's (x0_hat, eps_hat) at x_t, step i draws x_s (s = t_{i+1} < t)

    x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2 v_post) eps_hat + sqrt(var) z,   z ~ N(0, I),

where v_post = sigma_s^2 (1 - SNR_t / SNR_s) is the posterior variance of
q(x_s | x_t, x0) (Kingma et al. 2021, eq. 4; = beta_tilde_t of Ho et al. 2020,
eq. 7, for adjacent DDPM steps). Written with r = 1 - SNR_t/SNR_s = -expm1(lambda_t - lambda_s):

  * DDPM, posterior mean alpha_s x0 + sigma_s sqrt(1 - r) eps (c = 1) and
      variance="small"  var = beta_tilde = sigma_s^2 r
      variance="large"  var = beta = sigma_{t|s}^2 = sigma_t^2 r      (Ho et al. 2020, sec. 3.2)
      learned           log var = f log(beta) + (1 - f) log(beta_tilde), f = (v + 1) / 2
                        (Nichol & Dhariwal 2021, eq. 15; `Model(..., learned_variance=True)`)
  * DDIM (Song et al. 2021, eq. 12 and 16): c = eta, var = eta^2 v_post. eta = 0 is the
    deterministic sampler, eta = 1 is DDPM with variance="small" (same draws, same key).

For non-adjacent grid points on a `Discrete` schedule these are the respaced
betas of Nichol & Dhariwal (2021, appendix B): beta_respaced = 1 - abar_t / abar_s.
The last step (s = clean, sigma_s = 0) returns x0_hat with no noise.
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusax.core.samplers import driver, grid
from diffusax.core.samplers.model import Bound

VARIANCES = ("small", "large")


def _sampler(m: Bound, t_at, kind: str, eta=None, variance: str = "small",
             deterministic: bool = False) -> driver.Sampler:
  schedule = m.schedule

  def plan(lv, i, n):
    """Every scalar of step i besides its levels (tabulated per step; see `driver`)."""
    last = lv.last
    r = jnp.where(last, 1.0, -jnp.expm1(lv.log_snr - jnp.where(last, 0.0, lv.log_snr_next)))
    s2 = lv.sigma_next ** 2
    c = dict(w=m.weights(lv.t))
    if kind == "ddim":
      c["c_eps"] = lv.sigma_next * jnp.sqrt(jnp.maximum(1.0 - eta * eta * r, 0.0))
      if not deterministic:
        c["std"] = jnp.sqrt(eta * eta * s2 * r)
        c["draw"] = (eta > 0) & ~last
      return c
    c["c_eps"] = lv.sigma_next * jnp.sqrt(jnp.maximum(1.0 - r, 0.0))
    small, large = s2 * r, lv.sigma ** 2 * r
    if m.learned_variance:
      c["log_large"], c["log_small"] = jnp.log(large), jnp.log(jnp.maximum(small, 1e-20))
    else:
      c["std"] = jnp.sqrt(jnp.where(last, 0.0, large) if variance == "large" else small)
    return c

  init = driver.tabulated_init(t_at, schedule, plan)

  def step(state, i, last=None):
    c = driver.row(state, i)
    lv = c["levels"]
    # mean = alpha_s x0_hat + c_eps eps_hat as one multiply-add of x and the network output (`Bound.combine`):
    # two per-step scalars in the step's fused kernel, not the four of converting first.
    out, var_interp = m.output(state.x, lv.t)
    mean = m.combine(state.x, out, c["w"], lv.alpha_next, c["c_eps"])
    if kind == "ddim":
      if deterministic:  # A Python eta of 0: no per-step cond around a draw that never happens.
        return state._replace(x=mean)
      return state._replace(x=driver.add_noise(mean, c["std"], c["draw"], state.key, i))
    if last is True:  # Peeled last step (`run`): the clean end, sigma_s = 0, so no draw at all.
      return state._replace(x=mean)
    z = driver.noise(driver.step_key(state.key, i), state.x.shape)
    if var_interp is not None:
      frac = (var_interp + 1.0) / 2.0
      var = jnp.where(lv.last, 0.0, jnp.exp(frac * c["log_large"] + (1.0 - frac) * c["log_small"]))
      return state._replace(x=mean + jnp.sqrt(var) * z)
    return state._replace(x=mean + c["std"] * z)

  # DDPM's last step draws nothing: `run` peels it off the loop (see `driver`), saving one normal draw.
  return driver.Sampler(init, step, stochastic=not deterministic, peel_last=kind == "ddpm")


def ddpm(m: Bound, *, variance: str = "small", spacing: str = "linspace", t_min=None, t_max=None):
  """Ancestral sampler. On a `Discrete` schedule with num_steps = T it visits every step.

  Args:
    variance: "small" (beta_tilde) or "large" (beta); ignored when the model has
      learned variance (the interpolation of eq. 15 is used instead).
    spacing, t_min, t_max: see `grid`. Fewer steps than T respace the schedule.
  """
  if variance not in VARIANCES:
    raise ValueError(f"unknown variance {variance!r}; allowed: {list(VARIANCES)}")
  return _sampler(m, grid.make(m.schedule, spacing, t_min, t_max), "ddpm", variance=variance)


def ddim(m: Bound, *, eta=0.0, spacing: str = "linspace", t_min=None, t_max=None):
  """DDIM with a traced eta (0 deterministic, 1 = ancestral with beta_tilde); a Python 0 builds no draw at all
  (and the sampler is then deterministic: `Sampler.stochastic` is False)."""
  deterministic = isinstance(eta, (int, float)) and eta == 0  # Built without the noise branch.
  eta = jnp.asarray(eta, jnp.float32)
  return _sampler(m, grid.make(m.schedule, spacing, t_min, t_max), "ddim", eta=eta,
                  deterministic=deterministic)
