"""What `--mode=sample` / `--mode=eval` read from a checkpoint: the whole TrainState (before) or the first EMA alone (now).

Runs on 8 fake CPU devices (set here before JAX starts), mesh (-1, 1).

  cifar10  configs/cifar10.py's state (35.7M-parameter DDPM U-Net, one EMA, Adam; model.dtype float32):
           abstract: logical bytes of the arrays each restore reads (the whole TrainState vs
             state.ema_params[0]);
           real (default; --no-cifar10-real skips it): the program's set-up without the dataset
             (`harness.setup_without_data`: cifar10's data need not be here) and its init, no train
             step (one is too slow on CPU); instead the EMA becomes params + 1e-3 N(0, 1) and the Adam
             moments mu = 1e-3 N(0, 1), nu = (1e-3 N(0, 1))^2 (fold_in-keyed per leaf, deterministic), so
             neither compresses to nothing; then saved, restored and measured as digits below
             (--cifar10_repeats rounds, default 3; the checkpoint, ~490 MB in /tmp, is deleted at the end).
           Costs ~16 GiB peak RSS (the state is replicated on the 8 devices) and ~3 min.
  digits   configs/digits.py's state, real: the program's init plus 3 train steps (so the Adam moments
           and the EMA are not constants that compress to nothing), saved by the program's
           checkpointer, then restored alternately both ways, each through a fresh checkpointer:
             full  `Checkpointer.restore(abstract TrainState)`, as training resumes today;
             ema   `programs.setup.restore_ema` (orbax partial restore of ema_params[0]).
           Reported: logical array bytes, bytes tensorstore read from files (its
           /tensorstore/kvstore/file/bytes_read counter: compressed chunks plus index files), and
           seconds per restore including checksum verification (median and min over --repeats).
           The files are in the page cache after the first read, so times are decode + verify +
           placement, not disk; and the machine is shared, so they are noisy.

    .venv/bin/python benchmarks/restore.py [--repeats 5] [--cifar10_repeats 3] [--no-cifar10-real]

Writes benchmarks/restore.json and prints a table.
"""
from __future__ import annotations

import os

NUM_DEVICES = 8
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import harness  # noqa: E402


def _nbytes(tree) -> int:
  import jax
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _file_bytes_read() -> int:
  import tensorstore as ts
  return sum(v["value"] for m in ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
             for v in m["values"])


def _measure(u, m, wd: str, repeats: int) -> dict:
  """Restores the checkpoint in `wd` alternately whole (training set-up `u`) and first-EMA-only
  (model set-up `m`, as sample/eval build it), each through a fresh checkpointer, after one untimed
  warm-up of each; `repeats` timed rounds."""
  import jax

  from diffusax import checkpoint as ckpt_lib
  from diffusax.programs import setup as setup_lib

  def full():
    ck = setup_lib.open_checkpointer(u, wd)
    out, _ = ck.restore(ckpt_lib.abstract_like(u.abstract_state, u.state_shardings), u.signature)
    ck.close()
    return out

  def ema():
    return setup_lib.restore_ema(m, wd)[0]

  rows = {"full": {"seconds": [], "file_bytes": []}, "ema": {"seconds": [], "file_bytes": []}}
  for f in (full, ema):  # Warm-up (page cache, first compiles of the checksum reductions).
    jax.block_until_ready(f())
  for _ in range(repeats):
    for name, f in (("full", full), ("ema", ema)):
      b0, t0 = _file_bytes_read(), time.perf_counter()
      jax.block_until_ready(f())
      rows[name]["seconds"].append(time.perf_counter() - t0)
      rows[name]["file_bytes"].append(_file_bytes_read() - b0)
  out = {"full_bytes": _nbytes(u.abstract_state), "ema_bytes": _nbytes(u.abstract_params), "repeats": repeats}
  for name, r in rows.items():
    out[name] = {"median_s": statistics.median(r["seconds"]), "min_s": min(r["seconds"]),
                 "file_bytes_read": statistics.median(r["file_bytes"]), "seconds": r["seconds"],
                 "file_bytes": r["file_bytes"]}
  out["time_ratio_median"] = out["ema"]["median_s"] / out["full"]["median_s"]
  out["file_bytes_ratio"] = out["ema"]["file_bytes_read"] / out["full"]["file_bytes_read"]
  return out


