"""The answer judge against the hand-graded set (eval/data/graded_answers.jsonl): accuracy and Cohen's
kappa (scikit-learn) over the four labels correct / wrong / unanswered / open.

The figures are reported in eval/README.md; the set and its grading policy are described in
eval/data/make_graded_answers.py (gold labels written before the judge saw the rows).
"""
import collections
import json
import pathlib

import pytest
from sklearn.metrics import cohen_kappa_score

from eval.judge import LABELS, judge

GRADED = pathlib.Path(__file__).resolve().parent.parent / "eval" / "data" / "graded_answers.jsonl"
ERROR_KINDS = {"negation_other_finding", "implicit", "hedge", "contradiction", "both_options", "modality_wording",
               "modality_sequence", "modality_rejected", "unanswered", "options_in_question", "routing_open"}


@pytest.fixture(scope="module")
def graded():
  rows = [json.loads(line) for line in GRADED.read_text(encoding="utf-8").splitlines() if line.strip()]
  verdicts = [judge(r["question"], r["reference"], r["answer"], r["options"], r["task"]).label for r in rows]
  return rows, verdicts


def test_set_covers_the_issue(graded):
  rows, _ = graded
  assert len(rows) >= 200
  assert {r["task"] for r in rows} >= {"modality", "diagnosis", "vqa", "rationale"}
  assert set(collections.Counter(r["kind"] for r in rows)) >= ERROR_KINDS
  assert {r["gold"] for r in rows} == set(LABELS)
  assert len({(r["question"], r["reference"], r["answer"], str(r["options"])) for r in rows}) == len(rows)


def test_agreement_with_graders(graded):
  rows, verdicts = graded
  gold = [r["gold"] for r in rows]
  acc = sum(g == v for g, v in zip(gold, verdicts)) / len(rows)
  kappa = cohen_kappa_score(gold, verdicts)
  misses = [(r["id"], r["gold"], v, r["answer"]) for r, v in zip(rows, verdicts) if r["gold"] != v]
  print(f"\njudge vs graders: n={len(rows)} accuracy={acc:.3f} kappa={kappa:.3f}; misses: {misses}")
  assert acc >= 0.95, misses
  assert kappa >= 0.9, misses
