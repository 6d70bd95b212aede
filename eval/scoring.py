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
"""
from __future__ import annotations

import collections
from typing import Any, Sequence

import numpy as np

from eval import bootstrap
from eval.metrics.base import SampleStats, Unavailable
from eval.metrics.text import version
from eval.tasks import KINDS, Item, Scorers

BREAKDOWNS = {
    "dim": lambda item: item.dim_group,
    "modality": lambda item: item.modality_group,
    "source": lambda item: item.source or "unknown",
}
LIBRARIES = ("sacrebleu", "rouge-score", "pycocoevalcap", "nltk", "scikit-learn", "sentence-transformers",
             "numpy")


def _estimates(metrics: list[SampleStats], rows, n_boot: int, seed: int) -> dict[str, dict]:
  return {k: v.as_dict() for k, v in bootstrap.estimate(metrics, rows, n_boot=n_boot, seed=seed).items()}


def score(items: Sequence[Item], scorers: Scorers, *, n_boot: int = bootstrap.DEFAULT_N_BOOT,
          seed: int = 0) -> dict[str, Any]:
  by_kind: dict[str, list[Item]] = collections.defaultdict(list)
  for item in items:
    by_kind[item.kind].append(item)
  tasks: dict[str, dict[str, Any]] = {}
  for kind_name in KINDS:  # fixed order: reports read the same every run
    kind_items = by_kind.get(kind_name)
    if not kind_items:
      continue
    kind = KINDS[kind_name]
    metrics, extras = kind.compute(kind_items, scorers)
    ok = [m for m in metrics if isinstance(m, SampleStats)]
    out = tasks.setdefault(kind.task, {"n": 0, "kinds": {}, "metrics": {}, "signatures": {},
                                       "unavailable": {}, "breakdown": {b: {} for b in BREAKDOWNS}})
    out["n"] += len(kind_items)
    out["kinds"][kind_name] = len(kind_items)
    out["metrics"].update(_estimates(ok, None, n_boot, seed))
    out["signatures"].update({m.name: m.signature for m in ok})
    out["unavailable"].update({m.name: m.reason for m in metrics if isinstance(m, Unavailable)})
    out.update(extras)  # confusion (modality), per_label (multi-label diagnosis)
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
