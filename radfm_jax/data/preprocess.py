"""Image preprocessing shared by training, evaluation and generation: intensity to [0,1], resize, channels.

One function, `prepare_sample`, turns a sample's stored volumes (native dtype, `[H, W, D, C]`, 2D images
with D = 1) into the model input `float32 [S, H, W, D, C_host]` in [0, 1], channels last. Training passes
an rng (random resized crop); evaluation and generation pass none and get a deterministic result.

Channels (`image_channels`, C_host): 1 (default) sends one gray channel and the model replicates it to
`cfg.vision.channels` on device (RadFM.encode_images) -- a third of the host work and transfer, and the
same patches, since RadFM's inputs are gray replicated to 3 channels. An RGB source with real colour is
converted to gray for C_host = 1 (ITU-R BT.601 luma, PIL's "L": 0.299 R + 0.587 G + 0.114 B, after the
intensity scaling); C_host = 3 keeps colour and replicates gray sources on the host (the old behaviour).

Grids (all from the data config, RadFM defaults in brackets):
- 2D images: `image_hw_2d` [512x512], repeated along depth to `depth_2d` [4].
- 3D volumes: `image_hw_3d` [256x256] x the depth bucket nearest to the native depth, from
  `depth_buckets` [4, 8, ..., 64]. A sample's images share one grid: the largest depth bucket of its 3D
  volumes (a 2D image in a 3D sample is repeated to that depth).
Intensity (`intensity`):
- "radfm": uint8 images / 255 (RadFM's ToTensor), everything else min-max over the whole volume.
- "minmax": min-max over the whole volume; a constant volume becomes 0.
- "window:NAME" or "window:CENTER,WIDTH": a CT window for volumes in Hounsfield units (others fall back
  to min-max). Names: see CT_WINDOWS.
Resizing: nearest for 3D (RadFM, torch `interpolate` semantics) and cubic for 2D by default
(`interpolation_3d`, `interpolation_2d`: nearest | linear | cubic).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

CT_WINDOWS = {  # name: (center, width) in HU
    "brain": (40.0, 80.0), "subdural": (75.0, 215.0), "soft_tissue": (40.0, 400.0),
    "mediastinum": (50.0, 350.0), "liver": (60.0, 160.0), "lung": (-600.0, 1500.0), "bone": (400.0, 1800.0),
}
_METHODS = ("nearest", "linear", "cubic")
IMAGE_DTYPES = ("float32", "uint16", "uint8")
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601 (PIL "L"): RGB -> gray for C_host = 1


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """The preprocessing settings (fields of the data config, see configs/common_data.py)."""
  image_hw_2d: tuple[int, int] = (512, 512)
  depth_2d: int = 4
  image_hw_3d: tuple[int, int] = (256, 256)
  depth_buckets: tuple[int, ...] = tuple(range(4, 65, 4))
  intensity: str = "radfm"
  interpolation_2d: str = "cubic"
  interpolation_3d: str = "nearest"
  crop_scale: tuple[float, float] = (0.8, 1.0)   # train-time random resized crop, area fraction
  crop_3d: bool = False                          # RadFM crops 2D images only
  image_channels: int = 1                        # C_host: 1 gray (model replicates on device) or 3
  image_dtype: str = "float32"                   # host/transport dtype: float32 in [0, 1], or uint16 /
  #                                                uint8 holding round(x * max): half / a quarter of the
  #                                                bytes through Grain workers and host->device; the model
  #                                                divides by the max on device (uint16's step 1.5e-5 is
  #                                                finer than bf16 resolves; uint8 is lossy)

  def __post_init__(self):
    if not self.depth_buckets or sorted(self.depth_buckets) != list(self.depth_buckets):
      raise ValueError(f"depth_buckets {self.depth_buckets} must be a non-empty increasing list")
    for name in ("interpolation_2d", "interpolation_3d"):
      if getattr(self, name) not in _METHODS:
        raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {_METHODS}")
    _window(self.intensity)  # validates
    if self.image_dtype not in IMAGE_DTYPES:
      raise ValueError(f"image_dtype={self.image_dtype!r}: expected one of {IMAGE_DTYPES}")
    if self.image_channels not in (1, 3):
      raise ValueError(f"image_channels={self.image_channels!r}: expected 1 (gray, replicated on device) or 3")

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> ImageSpec:
    """Builds the spec from a data ConfigDict (or dict); missing fields keep RadFM's defaults."""
    kw = {}
    for f in dataclasses.fields(cls):
      if f.name in cfg:
        v = cfg[f.name]
        kw[f.name] = tuple(v) if isinstance(v, (list, tuple)) else v
    return cls(**kw)

  @property
  def grid_2d(self) -> tuple[int, int, int]:
    return (*self.image_hw_2d, self.depth_2d)


