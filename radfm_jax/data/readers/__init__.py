"""Medical image readers behind one entry point: `read_scan(path, index=None) -> Volume`.

  from radfm_jax.data.readers import read_scan
  vol = read_scan("ct/series_dir")          # DICOM folder (one series, or index picks one)
  vol = read_scan(["a.dcm", "b.dcm"])       # the files of one DICOM series
  vol = read_scan("brain.nii.gz")           # NIfTI (4D: index picks the volume)
  vol = read_scan("cxr.png")                # PNG / JPEG / BMP / TIFF
  vol = read_scan("case.npy", index=2)      # .npy incl. RadFM's N x 3 x H x W x D case files
  vol.array  # [H, W, D, C] native dtype;  vol.meta  # allowlisted, see volume.py

Dispatch (`kind_of`): a list -> DICOM series; a folder -> DICOM folder; .nii / .nii.gz -> NIfTI;
picture suffixes -> pillow; .npy -> NumPy; .dcm or the DICOM preamble -> DICOM; anything else is
`NotAnImage`. Every failure is a `ReadError` (a ValueError) whose message names the file and the reason.

Hostile input: only regular files (or folders) are opened, so a FIFO or device node never blocks or
streams forever; every reader checks what its header claims against what the file holds and against a
size cap before it allocates (`limits.Limits`, default 512 Mi voxels / 2 GiB a scan; a scan over it is
a `TooLarge` ReadError): `read_scan(path, limits=Limits(max_voxels=..., max_bytes=...))`.
"""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence

from radfm_jax.data.readers import dicom, image, nifti, npy
from radfm_jax.data.readers.limits import Limits, TooLarge
from radfm_jax.data.readers.volume import META_KEYS, NotAnImage, ReadError, Volume

__all__ = ["META_KEYS", "Limits", "NotAnImage", "ReadError", "TooLarge", "Volume", "check_claims", "kind_of",
           "n_items", "not_regular", "read_scan"]

PathLike = str | os.PathLike
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def not_regular(path: PathLike) -> str | None:
  """None for a regular file or a folder (after symlinks); otherwise what the path is, e.g. "a FIFO",
  "a dangling symlink", "a symlink loop". Never opens the path."""
  try:
    mode = os.stat(path).st_mode
  except OSError as e:
    if os.path.islink(path):
      return "a symlink loop" if e.errno == errno.ELOOP else "a dangling symlink"
    return None  # missing: reported as "no such file" by the caller
  if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
    return None
  return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def kind_of(path: PathLike) -> str:
  """"dicom_folder" | "nifti" | "image" | "npy" | "dicom"; raises NotAnImage for anything else."""
  path = os.fspath(path)
  lower = path.lower()
  what = not_regular(path)
  if what is not None:
    raise ReadError(f"{path}: {what}, not a regular file (never opened)")
  if os.path.isdir(path):
    return "dicom_folder"
  if not os.path.exists(path):
    raise ReadError(f"{path}: no such file")
  if lower.endswith((".nii", ".nii.gz")):
    return "nifti"
  if lower.endswith(image.SUFFIXES):
    return "image"
  if lower.endswith(".npy"):
    return "npy"
  if dicom.is_dicom(path):
    return "dicom"
  suffix = os.path.splitext(lower)[1] or "no suffix"
  raise NotAnImage(f"{path}: not an image file ({suffix}; expected DICOM, NIfTI, PNG/JPEG or .npy)")


def n_items(path: PathLike) -> int:
  """How many scans a single file holds (4D NIfTI volumes, .npy case scans); 1 for the rest."""
  kind = kind_of(path)
  if kind == "nifti":
    return nifti.n_volumes(os.fspath(path))
  if kind == "npy":
    return npy.n_scans(os.fspath(path))
  return 1


def check_claims(path: PathLike | Sequence[PathLike], limits: Limits | None = None) -> None:
  """Header-only pre-check of a single file: raises the TooLarge (or ReadError) read_scan would raise
  for a header that claims more than the file holds or the cap allows, without decoding anything
  (a build runs it before hashing a file's bytes). Folders and series lists are checked by read_scan."""
  if isinstance(path, (list, tuple)):
    return
  path = os.fspath(path)
  kind = kind_of(path)
  check = {"nifti": nifti.check_nifti, "npy": npy.check_npy, "image": image.check_image,
           "dicom": dicom.check_file}.get(kind)
  if check is not None:
    check(path, limits)


def read_scan(path: PathLike | Sequence[PathLike], index: int | None = None,
              limits: Limits | None = None) -> Volume:
  """Reads one scan as a Volume ([H, W, D, C] + allowlisted meta). See the module docstring."""
  if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
    raise ReadError(f"{os.fspath(path) if not isinstance(path, (list, tuple)) else 'series'}: "
                    f"index {index!r} is not a non-negative integer")
  if isinstance(path, (list, tuple)):
    if index is not None:
      raise ReadError(f"index {index} given for a list of DICOM files (one series)")
    odd = [(os.fspath(p), w) for p in path if (w := not_regular(p)) is not None]
    if odd:
      raise ReadError(f"{odd[0][0]}: {odd[0][1]}, not a regular file (never opened)")
    missing = [os.fspath(p) for p in path if not os.path.isfile(p)]
    if missing:
      raise ReadError(f"{missing[0]}: no such file ({len(missing)} of the series' {len(path)} missing)")
    not_dicom = [os.fspath(p) for p in path if not dicom.is_dicom(os.fspath(p))]
    if not_dicom:
      raise ReadError(f"{not_dicom[0]}: a list of paths must be the DICOM files of one series")
    return dicom.read_series([os.fspath(p) for p in path], limits=limits)
  path = os.fspath(path)
  kind = kind_of(path)
  if kind == "dicom_folder":
    return dicom.read_folder(path, index, limits)
  if kind == "nifti":
    return nifti.read_nifti(path, index, limits)
  if kind == "npy":
    return npy.read_npy(path, index, limits)
  if index is not None:
    raise ReadError(f"{path}: index {index} given for a single-scan {kind} file")
  if kind == "image":
    return image.read_image(path, limits)
  return dicom.read_series([path], limits=limits)
