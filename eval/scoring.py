"""Scores a list of `Item`s: per-task headline metrics with bootstrap CIs and per-group breakdowns.

Output (the body of metrics.json):

  {"n_items", "bootstrap": {...}, "libraries": {...},
   "tasks": {task: {"n", "kinds": {kind: n}, "metrics": {name: {"value", "ci", "n"}},
                    "signatures": {name: str}, "unavailable": {name: reason},
                    "breakdown": {"dim" | "modality" | "source":
                                  {group: {"n", "metrics": {name: {"value", "ci", "n"}}}}},
                    "confusion"?: {...}, "per_label"?: {...}}}}

Every metric is computed once per scoring kind over all its items; breakdown groups (2D / 3D,
CT / MR / X-ray / other, source data set) are row subsets of the same per-sample statistics.
Text kinds add "reference_rows" (the constant-report and shuffled-reference floors) and
"truncated_predictions"; closed kinds add "verdicts" (how many correct / wrong / unanswered).

`validate` runs before scoring: an item whose ground truth is empty or "nan" is an error row (never
scored); duplicated rows (same task, question, answer and prediction, or a repeated id) are listed.
`score(..., rows=[])` fills `rows` with one dict of per-row scores per item (the judge's verdict and
reason for closed answers, per-row text metrics for open ones), in item order.
"""
from __future__ import annotations

import collections
from typing import Any, Sequence

import numpy as np

from eval import bootstrap, normalize
from eval.metrics.base import SampleStats, Unavailable
from eval.metrics.text import version
from eval.tasks import KINDS, Item, Scorers
from radfm_jax.data.schema import RowError

BREAKDOWNS = {
    "dim": lambda item: item.dim_group,
    "modality": lambda item: item.modality_group,
    "source": lambda item: item.source or "unknown",
}
LIBRARIES = ("sacrebleu", "rouge-score", "pycocoevalcap", "nltk", "scikit-learn", "sentence-transformers",
             "numpy")


def _estimates(metrics: list[SampleStats], rows, n_boot: int, seed: int) -> dict[str, dict]:
  return {k: v.as_dict() for k, v in bootstrap.estimate(metrics, rows, n_boot=n_boot, seed=seed).items()}


def validate(items: Sequence[Item], source: str = "") -> tuple[list[Item], list[RowError], list[dict]]:
  """(scorable items, error rows, duplicate groups) - see module doc."""
  ok, errors = [], []
  for item in items:
    if normalize.is_empty(item.answer):
      errors.append(RowError(source or item.source, item.id,
                             f"empty ground truth ({item.answer!r}): not scored"))
    else:
      ok.append(item)
  groups: dict[tuple, list[str]] = collections.defaultdict(list)
  ids: dict[str, int] = collections.Counter(i.id for i in ok)
  for item in ok:
    key = (item.task, " ".join(item.question.split()), " ".join(item.answer.split()),
           " ".join(item.prediction.split()))
    groups[key].append(item.id)
  dups = [{"ids": v, "count": len(v), "task": k[0], "question": k[1][:120]} for k, v in groups.items() if len(v) > 1]
  dups += [{"ids": [i], "count": c, "task": "", "question": "(repeated id)"} for i, c in ids.items() if c > 1]
  return ok, errors, dups


def _row_values(metrics: list[SampleStats]) -> list[dict[str, float]]:
  """Per-row value of each metric: its reducer applied to the row's own statistics."""
  if not metrics:
    return []
  cols = {}
  for m in metrics:
    with np.errstate(invalid="ignore", divide="ignore"):
      vals = np.asarray(m.reduce(m.stats), np.float64).reshape(-1)
    cols[m.name] = [round(float(v), 6) if np.isfinite(v) else None for v in vals]
  return [{k: v[i] for k, v in cols.items()} for i in range(metrics[0].n)]


def score(items: Sequence[Item], scorers: Scorers, *, n_boot: int = bootstrap.DEFAULT_N_BOOT,
          seed: int = 0, rows: list | None = None) -> dict[str, Any]:
  by_kind: dict[str, list[Item]] = collections.defaultdict(list)
  index: dict[str, list[int]] = collections.defaultdict(list)
  for pos, item in enumerate(items):
    by_kind[item.kind].append(item)
    index[item.kind].append(pos)
  row_out = rows
  if row_out is not None:
    row_out[:] = [{"kind": item.kind} for item in items]
  tasks: dict[str, dict[str, Any]] = {}
  for kind_name in KINDS:  # fixed order: reports read the same every run
    kind_items = by_kind.get(kind_name)
    if not kind_items:
      continue
    kind = KINDS[kind_name]
    metrics, extras, kind_rows = kind.compute(kind_items, scorers)
    ok = [m for m in metrics if isinstance(m, SampleStats)]
    if row_out is not None:
      values = _row_values(ok) if kind.row_metrics else [{} for _ in kind_items]
      for pos, r, v in zip(index[kind_name], kind_rows, values):
        row_out[pos].update(r)
        row_out[pos].update(v)
    verdicts = collections.Counter(r["verdict"] for r in kind_rows if "verdict" in r)
    out = tasks.setdefault(kind.task, {"n": 0, "kinds": {}, "metrics": {}, "signatures": {},
                                       "unavailable": {}, "breakdown": {b: {} for b in BREAKDOWNS}})
    out["n"] += len(kind_items)
    out["kinds"][kind_name] = len(kind_items)
    out["metrics"].update(_estimates(ok, None, n_boot, seed))
    out["signatures"].update({m.name: m.signature for m in ok})
    out["unavailable"].update({m.name: m.reason for m in metrics if isinstance(m, Unavailable)})
    out.update(extras)  # confusion, per_label, reference_rows, truncated_predictions
    if verdicts:
      tally = out.setdefault("verdicts", {})
      for k, v in verdicts.items():
        tally[k] = tally.get(k, 0) + v
    for bname, key in BREAKDOWNS.items():
      groups: dict[str, list[int]] = collections.defaultdict(list)
      for row, item in enumerate(kind_items):
        groups[key(item)].append(row)
      for group, rows in sorted(groups.items()):
        entry = out["breakdown"][bname].setdefault(group, {"n": 0, "metrics": {}})
        entry["n"] += len(rows)
        entry["metrics"].update(_estimates(ok, np.asarray(rows), n_boot, seed))
  return {
      "n_items": len(items),
      "bootstrap": {"replicates": n_boot, "seed": seed, "level": 0.95, "method": "percentile, paired"},
      "libraries": {lib: version(lib) for lib in LIBRARIES},
      "tasks": tasks,
  }


def headline_rows(metrics_json: dict[str, Any]) -> list[dict[str, Any]]:
  """Flat rows (task, metric, value, lo, hi, n) of the headline numbers, primary metrics first."""
  primaries = {k.primary for k in KINDS.values()}
  rows = []
  for task, body in metrics_json["tasks"].items():
    names = sorted(body["metrics"], key=lambda n: (n not in primaries, list(body["metrics"]).index(n)))
    for name in names:
      est = body["metrics"][name]
      rows.append({"task": task, "metric": name, "value": est["value"], "lo": est["ci"][0],
                   "hi": est["ci"][1], "n": est["n"], "primary": name in primaries})
  return rows
