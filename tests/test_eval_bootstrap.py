"""Bootstrap CIs: contain the point estimate, shrink with n, are seeded, and work on row subsets."""
import numpy as np
import pytest

from eval import bootstrap
from eval.metrics import classification, text
from eval.metrics.base import mean_metric


def _accuracy(n, p=0.7, seed=0):
  rng = np.random.default_rng(seed)
  return classification.accuracy(rng.random(n) < p)


def test_ci_contains_point_and_shrinks_with_n():
  widths = []
  for n in (40, 400, 4000):
    est = bootstrap.estimate([_accuracy(n)], n_boot=500, seed=1)["accuracy"]
    assert est.n == n
    assert est.lo <= est.value <= est.hi
    widths.append(est.hi - est.lo)
  assert widths[0] > widths[1] > widths[2] > 0
  # Roughly the normal-approximation width 2 * 1.96 * sqrt(p(1-p)/n).
  assert widths[1] == pytest.approx(2 * 1.96 * np.sqrt(0.7 * 0.3 / 400), rel=0.25)


def test_seeded_and_paired():
  a = bootstrap.estimate([_accuracy(100)], n_boot=300, seed=5)["accuracy"]
  b = bootstrap.estimate([_accuracy(100)], n_boot=300, seed=5)["accuracy"]
  c = bootstrap.estimate([_accuracy(100)], n_boot=300, seed=6)["accuracy"]
  assert a == b and a != c
  # Chunked replicate generation gives the same draws as a single chunk.
  full = np.concatenate(list(bootstrap.replicate_weights(50, 64, seed=2)))
  old = bootstrap._CHUNK_ELEMS
  try:
    bootstrap._CHUNK_ELEMS = 50 * 7
    chunked = np.concatenate(list(bootstrap.replicate_weights(50, 64, seed=2)))
  finally:
    bootstrap._CHUNK_ELEMS = old
  np.testing.assert_array_equal(full, chunked)
  assert full.shape == (64, 50) and np.all(full.sum(1) == 50)


def test_rows_subset_and_degenerate_cases():
  m = mean_metric("score", [1.0, 0.0, 1.0, 1.0, 0.0, 0.5])
  est = bootstrap.estimate([m], np.array([0, 2, 3]), n_boot=100)["score"]
  assert (est.value, est.lo, est.hi, est.n) == (1.0, 1.0, 1.0, 3)
  assert bootstrap.estimate([m], np.array([], dtype=int))["score"].value is None
  no_ci = bootstrap.estimate([m], n_boot=0)["score"]
  assert no_ci.value == pytest.approx(3.5 / 6) and no_ci.lo is None
  with pytest.raises(ValueError, match="different sample counts"):
    bootstrap.estimate([m, mean_metric("other", [1.0])])


def test_corpus_bleu_ci():
  rng = np.random.default_rng(0)
  words = "the lungs are clear no effusion heart size normal mild edema".split()
  refs = [" ".join(rng.choice(words, 8)) for _ in range(60)]
  preds = [" ".join(r.split()[:5] + list(rng.choice(words, 3))) for r in refs]
  m = text.bleu(preds, refs, (2,))[0]
  est = bootstrap.estimate([m], n_boot=200, seed=0)["bleu2"]
  assert est.lo < est.value < est.hi
  assert est.value == pytest.approx(m.value())
