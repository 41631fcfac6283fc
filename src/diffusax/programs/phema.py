"""Post-hoc EMA (`--mode=phema`, `--mode=phema_sweep`): any EMA length, chosen after training.

    python -m diffusax.main --config=configs/digits.py --workdir=runs/digits --mode=phema \
        --config.ema.target_sigma_rel=0.1
    python -m diffusax.main --config=configs/digits.py --workdir=runs/digits --mode=phema_sweep

A run trained with ema.sigma_rels (power-function EMAs) and ema.snapshot_every
leaves snapshots of those EMAs in WORKDIR/ema_snapshots. `phema` reconstructs the
EMA of profile ema.target_sigma_rel ending at ema.target_step as the
least-squares combination of the snapshots up to that step
(training/power_ema.py: closed-form inner products of the profiles, EDM2 sec. 3.2)
and writes it as a checkpoint in WORKDIR/phema/sigma_rel<v>_step<S>, a workdir
that `--mode=sample` and `--mode=eval` read like any other (same config).
`phema_sweep` reconstructs each of ema.sweep, evaluates it (eval.metrics,
samples resumable under WORKDIR/phema/sweep/...), and writes
WORKDIR/phema/sweep.json and sweep.png (the FD curve, best value marked). Tracked
EMAs that the reconstruction does not use (ema.reconstruct_from) and that lie
in the sweep are evaluated as trained too, beside their reconstructions, with
the relative distance of the two parameter sets.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from diffusax import checkpoint as ckpt_lib
from diffusax import storage
from diffusax.evaluation import curves
from diffusax.parallel import mesh as mesh_lib
from diffusax.programs import setup as setup_lib
from diffusax.programs.logs import Logger
from diffusax.programs.settings import ConfigError, Settings
from diffusax.training import power_ema


def check_snapshots(workdir: str) -> None:
  """Refuses a workdir without EMA snapshots before any device work (a look at the folder only)."""
  d = storage.join(workdir, setup_lib.SNAPSHOT_DIR)
  if not any(n.isdigit() for n in storage.listdir(d)):
    raise ConfigError(f"no EMA snapshots in {d}: train with ema.sigma_rels (e.g. (0.05, 0.1)) and "
                      "ema.snapshot_every > 0 first")


def _snapshot_table(u: setup_lib.ModelSetup, snaps: ckpt_lib.Checkpointer, target_step: int):
  """(target step, [(step, sigma_rels of that snapshot)] up to it), checked against the settings."""
  steps = sorted(snaps.all_steps())
  if not steps:
    raise ConfigError(f"no EMA snapshots in {snaps.directory}: train with ema.sigma_rels (e.g. (0.05, 0.1)) and "
                      "ema.snapshot_every > 0 first")
  if target_step < 0:
    target_step = steps[-1]
  if target_step not in steps:
    raise ConfigError(f"ema.target_step={target_step} is not a snapshot step; {snaps.directory} has steps "
                      f"{steps[0]}..{steps[-1]} every {steps[1] - steps[0] if len(steps) > 1 else '-'}")
  table = []
  for st in steps:
    if st > target_step:
      break
    try:
      meta = snaps.read_meta(st)
    except Exception as e:  # noqa: BLE001 - a damaged meta file.
      raise ckpt_lib.CheckpointCorrupted(f"EMA snapshot {storage.join(snaps.directory, str(st))} is unreadable: "
                                         f"meta: {ckpt_lib._one_line(e)}") from None
    table.append((st, tuple(float(v) for v in meta.get("sigma_rels", ()))))
  return target_step, table


def coefficients(u: setup_lib.ModelSetup, table, target_step: int, target_sigma_rel: float, sources=()):
  """{(snapshot step, EMA index in it): x} for the target profile, from the snapshots' sigma_rels."""
  keys, steps, gammas = [], [], []
  for st, rels in table:
    for j, v in enumerate(rels):
      if not sources or v in sources:
        keys.append((st, j))
        steps.append(st)
        gammas.append(power_ema.gamma_from_sigma_rel(v))
  if not keys:
    raise ConfigError(f"no snapshot holds the EMAs of ema.reconstruct_from={list(sources)}")
  x = power_ema.solve(steps, gammas, target_step, power_ema.gamma_from_sigma_rel(target_sigma_rel))
  return dict(zip(keys, x.tolist())), (steps, gammas, x)


def _kahan_add(acc, comp, tree, c):
  """acc + c * tree with compensated summation (the coefficients alternate in sign and can be large)."""
  def one(a, k, t):
    y = c * t.astype(jnp.float32) - k
    s = a + y
    return s, (s - a) - y
  pairs = jax.tree.map(one, acc, comp, tree)
  is_pair = lambda v: isinstance(v, tuple) and len(v) == 2 and not isinstance(v[0], tuple)  # noqa: E731
  return (jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair), jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair))


