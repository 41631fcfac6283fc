"""Mesh shapes, the pmap strategy, FSDP memory, restore onto another mesh, early refusals.

Runs on the 8 fake CPU devices of conftest.py, on the toy2d MLP.
"""
import os
import shutil
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from diffusax import checkpoint as ckpt_lib
from diffusax.parallel import distributed
from diffusax.parallel import mesh as mesh_lib
from diffusax.programs import settings as settings_lib
from diffusax.programs import setup as setup_lib
from diffusax.programs import train
from diffusax.programs.settings import ConfigError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import _toy  # noqa: E402

STEPS = 3
# float32 sums in another order: the params after a few Adam steps agree to ~1e-7 (measured 3e-8).
TOL = 2e-6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _config(data_dir, **over):
  # Hidden width 64: every kernel dimension divides by fsdp = 8.
  return _toy(data_dir, **{"model.mlp.hidden": 64, **over})


def _run(u, state, n, it=None):
  """n steps of the program's runner from `state` (canonical form); returns (state, iterator)."""
  it = it or train.make_iterator(u)
  runner = train.make_runner(u)
  rs = runner.to_run(state)
  for _ in range(n):
    rs, _ = runner.step(rs, next(it))
  return runner.from_run(rs), it


def _per_device_bytes(tree) -> int:
  per = {}
  for x in jax.tree.leaves(tree):
    for s in x.addressable_shards:
      per[s.device] = per.get(s.device, 0) + s.data.nbytes
  return max(per.values())


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# "ordered": the mesh strategy with mesh.ordered_reduction (gradients added in device order).
LAYOUTS = [((1, 1), "mesh"), ((8, 1), "mesh"), ((4, 2), "mesh"), ((1, 8), "mesh"), ((8, 1), "pmap"),
           ((8, 1), "ordered")]


def test_meshes_and_pmap_agree_and_fsdp_divides_memory(data_dir):
  finals, rows = {}, []
  for shape, strategy in LAYOUTS:
    over = {"mesh.shape": shape, "mesh.strategy": "mesh" if strategy == "ordered" else strategy,
            "mesh.ordered_reduction": strategy == "ordered"}
    s = settings_lib.parse(_config(data_dir, **over))
    u = train.setup(s, devices=jax.devices()[:shape[0] * shape[1]])
    state = train.init_state(u)
    if strategy == "pmap":
      held = train.make_runner(u).to_run(state)
      nbytes = _per_device_bytes((held.params, held.opt_state))
    else:
      nbytes = _per_device_bytes((state.params, state.opt_state))
    final, _ = _run(u, state, STEPS)
    finals[(shape, strategy)] = jax.device_get(final)
    rows.append((shape, strategy, nbytes))
  ref = finals[((1, 1), "mesh")]
  full = rows[0][2]
  print("\nmesh (data x fsdp)  strategy  params+optimizer bytes per device  vs 1 device  max |param diff| vs 1x1")
  diffs = {}
  for (shape, strategy, nbytes) in rows:
    d = _max_diff(ref.params, finals[(shape, strategy)].params)
    diffs[(shape, strategy)] = d
    print(f"  {shape[0]} x {shape[1]:<13} {strategy:8}  {nbytes:>10,}  {full / nbytes:>14.2f}x  {d:.2e}")
  for key, final in finals.items():
    assert int(final.step) == STEPS
    assert diffs[key] <= TOL, (key, diffs[key])
    assert _max_diff(ref.opt_state, final.opt_state) <= TOL
    assert _max_diff(ref.ema_params, final.ema_params) <= TOL
  by = {(sh, st): b for sh, st, b in rows}
  # Replicated layouts hold everything on every device; fsdp = f divides it by f (up to the few
  # vectors too small to split: the 2-wide output bias and the optimizer's step counters).
  assert by[((8, 1), "mesh")] == by[((8, 1), "pmap")] == by[((8, 1), "ordered")] == full
  for f, shape in ((2, (4, 2)), (8, (1, 8))):
    assert full / f <= by[(shape, "mesh")] <= full / f * 1.05, (shape, by[(shape, "mesh")], full)
  # Identical draws everywhere: the init does not depend on the mesh (threefry is partitionable).
  assert jax.config.jax_threefry_partitionable


