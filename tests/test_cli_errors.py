"""Errors a user hits: one line `diffusax: error: ...` on stderr, exit status 2, no traceback, before any
device work; and data sources that say which failure it is.

The command-line cases need a real process (exit status, what reaches stderr). One subprocess imports
`diffusax.main` once and forks a child per case, which runs `main.run()` with the case's argv: each case is
a real process exit, for a few milliseconds instead of a fresh interpreter.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_DRIVER = r'''
import json, os, sys, traceback
from diffusax import main
out = []
for argv in json.loads(sys.argv[1]):
  r_err, w_err = os.pipe()
  r_out, w_out = os.pipe()
  pid = os.fork()
  if pid == 0:
    os.close(r_err); os.close(r_out)
    os.dup2(w_err, 2); os.dup2(w_out, 1)
    sys.argv = ["diffusax.main", *argv]
    code = 0
    try:
      main.run()
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else 1
    except BaseException:
      traceback.print_exc()
      code = 1
    sys.stdout.flush(); sys.stderr.flush()
    # Device work would need jax: none of these cases may have started a backend.
    started = "jax" in sys.modules and bool(sys.modules["jax._src.xla_bridge"]._backends)
    os.write(w_out, f"\nJAX_BACKEND_STARTED={started}\n".encode())
    os._exit(code)
  os.close(w_err); os.close(w_out)
  err = b"".join(iter(lambda: os.read(r_err, 65536), b""))
  std = b"".join(iter(lambda: os.read(r_out, 65536), b""))
  _, status = os.waitpid(pid, 0)
  out.append({"argv": argv, "code": os.waitstatus_to_exitcode(status), "stderr": err.decode(),
              "stdout": std.decode()})
print(json.dumps(out))
'''


def _run_cases(cases):
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  r = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(cases)], capture_output=True, text=True,
                     env=env, cwd=ROOT, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_command_line_errors_are_one_line(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  broken = tmp_path / "broken_config.py"
  broken.write_text("def get_config():\n  return undefined_name\n")
  no_return = tmp_path / "no_return.py"
  no_return.write_text("def get_config():\n  pass\n")
  wd = str(tmp_path / "wd")
  toy = "--config=configs/toy2d.py"
  cases = {  # argv -> the whole stderr line
      "missing config": (
          ["--config=configs/missing.py", f"--workdir={wd}"],
          "cannot load --config=configs/missing.py: No such file or directory: 'configs/missing.py'"),
      "missing config with an override": (
          ["--config=configs/missing.py", f"--workdir={wd}", "--config.train.batch_size=3"],
          "cannot load --config=configs/missing.py: No such file or directory: 'configs/missing.py'"),
      "workdir under a file": (
          [toy, f"--workdir={a_file}/x"],
          f"--workdir={a_file}/x cannot be created: {a_file} is a file, not a directory"),
      "workdir is a file": (
          [toy, f"--workdir={a_file}"], f"--workdir={a_file} is a file, not a directory"),
      "misspelt override": (
          [toy, f"--workdir={wd}", "--config.train.batch_sise=3"],
          "bad override --config.train.batch_sise=3: config.train has no key 'batch_sise'; "
          "did you mean 'batch_size'?"),
      "unknown section": (
          [toy, f"--workdir={wd}", "--config.trian.batch_size=3"],
          "bad override --config.trian.batch_size=3: config has no key 'trian'; did you mean 'train'?"),
      "key under a value": (
          [toy, f"--workdir={wd}", "--config.seed.x=3"],
          "bad override --config.seed.x=3: config.seed holds a value of type int; it has no key 'x'"),
      "error inside the config file": (
          [f"--config={broken}", f"--workdir={wd}"],
          f"error in config file {broken}, line 2: NameError: name 'undefined_name' is not defined"),
      "config without a return": (
          [f"--config={no_return}", f"--workdir={wd}"],
          f"--config={no_return}: get_config() returned None (a missing return?)"),
      "post-hoc EMA without snapshots": (
          [toy, f"--workdir={wd}", "--mode=phema"],
          f"no EMA snapshots in {wd}/ema_snapshots: train with ema.sigma_rels (e.g. (0.05, 0.1)) and "
          "ema.snapshot_every > 0 first"),
      "a guide without checkpoints": (
          [toy, f"--workdir={wd}", "--mode=sample", f"--config.sample.guide_workdir={tmp_path}/guide"],
          f"sample.guide_workdir={tmp_path}/guide: no checkpoint in {tmp_path}/guide/checkpoints "
          "(the guiding model's run directory)"),
      "power EMA out of range": (
          [toy, f"--workdir={wd}", "--config.ema.sigma_rels=(0.05,0.4)"],
          "ema.sigma_rels must be a relative std in (0, 0.2887] (1/sqrt(12), the uniform average), got 0.4"),
  }
  results = _run_cases([argv for argv, _ in cases.values()])
  for (name, (argv, line)), r in zip(cases.items(), results):
    assert r["argv"] == argv
    assert r["code"] == 2, (name, r)
    assert "Traceback" not in r["stderr"], (name, r["stderr"])
    assert r["stderr"].splitlines() == [f"diffusax: error: {line}"], (name, r["stderr"])
    assert "JAX_BACKEND_STARTED=False" in r["stdout"], (name, r["stdout"])
    assert r["stdout"].strip() == "JAX_BACKEND_STARTED=False", (name, r["stdout"])
  assert not os.path.exists(wd), "nothing may be written for a refused command line"


# ---------------------------------------------------------------------------
# Data sources: which failure it is.

def test_open_source_says_which_failure_it_is(tmp_path, monkeypatch):
  from diffusax.data import pipeline
  d = str(tmp_path / "tfds")
  with pytest.raises(pipeline.DataError, match=r"^unknown dataset 'mnsit'; did you mean \['mnist'"):
    pipeline.open_source("mnsit", "train", d)
  with pytest.raises(pipeline.DataError, match=r"^TFDS cannot construct dataset 'mnist:99\.0\.0': Dataset mnist "
                                               r"cannot be loaded at version 99\.0\.0, only: "):
    pipeline.open_source("mnist:99.0.0", "train", d)
  with pytest.raises(pipeline.DataError, match=r"^dataset 'mnist' is not prepared in "):
    pipeline.open_source("mnist", "train", d)
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(pipeline.DataError, match=r"^data_dir .*/a_file/sub cannot be used: .*/a_file is a file"):
    pipeline.open_source("mnist", "train", str(tmp_path / "a_file" / "sub"))
  # Anything else is not renamed: it surfaces as raised, with its cause.
  import tensorflow_datasets as tfds

  def broken(name, data_dir):
    raise PermissionError(13, "Permission denied", data_dir)

  monkeypatch.setattr(tfds, "builder", broken)
  with pytest.raises(PermissionError, match="Permission denied"):
    pipeline.open_source("mnist", "train", d)
  monkeypatch.setattr(tfds, "builder", lambda name, data_dir: (_ for _ in ()).throw(ValueError("a bug")))
  with pytest.raises(ValueError, match="^a bug$") as e:
    pipeline.open_source("mnist", "train", d)
  assert not isinstance(e.value, pipeline.DataError)


def test_describe_says_which_failure_it_is(tmp_path, monkeypatch):
  """describe sorts TFDS' failures as open_source does (one helper, registry.tfds_builder): offline lookups."""
  from diffusax.data import registry
  d = str(tmp_path / "tfds")
  with pytest.raises(registry.sources.DataError,
                     match=r"^unknown dataset 'mnsit'; did you mean \['mnist'.*\(embedded: \['sklearn_digits'"):
    registry.describe("mnsit", d)
  with pytest.raises(registry.sources.DataError, match=r"^TFDS cannot construct dataset 'mnist:99\.0\.0': Dataset "
                                                       r"mnist cannot be loaded at version 99\.0\.0, only: "):
    registry.describe("mnist:99.0.0", d)
  assert registry.describe("mnist", d).shape == (28, 28, 1)  # A known name needs no prepared data.
  import tensorflow_datasets as tfds

  def broken(name, data_dir):
    raise PermissionError(13, "Permission denied", data_dir)

  monkeypatch.setattr(tfds, "builder", broken)
  with pytest.raises(PermissionError, match="Permission denied"):
    registry.describe("mnist", d)
