"""--mode=distill end to end on the digits with a tiny DiT teacher: progressive rounds, a resumed run
(at a round's end and mid-round) bit-identical to the uninterrupted one, the students sampled by
--mode=sample; consistency distillation and its sampler through the same program; the refusals.

All in process (one compile of each step; the persistent compilation cache serves the restarts).
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from test_train import _digits_dit, _override
from diffusax import checkpoint as ckpt_lib
from diffusax.programs import distill, train
from diffusax.programs import settings as settings_lib
from diffusax.programs.settings import ConfigError

STEPS = 3  # per round


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """A teacher checkpoint of the tiny DiT at its initialisation (the mechanics do not need a trained one):
  written as --mode=phema writes parameters, so no training step is compiled for it."""
  import jax
  from diffusax.parallel import mesh as mesh_lib
  from diffusax.programs import phema, setup as setup_lib
  from diffusax.programs.logs import Logger
  root = tmp_path_factory.mktemp("distill")
  data_dir, wd = str(root / "tfds"), str(root / "teacher")
  s = settings_lib.parse(_config({"data_dir": data_dir, "workdir": ""}))
  u = setup_lib.model_setup(s)
  params = mesh_lib.unbox(u.param_init(jax.random.key(0)))
  phema.write_params(u, params, 2, wd, {"teacher": "init"}, Logger(wd, enabled=False))
  return {"root": root, "data_dir": data_dir, "workdir": wd}


def _config(teacher, **over):
  c = _digits_dit(teacher["data_dir"], **{"data.workers": 0, "data.prefetch": 0, "data.random_flip": False})
  return _override(c, {"distill.teacher_workdir": teacher["workdir"], "distill.teacher_steps": 4,
                       "distill.student_steps": 1, "distill.steps_per_round": STEPS, "train.ckpt_every": 2,
                       "train.keep_checkpoints": 10, "train.log_every": 1, "train.async_checkpoints": False,
                       "optim.warmup_steps": 0, "sample.method": "ddim", "sample.spacing": "trailing",
                       "sample.num_steps": 1, "sample.num_samples": 8, "sample.shard_size": 8, **over})


def _checksums(wd, step=None):
  """The per-array checksums a checkpoint records at save (bit-exact: equal checksums, equal arrays)."""
  mgr = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), async_save=False)
  try:
    return mgr.read_meta(step if step is not None else mgr.latest_step())["checksums"]
  finally:
    mgr.close()


def test_progressive_rounds_resume_bit_identically_and_the_students_sample(teacher):
  root = teacher["root"]
  full = str(root / "pd")
  s = settings_lib.parse(_config(teacher))
  out = distill.run(s, full)
  assert sorted(out["rounds"]) == ["1", "2"] and out["step"] == 2 * STEPS
  assert out["plan"]["teacher"].endswith("@2")  # the teacher's latest step, resolved and kept in the plan
  assert sorted(os.listdir(os.path.join(full, "students"))) == ["1", "2"]
  assert sorted(int(v) for v in os.listdir(os.path.join(full, "checkpoints")) if v.isdigit()) == [2, 3, 4, 6]
  for n in ("1", "2"):
    assert os.path.exists(os.path.join(full, f"samples_{n}steps.png"))
  want = _checksums(full, 2 * STEPS)
  want_student = _checksums(os.path.join(full, "students", "1"))
  # A restart from mid-round 2: the round's teacher is re-read from students/2, the optimizer state and
  # data position from the checkpoint. (The round-end re-initialisation runs in the uninterrupted run.)
  for step in (STEPS + 1,):
    wd = str(root / f"resumed{step}")
    shutil.copytree(full, wd)
    for name in os.listdir(os.path.join(wd, "checkpoints")):
      if name.isdigit() and int(name) > step:
        shutil.rmtree(os.path.join(wd, "checkpoints", name))
    if os.path.isdir(os.path.join(wd, "students", "1")):
      shutil.rmtree(os.path.join(wd, "students", "1"))
    distill.run(s, wd)
    assert _checksums(wd, 2 * STEPS) == want, step
    assert _checksums(os.path.join(wd, "students", "1")) == want_student, step
  # The students are workdirs that --mode=sample and --mode=eval read (`restore_ema`, as for post-hoc EMAs,
  # whose sampling tests/test_phema.py runs), signed with the teacher's network.
  from diffusax.programs import setup as setup_lib
  u = setup_lib.model_setup(s)
  params, step = setup_lib.restore_ema(u, os.path.join(full, "students", "2"))
  assert step == STEPS and len(jax.tree.leaves(params)) == len(jax.tree.leaves(u.abstract_params))
  with pytest.raises(ConfigError, match="distillation"):  # --mode=train refuses a distillation's workdir
    train.train_and_evaluate(s, full)
  with pytest.raises(ConfigError, match="holds the distillation"):  # ... and another distillation plan
    distill.run(settings_lib.parse(_config(teacher, **{"distill.steps_per_round": STEPS + 1})), full)


def test_consistency_distillation_trains_and_samples_with_the_consistency_sampler(teacher):
  wd = str(teacher["root"] / "cd")
  s = settings_lib.parse(_config(teacher, **{"distill.kind": "consistency", "distill.num_levels": 3,
                                             "distill.steps_per_round": 1, "distill.teacher_solver": "ddim",
                                             "sample.method": "consistency", "sample.spacing": ""}))
  out = distill.run(s, wd)
  assert list(out["rounds"]) == ["consistency"]
  assert sorted(out["rounds"]["consistency"]["samples"]) == ["1", "2", "4"]
  meta = json.load(open(os.path.join(wd, "distill.json")))
  assert meta["plan"]["kind"] == "consistency" and meta["rounds"]["consistency"]["steps"] == 1


def test_guided_distillation_gives_a_w_conditioned_student_that_starts_as_its_teacher(teacher):
  """Stage one's student is the teacher plus a zero-initialised w embedding: at initialisation its output is
  the teacher's conditional one for every w; the program then runs stage one and a progressive round, and
  the students' grids are sampled with w as their input (`bridge.condition`, as the sampling job does)."""
  import jax
  import jax.numpy as jnp
  from diffusax.nn import bridge
  wd = str(teacher["root"] / "gd")
  over = {"distill.kind": "guided", "distill.teacher_steps": 2, "distill.steps_per_round": 1,
          "model.dit.guidance_embed": True, "sample.guidance_scale": 1.5}
  s = settings_lib.parse(_config(teacher, **over))
  r = distill._build(s, None)
  t_params, _ = distill.setup_lib.restore_ema(r.teacher_setup, teacher["workdir"])
  st = r.fresh(t_params)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  y = jnp.arange(4) % 10
  want = bridge.denoiser(r.teacher_setup.module, {"params": t_params})(x, 0.5, y)
  for w in (0.0, 1.5):
    got = bridge.denoiser(r.u.module, {"params": st.params})(x, 0.5, {"label": y, "w": jnp.full((4,), w)})
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  out = distill.run(s, wd)
  assert list(out["rounds"]) == ["guided", "1"]
  assert sorted(os.listdir(os.path.join(wd, "students"))) == ["1", "guided"]
  assert os.path.exists(os.path.join(wd, "samples_2steps.png")) and os.path.exists(os.path.join(wd, "samples_1steps.png"))


@pytest.mark.parametrize("over,match", [
    ({"distill.teacher_workdir": ""}, "needs distill.teacher_workdir"),
    ({"distill.teacher_steps": 6}, r"teacher_steps=6 must be distill.student_steps=1 times a power of 2"),
    ({"distill.kind": "guidance"}, r"unknown distill.kind 'guidance'; allowed"),
    ({"distill.kind": "guided"}, r"set model.dit.guidance_embed=True"),
    ({"model.dit.guidance_embed": True}, r"guidance_embed=True is for distill.kind='guided'"),
    ({"sample.spacing": "uniform"}, r"unknown sample.spacing 'uniform'; allowed"),
    ({"diffusion.target": "eps"}, r"target='eps': a few-step student must predict x0 near t = 1"),
])
def test_bad_distillation_settings_are_refused_before_any_device_work(teacher, over, match):
  with pytest.raises(ConfigError, match=match):
    distill.check(settings_lib.parse(_config(teacher, **over)))
  with pytest.raises(ConfigError, match="no checkpoint"):
    distill.check(settings_lib.parse(_config(teacher, **{"distill.teacher_workdir": str(teacher["root"])})))
