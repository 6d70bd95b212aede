"""NIfTI (.nii / .nii.gz) -> `Volume` (nibabel), in the same display convention as DICOM.

Steps: the data is reoriented to closest-canonical RAS exactly as `nibabel.as_closest_canonical` does
(axes permuted / flipped, never resampled), then shown as DICOM displays an axial slice:
`array = ras[::-1, ::-1, :].transpose(1, 0, 2)`, so H runs anterior -> posterior, W right -> left and
D inferior -> superior (axcodes ("P", "L", "S")); an axial NIfTI converted from a DICOM series gives the
same array as the series itself. `display_to_ras` is the inverse (used to write NIfTI files).
Spacing comes from the affine (mm along H, W, D); values keep the stored dtype unless the header sets
a scaling (scl_slope / scl_inter), which nibabel applies (float).

4D files (time points, b-values, echoes): `index` selects one 3D volume; without an index a 4D file
with more than one volume is a ReadError (files mode ingests every volume of a 4D file as its own scan,
see build.py). 5D and non-scalar (RGB) NIfTI are rejected.

Bounded work: the header (348 / 540 bytes) is parsed on its own before nibabel opens the file, and the
volume to read (one 3D volume of a 4D file) must pass the size cap (limits.py; scaled data counts 8
bytes a voxel, as nibabel returns float64). An uncompressed .nii must hold vox_offset + all the data it
claims; a .nii.gz's header extensions (read into memory) must fit the byte cap, and its decompressed
data is read only up to the volume asked for, so a small gzip bomb is refused before it expands.
"""
from __future__ import annotations

import gzip
import io
import math
import os
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations

from radfm_jax.data.readers.limits import DEFAULT, Limits, check_fits
from radfm_jax.data.readers.volume import ReadError, Volume, finish

_HEADERS = {348: nib.Nifti1Header, 540: nib.Nifti2Header}


def peek_header(path: str) -> nib.Nifti1Header:
  """The NIfTI-1 / NIfTI-2 header alone (no extensions, no data), from .nii or .nii.gz."""
  try:
    with (gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")) as f:
      block = f.read(540)
    for order, endian in (("little", "<"), ("big", ">")):
      klass = _HEADERS.get(int.from_bytes(block[:4], order))
      if klass is not None:
        break
    else:
      raise ValueError(f"sizeof_hdr {int.from_bytes(block[:4], 'little')} is neither 348 nor 540")
    size = int.from_bytes(block[:4], order)
    if len(block) < size:
      raise ValueError(f"file ends inside the {size}-byte header")
    return klass.from_fileobj(io.BytesIO(block[:size]), check=True)
  except Exception as e:  # noqa: BLE001 - gzip, nibabel and struct raise many types for bad headers
    raise ReadError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None


def check_header(path: str, hdr: nib.Nifti1Header, limits: Limits, volume: bool) -> None:
  """Checks the claimed data against the file (uncompressed) and the cap (one 3D volume when `volume`,
  else the whole array; header extensions for .nii.gz)."""
  shape = [int(s) for s in hdr.get_data_shape()]
  dtype = hdr.get_data_dtype()
  offset = int(hdr["vox_offset"])
  slope, inter = hdr.get_slope_inter()
  scaled = (slope is not None and slope != 1) or (inter is not None and inter != 0)
  itemsize = 8 if scaled else dtype.itemsize
  if path.lower().endswith(".gz"):
    if offset > limits.max_bytes:
      check_fits(path, offset, limits.max_bytes, f"vox_offset {offset} (header extensions read into memory)")
  else:
    check_fits(path, offset + math.prod(shape) * dtype.itemsize, os.path.getsize(path),
               f"shape {shape} of {dtype} at offset {offset}")
  limits.check(path, shape[:3] if volume else shape, itemsize, "volume")


def n_volumes(path: str) -> int:
  """Number of 3D volumes in a NIfTI file (header only)."""
  shape = peek_header(path).get_data_shape()
  return int(shape[3]) if len(shape) >= 4 else 1


def _display_matrix(x: int, y: int) -> np.ndarray:
  """Voxel (h, w, d) of the display array -> voxel (i, j, k) of the RAS array."""
  return np.array([[0, -1, 0, x - 1], [-1, 0, 0, y - 1], [0, 0, 1, 0], [0, 0, 0, 1]], np.float64)


def ras_to_display(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """RAS-canonical [X, Y, Z] + affine -> display [H=Y, W=X, D=Z] + its affine."""
  x, y = data.shape[:2]
  return data[::-1, ::-1].transpose(1, 0, *range(2, data.ndim)), affine @ _display_matrix(x, y)


def display_to_ras(array: np.ndarray, spacing: tuple[float, float, float],
                   origin: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
  """Display [H, W, D] with spacing (dH, dW, dD) -> (RAS data [X, Y, Z], affine) for a NIfTI file."""
  data = array.transpose(1, 0, *range(2, array.ndim))[::-1, ::-1]
  affine = np.diag([spacing[1], spacing[0], spacing[2], 1.0])
  affine[:3, 3] = origin
  return np.ascontiguousarray(data), affine


def check_nifti(path: str, limits: Limits | None = None) -> None:
  """Header-only: raises what read_nifti would for a header claiming too much."""
  hdr = peek_header(path)
  check_header(path, hdr, limits or DEFAULT, volume=len(hdr.get_data_shape()) >= 4)


def read_nifti(path: str, index: int | None = None, limits: Limits | None = None) -> Volume:
  check_nifti(path, limits)
  try:
    img = nib.load(path)
  except Exception as e:  # noqa: BLE001 - nibabel raises many types for bad headers
    raise ReadError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
  shape = tuple(int(s) for s in img.shape)
  if len(shape) > 4 or (len(shape) == 4 and shape[3] > 1 and index is None):
    what = f"{shape[3]} volumes along axis 4" if len(shape) == 4 else f"{len(shape)} dimensions"
    raise ReadError(f"{path}: {what} (shape {shape}); pass an index to select one volume")
  if img.get_data_dtype().fields is not None:
    raise ReadError(f"{path}: non-scalar NIfTI data type {img.get_data_dtype()} is not supported")
  try:
    if len(shape) == 4:
      t = 0 if index is None else index
      if not 0 <= t < shape[3]:
        raise ReadError(f"{path}: index {t} out of range for {shape[3]} volumes")
      data = np.asanyarray(img.dataobj[..., t])
    else:
      if index not in (None, 0):
        raise ReadError(f"{path}: index {index} given for a single-volume file")
      data = np.asanyarray(img.dataobj)
  except ReadError:
    raise
  except Exception as e:  # noqa: BLE001 - truncated / corrupt data: EOFError, zlib.error, OSError, ...
    raise ReadError(f"{path}: cannot read the image data ({type(e).__name__}: {e})") from None
  while data.ndim < 3:
    data = data[..., None]
  ornt = orientations.io_orientation(img.affine)
  ras = orientations.apply_orientation(data, ornt)
  affine_ras = img.affine @ orientations.inv_ornt_aff(ornt, data.shape)
  array, affine = ras_to_display(ras, affine_ras)
  meta: dict[str, Any] = dict(
      source_format="nifti", unit="raw", original_shape=list(shape), channels="gray",
      spacing=np.sqrt((affine[:3, :3] ** 2).sum(0)),
      orientation={"axcodes": list(nib.aff2axcodes(affine)), "affine": affine},
      index=index if len(shape) == 4 else None)
  return finish(array[..., None], meta, path)
