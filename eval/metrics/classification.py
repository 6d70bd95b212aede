"""Closed-answer metrics: accuracy, yes/no F1, multi-label P/R/F1, modality confusion matrix.

Per-sample statistics are counts (`eval.metrics.base`), so the bootstrap and the breakdowns reuse them;
the point values equal scikit-learn's (`precision_recall_fscore_support` with `zero_division=0`), which
`per_label_table` and `confusion` call directly and the tests check.

Closed answers are read by the answer judge (`eval.judge`); these functions take its verdicts:
* yes/no: accuracy = the judge's "correct"; F1 with positive class "yes" counts a hedge, a
  contradiction or an unanswered reply as "not yes".
* multi-label: a label is predicted when the prediction *asserts* it (named as a whole phrase, not
  negated, not hedged: "no pneumonia" does not predict pneumonia).
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from eval import normalize
from eval.judge import context as judge_context
from eval.judge import modality as judge_modality
from eval.metrics.base import SampleStats, mean_metric

SKLEARN_NOTE = "zero_division=0; equals sklearn.metrics.precision_recall_fscore_support"


def accuracy(correct: Sequence[bool], name: str = "accuracy", signature: str = "") -> SampleStats:
  return mean_metric(name, np.asarray(correct, np.float64), signature)


# ------------------------------------------------------------------------------------------------ yes/no
def _f1_from_counts(sums: np.ndarray) -> np.ndarray:
  tp, fp, fn = sums[..., 0], sums[..., 1], sums[..., 2]
  denom = 2 * tp + fp + fn
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)


def binary_metrics(y_true: Sequence[bool], y_pred: Sequence[bool], correct: Sequence[bool],
                   signature: str = "") -> list[SampleStats]:
  """[accuracy, f1]: accuracy from the judge's verdicts, F1 with 'yes' the positive class."""
  t, p = np.asarray(y_true, bool), np.asarray(y_pred, bool)
  counts = np.stack([t & p, ~t & p, t & ~p], axis=1).astype(np.float64)
  return [accuracy(correct, signature=signature),
          SampleStats("f1", counts, _f1_from_counts, f"positive=yes|{SKLEARN_NOTE}")]


# ---------------------------------------------------------------------------------------------- modality
def modality_label(text: str) -> str:
  """Canonical modality of a free-text answer, 'unrecognized' when it names none."""
  return judge_modality.canonical(text) or "unrecognized"


def verdict_label(verdict) -> str:
  """The confusion-matrix column of a judged modality answer: the modality chosen, else why not."""
  if verdict.chosen:
    return judge_modality.canonical(verdict.chosen) or verdict.chosen
  return "unanswered" if verdict.label == "unanswered" else "hedge/contradiction"


def confusion(y_true: Sequence[str], y_pred: Sequence[str]) -> dict:
  """Modality confusion matrix (rows: reference label, columns: predicted label) via sklearn."""
  from sklearn.metrics import confusion_matrix  # pylint: disable=import-outside-toplevel
  order = list(judge_modality.MODALITIES) + ["unrecognized", "hedge/contradiction", "unanswered"]
  present = set(y_true) | set(y_pred)
  labels = [m for m in order if m in present] + sorted(present - set(order))
  matrix = confusion_matrix(list(y_true), list(y_pred), labels=labels)
  return {"labels": labels, "matrix": matrix.astype(int).tolist()}


# ------------------------------------------------------------------------------------------- multi-label
_SPLIT = re.compile(r"[,;\n]|\band\b", flags=re.IGNORECASE)


def split_labels(text: str) -> list[str]:
  """Ground-truth label text 'a, b and c' -> normalised ['a', 'b', 'c']."""
  return sorted({normalize.normalize_answer(t) for t in _SPLIT.split(text)} - {""})


def _mentioned(norm_text: str, norm_choices: Sequence[str]) -> list[str]:
  found = [c for c in norm_choices if normalize.contains_phrase(norm_text, c)]
  return [c for c in found if not any(c != o and normalize.contains_phrase(o, c) for o in found)]


def predicted_labels(pred: str, vocabulary: Sequence[str]) -> list[str]:
  """Vocabulary labels (normalised) the prediction asserts; a label inside a longer named label
  ("effusion" in "pleural effusion") counts only through the longer one."""
  named = _mentioned(normalize.normalize_answer(pred), vocabulary)
  return [lab for lab in named if judge_context.asserted(pred, lab)]

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
