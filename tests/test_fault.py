"""Fault tolerance: corrupted checkpoints, non-finite states, failing saves, SIGTERM.

Failing writes are simulated honestly for root (chmod does not stop root): a
tmpfs remounted read-only, a tmpfs filled to the last byte, and a checkpoint
path under a regular file.
"""
import contextlib
import errno
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from diffusax import checkpoint as ckpt_lib
from diffusax.programs import settings as settings_lib
from diffusax.programs import train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import ROOT, _toy  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _setup(data_dir, **over):
  return train.setup(settings_lib.parse(_toy(data_dir, **over)), devices=jax.devices()[:1])


def _abstract(u):
  return ckpt_lib.abstract_like(u.abstract_state, u.state_shardings)


def test_flipped_byte_is_detected_and_fallback_uses_previous(data_dir, tmp_path):
  # Hidden 256: kernels large enough that orbax stores them out of line, unprotected by its own CRCs.
  u = _setup(data_dir, **{"model.mlp.hidden": 256})
  state = train.init_state(u)
  wd = str(tmp_path / "w")
  ck = train.open_checkpointer(u, wd)
  ck.save(0, state, {"step": 0})
  ck.save(1, state.replace(step=state.step + 1), {"step": 1})
  ck.close()
  step_dir = os.path.join(wd, "checkpoints", "1")
  biggest = max((f for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True) if os.path.isfile(f)),
                key=os.path.getsize)
  data = bytearray(open(biggest, "rb").read())
  data[len(data) // 2] ^= 0x04
  open(biggest, "wb").write(data)

  ck = train.open_checkpointer(u, wd)
  with pytest.raises(ckpt_lib.CheckpointCorrupted) as e:
    ck.restore(_abstract(u))
  msg = str(e.value)
  print("\n" + msg)
  assert f"checkpoint {step_dir} is corrupted: array ." in msg and "recorded at save" in msg
  assert "ckpt_fallback=True" in msg and "older steps: [0]" in msg
  assert os.path.isdir(step_dir), "without fallback nothing is moved"

  restored, meta = ck.restore(_abstract(u), fallback=True)
  assert int(restored.step) == 0 and meta["step"] == 0
  assert os.path.isdir(step_dir + ".corrupt") and not os.path.exists(step_dir)
  assert ck.all_steps() == [0]
  ck.close()


def test_nan_gradient_is_never_saved(data_dir, tmp_path):
  u = _setup(data_dir)
  wd = str(tmp_path / "w")
  ck = train.open_checkpointer(u, wd)
  runner = train.make_runner(u)
  it = train.make_iterator(u)
  state = train.init_state(u)
  # Nothing written yet: the message says there is no last good checkpoint (not "step None").
  bad = state.replace(params=jax.tree.map(lambda p: p * np.nan, state.params))
  with pytest.raises(ckpt_lib.NonFiniteState, match=r"it was not saved.*no checkpoint has been written in this "
                                                    r"directory yet\.$") as e:
    ck.save(0, bad, {"data": it.state()})
  assert "None" not in str(e.value)
  ck.save(0, state, {"data": it.state()})
  batch = next(it)
  batch["x"] = batch["x"].copy()
  batch["x"][3, 1] = np.nan  # One bad input value: NaN loss, NaN gradient, NaN params after the update.
  state, metrics = runner.step(state, batch)
  assert not np.isfinite(float(metrics["grad_norm"]))
  with pytest.raises(ckpt_lib.NonFiniteState,
                     match=r"state at step 1 has non-finite values \(first in \.params\['block_0_0'\]\['bias'\], "
                           r"and \d+ more arrays\); it was not saved.*last good checkpoint is step 0"):
    ck.save(1, state, {"data": it.state()})
  ck.close()
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["0"]
  ck = train.open_checkpointer(u, wd)
  restored, _ = ck.restore(_abstract(u))
  assert int(restored.step) == 0
  ck.close()


def test_checkpoint_without_checksums_is_refused_unless_allowed(data_dir, tmp_path):
  """A meta without checksums (an older writer, or a replaced meta) is not restored unverified by default."""
  import json
  u = _setup(data_dir)
  wd = str(tmp_path / "w")
  ck = train.open_checkpointer(u, wd)
  ck.save(3, train.init_state(u), {"step": 3})
  ck.close()
  meta_file = os.path.join(wd, "checkpoints", "3", "meta", "metadata")  # orbax JsonSave's file
  meta = json.load(open(meta_file))
  assert "checksums" in meta
  del meta["checksums"]
  json.dump(meta, open(meta_file, "w"))
  ck = train.open_checkpointer(u, wd)
  with pytest.raises(ckpt_lib.CheckpointUnverified,
                     match=r"checkpoint .*/checkpoints/3 records no checksums in its meta .* cannot be verified\. "
                           r"To restore it anyway, set --config\.train\.allow_unverified_restore=True$"):
    ck.restore(_abstract(u))
  ck.close()
  u2 = _setup(data_dir, **{"train.allow_unverified_restore": True})
  notes = []
  ck = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), log=notes.append,
                             allow_unverified=u2.s.train.allow_unverified_restore)
  restored, meta = ck.restore(_abstract(u2))
  ck.close()
  assert int(restored.step) == 0 and meta["step"] == 3  # a fresh state saved under step 3
  assert len(notes) == 1 and "has no checksums; restored unverified" in notes[0], notes


@contextlib.contextmanager
def _tmpfs(path, size="4m"):
  os.makedirs(path)
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True)
  if r.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", path], check=False)


