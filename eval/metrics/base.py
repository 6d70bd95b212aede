"""The one shape every RadBench metric takes: per-sample sufficient statistics plus a reducer.

A metric is a `SampleStats`: an `[n, k]` array with one row per scored sample, and a vectorised
`reduce(sums)` that maps column sums `[..., k]` to the score `[...]`. A mean of per-sample scores is
`[score, 1]` reduced by `s0 / s1`; corpus BLEU is sacrebleu's n-gram counts reduced by sacrebleu's own
formula; F1 is `[tp, fp, fn]`. Because every score is a function of column sums, a subset (a per-modality
breakdown) is just a subset of rows, and a bootstrap replicate is a weighted sum of rows
(`eval.bootstrap`). A metric that cannot be computed is an `Unavailable` with the reason, never a zero.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

Reducer = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class SampleStats:
  name: str
  stats: np.ndarray  # [n, k] float64, one row per sample
  reduce: Reducer    # column sums [..., k] -> score [...]
  signature: str = ""

  def __post_init__(self):
    if self.stats.ndim != 2:
      raise ValueError(f"metric {self.name!r}: stats must be [n, k], got shape {self.stats.shape}")

  @property
  def n(self) -> int:
    return int(self.stats.shape[0])

  def value(self, rows: np.ndarray | None = None) -> float:
    """The score over all samples, or over `rows`."""
    stats = self.stats if rows is None else self.stats[rows]
    return float(self.reduce(stats.sum(0)))


@dataclasses.dataclass(frozen=True)
class Unavailable:
  """A metric that could not be computed here (missing tool, weights or labels)."""
  name: str
  reason: str


Metric = SampleStats | Unavailable


def _ratio(sums: np.ndarray) -> np.ndarray:
  with np.errstate(invalid="ignore", divide="ignore"):
    return sums[..., 0] / sums[..., 1]


def mean_metric(name: str, scores: Sequence[float] | np.ndarray, signature: str = "") -> SampleStats:
  """The mean of per-sample scores."""
  s = np.asarray(scores, dtype=np.float64).reshape(-1)
  return SampleStats(name, np.stack([s, np.ones_like(s)], axis=1), _ratio, signature)


def ratio_metric(name: str, numer: np.ndarray, denom: np.ndarray, signature: str = "") -> SampleStats:
  """sum(numer) / sum(denom) (micro-averaged precision / recall)."""
  stats = np.stack([np.asarray(numer, np.float64), np.asarray(denom, np.float64)], axis=1)
  return SampleStats(name, stats, _ratio, signature)


def with_prefix(metrics: Sequence[Metric], prefix: str) -> list[Metric]:
  """Renames metrics to `prefix + name` (e.g. 'open_' for open-ended VQA)."""
  return [dataclasses.replace(m, name=prefix + m.name) for m in metrics]
