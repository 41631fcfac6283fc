"""Task transforms (data/tasks.py) against independent references: block means by loops and
scikit-image, jax.image.resize and a hand-worked bilinear example, BT.601 weights by hand."""
import numpy as np
import pytest

from diffusax.data import tasks


def _images(b=3, h=16, w=16, c=3, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (b, h, w, c)).astype(np.float32)


def _call(task, x, indices, epoch=0, seed=7, label=True):
  batch = {"x": x}
  if label:
    batch["label"] = np.arange(len(indices), dtype=np.int32) + 3
  return task(batch, seed, np.full(len(indices), epoch), np.asarray(indices))


# --- resizing and colour ---------------------------------------------------------------------------

@pytest.mark.parametrize("factor,h,w", [(2, 8, 8), (4, 16, 12), (3, 9, 6), (1, 5, 4)])
def test_area_downsample_is_the_mean_of_each_block(factor, h, w):
  x = _images(2, h, w, 3)
  want = np.zeros((2, h // factor, w // factor, 3))
  for i in range(h // factor):
    for j in range(w // factor):
      want[:, i, j] = np.mean(x[:, i * factor:(i + 1) * factor, j * factor:(j + 1) * factor], axis=(1, 2))
  got = tasks.area_downsample(x, factor)
  assert got.shape == want.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-6)
  from skimage.transform import downscale_local_mean
  np.testing.assert_allclose(got, downscale_local_mean(x.astype(np.float64), (1, factor, factor, 1)), atol=1e-6)


def test_area_downsample_refuses_a_factor_not_dividing_the_size():
  with pytest.raises(ValueError, match=r"30x32 .*factor 4"):
    tasks.area_downsample(np.zeros((1, 30, 32, 3), np.float32), 4)


@pytest.mark.parametrize("shape_in,size", [((8, 8), 32), ((16, 16), 32), ((8, 12), (32, 24)), ((5, 7), (16, 9))])
def test_bilinear_upsampling_matches_jax_image_resize(shape_in, size):
  import jax
  x = _images(2, *shape_in, 3, seed=1)
  out_hw = (size, size) if np.isscalar(size) else size
  want = np.asarray(jax.image.resize(x, (2, *out_hw, 3), "bilinear"))
  got = tasks.bilinear_resize(x, size)
  assert got.shape == want.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_bilinear_2x2_to_4x4_by_hand():
  """Half-pixel centres: output k samples s = (k + 1/2)/2 - 1/2 = -0.25, 0.25, 0.75, 1.25, clamped to
  [0, 1]; the image f(r, c) = 2 r + c is linear, so the output is 2 s_r + s_c."""
  x = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)[None, :, :, None]
  want = np.array([[0.00, 0.25, 0.75, 1.00],
                   [0.50, 0.75, 1.25, 1.50],
                   [1.50, 1.75, 2.25, 2.50],
                   [2.00, 2.25, 2.75, 3.00]])
  np.testing.assert_allclose(tasks.bilinear_resize(x, 4)[0, :, :, 0], want, atol=1e-7)
  np.testing.assert_allclose(tasks.bilinear_resize(x, (4, 4))[0, :, :, 0], want, atol=1e-7)


def test_luma_uses_bt601_weights():
  px = np.array([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, 1], [-1, -1, -1], [0.5, 0.0, -0.25]], np.float32)
  want = [0.299 - 0.587 - 0.114, -0.299 + 0.587 - 0.114, -0.299 - 0.587 + 0.114, 1.0, -1.0,
          0.299 * 0.5 - 0.114 * 0.25]
  got = tasks.luma(px.reshape(1, 2, 3, 3))
  assert got.shape == (1, 2, 3, 1) and got.dtype == np.float32
  np.testing.assert_allclose(got.reshape(-1), want, atol=1e-6)
  with pytest.raises(ValueError, match="3 .*channels"):
    tasks.luma(np.zeros((1, 4, 4, 1), np.float32))


# --- the task transforms ---------------------------------------------------------------------------

def test_generate_is_the_identity_and_labels_pass_through():
  x = _images()
  batch = {"x": x, "label": np.array([1, 2, 3], np.int32)}
  out = tasks.make("generate")(batch, 0, np.zeros(3), np.arange(3))
  assert set(out) == {"x", "label"} and out is not batch
  np.testing.assert_array_equal(out["x"], x)
  np.testing.assert_array_equal(out["label"], batch["label"])


def test_super_resolution_and_colorization_add_their_condition():
  x = _images(2, 16, 16, 3)
  out = _call(tasks.make("super_resolution", factor=4), x, [0, 1])
  np.testing.assert_array_equal(out["x"], x)
  np.testing.assert_array_equal(out["label"], [3, 4])
  np.testing.assert_allclose(out["low_res"], x.reshape(2, 4, 4, 4, 4, 3).mean(axis=(2, 4)), atol=1e-6)
  out = _call(tasks.make("colorization"), x, [0, 1])
  np.testing.assert_array_equal(out["x"], x)
  np.testing.assert_allclose(out["gray"][..., 0], 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2],
                             atol=1e-6)
  with pytest.raises(ValueError, match=r"18x16 .*factor 4"):
    _call(tasks.make("super_resolution", factor=4), _images(1, 18, 16, 3), [0])


