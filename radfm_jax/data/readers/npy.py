"""NumPy .npy arrays -> `Volume`, including RadFM's RP3D case files.

Accepted layouts (the file is memory-mapped; only the selected scan is read):
  [H, W]                 2D gray
  [H, W, D]              3D gray (a trailing 3 is read as 3 slices, not RGB)
  [C, H, W, D]           RadFM's single scan, C in (1, 3) (checked first)
  [H, W, D, C]           channels last, C in (1, 3)
  [N, C, H, W, D]        RadFM's case file (`N_scans x 3 x H x W x z`): `index` selects scan n
                         (required when N > 1)
RadFM's three channels are replicated gray; they are stored as one channel (losslessly). Float data in
[0, 1] gets unit "normalized" (RadFM min-max output), uint8 "uint8", anything else "raw".

Bounded work: the header is parsed first; the data it claims must fit in the file, the scan to read (one
scan of a case file) must pass the size cap (limits.py; a sparse file of a few KB on disk can claim
gigabytes), and only integer / float arrays are accepted (bool masks, complex, strings and pickled
objects are ReadErrors naming the file).
"""
from __future__ import annotations

import math
import os

import numpy as np

from radfm_jax.data.readers.limits import DEFAULT, Limits, check_fits
from radfm_jax.data.readers.volume import ReadError, Volume, collapse_gray, finish


def peek(path: str) -> tuple[list[int], np.dtype]:
  """(shape, dtype) from the .npy header; checks the data it claims fits in the file."""
  try:
    with open(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
      shape, _, dtype = read(f)
      offset = f.tell()
  except Exception as e:  # noqa: BLE001 - bad magic, bad header dict, truncated header
    raise ReadError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from None
  shape = [int(s) for s in shape]
  if dtype.hasobject:
    raise ReadError(f"{path}: the array holds Python objects (dtype {dtype}); refused (pickled data)")
  if dtype.kind == "b":
    raise ReadError(f"{path}: boolean array (a mask?) is not an image; save it as uint8")
  if dtype.kind not in "iuf" or dtype.fields is not None:
    raise ReadError(f"{path}: unsupported dtype {dtype} (expected integers or floats)")
  check_fits(path, offset + math.prod(shape) * dtype.itemsize, os.path.getsize(path),
             f"shape {shape} of {dtype}")
  return shape, dtype


def n_scans(path: str) -> int:
  """Scans in a .npy file: N for a 5D case file, 1 otherwise (header only)."""
  shape, _ = peek(path)
  return shape[0] if len(shape) == 5 else 1


def check_npy(path: str, limits: Limits | None = None) -> None:
  """Header-only: raises what read_npy would for a header claiming too much (or a refused dtype)."""
  shape, dtype = peek(path)
  (limits or DEFAULT).check(path, shape[1:] if len(shape) == 5 else shape, dtype.itemsize, "array")


def read_npy(path: str, index: int | None = None, limits: Limits | None = None) -> Volume:
  check_npy(path, limits)
  try:
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
  except Exception as e:  # noqa: BLE001 - bad header, truncated data, pickled objects
    raise ReadError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from None
  shape = list(arr.shape)
  if arr.ndim == 5:
    if index is None and shape[0] != 1:
      raise ReadError(f"{path}: case file with {shape[0]} scans (shape {shape}); pass an index")
    n = 0 if index is None else index
    if not 0 <= n < shape[0]:
      raise ReadError(f"{path}: scan index {n} out of range for {shape[0]} scans")
    arr = arr[n]
  elif index not in (None, 0):
    raise ReadError(f"{path}: index {index} given for a single-scan array of shape {shape}")
  if arr.ndim == 2:
    arr = arr[:, :, None, None]
  elif arr.ndim == 3:
    arr = arr[..., None]
  elif arr.ndim == 4:
    if arr.shape[0] in (1, 3):
      arr = arr.transpose(1, 2, 3, 0)
    elif arr.shape[-1] not in (1, 3):
      raise ReadError(f"{path}: 4D array {shape} has no channel axis of size 1 or 3 at either end")
  else:
    raise ReadError(f"{path}: expected 2 to 5 dimensions, got shape {shape}")
  try:
    array = np.array(arr)
  except Exception as e:  # noqa: BLE001 - truncated file behind the memory map
    raise ReadError(f"{path}: cannot read the array data ({type(e).__name__}: {e})") from None
  array, channels = collapse_gray(array)
  if array.dtype.kind == "f" and array.size and np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1:
    unit = "normalized"
  else:
    unit = "uint8" if array.dtype == np.uint8 else "raw"
  meta = dict(source_format="npy", original_shape=shape, unit=unit, channels=channels,
              index=index if len(shape) == 5 else None)
  return finish(array, meta, path)
