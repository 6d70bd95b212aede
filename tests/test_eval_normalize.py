"""eval.normalize: text clean-up, missing ground truth, modality names (read by eval.judge.modality)."""
import pytest

from eval import normalize


@pytest.mark.parametrize("text,expected", [
    ("The X-ray.", "x ray"),
    ("  An   MRI, T2-weighted!  ", "mri t2 weighted"),
    ("Is this<image><image3></image> a CT?", "is this ct"),
    ("Ｃｏｍｐｕｔｅｄ  Tomography", "computed tomography"),  # NFKC full-width
])
def test_normalize_answer(text, expected):
  assert normalize.normalize_answer(text) == expected


@pytest.mark.parametrize("text,expected", [
    (None, True), ("", True), ("  ", True), ("nan", True), ("NaN", True), ("None", True), ("null", True),
    ("N/A", True), ("<image></image>", True), ("no", False), ("0", False), ("Normal chest.", False),
])
def test_is_empty(text, expected):
  assert normalize.is_empty(text) is expected


def test_modality_names_and_groups():
  assert [normalize.canonical_modality(t) for t in ("MRI, T2 weighted", "Axial CT of the chest.", "US", "a photo")] == [
      "MR", "CT", "Ultrasound", None]
  assert [normalize.modality_group(m) for m in ("CT", "MRI", "radiograph", "mammography", "US", None)] == [
      "CT", "MR", "X-ray", "X-ray", "other", "other"]
  assert [normalize.dim_group(d) for d in ("2D", "3d", None, "4D")] == ["2D", "3D", "other", "other"]
