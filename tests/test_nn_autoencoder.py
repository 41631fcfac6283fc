"""KL autoencoder (diffusax.nn.autoencoder), PatchGAN discriminator and the diffusers weights loader.

* shapes of encode / decode / decode_features for f = 2, 4, 8 (tiny widths, 16x16 images; one compile
  per network for all of them), last_layer(decode_features) == decode, logvar clipping, shape and
  option errors, logical axis names on every parameter;
* float64 numpy references, written from the formulas, of ResnetBlock2D, the mid attention and the
  down/up samplers (asymmetric padding), on random parameters;
* the loader on a hand-written list of diffusers keys and torch shapes for a tiny config, a Flax ->
  torch-layout round trip, deprecated attention names, the errors, and .npz / .safetensors / folder files;
* parity with diffusers' PyTorch AutoencoderKL on random weights (f = 8): needs torch and diffusers
  importable (not project requirements), skipped otherwise. Run with e.g.
      /work/venv_torch/bin/python -m pytest -n 0 tests/test_nn_autoencoder.py -k diffusers -s
"""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from diffusax import nn as dnn
from diffusax.nn import autoencoder as ae
from diffusax.nn import autoencoder_weights as aw
from diffusax.nn.discriminator import PatchDiscriminator, groups_for

B, H = 2, 16
CONFIGS = {2: (8, 16), 4: (8, 16, 16), 8: (8, 16, 16, 16)}
KEY = jax.random.key(0, impl="rbg")  # rbg initialisers compile in a fraction of threefry's time on XLA:CPU


def _net(f, **kw):
  return ae.AutoencoderKL(block_out_channels=CONFIGS[f], norm_groups=4, **kw)


def _image(seed=0, size=H):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (B, size, size, 3)), jnp.float32)


def _flat(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dnn.unbox(tree)).items()}


