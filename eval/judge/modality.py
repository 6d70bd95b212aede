"""Imaging modality wordings: nouns, adjectives, abbreviations, MRI sequence names, with their status.

`mentions(text)` finds every modality wording in an answer, longest first ("CT angiography" is CT,
"PET/CT" is PET, "MR angiography" is MR, plain "angiography" is fluoroscopy), each with its
ConText status, so that a rejected modality ("not a CT, this is an MRI") never wins.
`canonical(text)` is the one modality an answer commits to (None when it names none, rejects all,
hedges or names several).

Abbreviations that are ordinary English words or other things ("US", "CR", "DX", "MG", "NM", "PT",
"RF", "XA") count only when written in capitals; T1 / T2 count unless they name a vertebra
("T2 vertebral body").
"""
from __future__ import annotations

from typing import Sequence

from eval.judge import context
from eval.judge.context import ASSERTED, NEGATED, UNCERTAIN, Mention

MODALITIES = ("CT", "MR", "X-ray", "Mammography", "Fluoroscopy", "Ultrasound", "PET", "Nuclear medicine")

# Canonical modality -> wordings (lower case, tokens as `context.clauses` writes them: hyphens and
# slashes are spaces).
WORDINGS: dict[str, tuple[str, ...]] = {
    "CT": ("ct", "cts", "cta", "ctpa", "ctv", "hrct", "cect", "nect", "ncct", "mdct", "cbct", "ct scan",
           "computed tomography", "computed tomographic", "computerized tomography", "computerised tomography",
           "computerized tomographic", "computerised tomographic", "cat scan", "ct angiography",
           "ct angiogram", "ct perfusion", "ct urography", "cone beam ct", "multidetector ct", "ct colonography"),
    "MR": ("mr", "mri", "mris", "mra", "mrv", "mrcp", "fmri", "nmr", "magnetic resonance",
           "magnetic resonance imaging", "magnetic resonance angiography", "mr angiography", "mr imaging",
           "mr angiogram", "t1", "t2", "t1w", "t2w", "t1wi", "t2wi", "t1 weighted", "t2 weighted",
           "t2 star", "flair", "dwi", "adc", "adc map", "swi", "stir", "gre", "fiesta", "dce",
           "diffusion weighted", "diffusion weighted imaging", "susceptibility weighted",
           "proton density", "gradient echo", "spin echo", "apparent diffusion coefficient", "gadolinium",
           "post gadolinium"),
    "X-ray": ("x ray", "x rays", "xray", "xrays", "radiograph", "radiographs", "radiography", "radiographic",
              "plain film", "plain films", "plain radiograph", "roentgenogram", "cxr", "kub", "chest film",
              "projection radiography", "skiagram"),
    "Mammography": ("mammography", "mammogram", "mammograms", "mammographic", "mammo", "tomosynthesis",
                    "breast tomosynthesis"),
    "Fluoroscopy": ("fluoroscopy", "fluoroscopic", "fluoro", "barium swallow", "barium enema", "barium meal",
                    "angiogram", "angiography", "angiographic", "dsa", "digital subtraction angiography",
                    "venogram", "venography", "urethrogram", "hysterosalpingogram", "esophagram",
                    "upper gi series", "myelogram"),
    "Ultrasound": ("ultrasound", "ultrasonography", "ultrasonographic", "sonography", "sonographic",
                   "sonogram", "usg", "doppler", "echocardiography", "echocardiogram", "transvaginal ultrasound",
                   "duplex ultrasound", "doppler ultrasound", "elastography"),
    "PET": ("pet", "pet ct", "pet mr", "pet mri", "fdg pet", "fdg pet ct", "positron emission tomography",
            "positron emission tomography computed tomography", "fdg"),
    "Nuclear medicine": ("nuclear medicine", "scintigraphy", "scintigraphic", "scintigram", "spect", "spect ct",
                         "bone scan", "mibg", "gallium scan", "hida", "hida scan", "v q scan", "nuclear scan"),
}
CAPITALS_ONLY = {"US": "Ultrasound", "CR": "X-ray", "DX": "X-ray", "MG": "Mammography", "NM": "Nuclear medicine",
                 "PT": "PET", "RF": "Fluoroscopy", "XA": "Fluoroscopy"}
