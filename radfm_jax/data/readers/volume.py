"""`Volume`, the one thing every reader returns, its metadata allowlist and its sanity checks.

A `Volume` is `array` `[H, W, D, C]` in the file's native dtype (C = 1 or 3; 2D images have D = 1)
plus `meta`, a dict whose keys all come from `META_KEYS`. Nothing else from a file's header reaches
the store: readers build meta with `make_meta`, which refuses any other key, so identifying DICOM
fields (patient name, IDs, dates, UIDs, free text) cannot leak by accident.

Axis convention (all readers): H = image rows, W = image columns, D = slices. For an axial scan in the
usual radiological display, H runs anterior -> posterior, W patient right -> left and D inferior ->
superior (RAS axis codes ("P", "L", "S")). DICOM series keep their acquisition plane; NIfTI is made
closest-canonical RAS first and then shown the same way (see nifti.py).

Meta keys (all optional except unit, is_2d, original_shape, source_format):
  modality        DICOM modality code ("CT", "MR", "CR", "DX", ...) when the file says so
  body_part       DICOM BodyPartExamined (a code string, e.g. "CHEST")
  spacing         [dH, dW, dD] in mm, or None when the file carries no geometry (PNG, JPEG, .npy)
  orientation     {"axcodes": [3 RAS letters of H, W, D], "affine": 4x4 voxel (h, w, d) -> RAS mm}
  original_shape  the array's shape as stored in the file, before any reorientation or selection
  unit            "HU" (CT after rescale), "raw" (scanner units / unknown), "uint8" (8-bit pictures),
                  "dose_gy" (RT dose), "normalized" (RadFM .npy already in [0, 1])
  is_2d           D == 1
  source_format   "dicom" | "nifti" | "image" | "npy"
  photometric     DICOM PhotometricInterpretation of the source ("MONOCHROME1" is inverted on read)
  window          [center, width] of the first DICOM VOI window, when present
  index           the scan / time point selected from a multi-scan file
  n_frames        frames of a multi-frame DICOM file
  channels        "gray" or "rgb"; "gray_from_rgb" when three identical channels were collapsed to one
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

META_KEYS = frozenset({
    "modality", "body_part", "spacing", "orientation", "original_shape", "unit", "is_2d",
    "source_format", "photometric", "window", "index", "n_frames", "channels",
})


class ReadError(ValueError):
  """A file that cannot become a Volume; the message names the file and what was expected."""


class NotAnImage(ReadError):
  """A file that is not an image at all (text, DICOMDIR, structured report, ...)."""


@dataclasses.dataclass
class Volume:
  array: np.ndarray          # [H, W, D, C]
  meta: dict[str, Any]


def _jsonable(value: Any) -> Any:
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.floating,)):
    return float(value)
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  return value


def make_meta(**fields: Any) -> dict[str, Any]:
  """Meta through the allowlist: unknown keys are a programming error, values become plain JSON."""
  unknown = set(fields) - META_KEYS
  if unknown:
    raise KeyError(f"meta keys {sorted(unknown)} are not in the allowlist {sorted(META_KEYS)}")
  return {k: _jsonable(v) for k, v in fields.items() if v is not None}


def collapse_gray(array: np.ndarray) -> tuple[np.ndarray, str]:
  """[..., 3] with three identical channels -> [..., 1] (lossless); returns (array, channels)."""
  if array.shape[-1] == 3:
    if np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2]):
      return array[..., :1], "gray_from_rgb"
    return array, "rgb"
  return array, "gray"


def finish(array: np.ndarray, meta: dict[str, Any], where: str) -> Volume:
  """Checks a reader's output and wraps it: [H, W, D, C], C in (1, 3), non-empty, finite, not
  constant. Raises ReadError naming `where` otherwise (never repairs or substitutes data)."""
  if array.ndim != 4 or array.shape[-1] not in (1, 3):
    raise ReadError(f"{where}: expected an [H, W, D, C] array with C in (1, 3), got shape {array.shape}")
  if array.size == 0:
    raise ReadError(f"{where}: empty volume (shape {array.shape})")
  if array.dtype.kind not in "biuf":
    raise ReadError(f"{where}: unsupported dtype {array.dtype}")
  if array.dtype.kind == "f":
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
      raise ReadError(f"{where}: {bad} of {array.size} values are NaN or infinite")
  lo, hi = array.min(), array.max()
  if lo == hi:
    raise ReadError(f"{where}: constant volume (every value is {lo}): no image content")
  if not array.dtype.isnative:
    array = array.astype(array.dtype.newbyteorder("="))
  meta = dict(meta)
  meta["is_2d"] = array.shape[2] == 1
  return Volume(np.ascontiguousarray(array), make_meta(**meta))