def _window(intensity: str) -> tuple[float, float] | None:
  if intensity in ("radfm", "minmax"):
    return None
  if intensity.startswith("window:"):
    arg = intensity[len("window:"):]
    if arg in CT_WINDOWS:
      return CT_WINDOWS[arg]
    try:
      center, width = (float(x) for x in arg.split(","))
    except ValueError:
      center = width = None
    if width is not None and width > 0:
      return center, width
  raise ValueError(f"intensity {intensity!r}: expected radfm | minmax | window:NAME (one of "
                   f"{sorted(CT_WINDOWS)}) | window:CENTER,WIDTH")


def is_2d(shape: Sequence[int], meta: Mapping[str, Any] | None = None) -> bool:
  """A stored volume is 2D when its meta says so or its depth is 1."""
  if meta and "is_2d" in meta:
    return bool(meta["is_2d"])
  return int(shape[2]) == 1


def depth_bucket(depth: int, spec: ImageSpec) -> int:
  """The configured depth nearest to `depth` (ties go to the larger)."""
  return min(spec.depth_buckets, key=lambda b: (abs(b - depth), -b))


def sample_depth(shapes: Sequence[Sequence[int]], metas: Sequence[Mapping[str, Any] | None],
                 spec: ImageSpec) -> int:
  """The sample's depth bucket: the largest bucket of its 3D volumes, 0 when it has none (2D grid)."""
  return max([depth_bucket(int(s[2]), spec) for s, m in zip(shapes, metas) if not is_2d(s, m)], default=0)


def grid_of(depth: int, spec: ImageSpec) -> tuple[int, int, int]:
  """The (H, W, D) grid of a depth bucket (0 = the 2D grid)."""
  return spec.grid_2d if depth == 0 else (*spec.image_hw_3d, int(depth))


def sample_grid(shapes: Sequence[Sequence[int]], metas: Sequence[Mapping[str, Any] | None],
                spec: ImageSpec) -> tuple[int, int, int]:
  """The (H, W, D) grid every image of a sample is resized to (2D grid when it has no 3D volume)."""
  return grid_of(sample_depth(shapes, metas, spec), spec)


def intensity_range(volume: np.ndarray, meta: Mapping[str, Any] | None,
                    intensity: str) -> tuple[float, float]:
  """(lo, hi) such that (x - lo) / (hi - lo), clipped, is the [0, 1] image."""
  meta = meta or {}
  window = _window(intensity)
  if window is not None and meta.get("unit") == "HU":
    center, width = window
    return center - width / 2, center + width / 2
  if intensity == "radfm" and (meta.get("unit") == "uint8" or volume.dtype == np.uint8):
    return 0.0, 255.0
  return float(volume.min()), float(volume.max())


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
  """torch.nn.functional.interpolate(mode="nearest") source indices."""
  return np.minimum(np.floor(np.arange(n_out) * (n_in / n_out)).astype(np.int64), n_in - 1)


