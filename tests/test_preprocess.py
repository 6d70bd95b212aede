"""radfm_jax.data.preprocess: intensity, grids, resize parity with torch, crops."""
import ml_collections
import numpy as np
import pytest
import torch

from radfm_jax.data import preprocess as pp

SPEC = pp.ImageSpec(image_hw_2d=(16, 16), depth_2d=4, image_hw_3d=(8, 8), depth_buckets=(4, 8, 16))
SPEC3 = pp.ImageSpec(image_hw_2d=(16, 16), depth_2d=4, image_hw_3d=(8, 8), depth_buckets=(4, 8, 16),
                     image_channels=3)


def test_minmax_and_uint8_and_constant():
  vol = np.arange(2 * 2 * 4, dtype=np.int16).reshape(2, 2, 4, 1) * 10 - 50
  out = pp.prepare_image(vol, {"unit": "raw"}, SPEC, (2, 2, 4))
  assert out.shape == (2, 2, 4, 1) and out.dtype == np.float32  # C_host = 1 by default
  np.testing.assert_allclose(out[..., 0], (vol[..., 0] - vol.min()) / (vol.max() - vol.min()), rtol=1e-6)
  out3 = pp.prepare_image(vol, {"unit": "raw"}, SPEC3, (2, 2, 4))
  assert out3.shape == (2, 2, 4, 3)
  np.testing.assert_array_equal(out3, np.broadcast_to(out, out3.shape))  # the gray replica, bit for bit
  img = np.array([[[[0]], [[51]]], [[[255]], [[102]]]], np.uint8)  # [2, 2, 1, 1]; RadFM 2D: x / 255
  out = pp.prepare_image(img, {"unit": "uint8", "is_2d": True}, SPEC, (2, 2, 4))
  np.testing.assert_allclose(out[:, :, 0, 0], [[0, 0.2], [1, 0.4]], rtol=1e-6)
  np.testing.assert_array_equal(out[:, :, 3], out[:, :, 0])  # 2D repeated along depth
  flat = np.full((4, 4, 4, 1), 7, np.int16)
  np.testing.assert_array_equal(pp.prepare_image(flat, {}, SPEC, (4, 4, 4)), 0.0)


def test_ct_window():
  hu = np.array([-1350, -600, 150, 1000], np.int16).reshape(1, 1, 4, 1)
  spec = pp.ImageSpec(intensity="window:lung", depth_buckets=(4,))
  out = pp.prepare_image(hu, {"unit": "HU"}, spec, (1, 1, 4))[0, 0, :, 0]
  np.testing.assert_allclose(out, [0.0, 0.5, 1.0, 1.0], atol=1e-6)
  out = pp.prepare_image(hu, {"unit": "HU"}, pp.ImageSpec(intensity="window:0,2000", depth_buckets=(4,)),
                         (1, 1, 4))[0, 0, :, 0]
  np.testing.assert_allclose(out, [0.0, 0.2, 0.575, 1.0], atol=1e-6)
  # A window applies to HU volumes only; MR ("raw") falls back to min-max.
  out = pp.prepare_image(hu, {"unit": "raw"}, spec, (1, 1, 4))[0, 0, :, 0]
  np.testing.assert_allclose(out, (hu.ravel() + 1350) / 2350, rtol=1e-6)
  with pytest.raises(ValueError, match="window:NAME"):
    pp.ImageSpec(intensity="window:nope")


@pytest.mark.parametrize("shape,out", [((10, 7, 5), (8, 8, 4)), ((3, 5, 9), (8, 6, 16))])
def test_nearest_matches_torch_interpolate(shape, out):
  rng = np.random.default_rng(0)
  vol = rng.integers(-1000, 1000, size=(*shape, 1)).astype(np.int16)
  ours = pp.resize(vol, out, "nearest")
  ref = torch.nn.functional.interpolate(torch.from_numpy(vol[..., 0].astype(np.float32))[None, None],
                                        size=out, mode="nearest")[0, 0].numpy()
  assert ours.dtype == np.int16
  np.testing.assert_array_equal(ours[..., 0], ref)


