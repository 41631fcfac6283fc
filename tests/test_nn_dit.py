"""DiT: published parameter counts, adaLN-zero init, shapes, conditioning, bf16, gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusax import nn as dnn
from diffusax.nn.dit import DIT_CONFIGS, DiT

B, H, C, K = 4, 8, 4, 3
SMALL = dict(patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=K, learn_sigma=True)
BF16_REL_TOL = dnn.BF16_REL_TOL  # 3e-2; measured about 0.004 here


def _inputs():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(B, H, H, C)), jnp.float32)
  return x, jnp.array([0.1, 0.4, 0.7, 1.0], jnp.float32), jnp.array([0, 1, 2, K], jnp.int32)


def perturb(params, seed=1):
  """Params with host-side Gaussian noise on every leaf (zero-initialised ones included)."""
  rng = np.random.default_rng(seed)

  def one(p):
    fan_in = max(1, p.size // p.shape[-1]) if p.ndim >= 2 else 1
    std = 0.5 / np.sqrt(fan_in) if p.ndim >= 2 else 0.1
    return np.asarray(p) + (rng.normal(size=p.shape) * std).astype(p.dtype)

  return jax.tree.map(one, params)


@pytest.fixture(scope="module")
def net():
  return DiT(**SMALL)


@pytest.fixture(scope="module")
def boxed_vars(net):
  return jax.jit(net.init)(jax.random.key(0, impl="rbg"), *_inputs())


@pytest.fixture(scope="module")
def params(boxed_vars):
  return dnn.unbox(boxed_vars)


@pytest.fixture(scope="module")
def apply_fn(net):
  return jax.jit(lambda v, x, t, y: net.apply(v, x, t, y))


@pytest.mark.parametrize("size,paper_m,official", [("S", 33, None), ("B", 130, None), ("XL", 675, 675_129_632)])
def test_published_param_counts(size, paper_m, official):
  # Peebles & Xie 2023, Table 1 (32x32x4 latents, p=2, 1000 classes, learn_sigma):
  # DiT-S/2 33M, DiT-B/2 130M, DiT-XL/2 675M. Measured: S/2 32,865,056; B/2 130,315,808.
  net = DiT(patch_size=2, num_classes=1000, learn_sigma=True, **DIT_CONFIGS[size])
  shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,)),
                          jnp.zeros((1,), jnp.int32))
  n = dnn.count_params(shapes)
  assert round(n / 1e6) == paper_m, n
  if official:  # the official code also counts its frozen 256 x 1152 position embedding
    assert n + 256 * 1152 == official


@pytest.mark.parametrize("b,h,w,c,extra", [
    (1, 8, 8, 4, {}),
    (3, 16, 16, 3, {"patch_size": 4, "learn_sigma": True}),
    (2, 8, 16, 1, {"out_channels": 2, "time_embedding": "fourier"}),
])
def test_output_shapes(b, h, w, c, extra):
  cfg = dict(SMALL, num_classes=None, learn_sigma=False)
  cfg.update(extra)
  out, _ = jax.eval_shape(DiT(**cfg).init_with_output, jax.random.key(0), jnp.zeros((b, h, w, c)), jnp.zeros((b,)))
  out_c = (cfg.get("out_channels") or c) * (2 if cfg["learn_sigma"] else 1)
  assert out.shape == (b, h, w, out_c) and out.dtype == jnp.float32


def test_bad_resolution_raises():
  with pytest.raises(ValueError, match="10x10 is not divisible by patch_size=4"):
    jax.eval_shape(DiT(**dict(SMALL, patch_size=4, num_classes=None)).init, jax.random.key(0),
                   jnp.zeros((1, 10, 10, 4)), jnp.zeros((1,)))


def test_adaln_zero_init(params, apply_fn):
  p = params["params"]
  for i in range(SMALL["depth"]):
    for leaf in jax.tree.leaves(p[f"block_{i}"]["adaLN_modulation"]):
      assert np.all(np.asarray(leaf) == 0)
  for leaf in jax.tree.leaves((p["final_adaLN"], p["final_linear"])):
    assert np.all(np.asarray(leaf) == 0)
  assert np.all(np.asarray(apply_fn(params, *_inputs())) == 0.0)  # every block is the identity


def test_time_and_class_conditioning(params, apply_fn):
  assert params["params"]["y_embedder"]["embedding"].shape == (K + 1, SMALL["hidden_size"])  # null row
  p = perturb(params)
  x, t, y = _inputs()
  x = np.broadcast_to(np.asarray(x)[:1], x.shape)
  by_t = np.asarray(apply_fn(p, x, t, jnp.zeros((B,), jnp.int32)))
  by_y = np.asarray(apply_fn(p, x, jnp.full((B,), 0.5), y))
  for i in range(B):
    for j in range(i):
      assert np.abs(by_t[i] - by_t[j]).max() > 1e-3, (i, j)
      assert np.abs(by_y[i] - by_y[j]).max() > 1e-3, (i, j)


def test_bf16_compute_close_to_fp32(net, params, apply_fn):
  p = perturb(params)
  x, t, y = _inputs()
  ref = np.asarray(apply_fn(p, x, t, y))
  out = np.asarray(jax.jit(lambda v: net.clone(dtype=jnp.bfloat16).apply(v, x, t, y))(p))
  assert out.dtype == np.float32 and np.all(np.isfinite(out))
  rel = np.sqrt(np.mean((out - ref) ** 2) / np.mean(ref ** 2))
  assert rel < BF16_REL_TOL, rel


def test_gradients_reach_every_parameter(net, params):
  x, t, y = _inputs()
  target = jnp.asarray(np.random.default_rng(2).normal(size=(B, H, H, 2 * C)), jnp.float32)
  grad = jax.jit(jax.grad(lambda v: jnp.mean((net.apply(v, x, t, y) - target) ** 2)))
  flat = lambda tree: {jax.tree_util.keystr(k): np.asarray(g) for k, g in jax.tree_util.tree_leaves_with_path(tree)}
  # adaLN-zero by design: at init only the final linear layer gets a gradient.
  nonzero0 = {k for k, g in flat(grad(params)).items() if np.any(g != 0)}
  assert nonzero0 == {"['params']['final_linear']['bias']", "['params']['final_linear']['kernel']"}
  # Zero-init chain final_linear -> adaLN modulations -> gated branches: after two steps all flow.
  p = params
  for _ in range(2):
    p = jax.tree.map(lambda a, b: np.asarray(a) - 0.5 * np.asarray(b), p, grad(p))
  zero = [k for k, g in flat(grad(p)).items() if not np.any(g != 0)]
  assert not zero, zero


def test_logical_axes_on_every_parameter(boxed_vars):
  leaves = jax.tree_util.tree_leaves_with_path(boxed_vars, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), name
    assert len(leaf.names) == leaf.value.ndim, name
    used = [n for n in leaf.names if n is not None]
    assert set(used) <= set(dnn.LOGICAL_AXES) and len(used) == len(set(used)), name
    if leaf.value.size >= 64:
      assert used, name
  qkv = boxed_vars["params"]["block_0"]["attn"]["query_kernel"]
  assert qkv.names == ("embed", "heads", "kv") and qkv.value.shape == (32, 4, 8)
  assert boxed_vars["params"]["block_0"]["fc1"]["kernel"].names == ("embed", "mlp")
