"""`import diffusax.core` must not load any framework beyond JAX."""
import subprocess
import sys


def test_core_imports_no_framework():
  code = ("import sys, diffusax.core, diffusax.core.schedules; "
          "print(','.join(m for m in ('flax', 'optax', 'orbax', 'ml_collections', 'tensorflow') "
          "if any(k == m or k.startswith(m + '.') for k in sys.modules)))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "", f"diffusax.core pulled in: {out.stdout.strip()}"
