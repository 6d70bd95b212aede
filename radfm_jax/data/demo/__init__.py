"""The demo dataset: phantom scans as real files + text for the five RadBench tasks, built into a store
through the same files-mode path as real data.

  python -m radfm_jax.data.demo --out=/tmp/demo [--n=240] [--seed=0] [--workers=2]   (__main__.py)
  -> /tmp/demo/images/{train,val,test}/NNNN_{ct,mr,xray}.{nii.gz,png}   (phantoms.py)
     /tmp/demo/text.jsonl                                                 (files.py JSONL format)
     /tmp/demo/store/                                                     (store.py; build report inside)

Every phantom (n of them, split 80/10/10 into train/val/test) carries two samples:
- one closed, image-dependent question from nine templates (`CLOSED`): modality recognition (open
  "which modality" and yes/no), diagnosis (yes/no and multi-label), VQA closed (side, region, size,
  count, side yes/no). The phantom is drawn *from* the answer: within each split, each template cycles
  through its (slot values x answers) cells with the answer varying fastest, so every template's
  answers (and every slot value's answers) are uniform to within one, and a text-only model cannot
  beat chance. Lesions the question does not constrain are added at random.
- one open sample, cycling VQA open ("what abnormality"), report generation ("Findings: ...
  Impression: ...") and rationale diagnosis ("Diagnosis: ... " + the supporting features).
Meta per schema.py: closed, choices, image_dependent, modality, dim, labels, diagnosis (rationale),
subtask (template name), plus "lesions" (finding, side, region, size, center, radius: the truth the
pixels were drawn from). Output is a pure function of (n, seed): files, text and volume keys repeat.

The default n=240 builds in about 10-20 s on two cores; the demo config resizes 3D to about 64x64x8
and 2D to 64x64, where small lesions still span ~3 pixels at high contrast.
"""
from __future__ import annotations

import gzip
import itertools
import json
import os
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image

from radfm_jax.data.ingest import files
from radfm_jax.data.demo import phantoms
from radfm_jax.data.ingest.build import ingest_samples
from radfm_jax.data.demo.phantoms import FINDINGS, MODALITIES, REGIONS, ROUND, SIDES, SIZES, Lesion, Phantom
from radfm_jax.data.readers import nifti

ALL_FINDINGS = ("nodule", "effusion", "tumor", "hemorrhage")
NAMES = {"nodule": "lung nodule", "effusion": "pleural effusion", "tumor": "brain tumor",
         "hemorrhage": "brain hemorrhage"}
PLURALS = {"nodule": "lung nodules", "tumor": "brain tumors", "hemorrhage": "brain hemorrhages"}
ARTICLE = {"CT": "a CT", "MR": "an MR", "X-ray": "an X-ray"}
YES_NO = ("yes", "no")
COUNTS = ("none", "one", "two")
CLOSED = ("modality_open", "modality_yesno", "diagnosis_yesno", "diagnosis_multilabel", "vqa_side",
          "vqa_region", "vqa_size", "vqa_count", "vqa_side_yesno")
OPEN = ("vqa_open", "report", "rationale")
TASK = {"modality_open": "modality", "modality_yesno": "modality", "diagnosis_yesno": "diagnosis",
        "diagnosis_multilabel": "diagnosis", "vqa_open": "vqa", "report": "report", "rationale": "rationale"}
SPLIT_FRACTIONS = (("train", 0.8), ("val", 0.1), ("test", 0.1))


def _subsets(modality: str) -> list[tuple[str, ...]]:
  a, b = FINDINGS[modality]
  return [(), (a,), (b,), (a, b)]


def cells(kind: str) -> list[tuple]:
  """The (slot values..., answer) cells a closed template cycles through; the answer varies fastest."""
  return {
      "modality_open": [(m,) for m in MODALITIES],
      "modality_yesno": list(itertools.product(MODALITIES, YES_NO)),
      "diagnosis_yesno": list(itertools.product(ALL_FINDINGS, YES_NO)),
      "diagnosis_multilabel": [(m, s) for m in MODALITIES for s in _subsets(m)],
      "vqa_side": list(itertools.product(ALL_FINDINGS, SIDES)),
      "vqa_region": list(itertools.product(ROUND, REGIONS)),
      "vqa_size": list(itertools.product(ALL_FINDINGS, SIZES)),
      "vqa_count": list(itertools.product(ROUND, COUNTS)),
      "vqa_side_yesno": list(itertools.product(ALL_FINDINGS, SIDES, YES_NO)),
  }[kind]


# ------------------------------------------------------------------------------ phantoms from answers

def _modality_for(finding: str, rng: np.random.Generator) -> str:
  return "MR" if finding in FINDINGS["MR"] else ("CT", "X-ray")[int(rng.integers(2))]


def _lesion(rng, finding, lesions, side=None, region=None, size=None) -> Lesion | None:
  """A lesion in a free (side, region) quadrant matching the given constraints, or None."""
  taken = {(les.side, les.region) for les in lesions}
  options = [(s, r) for s in SIDES for r in REGIONS if (s, r) not in taken
             and side in (None, s) and region in (None, r) and (finding != "effusion" or r == "lower")]
  if not options:
    return None
  s, r = options[int(rng.integers(len(options)))]
  return Lesion(finding, s, r, size or SIZES[int(rng.integers(2))])


