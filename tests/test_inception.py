"""The FID Inception-v3 (diffusax.evaluation.inception) and its torch-free weight reader.

* the reader on torch.save layouts written here by hand (zip and legacy; strided views, shared
  storages), refusals of foreign pickles and of files that are not these weights;
* the converter: every key, shape and layout (OIHW -> HWIO), missing / unexpected / misshapen keys;
* numpy references for BasicConv2d (conv + BN eps 1e-3 + ReLU), the bilinear resize
  (align_corners=False, up and down) and the pools (avg without the padding in the count; max with
  -inf padding; 3x3/2 in floor mode);
* the batched extractor at 75x75 without resizing (one compile, padding of the last batch, uint8 ==
  float, grey == RGB, bad inputs);
* parity with pytorch-fid on random weights: needs a python with torch + torchvision + pytorch-fid,
  named by $DIFFUSAX_TORCH_PYTHON (or importable here); skipped otherwise. Re-run with e.g.
      DIFFUSAX_TORCH_PYTHON=/work/torchref/bin/python pytest tests/test_inception.py -q -k parity -s
"""
from __future__ import annotations

import importlib.util
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest

from diffusax.evaluation import inception as inc
from diffusax.evaluation import torch_pickle as tp
from diffusax.programs import defaults, settings

# --------------------------------------------------------------------------------------------------
# a torch.save writer for tests (no torch): the opcodes torch's pickler emits for a state dict


def _p(obj) -> bytes:
  """One pickled object without PROTO/STOP (its memo puts are harmless)."""
  return pickle.dumps(obj, protocol=2)[2:-1]


_STYPE = {np.dtype(np.float32): b"FloatStorage", np.dtype(np.int64): b"LongStorage",
          np.dtype(np.float16): b"HalfStorage"}


def _state_dict_pickle(entries, storages, legacy: bool) -> bytes:
  """entries: name -> (storage key, offset, shape, stride); storages: key -> 1-D array."""
  out = [b"\x80\x02ccollections\nOrderedDict\n)R("]
  for name, (key, offset, shape, stride) in entries.items():
    s = storages[key]
    pid = [b"(", _p("storage"), b"ctorch\n" + _STYPE[s.dtype] + b"\n", _p(key), _p("cpu"), _p(s.size)]
    pid += [b"N", b"t"] if legacy else [b"t"]
    out += [_p(name), b"ctorch._utils\n_rebuild_tensor_v2\n(", *pid, b"Q", _p(offset), _p(tuple(shape)),
            _p(tuple(stride)), b"\x89", b"ccollections\nOrderedDict\n)R", b"tR"]
  return b"".join(out + [b"u."])


def write_torch_file(path, entries, storages, legacy=False):
  pkl = _state_dict_pickle(entries, storages, legacy)
  if legacy:
    with open(path, "wb") as f:
      f.write(pickle.dumps(tp.LEGACY_MAGIC, 2) + pickle.dumps(tp.LEGACY_PROTOCOL, 2)
              + pickle.dumps({"protocol_version": 1001, "little_endian": True,
                              "type_sizes": {"short": 2, "int": 4, "long": 4}}, 2))
      f.write(pkl + pickle.dumps(list(storages), 2))
      for s in storages.values():
        f.write(struct.pack("<q", s.size) + s.tobytes())
  else:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
      z.writestr("archive/data.pkl", pkl)
      z.writestr("archive/byteorder", "little")
      for key, s in storages.items():
        z.writestr(f"archive/data/{key}", s.tobytes())
      z.writestr("archive/version", "3\n")