def test_checkpoint_moves_between_meshes_and_training_continues(data_dir, tmp_path):
  """Saved on (8 x 1); restored on (2 x 4) and on one device; the next steps agree."""
  wd = str(tmp_path / "w")

  def setup(shape, ndev):
    s = settings_lib.parse(_config(data_dir, **{"mesh.shape": shape}))
    return train.setup(s, devices=jax.devices()[:ndev])

  u8 = setup((8, 1), 8)
  state, it = _run(u8, train.init_state(u8), 2)
  ck = train.open_checkpointer(u8, wd)
  ck.save(2, state, {"data": it.state(), "signature": u8.signature})
  ck.close()
  saved = jax.device_get(state)
  ref, _ = _run(u8, state, 2, it)  # Donates `state`.

  for shape, ndev in (((2, 4), 8), ((1, 1), 1)):
    u = setup(shape, ndev)
    ck = train.open_checkpointer(u, wd)
    restored, meta = ck.restore(ckpt_lib.abstract_like(u.abstract_state, u.state_shardings), u.signature)
    ck.close()
    assert {x.sharding for x in jax.tree.leaves(restored.params)} <= set(jax.tree.leaves(u.state_shardings.params))
    assert len(jax.tree.leaves(restored.params)[0].sharding.device_set) == ndev
    np.testing.assert_array_equal(jax.device_get(restored.params["block_0_0"]["kernel"]),
                                  saved.params["block_0_0"]["kernel"])
    it2 = train.make_iterator(u)
    it2.restore(meta["data"])
    cont, _ = _run(u, restored, 2, it2)
    assert int(cont.step) == 4
    d = _max_diff(jax.device_get(ref.params), jax.device_get(cont.params))
    print(f"\ncontinued on {shape}: max |param diff| vs (8 x 1) = {d:.2e}")
    assert d <= TOL


@pytest.mark.parametrize("over,match", [
    ({"mesh.shape": (4, 2), "train.batch_size": 12},
     r"batch size 12 does not divide over the 8 data-parallel devices \(mesh \{'data': 4, 'fsdp': 2\}\)"),
    ({"mesh.shape": (-1, 1), "mesh.strategy": "pmap", "train.batch_size": 36},
     r"batch size 36 does not divide over the 8 data-parallel devices"),
    ({"mesh.shape": (16, 1)}, r"mesh shape \(16, 1\) needs 16 devices but 8 are available"),
    ({"mesh.shape": (-1, 3)}, r"mesh shape \(-1, 3\) does not fit 8 devices: 8 is not divisible by 3"),
    ({"mesh.shape": (2, 2, 2)}, r"mesh shape must have 2 entries \(data, fsdp\), got \(2, 2, 2\)"),
])
def test_bad_mesh_or_batch_refused_before_device_work(data_dir, tmp_path, over, match):
  traces = train.TraceCounts()
  with pytest.raises(ConfigError, match=match):
    train.train_and_evaluate(settings_lib.parse(_config(data_dir, **over)), str(tmp_path / "w"), traces=traces)
  assert traces == {}
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("over,match", [
    ({"mesh.strategy": "shard"}, r"unknown mesh.strategy 'shard'; allowed: \['mesh', 'pmap'\]"),
    ({"mesh.strategy": "pmap", "mesh.shape": (4, 2)}, r"mesh.shape must be \(-1, 1\), got \(4, 2\)"),
    ({"mesh.ordered_reduction": True, "mesh.shape": (4, 2)},
     r"mesh.ordered_reduction needs mesh.strategy='mesh' and replicated parameters \(mesh.shape \(N, 1\) or "
     r"\(-1, 1\)\), got strategy 'mesh', shape \(4, 2\)"),
    ({"mesh.ordered_reduction": True, "mesh.strategy": "pmap"}, r"mesh.ordered_reduction needs mesh.strategy='mesh'"),
    ({"runtime.distributed": "yes"}, r"runtime.distributed must be one of \['auto', 'on', 'off'\], got 'yes'"),
])
def test_bad_strategy_settings(data_dir, over, match):
  with pytest.raises(ConfigError, match=match):
    settings_lib.parse(_config(data_dir, **over))


