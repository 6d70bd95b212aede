"""Seeded percentile bootstrap confidence intervals over `SampleStats` metrics.

A replicate draws n samples with replacement (multinomial counts, numpy `default_rng(seed)`), forms the
count-weighted column sums of each metric's per-sample statistics and reduces them; the CI is the
(alpha/2, 1-alpha/2) percentile of the replicates. All metrics of one sample set share the same
replicates (a paired bootstrap), so differences between them are consistent. Replicates whose score is
undefined (e.g. 0/0) are dropped from the percentiles.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from eval.metrics.base import SampleStats

DEFAULT_N_BOOT = 1000
_CHUNK_ELEMS = 4_000_000  # replicate-by-sample weights held at once


@dataclasses.dataclass(frozen=True)
class Estimate:
  value: float | None
  lo: float | None
  hi: float | None
  n: int

  def as_dict(self) -> dict:
    return {"value": self.value, "ci": [self.lo, self.hi], "n": self.n}


def replicate_weights(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
  """Yields `[chunk, n]` bootstrap count matrices (each row sums to n), n_boot rows in all."""
  rng = np.random.default_rng(seed)
  chunk = max(1, min(n_boot, _CHUNK_ELEMS // max(n, 1)))
  done = 0
  while done < n_boot:
    b = min(chunk, n_boot - done)
    yield rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)
    done += b


def _finite(x: float) -> float | None:
  return float(x) if np.isfinite(x) else None


def estimate(metrics: Sequence[SampleStats], rows: np.ndarray | None = None, *,
             n_boot: int = DEFAULT_N_BOOT, seed: int = 0, level: float = 0.95) -> dict[str, Estimate]:
  """Point value and percentile CI of each metric over `rows` (default: all samples)."""
  if not metrics:
    return {}
  n_all = metrics[0].n
  if any(m.n != n_all for m in metrics):
    raise ValueError(f"metrics over different sample counts: {[(m.name, m.n) for m in metrics]}")
  rows = np.arange(n_all) if rows is None else np.asarray(rows)
  n = int(rows.size)
  if n == 0:
    return {m.name: Estimate(None, None, None, 0) for m in metrics}
  stats = [m.stats[rows] for m in metrics]
  points = [_finite(m.reduce(s.sum(0))) for m, s in zip(metrics, stats)]
  reps: list[list[np.ndarray]] = [[] for _ in metrics]
  if n_boot > 0:
    for w in replicate_weights(n, n_boot, seed):
      for i, (m, s) in enumerate(zip(metrics, stats)):
        reps[i].append(np.asarray(m.reduce(w @ s), dtype=np.float64).reshape(-1))
  alpha = (1.0 - level) / 2.0
  out = {}
  for m, p, r in zip(metrics, points, reps):
    vals = np.concatenate(r) if r else np.zeros(0)
    vals = vals[np.isfinite(vals)]
    if p is None or vals.size == 0:
      out[m.name] = Estimate(p, None, None, n)
      continue
    lo, hi = np.quantile(vals, [alpha, 1.0 - alpha])
    out[m.name] = Estimate(p, float(lo), float(hi), n)
  return out
