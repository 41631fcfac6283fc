"""Power-function EMA and post-hoc reconstruction (EDM2): the math against brute force, and the programs."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusax.training import power_ema as pe
from diffusax.training import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------
# The profile: sigma_rel <-> gamma, weights over steps.

def test_sigma_rel_gamma_round_trip_and_the_papers_values():
  # EDM2 (Karras et al. 2024), sec. 3.1 / Table: sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94.
  assert pe.gamma_from_sigma_rel(0.05) == pytest.approx(16.97, abs=0.005)
  assert pe.gamma_from_sigma_rel(0.10) == pytest.approx(6.94, abs=0.005)
  for s in (0.005, 0.02, 0.05, 0.1, 0.2, 0.28):
    g = pe.gamma_from_sigma_rel(s)
    assert g >= 0 and float(pe.sigma_rel_from_gamma(g)) == pytest.approx(s, rel=1e-10)
  # The relative std of tau^gamma on [0, 1] by direct numerical moments.
  for g in (0.0, 2.5, 16.97):
    tau = (np.arange(200000) + 0.5) / 200000
    p = (g + 1) * tau ** g
    mean = np.mean(p * tau)
    std = np.sqrt(np.mean(p * tau ** 2) - mean ** 2)
    assert std == pytest.approx(float(pe.sigma_rel_from_gamma(g)), rel=1e-6)
  with pytest.raises(ValueError, match=r"sigma_rel must lie in \(0, 0.2887\]"):
    pe.gamma_from_sigma_rel(0.3)


def test_power_ema_weights_match_the_recursion_and_the_train_step_update():
  """w_t(k) in closed form == the recursion theta_hat <- beta theta_hat + (1 - beta) theta over steps (float64),
  and state.update_ema (float32, as the train step runs it) on scalar 'parameters' theta_k = k-th one-hot."""
  g = pe.gamma_from_sigma_rel(0.1)
  t_end = 300
  w = np.zeros(t_end)
  for t in range(1, t_end + 1):
    b = (1.0 - 1.0 / t) ** (g + 1.0)  # written out, not pe.beta
    w *= b
    w[t - 1] += 1.0 - b
  np.testing.assert_allclose(pe.discrete_weights(t_end, g), w, rtol=1e-12, atol=1e-15)
  assert w.sum() == pytest.approx(1.0, abs=1e-12)
  # The jitted update on params theta_k = random values: EMA == sum_k w(k) theta_k.
  theta = np.random.default_rng(0).normal(size=(t_end, 3)).astype(np.float32)
  upd = jax.jit(lambda e, p, step: state_lib.update_ema((e,), p, (), step, False, (g,))[0])
  e = jnp.zeros(3)
  for k in range(t_end):
    e = upd(e, theta[k], k)  # state.step = k before the update that produced theta_{k+1}
  np.testing.assert_allclose(np.asarray(e), w @ theta.astype(np.float64), rtol=0, atol=2e-5)


def test_inner_products_match_numerical_integration():
  s = np.linspace(0, 1000, 2_000_001)[1:]  # midpoint-ish fine grid on (0, 1000]
  ds = s[1] - s[0]

  def prof(t, g):
    return np.where(s <= t, (g + 1) * s ** g / t ** (g + 1), 0.0)

  for (ta, ga), (tb, gb) in [((1000, 16.97), (600, 6.94)), ((400, 6.94), (400, 6.94)), ((250, 1.5), (900, 30.0))]:
    brute = np.sum(prof(ta, ga) * prof(tb, gb)) * ds
    assert float(pe.inner_products(ta, ga, tb, gb)) == pytest.approx(brute, rel=2e-3)


def _snapshots(every=50, end=1000, rels=(0.05, 0.1)):
  steps, gammas = [], []
  for st in range(every, end + 1, every):
    for r in rels:
      steps.append(st)
      gammas.append(pe.gamma_from_sigma_rel(r))
  return steps, gammas


def test_reconstruction_is_exact_for_a_tracked_profile_and_matches_brute_force_least_squares():
  steps, gammas = _snapshots()
  # Target = the sigma_rel 0.1 snapshot at step 1000: x is that one-hot.
  x = pe.solve(steps, gammas, 1000, pe.gamma_from_sigma_rel(0.1))
  want = np.zeros(len(steps))
  want[steps.index(1000) + 1] = 1.0
  np.testing.assert_allclose(x, want, atol=1e-8)
  # Another target: brute-force least squares over the discrete weights of every step (the actual EMAs),
  # which is the same problem as the continuous profiles' L2 fit up to the bin discretisation.
  # 0.15 lies between/above the sources (a close fit); 0.03 is narrower than both (extrapolation, looser).
  for rel, end, fit in ((0.15, 1000, 0.01), (0.03, 800, 0.05)):
    g_t = pe.gamma_from_sigma_rel(rel)
    use = [i for i, st in enumerate(steps) if st <= end]
    st_, gm_ = [steps[i] for i in use], [gammas[i] for i in use]
    x = pe.solve(st_, gm_, end, g_t)
    basis = np.stack([pe.discrete_weights(t, g, end) for t, g in zip(st_, gm_)], 1)  # [steps, n]
    target = pe.discrete_weights(end, g_t)
    rec = basis @ x
    brute = basis @ np.linalg.lstsq(basis, target, rcond=None)[0]
    # Both fits are good and nearly the same: L1 distance of weight vectors (each sums to ~1).
    assert np.abs(rec - target).sum() < fit, np.abs(rec - target).sum()
    assert np.abs(rec - brute).sum() < 1e-3, np.abs(rec - brute).sum()
    np.testing.assert_allclose(pe.reconstruction_weights(x, st_, gm_, end), rec, atol=1e-12)
    assert rec.sum() == pytest.approx(1.0, abs=5e-3)


# ---------------------------------------------------------------------------
# Programs: snapshots in a training run, --mode=phema, the sweep's plumbing.

RELS = (0.05, 0.1, 0.15)


@pytest.fixture(scope="module")
def toy_run(digits_dit_run):
  """(config, workdir, result) of the shared 30-step digits DiT run (tests/conftest.py) that tracks the
  power EMAs of RELS with a snapshot and a checkpoint every 10 steps."""
  c = digits_dit_run["config"]
  assert tuple(c.ema.sigma_rels) == RELS and c.ema.snapshot_every == 10
  return c, digits_dit_run["workdir"], digits_dit_run["result"]


def _raw_snapshot(wd, step):
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer().restore(os.path.join(wd, "ema_snapshots", str(step), "state"))


def test_snapshots_are_written_with_their_size_and_the_last_one_is_the_trained_ema(toy_run):
  import orbax.checkpoint as ocp
  c, wd, out = toy_run
  snaps = out["ema_snapshots"]
  assert snaps["steps"] == [10, 20, 30]
  last = jax.tree.leaves(_raw_snapshot(wd, 30))
  assert snaps["bytes_per_snapshot"] == sum(np.asarray(x).nbytes for x in last)  # the 3 EMAs of one snapshot
  state = ocp.StandardCheckpointer().restore(os.path.join(wd, "checkpoints", "30", "state"))
  ema = state["ema_params"]
  assert len(ema) == 1 + len(RELS)  # the classic decay, then the power EMAs
  for a, b in zip(jax.tree.leaves(ema[1:]), last):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_phema_writes_the_least_squares_combination_that_sample_mode_reads(toy_run, tmp_path):
  from diffusax.programs import phema, setup as setup_lib
  from diffusax.programs import settings as settings_lib
  c, wd, _ = toy_run
  raw = {st: _raw_snapshot(wd, st) for st in (10, 20, 30)}
  # Target = a tracked profile at the last step: exactly that EMA.
  c1 = c.copy_and_resolve_references()
  c1.ema.target_sigma_rel = 0.1
  out = phema.run(settings_lib.parse(c1), wd)
  assert out["fit_residual"] < 1e-6
  u = setup_lib.model_setup(settings_lib.parse(c1))
  got, step = setup_lib.restore_ema(u, out["workdir"])
  assert step == 30
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(raw[30][1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
  # A target outside the sources, ending before the last snapshot: sum x_i theta_i over the snapshots up
  # to step 20 of sigma_rel 0.05 and 0.1 only, combined in float64 from the raw snapshot files (the
  # coefficients themselves are checked against brute force above; here: which snapshots, which EMAs).
  c2 = c.copy_and_resolve_references()
  c2.ema.target_sigma_rel, c2.ema.reconstruct_from, c2.ema.target_step = 0.15, (0.05, 0.1), 20
  out = phema.run(settings_lib.parse(c2), wd)
  keys = [(st, j) for st in (10, 20) for j in (0, 1)]
  x = pe.solve([st for st, _ in keys], [pe.gamma_from_sigma_rel(RELS[j]) for _, j in keys], 20,
               pe.gamma_from_sigma_rel(0.15))
  want = jax.tree.map(lambda *ls: sum(xi * np.asarray(l, np.float64) for xi, l in zip(x, ls)),
                      *[raw[st][j] for st, j in keys])
  got, step = setup_lib.restore_ema(u, out["workdir"])
  assert step == 20 and out["terms"] == 4
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-5)
  # It is a workdir restore_ema reads (what --mode=sample / eval do); training there is refused.
  assert out["workdir"].endswith("phema/sigma_rel0.15_step20_from0.05-0.1")
  again = phema.run(settings_lib.parse(c2), wd)  # the same reconstruction again: kept, not rewritten
  assert again["checkpoint"] == out["checkpoint"]
  from diffusax.programs import train
  with pytest.raises(settings_lib.ConfigError, match="holds post-hoc EMA parameters written by --mode=phema"):
    train.train_and_evaluate(settings_lib.parse(c2), out["workdir"])


def test_a_damaged_snapshot_is_refused_by_name(toy_run, tmp_path):
  import shutil
  from diffusax import checkpoint as ckpt_lib
  from diffusax.programs import phema
  from diffusax.programs import settings as settings_lib
  c, wd, _ = toy_run
  copy = str(tmp_path / "run")
  shutil.copytree(os.path.join(wd, "ema_snapshots"), os.path.join(copy, "ema_snapshots"))
  # Flip one byte in the middle of every array data file of snapshot 20 (orbax's d/ folders).
  state = os.path.join(copy, "ema_snapshots", "20", "state")
  files = [os.path.join(r, f) for r, _, fs in os.walk(state) for f in fs if os.path.basename(r) == "d"]
  assert files
  for path in files:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x04
    open(path, "wb").write(bytes(data))
  c1 = c.copy_and_resolve_references()
  c1.ema.target_sigma_rel = 0.12
  with pytest.raises(ckpt_lib.CheckpointCorrupted, match=r"ema_snapshots/20 is (corrupted|unreadable)"):
    phema.run(settings_lib.parse(c1), copy)


def test_sweep_writes_the_curve_with_the_best_value_and_the_trained_emas_beside(toy_run, tmp_path):
  """The sweep's plumbing with a stand-in evaluator whose 'FD' is the distance to a fixed parameter set."""
  import shutil
  from PIL import Image
  from diffusax.programs import phema
  from diffusax.programs import settings as settings_lib
  c, wd, _ = toy_run
  copy = str(tmp_path / "run")
  shutil.copytree(os.path.join(wd, "ema_snapshots"), os.path.join(copy, "ema_snapshots"))
  ref = _raw_snapshot(wd, 30)[1]  # sigma_rel 0.1 as trained, a source: its reconstruction is exact, so best

  class FakeEvaluator:
    def __init__(self, u):
      self.calls = 0

    def evaluate(self, params, step, workdir, logger):
      d = sum(float(np.sum((np.asarray(a) - np.asarray(b)) ** 2))
              for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)))
      return {"metrics": {"fd_fake": d, "fd_fake_real_baseline": 0.0}}

  c1 = c.copy_and_resolve_references()
  c1.ema.sweep, c1.ema.reconstruct_from = (0.06, 0.1, 0.15, 0.2), (0.05, 0.1)
  res = phema.sweep(settings_lib.parse(c1), copy, FakeEvaluator)
  assert res["metric"] == "fd_fake" and res["best"]["sigma_rel"] == 0.1 and res["best"]["fd_fake"] < 1e-9
  rows = {r["sigma_rel"]: r for r in res["rows"]}
  assert set(rows) == {0.06, 0.1, 0.15, 0.2}
  assert "trained" in rows[0.15] and "trained" not in rows[0.1] and "trained" not in rows[0.2]
  assert rows[0.15]["trained"]["fd_fake"] > 0.0
  # 30 steps and 3 snapshots make a rough reconstruction; its closeness is measured on digits (README).
  assert 0.0 < rows[0.15]["param_relative_distance"] < 0.2
  on_disk = json.load(open(os.path.join(copy, "phema", "sweep.json")))
  assert on_disk["best"] == res["best"]
  img = np.asarray(Image.open(os.path.join(copy, "phema", "sweep.png")))
  assert img.shape == (420, 640, 3) and len(np.unique(img.reshape(-1, 3), axis=0)) > 3