def _perturb(state, seed: int = 0x5E57):
  """The state with non-constant EMA and Adam moments, deterministically, on the same shardings.

  Leaf i of EMA e gets params + 1e-3 N(0, 1); Adam's mu 1e-3 N(0, 1) and nu (1e-3 N(0, 1))^2 (>= 0),
  each from fold_in(fold_in(key(seed), salt), i). Stands in for train steps (a cifar10 step on
  CPU is too slow): a fresh init's EMA equals the params and its moments are zeros, which zstd
  compresses to almost nothing, so a restore would read artificially few bytes. Each leaf's noise
  is drawn once on the default device, then placed on the leaf's sharding (a jitted perturbation
  with replicated outputs draws it on each of the 8 devices: minutes on this CPU).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  def noise(salt, i, x):
    k = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), salt), i)
    return np.asarray(jax.random.normal(k, x.shape, jnp.float32)) * np.float32(1e-3)

  def place(x, host):
    return jax.device_put(host.astype(x.dtype), x.sharding)

  p_leaves, p_def = jax.tree.flatten(state.params)
  emas = []
  for e, old in enumerate(state.ema_params):
    emas.append(jax.tree.unflatten(p_def, [place(q, np.asarray(p) + noise(1 + e, i, p))
                                           for i, (p, q) in enumerate(zip(p_leaves, jax.tree.leaves(old)))]))
  counter = iter(range(1 << 30))

  def moment(path, x):
    names = {k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)}
    if "mu" in names and jnp.issubdtype(x.dtype, jnp.floating):
      return place(x, noise(0x3E0, next(counter), x))
    if "nu" in names and jnp.issubdtype(x.dtype, jnp.floating):
      return place(x, np.square(noise(0x3E1, next(counter), x)))
    return x

  return state.replace(ema_params=tuple(emas), opt_state=jax.tree_util.tree_map_with_path(moment, state.opt_state))


def _peak_rss_gib() -> float:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def cifar10_real(repeats: int) -> dict:
  """configs/cifar10.py's TrainState from the program's set-up and init, perturbed (`_perturb`), saved
  by the program's checkpointer in a temporary folder under /tmp, restored both ways (`_measure`)."""
  import jax

  from diffusax.programs import setup as setup_lib
  from diffusax.programs import train

  s = harness.settings(harness.load_config("cifar10", {"mesh.shape": (-1, 1), "model.dtype": "float32",
                                                       "train.async_checkpoints": False}))
  u = harness.setup_without_data(s, (32, 32, 3), None)
  rss = {"before": _peak_rss_gib()}
  t0 = time.perf_counter()
  state = jax.block_until_ready(train.init_state(u))
  init_s = time.perf_counter() - t0
  rss["init"] = _peak_rss_gib()
  t0 = time.perf_counter()
  state = jax.block_until_ready(_perturb(state))
  perturb_s = time.perf_counter() - t0
  rss["perturb"] = _peak_rss_gib()
  n_mu = sum(1 for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
             if any(getattr(k, "name", None) == "mu" for k in p))
  assert n_mu == len(jax.tree.leaves(state.params)), "Adam's mu not found in the optimizer state"
  wd = tempfile.mkdtemp(prefix="diffusax_restore_cifar10_", dir="/tmp")
  try:
    ck = setup_lib.open_checkpointer(u, wd)
    t0 = time.perf_counter()
    ck.save(1, state, {"step": 1, "signature": u.signature})
    ck.close()
    save_s = time.perf_counter() - t0
    rss["save"] = _peak_rss_gib()
    del state
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(wd) for f in fs)
    m = setup_lib.model_setup(s, data=u.data)  # What sample/eval build: no optimizer, no training split.
    out = _measure(u, m, wd, repeats)
    rss["restores"] = _peak_rss_gib()
    out.update(checkpoint_bytes_on_disk=on_disk, init_s=init_s, perturb_s=perturb_s, save_s=save_s,
               peak_rss_gib_after=rss)
    return out
  finally:
    shutil.rmtree(wd, ignore_errors=True)


def cifar10_abstract() -> dict:
  s = harness.settings(harness.load_config("cifar10", {"mesh.shape": (-1, 1), "model.dtype": "float32"}))
  u = harness.setup_without_data(s, (32, 32, 3), None)
  full, ema = _nbytes(u.abstract_state), _nbytes(u.abstract_params)
  return {"full_bytes": full, "ema_bytes": ema, "ratio": ema / full,
          "parts": {"params": _nbytes(u.abstract_state.params), "ema_params": _nbytes(u.abstract_state.ema_params),
                    "opt_state": _nbytes(u.abstract_state.opt_state)}}