_kahan_add_jit = jax.jit(_kahan_add)


def reconstruct(u: setup_lib.ModelSetup, snaps: ckpt_lib.Checkpointer, table, coefs: dict):
  """sum_{(step, j)} x * snapshot[step][j], reading (and verifying) one snapshot at a time."""
  abstract_one = ckpt_lib.abstract_like(u.abstract_params, u.param_shardings)
  acc = comp = None
  for st, rels in table:
    use = [(j, c) for (s_, j), c in coefs.items() if s_ == st]
    if not use:
      continue
    emas, _ = snaps.restore(tuple(abstract_one for _ in rels), u.signature, step=st)
    for j, c in use:
      if acc is None:
        acc = jax.tree.map(jnp.zeros_like, emas[j])
        comp = jax.tree.map(jnp.zeros_like, emas[j])
      acc, comp = _kahan_add_jit(acc, comp, emas[j], jnp.float32(c))
  return acc


def tracked(u: setup_lib.ModelSetup, snaps: ckpt_lib.Checkpointer, step: int, sigma_rel: float):
  """The EMA of `sigma_rel` as trained (from the snapshot at `step`), or None if that snapshot lacks it."""
  rels = tuple(float(v) for v in snaps.read_meta(step).get("sigma_rels", ()))
  if sigma_rel not in rels:
    return None
  abstract_one = ckpt_lib.abstract_like(u.abstract_params, u.param_shardings)
  emas, _ = snaps.restore(tuple(abstract_one for _ in rels), u.signature, step=step)
  return emas[rels.index(sigma_rel)]


def relative_distance(a, b) -> float:
  """||a - b|| / ||b|| over all parameters."""
  num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  den = sum(float(jnp.sum(y ** 2)) for y in jax.tree.leaves(b))
  return float(np.sqrt(num / max(den, 1e-30)))


def _sources_tag(sources) -> str:
  return "" if not sources else "_from" + "-".join(f"{v:g}" for v in sources)


def out_workdir(workdir: str, sigma_rel: float, step: int, sources=()) -> str:
  """WORKDIR/phema/sigma_rel<v>_step<S>[_from<a>-<b>]: one folder per distinct reconstruction."""
  return storage.join(workdir, "phema", f"sigma_rel{sigma_rel:g}_step{step}{_sources_tag(sources)}")


def write_params(u: setup_lib.ModelSetup, params, step: int, out: str, info: dict, logger: Logger) -> str:
  """Writes `params` as checkpoint `step` of the workdir `out` (an EmaOnlyState; sample/eval read it).

  The reconstruction is a pure function of the snapshots, so one already written with the same `info`
  is kept as it is (its samples and evaluations stay valid); a different one in its place is refused.
  """
  ckpt = ckpt_lib.Checkpointer(storage.join(out, "checkpoints"), keep=1, async_save=False,
                               replicated_sharding=mesh_lib.replicated(u.mesh), log=logger.info)
  try:
    if step in ckpt.all_steps():
      have = ckpt.read_meta(step).get("phema")
      if have == json.loads(json.dumps(info)):
        logger.info(f"{out} already holds this reconstruction; kept")
        return storage.join(out, "checkpoints", str(step))
      raise ConfigError(f"{out} holds a different reconstruction ({have}); the snapshots changed since it was "
                        "written: remove that folder to write it again")
    state = setup_lib.EmaOnlyState(step=jnp.asarray(step, jnp.int32), ema_params=(params,))
    ckpt.save(step, state, {"kind": setup_lib.PHEMA_KIND, "signature": u.signature, "step": step, "phema": info})
    ckpt.wait()
  finally:
    ckpt.close()
  return storage.join(out, "checkpoints", str(step))


def run(s: Settings, workdir: str, devices=None) -> dict:
  """--mode=phema: reconstruct ema.target_sigma_rel at ema.target_step and write it as a checkpoint."""
  check_snapshots(workdir)
  u = setup_lib.model_setup(s, devices)
  e = u.s.ema
  logger = Logger(workdir, enabled=jax.process_index() == 0)
  snaps = setup_lib.open_snapshots(u, workdir, logger)
  try:
    step, table = _snapshot_table(u, snaps, e.target_step)
    coefs, (st, gm, x) = coefficients(u, table, step, e.target_sigma_rel, e.reconstruct_from)
    params = reconstruct(u, snaps, table, coefs)
    info = {"target_sigma_rel": e.target_sigma_rel, "target_gamma": power_ema.gamma_from_sigma_rel(e.target_sigma_rel),
            "target_step": step, "snapshots": len(table), "terms": len(coefs),
            "coefficient_l1": float(np.abs(x).sum()), "fit_residual": fit_residual(st, gm, x, step, e.target_sigma_rel)}
    out = out_workdir(workdir, e.target_sigma_rel, step, e.reconstruct_from)
    path = write_params(u, params, step, out, info, logger)
    logger.info(f"post-hoc EMA sigma_rel {e.target_sigma_rel:g} at step {step} from {len(coefs)} snapshot EMAs "
                f"(sum |x| {info['coefficient_l1']:.3g}, relative L2 misfit of the profile "
                f"{info['fit_residual']:.2e}) -> {path}; sample or evaluate it with --workdir={out}")
    return {**info, "checkpoint": path, "workdir": out}
  finally:
    snaps.close()
    logger.close()