def _extra(rng, modality, lesions, avoid: str | None, p: float) -> list[Lesion]:
  """With probability p, one more lesion of a finding other than `avoid`, where there is room."""
  others = [f for f in FINDINGS[modality] if f != avoid]
  if rng.random() >= p or not others:
    return lesions
  les = _lesion(rng, others[int(rng.integers(len(others)))], lesions)
  return lesions + [les] if les else lesions


def _random_lesions(rng, modality) -> list[Lesion]:
  lesions: list[Lesion] = []
  for _ in range(int(rng.integers(3))):
    les = _lesion(rng, FINDINGS[modality][int(rng.integers(2))], lesions)
    lesions += [les] if les else []
  return lesions


def closed_sample(kind: str, cell: tuple, rng: np.random.Generator) -> tuple[Phantom, dict[str, Any]]:
  """The phantom a closed question's answer requires, and the question / answer / meta."""
  choices: list[str] = list(YES_NO)
  if kind == "modality_open":
    (m,) = cell
    ph, q, a, choices = Phantom(m, _random_lesions(rng, m)), \
        "Which imaging modality was used to acquire this image?", m, list(MODALITIES)
  elif kind == "modality_yesno":
    asked, a = cell
    others = [m for m in MODALITIES if m != asked]
    m = asked if a == "yes" else others[int(rng.integers(2))]
    ph, q = Phantom(m, _random_lesions(rng, m)), f"Is this {ARTICLE[asked]} image?"
  elif kind == "diagnosis_yesno":
    f, a = cell
    m = _modality_for(f, rng)
    lesions = [_lesion(rng, f, [])] if a == "yes" else []
    ph = Phantom(m, _extra(rng, m, lesions, avoid=f, p=0.5))
    q = f"Is there a {NAMES[f]} in this image?"
  elif kind == "diagnosis_multilabel":
    m, subset = cell
    lesions: list[Lesion] = []
    for f in subset:
      lesions.append(_lesion(rng, f, lesions))
    ph = Phantom(m, lesions)
    names = [NAMES[f] for f in FINDINGS[m]]
    q = f"Which of these findings are present: {names[0]} or {names[1]}? Answer with all that apply, or none."
    a = ", ".join(NAMES[f] for f in subset) or "none"
    choices = names
  elif kind in ("vqa_side", "vqa_region", "vqa_size"):
    f, value = cell
    m = _modality_for(f, rng)
    key = {"vqa_side": "side", "vqa_region": "region", "vqa_size": "size"}[kind]
    ph = Phantom(m, _extra(rng, m, [_lesion(rng, f, [], **{key: value})], avoid=f, p=1 / 3))
    organ = "brain" if m == "MR" else "lungs"
    q = {"vqa_side": f"On which side is the {NAMES[f]}?",
         "vqa_region": f"Is the {NAMES[f]} in the upper or the lower part of the {organ}?",
         "vqa_size": f"Is the {NAMES[f]} small or large?"}[kind]
    a, choices = value, list({"side": SIDES, "region": REGIONS, "size": SIZES}[key])
  elif kind == "vqa_count":
    f, a = cell
    m = _modality_for(f, rng)
    lesions = []
    for _ in range(COUNTS.index(a)):
      lesions.append(_lesion(rng, f, lesions))
    ph = Phantom(m, _extra(rng, m, lesions, avoid=f, p=1 / 3))
    q, choices = f"How many {PLURALS[f]} are visible?", list(COUNTS)
  elif kind == "vqa_side_yesno":
    f, side, a = cell
    m = _modality_for(f, rng)
    other = SIDES[1 - SIDES.index(side)]
    if a == "yes":
      lesions = [_lesion(rng, f, [], side=side)]
    else:
      lesions = [_lesion(rng, f, [], side=other)] if rng.random() < 0.5 else []
    ph = Phantom(m, _extra(rng, m, lesions, avoid=f, p=1 / 3))
    q = f"Is there a {NAMES[f]} on the {side} side?"
  else:
    raise ValueError(f"unknown closed template {kind!r}")
  meta = {"closed": kind != "diagnosis_multilabel", "choices": choices, "image_dependent": True,
          "subtask": kind}
  return ph, {"task": TASK.get(kind, "vqa"), "question": q, "answer": a, "meta": meta}


# ------------------------------------------------------------------------------------- open-ended text

def _phrase(les: Lesion, modality: str) -> str:
  s, z, r = les.side, les.size, les.region
  if modality == "MR":
    kind = "T2-hyperintense mass" if les.finding == "tumor" else "T2-hypointense focus"
    return f"a {z} {kind} in the {r} part of the {s} cerebral hemisphere"
  if les.finding == "effusion":
    where = "layering posteriorly at the lung base" if modality == "CT" else "blunting the costophrenic angle"
    return f"a {z} {s} pleural effusion {where}"
  shape = "solid nodule" if modality == "CT" else "rounded opacity"
  return f"a {z} {shape} in the {s} {r} lung zone"


