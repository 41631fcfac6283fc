"""The programs' structure: no import cycle, sampling/eval read only the EMA they use, network
options from the command line, datasets from the data registry, honest init error reports."""
import ast
import dataclasses
import glob
import json
import os
import sys

import numpy as np
import pytest

from diffusax.programs import settings as settings_lib
from diffusax.programs import setup as setup_lib
from diffusax.programs import train
from diffusax.programs.settings import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = os.path.join(ROOT, "src", "diffusax", "programs")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import _toy  # noqa: E402


def _imported_modules(path: str) -> set[str]:
  """Every module an `import` or `from ... import` anywhere in the file names (deferred ones too)."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out |= {f"{node.module}.{a.name}" for a in node.names}
  return out


def test_program_modules_do_not_import_each_other():
  modes = {"train", "sample", "evaluate"}
  for name in modes | {"setup"}:
    imported = _imported_modules(os.path.join(PROGRAMS, f"{name}.py"))
    others = {f"diffusax.programs.{m}" for m in modes - {name}}
    assert not imported & others, f"programs/{name}.py imports {sorted(imported & others)}"
  assert not _imported_modules(os.path.join(PROGRAMS, "setup.py")) & {f"diffusax.programs.{m}" for m in modes}


def test_programs_hold_no_module_level_mutable_state_and_no_dataset_names():
  for path in glob.glob(os.path.join(PROGRAMS, "*.py")):
    tree = ast.parse(open(path).read())
    for node in tree.body:  # Module-level statements: no empty container to accumulate into.
      if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
        v = node.value
        empty = (isinstance(v, ast.Dict) and not v.keys) or (isinstance(v, (ast.List, ast.Set)) and not v.elts) \
            or (isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id in ("dict", "list", "set"))
        assert not empty, f"{os.path.basename(path)}:{node.lineno}: module-level mutable accumulator"
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Global)], f"{path}: `global` statement"
    if os.path.basename(path) == "defaults.py":
      continue  # The schema's default data.name is a config value, not a branch on a name.
    names = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    for ds in ("sklearn_digits", "toy_gmm2d"):  # Docstrings may name them; no code string may equal one.
      assert ds not in names, f"{os.path.basename(path)} hard-codes the dataset name {ds!r}"


# ---------------------------------------------------------------------------
# Sampling and evaluation read the first EMA only.

OVER = {"train.num_steps": 10, "ema.decays": (0.9, 0.5), "model.mlp.hidden": 256}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  """A toy2d MLP trained 10 steps with two EMAs (so 'the first EMA only' is a real choice); hidden 256 so
  the arrays, not the checkpoint's index files, dominate the bytes read."""
  root = tmp_path_factory.mktemp("toy_restore")
  data_dir, wd = str(root / "tfds"), str(root / "run")
  c = _toy(data_dir, **OVER)
  train.train_and_evaluate(settings_lib.parse(c), wd)
  return c, wd


def _full_state(wd, step):
  """The whole saved state, read with orbax directly (not through diffusax)."""
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer().restore(os.path.join(wd, "checkpoints", str(step), "state"))


def _forbid_training_things(monkeypatch, train_split: str):
  """Make opening the training split, building an optimizer or a TrainState fail loudly."""
  from diffusax.data import pipeline
  from diffusax.training import optimizer, state
  real_open = pipeline.open_source

  def open_source(name, split, data_dir, **kw):
    assert split != train_split, "sampling/eval opened the training split"
    return real_open(name, split, data_dir, **kw)

  def forbidden(*a, **k):
    raise AssertionError("sampling/eval built an optimizer or a TrainState")

  monkeypatch.setattr(pipeline, "open_source", open_source)
  monkeypatch.setattr(optimizer, "make", forbidden)
  monkeypatch.setattr(state, "create", forbidden)


