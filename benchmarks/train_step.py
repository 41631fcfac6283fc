"""Images/s and FLOP/s of diffusax's U-Net train step vs a plain Linen U-Net and the matmul peak.

The diffusax step is the training program's own: `programs.train.setup` (digits)
or the same set-up without a dataset (32x32 configs built from configs/cifar10.py,
whose data is not on this machine), then `train.init_state` and
`train.make_runner(...).step` (jit with state shardings and donation, host batch
-> global arrays). FLOPs per step come from XLA's cost analysis of that compiled
step. In the same process:

  * peak: the best FLOP/s of a large `jnp.dot` (CPU: 2048^2 float32; GPU:
    8192^2 bfloat16), called between the step calls of each case;
  * plain: a plainly written Linen U-Net of the same shape (GroupNorm + SiLU +
    conv res blocks, einsum attention, `optax.adam`, a plain `jax.jit` step
    without donation, EMA or clipping), same batch and dtype.

Reported: images/s (fastest call), step FLOP/s / peak ("util"; on GPU with
model.dtype=bfloat16 this is bf16 MFU), diffusax time / plain time (fastest
calls, and medians).

On CPU each setting of `runtime.xla_cpu_eigen_convs` (an XLA flag fixed when the
process starts) lives in its own worker process; all workers compile every case
first, then the parent interleaves them: in each round every worker runs one
diffusax step, one plain step and one peak matmul, the worker order
alternating between rounds. So every figure, across settings too, comes from
calls made side by side (the machine is shared and noisy). Note that the
"on" flag also sends dots to Eigen, so each setting's matmul peak differs; the
step-time ratio between settings is the comparison that matters.
--settings=on,off,convs adds an exploratory worker that sends only
convolutions to Eigen. On a GPU one worker runs (the flag is XLA:CPU's).

    .venv/bin/python benchmarks/train_step.py [--cases digits,c32] [--settings on,off] [--repeats 6]

Workers use a persistent compilation cache (--cache_dir, default under /tmp): the first run on a
machine compiles everything (about 9 minutes on 2 busy cores), later runs load it.

Writes benchmarks/train_step.json (unless --cases picks a subset) and prints a table.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time

import harness

# case -> (config file, overrides, sample shape, batch on CPU, batch on GPU)
CASES = {
    "digits": ("digits", {}, (8, 8, 1), 64, 256),
    "digits256": ("digits", {}, (8, 8, 1), 256, 1024),  # Same net, 4x the work per step (CPU: not default).
    "c32": ("cifar10", {"model.unet.base_channels": 32}, (32, 32, 3), 16, 128),
    "c64": ("cifar10", {"model.unet.base_channels": 64}, (32, 32, 3), 16, 128),
    "cifar10": ("cifar10", {}, (32, 32, 3), 8, 128),  # The 35.7M DDPM model (GPU default only).
}
DEFAULT_CASES = {"cpu": ("digits", "c32", "c64"), "gpu": ("digits", "c32", "c64", "cifar10")}


# ----------------------------------------------------------------------------- plain baseline
def plain_unet_module():
  """A plainly written DDPM/ADM-shaped U-Net in Flax Linen (the baseline)."""
  import flax.linen as nn
  import jax.numpy as jnp

  class ResBlock(nn.Module):
    ch: int
    groups: int
    scale_shift: bool
    dropout: float
    dtype: object

    @nn.compact
    def __call__(self, x, emb, train):
      h = nn.silu(nn.GroupNorm(self.groups)(x))
      h = nn.Conv(self.ch, (3, 3), padding=1, dtype=self.dtype)(h)
      e = nn.Dense(2 * self.ch if self.scale_shift else self.ch, dtype=self.dtype)(nn.silu(emb))[:, None, None]
      if self.scale_shift:
        scale, shift = jnp.split(e, 2, axis=-1)
        h = nn.silu(nn.GroupNorm(self.groups)(h) * (1 + scale) + shift)
      else:
        h = nn.silu(nn.GroupNorm(self.groups)(h + e))
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
      h = nn.Conv(self.ch, (3, 3), padding=1, dtype=self.dtype)(h)
      if x.shape[-1] != self.ch:
        x = nn.Conv(self.ch, (1, 1), dtype=self.dtype)(x)
      return x + h

  class Attention(nn.Module):
    heads: int
    groups: int
    dtype: object

    @nn.compact
    def __call__(self, x):
      b, hh, ww, c = x.shape
      d = c // self.heads
      h = nn.GroupNorm(self.groups)(x).reshape(b, hh * ww, c)
      q, k, v = jnp.split(nn.Dense(3 * c, dtype=self.dtype)(h).reshape(b, hh * ww, 3 * self.heads, d), 3, axis=2)
      w = nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d), axis=-1)
      o = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, hh * ww, c)
      return x + nn.Dense(c, dtype=self.dtype)(o).reshape(b, hh, ww, c)

  class PlainUNet(nn.Module):
    ch: int
    mult: tuple
    num_res: int
    attn_res: tuple
    heads: int
    groups: int
    dropout: float
    scale_shift: bool
    num_classes: int | None
    dtype: object

    @nn.compact
    def __call__(self, x, t, y, train):
      half = self.ch // 2
      f = jnp.exp(-jnp.log(10000.0) * jnp.arange(half) / half)
      a = (1000.0 * t)[:, None] * f[None]
      emb = jnp.concatenate([jnp.cos(a), jnp.sin(a)], -1)
      emb = nn.Dense(4 * self.ch)(nn.silu(nn.Dense(4 * self.ch)(emb)))
      if self.num_classes:
        emb = emb + nn.Embed(self.num_classes + 1, 4 * self.ch)(y)
      blk = lambda c: ResBlock(c, self.groups, self.scale_shift, self.dropout, self.dtype)
      att = lambda: Attention(self.heads, self.groups, self.dtype)
      h = nn.Conv(self.ch, (3, 3), padding=1, dtype=self.dtype)(x)
      skips = [h]
      for lvl, m in enumerate(self.mult):
        for _ in range(self.num_res):
          h = blk(self.ch * m)(h, emb, train)
          if h.shape[1] in self.attn_res:
            h = att()(h)
          skips.append(h)
        if lvl != len(self.mult) - 1:
          h = nn.Conv(h.shape[-1], (3, 3), strides=2, padding=1, dtype=self.dtype)(h)
          skips.append(h)
      h = att()(blk(h.shape[-1])(h, emb, train))
      h = blk(h.shape[-1])(h, emb, train)
      for lvl in reversed(range(len(self.mult))):
        for _ in range(self.num_res + 1):
          h = blk(self.ch * self.mult[lvl])(jnp.concatenate([h, skips.pop()], -1), emb, train)
          if h.shape[1] in self.attn_res:
            h = att()(h)
        if lvl:
          h = jnp.repeat(jnp.repeat(h, 2, 1), 2, 2)
          h = nn.Conv(h.shape[-1], (3, 3), padding=1, dtype=self.dtype)(h)
      h = nn.silu(nn.GroupNorm(self.groups)(h))
      return nn.Conv(x.shape[-1], (3, 3), padding=1, dtype=self.dtype)(h).astype(jnp.float32)

  return PlainUNet


def plain_step(s, num_classes, shape, batch):
  """(step(params, opt_state, x, y, key) jitted, params, opt_state) for the plain baseline."""
  import jax
  import jax.numpy as jnp
  import optax

  k = s.model_kwargs
  model = plain_unet_module()(
      ch=k["base_channels"], mult=tuple(k["channel_mult"]), num_res=k["num_res_blocks"],
      attn_res=tuple(k["attn_resolutions"]), heads=k.get("num_heads", 1), groups=k.get("num_groups", 32),
      dropout=k.get("dropout", 0.0), scale_shift=k.get("scale_shift_norm", True),
      num_classes=num_classes if s.class_conditional else None,
      dtype=jnp.bfloat16 if s.model_dtype == "bfloat16" else jnp.float32)
  x0 = jnp.zeros((2,) + shape)
  params = jax.jit(lambda key: model.init(key, x0, jnp.zeros(2), jnp.zeros(2, jnp.int32), False))(
      jax.random.key(0))["params"]
  tx = optax.adam(1e-4)
  opt_state = tx.init(params)

  def loss_fn(params, x, y, key):
    kt, ke, kd = jax.random.split(key, 3)
    t = jax.random.uniform(kt, (x.shape[0],))
    eps = jax.random.normal(ke, x.shape)
    ab = jnp.cos(0.5 * jnp.pi * t)[:, None, None, None]
    x_t = ab * x + jnp.sqrt(1 - ab ** 2) * eps
    pred = model.apply({"params": params}, x_t, t, y, True, rngs={"dropout": kd})
    return jnp.mean((pred - eps) ** 2)

  @jax.jit
  def step(params, opt_state, x, y, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step, params, opt_state


# ----------------------------------------------------------------------------- one case
def _flops(compiled) -> float:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca.get("flops", float("nan")))


def prepare_case(name: str, backend: str, peak_n: int, peak_dtype) -> tuple[dict, dict]:
  """(static facts, {"diffusax", "plain", "matmul": blocking zero-argument calls}) of one case."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from diffusax.programs import train

  cfg, over, shape, b_cpu, b_gpu = CASES[name]
  batch = b_cpu if backend == "cpu" else b_gpu
  over = {**over, "train.batch_size": batch, "mesh.shape": (1, 1),
          "model.dtype": "float32" if backend == "cpu" else "bfloat16"}
  s = harness.settings(harness.load_config(cfg, over))
  if name.startswith("digits"):  # The program's own set-up, on the real (embedded) data.
    u = train.setup(s, devices=jax.devices()[:1])
    host = next(train.make_iterator(u))
    num_classes = u.num_classes if u.s.class_conditional else None
  else:
    num_classes = 10 if s.class_conditional else None
    u = harness.setup_without_data(s, shape, num_classes, devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    host = {"x": rng.uniform(-1, 1, (batch,) + shape).astype(np.float32),
            "label": rng.integers(0, 10, batch).astype(np.int32)}
  runner = train.make_runner(u)
  box = {"state": runner.to_run(train.init_state(u))}
  step_fn = inspect.getclosurevars(runner.step).nonlocals["step_fn"]  # The jitted program step.

  def run_diffusax():
    box["state"], m = runner.step(box["state"], host)
    jax.block_until_ready((box["state"], m))

  run_diffusax()
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), box["state"])
  gb = train.to_global({k: host[k] for k in ("x", "label")}, u.mesh)
  flops_d = _flops(step_fn.lower(abstract, gb).compile())

  pstep, pparams, popt = plain_step(u.s, num_classes, shape, batch)
  px, py, pkey = jnp.asarray(host["x"]), jnp.asarray(host["label"]), jax.random.key(1)
  flops_p = _flops(pstep.lower(pparams, popt, px, py, pkey).compile())
  pbox = {"p": pparams, "o": popt}

  def run_plain():
    pbox["p"], pbox["o"], loss = pstep(pbox["p"], pbox["o"], px, py, pkey)
    jax.block_until_ready((pbox["p"], loss))

  run_plain()
  mm_a = jax.random.normal(jax.random.key(2), (peak_n, peak_n), jnp.float32).astype(peak_dtype)
  mm = jax.jit(jnp.dot)
  jax.block_until_ready(mm(mm_a, mm_a))
  count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))
  facts = {"batch": batch, "shape": list(shape), "params": count(box["state"].params),
           "plain_params": count(pbox["p"]), "step_flops": flops_d, "plain_step_flops": flops_p,
           "matmul_flops": 2.0 * peak_n ** 3}
  return facts, {"diffusax": run_diffusax, "plain": run_plain,
                 "matmul": lambda: jax.block_until_ready(mm(mm_a, mm_a))}


