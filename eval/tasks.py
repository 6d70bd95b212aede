"""RadBench task definitions: the scored item, how an item is routed to a scoring kind, and which
metrics each kind reports.

An `Item` is one (question, ground-truth answer, prediction) triple with the record's task and meta
(`radfm_jax.data.schema`). Its scoring *kind* follows from the task and the answer:

| task        | kind                   | when                                               | metrics (prefix)                     |
|-------------|------------------------|----------------------------------------------------|--------------------------------------|
| modality    | modality               | always (yes/no answers scored as yes/no)           | accuracy; confusion matrix           |
| diagnosis   | diagnosis_binary       | answer is yes / no                                 | binary_accuracy, binary_f1           |
| diagnosis   | diagnosis_multilabel   | otherwise (labels: meta.labels or the answer text) | multilabel_{macro,micro}_{p,r,f1}    |
| vqa         | vqa_closed             | meta.closed, or (no meta.closed and yes/no answer) | closed_accuracy                      |
| vqa         | vqa_open               | otherwise                                          | open_token_f1, open_recall, open_bleu1/4, open_rouge_l |
| report, caption, interleaved | same  | always                                             | text metrics (below)                 |
| rationale   | rationale_binary       | answer is yes / no                                 | binary_accuracy, binary_f1           |
| rationale   | rationale              | otherwise                                          | diagnosis_accuracy + text metrics    |

Text metrics: bleu1..4, rouge_l, cider, meteor, semantic, ratescore, term_precision, term_recall.
Rationale diagnosis accuracy: meta.diagnosis occurs (normalised, whole phrase) in the prediction.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from eval import normalize
from eval.metrics import classification, text
from eval.metrics.base import Metric, Unavailable, with_prefix
from eval.metrics.semantic import EmbeddingSimilarity, RaTEScoreMetric
from eval.metrics.terms import TermMatcher
from radfm_jax.data.schema import TASKS


@dataclasses.dataclass
class Item:
  id: str
  task: str
  question: str
  answer: str       # ground truth
  prediction: str
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)
  source: str = ""

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"item {self.id!r}: task {self.task!r} is not one of {TASKS}")

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @property
  def yes_no_answer(self) -> bool:
    return normalize.normalize_answer(self.answer) in (normalize.YES, normalize.NO)

  @property
  def dim_group(self) -> str:
    return normalize.dim_group(self.meta.get("dim"))

  @property
  def modality_group(self) -> str:
    mod = self.meta.get("modality")
    if not mod and self.task == "modality" and not self.yes_no_answer:
      mod = self.answer
    return normalize.modality_group(mod)

  @property
  def kind(self) -> str:
    if self.task in ("diagnosis", "rationale") and self.yes_no_answer:
      return f"{self.task}_binary"
    if self.task == "diagnosis":
      return "diagnosis_multilabel"
    if self.task == "vqa":
      closed = self.meta.get("closed")
      closed = self.yes_no_answer if closed is None else bool(closed)
      return "vqa_closed" if closed else "vqa_open"
    return self.task


@dataclasses.dataclass
class Scorers:
  """The model- and process-backed scorers, created once per run."""
  semantic: EmbeddingSimilarity
  ratescore: RaTEScoreMetric
  terms: TermMatcher
  meteor: text.MeteorScorer | None = None  # None: disabled by the user

  def close(self) -> None:
    if self.meteor is not None:
      self.meteor.close()


def text_metrics(preds: Sequence[str], refs: Sequence[str], scorers: Scorers) -> list[Metric]:
  out: list[Metric] = list(text.bleu(preds, refs))
  out += [text.rouge_l(preds, refs), text.cider(preds, refs)]
  out.append(scorers.meteor(preds, refs) if scorers.meteor else Unavailable("meteor", "disabled (--nometeor)"))
  out += [scorers.semantic(preds, refs), scorers.ratescore(preds, refs)]
  out += scorers.terms(preds, refs)
  return out


Computed = tuple[list[Metric], dict[str, Any]]


def _modality(items: list[Item], _: Scorers) -> Computed:
  preds, refs = [i.prediction for i in items], [i.answer for i in items]
  correct = [classification.modality_correct(p, r) for p, r in zip(preds, refs)]
  metrics = [classification.accuracy(correct, signature="normalize.canonical_modality synonyms")]
  open_items = [i for i in items if not i.yes_no_answer]
  extras = {}
  if open_items:
    extras["confusion"] = classification.confusion([i.answer for i in open_items],
                                                   [i.prediction for i in open_items])
  return metrics, extras


def _binary(items: list[Item], _: Scorers) -> Computed:
  return with_prefix(classification.yes_no_metrics([i.prediction for i in items],
                                                   [i.answer for i in items]), "binary_"), {}


def _item_labels(item: Item) -> list[str]:
  labels = item.meta.get("labels")
  if labels:
    return sorted({normalize.normalize_answer(l) for l in labels} - {""})
  return classification.split_labels(item.answer)


def _multilabel(items: list[Item], _: Scorers) -> Computed:
  truth = [_item_labels(i) for i in items]
  vocab = set().union(*truth)
  for i in items:
    vocab |= {normalize.normalize_answer(c) for c in i.meta.get("choices") or []} - {""}
  vocab = sorted(vocab)
  preds = [classification.predicted_labels(i.prediction, vocab) for i in items]
  y_true, y_pred = classification.binarize(truth, vocab), classification.binarize(preds, vocab)
  metrics = with_prefix(classification.multilabel_metrics(y_true, y_pred), "multilabel_")
  return metrics, {"per_label": classification.per_label_table(y_true, y_pred, vocab)}


def _vqa_closed(items: list[Item], _: Scorers) -> Computed:
  correct = [classification.closed_correct(i.prediction, i.answer, i.meta.get("choices")) for i in items]
  return [classification.accuracy(correct, "closed_accuracy", "classification.closed_correct")], {}


def _vqa_open(items: list[Item], _: Scorers) -> Computed:
  preds, refs = [i.prediction for i in items], [i.answer for i in items]
  metrics = text.token_overlap(preds, refs) + text.bleu(preds, refs, (1, 4)) + [text.rouge_l(preds, refs)]
  return with_prefix(metrics, "open_"), {}


def _text(items: list[Item], scorers: Scorers) -> Computed:
  return text_metrics([i.prediction for i in items], [i.answer for i in items], scorers), {}


def _rationale(items: list[Item], scorers: Scorers) -> Computed:
  metrics, _ = _text(items, scorers)
  with_dx = [i for i in items if i.meta.get("diagnosis")]
  if len(with_dx) == len(items):
    correct = [normalize.contains_phrase(normalize.normalize_answer(i.prediction),
                                         normalize.normalize_answer(i.meta["diagnosis"])) for i in items]
    dx = classification.accuracy(correct, "diagnosis_accuracy", "meta.diagnosis named in prediction")
  else:
    dx = Unavailable("diagnosis_accuracy",
                     f"{len(items) - len(with_dx)} of {len(items)} rationale items lack meta.diagnosis")
  return [dx] + metrics, {}


_TEXT_COLUMNS = ("rouge_l", "bleu1", "bleu4", "cider", "meteor", "semantic", "term_recall")


@dataclasses.dataclass(frozen=True)
class Kind:
  task: str
  compute: Callable[[list[Item], Scorers], Computed]
  primary: str  # the metric plotted / summarised first
  columns: tuple[str, ...] = ()  # metrics shown in the report's breakdown tables (default: primary)


KINDS: dict[str, Kind] = {
    "modality": Kind("modality", _modality, "accuracy"),
    "diagnosis_binary": Kind("diagnosis", _binary, "binary_accuracy", ("binary_accuracy", "binary_f1")),
    "diagnosis_multilabel": Kind("diagnosis", _multilabel, "multilabel_macro_f1",
                                 ("multilabel_macro_f1", "multilabel_micro_f1")),
    "vqa_closed": Kind("vqa", _vqa_closed, "closed_accuracy"),
    "vqa_open": Kind("vqa", _vqa_open, "open_token_f1", ("open_token_f1", "open_recall", "open_rouge_l")),
    "report": Kind("report", _text, "rouge_l", _TEXT_COLUMNS),
    "caption": Kind("caption", _text, "rouge_l", _TEXT_COLUMNS),
    "interleaved": Kind("interleaved", _text, "rouge_l", _TEXT_COLUMNS),
    "rationale_binary": Kind("rationale", _binary, "binary_accuracy", ("binary_accuracy", "binary_f1")),
    "rationale": Kind("rationale", _rationale, "diagnosis_accuracy", ("diagnosis_accuracy",) + _TEXT_COLUMNS),
}
