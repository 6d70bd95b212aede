"""Readers on real files shipped with pydicom, pydicom-data and nibabel: values, spacing, orientation,
multi-frame, compressed syntaxes, pictures, .npy case files, and every bad-input case."""
import os
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from radfm_jax.data.readers import META_KEYS, NotAnImage, ReadError, nifti, read_scan

NIB_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")


def dcm(name):
  return get_testdata_file(name, download=False)


DICOMDIR = os.path.join(os.path.dirname(dcm("CT_small.dcm")), "dicomdirtests")
CT5N = os.path.join(DICOMDIR, "98892001", "CT5N")


def test_ct_small_hu_spacing_orientation():
  ds = pydicom.dcmread(dcm("CT_small.dcm"))
  vol = read_scan(dcm("CT_small.dcm"))
  assert vol.array.shape == (128, 128, 1, 1) and vol.array.dtype == np.int16
  expect = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
  np.testing.assert_array_equal(vol.array[:, :, 0, 0], expect)
  m = vol.meta
  assert m["unit"] == "HU" and m["modality"] == "CT" and m["is_2d"] and m["source_format"] == "dicom"
  np.testing.assert_allclose(m["spacing"][:2], [0.661468, 0.661468])
  assert m["orientation"]["axcodes"] == ["P", "L", "S"]
  ipp = [float(v) for v in ds.ImagePositionPatient]
  np.testing.assert_allclose(np.array(m["orientation"]["affine"])[:3, 3], [-ipp[0], -ipp[1], ipp[2]])
  assert set(m) <= META_KEYS


@pytest.mark.parametrize("variant", ["MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
                                     "MR_small_jp2klossless.dcm"])
def test_mr_small_transfer_syntaxes_agree(variant):
  ref = read_scan(dcm("MR_small.dcm"))
  vol = read_scan(dcm(variant))
  assert ref.array.shape == (64, 64, 1, 1) and ref.meta["unit"] == "raw" and ref.meta["modality"] == "MR"
  np.testing.assert_array_equal(vol.array, ref.array)
  np.testing.assert_allclose(vol.meta["spacing"], [0.3125, 0.3125, 0.8])