def perturb(params, seed=1):
  """Host-side noise on every leaf: norms' scale 1 + 0.2 N, vectors 0.2 N, kernels He-scaled."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, p in traverse_util.flatten_dict(dnn.unbox(params)).items():  # arrays or ShapeDtypeStructs
    if p.ndim == 1:
      out[path] = (float(path[-1] == "scale") + 0.2 * rng.standard_normal(p.shape)).astype(np.float32)
    else:
      fan_in = int(np.prod(p.shape[:-1]))
      out[path] = (rng.standard_normal(p.shape) / np.sqrt(fan_in)).astype(np.float32)
  return traverse_util.unflatten_dict(out)


# --------------------------------------------------------------------------------------------------
# the autoencoder: shapes of every network abstractly, values of one (compiled once)


def _outputs(net, params, x, key):
  mean, logvar = net.apply({"params": params}, x, method=net.encode)
  feats = net.apply({"params": params}, mean, method=net.decode_features)
  x_rec, mean_again, _ = net.apply({"params": params}, x, key)
  return dict(mean=mean, logvar=logvar, feats=feats, last=ae.last_layer(params, feats),
              dec=net.apply({"params": params}, mean, method=net.decode), sampled=x_rec, mean_again=mean_again)


@pytest.mark.parametrize("f", sorted(CONFIGS))
def test_shapes(f):
  net = _net(f)
  assert net.factor == f and net.latent_shape((H, H)) == (H // f, H // f, 4)
  assert net.latent_shape((B, H, 2 * H, 3)) == (H // f, 2 * H // f, 4)
  boxed = jax.eval_shape(lambda: net.init(KEY, _image()))
  out = jax.eval_shape(lambda p: _outputs(net, p, _image(), jax.random.key(1)), dnn.unbox(boxed)["params"])
  assert out["mean"].shape == out["logvar"].shape == (B, H // f, H // f, 4)
  assert out["dec"].shape == out["sampled"].shape == out["last"].shape == (B, H, H, 3)
  assert out["feats"].shape == (B, H, H, 8)
  assert {a.dtype for a in jax.tree.leaves(out)} == {np.dtype(np.float32)}
  _check_boxed(boxed)
  bf16 = _net(f, dtype=jnp.bfloat16)  # bf16 compute, float32 params and outputs
  out = jax.eval_shape(lambda p: _outputs(bf16, p, _image(), jax.random.key(1)), dnn.unbox(boxed)["params"])
  assert {a.dtype for a in jax.tree.leaves(out)} == {np.dtype(np.float32)}


@pytest.fixture(scope="module")
def run():
  net = _net(4)
  params = perturb(jax.eval_shape(lambda: net.init(KEY, _image()))["params"])
  fn = jax.jit(lambda p, x, k: _outputs(net, p, x, k))
  return dict(net=net, params=params, fn=fn, out=jax.device_get(fn(params, _image(), jax.random.key(1))))


def test_last_layer_and_sampling(run):
  out = run["out"]
  np.testing.assert_allclose(out["last"], out["dec"], rtol=0, atol=1e-5 * np.abs(out["dec"]).max())
  np.testing.assert_array_equal(out["mean_again"], out["mean"])
  assert np.abs(out["sampled"] - out["dec"]).max() > 1e-3  # a sample differs from the mean's decoding
  assert ae.LAST_LAYER in traverse_util.flatten_dict(run["params"])
  net, params = run["net"], run["params"]  # __call__ without a key decodes the mean
  x_rec = jax.jit(lambda p, x: net.apply({"params": p}, x)[0])(params, _image())
  np.testing.assert_allclose(x_rec, out["dec"], rtol=0, atol=1e-6 * np.abs(out["dec"]).max())


def test_logvar_clipped(run):
  params = _flat(run["params"])
  for bias, want in ((1e4, 20.0), (-1e4, -30.0)):
    p = dict(params)
    p[("quant_conv", "bias")] = np.concatenate([np.zeros(4), np.full(4, bias)]).astype(np.float32)
    out = run["fn"](traverse_util.unflatten_dict(p), _image(), jax.random.key(1))  # same shapes: no recompile
    np.testing.assert_array_equal(np.asarray(out["logvar"]), want)
    assert np.all(np.isfinite(np.asarray(out["sampled"])))
  assert run["fn"]._cache_size() == 1


def _check_boxed(boxed):
  leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
  assert leaves
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), name
    assert len(leaf.names) == leaf.value.ndim, name
    assert set(leaf.names) - {None} <= set(dnn.LOGICAL_AXES), name
    assert any(n is not None for n in leaf.names), name


def test_shape_and_option_errors():
  net = _net(8)
  abstract = lambda x: jax.eval_shape(lambda: net.init(KEY, x))  # noqa: E731
  with pytest.raises(dnn.InputShapeError, match="not divisible by the downsampling factor f = 8"):
    abstract(jnp.zeros((1, 12, 12, 3)))
  with pytest.raises(dnn.InputShapeError, match="12x16"):
    net.latent_shape((1, 12, 16, 3))
  assert net.latent_shape((1, 32, 24, 3)) == (4, 3, 4)
  with pytest.raises(dnn.InputShapeError, match=r"\[B, H, W, 3\]"):
    abstract(jnp.zeros((1, 16, 16, 1)))
  variables = abstract(jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(dnn.InputShapeError, match=r"\[B, h, w, 4\]"):
    jax.eval_shape(lambda v: net.apply(v, jnp.zeros((1, 2, 2, 3)), method=net.decode), variables)
  with pytest.raises(dnn.OptionError, match="not divisible by num_groups=3"):
    jax.eval_shape(lambda: ae.AutoencoderKL(block_out_channels=(6, 8), norm_groups=3).init(KEY, jnp.zeros((1, 8, 8, 3))))
  with pytest.raises(dnn.OptionError, match="logvar_clip"):
    _net(2, logvar_clip=(1.0, -1.0)).check_options()


# --------------------------------------------------------------------------------------------------
# float64 references from the formulas


def np_group_norm(x, scale, bias, groups, eps=1e-6):
  b, hh, ww, c = x.shape
  g = x.reshape(b, hh, ww, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def np_conv(x, kernel, bias, stride=1, pad=((1, 1), (1, 1))):
  """out[b, i, j, o] = bias[o] + sum_{dy, dx, c} x_pad[b, s i + dy, s j + dx, c] kernel[dy, dx, c, o]."""
  xp = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
  kh, kw = kernel.shape[:2]
  ho, wo = (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1
  out = np.zeros(x.shape[:1] + (ho, wo, kernel.shape[-1])) + bias
  for dy in range(kh):
    for dx in range(kw):
      patch = xp[:, dy:dy + stride * (ho - 1) + 1:stride, dx:dx + stride * (wo - 1) + 1:stride]
      out += patch @ kernel[dy, dx]
  return out


def silu(x):
  return x / (1.0 + np.exp(-x))


def _params64(params):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def _rel(got, want):
  return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def test_resnet_block_reference():
  x = np.random.default_rng(2).standard_normal((2, 6, 6, 8))
  block = ae.ResnetBlock2D(16, norm_groups=4)
  params = perturb(block.init(KEY, jnp.zeros((1, 6, 6, 8)))["params"], seed=3)
  got = block.apply({"params": params}, jnp.asarray(x, jnp.float32))
  p = _params64(params)
  h = np_conv(silu(np_group_norm(x, p["norm1"]["scale"], p["norm1"]["bias"], 4)), **p["conv1"])
  h = np_conv(silu(np_group_norm(h, p["norm2"]["scale"], p["norm2"]["bias"], 4)), **p["conv2"])
  want = np_conv(x, **p["conv_shortcut"], pad=((0, 0), (0, 0))) + h
  assert _rel(got, want) < 2e-5


def test_attention_reference():
  x = np.random.default_rng(4).standard_normal((2, 4, 4, 16))
  attn = ae.Attention(norm_groups=4)
  params = perturb(attn.init(KEY, jnp.zeros((1, 4, 4, 16)))["params"], seed=5)
  got = attn.apply({"params": params}, jnp.asarray(x, jnp.float32))
  p = _params64(params)
  h = np_group_norm(x, p["group_norm"]["scale"], p["group_norm"]["bias"], 4).reshape(2, 16, 16)
  q, k, v = (h @ p[n]["kernel"] + p[n]["bias"] for n in ("to_q", "to_k", "to_v"))
  logits = q @ k.transpose(0, 2, 1) / np.sqrt(16.0)
  a = np.exp(logits - logits.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  want = x + ((a @ v) @ p["to_out_0"]["kernel"] + p["to_out_0"]["bias"]).reshape(x.shape)
  assert _rel(got, want) < 2e-5


def test_resampling_reference():
  x = np.random.default_rng(6).standard_normal((2, 6, 6, 8))
  for mod, ref in ((ae.Downsample2D(), lambda x, p: np_conv(x, **p["conv"], stride=2, pad=((0, 1), (0, 1)))),
                   (ae.Upsample2D(), lambda x, p: np_conv(x.repeat(2, 1).repeat(2, 2), **p["conv"]))):
    params = perturb(mod.init(KEY, jnp.zeros((1, 6, 6, 8)))["params"], seed=7)
    got = mod.apply({"params": params}, jnp.asarray(x, jnp.float32))
    want = ref(x, _params64(params))
    assert got.shape == want.shape
    assert _rel(got, want) < 2e-5


# --------------------------------------------------------------------------------------------------
# discriminator


def test_discriminator():
  d = PatchDiscriminator(base_channels=8, num_layers=3)
  x = _image(size=32)
  boxed = jax.jit(d.init)(KEY, x)
  _check_boxed(boxed)
  out = jax.jit(d.apply)(boxed, x)
  assert out.shape == (B, 2, 2, 1) and out.dtype == jnp.float32  # 32 -> 16 -> 8 -> 4 -> 3 -> 2
  names = set(dnn.unbox(boxed)["params"])
  assert names == {"conv_0", "conv_1", "conv_2", "conv_3", "conv_out", "norm_1", "norm_2", "norm_3"}
  assert set(dnn.unbox(jax.eval_shape(lambda: PatchDiscriminator(8, 2, "none").init(KEY, x)))["params"]) == {
      "conv_0", "conv_1", "conv_2", "conv_out"}
  assert jax.eval_shape(lambda: d.apply(boxed, jnp.zeros((1, 24, 40, 3)))).shape == (1, 1, 3, 1)
  with pytest.raises(dnn.InputShapeError, match="at least 3 \\* 2\\*\\*3 = 24"):
    jax.eval_shape(lambda: d.apply(boxed, jnp.zeros((1, 16, 32, 3))))
  with pytest.raises(dnn.OptionError, match="allowed: \\['group', 'none'\\]"):
    jax.eval_shape(lambda: PatchDiscriminator(norm="batch").init(KEY, x))
  assert [groups_for(c) for c in (8, 24, 64, 96, 7)] == [8, 24, 32, 32, 7]


# --------------------------------------------------------------------------------------------------
# loader

# The diffusers AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
# norm_num_groups=4) state dict, written out by hand: each line is a module with a .weight of the given
# torch shape and a .bias of [shape[0]].
TINY = dict(block_out_channels=(8, 16), layers_per_block=1, z_channels=4, norm_groups=4)
TINY_KEYS = """
encoder.conv_in 8,3,3,3
encoder.down_blocks.0.resnets.0.norm1 8
encoder.down_blocks.0.resnets.0.conv1 8,8,3,3
encoder.down_blocks.0.resnets.0.norm2 8
encoder.down_blocks.0.resnets.0.conv2 8,8,3,3
encoder.down_blocks.0.downsamplers.0.conv 8,8,3,3
encoder.down_blocks.1.resnets.0.norm1 8
encoder.down_blocks.1.resnets.0.conv1 16,8,3,3
encoder.down_blocks.1.resnets.0.norm2 16
encoder.down_blocks.1.resnets.0.conv2 16,16,3,3
encoder.down_blocks.1.resnets.0.conv_shortcut 16,8,1,1
encoder.mid_block.resnets.0.norm1 16
encoder.mid_block.resnets.0.conv1 16,16,3,3
encoder.mid_block.resnets.0.norm2 16
encoder.mid_block.resnets.0.conv2 16,16,3,3
encoder.mid_block.attentions.0.group_norm 16
encoder.mid_block.attentions.0.to_q 16,16
encoder.mid_block.attentions.0.to_k 16,16
encoder.mid_block.attentions.0.to_v 16,16
encoder.mid_block.attentions.0.to_out.0 16,16
encoder.mid_block.resnets.1.norm1 16
encoder.mid_block.resnets.1.conv1 16,16,3,3
encoder.mid_block.resnets.1.norm2 16
encoder.mid_block.resnets.1.conv2 16,16,3,3
encoder.conv_norm_out 16
encoder.conv_out 8,16,3,3
quant_conv 8,8,1,1
post_quant_conv 4,4,1,1
decoder.conv_in 16,4,3,3
decoder.mid_block.resnets.0.norm1 16
decoder.mid_block.resnets.0.conv1 16,16,3,3
decoder.mid_block.resnets.0.norm2 16
decoder.mid_block.resnets.0.conv2 16,16,3,3
decoder.mid_block.attentions.0.group_norm 16
decoder.mid_block.attentions.0.to_q 16,16
decoder.mid_block.attentions.0.to_k 16,16
decoder.mid_block.attentions.0.to_v 16,16
decoder.mid_block.attentions.0.to_out.0 16,16
decoder.mid_block.resnets.1.norm1 16
decoder.mid_block.resnets.1.conv1 16,16,3,3
decoder.mid_block.resnets.1.norm2 16
decoder.mid_block.resnets.1.conv2 16,16,3,3
decoder.up_blocks.0.resnets.0.norm1 16
decoder.up_blocks.0.resnets.0.conv1 16,16,3,3
decoder.up_blocks.0.resnets.0.norm2 16
decoder.up_blocks.0.resnets.0.conv2 16,16,3,3
decoder.up_blocks.0.resnets.1.norm1 16
decoder.up_blocks.0.resnets.1.conv1 16,16,3,3
decoder.up_blocks.0.resnets.1.norm2 16
decoder.up_blocks.0.resnets.1.conv2 16,16,3,3
decoder.up_blocks.0.upsamplers.0.conv 16,16,3,3
decoder.up_blocks.1.resnets.0.norm1 16
decoder.up_blocks.1.resnets.0.conv1 8,16,3,3
decoder.up_blocks.1.resnets.0.norm2 8
decoder.up_blocks.1.resnets.0.conv2 8,8,3,3
decoder.up_blocks.1.resnets.0.conv_shortcut 8,16,1,1
decoder.up_blocks.1.resnets.1.norm1 8
decoder.up_blocks.1.resnets.1.conv1 8,8,3,3
decoder.up_blocks.1.resnets.1.norm2 8
decoder.up_blocks.1.resnets.1.conv2 8,8,3,3
decoder.conv_norm_out 8
decoder.conv_out 3,8,3,3
"""


def tiny_shapes() -> dict[str, tuple[int, ...]]:
  out = {}
  for line in TINY_KEYS.strip().splitlines():
    name, shape = line.split()
    shape = tuple(int(s) for s in shape.split(","))
    out[f"{name}.weight"], out[f"{name}.bias"] = shape, shape[:1]
  return out


def tiny_state_dict(seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in tiny_shapes().items()}


def to_torch_layout(params):
  """Flax params -> {diffusers key: torch-layout array}, written here for the round trip only."""
  out = {}
  for path, a in _flat(params).items():
    parts = []
    for p in path[:-1]:
      head, _, tail = p.rpartition("_")
      parts += [head, tail] if tail.isdigit() else [p]
    a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
    out[".".join(parts + ["bias" if path[-1] == "bias" else "weight"])] = np.ascontiguousarray(a)
  return out


@pytest.fixture(scope="module")
def tiny():
  net = ae.AutoencoderKL(**TINY)
  return net, dnn.unbox(jax.eval_shape(lambda: net.init(KEY, jnp.zeros((1, 2, 2, 3))))["params"])


def test_hand_written_keys_load(tiny):
  net, shapes = tiny
  sd = tiny_state_dict()
  assert len(sd) == len(jax.tree.leaves(shapes)) == 124
  params = aw.params_from_diffusers(sd, net)
  assert jax.tree.structure(params) == jax.tree.structure(shapes)
  assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, shapes)
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(params))
  e, d = params["encoder"], params["decoder"]
  np.testing.assert_array_equal(e["conv_in"]["kernel"], sd["encoder.conv_in.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(d["up_blocks_1"]["resnets_0"]["conv_shortcut"]["kernel"][0, 0],
                                sd["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(e["mid_block"]["attentions_0"]["to_out_0"]["kernel"],
                                sd["encoder.mid_block.attentions.0.to_out.0.weight"].T)
  np.testing.assert_array_equal(d["mid_block"]["attentions_0"]["group_norm"]["scale"],
                                sd["decoder.mid_block.attentions.0.group_norm.weight"])
  np.testing.assert_array_equal(params["quant_conv"]["bias"], sd["quant_conv.bias"])
  np.testing.assert_array_equal(d["up_blocks_0"]["upsamplers_0"]["conv"]["kernel"],
                                sd["decoder.up_blocks.0.upsamplers.0.conv.weight"].transpose(2, 3, 1, 0))
  assert set(aw.expected_keys(net)) == set(sd)


def test_round_trip_and_deprecated_names(tiny):
  net, _ = tiny
  params = perturb(jax.eval_shape(lambda: net.init(KEY, jnp.zeros((1, 2, 2, 3))))["params"])
  sd = to_torch_layout(params)
  assert {k: v.shape for k, v in sd.items()} == tiny_shapes()
  back = aw.params_from_diffusers(sd, net)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
  old = {}
  for k, v in sd.items():  # diffusers < 0.14 attention names, 1x1-conv-shaped weights
    for new, dep in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
      if f".attentions.0.{new}." in k:
        k = k.replace(f".{new}.", f".{dep}.")
        v = v[:, :, None, None] if v.ndim == 2 else v
    old[k] = v
  assert "decoder.mid_block.attentions.0.proj_attn.weight" in old
  jax.tree.map(np.testing.assert_array_equal, aw.params_from_diffusers(old, net), back)
  with pytest.raises(ValueError, match="twice"):
    aw.params_from_diffusers({**old, "encoder.mid_block.attentions.0.to_q.bias": sd["encoder.mid_block.attentions.0.to_q.bias"]}, net)


def test_loader_errors(tiny):
  net, _ = tiny
  sd = tiny_state_dict()
  del sd["decoder.conv_out.bias"]
  sd["decoder.conv_out.weight"] = np.zeros((3, 8, 1, 1), np.float32)
  sd["encoder.mid_block.attentions.0.to_q.weight"] = np.zeros((16, 8), np.float32)
  sd["extra.weight"] = sd["extra.bias"] = np.zeros(2, np.float32)
  with pytest.raises(ValueError) as e:
    aw.params_from_diffusers(sd, net)
  msg = str(e.value)
  assert "1 missing keys (decoder.conv_out.bias)" in msg
  assert "2 unexpected keys (extra.bias, extra.weight)" in msg
  assert "decoder.conv_out.weight: expected shape (3, 8, 3, 3) (torch layout), got (3, 8, 1, 1)" in msg
  assert "encoder.mid_block.attentions.0.to_q.weight: expected shape (16, 16)" in msg
  ldm = {"first_stage_model." + k: v for k, v in tiny_state_dict().items()}
  with pytest.raises(ValueError, match="124 missing keys .*124 unexpected keys .*first_stage_model"):
    aw.params_from_diffusers(ldm, net)
  # a wrong norm_groups does not change any shape; a folder's config catches it (test_loader_files)
  with pytest.raises(ValueError, match="1 mismatched tensors"):
    aw.params_from_diffusers({**tiny_state_dict(), "quant_conv.bias": np.zeros(8, np.int64)}, net)


def test_diffusers_config():
  cfg = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0", "block_out_channels": [128, 256, 512, 512],
         "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
         "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
         "act_fn": "silu", "sample_size": 512, "scaling_factor": 0.18215, "force_upcast": True}
  net = aw.module_from_diffusers_config(cfg)
  assert (net.block_out_channels, net.layers_per_block, net.z_channels, net.norm_groups, net.mid_attention) == (
      (128, 256, 512, 512), 2, 4, 32, True)
  assert net.factor == 8 and net.latent_shape((512, 512)) == (64, 64, 4)
  assert aw.module_from_diffusers_config(cfg, dtype=jnp.bfloat16).dtype == jnp.bfloat16
  bad = [({"use_quant_conv": False}, "use_quant_conv=False"),
         ({"use_post_quant_conv": False}, "use_post_quant_conv=False"),
         ({"down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]}, "down_block_types"),
         ({"up_block_types": ["UpDecoderBlock2D"] * 3}, "up_block_types"),
         ({"act_fn": "gelu"}, "act_fn"), ({"_class_name": "AutoencoderTiny"}, "AutoencoderTiny"),
         ({"norm_type": "spatial"}, "norm_type")]
  for change, match in bad:
    with pytest.raises(ValueError, match=match):
      aw.module_from_diffusers_config({**cfg, **change})


def test_loader_files(tiny, tmp_path):
  pytest.importorskip("safetensors")
  from safetensors.numpy import save_file
  net, _ = tiny
  sd = tiny_state_dict()
  want = aw.params_from_diffusers(sd, net)
  np.savez(tmp_path / "vae.npz", **sd)  # the torch-free reader takes .npz as well as torch.save files
  save_file(sd, str(tmp_path / "vae.safetensors"))
  folder = tmp_path / "pipeline" / "vae"
  folder.mkdir(parents=True)
  save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
  cfg = {"_class_name": "AutoencoderKL", "block_out_channels": [8, 16], "layers_per_block": 1,
         "norm_num_groups": 4, "down_block_types": ["DownEncoderBlock2D"] * 2,
         "up_block_types": ["UpDecoderBlock2D"] * 2}
  (folder / "config.json").write_text(json.dumps(cfg))
  for path in ("vae.npz", "vae.safetensors", "pipeline/vae", "pipeline"):
    jax.tree.map(np.testing.assert_array_equal, aw.load_diffusers(str(tmp_path / path), net), want)
  assert aw.module_from_diffusers_config(aw.diffusers_config(str(tmp_path / "pipeline"))) == net
  with pytest.raises(ValueError, match="norm_groups: config 4, module 8"):
    aw.load_diffusers(str(folder), ae.AutoencoderKL(**{**TINY, "norm_groups": 8}))
  with pytest.raises(FileNotFoundError):
    aw.load_diffusers(str(tmp_path / "nothing"), net)
  (tmp_path / "junk.ckpt").write_bytes(b"not a pickle")
  with pytest.raises(ValueError, match="first_stage_model"):
    aw.load_diffusers(str(tmp_path / "junk.ckpt"), net)


# --------------------------------------------------------------------------------------------------
# parity with diffusers (PyTorch), random weights, f = 8

PARITY = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8)


def test_hand_written_keys_match_diffusers():
  pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
  assert {k: tuple(v.shape) for k, v in vae.state_dict().items()} == tiny_shapes()


def test_parity_with_diffusers(tmp_path):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                sample_size=32, **PARITY).eval()
  with torch.no_grad():  # norms away from the identity so their mapping is tested too
    for name, p in vae.named_parameters():
      if p.ndim == 1:
        p.copy_((1.0 if name.endswith("weight") and "norm" in name else 0.0) + 0.2 * torch.randn_like(p))
  torch.save(vae.state_dict(), tmp_path / "vae.pt")
  vae.save_pretrained(tmp_path / "vae")  # config.json + diffusion_pytorch_model.safetensors
  net = aw.module_from_diffusers_config(aw.diffusers_config(str(tmp_path / "vae")))
  assert net == ae.AutoencoderKL(block_out_channels=(32, 32, 64, 64), layers_per_block=1, z_channels=4, norm_groups=8)
  params = aw.load_diffusers(str(tmp_path / "vae.pt"), net)
  jax.tree.map(np.testing.assert_array_equal, aw.load_diffusers(str(tmp_path / "vae"), net), params)

  x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32))
  with torch.no_grad():
    ref = vae.double()
    dist = ref.encode(torch.from_numpy(x)).latent_dist
    mean, logvar = dist.mean.numpy(), dist.logvar.numpy()
    dec = ref.decode(dist.mean).sample.numpy()
  enc = jax.jit(lambda p, x: net.apply({"params": p}, x, method=net.encode))
  got_mean, got_logvar = enc(params, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32))
  got_dec = jax.jit(lambda p, z: net.apply({"params": p}, z, method=net.decode))(
      params, jnp.asarray(mean.transpose(0, 2, 3, 1), jnp.float32))
  errs = {"mean": _rel(np.asarray(got_mean).transpose(0, 3, 1, 2), mean),
          "logvar": _rel(np.asarray(got_logvar).transpose(0, 3, 1, 2), logvar),
          "decode": _rel(np.asarray(got_dec).transpose(0, 3, 1, 2), dec)}
  print("parity with diffusers (max abs error / max abs reference, float32 JAX vs float64 torch):", errs)
  assert max(errs.values()) < 1e-4, errs
