"""Medical-term precision / recall: RadFM's "UMLS precision / recall" with a shipped term list.

Deviation from the paper: RadFM counts UMLS concepts. UMLS needs a licence and a multi-GB download, so
this project ships `eval/data/radiology_terms.txt` (~550 open, hand-written radiology terms: anatomy,
findings, diseases, devices, techniques) and matches it lexically. Numbers are comparable between
systems scored with the same file, not with the paper's UMLS values.

Matching: text is cut into clauses and words by the answer judge (`eval.judge.context`), each word
Porter-stemmed (nltk, no data files needed), then terms are found greedily longest-first, left to
right, without overlaps, within a clause; a text's terms are a *set* of the terms it *asserts*: a term
under a negation ("no effusion", "pneumothorax is absent") or in a hedged clause ("possible
pneumonia") is not counted, so a report that negates every finding asserts none of them.
Per sample: matched = |pred ∩ ref|.
Precision = Σ matched / Σ |pred terms|, recall = Σ matched / Σ |ref terms| (micro-averaged over the
scored samples, so samples without terms do not produce undefined ratios).
"""
from __future__ import annotations

import functools
import hashlib
import pathlib
from typing import Sequence

import numpy as np

from eval import normalize
from eval.judge import context
from eval.metrics.base import SampleStats, ratio_metric
from eval.metrics.text import version

DEFAULT_TERMS = pathlib.Path(__file__).resolve().parent.parent / "data" / "radiology_terms.txt"


@functools.lru_cache(maxsize=None)
def _stemmer():
  from nltk.stem.porter import PorterStemmer  # pylint: disable=import-outside-toplevel
  return PorterStemmer()


def _stems(text: str) -> tuple[str, ...]:
  stem = _stemmer().stem
  return tuple(stem(w) for w in normalize.normalize_answer(text).split())


class TermMatcher:
  """Finds the terms of a term-list file in text (see module doc)."""

  def __init__(self, path: str | pathlib.Path = DEFAULT_TERMS):
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"term list {self.path} does not exist")
    raw = self.path.read_bytes()
    self.sha256 = hashlib.sha256(raw).hexdigest()[:12]
    self.terms: dict[tuple[str, ...], str] = {}
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), 1):
      line = line.split("#", 1)[0].strip()
      if not line:
        continue
      key = _stems(line)
      if not key:
        raise ValueError(f"{self.path}:{lineno}: term {line!r} is empty after normalisation")
      self.terms.setdefault(key, line)
    if not self.terms:
      raise ValueError(f"term list {self.path} has no terms")
    self.max_len = max(len(k) for k in self.terms)

  def _clause_terms(self, words: tuple[str, ...]) -> list[tuple[str, tuple[int, ...]]]:
    out, i = [], 0
    while i < len(words):
      for n in range(min(self.max_len, len(words) - i), 0, -1):
        term = self.terms.get(words[i:i + n])
        if term is not None:
          out.append((term, tuple(range(i, i + n))))
          i += n
          break
      else:
        i += 1
    return out

  def find(self, text: str, asserted_only: bool = True) -> set[str]:
    """The (canonical spellings of the) terms `text` asserts (all it names with asserted_only=False)."""
    found = set()
    stem = _stemmer().stem
    for clause in context.clauses(text):
      keep = [i for i, t in enumerate(clause.tokens) if t != ","]
      words = tuple(stem(clause.tokens[i]) for i in keep)
      for term, pos in self._clause_terms(words):
        if not asserted_only or context.status(clause, [keep[p] for p in pos]) == context.ASSERTED:
          found.add(term)
    return found

  @property
  def signature(self) -> str:
    return (f"{self.path.name} sha256:{self.sha256} ({len(self.terms)} terms)|porter stem "
            f"(nltk=={version('nltk')})|longest match|asserted only (eval.judge negation/uncertainty)|micro")

  def __call__(self, preds: Sequence[str], refs: Sequence[str]) -> list[SampleStats]:
    matched, n_pred, n_ref = [], [], []
    for p, r in zip(preds, refs, strict=True):
      tp, tr = self.find(p), self.find(r)
      matched.append(len(tp & tr))
      n_pred.append(len(tp))
      n_ref.append(len(tr))
    m = np.asarray(matched, np.float64)
    return [ratio_metric("term_precision", m, np.asarray(n_pred), self.signature),
            ratio_metric("term_recall", m, np.asarray(n_ref), self.signature)]
