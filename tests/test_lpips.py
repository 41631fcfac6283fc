"""LPIPS-vgg v0.1 (diffusax.evaluation.lpips) against a float64 numpy reference written from the
formulas of the `lpips` package (Zhang et al. 2018), its weight loading and refusals, and, where torch,
torchvision and lpips are installed (not project requirements), against `lpips.LPIPS(net="vgg")`.

Weights are random (He-normal VGG convs, uniform [0, 1) linear layers) in the torch layout; images
are tiny (32x32, 40x36), so every test runs in seconds.
"""
from __future__ import annotations

import importlib.util
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusax.evaluation import lpips as lp

# Written out from the lpips source (lpips/lpips.py ScalingLayer, lpips/__init__.py normalize_tensor,
# lpips/pretrained_networks.py vgg16 slices of torchvision's vgg16().features), independently of the
# module's own constants.
REF_SHIFT = np.array([-.030, -.088, -.188])
REF_SCALE = np.array([.458, .448, .450])
REF_EPS = 1e-10
REF_BLOCKS = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))  # conv indices, pools between
REF_CHANNELS = {0: 64, 2: 64, 5: 128, 7: 128, 10: 256, 12: 256, 14: 256,
                17: 512, 19: 512, 21: 512, 24: 512, 26: 512, 28: 512}


