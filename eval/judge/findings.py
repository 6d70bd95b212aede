"""Finding concepts: how an asked finding can be worded in an answer, and what denies it implicitly.

A concept is a list of alternatives; an alternative is a list of groups that must all occur in one
clause; a group is a set of (stemmed) phrases. "cardiomegaly" = [[{cardiomegaly}], [{heart, cardiac},
{enlarged, enlargement}]], so "The cardiac silhouette is enlarged" asserts cardiomegaly and "The heart is
not enlarged" denies it. Synonyms are a small hand-written table (`SYNONYMS`); anything else matches
by the asked head word (modifiers such as "pleural" in "pleural effusion" are optional).

Implicit denial: a clause that calls the asked subject / location, or the study as a whole, normal
("The heart size is normal", "The liver is unremarkable", "Normal chest radiograph") denies an
abnormal finding there. Abnormal findings for "Is it normal?" / "Any abnormality?" questions come from
the findings and diseases sections of `eval/data/radiology_terms.txt`.
"""
from __future__ import annotations

import functools
import pathlib

from eval.judge import context

Concept = list[list[set[tuple[str, ...]]]]

# Each line: alternatives separated by "|", groups by "+", phrases in a group by "/".
SYNONYMS = (
    "cardiomegaly | heart/cardiac/cardiac silhouette + enlarged/enlargement",
    "splenomegaly | spleen/splenic + enlarged/enlargement",
    "hepatomegaly | liver/hepatic + enlarged/enlargement",
    "hemorrhage/haemorrhage/bleed/bleeding/blood/hematoma/haematoma/hemorrhagic",
    "fracture/fractured/broken/break",
    "stone/stones/calculus/calculi/nephrolithiasis/urolithiasis/lithiasis",
    "stroke/infarct/infarction/ischemia/ischaemia/ischemic",
    "air/pneumoperitoneum",
    "embolism/embolus/emboli/embolic",
    "edema/oedema",
    "tumor/tumour/neoplasm",
    "dilated/dilatation/dilation/ectasia/ectatic",
    "calcification/calcifications/calcified/calcific",
    "obstruction/obstructed/obstructive",
    "thickening/thickened",
    "infiltration/infiltrate/infiltrates",
    "contrast/opacified/enhanced/enhancing",
    "malignant/malignancy/cancer/carcinoma",
    "lymphadenopathy/adenopathy | lymph node/lymph nodes/nodes/nodal + enlarged/enlargement/prominent",
)
# Predicate -> wordings that answer it the other way ("deviated" answers "Is the trachea midline?": no).
ANTONYMS = {
    "midline": "deviated/shifted/displaced",
    "malignant": "benign",
    "benign": "malignant/malignancy/cancer/carcinoma",
    "enlarged": "small/atrophic/shrunken",
}
NORMAL_WORDS = ("normal", "unremarkable", "within normal limits", "healthy", "intact", "clear",
                "no abnormality", "no acute abnormality", "nothing abnormal", "normal in size", "preserved",
                "patent", "fully expanded", "well expanded", "straight")
NORMAL_PREDICATES = frozenset({"normal", "clear", "patent", "intact", "healthy", "unremarkable", "symmetric",
                               "symmetrical", "aerated", "expanded", "midline"})
ABNORMAL_HEADS = frozenset({"abnormality", "abnormalities", "abnormal", "pathology", "lesion", "lesions",
                            "finding", "findings"})
STUDY_WORDS = frozenset({"image", "images", "study", "scan", "radiograph", "film", "exam", "examination",
                         "chest", "x", "ray", "xray", "ct", "mri", "mr", "ultrasound", "mammogram", "brain"})
TERMS = pathlib.Path(__file__).resolve().parent.parent / "data" / "radiology_terms.txt"
_NOT_ABNORMAL = {"normal", "unremarkable", "compression", "aspiration", "deformity"}


