"""Answer normalisation for RadBench scoring: text clean-up and group names.

Rules (applied identically to predictions and ground truth):

* `strip_image_tokens`: RadFM's image placeholders (`<image>`, `<image17>`, `</image>`) are removed.
* `normalize_answer` (SQuAD-style): Unicode NFKC, lower case, every character that is not a letter,
  digit or whitespace becomes a space, the articles "a", "an", "the" are dropped, whitespace is collapsed.
  "The X-ray." -> "x ray".
* Modality wordings (`canonical_modality`, `modality_group`) are read by the answer judge's modality
  reader (`eval.judge.modality`): adjectives, abbreviations, MRI sequence names, rejected modalities.
* Reading a closed answer (yes/no, options, hedges, negation) is the answer judge's job (`eval.judge`).
"""
from __future__ import annotations

import re
import unicodedata

from eval.judge import modality as _modality

_IMAGE_TOKEN = re.compile(r"</?image\d*>")
_NON_WORD = re.compile(r"[^\w\s]|_", flags=re.UNICODE)
_ARTICLES = frozenset({"a", "an", "the"})

YES, NO = "yes", "no"
MODALITIES = _modality.MODALITIES
DIMS = ("2D", "3D")
_EMPTY = frozenset({"", "nan", "none", "null", "n/a", "na"})


def strip_image_tokens(text: str) -> str:
  """Removes RadFM's `<image>`, `<imageN>` and `</image>` placeholders."""
  return _IMAGE_TOKEN.sub("", text)


def normalize_answer(text: str) -> str:
  """Lower case, punctuation to spaces, articles dropped, whitespace collapsed (see module doc)."""
  text = unicodedata.normalize("NFKC", strip_image_tokens(str(text))).lower()
  words = _NON_WORD.sub(" ", text).split()
  return " ".join(w for w in words if w not in _ARTICLES)


def is_empty(text) -> bool:
  """True for a missing ground truth: None, empty, only image tokens, or "nan" / "none" / "null" / "n/a"
  (what pandas and spreadsheets write for an empty cell)."""
  if text is None:
    return True
  return " ".join(strip_image_tokens(str(text)).split()).lower() in _EMPTY


def answer_tokens(text: str) -> list[str]:
  """The normalised words of `text` (the token unit of token F1 / recall)."""
  return normalize_answer(text).split()


def contains_phrase(normalized_text: str, normalized_phrase: str) -> bool:
  """Whole-word containment of a normalised phrase in a normalised text."""
  return bool(normalized_phrase) and f" {normalized_phrase} " in f" {normalized_text} "


def canonical_modality(text: str) -> str | None:
  """One of `MODALITIES` that the text commits to, or None (see `eval.judge.modality`)."""
  return _modality.canonical(text)


def modality_group(modality: str | None) -> str:
  """'CT' | 'MR' | 'X-ray' | 'other' for the per-modality breakdown; accepts any wording."""
  return _modality.group(modality)


def dim_group(dim: str | None) -> str:
  """'2D' | '3D' | 'other'."""
  d = str(dim or "").strip().upper()
  return d if d in DIMS else "other"