def test_multi_slice_series_sorted_along_normal(tmp_path):
  files = sorted(os.path.join(CT5N, f) for f in os.listdir(CT5N))
  z = {f: float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in files}
  vol = read_scan(CT5N)
  assert vol.array.shape == (16, 16, 5, 1) and not vol.meta["is_2d"]
  for k, f in enumerate(sorted(files, key=z.get)):   # ascending along the normal (0, 0, 1)
    ds = pydicom.dcmread(f)
    np.testing.assert_array_equal(vol.array[:, :, k, 0],
                                  ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
  np.testing.assert_allclose(vol.meta["spacing"], [0.488281, 0.488281, 2.5], rtol=1e-6)
  affine = np.array(vol.meta["orientation"]["affine"])
  assert vol.meta["orientation"]["axcodes"] == ["P", "L", "S"]
  assert affine[2, 3] == pytest.approx(min(z.values()))
  # the same series as a shuffled list of files
  np.testing.assert_array_equal(read_scan(files[::-1]).array, vol.array)


def test_compressed_jpeg2000_ct():
  ds = pydicom.dcmread(dcm("693_J2KI.dcm"))
  vol = read_scan(dcm("693_J2KI.dcm"))
  assert vol.array.shape == (512, 512, 1, 1) and vol.array.dtype == np.int16 and vol.meta["unit"] == "HU"
  np.testing.assert_array_equal(vol.array[..., 0, 0], ds.pixel_array.astype(np.int32) - 1024)
  # lossless JPEG 2000 decodes to exactly the uncompressed file (pydicom-data)
  np.testing.assert_array_equal(read_scan(dcm("693_J2KR.dcm")).array, read_scan(dcm("693_UNCR.dcm")).array)


def test_enhanced_multiframe_ct_uses_per_frame_positions():
  ds = pydicom.dcmread(dcm("eCT_Supplemental.dcm"))
  vol = read_scan(dcm("eCT_Supplemental.dcm"))
  assert vol.array.shape == (512, 512, 2, 1) and vol.meta["n_frames"] == 2 and vol.meta["unit"] == "HU"
  # normal = (-1,0,0) x (0,1,0) = (0,0,-1): frame 1 (z=-149) comes first along it
  np.testing.assert_array_equal(vol.array[..., 0, 0], ds.pixel_array[1].astype(np.int32) - 1024)
  np.testing.assert_array_equal(vol.array[..., 1, 0], ds.pixel_array[0].astype(np.int32) - 1024)
  np.testing.assert_allclose(vol.meta["spacing"], [0.388672, 0.388672, 10.0], rtol=1e-6)
  assert vol.meta["orientation"]["axcodes"] == ["P", "R", "I"]


def test_rt_dose_multiframe_scaled_to_gray():
  ds = pydicom.dcmread(dcm("rtdose.dcm"))
  vol = read_scan(dcm("rtdose.dcm"))
  assert vol.array.shape == (10, 10, 15, 1) and vol.array.dtype == np.float32 and vol.meta["unit"] == "dose_gy"
  np.testing.assert_allclose(vol.array[..., 0], np.moveaxis(ds.pixel_array * float(ds.DoseGridScaling), 0, -1),
                             rtol=1e-6)
  np.testing.assert_allclose(vol.meta["spacing"], [10, 10, 5])


def test_monochrome1_radiograph_is_inverted():
  ds = pydicom.dcmread(dcm("RG1_UNCI.dcm"))
  vol = read_scan(dcm("RG1_UNCI.dcm"))
  assert vol.meta["modality"] == "CR" and vol.meta["body_part"] == "CHEST" and vol.meta["photometric"] == "MONOCHROME1"
  np.testing.assert_array_equal(vol.array[..., 0, 0], (1 << int(ds.BitsStored)) - 1 - ds.pixel_array)


def test_colour_dicom_rgb_and_ybr_jpeg():
  rle = read_scan(dcm("SC_rgb_rle.dcm"))
  assert rle.array.shape == (100, 100, 1, 3) and rle.array.dtype == np.uint8 and rle.meta["channels"] == "rgb"
  np.testing.assert_array_equal(rle.array[:, :, 0], pydicom.dcmread(dcm("SC_rgb_rle.dcm")).pixel_array)
  ybr = read_scan(dcm("SC_rgb_jpeg_dcmtk.dcm"))   # YBR_FULL JPEG -> RGB
  assert np.abs(ybr.array.astype(int) - rle.array.astype(int)).mean() < 3
  cine = read_scan(dcm("examples_ybr_color.dcm"))  # 30-frame ultrasound cine, no geometry: file order
  assert cine.array.shape == (240, 320, 30, 3) and "spacing" not in cine.meta


def test_nifti_canonical_then_display_convention():
  path = os.path.join(NIB_DATA, "anatomical.nii")
  canon = nib.as_closest_canonical(nib.load(path))
  data = np.asanyarray(canon.dataobj)
  vol = read_scan(path)
  x, y, z = data.shape
  assert vol.array.shape == (y, x, z, 1) and vol.array.dtype == data.dtype.newbyteorder("=")
  np.testing.assert_array_equal(vol.array[..., 0], data[::-1, ::-1].transpose(1, 0, 2))
  assert vol.meta["orientation"]["axcodes"] == ["P", "L", "S"]
  np.testing.assert_allclose(vol.meta["spacing"], [2.0, 2.0, 2.0])
  # the affine maps a display voxel to the same world point as nibabel's canonical affine
  affine = np.array(vol.meta["orientation"]["affine"])
  for h, w, d in [(0, 0, 0), (5, 7, 3), (y - 1, x - 1, z - 1)]:
    np.testing.assert_allclose(affine @ [h, w, d, 1], canon.affine @ [x - 1 - w, y - 1 - h, d, 1])


def test_nifti_4d_needs_an_index():
  path = os.path.join(NIB_DATA, "example4d.nii.gz")
  with pytest.raises(ReadError, match="2 volumes along axis 4.*pass an index"):
    read_scan(path)
  img = nib.load(path)
  canon = nib.as_closest_canonical(img)
  vol = read_scan(path, index=1)
  assert vol.meta["index"] == 1 and vol.meta["original_shape"] == [128, 96, 24, 2]
  expect = np.asanyarray(canon.dataobj)[..., 1]
  np.testing.assert_array_equal(vol.array[..., 0], expect[::-1, ::-1].transpose(1, 0, 2))
  np.testing.assert_allclose(vol.meta["spacing"], np.array(canon.header.get_zooms()[:3])[[1, 0, 2]], rtol=1e-5)
  with pytest.raises(ReadError, match="out of range"):
    read_scan(path, index=2)


def test_dicom_series_and_its_nifti_export_read_the_same(tmp_path):
  vol = read_scan(CT5N)
  data, affine = nifti.display_to_ras(vol.array[..., 0], vol.meta["spacing"])
  nib.save(nib.Nifti1Image(data, affine), tmp_path / "ct5n.nii.gz")
  back = read_scan(tmp_path / "ct5n.nii.gz")
  np.testing.assert_array_equal(back.array, vol.array)
  np.testing.assert_allclose(back.meta["spacing"], vol.meta["spacing"], rtol=1e-6)
  assert back.meta["orientation"]["axcodes"] == vol.meta["orientation"]["axcodes"]


def _window_uint8(path):
  hu = read_scan(path).array[..., 0, 0].astype(np.float32)
  return np.clip((hu + 160) / 400 * 255, 0, 255).astype(np.uint8)


def test_pictures_png_jpeg_gray_rgb(tmp_path):
  gray = _window_uint8(dcm("CT_small.dcm"))          # a real CT slice as an 8-bit picture
  Image.fromarray(gray).save(tmp_path / "ct.png")
  Image.fromarray(gray).save(tmp_path / "ct.jpg", quality=90)
  Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "ct_rgb.png")
  rgb = pydicom.dcmread(dcm("SC_rgb_rle.dcm")).pixel_array
  Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=95)
  png = read_scan(tmp_path / "ct.png")
  assert png.array.shape == (128, 128, 1, 1) and png.array.dtype == np.uint8 and png.meta["unit"] == "uint8"
  np.testing.assert_array_equal(png.array[..., 0, 0], gray)
  jpg = read_scan(tmp_path / "ct.jpg")
  np.testing.assert_array_equal(jpg.array[..., 0, 0], np.asarray(Image.open(tmp_path / "ct.jpg")))
  assert np.abs(jpg.array[..., 0, 0].astype(int) - gray).mean() < 3
  collapsed = read_scan(tmp_path / "ct_rgb.png")
  assert collapsed.array.shape == (128, 128, 1, 1) and collapsed.meta["channels"] == "gray_from_rgb"
  colour = read_scan(tmp_path / "rgb.jpg")
  assert colour.array.shape == (100, 100, 1, 3) and colour.meta["is_2d"] and colour.meta.get("spacing") is None
  assert np.abs(colour.array[:, :, 0].astype(int) - rgb).mean() < 4


