"""The README's core examples run as written and compute what they say."""
import os
import re

import numpy as np

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _core_blocks():
  text = open(README, encoding="utf-8").read()
  start = text.index("## Using the core from other JAX code")
  end = text.index("\n## ", start + 1)
  return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_readme_core_examples_run_as_written():
  blocks = _core_blocks()
  assert len(blocks) >= 2
  ns = {}
  for code in blocks:
    exec(compile(code, README, "exec"), ns)  # noqa: S102 - the README's own examples
  jnp, targets, losses = ns["jnp"], ns["targets"], ns["losses"]
  # What the first block claims: v converts back to the eps it was made from, the loss of the true target is 0.
  np.testing.assert_allclose(ns["eps_again"], ns["eps"], rtol=1e-4, atol=1e-4)
  assert ns["loss"].shape == (8,) and float(jnp.max(jnp.abs(ns["loss"]))) < 1e-8
  assert targets.TARGETS and losses.WEIGHTINGS
  # The second: samples of the right shape, finite; a traced step count changes the result; finite bits/dim.
  for name in ("x0", "x0_10", "x0_50"):
    assert ns[name].shape == (16, 8, 8, 1) and np.all(np.isfinite(np.asarray(ns[name]))), name
  assert not np.allclose(ns["x0_10"], ns["x0_50"])
  for name in ("bpd_vlb", "bpd_ode"):
    assert ns[name].shape == (4,) and np.all(np.isfinite(np.asarray(ns[name]))), name