def summarize(facts: dict, times: dict) -> dict:
  """Figures of one case in one process from its facts and {call: [seconds, ...]}."""
  import numpy as np

  d_min, p_min = min(times["diffusax"]), min(times["plain"])
  d_med, p_med = float(np.median(times["diffusax"])), float(np.median(times["plain"]))
  peak = facts["matmul_flops"] / min(times["matmul"])
  b = facts["batch"]
  return {**facts, "step_s_min": d_min, "step_s_median": d_med, "plain_s_min": p_min, "plain_s_median": p_med,
          "images_per_s": b / d_min, "plain_images_per_s": b / p_min,
          "flops_per_s": facts["step_flops"] / d_min, "plain_flops_per_s": facts["plain_step_flops"] / p_min,
          "peak_flops_per_s": peak, "util": facts["step_flops"] / d_min / peak,
          "plain_util": facts["plain_step_flops"] / p_min / peak,
          "time_ratio": d_min / p_min, "time_ratio_median": d_med / p_med, "calls": len(times["diffusax"])}


# XLA_FLAGS of each CPU setting. "on"/"off" are runtime.xla_cpu_eigen_convs (diffusax.main's flag);
# "convs" (exploratory, not a config value) sends only convolutions to Eigen and keeps dots in YNN.
SETTINGS = {"on": None, "off": None, "convs": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"}


def worker(args) -> None:
  """One process, one setting: builds every case, then answers "time case X once" requests.

  Protocol (lines on stdin/stdout; stdout lines of ours start with "@@"):
  -> "@@{"backend": ...}" (at once), "@@{"ready": {case: facts}, "device": ...}" (after compiling);
  <- "case NAME" -> "@@{call: seconds}"; <- "quit".
  """
  harness.apply_runtime(harness.load_config("digits", {"runtime.xla_cpu_eigen_convs": args.eigen == "on",
                                                      "runtime.compilation_cache_dir": args.cache_dir}))
  if SETTINGS[args.eigen]:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + SETTINGS[args.eigen]).strip()
  import jax
  import jax.numpy as jnp

  backend = "cpu" if jax.default_backend() == "cpu" and not args.gpu_path_on_cpu else "gpu"
  n, dt = (2048, jnp.float32) if backend == "cpu" else (8192, jnp.bfloat16)
  if args.gpu_path_on_cpu:  # Smoke test of the GPU branch (bf16 model, bf16 peak): the figures mean nothing.
    n = 1024
  names = [c for c in args.cases.split(",") if c] or list(DEFAULT_CASES[backend])
  say = lambda obj: print("@@" + json.dumps(obj), flush=True)
  say({"backend": backend})
  cases, facts = {}, {}
  for name in names:
    facts[name], cases[name] = prepare_case(name, backend, n, dt)
  say({"ready": facts, "device": str(jax.devices()[0].device_kind),
       "xla_flags": os.environ.get("XLA_FLAGS", ""), "peak_matmul": f"{n}x{n} {jnp.dtype(dt).name}"})
  for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == "quit":
      break
    out = {}
    for k, f in cases[cmd[1]].items():
      t0 = time.perf_counter()
      f()
      out[k] = time.perf_counter() - t0
    say(out)