def fit_residual(steps, gammas, x, target_step: int, target_sigma_rel: float) -> float:
  """||sum x_i p_i - p_*|| / ||p_*|| of the fitted profile (0: the target is reproduced exactly)."""
  g_t = power_ema.gamma_from_sigma_rel(target_sigma_rel)
  st, gm = np.asarray(steps, np.float64), np.asarray(gammas, np.float64)
  a = power_ema.inner_products(st[:, None], gm[:, None], st[None, :], gm[None, :])
  b = power_ema.inner_products(st, gm, target_step, g_t)
  c = float(power_ema.inner_products(target_step, g_t, target_step, g_t))
  r2 = float(x @ a @ x - 2.0 * x @ b + c)
  return float(np.sqrt(max(r2, 0.0) / c))


def sweep(s: Settings, workdir: str, evaluator, devices=None) -> dict:
  """--mode=phema_sweep: the evaluation metrics of each ema.sweep sigma_rel, as JSON and a PNG curve.

  `evaluator`: `programs.evaluate.Evaluator` (handed in by main: programs do not import each other).
  """
  check_snapshots(workdir)
  u = setup_lib.model_setup(s, devices)
  e = u.s.ema
  ev = evaluator(u)
  logger = Logger(workdir, enabled=jax.process_index() == 0)
  snaps = setup_lib.open_snapshots(u, workdir, logger)
  rows = []
  try:
    step, table = _snapshot_table(u, snaps, e.target_step)
    for v in e.sweep:
      coefs, (st, gm, x) = coefficients(u, table, step, v, e.reconstruct_from)
      params = reconstruct(u, snaps, table, coefs)
      # One folder per reconstruction: its samples are resumable and never mixed with another's.
      res = ev.evaluate(params, step, out_workdir(storage.join(workdir, "phema", "sweep"), v, step,
                                                  e.reconstruct_from), logger)
      row = {"sigma_rel": v, "metrics": res["metrics"], "coefficient_l1": float(np.abs(x).sum()),
             "fit_residual": fit_residual(st, gm, x, step, v)}
      trained = tracked(u, snaps, step, v) if e.reconstruct_from and v not in e.reconstruct_from else None
      if trained is not None:
        row["trained"] = ev.evaluate(trained, step, storage.join(workdir, "phema", "sweep",
                                                                 f"trained_sigma_rel{v:g}_step{step}"), logger)["metrics"]
        row["param_relative_distance"] = relative_distance(params, trained)
      rows.append(row)
      logger.info(f"sigma_rel {v:g}: " + ", ".join(f"{k} {m:.4g}" for k, m in res["metrics"].items())
                  + (f"; trained: {row['trained']}, ||rec - trained|| / ||trained|| "
                     f"{row['param_relative_distance']:.2e}" if "trained" in row else ""))
  finally:
    snaps.close()
  key = next((k for k in rows[0]["metrics"] if k.startswith("fd") and "baseline" not in k), None) if rows else None
  result = {"step": step, "rows": rows, "metric": key,
            "reconstruct_from": list(e.reconstruct_from) or "all tracked"}
  if key is not None:
    vals = [r["metrics"][key] for r in rows]
    best = int(np.argmin(vals))
    result["best"] = {"sigma_rel": rows[best]["sigma_rel"], key: vals[best]}
    extra = [(r["sigma_rel"], r["trained"][key]) for r in rows if "trained" in r and key in r["trained"]]
    img = curves.line_plot([r["sigma_rel"] for r in rows], vals, best=best, points=extra,
                           title=f"post-hoc EMA at step {step}: {key} vs sigma_rel (x: trained EMAs)",
                           xlabel="sigma_rel", ylabel=key)
  if jax.process_index() == 0:
    base = storage.join(workdir, "phema")
    storage.commit(storage.join(base, "sweep.json"), json.dumps(result, indent=1).encode(), marker=False)
    if key is not None:
      from diffusax.sampling import generate
      generate.save_png(storage.join(base, "sweep.png"), img)
      result["plot"] = storage.join(base, "sweep.png")
    if key is not None:
      logger.info(f"best sigma_rel {result['best']['sigma_rel']:g} ({key} {result['best'][key]:.4g}); "
                  f"curve in {storage.join(base, 'sweep.png')}")
  logger.close()
  return result