def _phrases(spec: str) -> set[tuple[str, ...]]:
  return {context.phrase_stems(p) for p in spec.split("/") if p.strip()}


def _concept(spec: str) -> Concept:
  return [[_phrases(g) for g in alt.split("+")] for alt in spec.split("|")]


@functools.lru_cache(maxsize=None)
def _synonym_index() -> dict[tuple[str, ...], str]:
  index = {}
  for line in SYNONYMS:
    for alt in line.split("|"):
      if "+" not in alt:
        for phrase in _phrases(alt):
          index.setdefault(phrase, line)
  return index


def concept(words: tuple[str, ...]) -> Concept:
  """The concept of an asked head word / phrase (its synonym line, else the phrase itself)."""
  index = _synonym_index()
  for n in range(len(words), 0, -1):
    for i in range(len(words) - n + 1):
      key = context.phrase_stems(" ".join(words[i:i + n]))
      if key in index:
        return _concept(index[key])
  return [[{context.phrase_stems(" ".join(words[-1:]))}]]


def predicate_concept(subject: tuple[str, ...], predicate: str) -> Concept:
  """'heart' + 'enlarged' -> the cardiomegaly line when one exists, else subject + predicate."""
  pred = concept((predicate,))
  subj = {context.phrase_stems(w) for w in subject if w} or {()}
  for line in SYNONYMS:
    c = _concept(line)
    for alt in c:
      if len(alt) == 2 and subj & alt[0] and context.phrase_stems(predicate) in alt[1]:
        return c
  alts = [[subj, g] for alt in pred for g in alt] if subject else pred
  return alts


def antonym_concept(subject: tuple[str, ...], predicate: str) -> Concept | None:
  spec = ANTONYMS.get(predicate)
  if not spec:
    return None
  subj = {context.phrase_stems(w) for w in subject if w}
  return [[subj, _phrases(spec)]] if subj else [[_phrases(spec)]]


@functools.lru_cache(maxsize=None)
def abnormal_terms() -> frozenset[tuple[str, ...]]:
  """Stemmed findings / diseases of the shipped term list."""
  out, keep = set(), False
  for line in TERMS.read_text(encoding="utf-8").splitlines():
    if line.startswith("# ---"):
      keep = "findings" in line or "diseases" in line
      continue
    term = line.split("#", 1)[0].strip()
    if keep and term and term not in _NOT_ABNORMAL:
      out.add(context.phrase_stems(term))
  out |= {context.phrase_stems(w) for w in ("abnormality", "abnormal", "lesion", "mass", "tumor", "fracture",
                                             "hemorrhage", "consolidation", "infarct", "enlarged", "deviated",
                                             "dilated", "thickened", "hematoma", "opacity")}
  return frozenset(out)


@functools.lru_cache(maxsize=None)
def anatomy_terms() -> frozenset[str]:
  """Stems of the words of the term list's anatomy sections."""
  out, keep = set(), False
  for line in TERMS.read_text(encoding="utf-8").splitlines():
    if line.startswith("# ---"):
      keep = "anatomy" in line
      continue
    term = line.split("#", 1)[0].strip()
    if keep and term:
      out |= set(context.phrase_stems(term))
  return frozenset(out)


@functools.lru_cache(maxsize=None)
def normal_phrases() -> tuple[tuple[str, ...], ...]:
  return tuple(sorted({context.phrase_stems(w) for w in NORMAL_WORDS}, key=len, reverse=True))


def match(clause: context.Clause, c: Concept) -> list[tuple[int, ...]]:
  """Token positions of each alternative of concept `c` found in `clause`."""
  found = []
  for alt in c:
    positions: list[int] = []
    for group in alt:
      hit = [p for phrase in group if phrase for p in context.phrase_positions(clause.stems, phrase)]
      if not hit:
        break
      positions += hit[0]
    else:
      if positions:
        found.append(tuple(sorted(set(positions))))
  return found
