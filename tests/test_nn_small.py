"""MLP denoiser, noisy classifier, the core bridge, `build` and the logical-axis list."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusax import nn as dnn
from diffusax.nn import bridge
from diffusax.nn.classifier import NoisyClassifier
from diffusax.nn.mlp import MLPDenoiser

B, D, K = 4, 2, 3
CLS = dict(num_classes=5, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
           num_heads=2, num_groups=4)


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def mlp():
  net = MLPDenoiser(hidden=32, depth=2, num_classes=K)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(B, D)), jnp.float32)
  t, y = jnp.array([0.1, 0.4, 0.7, 1.0]), jnp.array([0, 1, 2, K])
  boxed = jax.jit(net.init)(jax.random.key(0, impl="rbg"), x, t, y)
  return net, boxed, dnn.unbox(boxed), (x, t, y)


@pytest.fixture(scope="module")
def classifier():
  net = NoisyClassifier(**CLS)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(B, 8, 8, 3)), jnp.float32)
  t = jnp.array([0.1, 0.4, 0.7, 1.0])
  params = dnn.unbox(jax.jit(net.init)(jax.random.key(0, impl="rbg"), x, t))
  return net, params, (x, t)


def test_mlp_shapes_conditioning_and_bridge(mlp):
  net, _, params, (x, t, y) = mlp
  assert params["params"]["class_embed"]["embedding"].shape == (K + 1, 32)  # null row
  denoise = jax.jit(bridge.denoiser(net, params))
  out = np.asarray(denoise(x, t, y))
  assert out.shape == (B, D) and out.dtype == np.float32
  np.testing.assert_allclose(out, np.asarray(net.apply(params, x, t, y)), rtol=1e-5, atol=1e-6)
  same_x = np.broadcast_to(np.asarray(x)[:1], x.shape)
  by_t = np.asarray(denoise(same_x, t, jnp.zeros((B,), jnp.int32)))
  by_y = np.asarray(denoise(same_x, jnp.full((B,), 0.5), y))  # classes 0, 1, 2 and null
  for i in range(B):
    for j in range(i):
      assert np.abs(by_t[i] - by_t[j]).max() > 1e-4 and np.abs(by_y[i] - by_y[j]).max() > 1e-4, (i, j)
  # A scalar t is broadcast over the batch.
  np.testing.assert_allclose(np.asarray(denoise(x, 0.5, y)), np.asarray(denoise(x, jnp.full((B,), 0.5), y)),
                             rtol=1e-6)
  sig = MLPDenoiser(hidden=32, depth=2, learn_sigma=True)
  o, _ = jax.eval_shape(sig.init_with_output, jax.random.key(0), x, t)
  assert o.shape == (B, 2 * D)
  pred, v = bridge.split_variance(jnp.zeros((B, 8, 8, 6)))
  assert pred.shape == v.shape == (B, 8, 8, 3)


def test_mlp_gradients_reach_every_parameter(mlp):
  net, _, params, (x, t, y) = mlp
  g = jax.jit(jax.grad(lambda v: jnp.mean((net.apply(v, x, t, y) - 1.0) ** 2)))(params)
  zero = [k for k, v in _flat(g).items() if not np.any(v != 0)]
  assert not zero, zero  # no zero-initialised layers here: every gradient is nonzero at init


def test_classifier_logits_guidance_and_gradients(classifier):
  net, params, (x, t) = classifier
  labels = jnp.array([0, 1, 2, 4])

  def total(p, xx, tt):
    return jnp.sum(bridge.classifier_log_prob(net, p)(xx, tt, labels))

  step = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))
  # Zero-initialised head: uniform predictions at init, log p = -log 5.
  lp0, (g0, _) = step(params, x, t)
  np.testing.assert_allclose(float(lp0), B * -np.log(5.0), rtol=1e-5)
  p = params
  for _ in range(2):  # ascend log p; zero-init layers (head, ResBlock conv_1) are two deep
    _, (g, _) = step(p, x, t)
    p = jax.tree.map(lambda a, b: np.asarray(a) + 0.05 * np.asarray(b), p, g)
  lp, (g, gx) = step(p, x, t)
  assert float(lp) > float(lp0)
  zero = [k for k, v in _flat(g).items() if not np.any(v != 0)]
  assert not zero, zero
  assert gx.shape == x.shape and np.all(np.isfinite(np.asarray(gx))) and np.any(np.asarray(gx) != 0)
  lp_rev, _ = step(p, x, t[::-1])
  assert abs(float(lp_rev) - float(lp)) > 1e-6  # t matters
  assert net.apply(p, x, t).shape == (B, 5)


def test_classifier_bad_resolution():
  with pytest.raises(ValueError, match="NoisyClassifier: input resolution 9x9"):
    jax.eval_shape(NoisyClassifier(**CLS).init, jax.random.key(0), jnp.zeros((1, 9, 9, 3)), jnp.zeros((1,)))


def test_mlp_logical_axes(mlp):
  _, boxed, _, _ = mlp
  for path, leaf in jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned)):
    assert isinstance(leaf, nn.LogicallyPartitioned) and len(leaf.names) == leaf.value.ndim, path
  spec = dnn.logical_spec(boxed)
  assert spec["params"]["block_0_0"]["kernel"] == jax.sharding.PartitionSpec("embed", "mlp")
  assert spec["params"]["class_embed"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")


def test_logical_axes_can_be_mapped_to_a_mesh():
  # The shape of what the sharding rules (another module) do: logical names -> mesh axes.
  net = dnn.UNet(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_groups=8)
  boxed = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)))
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("embed", "data"), ("conv_in", "data"), ("conv_out", "model"), ("mlp", "model"),
           ("heads", "model"), ("kv", None), ("vocab", None), ("norm", None))
  shardings = nn.logical_to_mesh_sharding(dnn.logical_spec(boxed), mesh, rules)
  k = shardings["params"]["encoder"]["conv_in"]["kernel"]
  assert k.spec == jax.sharding.PartitionSpec(None, None, "data", "model")


def test_build_and_registry():
  assert set(dnn.NETWORKS) == {"unet", "dit", "mlp"}
  assert isinstance(dnn.build("mlp", hidden=8), MLPDenoiser)
  with pytest.raises(ValueError, match=r"unknown network 'vit'; allowed: \['dit', 'mlp', 'unet'\]"):
    dnn.build("vit")
  with pytest.raises(ValueError, match=r"unknown unet option\(s\) \['chanels'\]; allowed: .*base_channels"):
    dnn.build("unet", chanels=3)
  assert set(dnn.LOGICAL_AXES_DOC) == set(dnn.LOGICAL_AXES) >= {"embed", "mlp", "heads", "kv", "conv_in",
                                                                 "conv_out", "vocab", "norm"}


def test_unknown_time_embedding():
  with pytest.raises(ValueError, match=r"unknown time_embedding 'gauss'; allowed: \['sinusoidal', 'fourier'\]"):
    jax.eval_shape(MLPDenoiser(hidden=8, time_embedding="gauss").init, jax.random.key(0), jnp.zeros((1, 2)),
                   jnp.zeros((1,)))