def random_state_dicts(seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """A torchvision-layout VGG-16 state dict (with a classifier key) and an lpips lin state dict."""
  rng = np.random.default_rng(seed)
  vgg, c_in = {}, 3
  for block in REF_BLOCKS:
    for i in block:
      c = REF_CHANNELS[i]
      vgg[f"features.{i}.weight"] = (rng.standard_normal((c, c_in, 3, 3)) * np.sqrt(2.0 / (9 * c_in))
                                     ).astype(np.float32)
      vgg[f"features.{i}.bias"] = (0.05 * rng.standard_normal(c)).astype(np.float32)
      c_in = c
  vgg["classifier.6.bias"] = np.zeros(10, np.float32)  # torchvision files carry the classifier: ignored
  lin = {f"lin{l}.model.1.weight": rng.uniform(0, 1, (1, c, 1, 1)).astype(np.float32)
         for l, c in enumerate((64, 128, 256, 512, 512))}
  return vgg, lin


def _conv3x3_relu(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
  """relu(torch Conv2d(k=3, padding=1)) in float64: x [B, H, W, I], w [O, I, 3, 3] -> [B, H, W, O]."""
  n, h, wd, c = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = np.stack([xp[:, i:i + h, j:j + wd, :] for i in range(3) for j in range(3)], axis=-1)
  out = patches.reshape(n * h * wd, c * 9) @ w.astype(np.float64).reshape(w.shape[0], c * 9).T
  return np.maximum(out.reshape(n, h, wd, -1) + b, 0.0)


def _max_pool_2x2(x: np.ndarray) -> np.ndarray:
  """torch MaxPool2d(2, 2) (floor mode) on NHWC."""
  n, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def reference_lpips(vgg: dict, lin: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """LPIPS-vgg v0.1 distances [B] in float64 straight from the formulas."""
  def taps(img):
    h = (img.astype(np.float64) - REF_SHIFT) / REF_SCALE
    out = []
    for k, block in enumerate(REF_BLOCKS):
      if k:
        h = _max_pool_2x2(h)
      for i in block:
        h = _conv3x3_relu(h, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"].astype(np.float64))
      out.append(h)
    return out

  total = 0.0
  for l, (fx, fy) in enumerate(zip(taps(x), taps(y))):
    nx = fx / (np.sqrt(np.sum(fx ** 2, axis=-1, keepdims=True)) + REF_EPS)
    ny = fy / (np.sqrt(np.sum(fy ** 2, axis=-1, keepdims=True)) + REF_EPS)
    w = lin[f"lin{l}.model.1.weight"].astype(np.float64).reshape(-1)
    total = total + np.mean(((nx - ny) ** 2) @ w, axis=(1, 2))
  return total


def _images(seed: int, shape=(2, 32, 32, 3)) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return (rng.uniform(-1, 1, shape).astype(np.float32), rng.uniform(-1, 1, shape).astype(np.float32))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  vgg, lin = random_state_dicts(0)
  folder = tmp_path_factory.mktemp("lpips_weights")
  vgg_path, lin_path = str(folder / "vgg16.npz"), str(folder / "lin.npz")
  np.savez(vgg_path, **vgg)
  np.savez(lin_path, **lin)
  return vgg, lin, vgg_path, lin_path


@pytest.fixture(scope="module")
def net(weights):
  return lp.load_lpips(weights[2], weights[3])


def test_matches_float64_reference(weights, net):
  vgg, lin, _, _ = weights
  x, y = _images(1)
  # a second pair closer together, where the distance is small
  x = np.concatenate([x[:1], x[:1]])
  y = np.concatenate([y[:1], np.clip(x[1:] + 0.1 * y[1:], -1, 1)])
  got = np.asarray(net(x, y), np.float64)
  want = reference_lpips(vgg, lin, x, y)
  assert got.shape == (2,) and want[1] < want[0]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # the pure function under an outer jit gives the same numbers as the object
  np.testing.assert_array_equal(np.asarray(jax.jit(lp.lpips_distance)(net.params, x, y)), got)


def test_metric_properties(net):
  x, y = _images(2)
  d_xy, d_yx, d_xx = (np.asarray(net(a, b)) for a, b in ((x, y), (y, x), (x, x)))
  np.testing.assert_array_equal(d_xx, 0.0)
  np.testing.assert_array_equal(d_xy, d_yx)
  assert np.all(d_xy > 0)


def test_dead_features_have_finite_gradient(weights):
  """A tap whose features are all zero (every ReLU off) contributes 0 and must not give NaN gradients."""
  vgg, lin, _, _ = weights
  vgg = dict(vgg, **{"features.28.bias": np.full(512, -1e4, np.float32)})  # relu5_3 == 0 everywhere
  params = lp.params_from_state_dicts(vgg, lin)
  x, y = _images(3, (1, 16, 16, 3))
  d, g = jax.jit(jax.value_and_grad(lambda a, p: lp.lpips_distance(p, a, y)[0]))(x, params)
  np.testing.assert_allclose(float(d), reference_lpips(vgg, lin, x, y)[0], rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)


def test_refuses_bad_inputs(net):
  x, y = _images(4)
  with pytest.raises(ValueError, match="one shape"):
    net(x, y[:1])
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    net(x[..., :1], y[..., :1])
  with pytest.raises(ValueError, match="at least 16x16"):
    net(x[:, :8, :8], y[:, :8, :8])


@pytest.mark.parametrize("edit, match", [
    (lambda v, l: v.pop("features.28.bias"), r"missing keys \['features.28.bias'\]"),
    (lambda v, l: v.update({"features.1.weight": np.zeros(3, np.float32)}),
     r"unexpected keys \['features.1.weight'\]"),
    (lambda v, l: v.update({"features.0.weight": np.zeros((64, 3, 5, 5), np.float32)}),
     r"features.0.weight has shape \(64, 3, 5, 5\).*\(64, 3, 3, 3\)"),
    (lambda v, l: v.update({"features.0.bias": np.zeros(64, np.int64)}), "dtype int64"),
    (lambda v, l: v.update({"features.2.bias": np.full(64, np.nan, np.float32)}), "non-finite"),
    (lambda v, l: l.pop("lin4.model.1.weight"), r"missing keys \['lin4.model.1.weight'\]"),
    (lambda v, l: l.update({"lin2.model.1.weight": np.ones((1, 128, 1, 1), np.float32)}),
     r"lin2.model.1.weight has shape \(1, 128, 1, 1\).*\(1, 256, 1, 1\)"),
    (lambda v, l: l["lin3.model.1.weight"].__setitem__((0, 5, 0, 0), -0.1), "negative"),
])
def test_refuses_wrong_state_dicts(weights, edit, match):
  vgg, lin = dict(weights[0]), {k: v.copy() for k, v in weights[1].items()}
  edit(vgg, lin)
  with pytest.raises(ValueError, match=match):
    lp.params_from_state_dicts(vgg, lin)


def test_load_names_the_file(weights):
  _, _, vgg_path, lin_path = weights
  with pytest.raises(ValueError, match=re.escape(lin_path) + ".*missing keys"):
    lp.load_lpips(lin_path, lin_path)
  with pytest.raises(ValueError, match=re.escape(vgg_path) + ".*LPIPS-vgg v0.1 linear layers"):
    lp.load_lpips(vgg_path, vgg_path)
  with pytest.raises(FileNotFoundError):
    lp.load_lpips(vgg_path + ".missing", lin_path)


def test_default_lin_weights_come_from_the_lpips_package_without_importing_it(weights, tmp_path,
                                                                                monkeypatch):
  vgg, lin, vgg_path, _ = weights
  package = tmp_path / "lpips"
  (package / "weights" / "v0.1").mkdir(parents=True)
  (package / "__init__.py").write_text("raise ImportError('diffusax must not import lpips')\n")
  monkeypatch.delitem(sys.modules, "lpips", raising=False)
  monkeypatch.syspath_prepend(str(tmp_path))
  # an lpips package without the weights file: no default
  assert lp.default_lin_path() is None
  with pytest.raises(ValueError, match="lin_path"):
    lp.load_lpips(vgg_path)
  with open(package / "weights" / "v0.1" / "vgg.pth", "wb") as f:  # the reader takes .npz content too
    np.savez(f, **lin)
  assert lp.default_lin_path() == str(package / "weights" / "v0.1" / "vgg.pth")
  loaded = lp.load_lpips(vgg_path)
  np.testing.assert_array_equal(np.asarray(loaded.params["lin"]["lin3"]), lin["lin3.model.1.weight"].ravel())
  assert "lpips" not in sys.modules


def test_no_lpips_package_and_no_lin_path_is_a_clear_error(weights, monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "lpips" else real(name, *a))
  assert lp.default_lin_path() is None
  with pytest.raises(ValueError, match="pass lin_path=.*pip install lpips"):
    lp.load_lpips(weights[2])


def _torch_lpips():
  """(torch, lpips) or skip: reference only, not project requirements."""
  torch = pytest.importorskip("torch")
  try:
    import torchvision  # noqa: F401  (lpips imports it; PyPI's may not load beside the installed torch)
  except Exception as e:  # noqa: BLE001  (any failure to load it means: no reference here)
    pytest.skip(f"torchvision does not import: {type(e).__name__}: {e}")
  return torch, pytest.importorskip("lpips")


@pytest.mark.filterwarnings("ignore::UserWarning")  # torchvision on lpips' `pretrained=` argument
def test_matches_the_lpips_package(tmp_path):
  torch, lpips = _torch_lpips()
  torch.manual_seed(0)
  # pnet_rand=True: torchvision's vgg16 with its random init and no download; the shipped v0.1 lin weights
  model = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()
  backbone = {}
  for key, value in model.state_dict().items():
    m = re.fullmatch(r"net\.slice\d\.(\d+)\.(weight|bias)", key)
    if m:
      backbone[f"features.{m[1]}.{m[2]}"] = value.clone()
  assert len(backbone) == 26
  path = str(tmp_path / "vgg16.pth")
  torch.save(backbone, path)  # read back without torch; lin weights from the installed package
  net = lp.load_lpips(path)
  x, y = _images(5, (3, 40, 36, 3))  # 40x36: floor-mode pools down to 2x2 at relu5_3
  y[2] = np.clip(x[2] + 0.05 * y[2], -1, 1)
  with torch.no_grad():
    want = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y).permute(0, 3, 1, 2))
  want = want.numpy().reshape(-1).astype(np.float64)
  got = np.asarray(net(x, y), np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-4)
