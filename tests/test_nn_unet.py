"""U-Net: published parameter count, shapes, conditioning, bf16, gradients, logical axes.

One small network (16 channels, 2 levels, 16x16x3 inputs) is initialised and
compiled once for the module; shape checks run through `jax.eval_shape`.
Params are initialised with an "rbg" key: threefry initialisers take tens of
seconds to compile on XLA:CPU, rbg a few.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusax import nn as dnn
from diffusax.nn.unet import UNet

B, H, C, K = 4, 16, 3, 3
# Attention only in the middle block of the compiled network (each attention block costs
# seconds of XLA:CPU compile); placement at chosen resolutions is checked by eval_shape.
SMALL = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_heads=2,
             num_groups=8, num_classes=K, learn_sigma=True, dropout=0.1)
BF16_REL_TOL = dnn.BF16_REL_TOL  # 3e-2; measured about 0.011 here


def _inputs():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(B, H, H, C)), jnp.float32)
  t = jnp.array([0.1, 0.4, 0.7, 1.0], jnp.float32)
  y = jnp.array([0, 1, 2, K], jnp.int32)  # includes the null class
  return x, t, y


def perturb(params, seed=1):
  """Params with host-side Gaussian noise on every leaf (zero-initialised ones included)."""
  rng = np.random.default_rng(seed)

  def one(p):
    fan_in = max(1, p.size // p.shape[-1]) if p.ndim >= 2 else 1
    std = 0.5 / np.sqrt(fan_in) if p.ndim >= 2 else 0.1
    return np.asarray(p) + (rng.normal(size=p.shape) * std).astype(p.dtype)  # host-side: no compiles

  return jax.tree.map(one, params)


@pytest.fixture(scope="module")
def net():
  return UNet(**SMALL)


@pytest.fixture(scope="module")
def boxed_vars(net):
  x, t, y = _inputs()
  return jax.jit(net.init)(jax.random.key(0, impl="rbg"), x, t, y)


@pytest.fixture(scope="module")
def params(boxed_vars):
  return dnn.unbox(boxed_vars)


@pytest.fixture(scope="module")
def apply_fn(net):
  return jax.jit(lambda v, x, t, y: net.apply(v, x, t, y))


@pytest.fixture(scope="module")
def loss_grad(net):
  x, t, y = _inputs()
  target = jnp.asarray(np.random.default_rng(2).normal(size=(B, H, H, 2 * C)), jnp.float32)

  def loss(v, key):
    out = net.apply(v, x, t, y, train=True, rngs={"dropout": key})
    return jnp.mean((out - target) ** 2)

  return jax.jit(jax.value_and_grad(loss))


def test_ddpm_cifar10_param_count():
  # Ho et al. 2020, Appendix B: 35.7M parameters for the CIFAR-10 model.
  ddpm = UNet(base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
              num_heads=1, dropout=0.1, scale_shift_norm=False, num_groups=32)
  shapes = jax.eval_shape(ddpm.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)))
  n = dnn.count_params(shapes)
  assert n == 35_746_307
  assert round(n / 1e6, 1) == 35.7
  # ADM's scale-shift conditioning doubles each ResBlock's time projection.
  adm = ddpm.clone(scale_shift_norm=True)
  shapes = jax.eval_shape(adm.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)))
  assert dnn.count_params(shapes) == 38_307_203


@pytest.mark.parametrize("b,h,w,c,extra", [
    (1, 8, 8, 1, {}),
    (2, 16, 16, 3, {"learn_sigma": True}),
    (3, 16, 8, 4, {"resblock_updown": True}),
    (2, 32, 32, 3, {"channel_mult": (1, 2, 2), "time_embedding": "fourier", "num_head_channels": 8}),
    (2, 8, 8, 2, {"out_channels": 5, "conv_resample": False, "scale_shift_norm": False}),
])
def test_output_shapes(b, h, w, c, extra):
  cfg = dict(SMALL, num_classes=None, learn_sigma=False)
  cfg.update(extra)
  net = UNet(**cfg)
  out, _ = jax.eval_shape(net.init_with_output, jax.random.key(0), jnp.zeros((b, h, w, c)), jnp.zeros((b,)))
  out_c = (cfg.get("out_channels") or c) * (2 if cfg["learn_sigma"] else 1)
  assert out.shape == (b, h, w, out_c) and out.dtype == jnp.float32


def test_attention_at_chosen_resolutions():
  net = UNet(**dict(SMALL, channel_mult=(1, 2, 2), attn_resolutions=(8,)))
  v = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)), jnp.zeros((1,), int))
  p = dnn.unbox(v)["params"]
  attn = sorted(k for k in list(p) + list(p["encoder"]) if k.endswith("attn"))
  # 16x16 level 0: none; 8x8 level 1: after each ResBlock; 4x4 level 2 and middle: middle only.
  assert attn == ["down_1_0_attn", "mid_attn", "up_1_0_attn", "up_1_1_attn"]
  q = p["encoder"]["mid_attn"]["attn"]["query_kernel"]
  assert q.shape == (32, 2, 16)  # [embed, heads, kv]


def test_low_res_conditioning_shapes():
  net = UNet(**dict(SMALL, num_classes=None, learn_sigma=False, low_res_channels=3))
  x, t = jnp.zeros((2, 16, 16, 3)), jnp.zeros((2,))
  out, v = jax.eval_shape(lambda: net.init_with_output(jax.random.key(0), x, t, low_res=jnp.zeros((2, 8, 8, 3))))
  assert out.shape == x.shape
  assert dnn.unbox(v)["params"]["encoder"]["conv_in"]["kernel"].shape == (3, 3, 6, 16)
  with pytest.raises(ValueError, match="low_res"):
    jax.eval_shape(net.init, jax.random.key(0), x, t)


def test_bad_resolution_raises():
  net = UNet(**dict(SMALL, channel_mult=(1, 2, 2)))
  with pytest.raises(ValueError, match=r"10x10 is not divisible by 2\*\*2 = 4.*multiples of 4"):
    jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 10, 10, 3)), jnp.zeros((1,)), jnp.zeros((1,), int))


def test_bad_groups_and_labels_raise():
  x, t = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,))
  with pytest.raises(ValueError, match="not divisible by num_groups=32"):
    jax.eval_shape(UNet(base_channels=16, channel_mult=(1, 2)).init, jax.random.key(0), x, t)
  with pytest.raises(ValueError, match="num_classes=None"):
    jax.eval_shape(UNet(**dict(SMALL, num_classes=None)).init, jax.random.key(0), x, t, jnp.zeros((1,), int))
  with pytest.raises(ValueError, match="class-conditional"):
    jax.eval_shape(UNet(**SMALL).init, jax.random.key(0), x, t)


def test_zero_output_at_init(params, apply_fn):
  # conv_out is zero-initialised (DDPM/ADM): the untrained network predicts 0.
  x, t, y = _inputs()
  assert np.all(np.asarray(apply_fn(params, x, t, y)) == 0.0)


def test_time_and_class_conditioning(params, apply_fn):
  table = params["params"]["class_embed"]["embedding"]
  assert table.shape == (K + 1, 4 * SMALL["base_channels"])  # row K is the null class
  p = perturb(params)
  x, t, y = _inputs()
  x = np.broadcast_to(np.asarray(x)[:1], x.shape)  # same image in every row
  base = np.asarray(apply_fn(p, x, jnp.full((B,), 0.5), jnp.zeros((B,), jnp.int32)))
  np.testing.assert_allclose(base[1:], np.broadcast_to(base[:1], base[1:].shape), rtol=1e-5, atol=1e-5)
  by_t = np.asarray(apply_fn(p, x, t, jnp.zeros((B,), jnp.int32)))
  by_y = np.asarray(apply_fn(p, x, jnp.full((B,), 0.5), y))  # classes 0, 1, 2 and null
  for i in range(B):
    for j in range(i):
      assert np.abs(by_t[i] - by_t[j]).max() > 1e-3, (i, j)
      assert np.abs(by_y[i] - by_y[j]).max() > 1e-3, (i, j)


def test_bf16_compute_close_to_fp32(net, params, apply_fn):
  p = perturb(params)
  x, t, y = _inputs()
  ref = np.asarray(apply_fn(p, x, t, y))
  out = jax.jit(lambda v: net.clone(dtype=jnp.bfloat16).apply(v, x, t, y))(p)
  assert out.dtype == jnp.float32
  out = np.asarray(out)
  assert np.all(np.isfinite(out))
  rel = np.sqrt(np.mean((out - ref) ** 2) / np.mean(ref ** 2))
  assert rel < BF16_REL_TOL, rel


def test_gradients_reach_every_parameter(params, loss_grad):
  flat = lambda tree: {jax.tree_util.keystr(k): np.asarray(g) for k, g in jax.tree_util.tree_leaves_with_path(tree)}
  # By design at init: conv_out is zero, so gradients stop there (only conv_out's own grads are nonzero).
  _, g0 = loss_grad(params, jax.random.key(1))
  nonzero0 = {k for k, g in flat(g0).items() if np.any(g != 0)}
  assert nonzero0 == {"['params']['conv_out']['bias']", "['params']['conv_out']['kernel']"}
  # Zero-initialised layers are two deep (conv_out, then each ResBlock's conv_1 and attention's
  # out projection): after two SGD steps every parameter receives a gradient.
  p = params
  for i in range(2):
    _, g = loss_grad(p, jax.random.key(2 + i))
    p = jax.tree.map(lambda a, b: np.asarray(a) - 0.5 * np.asarray(b), p, g)  # host-side SGD
  _, g = loss_grad(p, jax.random.key(9))
  zero = [k for k, v in flat(g).items() if not np.any(v != 0)]
  assert not zero, zero


def test_dropout_uses_the_rng(params, loss_grad):
  p = perturb(params)
  l1, _ = loss_grad(p, jax.random.key(1))
  l2, _ = loss_grad(p, jax.random.key(2))
  l3, _ = loss_grad(p, jax.random.key(1))
  assert float(l1) != float(l2) and float(l1) == float(l3)


def test_logical_axes_on_every_parameter(boxed_vars):
  leaves = jax.tree_util.tree_leaves_with_path(boxed_vars, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
  assert leaves
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), name
    names = leaf.names
    assert len(names) == leaf.value.ndim, name
    assert set(names) - {None} <= set(dnn.LOGICAL_AXES), name
    used = [n for n in names if n is not None]
    assert len(used) == len(set(used)), name  # no logical name twice in one array
    if leaf.value.size >= 64:
      assert used, name
    if name.endswith("['kernel']") and leaf.value.ndim == 4:
      assert names == (None, None, "conv_in", "conv_out"), name