def _fill(path):
  """Writes files until the file system has no byte left."""
  for i, chunk in enumerate((1 << 16, 512, 1)):
    fd = os.open(os.path.join(path, f"filler{i}"), os.O_WRONLY | os.O_CREAT)
    try:
      while True:
        os.write(fd, b"\0" * chunk)
    except OSError as e:
      assert e.errno == errno.ENOSPC
    finally:
      os.close(fd)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a tmpfs needs root")
@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_failing_save_is_a_clean_error_and_keeps_the_last_good(data_dir, tmp_path, fault):
  u = _setup(data_dir)
  state = train.init_state(u)
  with _tmpfs(str(tmp_path / "mnt")) as mnt:
    wd = os.path.join(mnt, "w")
    ck = train.open_checkpointer(u, wd)  # async saves: a write error surfaces at the next save or wait.
    ck.save(0, state, {"step": 0})
    ck.wait()
    if fault == "read-only":
      subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
    else:
      _fill(mnt)
    with pytest.raises(ckpt_lib.CheckpointSaveError) as e:
      ck.save(1, state.replace(step=state.step + 1), {"step": 1})
      ck.wait()
    msg = str(e.value)
    print(f"\n{fault}: {msg}")
    assert f"could not write checkpoint step 1 in {wd}/checkpoints" in msg
    assert "The last good checkpoint (step 0) is intact" in msg
    assert ("Read-only file system" in msg) if fault == "read-only" else ("No space left" in msg or "ENOSPC" in msg)
    with contextlib.suppress(Exception):
      ck.manager.close()
    # The last good checkpoint restores (and verifies) from the still faulty file system.
    ck = train.open_checkpointer(u, wd)
    assert ck.all_steps() == [0]
    restored, meta = ck.restore(_abstract(u))
    assert int(restored.step) == 0 and meta["step"] == 0
    ck.close()


def _main(args, **kw):
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  return subprocess.run([sys.executable, "-m", "diffusax.main", *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=300, **kw)


def _toy_args(data_dir, wd, steps, extra=()):
  return ["--config=configs/toy2d.py", f"--workdir={wd}", f"--config.data.data_dir={data_dir}",
          "--config.model.mlp.hidden=32", "--config.model.mlp.depth=2", "--config.train.batch_size=64",
          f"--config.train.num_steps={steps}", "--config.train.log_every=10", "--config.train.eval_batches=1",
          "--config.sample.num_steps=2", "--config.sample.per_class=4", "--config.optim.decay=constant", *extra]


def test_unwritable_checkpoint_directory_is_one_clean_line(data_dir, tmp_path):
  wd = tmp_path / "w"
  wd.mkdir()
  (wd / "checkpoints").write_text("a regular file where the checkpoint directory should be")
  r = _main(_toy_args(data_dir, str(wd), 5))
  assert r.returncode == 2, r.stderr[-2000:]
  err = [l for l in r.stderr.splitlines() if l.strip() and "Warning" not in l and "warn(" not in l]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  assert len(err) == 1, err
  assert err[0].startswith(f"diffusax: error: could not write checkpoint step 5 in {wd}/checkpoints: "), err
  assert "Not a directory" in err[0] and "No checkpoint has been written" in err[0], err


def _restore_leaves(wd, step):
  import orbax.checkpoint as ocp
  return jax.tree.leaves(ocp.StandardCheckpointer().restore(os.path.join(wd, "checkpoints", str(step), "state")))


def test_sigterm_saves_exits_zero_and_resumes_bit_identically(data_dir, tmp_path):
  cut, ref = str(tmp_path / "cut"), str(tmp_path / "ref")
  extra = ["--config.train.ckpt_every=100000", "--config.train.log_every=1"]
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  p = subprocess.Popen([sys.executable, "-m", "diffusax.main", *_toy_args(data_dir, cut, 100000, extra)],
                       cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  seen = 0
  for line in p.stdout:  # Progress lines "[...] 12/100000 | ...": signal once training runs.
    if "/100000" in line:
      seen += 1
      if seen == 20:
        break
  t0 = time.monotonic()
  p.send_signal(signal.SIGTERM)
  rest = p.stdout.read()
  rc = p.wait(timeout=120)
  took = time.monotonic() - t0
  assert rc == 0, rest[-2000:]
  assert "stopped by signal 15" in rest, rest[-2000:]
  steps = [int(d) for d in os.listdir(os.path.join(cut, "checkpoints")) if d.isdigit()]
  assert len(steps) == 1
  k = steps[0]
  last_logged = max(int(l.split("/100000")[0].split()[-1]) for l in rest.splitlines() + [f"] {k}/100000"]
                    if "/100000" in l)
  print(f"\nSIGTERM after step ~{k}: exit 0 in {took:.2f} s with a checkpoint at step {k}")
  assert k == last_logged, "it stops right after the step it was in (one step logged per step here)"
  assert not os.path.exists(os.path.join(cut, "samples.png")), "no final eval/samples when preempted"
  # Resume to k + 10; an uninterrupted run to k + 10 must match bit for bit (constant lr: num_steps
  # does not change the schedule).
  total = k + 10
  r = _main(_toy_args(data_dir, cut, total, extra))
  assert r.returncode == 0 and f"resumed from step {k}" in r.stdout, r.stderr[-2000:]
  r = _main(_toy_args(data_dir, ref, total, extra))
  assert r.returncode == 0, r.stderr[-2000:]
  a, b = _restore_leaves(ref, total), _restore_leaves(cut, total)
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
