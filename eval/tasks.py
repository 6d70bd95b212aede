"""RadBench task definitions: the scored item, how an item is routed to a scoring kind, and which
metrics each kind reports.

An `Item` is one (question, ground-truth answer, prediction) triple with the record's task and meta
(`radfm_jax.data.schema`). Its scoring *kind* follows from the task, the answer and the question
(closed answers are read by the answer judge, `eval.judge`):

| task        | kind                   | when                                                  | metrics (prefix)                  |
|-------------|------------------------|-------------------------------------------------------|-----------------------------------|
| modality    | modality               | always (yes/no answers judged as yes/no)              | accuracy, unanswered; confusion   |
| diagnosis   | diagnosis_binary       | answer is yes / no                                    | binary_accuracy, binary_f1, binary_unanswered |
| diagnosis   | diagnosis_multilabel   | otherwise (labels: meta.labels or the answer text)    | multilabel_{macro,micro}_{p,r,f1} |
| vqa         | vqa_closed             | the judge finds options: yes/no answer, meta.choices, or options written in the question ("left or right?") | closed_accuracy, closed_unanswered |
| vqa         | vqa_open               | otherwise (meta.closed without readable options too)  | open_token_f1, open_recall, open_bleu1/4, open_rouge_l |
| report, caption, interleaved | same  | always                                                | text metrics (below)              |
| rationale   | rationale_binary       | answer is yes / no                                    | binary_accuracy, binary_f1, binary_unanswered |
| rationale   | rationale              | otherwise                                             | diagnosis_accuracy + text metrics |

Text metrics: bleu1..4, rouge_l, cider, meteor (pycocoevalcap corpus score), meteor_segment_mean,
semantic, ratescore, term_precision, term_recall (asserted terms only). Next to every text metric the
report prints two reference rows (`reference_rows`): a constant report (the most frequent report of
the training split, else of the references) and the references shuffled among the rows.
Rationale diagnosis accuracy: meta.diagnosis asserted (not negated, not hedged) in the prediction.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from eval import judge as judge_lib
from eval import normalize
from eval.metrics import classification, text
from eval.metrics import meteor as meteor_lib
from eval.metrics.base import Metric, SampleStats, Unavailable, with_prefix
from eval.metrics.semantic import EmbeddingSimilarity, RaTEScoreMetric
from eval.metrics.terms import TermMatcher
from radfm_jax.data.schema import TASKS

TEXT_KINDS = ("report", "caption", "interleaved", "rationale")


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
      return "vqa_closed" if self.options is not None else "vqa_open"
    return self.task

  @property
  def options(self) -> list[str] | None:
    """The options a closed answer chooses among (the judge's routing), None for an open question."""
    return judge_lib.closed_options(self.question, self.answer, self.meta.get("choices"), self.task)

  def verdict(self) -> judge_lib.Verdict:
    return judge_lib.judge(self.question, self.answer, self.prediction, self.meta.get("choices"), self.task)


@dataclasses.dataclass
class Scorers:
  """The model- and process-backed scorers, created once per run. `train_reports`: {task: the training
  split's answers}, whose most frequent one is the constant reference row (else the references')."""
  semantic: EmbeddingSimilarity
  ratescore: RaTEScoreMetric
  terms: TermMatcher
  meteor: meteor_lib.MeteorScorer | None = None  # None: disabled by the user
  train_reports: dict[str, Sequence[str]] | None = None
  reference_rows: bool = True

  def close(self) -> None:
    if self.meteor is not None:
      self.meteor.close()


MAX_WORDS = meteor_lib.MAX_WORDS  # every text metric sees at most this many words per text


def _capped(texts: Sequence[str]) -> tuple[list[str], int]:
  out, cut = [], 0
  for t in texts:
    c, was_cut = meteor_lib.cap_words(text.clean_text(t), MAX_WORDS)
    out.append(c)
    cut += was_cut
  return out, cut


def _safe(names: Sequence[str], fn: Callable[[], Any]) -> list[Metric]:
  """Runs one scorer; an exception makes its metrics Unavailable with the reason (the run goes on)."""
  try:
    out = fn()
  except Exception as e:  # pylint: disable=broad-except  (a failed metric is reported, never fatal)
    return [Unavailable(n, f"failed: {type(e).__name__}: {str(e)[:300]}") for n in names]
  return list(out) if isinstance(out, (list, tuple)) else [out]


def text_metrics(preds: Sequence[str], refs: Sequence[str], scorers: Scorers) -> list[Metric]:
  """The report metrics; texts are capped at MAX_WORDS words and every scorer runs under `_safe`."""
  preds, _ = _capped(preds)
  refs, _ = _capped(refs)
  out: list[Metric] = _safe([f"bleu{k}" for k in text.BLEU_ORDERS], lambda: text.bleu(preds, refs))
  out += _safe(["rouge_l"], lambda: text.rouge_l(preds, refs))
  out += _safe(["cider"], lambda: text.cider(preds, refs))
  if scorers.meteor:
    out += _safe(["meteor", "meteor_segment_mean"], lambda: scorers.meteor(preds, refs))
  else:
    out += [Unavailable(n, "disabled (--nometeor)") for n in ("meteor", "meteor_segment_mean")]
  out += _safe(["semantic"], lambda: scorers.semantic(preds, refs))
  out += _safe(["ratescore"], lambda: scorers.ratescore(preds, refs))
  out += _safe(["term_precision", "term_recall"], lambda: scorers.terms(preds, refs))
  return out


def most_frequent(texts: Sequence[str]) -> str:
  """The most frequent text (whitespace-normalised; ties: the earliest seen)."""
  counts = collections.Counter(" ".join(str(t).split()) for t in texts)
  return max(counts, key=lambda t: (counts[t], -list(counts).index(t))) if counts else ""


def shuffled(refs: Sequence[str], seed: int = 0) -> list[str]:
  """The references permuted among the rows (a seeded derangement where one exists)."""
  n = len(refs)
  if n < 2:
    return list(refs)
  rng = np.random.default_rng(seed)
  perm = rng.permutation(n)
  fixed = np.flatnonzero(perm == np.arange(n))
  for i in fixed:  # move every fixed point one place on: no row keeps its own reference
    j = (i + 1) % n
    perm[i], perm[j] = perm[j], perm[i]
  return [refs[i] for i in perm]


def reference_rows(refs: Sequence[str], scorers: Scorers, task: str = "report") -> dict[str, Any]:
  """Scores of the two floors next to every report metric: a constant report, shuffled references."""
  train = (scorers.train_reports or {}).get(task)
  source = "training split" if train else "references"
  constant = most_frequent(train or refs)
  rows = {}
  floors = [("constant", [constant] * len(refs))] + ([("shuffled", shuffled(refs))] if len(refs) > 1 else [])
  for name, preds in floors:
    ms = text_metrics(preds, refs, scorers)
    rows[name] = {m.name: m.value() for m in ms if isinstance(m, SampleStats)}
  rows["constant_text"] = constant
  rows["constant_source"] = source
  return rows


Computed = tuple[list[Metric], dict[str, Any], list[dict[str, Any]]]


def _verdict_rows(verdicts: Sequence[judge_lib.Verdict]) -> list[dict[str, Any]]:
  return [{"verdict": v.label, "reason": v.reason, "chosen": v.chosen or ""} for v in verdicts]


def _unanswered(verdicts, name: str = "unanswered") -> SampleStats:
  return classification.accuracy([v.label == judge_lib.UNANSWERED for v in verdicts], name,
                                 "fraction of answers naming no option (scored wrong)")


_JUDGE_SIG = "eval.judge (negation-scoped, hedge/contradiction = wrong, unanswered = wrong)"


def _modality(items: list[Item], _: Scorers) -> Computed:
  verdicts = [i.verdict() for i in items]
  metrics = [classification.accuracy([v.correct for v in verdicts], signature=_JUDGE_SIG),
             _unanswered(verdicts)]
  extras = {}
  open_rows = [(i, v) for i, v in zip(items, verdicts) if not i.yes_no_answer]
  if open_rows:
    extras["confusion"] = classification.confusion(
        [classification.modality_label(i.answer) for i, _ in open_rows],
        [classification.verdict_label(v) for _, v in open_rows])
  return metrics, extras, _verdict_rows(verdicts)


def _binary(items: list[Item], _: Scorers) -> Computed:
  verdicts = [i.verdict() for i in items]
  truth = [normalize.normalize_answer(i.answer) == normalize.YES for i in items]
  metrics = classification.binary_metrics(truth, [v.chosen == normalize.YES for v in verdicts],
                                          [v.correct for v in verdicts], _JUDGE_SIG)
  return with_prefix(metrics + [_unanswered(verdicts)], "binary_"), {}, _verdict_rows(verdicts)


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
  rows = [{"labels_true": "; ".join(t), "labels_predicted": "; ".join(p)} for t, p in zip(truth, preds)]
  return metrics, {"per_label": classification.per_label_table(y_true, y_pred, vocab)}, rows


def _vqa_closed(items: list[Item], _: Scorers) -> Computed:
  verdicts = [i.verdict() for i in items]
  metrics = [classification.accuracy([v.correct for v in verdicts], "closed_accuracy", _JUDGE_SIG),
             _unanswered(verdicts, "closed_unanswered")]
  return metrics, {}, _verdict_rows(verdicts)


def _vqa_open(items: list[Item], _: Scorers) -> Computed:
  preds, refs = _capped([i.prediction for i in items])[0], _capped([i.answer for i in items])[0]
  metrics = text.token_overlap(preds, refs) + text.bleu(preds, refs, (1, 4)) + [text.rouge_l(preds, refs)]
  return with_prefix(metrics, "open_"), {}, [{} for _ in items]


def _text(items: list[Item], scorers: Scorers) -> Computed:
  preds, refs = [i.prediction for i in items], [i.answer for i in items]
  extras = {"reference_rows": reference_rows(refs, scorers, items[0].task)} if scorers.reference_rows else {}
  extras["truncated_predictions"] = _capped(preds)[1]
  return text_metrics(preds, refs, scorers), extras, [{} for _ in items]


def _rationale(items: list[Item], scorers: Scorers) -> Computed:
  metrics, extras, rows = _text(items, scorers)
  with_dx = [i for i in items if i.meta.get("diagnosis")]
  if len(with_dx) == len(items):
    correct = [judge_lib.asserted(i.prediction, i.meta["diagnosis"]) for i in items]
    dx = classification.accuracy(correct, "diagnosis_accuracy", "meta.diagnosis asserted in prediction (eval.judge)")
    rows = [{**r, "diagnosis_named": int(c)} for r, c in zip(rows, correct)]
  else:
    dx = Unavailable("diagnosis_accuracy",
                     f"{len(items) - len(with_dx)} of {len(items)} rationale items lack meta.diagnosis")
  return [dx] + metrics, extras, rows


_TEXT_COLUMNS = ("rouge_l", "bleu1", "bleu4", "cider", "meteor", "semantic", "term_recall")


@dataclasses.dataclass(frozen=True)
class Kind:
  task: str
  compute: Callable[[list[Item], Scorers], Computed]
  primary: str  # the metric plotted / summarised first
  columns: tuple[str, ...] = ()  # metrics shown in the report's breakdown tables (default: primary)
  row_metrics: bool = False  # per-row values of its metrics go into predictions.csv


KINDS: dict[str, Kind] = {
    "modality": Kind("modality", _modality, "accuracy", ("accuracy", "unanswered")),
    "diagnosis_binary": Kind("diagnosis", _binary, "binary_accuracy",
                             ("binary_accuracy", "binary_f1", "binary_unanswered")),
    "diagnosis_multilabel": Kind("diagnosis", _multilabel, "multilabel_macro_f1",
                                 ("multilabel_macro_f1", "multilabel_micro_f1")),
    "vqa_closed": Kind("vqa", _vqa_closed, "closed_accuracy", ("closed_accuracy", "closed_unanswered")),
    "vqa_open": Kind("vqa", _vqa_open, "open_token_f1", ("open_token_f1", "open_recall", "open_rouge_l"), True),
    "report": Kind("report", _text, "rouge_l", _TEXT_COLUMNS, True),
    "caption": Kind("caption", _text, "rouge_l", _TEXT_COLUMNS, True),
    "interleaved": Kind("interleaved", _text, "rouge_l", _TEXT_COLUMNS, True),
    "rationale_binary": Kind("rationale", _binary, "binary_accuracy",
                             ("binary_accuracy", "binary_f1", "binary_unanswered")),
    "rationale": Kind("rationale", _rationale, "diagnosis_accuracy", ("diagnosis_accuracy",) + _TEXT_COLUMNS, True),
}