def test_npy_radfm_case_file_and_layouts(tmp_path):
  ct = read_scan(CT5N).array[..., 0].astype(np.float32)
  scans = np.stack([np.repeat((ct - ct.min())[None] / np.ptp(ct), 3, 0),
                    np.repeat(((ct.max() - ct))[None] / np.ptp(ct), 3, 0)])    # N x 3 x H x W x D
  np.save(tmp_path / "case.npy", scans)
  vol = read_scan(tmp_path / "case.npy", index=1)
  assert vol.array.shape == (16, 16, 5, 1) and vol.meta["unit"] == "normalized" and vol.meta["index"] == 1
  assert vol.meta["channels"] == "gray_from_rgb" and vol.meta["original_shape"] == [2, 3, 16, 16, 5]
  np.testing.assert_array_equal(vol.array[..., 0], scans[1, 0])
  with pytest.raises(ReadError, match="case file with 2 scans"):
    read_scan(tmp_path / "case.npy")
  np.save(tmp_path / "one.npy", scans[0])                                      # 3 x H x W x D
  np.testing.assert_array_equal(read_scan(tmp_path / "one.npy").array[..., 0], scans[0, 0])
  np.save(tmp_path / "slice.npy", ct[..., 2].astype(np.int16))                # H x W
  assert read_scan(tmp_path / "slice.npy").array.shape == (16, 16, 1, 1)


# ----------------------------------------------------------------------------------------- bad input