def write_state_dict(path, sd, legacy=False):
  """A contiguous {name: array} state dict as torch.save would write it (one storage per tensor)."""
  entries, storages = {}, {}
  for i, (name, a) in enumerate(sd.items()):
    a = np.array(a, order="C")  # (np.ascontiguousarray would make a scalar 1-d)
    storages[str(i)] = a.reshape(-1)
    entries[name] = (str(i), 0, a.shape, tuple(st // a.itemsize for st in a.strides))
  write_torch_file(path, entries, storages, legacy)


def random_state_dict(seed=0, with_counters=True):
  """Random FID-Inception-shaped weights of sane scale (He convs, BN near identity)."""
  rng = np.random.default_rng(seed)
  sd = {}
  for k, shape in inc.state_dict_shapes().items():
    if k.endswith("conv.weight"):
      a = rng.standard_normal(shape, np.float32) * np.float32((2.0 / np.prod(shape[1:])) ** 0.5)
    elif k.endswith("bn.weight") or k.endswith("running_var"):
      a = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif k == "fc.weight":
      a = rng.standard_normal(shape, np.float32) / np.float32(np.sqrt(shape[1]))
    else:
      a = 0.1 * rng.standard_normal(shape, np.float32)
    sd[k] = a
    if with_counters and k.endswith("bn.running_var"):
      sd[k.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
  return sd


@pytest.fixture(scope="module")
def sd():
  return random_state_dict()


# --------------------------------------------------------------------------------------------------
# reader


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reader_layouts(tmp_path, legacy):
  base = np.arange(30, dtype=np.float32)
  storages = {"7": base, "x": np.array([5], np.int64), "h": np.arange(4, dtype=np.float16)}
  entries = {"matrix": ("7", 0, (3, 4), (4, 1)), "transposed": ("7", 0, (4, 3), (1, 4)),
             "offset": ("7", 12, (2, 3, 2), (6, 2, 1)), "count": ("x", 0, (), ()), "half": ("h", 1, (3,), (1,))}
  path = tmp_path / "w.pth"
  write_torch_file(path, entries, storages, legacy)
  got = tp.load_state_dict(str(path))
  assert list(got) == list(entries)
  for name, (key, off, shape, stride) in entries.items():
    s = storages[key]
    want = np.lib.stride_tricks.as_strided(s[off:], shape, tuple(t * s.itemsize for t in stride))
    assert got[name].dtype == s.dtype and got[name].shape == shape, name
    np.testing.assert_array_equal(got[name], want)


def test_reader_refuses_out_of_bounds_tensor(tmp_path):
  path = tmp_path / "w.pth"
  write_torch_file(path, {"a": ("0", 2, (3, 3), (3, 1))}, {"0": np.zeros(10, np.float32)})
  with pytest.raises(tp.NotAStateDict, match=r"reaches element 10 of a storage of 10"):
    tp.load_state_dict(str(path))


def test_reader_runs_no_code(tmp_path):
  marker = tmp_path / "pwned"
  evil = b"\x80\x02cos\nsystem\n" + _p(f"touch {marker}") + b"\x85R."
  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", evil)
  with pytest.raises(tp.NotAStateDict, match=r"evil\.pth.*refers to os\.system"):
    tp.load_state_dict(str(path))
  assert not marker.exists()


def test_reader_refuses_non_weights(tmp_path):
  text = tmp_path / "notes.pth"
  text.write_text("not weights\n")
  junk = tmp_path / "junk.pth"
  junk.write_bytes(np.random.default_rng(0).bytes(1000))
  other_zip = tmp_path / "other.pth"
  with zipfile.ZipFile(other_zip, "w") as z:
    z.writestr("readme.txt", "hello")
  a_list = tmp_path / "list.pth"
  a_list.write_bytes(pickle.dumps(tp.LEGACY_MAGIC, 2) + pickle.dumps(tp.LEGACY_PROTOCOL, 2)
                     + pickle.dumps({}, 2) + pickle.dumps([1, 2], 2) + pickle.dumps([], 2))
  for path in (text, junk, other_zip):
    with pytest.raises(ValueError, match=rf"{path.name}: not a PyTorch state dict"):
      tp.load_state_dict(str(path))
  with pytest.raises(ValueError, match=r"list\.pth: holds a list, not a state dict"):
    tp.load_state_dict(str(a_list))
  with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
    inc.load_fid_inception(str(tmp_path / "missing.pth"))


# --------------------------------------------------------------------------------------------------
# converter


def test_state_dict_shapes():
  shapes = inc.state_dict_shapes()
  assert len(shapes) == 94 * 5 + 2  # 94 BasicConv2d (conv weight + 4 BN tensors) + fc weight/bias
  assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
  assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
  assert shapes["Mixed_7b.branch3x3_2b.conv.weight"] == (384, 384, 3, 1)
  assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
  assert shapes["Mixed_7c.branch_pool.bn.running_var"] == (192,)
  assert shapes["fc.weight"] == (1008, 2048) and shapes["fc.bias"] == (1008,)


def test_converter_round_trip(tmp_path, sd):
  pth, npz = tmp_path / "w.pth", tmp_path / "w.npz"
  write_state_dict(pth, sd)
  np.savez(npz, **sd)
  for path in (pth, npz):
    got = tp.load_state_dict(str(path))
    assert got.keys() == sd.keys()
    v = inc.variables_from_state_dict(got, str(path))
    p, bs = v["params"], v["batch_stats"]
    np.testing.assert_array_equal(p["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"],
                                  sd["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
    assert p["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"].shape == (1, 7, 128, 128)
    np.testing.assert_array_equal(p["Conv2d_1a_3x3"]["bn"]["scale"], sd["Conv2d_1a_3x3.bn.weight"])
    np.testing.assert_array_equal(p["Mixed_5b"]["branch_pool"]["bn"]["bias"], sd["Mixed_5b.branch_pool.bn.bias"])
    np.testing.assert_array_equal(bs["Mixed_7c"]["branch1x1"]["bn"]["mean"], sd["Mixed_7c.branch1x1.bn.running_mean"])
    np.testing.assert_array_equal(bs["Mixed_7c"]["branch1x1"]["bn"]["var"], sd["Mixed_7c.branch1x1.bn.running_var"])
    np.testing.assert_array_equal(p["fc"]["kernel"], sd["fc.weight"].T)
    np.testing.assert_array_equal(p["fc"]["bias"], sd["fc.bias"])


@pytest.mark.parametrize("case", ["missing", "extra", "shape", "torchvision", "dtype"])
def test_converter_refuses_other_weights(tmp_path, sd, case):
  bad = dict(sd)
  if case == "missing":
    del bad["Mixed_6c.branch7x7dbl_3.bn.running_mean"]
    match = r"missing keys \['Mixed_6c\.branch7x7dbl_3\.bn\.running_mean'\]"
  elif case == "extra":
    bad["Mixed_5b.branch9x9.conv.weight"] = np.zeros((1,), np.float32)
    match = r"unexpected keys \['Mixed_5b\.branch9x9\.conv\.weight'\]"
  elif case == "shape":
    bad["Mixed_5d.branch_pool.conv.weight"] = np.zeros((32, 288, 1, 1), np.float32)
    match = r"Mixed_5d\.branch_pool\.conv\.weight has shape \(32, 288, 1, 1\), .* needs \(64, 288, 1, 1\)"
  elif case == "torchvision":  # torchvision's ImageNet Inception-v3: aux head and 1000 classes
    bad["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    bad["fc.weight"] = np.zeros((1000, 2048), np.float32)
    match = r"unexpected keys \['AuxLogits\.fc\.weight'\]"
  else:
    bad["fc.bias"] = np.zeros((1008,), np.int64)
    match = r"fc\.bias has dtype int64"
  path = tmp_path / f"{case}.npz"
  np.savez(path, **bad)
  with pytest.raises(ValueError, match=rf"{case}\.npz.*{match}"):
    inc.load_fid_inception(str(path))


# --------------------------------------------------------------------------------------------------
# numpy references for the pieces


@pytest.mark.parametrize("kernel,stride,padding", [((3, 3), 2, (0, 0)), ((1, 7), 1, (0, 3)),
                                                   ((7, 1), 1, (3, 0)), ((5, 5), 1, (2, 2))])
def test_basic_conv_vs_numpy(kernel, stride, padding):
  rng = np.random.default_rng(1)
  cin, cout = 3, 4
  x = rng.standard_normal((2, 9, 10, cin), np.float32)
  w = rng.standard_normal((cout, cin) + kernel, np.float32)  # torch OIHW
  gamma, beta = rng.uniform(0.5, 1.5, cout), rng.standard_normal(cout)
  mean, var = rng.standard_normal(cout), rng.uniform(1e-4, 2.0, cout)
  variables = {"params": {"conv": {"kernel": w.transpose(2, 3, 1, 0)}, "bn": {"scale": gamma, "bias": beta}},
               "batch_stats": {"bn": {"mean": mean, "var": var}}}
  mod = inc.BasicConv2d(cout, kernel, stride, padding)
  got = np.asarray(mod.apply(variables, jnp.asarray(x)))
  # numpy: cross-correlation of the zero-padded input, BN with running stats and eps 1e-3, ReLU
  (kh, kw), (ph, pw) = kernel, padding
  xp = np.pad(x.astype(np.float64), ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  ho, wo = (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1
  y = np.zeros((2, ho, wo, cout))
  for i in range(kh):
    for j in range(kw):
      patch = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
      y += np.einsum("nhwc,oc->nhwo", patch, w[:, :, i, j])
  want = np.maximum((y - mean) / np.sqrt(var + 1e-3) * gamma + beta, 0.0)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def bilinear_align_corners_false(x, size):
  """NHWC numpy reference of F.interpolate(mode="bilinear", align_corners=False), written per axis."""

  def axis_weights(n_in, n_out):
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
      src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
      i0 = min(int(np.floor(src)), n_in - 1)
      i1 = min(i0 + 1, n_in - 1)
      lam = src - i0
      m[i, i0] += 1.0 - lam
      m[i, i1] += lam
    return m

  wh, ww = axis_weights(x.shape[1], size), axis_weights(x.shape[2], size)
  return np.einsum("ih,nhwc,jw->nijc", wh, x.astype(np.float64), ww)


@pytest.mark.parametrize("shape", [(1, 5, 7, 2), (1, 23, 19, 2), (1, 11, 11, 1), (1, 4, 30, 1)],
                         ids=["up", "down", "same", "mixed"])
def test_resize_vs_numpy(shape):
  x = np.random.default_rng(2).random(shape, np.float32)
  got = np.asarray(inc.resize_bilinear(jnp.asarray(x), 11))
  np.testing.assert_allclose(got, bilinear_align_corners_false(x, 11), rtol=0, atol=2e-6)
  if shape[1:3] == (11, 11):
    np.testing.assert_array_equal(got, x)


def test_pools_vs_numpy():
  x = np.random.default_rng(3).standard_normal((1, 5, 6, 2)).astype(np.float32) - 3.0  # all < 0 mostly
  h, w = x.shape[1:3]
  avg, mx = np.zeros_like(x), np.zeros_like(x)
  for i in range(h):
    for j in range(w):
      win = x[:, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]  # only the pixels inside the image
      avg[:, i, j], mx[:, i, j] = win.mean(axis=(1, 2)), win.max(axis=(1, 2))
  np.testing.assert_allclose(np.asarray(inc.avg_pool_3x3(jnp.asarray(x))), avg, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(inc.max_pool_3x3(jnp.asarray(x), 1)), mx)
  y = np.random.default_rng(4).standard_normal((1, 8, 7, 2)).astype(np.float32)
  got = np.asarray(inc.max_pool_3x3(jnp.asarray(y), 2))  # floor mode: (8 - 3) // 2 + 1 = 3, (7 - 3) // 2 + 1 = 3
  want = np.array([[[y[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3, c].max() for c in range(2)] for j in range(3)]
                   for i in range(3)])
  np.testing.assert_array_equal(got[0], want)


# --------------------------------------------------------------------------------------------------
# the batched extractor (75x75, no resize: the cheapest input the architecture takes)


def test_extractor_batches_and_inputs(sd):
  net = inc.FIDInception(inc.variables_from_state_dict(sd), batch_size=2, resize_input=False)
  rng = np.random.default_rng(5)
  grey = rng.integers(0, 256, (3, 75, 75, 1), dtype=np.uint8)
  pool, logits = net.features(grey)
  assert pool.shape == (3, inc.POOL_DIM) and logits.shape == (3, inc.NUM_LOGITS)
  assert pool.dtype == np.float32 and np.all(np.isfinite(pool)) and np.all(pool >= 0)  # a mean of ReLUs
  assert np.std(pool) > 0 and not np.allclose(pool[0], pool[1])
  # logits are fc(pool-3)
  np.testing.assert_allclose(logits, pool.astype(np.float64) @ sd["fc.weight"].T + sd["fc.bias"], rtol=1e-4,
                             atol=1e-4 * np.abs(logits).max())
  # the zero-padded last batch does not leak into the real images; grey == RGB; uint8 == float / 255
  np.testing.assert_allclose(net.pool_features(grey[2:]), pool[2:], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(net.pool_features(np.repeat(grey, 3, -1)), pool, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(net.logits(grey.astype(np.float32) / 255), logits, rtol=1e-6, atol=1e-5)
  assert net.traces == 1, "one compile for every call at one input size"
  assert net.pool_features(grey[:0]).shape == (0, inc.POOL_DIM)
  bad = [(grey[0], r"images \[N, H, W, C\] with C = 1 or 3, got shape \(75, 75, 1\)"),
         (np.zeros((2, 75, 75, 2), np.uint8), r"C = 1 or 3, got shape \(2, 75, 75, 2\)"),
         (grey.astype(np.int32), r"uint8 or float in \[0, 1\], got dtype int32"),
         (grey.astype(np.float32), r"float images must lie in \[0, 1\] \(got values in \[0, 255\]\)"),
         (np.zeros((1, 74, 80, 3), np.uint8), r"74x80 are too small .*\(at least 75x75\)")]
  for images, match in bad:
    with pytest.raises(ValueError, match=match):
      net.features(images)
  assert net.traces == 1


# --------------------------------------------------------------------------------------------------
# parity with pytorch-fid (random weights; the reference runs in a torch environment)


def _torch_python() -> str | None:
  env = os.environ.get("DIFFUSAX_TORCH_PYTHON")
  if env:
    return env
  if all(importlib.util.find_spec(m) is not None for m in ("torch", "torchvision", "pytorch_fid")):
    return sys.executable
  return None


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  python = _torch_python()
  if python is None:
    pytest.skip("pytorch-fid parity needs torch + torchvision + pytorch-fid: set DIFFUSAX_TORCH_PYTHON to a "
                "python that has them (see tests/inception_reference.py)")
  out = tmp_path_factory.mktemp("inception_reference")
  script = os.path.join(os.path.dirname(__file__), "inception_reference.py")
  r = subprocess.run([python, script, str(out)], capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, f"{python} {script} failed:\n{r.stdout}\n{r.stderr[-3000:]}"
  return out


def _rel(got, want) -> float:
  """max |got - want| / max |want|: the deviation relative to the output's scale."""
  return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def test_parity_with_pytorch_fid(reference):
  ref = np.load(reference / "reference.npz")
  # torch's own bilinear resize, up and down, against jax.image.resize
  for name in ("up", "down"):
    x = ref[f"resize_{name}_in"].transpose(0, 2, 3, 1)
    got = np.asarray(inc.resize_bilinear(jnp.asarray(x), inc.INPUT_SIZE)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, ref[f"resize_{name}_out"], rtol=0, atol=1e-6)
  # both torch.save layouts read without torch, to the same arrays
  zip_sd = tp.load_state_dict(str(reference / "fid_inception_random.pth"))
  legacy_sd = tp.load_state_dict(str(reference / "fid_inception_random_legacy.pth"))
  assert zip_sd.keys() == legacy_sd.keys()
  assert all(np.array_equal(zip_sd[k], legacy_sd[k]) for k in zip_sd)
  # the network: one 299x299 forward of 4 upsized uint8 images
  net = inc.load_fid_inception(str(reference / "fid_inception_random.pth"), batch_size=4)
  pool, logits = net.features(ref["images"])
  dp, dl = _rel(pool, ref["pool"]), _rel(logits, ref["logits"])
  print(f"\npytorch-fid parity (max abs diff / max abs value): pool-3 {dp:.2e}, logits {dl:.2e}")
  assert dp < 1e-4 and dl < 1e-4, (dp, dl)


# --------------------------------------------------------------------------------------------------
# settings


def test_settings_check_inception_weights(tmp_path):
  c = defaults.base_config()
  for value, match in ((str(tmp_path / "missing.pth"), r"missing\.pth' does not exist"),
                       (str(tmp_path / "weights.bin"), r"must be a \.pth .* or \.npz file, got .*weights\.bin")):
    c.eval.inception_weights = value
    with pytest.raises(settings.ConfigError, match=match):
      settings.parse(c)
  ok = tmp_path / "w.npz"
  ok.write_bytes(b"")
  c.eval.inception_weights = str(ok)
  assert settings.parse(c).eval.inception_weights == str(ok)
  c.eval.inception_weights = ""
  assert settings.parse(c).eval.inception_weights == ""