def _linear_index(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Half-pixel (align_corners=False) linear interpolation: lower, upper source index and weight."""
  src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
  lo = np.floor(src).astype(np.int64)
  return lo, np.minimum(lo + 1, n_in - 1), (src - lo).astype(np.float32)


def resize(volume: np.ndarray, out_hwd: Sequence[int], method: str) -> np.ndarray:
  """Resizes [H, W, D, C] to [*out_hwd, C].

  nearest: torch `interpolate(mode="nearest")` indices, keeps the dtype. linear / cubic: in-plane with
  Pillow's float resampling (antialiased when shrinking, as torchvision's PIL transforms that RadFM used
  for 2D images), depth linearly; float32.
  """
  h, w, d = (int(x) for x in out_hwd)
  if volume.shape[:3] == (h, w, d):
    return volume
  if method == "nearest":
    out = volume
    for axis, n in enumerate((h, w, d)):
      if out.shape[axis] != n:
        out = np.take(out, _nearest_index(out.shape[axis], n), axis=axis)
    return out
  resample = {"linear": Image.Resampling.BILINEAR, "cubic": Image.Resampling.BICUBIC}[method]
  vol = volume.astype(np.float32)
  if vol.shape[:2] != (h, w):
    planes = np.empty((h, w, *vol.shape[2:]), np.float32)
    for k in range(vol.shape[2]):
      for c in range(vol.shape[3]):
        planes[:, :, k, c] = np.asarray(Image.fromarray(vol[:, :, k, c], mode="F").resize((w, h), resample))
    vol = planes
  if vol.shape[2] != d:
    lo, hi, f = _linear_index(vol.shape[2], d)
    vol = vol[:, :, lo] * (1 - f)[:, None] + vol[:, :, hi] * f[:, None]
  return vol


def random_crop_box(h: int, w: int, rng: np.random.Generator, scale: tuple[float, float],
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """(top, left, height, width) of a random resized crop (torchvision's RandomResizedCrop rule)."""
  area = h * w
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
  return 0, 0, h, w


def prepare_image(volume: np.ndarray, meta: Mapping[str, Any] | None, spec: ImageSpec,
                  grid: Sequence[int], *, rng: np.random.Generator | None = None,
                  name: str = "volume", out: np.ndarray | None = None) -> np.ndarray:
  """One stored volume [H, W, D, C] -> float32 [*grid, spec.image_channels] in [0, 1] (or
  spec.image_dtype uint16/uint8: round(x * max)). `rng` only in training.

  `out` ([*grid, spec.image_channels] of spec.image_dtype, e.g. a row of a batch) is written in place.
  """
  vol = np.asarray(volume)
  if vol.ndim != 4 or vol.size == 0:
    raise ValueError(f"{name}: expected a non-empty [H, W, D, C] array, got shape {vol.shape}")
  if vol.shape[3] not in (1, 3, 4):
    raise ValueError(f"{name}: {vol.shape[3]} channels; expected 1 (grayscale), 3 (RGB) or 4 (RGBA)")
  if vol.shape[3] == 4:
    vol = vol[..., :3]
  if np.issubdtype(vol.dtype, np.floating) and not np.all(np.isfinite(vol)):
    raise ValueError(f"{name}: contains NaN or infinite values")
  flat = is_2d(vol.shape, meta)
  lo, hi = intensity_range(vol, meta, spec.intensity)
  if rng is not None and (flat or spec.crop_3d) and spec.crop_scale != (1.0, 1.0):
    top, left, ch, cw = random_crop_box(vol.shape[0], vol.shape[1], rng, spec.crop_scale)
    vol = vol[top:top + ch, left:left + cw]
  h, w, d = (int(x) for x in grid)
  method = spec.interpolation_2d if flat else spec.interpolation_3d
  vol = resize(vol, (h, w, 1 if flat else d), method)
  x = vol.astype(np.float32)  # one float pass at the output grid (x 1 or 3 channels), then in place
  x -= np.float32(lo)
  x *= np.float32(1.0 / (hi - lo)) if hi > lo else np.float32(0.0)
  np.clip(x, 0.0, 1.0, out=x)
  c = spec.image_channels
  if c == 1 and x.shape[3] == 3:  # real colour -> gray (a convex combination: stays in [0, 1])
    x = x @ _LUMA[:, None]
  dtype = np.dtype(spec.image_dtype)
  if out is None:
    out = np.empty((h, w, d, c), dtype)
  elif out.shape != (h, w, d, c) or out.dtype != dtype:
    raise ValueError(f"{name}: out buffer {out.shape} {out.dtype}, expected {(h, w, d, c)} {dtype}")
  if dtype != np.float32:  # quantise at the output grid (before the depth broadcast of 2D images)
    x = np.rint(x * np.float32(np.iinfo(dtype).max)).astype(dtype)
  out[...] = x  # broadcasts a 2D image along depth (and gray to 3 channels when C_host = 3)
  return out


def prepare_sample(volumes: Sequence[np.ndarray], metas: Sequence[Mapping[str, Any] | None],
                   spec: ImageSpec, *, rng: np.random.Generator | None = None,
                   names: Sequence[str] | None = None, grid: Sequence[int] | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
  """A sample's volumes -> float32 [S, H, W, D, C_host] on the sample's grid (or the `grid` given).

  `out` (float32 [>= S, H, W, D, C_host], C_host = spec.image_channels) receives the images in its
  first S slots, in place.
  """
  if grid is None:
    grid = sample_grid([v.shape for v in volumes], metas, spec)
  names = names or [f"image {i}" for i in range(len(volumes))]
  if out is None:
    out = np.empty((len(volumes), *grid, spec.image_channels), spec.image_dtype)
  for i, (vol, meta) in enumerate(zip(volumes, metas)):
    prepare_image(vol, meta, spec, grid, rng=rng, name=names[i], out=out[i])
  return out