def digits_real(repeats: int, data_dir: str) -> dict:
  from diffusax.programs import setup as setup_lib
  from diffusax.programs import train

  s = harness.settings(harness.load_config("digits", {"mesh.shape": (-1, 1), "data.data_dir": data_dir,
                                                      "train.async_checkpoints": False}))
  u = train.setup(s)
  runner = train.make_runner(u)
  it = train.make_iterator(u)
  rs = runner.to_run(train.init_state(u))
  for _ in range(3):
    rs, _ = runner.step(rs, next(it))
  state = runner.from_run(rs)
  wd = tempfile.mkdtemp(prefix="diffusax_restore_")
  try:
    ck = setup_lib.open_checkpointer(u, wd)
    ck.save(3, state, {"step": 3, "signature": u.signature})
    ck.close()
    del state, rs
    m = setup_lib.model_setup(s)  # What sample/eval build: no optimizer, no training split.
    return _measure(u, m, wd, repeats)
  finally:
    shutil.rmtree(wd, ignore_errors=True)


def _print_real(title: str, r: dict) -> None:
  mb = lambda b: b / 2 ** 20  # noqa: E731
  print(f"{title} (real, median of {r['repeats']}):")
  print(f"  {'':6s}{'array MiB':>11s}{'file MiB read':>15s}{'median s':>10s}{'min s':>8s}")
  for name, nbytes in (("full", r["full_bytes"]), ("ema", r["ema_bytes"])):
    x = r[name]
    print(f"  {name:6s}{mb(nbytes):11.2f}{mb(x['file_bytes_read']):15.2f}{x['median_s']:10.3f}{x['min_s']:8.3f}")
  print(f"  ema/full: file bytes {r['file_bytes_ratio']:.2f}, time {r['time_ratio_median']:.2f}")


def main():
  t_start = time.perf_counter()
  ap = argparse.ArgumentParser()
  ap.add_argument("--repeats", type=int, default=5, help="timed rounds for digits")
  ap.add_argument("--cifar10_repeats", type=int, default=3, help="timed rounds for the real cifar10 state")
  ap.add_argument("--cifar10-real", dest="cifar10_real", action=argparse.BooleanOptionalAction, default=True,
                  help="measure a real save+restore of the cifar10 state (--no-cifar10-real: abstract bytes only)")
  ap.add_argument("--data_dir", default="~/tensorflow_datasets")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "restore.json"))
  args = ap.parse_args()
  load = [os.getloadavg()[0]]
  harness.apply_runtime(harness.load_config("digits"))
  c10 = cifar10_abstract()
  t0 = time.perf_counter()
  dg = digits_real(args.repeats, args.data_dir)
  dg["part_s"] = time.perf_counter() - t0
  load.append(os.getloadavg()[0])
  c10r = None
  if args.cifar10_real:
    t0 = time.perf_counter()
    c10r = cifar10_real(args.cifar10_repeats)
    c10r["part_s"] = time.perf_counter() - t0
    load.append(os.getloadavg()[0])
  mb = lambda b: b / 2 ** 20  # noqa: E731
  print(f"\nrestore for sampling/eval, 8 fake devices, mesh (-1, 1); {harness.cpu_model()}")
  print(f"cifar10 (abstract): full TrainState {mb(c10['full_bytes']):.1f} MiB, first EMA {mb(c10['ema_bytes']):.1f} "
        f"MiB ({c10['ratio']:.2f} of it)")
  if c10r is not None:
    _print_real("cifar10", c10r)
    print(f"  checkpoint on disk {mb(c10r['checkpoint_bytes_on_disk']):.1f} MiB; init {c10r['init_s']:.1f} s, "
          f"perturb {c10r['perturb_s']:.1f} s, save {c10r['save_s']:.1f} s, part {c10r['part_s']:.0f} s; peak RSS "
          f"(GiB) after " + ", ".join(f"{k} {v:.1f}" for k, v in c10r["peak_rss_gib_after"].items()))
  _print_real("digits", dg)
  total_s = time.perf_counter() - t_start
  print(f"total {total_s:.0f} s; 1-min load average at start/after each part {load}")
  result = {"date": time.strftime("%Y-%m-%d"), "cpu": harness.cpu_model(), "devices": NUM_DEVICES,
            "repeats": args.repeats, "cifar10_repeats": args.cifar10_repeats if c10r is not None else None,
            "total_s": total_s, "load_average_1min": load, "cifar10_abstract": c10}
  if c10r is not None:
    result["cifar10_real"] = c10r
  result["digits_real"] = dg
  with open(args.out, "w") as fh:
    json.dump(result, fh, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
