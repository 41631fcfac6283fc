"""Samplers against the exact Gaussian-mixture reference (tests/gmm.py).

Distribution checks: 2000 samples of the 2-D, 3-component mixture; component
frequencies, mean and covariance must lie within 4.5 standard errors of the
truth (`gmm.moments_z`; ~9 statistics per sampler, so 4.5 sigma keeps the
family-wise false-alarm rate far below 1e-3 while a 10% covariance error is
~ 6-10 sigma). Convergence: 256 samples, RMS distance to a float64 RK4
solution of the PF-ODE from the same x_T.
"""
import functools
import math

import jax
import numpy as np
import pytest

import gmm
from diffusax.core import process, samplers, schedules

G = gmm.standard_mixture()
N = 2000
TOL = 4.5

CASES = [  # (method, schedule, target, steps, options)
    ("ddpm", "ddpm_linear", "eps", 1000, {}),
    ("ddpm", "vp_linear", "v", 1000, {"variance": "large"}),
    ("ddim", "ddpm_cosine", "x0", 100, {}),
    ("euler", "ve", "eps", 200, {}),
    ("heun", "vp_cosine", "v", 40, {}),
    ("heun", "vp_linear", "eps", 40, {"churn": 20.0}),
    ("dpm_solver_pp_2m", "vp_linear", "score", 40, {}),
    ("flow_euler", "flow", "flow", 200, {}),
    ("flow_heun", "flow", "x0", 40, {}),
    ("euler_maruyama", "vp_linear", "eps", 1000, {}),
    ("pc", "ve", "eps", 500, {}),
    ("heun", "learned", "v", 40, {}),  # a VDM schedule: the Karras grid inverts its gamma by bisection
]


@pytest.mark.parametrize("method,sched,target,steps,opts", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_samples_match_mixture(method, sched, target, steps, opts):
  schedule = {"ve": lambda: schedules.get(sched, sigma_max=20.0),
              "learned": lambda: schedules.get(sched, gamma_0=-12.0, gamma_1=8.0, hidden=32)}.get(
                  sched, lambda: schedules.get(sched))()
  x_T = process.prior_sample(jax.random.key(0), schedule, (N, 2))
  x = samplers.sample(G.model(schedule, target), x_T, method=method, num_steps=steps,
                      key=jax.random.key(1), options=opts)
  z = gmm.moments_z(x, G)
  assert max(z.values()) < TOL, z


@functools.lru_cache(maxsize=None)
def _reference(sched, flowm):
  schedule = schedules.get(sched)
  x_T = process.prior_sample(jax.random.key(2), schedule, (256, 2))
  t_max = samplers.grid.default_t_max(schedule, endpoint_ok=flowm)
  if isinstance(schedule, schedules.Flow):
    return x_T, G.flow_reference(x_T, t_max, 1e-6, steps=600)
  return x_T, G.ode_reference(x_T, float(schedule.edm_sigma(t_max)),
                              float(schedule.edm_sigma(samplers.grid.default_t_min(schedule))),
                              float(schedule.alpha(t_max)), steps=600)


def _errors(method, sched, target, steps, opts=None):
  schedule = schedules.get(sched)
  x_T, ref = _reference(sched, method.startswith("flow"))
  f = jax.jit(lambda n: samplers.sample(G.model(schedule, target), x_T, method=method, num_steps=n,
                                        max_steps=max(steps_list), key=jax.random.key(0), options=opts))
  return [float(np.sqrt(np.mean(np.sum((np.asarray(f(n), np.float64) - ref) ** 2, 1)))) for n in steps_list]


steps_list = (25, 50, 100)


@pytest.mark.parametrize("method,sched,target,order,opts", [
    ("ddim", "vp_linear", "eps", 1, {"spacing": "log_snr"}),
    ("heun", "vp_linear", "v", 2, {}),
    ("dpm_solver_pp_2m", "vp_linear", "eps", 2, {}),
    ("flow_euler", "flow", "flow", 1, {}),
    ("flow_heun", "flow", "flow", 2, {}),
])
def test_deterministic_samplers_converge_with_expected_order(method, sched, target, order, opts):
  """Halving the step size divides the error by about 2^order (observed order within 0.35)."""
  errs = _errors(method, sched, target, steps_list, opts)
  obs = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
  assert errs[-1] < 0.05, errs
  assert all(abs(o - order) < 0.35 for o in obs), (errs, obs)


def test_dpm_solver_beats_ddim_at_equal_nfe():
  """DPM-Solver++(2M) at 20 NFE is more accurate than DDIM at 50 NFE."""
  global steps_list
  saved, steps_list = steps_list, (20, 50)
  try:
    dpm = _errors("dpm_solver_pp_2m", "vp_linear", "eps", None)
    ddim = _errors("ddim", "vp_linear", "eps", None, {"spacing": "log_snr"})
  finally:
    steps_list = saved
  assert dpm[0] < ddim[1], (dpm, ddim)