def test_autoguidance_by_an_earlier_checkpoint_in_sample_mode(toy_run, tmp_path):
  """--mode=sample with sample.guide_workdir: the shards are the core's autoguided sampler run by hand on the
  two restored EMAs (same initial noise), w = 0 gives the unguided samples, and a missing step is refused."""
  from diffusax.core import Model, guidance, samplers
  from diffusax.nn import bridge
  from diffusax.programs import sample, setup as setup_lib
  from diffusax.programs import settings as settings_lib
  from diffusax.sampling import generate, job as job_lib
  c, wd, _ = toy_run
  c1 = c.copy_and_resolve_references()
  c1.sample.num_samples, c1.sample.shard_size, c1.sample.guidance_scale = 16, 16, 1.5
  c1.sample.guide_workdir, c1.sample.guide_step = wd, 10
  c1.sample.output_dir = str(tmp_path / "auto")
  s = settings_lib.parse(c1)
  res = sample.run(s, wd)
  got = job_lib.load(res["out_dir"])["samples"]
  spec = json.load(open(os.path.join(res["out_dir"], "job.json")))
  assert spec["guide"] == f"{os.path.abspath(wd)}@10"
  u = setup_lib.model_setup(s)
  main, _ = setup_lib.restore_ema(u, wd, 30)
  weak, _ = setup_lib.restore_ema(u, wd, 10)
  m = Model(bridge.denoiser(u.module, {"params": main}), s.loss.target, u.schedule)
  g = Model(bridge.denoiser(u.module, {"params": weak}), s.loss.target, u.schedule)
  x_T = generate.initial_noise(jax.random.fold_in(jax.random.key(s.sample.seed), 0), np.arange(16),
                               u.sample_shape, u.schedule.prior_std)
  labels = jnp.arange(16, dtype=jnp.int32) % 10  # the job's balanced labels, i mod classes
  run = lambda model: generate.to_uint8(samplers.sample(  # noqa: E731
      model, x_T, key=jax.random.key(0), method=s.sample.method, num_steps=s.sample.num_steps, cond=labels))
  level = lambda a, b: np.abs(a.astype(int) - b.astype(int)).max()  # noqa: E731 - in uint8 levels
  assert level(got, run(guidance.autoguidance(m, g, scale=1.5))) <= 1  # float32 rounding at a level edge
  assert level(got, run(m)) > 8  # the guide changed the samples (w = 0 is the main model: test_guidance.py)
  c1.sample.guide_step = 7
  with pytest.raises(settings_lib.ConfigError, match=r"sample.guide_step=7 is not in .*checkpoints; it has \[10, 20, 30\]"):
    sample.run(settings_lib.parse(c1), wd)


