"""The image condition of a `core.conditioning.Cond` in the U-Net and DiT: low_res, aug_level,
has_image, and the bridge that hands a Cond to them.

References, none produced by the code under test: parameter-tree digests recorded from the
label-only networks at commit 47425d3 (before aug_embed / cond_dropout existed); a hand-written
half-pixel bilinear upsampler in numpy; direct `module.apply` calls for the bridge; a Python trace
counter for jit. Parameters are host-side Gaussian draws in the init's shapes (no init compile, and
the zero-initialised output layers are nonzero, so every input reaches the output).
"""
import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusax import nn as dnn
from diffusax.core.conditioning import Cond
from diffusax.nn import bridge
from diffusax.nn.dit import DiT
from diffusax.nn.unet import UNet

B, H, C, LR, K = 2, 8, 3, 3, 3  # batch, resolution, channels of x, of the image condition, classes
NETS = {
    "unet": (UNet, dict(base_channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4,
                        num_classes=K)),
    "dit": (DiT, dict(patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=K, frequency_dim=16)),
}
NAME = {"unet": "UNet", "dit": "DiT"}
FIRST = {"unet": "encoder/conv_in/kernel", "dit": "x_embedder/kernel"}  # the layer that sees the input channels
TIME, AUG = {"unet": "time_embed", "dit": "t_embedder"}, {"unet": "aug_embed", "dit": "aug_embedder"}
ALL_ON = dict(low_res_channels=LR, aug_embed=True, cond_dropout=True)

# (leaves, parameters, sha256[:16] of the sorted "path shape" lines) of the configs above at commit 47425d3.
RECORDED = {
    ("unet", 0): (75, 12331, "c600871b12aaa508"),
    ("unet", LR): (75, 12547, "c1c549eaec6a5e11"),  # the super-resolution layout that existed then
    ("dit", 0): (25, 6412, "0657b687155944e6"),
}