def test_sample_mode_restores_only_the_first_ema(toy_run, tmp_path, monkeypatch):
  import jax
  import tensorstore as ts
  from diffusax.programs import sample
  c, wd = toy_run
  full = _full_state(wd, 10)
  bytes_read = lambda: sum(v["value"] for m in ts.experimental_collect_matching_metrics(  # noqa: E731
      "/tensorstore/kvstore/file/bytes_read") for v in m["values"])
  s = settings_lib.parse(_toy(c.data.data_dir, **OVER, **{"sample.num_samples": 8, "sample.shard_size": 8,
                                                          "sample.output_dir": str(tmp_path / "samples")}))
  # "Before": the whole TrainState, as training resumes it, measured in the same process.
  from diffusax import checkpoint as ckpt_lib
  ut = train.setup(s)
  ck = setup_lib.open_checkpointer(ut, wd)
  b0 = bytes_read()
  ck.restore(ckpt_lib.abstract_like(ut.abstract_state, ut.state_shardings))
  full_bytes = bytes_read() - b0
  ck.close()
  _forbid_training_things(monkeypatch, s.data.split)
  u = setup_lib.model_setup(s)
  b0 = bytes_read()
  params, step = setup_lib.restore_ema(u, wd)
  part_bytes = bytes_read() - b0
  assert step == 10
  got, want = jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(full["ema_params"][0])
  assert len(got) == len(want) > 0
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  # A different EMA is really a different array: the restore picked the first, not any.
  assert any(not np.array_equal(a, b) for a, b in zip(want, jax.tree.leaves(full["ema_params"][1])))
  # Bytes from disk: the whole state is params + 2 EMAs + 2 Adam moments, five parameter-sized trees;
  # one of them (plus the index files both read) is well under half.
  assert part_bytes < 0.4 * full_bytes, (part_bytes, full_bytes)
  out = sample.run(s, wd)
  assert out["step"] == 10 and os.path.exists(os.path.join(str(tmp_path / "samples"), "shard_000000.npz"))


def test_eval_mode_restores_only_the_first_ema_and_reads_no_training_data(toy_run, tmp_path, monkeypatch):
  from diffusax.programs import evaluate
  c, wd = toy_run
  s = settings_lib.parse(_toy(c.data.data_dir, **OVER, **{"eval.metrics": ("bpd_vlb",), "eval.bpd_examples": 8,
                                                          "eval.vlb_steps": 4}))
  _forbid_training_things(monkeypatch, s.data.split)
  traces = setup_lib.TraceCounts()
  out = evaluate.run(s, wd, traces=traces)
  assert out["step"] == 10 and np.isfinite(out["metrics"]["bpd_vlb"]) and traces == {"eval_bpd_vlb": 1}


def test_state_init_is_compiled_once_per_setup(tmp_path):
  import jax
  u = train.setup(settings_lib.parse(_toy(str(tmp_path))), devices=jax.devices()[:1])
  a, b = train.init_state(u), train.init_state(u)
  assert u.traces == {"init": 1}
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_partial_restore_verifies_what_it_reads_and_only_that(toy_run, tmp_path):
  import shutil
  from diffusax import checkpoint as ckpt_lib
  c, wd0 = toy_run
  s = settings_lib.parse(_toy(c.data.data_dir, **OVER))
  u = setup_lib.model_setup(s)
  for tampered, fails in ((".params", False), (".ema_params[1]", False), (".ema_params[0]", True)):
    wd = str(tmp_path / tampered.strip("."))
    shutil.copytree(wd0, wd)
    path = os.path.join(wd, "checkpoints", "10", "meta", "metadata")
    meta = json.load(open(path))
    key = next(k for k in meta["checksums"] if k.startswith(tampered + "["))
    meta["checksums"][key] = "0" * 16
    json.dump(meta, open(path, "w"))
    if fails:
      with pytest.raises(ckpt_lib.CheckpointCorrupted, match=r"is corrupted: array \.ema_params\[0\]"):
        setup_lib.restore_ema(u, wd)
    else:
      setup_lib.restore_ema(u, wd)  # The tampered record belongs to an array that is not read.


# ---------------------------------------------------------------------------
# Network options: one block per network, from the network's own fields.

def test_option_blocks_are_the_networks_constructor_fields():
  from diffusax import nn
  from diffusax.programs import defaults
  c = defaults.base_config()
  for name, cls in nn.NETWORKS.items():
    fields = {f.name: f.default for f in dataclasses.fields(cls)
              if f.name not in ("parent", "name", "num_classes", "dtype", "param_dtype")}
    assert set(c.model[name].keys()) == set(fields), name
    for k, v in fields.items():
      assert c.model[name][k] == (tuple(v) if isinstance(v, list) else v), (name, k)


