"""Synthetic but honest phantoms for the demo dataset: CT-like chests (HU), MR-like heads, X-ray-like
chest radiographs, with lesions whose finding, side, region and size are known.

Arrays follow the readers' display convention ([H, W, D]: H anterior -> posterior, or top -> bottom
for a radiograph; W patient right -> left; D inferior -> superior), so "left" means larger W and
"upper" means larger D in 3D (superior) and smaller H in 2D (top of the film). Values are physical:
CT in Hounsfield units (air -1000, lung -850, soft tissue 40, bone 700) with 15 HU Gaussian noise; MR
in arbitrary scanner units with Rician noise; radiographs as 8-bit film (dense = bright).

Findings per modality (`FINDINGS`): CT and X-ray "nodule" (round, soft-tissue density in a lung) and
"effusion" (fluid layering at the base of a lung: always "lower"); MR "tumor" (round, T2-bright) and
"hemorrhage" (round, T2-dark). Each lesion occupies one (side, region) quadrant; no two share one.
Sizes are big enough to survive resizing to 64x64x8 (3D) or 64x64 (2D): small ~ 1/10 and large ~ 1/5
of the field of view across.
"""
from __future__ import annotations

import dataclasses

import numpy as np

MODALITIES = ("CT", "MR", "X-ray")
FINDINGS = {"CT": ("nodule", "effusion"), "MR": ("tumor", "hemorrhage"), "X-ray": ("nodule", "effusion")}
ROUND = ("nodule", "tumor", "hemorrhage")
SIDES = ("left", "right")
REGIONS = ("upper", "lower")
SIZES = ("small", "large")
SHAPE_3D = (96, 96, 24)
SHAPE_2D = (128, 128)
SPACING = {"CT": (3.5, 3.5, 12.5), "MR": (2.4, 2.4, 6.0)}


@dataclasses.dataclass
class Lesion:
  finding: str
  side: str
  region: str
  size: str
  center: tuple[int, ...] = ()     # voxel (h, w[, d]) of round lesions
  radius: tuple[float, ...] = ()   # semi-axes along (h, w[, d])


@dataclasses.dataclass
class Phantom:
  modality: str
  lesions: list[Lesion]

  @property
  def labels(self) -> list[str]:
    return sorted({les.finding for les in self.lesions})

  @property
  def dim(self) -> str:
    return "2D" if self.modality == "X-ray" else "3D"


def _grid(shape):
  return np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")


def _ellipsoid(grid, center, radius):
  return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radius)) <= 1.0


def _side_w(side: str, right_w: float, left_w: float) -> float:
  return left_w if side == "left" else right_w


def _place_round(les: Lesion, rng: np.random.Generator, modality: str) -> Lesion:
  """Fills in center and radius of a round lesion from its side / region / size."""
  j = lambda k: int(rng.integers(-k, k + 1))  # noqa: E731
  if modality == "X-ray":
    r = 6.0 if les.size == "small" else 10.0
    center = (int((42 if les.region == "upper" else 74) + j(3)), int(_side_w(les.side, 40, 88) + j(3)))
    return dataclasses.replace(les, center=center, radius=(r, r))
  r, rd = (5.0, 2.5) if les.size == "small" else (9.0, 4.0)
  if modality == "CT":
    w = _side_w(les.side, 28, 68)
  else:
    w = _side_w(les.side, 32, 64)
  center = (int(42 + j(4)), int(w + j(3)), int((16 if les.region == "upper" else 7) + j(1)))
  return dataclasses.replace(les, center=center, radius=(r, r, rd))


def place(phantom: Phantom, rng: np.random.Generator) -> Phantom:
  return Phantom(phantom.modality, [_place_round(les, rng, phantom.modality) if les.finding in ROUND else les
                                    for les in phantom.lesions])


def _ct(ph: Phantom, rng: np.random.Generator) -> np.ndarray:
  g = _grid(SHAPE_3D)
  vol = np.full(SHAPE_3D, -1000.0, np.float32)
  vol[_ellipsoid(g[:2], (48, 48), (34, 44))] = 40.0
  lungs = {s: _ellipsoid(g, (44, _side_w(s, 28, 68), 12), (22, 15, 11)) for s in SIDES}
  for m in lungs.values():
    vol[m] = -850.0
  vol[_ellipsoid(g[:2], (72, 48), (6, 6))] = 700.0
  for les in ph.lesions:
    if les.finding == "effusion":
      thr = 56 if les.size == "small" else 48
      vol[lungs[les.side] & (g[0] > thr) & (g[2] < 11)] = 10.0
    else:
      vol[_ellipsoid(g, les.center, les.radius)] = 30.0
  vol += rng.normal(0, 15, SHAPE_3D).astype(np.float32)
  return np.rint(vol).astype(np.int16)


def _mr(ph: Phantom, rng: np.random.Generator) -> np.ndarray:
  g = _grid(SHAPE_3D)
  vol = np.zeros(SHAPE_3D, np.float32)
  vol[_ellipsoid(g, (48, 48, 12), (42, 36, 14))] = 250.0       # scalp and skull
  vol[_ellipsoid(g, (48, 48, 12), (38, 32, 12.5))] = 600.0     # brain
  for w in (43, 53):
    vol[_ellipsoid(g, (44, w, 12), (9, 3, 3.5))] = 1400.0      # ventricles (CSF, T2-bright)
  for les in ph.lesions:
    vol[_ellipsoid(g, les.center, les.radius)] = 1800.0 if les.finding == "tumor" else 120.0
  noise = rng.normal(0, 25, (2,) + SHAPE_3D).astype(np.float32)
  return np.rint(np.sqrt((vol + noise[0]) ** 2 + noise[1] ** 2)).astype(np.int16)


def _xray(ph: Phantom, rng: np.random.Generator) -> np.ndarray:
  g = _grid(SHAPE_2D)
  img = np.full(SHAPE_2D, 15.0, np.float32)
  img[_ellipsoid(g, (66, 64), (62, 58))] = 120.0
  lungs = {s: _ellipsoid(g, (58, _side_w(s, 40, 88)), (36, 18)) for s in SIDES}
  for m in lungs.values():
    img[m] = 55.0
  img[(np.abs(g[1] - 64) < 9) & (g[0] > 20)] = 150.0           # mediastinum and spine
  for les in ph.lesions:
    if les.finding == "effusion":
      thr = 82 if les.size == "small" else 70
      img[lungs[les.side] & (g[0] > thr)] = 170.0
    else:
      img[_ellipsoid(g, les.center, les.radius)] += 110.0
  img += rng.normal(0, 6, SHAPE_2D).astype(np.float32)
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render(ph: Phantom, rng: np.random.Generator) -> np.ndarray:
  """The phantom's pixels: int16 [96, 96, 24] (CT in HU, MR) or uint8 [128, 128] (X-ray)."""
  return {"CT": _ct, "MR": _mr, "X-ray": _xray}[ph.modality](ph, rng)