def make(kind, **options):
  cls, base = NETS[kind]
  return cls(**base, **options)


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, H, H, C)).astype(np.float32)
  t = np.array([0.3, 0.8], np.float32)
  y = np.array([0, K], np.int32)  # includes the null class
  low = rng.normal(size=(B, H // 2, H // 2, LR)).astype(np.float32)
  aug = np.array([0.0, 0.4], np.float32)
  return x, t, y, low, aug


def shapes(net, **kwargs):
  """{path: shape} of the params of net.init(x, t, y, **kwargs), abstractly."""
  x, t, y, _, _ = inputs()
  v = dnn.unbox(jax.eval_shape(net.init, jax.random.key(0), x, t, y, **kwargs))["params"]
  return {"/".join(k.key for k in p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(v)[0]}


def host_params(net, seed=1, **kwargs):
  """{"params": Gaussian draws in the init's shapes}: std 0.5 / sqrt(fan_in) for kernels, 0.1 for
  biases, 1 + 0.1 N(0, 1) for norm scales."""
  rng = np.random.default_rng(seed)
  x, t, y, _, _ = inputs()
  abstract = dnn.unbox(jax.eval_shape(net.init, jax.random.key(0), x, t, y, **kwargs))

  def one(path, a):
    if a.ndim >= 2:
      return (rng.normal(size=a.shape) * 0.5 / math.sqrt(max(1, a.size // a.shape[-1]))).astype(np.float32)
    base = 1.0 if path[-1].key == "scale" else 0.0
    return (base + 0.1 * rng.normal(size=a.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(one, abstract)


def image_parts():
  _, _, _, low, aug = inputs()
  return dict(low_res=low, aug_level=aug, has_image=np.ones((B,), np.float32))


@pytest.fixture(scope="module", params=list(NETS))
def full(request):
  """(kind, net with every option on, variables, jitted apply(v, x, t, y, low_res, aug_level, has_image))."""
  kind = request.param
  net = make(kind, **ALL_ON)
  variables = host_params(net, **image_parts())
  apply = jax.jit(lambda v, x, t, y, low, aug, has: net.apply(v, x, t, y, low_res=low, aug_level=aug, has_image=has))
  return kind, net, variables, apply


# --- parameters -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,low_res_channels", list(RECORDED))
def test_label_only_parameters_unchanged(kind, low_res_channels):
  kwargs = dict(low_res=inputs()[3]) if low_res_channels else {}
  for net in (make(kind, low_res_channels=low_res_channels),
              make(kind, low_res_channels=low_res_channels, aug_embed=False, cond_dropout=False)):
    tree = shapes(net, **kwargs)
    digest = hashlib.sha256("\n".join(f"{k} {tree[k]}" for k in sorted(tree)).encode()).hexdigest()[:16]
    assert (len(tree), sum(math.prod(s) for s in tree.values()), digest) == RECORDED[kind, low_res_channels], tree


@pytest.mark.parametrize("kind", list(NETS))
@pytest.mark.parametrize("cond_dropout", [False, True])
def test_input_channels_and_aug_parameters(kind, cond_dropout):
  x, t, y, low, aug = inputs()
  base = shapes(make(kind))
  kwargs = dict(low_res=low, has_image=np.ones((B,), np.float32) if cond_dropout else None)
  tree = shapes(make(kind, low_res_channels=LR, cond_dropout=cond_dropout), **kwargs)
  assert tree[FIRST[kind]][2] == C + LR + int(cond_dropout)  # kernel [kh, kw, C_in, C_out]
  assert {k: v for k, v in tree.items() if k != FIRST[kind]} == {k: v for k, v in base.items() if k != FIRST[kind]}
  with_aug = shapes(make(kind, low_res_channels=LR, cond_dropout=cond_dropout, aug_embed=True), aug_level=aug, **kwargs)
  extra = {k: v for k, v in with_aug.items() if k not in tree}
  assert set(with_aug) - set(extra) == set(tree)
  # The augmentation embedding has the time embedding's shapes, under its own name.
  assert extra == {k.replace(TIME[kind], AUG[kind], 1): v for k, v in tree.items() if k.startswith(TIME[kind] + "/")}


# --- the condition reaches the output ---------------------------------------------------------------

def test_each_part_changes_the_output(full):
  kind, net, v, apply = full
  x, t, y, low, aug = inputs()
  ones, zeros = np.ones((B,), np.float32), np.zeros((B,), np.float32)
  out = np.asarray(apply(v, x, t, y, low, aug, ones))
  assert out.shape == (B, H, H, C) and np.all(np.isfinite(out))  # C_out is C, not C + LR + 1
  other_low = inputs(seed=7)[3]
  for name, changed in [("image", apply(v, x, t, y, other_low, aug, ones)),
                        ("aug_level", apply(v, x, t, y, low, aug + 0.3, ones)),
                        ("has_image", apply(v, x, t, y, low, aug, zeros))]:
    per_example = np.abs(np.asarray(changed) - out).reshape(B, -1).max(axis=1)
    assert np.all(per_example > 1e-3), (name, per_example)


def bilinear_upsample(img, size):
  """Reference: separable bilinear resize with half-pixel centres, src = (j + 0.5) n_in / n_out - 0.5,
  clamped at the edges (what an antialiasing-free triangle kernel gives when enlarging)."""

  def along(a, axis, n_out):
    n_in = a.shape[axis]
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    f = (src - i0).reshape([-1 if d == axis else 1 for d in range(a.ndim)])
    return (1 - f) * np.take(a, i0, axis=axis) + f * np.take(a, i1, axis=axis)

  return along(along(np.asarray(img, np.float64), 1, size), 2, size).astype(np.float32)


def test_image_is_resized_bilinearly(full):
  kind, net, v, apply = full
  x, t, y, low, aug = inputs()
  up = bilinear_upsample(low, H)
  np.testing.assert_allclose(np.asarray(jax.image.resize(low, (B, H, H, LR), "bilinear")), up, atol=1e-6)
  ones = np.ones((B,), np.float32)
  # An image already at H x W is not resized, so the network's own resize is the reference's.
  np.testing.assert_allclose(np.asarray(apply(v, x, t, y, low, aug, ones)),
                             np.asarray(apply(v, x, t, y, up, aug, ones)), atol=2e-5, rtol=1e-5)


# --- refusals ---------------------------------------------------------------------------------------

def _low():
  return inputs()[3]


REFUSALS = [  # (options, call kwargs, message regex with {net} for the network's name)
    ({}, lambda: dict(aug_level=inputs()[4]), r"aug_level was given but the {net} has aug_embed=False"),
    (dict(aug_embed=True), dict, r"the {net} has aug_embed=True: pass aug_level of shape \[2\]"),
    (dict(aug_embed=True), lambda: dict(aug_level=np.zeros((B, 1), np.float32)),
     r"{net}: aug_level must have shape \[2\] .*got \(2, 1\)"),
    (dict(aug_embed=True), lambda: dict(aug_level=np.float32(0.1)), r"aug_level must have shape \[2\] .*got \(\)"),
    ({}, lambda: dict(low_res=_low()), r"low_res was given but the {net} has low_res_channels=0"),
    (dict(low_res_channels=LR), dict, r"{net} with low_res_channels=3 needs low_res of shape \[2, h, w, 3\]; got None"),
    (dict(low_res_channels=LR), lambda: dict(low_res=_low()[..., :2]), r"\[2, h, w, 3\]; got \(2, 4, 4, 2\)"),
    (dict(low_res_channels=LR), lambda: dict(low_res=_low()[..., 0]), r"\[2, h, w, 3\]; got \(2, 4, 4\)"),
    (dict(low_res_channels=LR), lambda: dict(low_res=_low()[:1]), r"\[2, h, w, 3\]; got \(1, 4, 4, 3\)"),
    (dict(low_res_channels=LR), lambda: dict(low_res=_low(), has_image=np.ones((B,), np.float32)),
     r"has_image was given but the {net} has cond_dropout=False"),
    (dict(low_res_channels=LR, cond_dropout=True), lambda: dict(low_res=_low()),
     r"the {net} has cond_dropout=True: pass has_image of shape \[2\]"),
    (dict(low_res_channels=LR, cond_dropout=True), lambda: dict(low_res=_low(), has_image=np.ones((B, 1), np.float32)),
     r"{net}: has_image must have shape \[2\] .*got \(2, 1\)"),
    (dict(cond_dropout=True), dict, r"{net}: cond_dropout=True .* needs low_res_channels > 0"),
    ({}, lambda: dict(has_image=np.ones((B,), np.float32)),
     r"has_image was given but the {net} has cond_dropout=False"),
]


@pytest.mark.parametrize("kind", list(NETS))
@pytest.mark.parametrize("options,kwargs,message", REFUSALS)
def test_refusals(kind, options, kwargs, message):
  x, t, y, _, _ = inputs()
  with pytest.raises(ValueError, match=message.format(net=NAME[kind])):
    jax.eval_shape(make(kind, **options).init, jax.random.key(0), x, t, y, **kwargs())


# --- bridge -----------------------------------------------------------------------------------------

def test_bridge_maps_a_cond_to_the_module_kwargs(full):
  kind, net, v, apply = full
  x, t, y, low, aug = inputs()
  ones, zeros = np.ones((B,), np.float32), np.zeros((B,), np.float32)
  denoise = jax.jit(bridge.denoiser(net, v))
  close = dict(atol=2e-5, rtol=1e-5)
  direct_ones = np.asarray(apply(v, x, t, y, low, aug, ones))
  np.testing.assert_allclose(np.asarray(denoise(x, t, Cond(label=y, image=low, aug_level=aug))), direct_ones, **close)
  np.testing.assert_allclose(np.asarray(denoise(x, t, Cond(label=y, image=low, aug_level=aug, has_image=ones))),
                             direct_ones, **close)
  np.testing.assert_allclose(np.asarray(denoise(x, t, Cond(label=y, image=low, aug_level=aug, has_image=zeros))),
                             np.asarray(apply(v, x, t, y, low, aug, zeros)), **close)
  # A scalar t is broadcast as for plain labels.
  np.testing.assert_allclose(np.asarray(denoise(x, 0.3, Cond(label=y, image=low, aug_level=aug))),
                             np.asarray(apply(v, x, np.full((B,), 0.3, np.float32), y, low, aug, ones)), **close)


@pytest.mark.parametrize("kind", list(NETS))
def test_bridge_kwargs_follow_the_network(kind):
  x, t, y, low, aug = inputs()
  flags = np.array([1.0, 0.0], np.float32)
  cond = Cond(label=y, image=low, aug_level=aug, has_image=flags)
  # Without cond_dropout the flag is not passed (the dropped image is zeros either way).
  no_flag = make(kind, low_res_channels=LR, aug_embed=True)
  assert set(bridge.cond_kwargs(no_flag, cond)) == {"low_res", "aug_level"}
  assert set(bridge.cond_kwargs(make(kind, **ALL_ON), cond)) == {"low_res", "aug_level", "has_image"}
  assert bridge.cond_kwargs(make(kind), Cond(label=y)) == {}
  # A label-only Cond reaches a label-only network like plain labels do; a part the network lacks is refused.
  v = host_params(make(kind))
  out = jax.eval_shape(bridge.denoiser(make(kind), v), x, t, Cond(label=y))
  assert out.shape == (B, H, H, C)
  with pytest.raises(ValueError, match=f"aug_level was given but the {NAME[kind]} has aug_embed=False"):
    jax.eval_shape(bridge.denoiser(make(kind), v), x, t, Cond(label=y, aug_level=aug))
  with pytest.raises(ValueError, match="has_image but no image"):
    bridge.denoiser(make(kind), v)(x, t, Cond(label=y, has_image=flags))


def test_bridge_jit_traces_once_for_new_values(full):
  kind, net, v, apply = full
  x, t, y, low, aug = inputs()
  denoise = bridge.denoiser(net, v)
  traces = 0

  def counted(x, t, cond):
    nonlocal traces
    traces += 1
    return denoise(x, t, cond)

  step = jax.jit(counted)
  x2, _, _, low2, _ = inputs(seed=3)
  a = step(x, t, Cond(label=y, image=low, aug_level=aug, has_image=np.ones((B,), np.float32)))
  b = step(x2, t * 0.5, Cond(label=y[::-1].copy(), image=low2, aug_level=aug + 0.2,
                             has_image=np.array([0.0, 1.0], np.float32)))
  assert traces == 1
  assert not np.allclose(np.asarray(a), np.asarray(b))
