"""DICOM series and multi-frame files -> `Volume` (pydicom; JPEG / JPEG 2000 decoded by pillow).

A series (the files of one SeriesInstanceUID, or one multi-frame file) becomes `[rows, cols, slices, C]`:
- Slices are sorted by their position along the slice normal (row cosines x column cosines), so D
  increases along the normal; every slice must share size and orientation, positions must be distinct
  and evenly spaced (a gap means missing slices). Violations are ReadErrors naming what differs, never
  silently stacked.
- Multi-frame files: enhanced CT/MR (per-frame functional groups: positions, orientation, spacing,
  rescale), RT dose (GridFrameOffsetVector, DoseGridScaling) and cine (no positions: file order).
- Values: the modality LUT (rescale slope / intercept) is applied per slice; CT comes out in Hounsfield
  units as int16 when the rescaled range fits (int32 otherwise), non-integer rescales as float32,
  files without rescale keep their stored dtype. MONOCHROME1 is inverted in the stored range so that
  higher always means brighter. Colour (RGB / YBR / palette) comes out as RGB, C = 3.
- Headers are read first without pixel data, then pixels one file at a time into a preallocated
  array, so a large series never holds more than the volume plus one slice.
- Before any frame list or pixel buffer exists, what the headers claim (rows x columns x frames x
  samples x bits) is checked against the size cap (limits.py) and, for uncompressed transfer syntaxes,
  against the bytes each file holds; an encapsulated (compressed) file needs at least one 8-byte
  fragment item per frame. A few-KB file claiming millions of frames is a TooLarge error, not an
  out-of-memory kill.
- Only allowlisted fields (volume.META_KEYS) leave this module.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pydicom.errors
import pydicom.pixels
from pydicom.multival import MultiValue

from radfm_jax.data.readers.limits import DEFAULT, Limits, check_fits
from radfm_jax.data.readers.volume import NotAnImage, ReadError, Volume, collapse_gray, finish

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_ORIENT_TOL = 1e-3
_SPACING_TOL = 0.25   # a gap may differ from the median slice spacing by at most 25%
_DEFER = 1 << 20      # header reads leave values over 1 MiB unread (a crafted length cannot allocate)
_BITS = (1, 8, 16, 32, 64)


def is_dicom(path: str) -> bool:
  """True for files with the DICOM preamble ("DICM" at byte 128) or a .dcm suffix."""
  if path.lower().endswith(".dcm"):
    return True
  try:
    with open(path, "rb") as f:
      f.seek(128)
      return f.read(4) == b"DICM"
  except OSError:
    return False


def _header(path: str) -> pydicom.Dataset:
  try:
    return pydicom.dcmread(path, stop_before_pixels=True, defer_size=_DEFER)
  except (pydicom.errors.InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError,
          MemoryError) as e:
    raise ReadError(f"{path}: not a readable DICOM file ({type(e).__name__}: {e})") from None


@dataclasses.dataclass
class _Frame:
  path: str
  frame: int | None                    # frame within a multi-frame file
  position: np.ndarray | None          # ImagePositionPatient (LPS mm)
  orientation: np.ndarray | None       # ImageOrientationPatient (6,)
  pixel_spacing: tuple[float, float] | None
  slope: float
  intercept: float
  instance: int


def _floats(value: Any) -> np.ndarray | None:
  return None if value is None else np.asarray([float(v) for v in value], np.float64)


def _item(ds: pydicom.Dataset, seq: str, *path: str) -> Any:
  """ds.seq[0].path... or None."""
  node = ds.get(seq)
  if not node:
    return None
  node = node[0]
  for name in path[:-1]:
    node = node.get(name)
    if not node:
      return None
    node = node[0]
  return node.get(path[-1])


def _spacing_of(ds: pydicom.Dataset) -> tuple[float, float] | None:
  value = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
  if value is None or len(value) != 2 or not all(float(v) > 0 for v in value):
    return None
  return float(value[0]), float(value[1])


def _int(ds: pydicom.Dataset, name: str, default: int, where: str) -> int:
  value = ds.get(name)
  if value is None or value == "":
    return default
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ReadError(f"{where}: {name} {value!r} is not an integer") from None


def _n_frames(ds: pydicom.Dataset, where: str) -> int:
  n = _int(ds, "NumberOfFrames", 1, where)
  if n < 1:
    raise ReadError(f"{where}: NumberOfFrames {n} (expected at least 1)")
  return n


def check_claim(path: str, ds: pydicom.Dataset) -> None:
  """Checks what one file's header claims against the bytes the file holds.

  Uncompressed pixel data (rows x cols x samples x bits per frame, 4:2:2 colour at 2/3) must fit in the
  file; an encapsulated file needs an 8-byte item per frame at least. Deflated files are bounded by
  the size cap only."""
  rows, cols = _int(ds, "Rows", 0, path), _int(ds, "Columns", 0, path)
  samples = _int(ds, "SamplesPerPixel", 1, path)
  bits = _int(ds, "BitsAllocated", 16, path)
  frames = _n_frames(ds, path)
  if rows < 1 or cols < 1 or samples not in (1, 3):
    raise ReadError(f"{path}: Rows {rows}, Columns {cols}, SamplesPerPixel {samples}: not an image size")
  if bits not in _BITS:
    raise ReadError(f"{path}: BitsAllocated {bits} (expected one of {_BITS})")
  per_frame = rows * cols * samples * bits
  if str(ds.get("PhotometricInterpretation", "")).endswith("_422"):
    per_frame = per_frame * 2 // 3
  per_frame = (per_frame + 7) // 8
  size = os.path.getsize(path)
  syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
  if syntax is not None and syntax.is_encapsulated:
    check_fits(path, frames * 8, size, f"{frames} compressed frames (at least 8 bytes each)")
  elif syntax is None or not syntax.is_deflated:
    check_fits(path, frames * per_frame, size,
               f"{frames} frame(s) x {rows} x {cols} x {samples} sample(s) x {bits} bits")


def check_file(path: str, limits: Limits | None = None) -> None:
  """Header-only: raises what read_series([path]) would for a header claiming too much."""
  ds = _header(path)
  if "Rows" not in ds:
    return
  check_claim(path, ds)
  channels = 3 if _int(ds, "SamplesPerPixel", 1, path) == 3 or ds.get("PhotometricInterpretation") == \
      "PALETTE COLOR" else 1
  (limits or DEFAULT).check(path, [_int(ds, "Rows", 0, path), _int(ds, "Columns", 0, path), _n_frames(ds, path),
                                   channels], max(1, _int(ds, "BitsAllocated", 16, path) // 8), "series")


def _frames_of(path: str, ds: pydicom.Dataset) -> list[_Frame]:
  """One _Frame per 2D image in the file."""
  n = _n_frames(ds, path)
  slope = float(ds.get("RescaleSlope", 1) or 1)
  intercept = float(ds.get("RescaleIntercept", 0) or 0)
  if ds.get("Modality") == "RTDOSE" and "DoseGridScaling" in ds:
    slope = float(ds.DoseGridScaling)
  instance = int(ds.get("InstanceNumber") or 0)
  position, orientation = _floats(ds.get("ImagePositionPatient")), _floats(ds.get("ImageOrientationPatient"))
  spacing = _spacing_of(ds)
  if n == 1:
    return [_Frame(path, None, position, orientation, spacing, slope, intercept, instance)]
  frames = []
  shared = ds.get("SharedFunctionalGroupsSequence")
  per = ds.get("PerFrameFunctionalGroupsSequence")
  offsets = _floats(ds.get("GridFrameOffsetVector"))
  for k in range(n):
    def find(seq, *attr, k=k):
      for groups in (per[k] if per and k < len(per) else None, shared[0] if shared else None):
        if groups is not None:
          value = _item(groups, seq, *attr)
          if value is not None:
            return value
      return None
    pos = _floats(find("PlanePositionSequence", "ImagePositionPatient"))
    ori = _floats(find("PlaneOrientationSequence", "ImageOrientationPatient"))
    ori = orientation if ori is None else ori
    ps = find("PixelMeasuresSequence", "PixelSpacing")
    sl = find("PixelValueTransformationSequence", "RescaleSlope")
    ic = find("PixelValueTransformationSequence", "RescaleIntercept")
    if pos is None and offsets is not None and position is not None and orientation is not None:
      pos = position + offsets[k] * np.cross(orientation[:3], orientation[3:])
    frames.append(_Frame(path, k, pos, ori, (float(ps[0]), float(ps[1])) if ps else spacing,
                         float(sl) if sl is not None else slope, float(ic) if ic is not None else intercept,
                         k))
  return frames


def _describe(values: list[Any]) -> str:
  return ", ".join(f"{v} x{c}" for v, c in collections.Counter(values).most_common(4))


def _sort(frames: list[_Frame], where: str) -> tuple[list[_Frame], float | None, np.ndarray | None]:
  """Sorted frames, slice spacing along D (None when unknown) and the D step vector (LPS)."""
  if len(frames) == 1:
    return frames, None, None
  oris = [f.orientation for f in frames]
  if any(o is None for o in oris) or any(f.position is None for f in frames):
    if frames[0].frame is None:   # several single-frame files
      raise ReadError(f"{where}: {len(frames)} images without ImagePositionPatient / "
                      "ImageOrientationPatient do not form a volume; reference each file separately")
    return sorted(frames, key=lambda f: f.instance), None, None  # cine: file order
  ref = oris[0]
  if any(not np.allclose(o, ref, atol=_ORIENT_TOL) for o in oris):
    raise ReadError(f"{where}: inconsistent series: slices have {len({tuple(np.round(o, 3)) for o in oris})} "
                    "different orientations (a localizer or radial series is not a volume)")
  normal = np.cross(ref[:3], ref[3:])
  frames = sorted(frames, key=lambda f: float(f.position @ normal))
  along = np.array([float(f.position @ normal) for f in frames])
  gaps = np.diff(along)
  median = float(np.median(gaps))
  if np.any(gaps < 1e-3) or median <= 0:
    dup = int(np.sum(gaps < 1e-3)) + 1
    raise ReadError(f"{where}: {dup} slices share a position: the series holds several volumes "
                    "(echoes, phases or time points); reference each volume's files separately")
  if np.any(np.abs(gaps - median) > _SPACING_TOL * median):
    raise ReadError(f"{where}: irregular slice spacing (gaps from {gaps.min():.3g} to {gaps.max():.3g} mm, "
                    f"median {median:.3g} mm): missing slices?")
  step = (frames[-1].position - frames[0].position) / (len(frames) - 1)
  return frames, float(np.linalg.norm(step)), step


def _pixels(ds: pydicom.Dataset, where: str) -> np.ndarray:
  try:
    arr = ds.pixel_array
  except Exception as e:  # noqa: BLE001 - pydicom raises RuntimeError/ValueError/... per plugin
    syntax = ds.file_meta.get("TransferSyntaxUID")
    name = getattr(syntax, "name", str(syntax))
    hint = (" (decoding it needs python-gdcm or pylibjpeg)"
            if "missing dependencies" in str(e) else "")
    raise ReadError(f"{where}: cannot decode pixel data, transfer syntax {name}{hint}: "
                    f"{str(e).splitlines()[0]}") from None
  if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
    arr = pydicom.pixels.apply_color_lut(arr, ds)
  return arr


def _target_dtype(raw_ranges: list[tuple[float, float]], frames: list[_Frame],
                  stored: np.dtype) -> np.dtype:
  rescaled = any(f.slope != 1 or f.intercept != 0 for f in frames)
  if not rescaled:
    return stored
  if not all(float(f.slope).is_integer() and float(f.intercept).is_integer() for f in frames):
    return np.dtype(np.float32)
  lo = min(min(a * f.slope, b * f.slope) + f.intercept for (a, b), f in zip(raw_ranges, frames))
  hi = max(max(a * f.slope, b * f.slope) + f.intercept for (a, b), f in zip(raw_ranges, frames))
  for dtype in (np.int16, np.int32):
    info = np.iinfo(dtype)
    if info.min <= lo and hi <= info.max:
      return np.dtype(dtype)
  return np.dtype(np.float32)


def read_series(paths: Sequence[str], where: str | None = None, limits: Limits | None = None) -> Volume:
  """The files of one series (or one multi-frame file) -> Volume. Raises TooLarge (a ReadError) when the
  headers claim more than the files hold or more than `limits` allows, before reading any pixels."""
  limits = limits or DEFAULT
  paths = [os.fspath(p) for p in paths]
  if not paths:
    raise ReadError(f"{where}: empty DICOM series")
  where = where or (paths[0] if len(paths) == 1 else f"{os.path.dirname(paths[0])} ({len(paths)} files)")
  headers = {p: _header(p) for p in paths}
  no_pixels = [p for p, ds in headers.items() if "Rows" not in ds]
  if no_pixels:
    sop = headers[no_pixels[0]].get("SOPClassUID")
    kind = getattr(sop, "name", None) or ("DICOMDIR" if "DirectoryRecordSequence" in headers[no_pixels[0]] else "?")
    raise NotAnImage(f"{where}: DICOM without pixel data ({kind})")
  series = {ds.get("SeriesInstanceUID") for ds in headers.values()}
  if len(series) > 1:
    raise ReadError(f"{where}: files belong to {len(series)} different series")
  for p, ds in headers.items():
    check_claim(p, ds)
  multi = [p for p, ds in headers.items() if _n_frames(ds, p) > 1]
  if multi and len(paths) > 1:
    raise ReadError(f"{where}: a series of {len(paths)} files including multi-frame files is not supported")
  sizes = [(int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1))) for ds in headers.values()]
  if len(set(sizes)) > 1:
    raise ReadError(f"{where}: inconsistent series: slice sizes (rows, cols, samples) {_describe(sizes)}")
  total = sum(_n_frames(ds, p) for p, ds in headers.items())
  first_ds = headers[paths[0]]
  channels = 3 if sizes[0][2] == 3 or first_ds.get("PhotometricInterpretation") == "PALETTE COLOR" else 1
  itemsize = max(1, _int(first_ds, "BitsAllocated", 16, paths[0]) // 8)
  limits.check(where, [sizes[0][0], sizes[0][1], total, channels], itemsize, "series")
  frames = [f for p in paths for f in _frames_of(p, headers[p])]
  frames, slice_spacing, step = _sort(frames, where)
  first = headers[frames[0].path]
  rows, cols, samples = sizes[0]
  photometric = str(first.get("PhotometricInterpretation", ""))

  raw = None
  ranges: list[tuple[float, float]] = [(0.0, 0.0)] * len(frames)
  order = {(f.path, f.frame): k for k, f in enumerate(frames)}
  for p in dict.fromkeys(f.path for f in frames):
    try:
      ds = pydicom.dcmread(p, defer_size=_DEFER)   # unread: values no one asks for (a crafted length)
    except Exception as e:  # noqa: BLE001
      raise ReadError(f"{where}: cannot read {p} ({type(e).__name__}: {e})") from None
    arr = _pixels(ds, where)
    n = _n_frames(ds, p)
    arr = arr.reshape((n, rows, cols, -1))
    if raw is None:
      raw = np.empty((rows, cols, len(frames), arr.shape[-1]), arr.dtype)
    for k in range(n):
      d = order[(p, None if n == 1 else k)]
      raw[:, :, d] = arr[k]
      ranges[d] = (float(arr[k].min()), float(arr[k].max()))
    del arr, ds

  if photometric == "MONOCHROME1":
    bits = int(first.get("BitsStored", raw.dtype.itemsize * 8))
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if raw.dtype.kind == "i" else (0, (1 << bits) - 1)
    raw = (lo + hi - raw.astype(np.int64)).astype(raw.dtype)
    ranges = [(lo + hi - b, lo + hi - a) for a, b in ranges]
  dtype = _target_dtype(ranges, frames, raw.dtype)
  if dtype == raw.dtype and all(f.slope == 1 and f.intercept == 0 for f in frames):
    out = raw
  else:
    out = np.empty(raw.shape, dtype)
    for d, f in enumerate(frames):
      out[:, :, d] = (raw[:, :, d].astype(np.float64) * f.slope + f.intercept).astype(dtype)
    del raw
  out, channels = collapse_gray(out)

  modality = first.get("Modality") or None
  spacing2 = frames[0].pixel_spacing
  thickness = first.get("SpacingBetweenSlices") or first.get("SliceThickness")
  dz = slice_spacing if slice_spacing is not None else (float(thickness) if thickness else None)
  meta: dict[str, Any] = dict(
      modality=modality, body_part=first.get("BodyPartExamined") or None, source_format="dicom",
      original_shape=[rows, cols, len(frames)] + ([samples] if samples > 1 else []),
      photometric=photometric or None, channels=channels,
      n_frames=_n_frames(first, where) if multi else None)
  if spacing2 is not None:
    meta["spacing"] = [spacing2[0], spacing2[1], dz if dz is not None else 1.0]
  ori = frames[0].orientation
  if ori is not None and frames[0].position is not None and spacing2 is not None:
    if step is None:
      step = np.cross(ori[:3], ori[3:]) * (dz or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = ori[3:] * spacing2[0]    # row index h moves along the column cosines
    lps[:3, 1] = ori[:3] * spacing2[1]    # column index w moves along the row cosines
    lps[:3, 2] = step
    lps[:3, 3] = frames[0].position
    affine = _LPS_TO_RAS @ lps
    meta["orientation"] = {"axcodes": list(nib.aff2axcodes(affine)), "affine": affine}
  if modality == "CT" and any(f.slope != 1 or f.intercept != 0 for f in frames):
    meta["unit"] = "HU"
  elif modality == "RTDOSE":
    meta["unit"] = "dose_gy"
  elif out.dtype == np.uint8:
    meta["unit"] = "uint8"
  else:
    meta["unit"] = "raw"
  center, width = first.get("WindowCenter"), first.get("WindowWidth")
  if center is not None and width is not None:
    first_of = lambda v: float(v[0]) if isinstance(v, MultiValue) else float(v)  # noqa: E731
    meta["window"] = [first_of(center), first_of(width)]
  return finish(out, meta, where)


def group_series(paths: Sequence[str]) -> tuple[list[list[str]], list[tuple[str, str]]]:
  """DICOM files -> (series as lists of paths, [(path, reason)] for files that are not images).

  Groups by SeriesInstanceUID (plus size, so a mixed series still reaches the reader, which reports
  it); series are ordered by SeriesNumber then first path. Unreadable headers are kept as one-file
  series so the reader reports them."""
  groups: dict[Any, list[str]] = {}
  skipped: list[tuple[str, str]] = []
  order: dict[Any, tuple] = {}
  for p in sorted(paths):
    try:
      ds = pydicom.dcmread(p, stop_before_pixels=True,
                           specific_tags=["SeriesInstanceUID", "SeriesNumber", "Rows", "SOPClassUID",
                                          "ImagePositionPatient", "NumberOfFrames"])
    except Exception:  # noqa: BLE001
      groups[("unreadable", p)] = [p]
      order[("unreadable", p)] = (0, p)
      continue
    if "Rows" not in ds:
      kind = getattr(ds.get("SOPClassUID"), "name", None) or "no SOP class"
      skipped.append((p, f"DICOM without pixel data ({kind})"))
      continue
    uid = ds.get("SeriesInstanceUID") or ("no-uid", p)
    if "ImagePositionPatient" not in ds:   # no geometry (radiographs, secondary captures): one image each
      uid = (uid, p)
    key = (os.path.dirname(p), uid)
    groups.setdefault(key, []).append(p)
    order.setdefault(key, (int(ds.get("SeriesNumber") or 0), p))
  series = [groups[k] for k in sorted(groups, key=lambda k: order[k])]
  return series, skipped


def read_folder(folder: str, index: int | None = None, limits: Limits | None = None) -> Volume:
  """All DICOM files directly in `folder`: one series, or series `index` (by SeriesNumber) of several."""
  files = [os.path.join(folder, n) for n in sorted(os.listdir(folder))
           if os.path.isfile(os.path.join(folder, n)) and is_dicom(os.path.join(folder, n))]
  series, _ = group_series(files)
  if not series:
    raise NotAnImage(f"{folder}: no DICOM images in this folder")
  if index is None:
    if len(series) > 1:
      raise ReadError(f"{folder}: the folder holds {len(series)} DICOM series; pass an index "
                      f"(0..{len(series) - 1}) or reference one series' files")
    index = 0
  if not 0 <= index < len(series):
    raise ReadError(f"{folder}: series index {index} out of range (the folder holds {len(series)})")
  return read_series(series[index], where=folder, limits=limits)
