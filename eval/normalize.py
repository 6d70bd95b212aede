"""Answer normalisation for RadBench scoring: text clean-up, yes/no parsing, modality synonyms.

Rules (applied identically to predictions and ground truth):

* `strip_image_tokens`: RadFM's image placeholders (`<image>`, `<image17>`, `</image>`) are removed.
* `normalize_answer` (SQuAD-style): Unicode NFKC, lower case, every character that is not a letter,
  digit or whitespace becomes a space, the articles "a", "an", "the" are dropped, whitespace is collapsed.
  "The X-ray." -> "x ray".
* `parse_yes_no`: the first normalised word if it is "yes" or "no"; otherwise the only one of the two
  that occurs as a whole word; otherwise None (an unparseable answer is scored wrong).
* `canonical_modality`: maps free text to one of `MODALITIES` through `MODALITY_SYNONYMS`: the whole
  normalised answer is looked up first; otherwise the synonym mentioned *earliest* in the answer wins
  (longest synonym on ties), so "MRI, T2 weighted" -> "MR" and "CT of the chest" -> "CT". Synonyms in
  `EXACT_ONLY` (e.g. "us") count only as the whole answer, since they are ordinary English words.
  Mammography and fluoroscopy are kept as their own labels for recognition, and grouped under X-ray
  for the per-modality breakdown (`modality_group`).
"""
from __future__ import annotations

import re
import unicodedata

_IMAGE_TOKEN = re.compile(r"</?image\d*>")
_NON_WORD = re.compile(r"[^\w\s]|_", flags=re.UNICODE)
_ARTICLES = frozenset({"a", "an", "the"})

YES, NO = "yes", "no"

MODALITIES = ("CT", "MR", "X-ray", "Mammography", "Fluoroscopy", "Ultrasound", "PET", "Nuclear medicine")

# Canonical modality -> synonyms, written as they read *after* `normalize_answer`.
MODALITY_SYNONYMS: dict[str, tuple[str, ...]] = {
    "CT": ("ct", "computed tomography", "computerized tomography", "computerised tomography",
           "cat scan", "cta", "ct angiography", "hrct", "cect", "ncct", "mdct", "ct scan"),
    "MR": ("mr", "mri", "magnetic resonance", "magnetic resonance imaging", "mra", "mrcp",
           "mr angiography", "t1 weighted", "t2 weighted", "t1", "t2", "flair", "dwi",
           "diffusion weighted", "nmr"),
    "X-ray": ("x ray", "xray", "x rays", "radiograph", "radiography", "plain film", "plain radiograph",
              "roentgenogram", "cxr", "chest x ray", "cr", "dx", "projection radiography"),
    "Mammography": ("mammography", "mammogram", "mg", "tomosynthesis"),
    "Fluoroscopy": ("fluoroscopy", "barium swallow", "barium enema", "angiogram", "dsa",
                    "digital subtraction angiography", "rf", "xa"),
    "Ultrasound": ("ultrasound", "ultrasonography", "sonography", "sonogram", "us", "doppler",
                   "echocardiography", "echo"),
    "PET": ("pet", "positron emission tomography", "pet ct", "pet mr", "pt"),
    "Nuclear medicine": ("nuclear medicine", "scintigraphy", "spect", "bone scan", "nm"),
}
EXACT_ONLY = frozenset({"us", "echo", "pt", "rf", "mg", "nm", "t1", "t2", "xa", "dx", "cr"})

# Per-modality breakdown groups (the issue asks for CT / MR / X-ray; everything else is "other").
_GROUPS = {"CT": "CT", "MR": "MR", "X-ray": "X-ray", "Mammography": "X-ray", "Fluoroscopy": "X-ray"}
DIMS = ("2D", "3D")


def strip_image_tokens(text: str) -> str:
  """Removes RadFM's `<image>`, `<imageN>` and `</image>` placeholders."""
  return _IMAGE_TOKEN.sub("", text)


def normalize_answer(text: str) -> str:
  """Lower case, punctuation to spaces, articles dropped, whitespace collapsed (see module doc)."""
  text = unicodedata.normalize("NFKC", strip_image_tokens(str(text))).lower()
  words = _NON_WORD.sub(" ", text).split()
  return " ".join(w for w in words if w not in _ARTICLES)


def answer_tokens(text: str) -> list[str]:
  """The normalised words of `text` (the token unit of token F1 / recall)."""
  return normalize_answer(text).split()


def contains_phrase(normalized_text: str, normalized_phrase: str) -> bool:
  """Whole-word containment of a normalised phrase in a normalised text."""
  return bool(normalized_phrase) and f" {normalized_phrase} " in f" {normalized_text} "


def parse_yes_no(text: str) -> str | None:
  """'yes' / 'no' / None (see module doc)."""
  words = normalize_answer(text).split()
  if not words:
    return None
  if words[0] in (YES, NO):
    return words[0]
  has_yes, has_no = YES in words, NO in words
  if has_yes != has_no:
    return YES if has_yes else NO
  return None


def _synonym_table() -> list[tuple[str, str]]:
  table = [(syn, canon) for canon, syns in MODALITY_SYNONYMS.items() for syn in syns]
  table += [(normalize_answer(canon), canon) for canon in MODALITIES]
  return sorted(set(table), key=lambda sc: -len(sc[0]))


_SYNONYMS = _synonym_table()
_EXACT = {syn: canon for syn, canon in _SYNONYMS}


def canonical_modality(text: str) -> str | None:
  """One of `MODALITIES`, or None when the text names none (see module doc)."""
  norm = normalize_answer(text)
  if norm in _EXACT:
    return _EXACT[norm]
  padded = f" {norm} "
  best: tuple[int, int, str] | None = None
  for syn, canon in _SYNONYMS:
    if syn in EXACT_ONLY:
      continue
    pos = padded.find(f" {syn} ")
    if pos >= 0 and (best is None or (pos, -len(syn)) < best[:2]):
      best = (pos, -len(syn), canon)
  return best[2] if best else None


def modality_group(modality: str | None) -> str:
  """'CT' | 'MR' | 'X-ray' | 'other' for the per-modality breakdown; accepts any synonym."""
  canon = canonical_modality(modality) if modality else None
  return _GROUPS.get(canon, "other") if canon else "other"


def dim_group(dim: str | None) -> str:
  """'2D' | '3D' | 'other'."""
  d = str(dim or "").strip().upper()
  return d if d in DIMS else "other"