@pytest.mark.parametrize("kind", tasks.MASK_KINDS)
def test_masks_depend_on_seed_and_index_only(kind):
  task = tasks.make("inpainting", mask_kind=kind)
  x = _images(4, 24, 20, 3)
  a = _call(task, x[:3], [5, 9, 2], epoch=0)
  b = _call(task, x[[1, 3]], [7, 5], epoch=11)  # Example 5 again: another batch, position and epoch.
  np.testing.assert_array_equal(a["mask"][0], b["mask"][1])
  c = _call(task, x[:3], [5, 9, 2], epoch=0, seed=8)
  assert not np.array_equal(a["mask"], c["mask"])
  masks = _call(task, _images(12, 24, 20, 3), np.arange(12))["mask"]
  assert len({m.tobytes() for m in masks}) == 12  # Different examples, different masks.
  for out in (a, b):
    m = out["mask"]
    assert m.shape == (len(out["x"]), 24, 20, 1) and m.dtype == np.float32
    assert set(np.unique(m)) <= {0.0, 1.0}
    assert (m.reshape(len(m), -1).max(1) == 1).all() and (m.reshape(len(m), -1).min(1) == 0).all()
    known = np.broadcast_to(m, out["x"].shape) == 1
    np.testing.assert_array_equal(out["masked"][known], out["x"][known])
    assert (out["masked"][~known] == 0).all()
    np.testing.assert_array_equal(out["label"], np.arange(len(m)) + 3)


def _is_rectangle(hole):
  rows, cols = np.nonzero(hole)
  return hole[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


def test_box_masks_cover_between_min_and_max_frac():
  h, w = 32, 24
  task = tasks.make("inpainting", mask_kind="box", min_frac=0.2, max_frac=0.4)
  tol = 1 / (2 * w)  # Rounding the width moves the area by at most half a pixel per row.
  fracs = []
  for i in range(60):
    hole = task.mask(3, i, h, w)[..., 0] == 0
    assert _is_rectangle(hole)
    fracs.append(hole.mean())
  assert 0.2 - tol <= min(fracs) and max(fracs) <= 0.4 + tol
  assert max(fracs) - min(fracs) > 0.1  # The area is drawn, not fixed.


def test_stroke_and_mixed_masks():
  strokes = [tasks.make("inpainting", mask_kind="stroke").mask(0, i, 32, 32)[..., 0] == 0 for i in range(20)]
  assert not all(_is_rectangle(s) for s in strokes)
  mixed = [tasks.make("inpainting", mask_kind="mixed").mask(0, i, 32, 32)[..., 0] == 0 for i in range(20)]
  shapes = [_is_rectangle(s) for s in mixed]
  assert any(shapes) and not all(shapes)


@pytest.mark.parametrize("kind,h,w", [("stroke", 2, 2), ("box", 1, 2), ("stroke", 3, 1), ("mixed", 2, 3)])
def test_tiny_masks_keep_one_known_and_one_unknown_pixel(kind, h, w):
  task = tasks.make("inpainting", mask_kind=kind, min_width=1.0, max_width=3.0, max_frac=0.9)
  for i in range(10):
    m = task.mask(0, i, h, w)
    assert m.min() == 0 and m.max() == 1
  with pytest.raises(ValueError, match="2 pixels"):
    task.mask(0, 0, 1, 1)


# --- names, options and shapes ---------------------------------------------------------------------

def test_make_refuses_unknown_names_and_options():
  with pytest.raises(ValueError, match="unknown task 'deblur'.*generate.*super_resolution.*colorization.*inpainting"):
    tasks.make("deblur")
  with pytest.raises(ValueError, match=r"takes no option\(s\) \['scale'\]; allowed: \['factor'\]"):
    tasks.make("super_resolution", scale=2)
  with pytest.raises(ValueError, match=r"needs option\(s\) \['factor'\]"):
    tasks.make("super_resolution")
  with pytest.raises(ValueError, match="takes no option.*allowed: none"):
    tasks.make("colorization", factor=2)
  with pytest.raises(ValueError, match="mask_kind.*allowed.*box.*stroke.*mixed"):
    tasks.make("inpainting", mask_kind="circle")
  with pytest.raises(ValueError, match="min_frac"):
    tasks.make("inpainting", min_frac=0.6, max_frac=0.5)
  with pytest.raises(ValueError, match="integer >= 1"):
    tasks.make("super_resolution", factor=0)


@pytest.mark.parametrize("name,options", [("generate", {}), ("super_resolution", {"factor": 4}),
                                          ("super_resolution", {"factor": 2}), ("colorization", {}),
                                          ("inpainting", {"mask_kind": "mixed"})])
def test_condition_shapes_agree_with_the_transforms(name, options):
  for image_shape in ((32, 32, 3), (8, 12, 3)):
    x = _images(2, *image_shape)
    out = _call(tasks.make(name, **options), x, [0, 1])
    shapes = tasks.condition_shapes(name, image_shape, **options)
    assert set(out) == {"x", "label", *shapes}
    assert {k: out[k].shape[1:] for k in shapes} == shapes
  assert tasks.condition_shapes("super_resolution", (32, 32, 3), factor=4) == {"low_res": (8, 8, 3)}


def test_condition_shapes_refuse_what_the_task_cannot_take():
  with pytest.raises(ValueError, match=r"30x32 .*factor 4"):
    tasks.condition_shapes("super_resolution", (30, 32, 3), factor=4)
  with pytest.raises(ValueError, match="3 .*channels"):
    tasks.condition_shapes("colorization", (8, 8, 1))
  with pytest.raises(ValueError, match="unknown task"):
    tasks.condition_shapes("nope", (8, 8, 3))
