"""eval.normalize and the closed-answer rules of eval.metrics.classification."""
import pytest

from eval import normalize
from eval.metrics import classification


@pytest.mark.parametrize("text,expected", [
    ("The X-ray.", "x ray"),
    ("  An   MRI, T2-weighted!  ", "mri t2 weighted"),
    ("Is this<image><image3></image> a CT?", "is this ct"),
    ("Ｃｏｍｐｕｔｅｄ  Tomography", "computed tomography"),  # NFKC full-width
])
def test_normalize_answer(text, expected):
  assert normalize.normalize_answer(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("CT", "CT"), ("computed tomography", "CT"), ("Axial CT of the chest.", "CT"),
    ("MRI", "MR"), ("MR", "MR"), ("Magnetic resonance imaging", "MR"), ("MRI, T2 weighted", "MR"),
    ("T2", "MR"), ("X-ray", "X-ray"), ("xray", "X-ray"), ("Radiograph", "X-ray"), ("CR", "X-ray"),
    ("DX", "X-ray"), ("plain film of the hand", "X-ray"), ("US", "Ultrasound"),
    ("ultrasound", "Ultrasound"), ("PET-CT", "PET"), ("mammogram", "Mammography"),
    ("This is a CT scan, not an MRI.", "CT"),  # the earliest mention wins
    ("it shows us the liver", None),  # 'us' counts only as the whole answer
    ("a photograph", None), ("", None),
])
def test_canonical_modality(text, expected):
  assert normalize.canonical_modality(text) == expected


def test_modality_and_dim_groups():
  assert [normalize.modality_group(m) for m in ("CT", "MRI", "radiograph", "mammography", "US", None)] == [
      "CT", "MR", "X-ray", "X-ray", "other", "other"]
  assert [normalize.dim_group(d) for d in ("2D", "3d", None, "4D")] == ["2D", "3D", "other", "other"]


@pytest.mark.parametrize("text,expected", [
    ("Yes.", "yes"), ("no, there is no effusion", "no"), ("There is no effusion.", "no"),
    ("I think yes", "yes"), ("yes and no", "yes"), ("maybe yes maybe no", None), ("effusion", None), ("", None),
])
def test_parse_yes_no(text, expected):
  assert normalize.parse_yes_no(text) == expected


@pytest.mark.parametrize("pred,ref,choices,expected", [
    ("Yes, it is.", "yes", None, True),
    ("No.", "yes", None, False),
    ("The left lung.", "left lung", None, True),          # normalised exact match
    ("lesion in the left lung", "left lung", None, True),  # containment without choices
    ("right lung", "left lung", None, False),
    ("left lung", "left lung", ["left lung", "right lung"], True),
    ("left lung and right lung", "left lung", ["left lung", "right lung"], False),  # names two choices
    ("left lung", "lung", ["lung", "left lung"], False),   # 'lung' is inside the named 'left lung'
])
def test_closed_correct(pred, ref, choices, expected):
  assert classification.closed_correct(pred, ref, choices) is expected


def test_modality_correct_and_labels():
  assert classification.modality_correct("It is an MRI scan.", "MR")
  assert not classification.modality_correct("CT", "MRI")
  assert classification.modality_correct("no", "No")  # yes/no modality questions
  assert classification.modality_correct("angio-fluoro", "angio-fluoro")  # unrecognised: exact match
  assert classification.modality_label("a photo") == "unrecognized"
  assert classification.split_labels("Pneumonia, pleural effusion and atelectasis") == [
      "atelectasis", "pleural effusion", "pneumonia"]
  assert classification.predicted_labels("small pleural effusion, no pneumonia",
                                         ["effusion", "pleural effusion", "pneumonia"]) == [
      "pleural effusion", "pneumonia"]  # negation is not detected (documented)