def test_linear_upsampling_matches_torch_trilinear():
  rng = np.random.default_rng(2)
  vol = rng.normal(size=(5, 6, 3, 1)).astype(np.float32)
  ours = pp.resize(vol, (9, 11, 7), "linear")[..., 0]
  ref = torch.nn.functional.interpolate(torch.from_numpy(vol[..., 0])[None, None], size=(9, 11, 7),
                                        mode="trilinear", align_corners=False)[0, 0].numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_linear_cubic_shapes_and_range():
  rng = np.random.default_rng(1)
  vol = rng.integers(0, 255, size=(37, 23, 1, 3)).astype(np.uint8)
  for method in ("linear", "cubic"):
    r = pp.resize(vol, (16, 16, 1), method)
    assert r.shape == (16, 16, 1, 3) and r.dtype == np.float32
  out = pp.prepare_image(vol, {"unit": "uint8"}, SPEC3, (16, 16, 4))
  assert out.shape == (16, 16, 4, 3) and out.min() >= 0 and out.max() <= 1
  gray = pp.prepare_image(vol, {"unit": "uint8"}, SPEC, (16, 16, 4))
  assert gray.shape == (16, 16, 4, 1) and gray.min() >= 0 and gray.max() <= 1
  # Upsampling a smooth ramp linearly stays monotone and spans the range.
  ramp = np.linspace(0, 1, 4, dtype=np.float32).reshape(4, 1, 1, 1)
  up = pp.resize(ramp, (8, 1, 1), "linear")[:, 0, 0, 0]
  assert np.all(np.diff(up) >= 0) and up[0] == 0 and up[-1] == 1


def test_depth_buckets_and_sample_grid():
  assert [pp.depth_bucket(d, SPEC) for d in (1, 4, 5, 6, 7, 12, 13, 100)] == [4, 4, 4, 8, 8, 16, 16, 16]
  assert pp.sample_grid([(30, 30, 1, 1)], [{"is_2d": True}], SPEC) == (16, 16, 4)
  assert pp.sample_grid([(30, 30, 1, 1), (9, 9, 7, 1), (9, 9, 12, 1)], [None] * 3, SPEC) == (8, 8, 16)
  assert pp.sample_grid([], [], SPEC) == (16, 16, 4)
  # A 3D-flagged single slice is 3D (meta wins over shape).
  assert pp.sample_grid([(30, 30, 1, 1)], [{"is_2d": False}], SPEC) == (8, 8, 4)
  vols = [np.ones((30, 30, 1, 1), np.uint8), np.arange(9 * 9 * 7).reshape(9, 9, 7, 1)]
  out = pp.prepare_sample(vols, [{"is_2d": True}, {"unit": "raw"}], SPEC)
  assert out.shape == (2, 8, 8, 8, 1)
  out3 = pp.prepare_sample(vols, [{"is_2d": True}, {"unit": "raw"}], SPEC3)
  np.testing.assert_array_equal(out3, np.repeat(out, 3, axis=-1))