# The grain resume test shares the digits DiT run (tests/conftest.py) with the program tests above: one module,
# so that pytest-xdist (--dist loadfile) runs them on one worker and the run is trained once.

def test_resume_with_grain_workers_flips_and_an_epoch_boundary_is_bit_identical(digits_dit_run, tmp_path):
  """30 steps uninterrupted (2 workers; tests/conftest.py `digits_dit_run`) against a resume from its
  step-10 checkpoint alone (the later ones deleted) to 30 with 1 worker: the epoch boundary (batch 22)
  and the flips of epoch 1 fall in the resumed span. The power-function EMAs and their snapshots resume
  too (the resumed run writes snapshots 20 and 30 again)."""
  import shutil

  import orbax.checkpoint as ocp
  import test_train
  from diffusax.programs import settings as settings_lib
  from diffusax.programs import train as train_lib
  ref, cut = digits_dit_run["workdir"], str(tmp_path / "cut")
  shutil.copytree(os.path.join(ref, "checkpoints"), os.path.join(cut, "checkpoints"))
  for step in ("20", "30"):
    shutil.rmtree(os.path.join(cut, "checkpoints", step))
  c = digits_dit_run["config"].copy_and_resolve_references()
  c.data.workers = 1
  out = train_lib.train_and_evaluate(settings_lib.parse(c), cut)
  assert out["ema_snapshots"]["steps"] == [20, 30]
  for st in (20, 30):
    a, b = (ocp.StandardCheckpointer().restore(os.path.join(wd, "ema_snapshots", str(st), "state")) for wd in (ref, cut))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert out["step"] == 30
  a, b = test_train._restore_state(ref, 30), test_train._restore_state(cut, 30)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  from diffusax import checkpoint
  ck = checkpoint.Checkpointer(os.path.join(cut, "checkpoints"))
  assert ck.read_meta(10)["data"]["batches"] == 10
  assert ck.read_meta(30)["data"]["batches"] == 30 and ck.read_meta(30)["data"]["epoch"] == 1
  ck.close()