# ----------------------------------------------------------------------------- parent
class _Worker:
  def __init__(self, setting: str, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--eigen", setting, "--cases", args.cases,
           "--cache_dir", args.cache_dir] + (["--gpu_path_on_cpu"] if args.gpu_path_on_cpu else [])
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

  def read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith("@@"):
        return json.loads(line[2:])
    raise RuntimeError(f"worker exited with {self.proc.wait()}")

  def ask(self, case: str) -> dict:
    self.proc.stdin.write(f"case {case}\n")
    self.proc.stdin.flush()
    return self.read()

  def close(self):
    try:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.close()
    except OSError:
      pass
    self.proc.wait()


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--cases", default="", help=f"comma-separated of {list(CASES)} (default per backend: "
                  f"{DEFAULT_CASES}; then the JSON is written)")
  ap.add_argument("--repeats", type=int, default=6, help="rounds of calls per case (each round: every "
                  "setting's process runs diffusax, plain and the matmul once)")
  ap.add_argument("--settings", default="on,off", help=f"CPU settings, of {list(SETTINGS)}")
  ap.add_argument("--cache_dir", default=os.path.join(tempfile.gettempdir(), "diffusax_benchmark_cache"),
                  help="runtime.compilation_cache_dir of the workers (compiles are not measured here; a rerun "
                  "then starts in about half the time); '' = off")
  ap.add_argument("--out", default="", help="JSON path (default: benchmarks/train_step.json, written only when "
                  "--cases is not given, so a subset never overwrites the full run)")
  ap.add_argument("--spec_peak_tflops", type=float, default=0.0, help="also report MFU against this datasheet "
                  "peak (dense bf16; H100 SXM: 989, H200: 989), beside util against the same-run matmul")
  ap.add_argument("--gpu_path_on_cpu", action="store_true", help="run the GPU branch (model.dtype=bfloat16, "
                  "bf16 peak matmul, GPU batch sizes) on the CPU as a smoke test before a GPU session; use with "
                  "--cases digits --repeats 1 --settings on --out /tmp/x.json; its figures mean nothing")
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--eigen", default="on", help=argparse.SUPPRESS)
  args = ap.parse_args()
  unknown = sorted(set(c for c in args.cases.split(",") if c) - set(CASES))
  if unknown:
    raise SystemExit(f"unknown cases {unknown}; allowed: {list(CASES)}")
  if args.worker:
    return worker(args)
  settings = [v for v in args.settings.split(",") if v]
  if not settings or not set(settings) <= set(SETTINGS):
    raise SystemExit(f"--settings takes some of {list(SETTINGS)}, got {args.settings!r}")
  t_start = time.perf_counter()
  workers = {settings[0]: _Worker(settings[0], args)}
  try:
    backend = workers[settings[0]].read()["backend"]
    if backend == "cpu":  # The flags are XLA:CPU's: one process is enough elsewhere.
      for v in settings[1:]:
        workers[v] = _Worker(v, args)
        workers[v].read()
    hello = {v: {**w.read(), "backend": backend} for v, w in workers.items()}
    names = list(hello[settings[0]]["ready"])
    times = {v: {n: {"diffusax": [], "plain": [], "matmul": []} for n in names} for v in workers}
    for name in names:
      for r in range(args.repeats + 1):  # Round 0 warms up and is dropped.
        for v, w in (list(workers.items()) if r % 2 else list(workers.items())[::-1]):
          t = w.ask(name)
          if r:
            for k, sec in t.items():
              times[v][name][k].append(sec)
  finally:
    for w in workers.values():
      w.close()
  results = {v: {"xla_flags": hello[v]["xla_flags"],
                 "cases": {n: summarize(hello[v]["ready"][n], times[v][n]) for n in names}} for v in workers}
  if args.spec_peak_tflops > 0:  # MFU against the datasheet, beside util against the measured matmul.
    for res in results.values():
      for c in res["cases"].values():
        c["mfu_vs_spec"] = c["flops_per_s"] / (args.spec_peak_tflops * 1e12)
  first = hello[settings[0]]
  print(f"\n{first['device']} ({harness.cpu_model() if first['backend'] == 'cpu' else first['backend']}); "
        f"peak: {first['peak_matmul']} matmul in the same process; {args.repeats} interleaved rounds; "
        f"{time.perf_counter() - t_start:.0f} s")
  print(f"{'setting':8s}{'case':8s}{'batch':>6s}{'params':>8s}{'GFLOP':>8s}{'img/s':>8s}{'peak GF/s':>10s}"
        f"{'util':>6s}{'plain util':>11s}{'vs plain':>9s}{'median':>8s}")
  for v, res in results.items():
    for name, c in res["cases"].items():
      print(f"{v:8s}{name:8s}{c['batch']:6d}{c['params'] / 1e6:7.2f}M{c['step_flops'] / 1e9:8.2f}"
            f"{c['images_per_s']:8.1f}{c['peak_flops_per_s'] / 1e9:10.0f}{c['util']:6.2f}{c['plain_util']:11.2f}"
            f"{c['time_ratio']:9.2f}{c['time_ratio_median']:8.2f}"
            + (f"  MFU vs {args.spec_peak_tflops:g} TFLOP/s spec: {c['mfu_vs_spec']:.3f}" if "mfu_vs_spec" in c else ""))
  if len(results) > 1:
    base = settings[0]
    for v in settings[1:]:
      ratio = {n: round(results[v]["cases"][n]["step_s_min"] / results[base]["cases"][n]["step_s_min"], 2)
               for n in names}
      print(f"step time {v} / {base} (interleaved processes): {ratio}")
  out = args.out or ("" if args.cases else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                       "train_step.json"))
  if out:
    with open(out, "w") as fh:
      json.dump({"date": time.strftime("%Y-%m-%d"), "cpu": harness.cpu_model(), "repeats": args.repeats,
                 "backend": first["backend"], "device": first["device"], "peak_matmul": first["peak_matmul"],
                 "model_dtype": "float32" if first["backend"] == "cpu" else "bfloat16",
                 "gpu_path_on_cpu": args.gpu_path_on_cpu, "settings": results}, fh, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
  main()