def test_train_crop_is_seeded_eval_is_deterministic():
  rng = np.random.default_rng(3)
  img = rng.integers(0, 255, size=(40, 40, 1, 1)).astype(np.uint8)
  meta = {"is_2d": True, "unit": "uint8"}
  eval_a = pp.prepare_image(img, meta, SPEC, SPEC.grid_2d)
  eval_b = pp.prepare_image(img, meta, SPEC, SPEC.grid_2d)
  np.testing.assert_array_equal(eval_a, eval_b)
  tr_a = pp.prepare_image(img, meta, SPEC, SPEC.grid_2d, rng=np.random.default_rng(1))
  tr_b = pp.prepare_image(img, meta, SPEC, SPEC.grid_2d, rng=np.random.default_rng(1))
  tr_c = pp.prepare_image(img, meta, SPEC, SPEC.grid_2d, rng=np.random.default_rng(7))
  np.testing.assert_array_equal(tr_a, tr_b)
  assert not np.array_equal(tr_a, eval_a) and not np.array_equal(tr_a, tr_c)
  for seed in range(20):
    top, left, h, w = pp.random_crop_box(40, 40, np.random.default_rng(seed), (0.8, 1.0))
    assert 0.8 * 1600 * 0.97 <= h * w <= 1600 and top + h <= 40 and left + w <= 40
  # 3D volumes are not cropped unless asked (RadFM crops 2D only).
  vol = rng.integers(0, 100, size=(12, 12, 4, 1)).astype(np.int16)
  np.testing.assert_array_equal(pp.prepare_image(vol, {}, SPEC, (8, 8, 4), rng=np.random.default_rng(0)),
                                pp.prepare_image(vol, {}, SPEC, (8, 8, 4)))


def test_channels_and_bad_input():
  rgb = np.zeros((4, 4, 1, 3), np.uint8)
  rgb[..., 0] = 255
  rgb[0, 0, 0] = (255, 255, 255)
  rgb[1, 1, 0] = (0, 0, 255)
  out = pp.prepare_image(rgb, {"is_2d": True}, SPEC3, (4, 4, 4))  # C_host = 3 keeps colour
  np.testing.assert_array_equal(out[0, 1, 0], [1, 0, 0])
  rgba = np.concatenate([rgb, np.full((4, 4, 1, 1), 9, np.uint8)], -1)
  np.testing.assert_array_equal(pp.prepare_image(rgba, {"is_2d": True}, SPEC3, (4, 4, 4)), out)
  # C_host = 1: colour -> BT.601 luma (PIL "L"), in [0, 1]; alpha dropped.
  gray = pp.prepare_image(rgb, {"is_2d": True}, SPEC, (4, 4, 4))
  assert gray.shape == (4, 4, 4, 1)
  np.testing.assert_allclose(gray[..., 0], out @ np.array([0.299, 0.587, 0.114], np.float32), rtol=1e-6)
  np.testing.assert_allclose(gray[[0, 0, 1], [0, 1, 1], 0, 0], [1.0, 0.299, 0.114], rtol=1e-6)
  np.testing.assert_array_equal(pp.prepare_image(rgba, {"is_2d": True}, SPEC, (4, 4, 4)), gray)
  with pytest.raises(ValueError, match="image_channels=2"):
    pp.ImageSpec(image_channels=2)
  with pytest.raises(ValueError, match="vol-x: 2 channels"):
    pp.prepare_image(np.zeros((4, 4, 1, 2)), {}, SPEC, (4, 4, 4), name="vol-x")
  bad = np.ones((4, 4, 4, 1), np.float32)
  bad[1, 1, 1] = np.nan
  with pytest.raises(ValueError, match="vol-y: contains NaN"):
    pp.prepare_image(bad, {}, SPEC, (4, 4, 4), name="vol-y")
  with pytest.raises(ValueError, match="expected a non-empty"):
    pp.prepare_image(np.zeros((4, 4, 4)), {}, SPEC, (4, 4, 4))


def test_spec_from_config():
  cfg = ml_collections.ConfigDict(dict(image_hw_2d=[64, 64], depth_2d=4, image_hw_3d=(64, 64),
                                       depth_buckets=[8], intensity="minmax", batch_size=3))
  spec = pp.ImageSpec.from_config(cfg)
  assert spec.image_hw_2d == (64, 64) and spec.depth_buckets == (8,) and spec.intensity == "minmax"
  assert spec.interpolation_3d == "nearest" and spec.image_channels == 1
  assert pp.ImageSpec.from_config(dict(image_channels=3)).image_channels == 3
  with pytest.raises(ValueError, match="increasing"):
    pp.ImageSpec(depth_buckets=(8, 4))