def _impression(les: Lesion) -> str:
  where = f", {les.region} zone" if les.finding in ROUND else ""
  return f"{les.size.capitalize()} {les.side} {NAMES[les.finding]}{where}"


NORMAL = {"CT": "The lungs are clear. No nodule or pleural effusion.",
          "X-ray": "The lungs are clear. The costophrenic angles are sharp.",
          "MR": "Normal brain parenchyma. The ventricles are normal in size."}


def open_sample(kind: str, ph: Phantom) -> dict[str, Any]:
  phrases = [_phrase(les, ph.modality) for les in ph.lesions]
  described = " and ".join(phrases)
  meta: dict[str, Any] = {"closed": False, "image_dependent": True, "subtask": kind}
  if kind == "vqa_open":
    q = "What abnormality, if any, is seen in this image?"
    a = described[0].upper() + described[1:] + "." if phrases else "No abnormality is seen."
  elif kind == "report":
    q = "Write the radiology report for this image."
    findings = " ".join(p[0].upper() + p[1:] + "." for p in phrases) or NORMAL[ph.modality]
    impression = "; ".join(_impression(les) for les in ph.lesions) or "No acute abnormality"
    a = f"Findings: {ph.modality} study. {findings} Impression: {impression}."
  elif kind == "rationale":
    q = "What is the most likely diagnosis? Explain the imaging features that support it."
    diagnosis = NAMES[ph.lesions[0].finding] if ph.lesions else "normal study"
    a = (f"Diagnosis: {diagnosis}. Rationale: this {ph.modality} image shows {described}."
         if phrases else f"Diagnosis: normal study. Rationale: {NORMAL[ph.modality]}")
    meta["diagnosis"] = diagnosis
  else:
    raise ValueError(f"unknown open template {kind!r}")
  return {"task": TASK[kind], "question": q, "answer": a, "meta": meta}


# --------------------------------------------------------------------------------------- file writing

def _write_nifti(path: str, array: np.ndarray, spacing) -> None:
  data, affine = nifti.display_to_ras(array, spacing)
  img = nib.Nifti1Image(data, affine)
  img.header.set_xyzt_units("mm")
  with open(path, "wb") as f:   # gzip with mtime 0: identical bytes on every run (content keys repeat)
    f.write(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def split_sizes(n: int) -> dict[str, int]:
  if n < 3:
    raise ValueError(f"--n {n}: need at least 3 phantoms (one per split)")
  val = test = max(1, round(n * 0.1))
  return {"train": n - val - test, "val": val, "test": test}


def write_dataset(out: str, n: int, seed: int) -> str:
  """Writes the phantom files and text.jsonl under `out`; returns the JSONL path."""
  lines = []
  for split_id, (split, count) in enumerate(split_sizes(n).items()):
    os.makedirs(os.path.join(out, "images", split), exist_ok=True)
    for j in range(count):
      rng = np.random.default_rng([seed, split_id, j])
      kind = CLOSED[j % len(CLOSED)]
      occurrence = j // len(CLOSED)
      kind_cells = cells(kind)
      ph, closed = closed_sample(kind, kind_cells[occurrence % len(kind_cells)], rng)
      ph = phantoms.place(ph, rng)
      opened = open_sample(OPEN[occurrence % len(OPEN)], ph)
      pixels = phantoms.render(ph, rng)
      stem = f"{j:04d}_{ph.modality.lower().replace('-', '')}"
      if ph.dim == "3D":
        rel = f"images/{split}/{stem}.nii.gz"
        _write_nifti(os.path.join(out, rel), pixels, phantoms.SPACING[ph.modality])
      else:
        rel = f"images/{split}/{stem}.png"
        Image.fromarray(pixels).save(os.path.join(out, rel))
      common = {"modality": ph.modality, "dim": ph.dim, "labels": sorted(NAMES[f] for f in ph.labels),
                "lesions": [dict(vars(les), center=list(les.center), radius=list(les.radius))
                            for les in ph.lesions]}
      for tag, sample in (("c", closed), ("o", opened)):
        lines.append({"id": f"demo-{split}-{j:04d}{tag}", "image": rel, "split": split, "source": "demo",
                      "task": sample["task"], "question": sample["question"], "answer": sample["answer"],
                      "meta": {**sample["meta"], **common}})
  text = os.path.join(out, "text.jsonl")
  with open(text, "w", encoding="utf-8") as f:
    for line in lines:
      f.write(json.dumps(line, sort_keys=True) + "\n")
  return text


def make_demo(out: str, *, n: int = 240, seed: int = 0, workers: int = 2, progress: bool = False) -> dict:
  """Writes the demo files under `out` and builds `out`/store through files mode; returns the report."""
  text = write_dataset(out, n, seed)
  samples, _, total = files.samples_from_folder(out, text=text)
  return ingest_samples(samples, src_root=out, out=os.path.join(out, "store"), workers=workers,
                        progress=progress, total=total)
