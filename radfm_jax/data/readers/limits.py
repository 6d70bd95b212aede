"""Size caps that bound the work any header can ask a reader for.

Every reader compares what a file's header claims (dimensions, frames, data type) with two things
before it allocates or decodes anything:
- what the file can hold: uncompressed pixel data must fit in the file's bytes (DICOM, NIfTI, .npy),
  an encapsulated DICOM needs at least one fragment per frame;
- a cap per scan (`Limits`): at most `max_voxels` values (H x W x D x C of the scan read) and
  `max_bytes` bytes of decoded data. A scan over the cap is a `TooLarge` ReadError naming the file,
  which a build records as a failure and `generate --image` reports as an error.

The defaults (512 Mi voxels, 2 GiB) sit far above any real CT / MR / radiograph (a 512 x 512 x 2000
CT series is 0.5 Gi voxels at 2 bytes = 1 GiB) and well below host memory; a reader holds at most a
few times the cap (the stored array, one rescaled copy). `python -m radfm_jax.data.build` sets them
with --max_voxels / --max_bytes; library callers pass `limits=Limits(...)` to `read_scan`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from radfm_jax.data.readers.volume import ReadError

DEFAULT_MAX_VOXELS = 512 * 2**20
DEFAULT_MAX_BYTES = 2 * 2**30


class TooLarge(ReadError):
  """A scan whose header claims more than the file holds or more than the size cap allows."""


@dataclasses.dataclass(frozen=True)
class Limits:
  max_voxels: int = DEFAULT_MAX_VOXELS
  max_bytes: int = DEFAULT_MAX_BYTES

  def __post_init__(self):
    if self.max_voxels < 1 or self.max_bytes < 1:
      raise ValueError(f"size caps must be positive, got max_voxels={self.max_voxels} "
                       f"max_bytes={self.max_bytes}")

  def check(self, where: str, shape: Sequence[int], itemsize: int, what: str = "scan") -> None:
    """Raises TooLarge naming `where` when a `shape` array of `itemsize`-byte values is over the cap."""
    if any(int(s) < 0 for s in shape):
      raise ReadError(f"{where}: negative dimension in the claimed shape {list(shape)}")
    voxels = math.prod(int(s) for s in shape)
    nbytes = voxels * int(itemsize)
    if voxels > self.max_voxels or nbytes > self.max_bytes:
      raise TooLarge(f"{where}: {what} of shape {list(shape)} ({voxels:,} values, {_size(nbytes)}) is over "
                     f"the size cap ({self.max_voxels:,} values, {_size(self.max_bytes)}; "
                     "raise it with --max_voxels / --max_bytes if the scan is genuine)")


def check_fits(where: str, claimed: int, available: int, what: str) -> None:
  """Raises TooLarge when a header claims `claimed` bytes of data but the file holds `available`."""
  if claimed > available:
    raise TooLarge(f"{where}: the header claims {what} ({_size(claimed)}) but the file holds only "
                   f"{_size(max(available, 0))}: corrupt or crafted header")


def _size(n: int) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.1f} {unit}"
  return f"{n} bytes"


DEFAULT = Limits()