_VERTEBRA = frozenset({"vertebra", "vertebrae", "vertebral", "level", "nerve", "root", "spinous", "pedicle",
                       "t3", "t1", "t2", "t4", "body"})
_SEQ = frozenset({"t1", "t2"})

_TABLE = sorted({(tuple(w.split()), canon) for canon, ws in WORDINGS.items() for w in ws},
                key=lambda wc: -len(wc[0]))
_MAX = max(len(w) for w, _ in _TABLE)
_BY_PHRASE = dict(_TABLE)
_CANON_NAMES = {m.lower(): m for m in MODALITIES} | {"x ray": "X-ray", "nuclear medicine": "Nuclear medicine",
                                                      "mri": "MR", "us": "Ultrasound"}


def _vertebral(tokens: Sequence[str], i: int) -> bool:
  near = tokens[max(0, i - 1):i] + tokens[i + 1:i + 3]
  return any(t in _VERTEBRA for t in near if t not in _SEQ) or (i + 1 < len(tokens) and tokens[i + 1] in _SEQ)


def clause_mentions(clause: context.Clause, index: int = 0) -> list[Mention]:
  """Modality wordings of one clause, longest first, non-overlapping, with their status."""
  toks, out, i = clause.tokens, [], 0
  while i < len(toks):
    for n in range(min(_MAX, len(toks) - i), 0, -1):
      canon = _BY_PHRASE.get(tuple(toks[i:i + n]))
      if canon and n == 1 and toks[i] in _SEQ and _vertebral(toks, i):
        canon = None
      if canon is None and n == 1:
        canon = CAPITALS_ONLY.get(clause.raw[i])
      if canon:
        pos = tuple(range(i, i + n))
        out.append(Mention(canon, index, pos, context.status(clause, pos), clause.concessive))
        i += n
        break
    else:
      i += 1
  return out


def mentions(text: str) -> list[Mention]:
  """Every modality wording of `text` with its clause and status."""
  out = []
  for ci, clause in enumerate(context.clauses(text)):
    out += clause_mentions(clause, ci)
  return out


def choose(found: Sequence[Mention]) -> tuple[str, str | None]:
  """('chosen' | 'none' | 'hedge' | 'several', modality) from mentions: negated ones never count,
  concessive ones only when nothing else is asserted."""
  asserted = [m for m in found if m.status == ASSERTED and not m.concessive] or [
      m for m in found if m.status == ASSERTED]
  uncertain = {m.what for m in found if m.status == UNCERTAIN}
  names = {m.what for m in asserted}
  if len(names) > 1:
    return "several", None
  if uncertain - names or (uncertain and not names):
    return "hedge", None
  if names:
    return "chosen", names.pop()
  return "none", None


def canonical(text: str) -> str | None:
  """The one modality `text` commits to, else None. Whole-answer names ("MRI", "X-ray") first."""
  found = mentions(text)
  kind, canon = choose(found)
  if kind == "chosen":
    return canon
  if not found:
    return _CANON_NAMES.get(" ".join(t for c in context.clauses(text) for t in c.tokens))
  return None


def rejected(text: str) -> set[str]:
  return {m.what for m in mentions(text) if m.status == NEGATED}


def group(modality: str | None) -> str:
  """'CT' | 'MR' | 'X-ray' | 'other' for the per-modality breakdown (mammography and fluoroscopy are
  X-ray techniques); accepts any wording."""
  canon = canonical(modality) if modality else None
  return {"CT": "CT", "MR": "MR", "X-ray": "X-ray", "Mammography": "X-ray",
          "Fluoroscopy": "X-ray"}.get(canon or "", "other")
