"""PNG / JPEG / BMP / TIFF -> `Volume` (pillow).

A picture becomes `[H, W, 1, C]`: grayscale (C = 1: modes 1, L, I;16, I, F keep their depth: uint8,
uint16, int32, float32) or RGB (C = 3, uint8). RGB pictures whose three channels are identical (X-rays
saved as RGB) are stored as gray, losslessly. Alpha is dropped, palettes are expanded, EXIF rotation is
applied. Multi-page files (TIFF stacks) become `[H, W, pages, C]`. Pictures carry no physical
geometry: spacing is None, unit "uint8" for 8-bit data and "raw" otherwise.

Bounded work: pillow reads the header only on open (its decompression-bomb guard refuses more than
2 x PIL.Image.MAX_IMAGE_PIXELS pixels there); the size x pages x channels it claims must then pass the
size cap (limits.py) before any page is decoded.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

from radfm_jax.data.readers.limits import DEFAULT, Limits, TooLarge
from radfm_jax.data.readers.volume import ReadError, Volume, collapse_gray, finish

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
_GRAY = {"1": "L", "L": "L", "LA": "L", "I;16": None, "I;16B": None, "I;16L": None, "I": None, "F": None}
_ITEMSIZE = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4, "F": 4}


def _check_size(path: str, img: Image.Image, limits: Limits) -> None:
  width, height = img.size
  pages = int(getattr(img, "n_frames", 1))
  channels = 1 if img.mode in _GRAY else 3
  limits.check(path, [height, width, pages, channels], _ITEMSIZE.get(img.mode, 1), "picture")


def _page(page: Image.Image) -> np.ndarray:
  mode = page.mode
  if mode in _GRAY:
    img = page.convert(_GRAY[mode]) if _GRAY[mode] else page
    arr = np.asarray(img)
    if arr.dtype.byteorder == ">":
      arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr[..., None]
  if mode == "P":
    page = page.convert("RGBA" if "transparency" in page.info else "RGB")
  return np.asarray(page.convert("RGB"))


def check_image(path: str, limits: Limits | None = None) -> None:
  """Header-only: raises what read_image would for a picture claiming too much (or not a picture)."""
  try:
    with Image.open(path) as img:
      _check_size(path, img, limits or DEFAULT)
  except ReadError:
    raise
  except Image.DecompressionBombError as e:
    raise TooLarge(f"{path}: refused by pillow's decompression-bomb guard ({e})") from None
  except Exception:  # noqa: BLE001 - unidentified or corrupt: read_image reports it
    return


def read_image(path: str, limits: Limits | None = None) -> Volume:
  try:
    with Image.open(path) as img:
      _check_size(path, img, limits or DEFAULT)
      pages = [_page(ImageOps.exif_transpose(p) if i == 0 else p)
               for i, p in enumerate(ImageSequence.Iterator(img))]
  except ReadError:
    raise
  except UnidentifiedImageError:
    raise ReadError(f"{path}: not a picture pillow can identify") from None
  except Image.DecompressionBombError as e:
    raise TooLarge(f"{path}: refused by pillow's decompression-bomb guard ({e})") from None
  except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
    raise ReadError(f"{path}: cannot decode the picture ({type(e).__name__}: {e})") from None
  if len({p.shape for p in pages}) > 1:
    raise ReadError(f"{path}: pages of different sizes {sorted({p.shape for p in pages})}")
  array = np.stack(pages, axis=2)
  array, channels = collapse_gray(array)
  meta = dict(source_format="image", original_shape=list(pages[0].shape[:2]) + (
      [len(pages)] if len(pages) > 1 else []) + ([3] if pages[0].shape[-1] == 3 else []),
              unit="uint8" if array.dtype == np.uint8 else "raw", channels=channels)
  return finish(array, meta, path)
