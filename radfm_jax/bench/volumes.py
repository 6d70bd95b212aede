"""Benchmark inputs: CT-like int16 volumes in HU (shared by bench.store and bench.pipeline).

The real CT slice bundled with pydicom (693_J2KI.dcm, 512x512, resampled to H x W), shifted a little from
slice to slice as anatomy changes along the body, plus Gaussian noise of 12 HU (quantum noise keeps real CT
from compressing like a synthetic phantom).
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from pydicom.data import get_testdata_file

from radfm_jax.data.readers import read_scan


def ct_like_volumes(n: int, shape: tuple[int, int, int], seed: int = 0) -> list[np.ndarray]:
  """n int16 HU volumes [H, W, D, 1] built from pydicom's real CT slice (see the module docstring)."""
  h, w, d = shape
  hu = read_scan(get_testdata_file("693_J2KI.dcm", download=False)).array[:, :, 0, 0].astype(np.float32)
  hu = np.clip(hu, -1024, 3071)
  base = np.asarray(Image.fromarray(hu).resize((w + 24, h + 24), Image.BILINEAR))
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    vol = np.empty((h, w, d), np.float32)
    oy, ox = rng.integers(0, 8, 2)
    for k in range(d):
      dy, dx = 4 + oy + round(4 * np.sin(k / 9)), 4 + ox + round(4 * np.cos(k / 11))
      vol[:, :, k] = base[dy:dy + h, dx:dx + w] * (1 + 0.05 * np.sin(k / 7))
    vol += rng.normal(0, 12, vol.shape)
    out.append(np.clip(np.rint(vol), -1024, 3071).astype(np.int16)[..., None])
  return out
