"""Closed-answer metrics: accuracy, yes/no F1, multi-label P/R/F1, modality confusion matrix.

Per-sample statistics are counts (`eval.metrics.base`), so the bootstrap and the breakdowns reuse them;
the point values equal scikit-learn's (`precision_recall_fscore_support` with `zero_division=0`), which
`per_label_table` and `confusion` call directly and the tests check.

Answer parsing (documented in `eval.normalize`):
* yes/no: `parse_yes_no`; an unparseable prediction is wrong, and counts as "not yes" for F1
  (positive class "yes").
* closed VQA: correct when the normalised prediction equals the normalised answer; with `choices`, when
  the answer is the only choice the prediction names (a choice contained in a longer named choice does
  not count); without choices, when the answer occurs as a whole phrase in the prediction.
* multi-label: a label is predicted when its normalised text occurs as a whole phrase in the normalised
  prediction (negations such as "no effusion" are not detected: a documented limitation).
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from eval import normalize
from eval.metrics.base import SampleStats, mean_metric

SKLEARN_NOTE = "zero_division=0; equals sklearn.metrics.precision_recall_fscore_support"


def accuracy(correct: Sequence[bool], name: str = "accuracy", signature: str = "") -> SampleStats:
  return mean_metric(name, np.asarray(correct, np.float64), signature)


# ------------------------------------------------------------------------------------------------ yes/no
def yes_no_correct(pred: str, ref: str) -> bool:
  return normalize.parse_yes_no(pred) == normalize.normalize_answer(ref)


def _f1_from_counts(sums: np.ndarray) -> np.ndarray:
  tp, fp, fn = sums[..., 0], sums[..., 1], sums[..., 2]
  denom = 2 * tp + fp + fn
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)


def yes_no_metrics(preds: Sequence[str], refs: Sequence[str]) -> list[SampleStats]:
  """[accuracy, f1] with 'yes' the positive class."""
  parsed = [normalize.parse_yes_no(p) for p in preds]
  truth = [normalize.normalize_answer(r) for r in refs]
  for r, raw in zip(truth, refs):
    if r not in (normalize.YES, normalize.NO):
      raise ValueError(f"yes/no metric given a reference that is not yes/no: {raw!r}")
  y_true = np.array([r == normalize.YES for r in truth])
  y_pred = np.array([p == normalize.YES for p in parsed])
  counts = np.stack([y_true & y_pred, ~y_true & y_pred, y_true & ~y_pred], axis=1).astype(np.float64)
  sig = "normalize.parse_yes_no; unparseable = wrong"
  return [accuracy([p == r for p, r in zip(parsed, truth)], signature=sig),
          SampleStats("f1", counts, _f1_from_counts, f"positive=yes|{SKLEARN_NOTE}")]


# ---------------------------------------------------------------------------------------------- closed QA
def _mentioned(norm_text: str, norm_choices: Sequence[str]) -> list[str]:
  found = [c for c in norm_choices if normalize.contains_phrase(norm_text, c)]
  return [c for c in found if not any(c != o and normalize.contains_phrase(o, c) for o in found)]


def closed_correct(pred: str, ref: str, choices: Sequence[str] | None = None) -> bool:
  """See module doc."""
  r, p = normalize.normalize_answer(ref), normalize.normalize_answer(pred)
  if r in (normalize.YES, normalize.NO):
    return normalize.parse_yes_no(pred) == r
  if p == r:
    return True
  if choices:
    norm_choices = sorted({normalize.normalize_answer(c) for c in choices} | {r})
    return _mentioned(p, norm_choices) == [r]
  return normalize.contains_phrase(p, r)


# ---------------------------------------------------------------------------------------------- modality
def modality_label(text: str) -> str:
  """Canonical modality of a free-text answer, 'unrecognized' when it names none."""
  return normalize.canonical_modality(text) or "unrecognized"


def modality_correct(pred: str, ref: str) -> bool:
  """Yes/no references are scored as yes/no; otherwise canonical modalities must match (an
  unrecognised reference falls back to normalised exact match)."""
  r = normalize.normalize_answer(ref)
  if r in (normalize.YES, normalize.NO):
    return normalize.parse_yes_no(pred) == r
  canon = normalize.canonical_modality(ref)
  if canon is None:
    return normalize.normalize_answer(pred) == r
  return normalize.canonical_modality(pred) == canon


def confusion(refs: Sequence[str], preds: Sequence[str]) -> dict:
  """Modality confusion matrix (rows: reference, columns: prediction) via sklearn."""
  from sklearn.metrics import confusion_matrix  # pylint: disable=import-outside-toplevel
  y_true = [modality_label(r) for r in refs]
  y_pred = [modality_label(p) for p in preds]
  order = list(normalize.MODALITIES) + ["unrecognized"]
  labels = [m for m in order if m in set(y_true) | set(y_pred)]
  matrix = confusion_matrix(y_true, y_pred, labels=labels)
  return {"labels": labels, "matrix": matrix.astype(int).tolist()}


# ------------------------------------------------------------------------------------------- multi-label
_SPLIT = re.compile(r"[,;\n]|\band\b", flags=re.IGNORECASE)


def split_labels(text: str) -> list[str]:
  """Ground-truth label text 'a, b and c' -> normalised ['a', 'b', 'c']."""
  return sorted({normalize.normalize_answer(t) for t in _SPLIT.split(text)} - {""})


def predicted_labels(pred: str, vocabulary: Sequence[str]) -> list[str]:
  """Vocabulary labels (normalised) named in the prediction."""
  return _mentioned(normalize.normalize_answer(pred), vocabulary)


def binarize(label_sets: Sequence[Sequence[str]], vocabulary: Sequence[str]) -> np.ndarray:
  index = {v: i for i, v in enumerate(vocabulary)}
  out = np.zeros((len(label_sets), len(vocabulary)), dtype=bool)
  for row, labels in enumerate(label_sets):
    for lab in labels:
      if lab in index:
        out[row, index[lab]] = True
  return out


def _prf(tp, fp, fn):
  with np.errstate(invalid="ignore", divide="ignore"):
    p = np.where(tp + fp > 0, tp / np.where(tp + fp > 0, tp + fp, 1), 0.0)
    r = np.where(tp + fn > 0, tp / np.where(tp + fn > 0, tp + fn, 1), 0.0)
    f = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0.0)
  return p, r, f


def multilabel_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> list[SampleStats]:
  """Macro and micro precision / recall / F1 over the label vocabulary (columns)."""
  n, num_labels = y_true.shape
  y_true, y_pred = y_true.astype(bool), y_pred.astype(bool)
  counts = np.concatenate([y_true & y_pred, ~y_true & y_pred, y_true & ~y_pred], axis=1).astype(np.float64)
  assert counts.shape == (n, 3 * num_labels)

  def split(sums):
    return sums[..., :num_labels], sums[..., num_labels:2 * num_labels], sums[..., 2 * num_labels:]

  def macro(i):
    return lambda sums: _prf(*split(sums))[i].mean(-1)

  def micro(i):
    return lambda sums: _prf(*(c.sum(-1) for c in split(sums)))[i]

  sig = f"{num_labels} labels|{SKLEARN_NOTE}"
  return ([SampleStats(f"macro_{k}", counts, macro(i), sig) for i, k in enumerate(("precision", "recall", "f1"))]
          + [SampleStats(f"micro_{k}", counts, micro(i), sig) for i, k in enumerate(("precision", "recall", "f1"))])


def per_label_table(y_true: np.ndarray, y_pred: np.ndarray, vocabulary: Sequence[str]) -> dict:
  """{label: {precision, recall, f1, support}} from sklearn."""
  from sklearn.metrics import precision_recall_fscore_support  # pylint: disable=import-outside-toplevel
  p, r, f, s = precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0,
                                               labels=list(range(len(vocabulary))))
  return {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
          for i, lab in enumerate(vocabulary)}
