"""Per-device bytes of parameters, EMA and optimizer state under each (data, fsdp) mesh shape.

Runs on 8 fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8,
set here before JAX starts). For each config's U-Net (configs/digits.py: the
1.1M digits model, via `programs.train.setup`; configs/cifar10.py: the 35.7M
DDPM model, the same set-up without its dataset) and each mesh shape the
program's own state shardings are applied to the *abstract* state (nothing is
initialised): per-device bytes = sum over leaves of the shard shape's size
times the item size, maximised over devices. For the digits model the state is
also really initialised on each mesh and the largest device's
`addressable_shards` bytes are checked against that figure.

    .venv/bin/python benchmarks/memory.py

Reported per mesh: MB per device of params, EMA, optimizer state and their
sum, and the ratio per-device / unsharded (1.0 = replicated; 1/fsdp is the
ideal). Also XLA's temp (activation) bytes of the one-device train step with
the U-Net's `remat` off and on (`compiled.memory_analysis()`; --remat_cases).
Writes benchmarks/memory.json and prints a table.
"""
from __future__ import annotations

import os

NUM_DEVICES = 8
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import harness  # noqa: E402

MESHES = ((1, 8), (2, 4), (4, 2), (8, 1))
MODELS = {"digits": ((8, 8, 1), True), "cifar10": ((32, 32, 3), False)}  # name -> (sample shape, real data)


def _per_device(tree, shardings) -> dict:
  """{device id: bytes} of the shards each device holds, from shardings over an abstract tree."""
  import jax

  out = {}
  for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    nbytes = math.prod(sh.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    for d in sh.device_set:
      out[d.id] = out.get(d.id, 0) + nbytes
  return out


def _total(tree) -> int:
  import jax
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _real_max_bytes(state) -> int:
  import jax

  per = {}
  for leaf in jax.tree.leaves(state):
    for shard in leaf.addressable_shards:
      per[shard.device.id] = per.get(shard.device.id, 0) + shard.data.nbytes
  return max(per.values())


def measure(model: str, mesh_shape) -> dict:
  import jax

  from diffusax.programs import train

  shape, real_data = MODELS[model]
  config = harness.load_config(model, {"mesh.shape": mesh_shape, "model.dtype": "float32"})
  s = harness.settings(config)
  u = train.setup(s) if real_data else harness.setup_without_data(s, shape, None)
  st, sh = u.abstract_state, u.state_shardings
  parts = {"params": (st.params, sh.params), "ema": (st.ema_params, sh.ema_params),
           "opt": (st.opt_state, sh.opt_state)}
  row = {"mesh": list(mesh_shape), "params_count": sum(math.prod(x.shape) for x in jax.tree.leaves(st.params))}
  for k, (tree, shard) in parts.items():
    row[f"{k}_bytes_total"] = _total(tree)
    row[f"{k}_bytes_per_device"] = max(_per_device(tree, shard).values())
  row["state_bytes_total"] = _total(st)
  row["state_bytes_per_device"] = max(_per_device(st, sh).values())
  row["ratio"] = row["state_bytes_per_device"] / row["state_bytes_total"]
  if real_data:
    row["state_bytes_per_device_real"] = _real_max_bytes(train.init_state(u))
  return row


def remat_temp_bytes(case: str) -> dict:
  """XLA's temp (activation) bytes of the compiled one-device train step, model.unet.remat off / on."""
  import jax

  import train_step as ts
  from diffusax.training import step as step_lib

  cfg, over, shape, b_cpu, b_gpu = ts.CASES[case]
  gpu = jax.default_backend() != "cpu"  # On a GPU: bf16 compute at train_step.py's GPU batch.
  batch, dtype = (b_gpu, "bfloat16") if gpu else (b_cpu, "float32")
  out = {"batch": batch, "backend": jax.default_backend(), "model_dtype": dtype}
  for remat in (False, True):
    c = harness.load_config(cfg, {**over, "train.batch_size": batch, "mesh.shape": (1, 1), "model.dtype": dtype})
    c.model.unet.remat = remat
    s = harness.settings(c)
    num_classes = 10 if s.class_conditional else None
    u = harness.setup_without_data(s, shape, num_classes, devices=jax.devices()[:1])
    step = step_lib.make_train_step(u.module.apply, u.tx, u.lr_fn, u.schedule, u.s.loss, u.s.ema_decays,
                                    u.s.ema_warmup)
    batch_arrays = {"x": jax.ShapeDtypeStruct((batch,) + shape, "float32"),
                    "label": jax.ShapeDtypeStruct((batch,), "int32")}
    mem = jax.jit(step, donate_argnums=0).lower(u.abstract_state, batch_arrays).compile().memory_analysis()
    out["remat" if remat else "plain"] = int(mem.temp_size_in_bytes)
  out["ratio"] = out["remat"] / out["plain"]
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory.json"))
  ap.add_argument("--remat_cases", default="digits", help="train_step.py cases whose step's temp bytes are "
                  "compared with model.unet.remat off/on (compiles each twice; '' = skip)")
  args = ap.parse_args()
  rows = {m: [measure(m, ms) for ms in MESHES] for m in MODELS}
  remat = {c: remat_temp_bytes(c) for c in args.remat_cases.split(",") if c}
  mb = 1 / 2 ** 20
  print(f"per-device MB over {NUM_DEVICES} fake CPU devices (max over devices); ratio = per-device / unsharded")
  print(f"{'model':9s}{'mesh':>6s}{'params':>9s}{'ema':>9s}{'opt':>9s}{'state':>9s}{'ratio':>7s}{'real':>9s}")
  for m, rs in rows.items():
    for r in rs:
      real = f"{r['state_bytes_per_device_real'] * mb:9.2f}" if "state_bytes_per_device_real" in r else f"{'-':>9s}"
      print(f"{m:9s}{'x'.join(map(str, r['mesh'])):>6s}{r['params_bytes_per_device'] * mb:9.2f}"
            f"{r['ema_bytes_per_device'] * mb:9.2f}{r['opt_bytes_per_device'] * mb:9.2f}"
            f"{r['state_bytes_per_device'] * mb:9.2f}{r['ratio']:7.3f}{real}")
    print(f"{m}: {rs[0]['params_count'] / 1e6:.2f}M params, unsharded state {rs[0]['state_bytes_total'] * mb:.1f} MB")
  for m, rs in rows.items():
    for r in rs:
      if "state_bytes_per_device_real" in r and r["state_bytes_per_device_real"] != r["state_bytes_per_device"]:
        print(f"warning: {m} {r['mesh']}: real shards {r['state_bytes_per_device_real']} B != "
              f"sharding arithmetic {r['state_bytes_per_device']} B")
  for c, r in remat.items():
    print(f"{c} (batch {r['batch']}): train-step temp MB {r['plain'] * mb:.1f} -> {r['remat'] * mb:.1f} with "
          f"model.unet.remat=True (ratio {r['ratio']:.2f})")
  with open(args.out, "w") as fh:
    json.dump({"date": time.strftime("%Y-%m-%d"), "devices": NUM_DEVICES, "rows": rows, "remat_temp_bytes": remat},
              fh, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
