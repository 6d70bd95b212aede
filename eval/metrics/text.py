"""Text-overlap metrics from well-kept libraries, as per-sample statistics (see `eval.metrics.base`).

* BLEU-1..4: sacrebleu corpus BLEU (13a tokenizer, lower-cased, exp smoothing) on a 0-1 scale; the
  per-sample rows are sacrebleu's own n-gram match/total counts, reduced by `BLEU.compute_bleu`.
* ROUGE-L: rouge-score's `RougeScorer(['rougeL'], use_stemmer=True)` F-measure, mean over samples.
* CIDEr: pycocoevalcap's CIDEr-D scorer (pure python). The Java PTB tokenizer is not used: text is
  lower-cased with punctuation removed in python (`simple_tokens`). Document frequencies come from the
  references of the scored set; breakdown subsets reuse them.
* METEOR: `eval.metrics.meteor` (the jar's corpus score, in a bounded subprocess).
* Token F1 / recall (open VQA): SQuAD-style bag-of-words overlap on `normalize.answer_tokens`;
  recall is the fraction of ground-truth tokens found in the prediction.
"""
from __future__ import annotations

import collections
import functools
import importlib.metadata
import re
from typing import Sequence

import numpy as np

from eval import normalize
from eval.metrics.base import SampleStats, mean_metric

BLEU_ORDERS = (1, 2, 3, 4)


def version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "not-installed"


def simple_tokens(text: str) -> str:
  """Lower case, punctuation removed, image tokens stripped, single spaces (CIDEr's input)."""
  text = normalize.strip_image_tokens(str(text)).lower()
  return " ".join(re.sub(r"[^\w\s]|_", " ", text).split())


def clean_text(text: str) -> str:
  """Image tokens stripped, whitespace collapsed (the input of every text metric)."""
  return " ".join(normalize.strip_image_tokens(str(text)).split())


_clean = clean_text


# ---------------------------------------------------------------------------------------------- token F1
def token_overlap(preds: Sequence[str], refs: Sequence[str]) -> list[SampleStats]:
  """[token_f1, recall] per sample (both 1 when prediction and reference are both empty)."""
  f1, rec = [], []
  for p, r in zip(preds, refs, strict=True):
    pt, rt = normalize.answer_tokens(p), normalize.answer_tokens(r)
    if not pt or not rt:
      f1.append(float(pt == rt))
      rec.append(float(pt == rt) if not rt else 0.0)
      continue
    common = sum((collections.Counter(pt) & collections.Counter(rt)).values())
    precision, recall = common / len(pt), common / len(rt)
    f1.append(0.0 if common == 0 else 2 * precision * recall / (precision + recall))
    rec.append(recall)
  sig = "bag-of-words on normalize.answer_tokens (lower, no punctuation, no articles)"
  return [mean_metric("token_f1", f1, sig), mean_metric("recall", rec, sig)]


# -------------------------------------------------------------------------------------------------- BLEU
@functools.lru_cache(maxsize=None)
def _bleu(order: int):
  from sacrebleu.metrics import BLEU  # pylint: disable=import-outside-toplevel
  return BLEU(max_ngram_order=order, lowercase=True, tokenize="13a")


def _bleu_reducer(order: int):
  bleu = _bleu(order)
  top = max(BLEU_ORDERS)

  def reduce(sums: np.ndarray) -> np.ndarray:
    flat = np.asarray(sums, np.float64).reshape(-1, sums.shape[-1])
    out = np.empty(flat.shape[0])
    for i, s in enumerate(flat):
      correct, total = s[2:2 + order], s[2 + top:2 + top + order]
      out[i] = bleu.compute_bleu(
          correct=[int(round(c)) for c in correct], total=[int(round(t)) for t in total],
          sys_len=int(round(s[0])), ref_len=int(round(s[1])), smooth_method=bleu.smooth_method,
          smooth_value=bleu.smooth_value, effective_order=bleu.effective_order,
          max_ngram_order=order).score / 100.0
    return out.reshape(sums.shape[:-1])
  return reduce


def bleu(preds: Sequence[str], refs: Sequence[str], orders: Sequence[int] = BLEU_ORDERS) -> list[SampleStats]:
  """Corpus BLEU-k for each k in `orders` (0-1 scale), single reference per sample."""
  top = _bleu(max(BLEU_ORDERS))
  stats = np.asarray(top._extract_corpus_statistics(  # pylint: disable=protected-access
      [_clean(p) for p in preds], [[_clean(r) for r in refs]]), dtype=np.float64)
  stats = stats.reshape(len(preds), 2 + 2 * max(BLEU_ORDERS))
  sig = f"sacrebleu {top.get_signature()}"
  return [SampleStats(f"bleu{k}", stats, _bleu_reducer(k), f"{sig}|order:{k}|scale:0-1") for k in orders]


# ----------------------------------------------------------------------------------------------- ROUGE-L
@functools.lru_cache(maxsize=None)
def _rouge():
  from rouge_score import rouge_scorer  # pylint: disable=import-outside-toplevel
  return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(preds: Sequence[str], refs: Sequence[str]) -> SampleStats:
  scorer = _rouge()
  scores = [scorer.score(_clean(r), _clean(p))["rougeL"].fmeasure for p, r in zip(preds, refs, strict=True)]
  return mean_metric("rouge_l", scores, f"rouge-score=={version('rouge-score')}|rougeL|stemmer:porter|F|mean")


# ------------------------------------------------------------------------------------------------- CIDEr
def cider(preds: Sequence[str], refs: Sequence[str]) -> SampleStats:
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=import-outside-toplevel
  gts = {i: [simple_tokens(r)] for i, r in enumerate(refs)}
  res = {i: [simple_tokens(p)] for i, p in enumerate(preds)}
  _, scores = Cider().compute_score(gts, res)
  sig = f"pycocoevalcap=={version('pycocoevalcap')}|CIDEr-D|tok:python lower+strip-punct|df:scored set"
  return mean_metric("cider", np.asarray(scores, np.float64), sig)