def test_distributed_start_is_wanted_only_when_launched_so():
  assert not distributed.wanted("auto", {})
  assert not distributed.wanted("auto", {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"})
  assert distributed.wanted("auto", {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"})
  assert distributed.wanted("auto", {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"})
  assert distributed.wanted("auto", {"TPU_WORKER_HOSTNAMES": "a,b"})
  assert not distributed.wanted("auto", {"TPU_WORKER_HOSTNAMES": "a"})
  assert distributed.wanted("on", {}) and not distributed.wanted("off", {"JAX_COORDINATOR_ADDRESS": "x:1"})
  assert not distributed.initialize("off")


def test_replica_check_finds_a_copy_that_differs():
  from diffusax.parallel import integrity
  mesh = mesh_lib.make_mesh((4, 1), jax.devices()[:4])
  rep = mesh_lib.replicated(mesh)
  good = np.arange(12, dtype=np.float32).reshape(3, 4)
  copies = [good.copy() for _ in range(4)]
  copies[2][1, 3] = np.nextafter(copies[2][1, 3], np.float32(np.inf))  # One ulp on one device.
  make = lambda cs: jax.make_array_from_single_device_arrays(  # noqa: E731
      good.shape, rep, [jax.device_put(c, d) for c, d in zip(cs, mesh.devices.flat)])
  tree = {"a": make([good] * 4), "b": make(copies), "key": jax.device_put(jax.random.key(0), rep),
          "sharded": jax.device_put(good, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data")))}
  n, bad = integrity.diverged_replicas(tree)
  assert n == 3  # "sharded" is not replicated, so not compared.
  assert bad == ["['b']"]


def _boxed(shape, names):
  import flax.linen as nn
  return nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, np.float32), names)


def test_sharding_rules_report_what_is_replicated_and_can_refuse():
  mesh = mesh_lib.make_mesh((4, 2), jax.devices()[:8])
  tree = {"a": _boxed((6, 8), ("embed", "mlp")),     # the largest dimension that divides by 2: 8 -> fsdp
          "b": _boxed((3, 5), ("embed", "mlp")),     # asks for fsdp, nothing divides by 2: replicated, named
          "n": _boxed((4,), ("norm",)),              # the rules replicate norms
          "plain": jax.ShapeDtypeStruct((2,), np.float32)}  # no logical names
  sh = mesh_lib.param_shardings(tree, mesh)
  assert sh["a"].spec == P(None, "fsdp") and sh["b"].spec == P(None, None)
  assert sh["n"].spec == P(None) and sh["plain"].spec == P()
  places = {p.path: p for p in mesh_lib.placements(tree, mesh)}
  assert places["['b']"].missed == ("fsdp",) and not places["['a']"].missed and not places["['n']"].missed
  assert mesh_lib.sharding_summary(list(places.values()), mesh) == (
      "parameter sharding on mesh {'data': 4, 'fsdp': 2}: 1 arrays sharded (192 B), 2 replicated by the rules "
      "(24 B), 1 replicated because no dimension divides by the mesh axis their rules ask for (60 B): "
      "['b'] (3, 5) over fsdp")
  # Strict: every rule is required. A required rule refuses only what it asks for.
  with pytest.raises(mesh_lib.ShardingError, match=r"parameter \['b'\] of shape \(3, 5\) \(logical axes "
                                                   r"\('embed', 'mlp'\)\) must be sharded over mesh axis 'fsdp' of "
                                                   r"size 2, but none of its dimensions \[1, 0\] divides by 2"):
    mesh_lib.param_shardings(tree, mesh, strict=True)
  must_mlp = tuple(r for r in mesh_lib.DEFAULT_RULES if r[0] != "mlp") + (("mlp", "fsdp", True),)
  with pytest.raises(mesh_lib.ShardingError, match=r"parameter \['b'\] of shape \(3, 5\)"):
    mesh_lib.param_shardings(tree, mesh, rules=must_mlp)
  only_embed = {"c": _boxed((3, 4), ("embed", "conv_in"))}  # embed is not required: replicated, reported
  assert mesh_lib.param_shardings(only_embed, mesh, rules=must_mlp)["c"].spec == P(None, None)
  # fsdp = 1 asks for nothing: all replicated by the rules, none "missed".
  one = mesh_lib.make_mesh((8, 1), jax.devices()[:8])
  assert mesh_lib.sharding_summary(mesh_lib.placements(tree, one, strict=True), one).startswith(
      "parameter sharding on mesh {'data': 8, 'fsdp': 1}: 0 arrays sharded (0 B), 4 replicated by the rules")


def test_program_names_the_parameters_fsdp_cannot_split(data_dir):
  # Hidden width 36 does not divide by fsdp = 8: the MLP's kernels and biases are replicated, and said so.
  u = train.setup(settings_lib.parse(_config(data_dir, **{"mesh.shape": (1, 8), "model.mlp.hidden": 36})))
  line = u.sharding_summary
  assert line.startswith("parameter sharding on mesh {'data': 1, 'fsdp': 8}: 0 arrays sharded (0 B), ")
  assert "15 replicated because no dimension divides" in line and "['block_0_0']['kernel'] (36, 36) over fsdp" in line


def test_strict_sharding_refuses_what_fsdp_cannot_split(data_dir):
  # mesh.strict_sharding=True: the same network is refused at setup (abstract only), naming a parameter.
  s = settings_lib.parse(_config(data_dir, **{"mesh.shape": (1, 8), "model.mlp.hidden": 36,
                                              "mesh.strict_sharding": True}))
  assert s.mesh_strict
  with pytest.raises(ConfigError, match=r"^parameter \['block_0_0'\]\['bias'\] of shape \(36,\) \(logical axes "
                                        r"\('mlp',\)\) must be sharded over mesh axis 'fsdp' of size 8, but none of "
                                        r"its dimensions \[0\] divides by 8 \(mesh.strict_sharding=True refuses to "
                                        r"replicate it\)$"):
    setup_lib.model_setup(s)
  # Widths that divide by 8 pass strict mode.
  u = setup_lib.model_setup(settings_lib.parse(_config(data_dir, **{"mesh.shape": (1, 8), "mesh.strict_sharding": True})))
  assert "0 replicated because no dimension divides" in u.sharding_summary
