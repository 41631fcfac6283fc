"""What `--mode=sample` / `--mode=eval` read from a checkpoint: the whole TrainState (before) or the first EMA alone (now).

Runs on 8 fake CPU devices (set here before JAX starts), mesh (-1, 1).

  cifar10  configs/cifar10.py's state (35.7M-parameter DDPM U-Net, one EMA, Adam), abstract only:
           logical bytes of the arrays each restore reads (the whole TrainState vs state.ema_params[0]).
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

    .venv/bin/python benchmarks/restore.py [--repeats 5]

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


def cifar10_abstract() -> dict:
  s = harness.settings(harness.load_config("cifar10", {"mesh.shape": (-1, 1), "model.dtype": "float32"}))
  u = harness.setup_without_data(s, (32, 32, 3), None)
  full, ema = _nbytes(u.abstract_state), _nbytes(u.abstract_params)
  return {"full_bytes": full, "ema_bytes": ema, "ratio": ema / full,
          "parts": {"params": _nbytes(u.abstract_state.params), "ema_params": _nbytes(u.abstract_state.ema_params),
                    "opt_state": _nbytes(u.abstract_state.opt_state)}}


def digits_real(repeats: int, data_dir: str) -> dict:
  import jax

  from diffusax import checkpoint as ckpt_lib
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
    out = {"full_bytes": _nbytes(u.abstract_state), "ema_bytes": _nbytes(u.abstract_params)}
    for name, r in rows.items():
      out[name] = {"median_s": statistics.median(r["seconds"]), "min_s": min(r["seconds"]),
                   "file_bytes_read": statistics.median(r["file_bytes"]), "seconds": r["seconds"]}
    out["time_ratio_median"] = out["ema"]["median_s"] / out["full"]["median_s"]
    out["file_bytes_ratio"] = out["ema"]["file_bytes_read"] / out["full"]["file_bytes_read"]
    return out
  finally:
    shutil.rmtree(wd, ignore_errors=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--data_dir", default="~/tensorflow_datasets")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "restore.json"))
  args = ap.parse_args()
  harness.apply_runtime(harness.load_config("digits"))
  c10 = cifar10_abstract()
  dg = digits_real(args.repeats, args.data_dir)
  mb = lambda b: b / 2 ** 20  # noqa: E731
  print(f"\nrestore for sampling/eval, 8 fake devices, mesh (-1, 1); {harness.cpu_model()}")
  print(f"cifar10 (abstract): full TrainState {mb(c10['full_bytes']):.1f} MiB, first EMA {mb(c10['ema_bytes']):.1f} "
        f"MiB ({c10['ratio']:.2f} of it)")
  print(f"digits (real, median of {args.repeats}):")
  print(f"  {'':6s}{'array MiB':>11s}{'file MiB read':>15s}{'median s':>10s}{'min s':>8s}")
  for name, nbytes in (("full", dg["full_bytes"]), ("ema", dg["ema_bytes"])):
    r = dg[name]
    print(f"  {name:6s}{mb(nbytes):11.2f}{mb(r['file_bytes_read']):15.2f}{r['median_s']:10.3f}{r['min_s']:8.3f}")
  print(f"  ema/full: file bytes {dg['file_bytes_ratio']:.2f}, time {dg['time_ratio_median']:.2f}")
  with open(args.out, "w") as fh:
    json.dump({"date": time.strftime("%Y-%m-%d"), "cpu": harness.cpu_model(), "devices": NUM_DEVICES,
               "repeats": args.repeats, "cifar10_abstract": c10, "digits_real": dg}, fh, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