def test_truncated_and_corrupt_files(tmp_path):
  with pytest.raises(ReadError, match="MR_truncated.dcm.*cannot decode"):
    read_scan(dcm("MR_truncated.dcm"))
  src = os.path.join(NIB_DATA, "anatomical.nii")
  blob = open(src, "rb").read()
  (tmp_path / "cut.nii").write_bytes(blob[: len(blob) // 2])
  with pytest.raises(ReadError, match="cut.nii"):
    read_scan(tmp_path / "cut.nii")
  Image.fromarray(_window_uint8(dcm("CT_small.dcm"))).save(tmp_path / "ok.png")
  png = (tmp_path / "ok.png").read_bytes()
  (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
  with pytest.raises(ReadError, match="cut.png"):
    read_scan(tmp_path / "cut.png")
  (tmp_path / "fake.png").write_text("this is not a picture")
  with pytest.raises(ReadError, match="fake.png"):
    read_scan(tmp_path / "fake.png")
  np.save(tmp_path / "full.npy", np.arange(1000, dtype=np.int16).reshape(10, 10, 10))
  blob = (tmp_path / "full.npy").read_bytes()
  (tmp_path / "cut.npy").write_bytes(blob[:500])
  with pytest.raises(ReadError, match="cut.npy"):
    read_scan(tmp_path / "cut.npy")


def test_non_image_files(tmp_path):
  (tmp_path / "notes.txt").write_text("patient notes")
  with pytest.raises(NotAnImage, match="notes.txt: not an image file"):
    read_scan(tmp_path / "notes.txt")
  with pytest.raises(NotAnImage, match="without pixel data"):
    read_scan(dcm("rtplan.dcm"))
  with pytest.raises(ReadError, match="no such file"):
    read_scan(tmp_path / "missing.png")


def test_empty_nan_and_constant_volumes(tmp_path):
  np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan], [2.0, 3.0]], np.float32))
  with pytest.raises(ReadError, match="1 of 4 values are NaN"):
    read_scan(tmp_path / "nan.npy")
  np.save(tmp_path / "empty.npy", np.zeros((0, 4, 4), np.int16))
  with pytest.raises(ReadError, match="empty volume"):
    read_scan(tmp_path / "empty.npy")
  np.save(tmp_path / "zeros.npy", np.zeros((8, 8, 4), np.int16))
  with pytest.raises(ReadError, match="constant volume"):
    read_scan(tmp_path / "zeros.npy")
  nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "blank.nii.gz")
  with pytest.raises(ReadError, match="constant volume"):
    read_scan(tmp_path / "blank.nii.gz")


def _series_copy(tmp_path, name, sources, positions, uid="1.2.3.4"):
  folder = tmp_path / name
  folder.mkdir()
  for i, (src, z) in enumerate(zip(sources, positions)):
    ds = pydicom.dcmread(dcm(src))
    ds.SeriesInstanceUID = uid
    ds.ImagePositionPatient = [0.0, 0.0, float(z)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.save_as(folder / f"{i}.dcm")
  return folder


def test_inconsistent_series(tmp_path):
  mixed = _series_copy(tmp_path, "mixed", ["CT_small.dcm", "CT_small.dcm", "MR_small.dcm"], [0, 5, 10])
  with pytest.raises(ReadError, match=r"inconsistent series: slice sizes .*\(128, 128, 1\) x2.*\(64, 64, 1\) x1"):
    read_scan(mixed)
  dup = _series_copy(tmp_path, "dup", ["CT_small.dcm"] * 3, [0, 0, 5])
  with pytest.raises(ReadError, match="share a position"):
    read_scan(dup)
  gap = _series_copy(tmp_path, "gap", ["CT_small.dcm"] * 4, [0, 5, 10, 30])
  with pytest.raises(ReadError, match="irregular slice spacing"):
    read_scan(gap)
  with pytest.raises(ReadError, match="7 different orientations"):   # a real radial localizer
    read_scan(os.path.join(DICOMDIR, "98892003", "MR700"))
  ok = _series_copy(tmp_path, "ok", ["CT_small.dcm"] * 3, [10, 0, 5])
  assert read_scan(ok).array.shape == (128, 128, 3, 1)


def test_undecodable_transfer_syntax_is_named():
  with pytest.raises(ReadError, match="JPEG-LS Lossless.*python-gdcm or pylibjpeg"):
    read_scan(dcm("MR_small_jpeg_ls_lossless.dcm"))


def test_folder_with_several_series_needs_index(tmp_path):
  shutil.copytree(CT5N, tmp_path / "two")
  _series_copy(tmp_path, "other", ["MR_small.dcm"] * 2, [0, 1], uid="9.9")
  for f in os.listdir(tmp_path / "other"):
    shutil.copy(tmp_path / "other" / f, tmp_path / "two" / f"mr_{f}")
  with pytest.raises(ReadError, match="holds 2 DICOM series; pass an index"):
    read_scan(tmp_path / "two")
  shapes = sorted(read_scan(tmp_path / "two", index=i).array.shape for i in range(2))
  assert shapes == [(16, 16, 5, 1), (64, 64, 2, 1)]