def _parse_flags(*overrides):
  from absl import flags
  from ml_collections import config_flags
  """configs/digits.py with command-line overrides, parsed by the same config_flags as diffusax.main."""
  fv = flags.FlagValues()
  argv = ["prog", f"--config={os.path.join(ROOT, 'configs', 'digits.py')}", *overrides]
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def test_every_network_option_is_a_command_line_flag_and_switching_network_works():
  import jax
  import jax.numpy as jnp
  c = _parse_flags("--config.model.unet.dropout=0.25", "--config.model.unet.out_channels=1")
  s = settings_lib.parse(c)
  m = setup_lib.build_module(s, 10)
  assert m.dropout == 0.25 and m.out_channels == 1 and m.base_channels == 32  # the config's own value kept
  # learn_sigma is a flag too, refused by name until a loss trains the variance channels.
  with pytest.raises(settings_lib.ConfigError, match="model.unet.learn_sigma=True"):
    settings_lib.parse(_parse_flags("--config.model.unet.learn_sigma=True"))
  c = _parse_flags("--config.model.name=dit", "--config.model.dit.depth=1", "--config.model.dit.hidden_size=32",
                   "--config.model.dit.num_heads=2", "--config.model.dit.out_channels=2")
  s = settings_lib.parse(c)
  m = setup_lib.build_module(s, 10)
  assert type(m).__name__ == "DiT" and m.depth == 1 and m.hidden_size == 32
  x, t, y = jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,)), jnp.zeros((2,), jnp.int32)
  out = jax.eval_shape(lambda: m.apply(m.init(jax.random.key(0), x, t, y), x, t, y))
  assert out.shape == (2, 8, 8, 2)  # out_channels=2 from the command line
  assert s.model_settings()["name"] == "dit" and s.model_settings()["kwargs"]["depth"] == 1
  with pytest.raises(Exception, match="widht"):
    _parse_flags("--config.model.unet.widht=3")
  # An unknown option is refused naming the nearest valid key: by the flag parser on the command line,
  # and by settings.check_keys in a config file (with its full dotted name).
  with pytest.raises(Exception, match=r'hiden[\s\S]*Did you mean "hidden"'):
    _parse_flags("--config.model.mlp.hiden=3")
  c = _parse_flags()
  with c.unlocked():
    c.model.mlp.hiden = 3
  with pytest.raises(ConfigError, match=r"unknown config key 'model.mlp.hiden'; did you mean \['model.mlp.hidden'"):
    settings_lib.parse(c)
  with pytest.raises(ConfigError, match=r"unknown model.name 'vit'; allowed: \['dit', 'mlp', 'unet'\]"):
    settings_lib.parse(_parse_flags("--config.model.name=vit"))


def test_a_non_shape_error_at_init_is_not_reported_as_a_shape_problem(tmp_path):
  """Only nn.InputShapeError becomes 'cannot take data of shape'; a plain ValueError is a bug, raised as is."""
  s = settings_lib.parse(_toy(str(tmp_path), **{"model.class_conditional": True}))
  module = setup_lib.build_module(s, None)  # a network without a class table, given labels: a program bug
  with pytest.raises(ValueError, match="labels y were given but the network has num_classes=None") as e:
    setup_lib.abstract_init(s, module, (2,))
  assert not isinstance(e.value, ConfigError)
  # An option no program can serve is a one-line config error naming it.
  with pytest.raises(ConfigError, match=r"model.unet.low_res_channels=3: a super-resolution network's condition "
                                        r"comes from the task: set task.name"):
    setup_lib.build_module(settings_lib.parse(_parse_flags("--config.model.unet.low_res_channels=3")), 10)


# ---------------------------------------------------------------------------
# Datasets come from the data layer's registry.

def test_registry_describes_embedded_sets_without_reading_a_split(tmp_path):
  from diffusax.data import registry
  d = registry.describe("sklearn_digits", str(tmp_path))
  assert (d.shape, d.num_classes, d.transform, d.features) == ((8, 8, 1), 10, "image", "digits")
  d = registry.describe("toy_gmm2d", str(tmp_path))
  assert (d.shape, d.num_classes, d.transform, d.features) == ((2,), 8, "vector", None)
  assert not os.listdir(tmp_path), "describing a dataset must not build or read it"


def test_every_config_file_parses():
  """Each configs/*.py (and each stage of one that takes an argument) gives Settings: no key the schema
  lacks, no value the programs refuse. No data is read."""
  import glob
  import importlib.util
  import inspect
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    spec = importlib.util.spec_from_file_location(f"cfg_{os.path.basename(path)[:-3]}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    params = inspect.signature(mod.get_config).parameters
    args = [()] if not params else [(a,) for a in ("base", "sr")]
    for a in args:
      c = mod.get_config(*a)
      if c.stage == "autoencoder" and c.train.num_steps == 0:  # Its command line names the weights to import.
        c.autoencoder.init_from = "/weights/from/the/command/line"
      try:
        settings_lib.parse(c)
      except ConfigError as e:
        raise AssertionError(f"{path}{a}: {e}") from None
