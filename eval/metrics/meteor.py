"""METEOR 1.5 from pycocoevalcap's bundled jar, run in a bounded subprocess.

The number reported as **meteor** is the jar's own corpus score (pycocoevalcap's `compute_score`
first return value: statistics summed over segments, then one score), comparable with published
tables; **meteor_segment_mean** is the mean of the per-segment scores (what this project reported as
METEOR before, 9-55% higher on reports).

Each segment's 23 sufficient statistics (the jar's SCORE output: lengths, function words, matches per
module, chunks, word matches) are kept per sample, so the corpus score of any subset or bootstrap
replicate is the jar's formula (Meteor 1.5 `MeteorScorer.computeMetrics`, "-l en" default parameters
alpha 0.85, beta 0.20, gamma 0.60, delta 0.75, module weights 1.0 0.6 0.8 0.6) applied to summed
statistics; `MeteorScorer` checks that formula against the jar's EVAL answer on every call.

Bounds (pycocoevalcap's wrapper has none: a 1 MB prediction makes the jar run out of memory and the
wrapper then deadlocks in `__del__` on a lock it never released):
* every text is cut to `max_words` words (counted and named in the signature);
* every reply is awaited with a deadline (`timeout_s` for the whole call); a dead or silent jar is
  killed and the metric reported `Unavailable` with the reason and the jar's last stderr line;
* `close()` (and garbage collection, and interpreter exit) ends the JVM: stdin closed, terminate,
  kill after 5 s. No locks.
"""
from __future__ import annotations

import functools
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from typing import Sequence

import numpy as np

from eval.metrics.base import Metric, SampleStats, Unavailable, mean_metric
from eval.metrics.text import clean_text, version

ALPHA, BETA, GAMMA, DELTA = 0.85, 0.20, 0.60, 0.75
MODULE_WEIGHTS = np.array([1.0, 0.6, 0.8, 0.6])
STATS_LENGTH = 23
MAX_WORDS = 1000
TIMEOUT_S = 600.0


def jar_path() -> str | None:
  try:
    import pycocoevalcap.meteor.meteor as mod  # pylint: disable=import-outside-toplevel  (optional package)
  except ImportError:
    return None
  return os.path.join(os.path.dirname(mod.__file__), mod.METEOR_JAR)


def unavailable_reason() -> str | None:
  """None when METEOR can run here, else why not."""
  if shutil.which("java") is None:
    return "java not found on PATH (pycocoevalcap's meteor-1.5.jar needs a Java runtime)"
  jar = jar_path()
  if jar is None:
    return "pycocoevalcap not importable"
  if not os.path.exists(jar):
    return f"{jar} missing"
  return None


@functools.lru_cache(maxsize=None)
def java_version() -> str:
  try:
    out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=60, check=False)
    return (out.stderr or out.stdout).splitlines()[0].strip()
  except (OSError, subprocess.SubprocessError, IndexError):
    return "unknown"


def prepare_stats(stats: np.ndarray) -> np.ndarray:
  """Per-segment stats [n, 23] as summed by the jar: a segment that matches perfectly in one chunk
  adds no chunks (Meteor 1.5 `MeteorStats.addStats`)."""
  s = np.array(stats, dtype=np.float64, copy=True)
  tst_total, ref_total = s[:, 4:20:2].sum(1), s[:, 5:20:2].sum(1)
  perfect = (tst_total == s[:, 0]) & (ref_total == s[:, 1]) & (s[:, 20] == 1.0)
  s[perfect, 20] = 0.0
  return s


def score_from_stats(sums: np.ndarray) -> np.ndarray:
  """Meteor 1.5 score of summed statistics [..., 23] (see module doc)."""
  s = np.asarray(sums, dtype=np.float64)
  tl, rl, tf, rf = s[..., 0], s[..., 1], s[..., 2], s[..., 3]
  mods = s[..., 4:20].reshape(s.shape[:-1] + (4, 4))  # [..., module, (tc, rc, tf, rf)]
  chunks, twm, rwm = s[..., 20], s[..., 21], s[..., 22]
  t_len_w = DELTA * (tl - tf) + (1 - DELTA) * tf
  r_len_w = DELTA * (rl - rf) + (1 - DELTA) * rf
  t_match = (mods[..., 0] * MODULE_WEIGHTS * DELTA + mods[..., 2] * MODULE_WEIGHTS * (1 - DELTA)).sum(-1)
  r_match = (mods[..., 1] * MODULE_WEIGHTS * DELTA + mods[..., 3] * MODULE_WEIGHTS * (1 - DELTA)).sum(-1)
  t_total, r_total = (mods[..., 0] + mods[..., 2]).sum(-1), (mods[..., 1] + mods[..., 3]).sum(-1)
  with np.errstate(divide="ignore", invalid="ignore"):
    p, r = t_match / t_len_w, r_match / r_len_w
    fmean = 1.0 / ((1 - ALPHA) / p + ALPHA / r)
    perfect = (t_total == tl) & (r_total == rl) & (chunks == 1)
    frag = np.where(perfect, 0.0, chunks / ((twm + rwm) / 2))
    score = fmean * (1.0 - GAMMA * np.power(frag, BETA))
  return np.where(np.isnan(score), 0.0, np.maximum(score, 0.0))


def cap_words(text: str, max_words: int) -> tuple[str, bool]:
  words = text.split()
  return (" ".join(words[:max_words]), True) if len(words) > max_words else (" ".join(words), False)


class _Jar:
  """One JVM speaking the jar's -stdio protocol; every reply awaited with a deadline."""

  def __init__(self, max_heap: str = "2G"):
    self.stderr = tempfile.TemporaryFile()
    jar = jar_path()
    self.proc = subprocess.Popen(["java", "-jar", f"-Xmx{max_heap}", os.path.basename(jar), "-", "-", "-stdio",
                                  "-l", "en", "-norm"], cwd=os.path.dirname(jar), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=self.stderr)
    self.lines: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, args=(self.proc.stdout, self.lines), daemon=True).start()
    self._finalizer = weakref.finalize(self, _Jar._kill, self.proc, self.stderr)

  @staticmethod
  def _read(stream, lines):
    for line in iter(stream.readline, b""):
      lines.put(line.decode("utf-8", "replace").strip())
    lines.put(None)  # EOF: the JVM ended

  def ask(self, line: str, n_replies: int, deadline: float) -> list[str]:
    self.proc.stdin.write((line + "\n").encode("utf-8"))
    self.proc.stdin.flush()
    out = []
    for _ in range(n_replies):
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        raise TimeoutError("no answer from the METEOR jar before the deadline")
      try:
        reply = self.lines.get(timeout=remaining)
      except queue.Empty as e:
        raise TimeoutError("no answer from the METEOR jar before the deadline") from e
      if reply is None:
        raise RuntimeError(f"the METEOR jar exited (code {self.proc.poll()}): {self.stderr_tail()}")
      out.append(reply)
    return out

  def stderr_tail(self) -> str:
    try:
      self.stderr.seek(0)
      lines = [l for l in self.stderr.read().decode("utf-8", "replace").splitlines() if l.strip()]
      return lines[-1].strip()[:300] if lines else "no stderr output"
    except (OSError, ValueError):
      return "stderr unreadable"

  @staticmethod
  def _kill(proc, stderr):
    try:
      if proc.stdin and not proc.stdin.closed:
        proc.stdin.close()
    except OSError:
      pass
    if proc.poll() is None:
      proc.terminate()
      try:
        proc.wait(timeout=5)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    try:
      stderr.close()
    except OSError:
      pass

  def close(self):
    self._finalizer()


class MeteorScorer:
  """[meteor (corpus), meteor_segment_mean]; one JVM, started on first use, restarted after a failure."""

  def __init__(self, max_words: int = MAX_WORDS, timeout_s: float = TIMEOUT_S):
    self.max_words, self.timeout_s = max_words, timeout_s
    self._jar: _Jar | None = None

  def _unavailable(self, reason: str) -> list[Metric]:
    return [Unavailable("meteor", reason), Unavailable("meteor_segment_mean", reason)]

  def __call__(self, preds: Sequence[str], refs: Sequence[str]) -> list[Metric]:
    reason = unavailable_reason()
    if reason:
      return self._unavailable(reason)
    pairs, truncated = [], 0
    for p, r in zip(preds, refs, strict=True):
      (pc, tp), (rc, tr) = (cap_words(clean_text(t).replace("|||", " "), self.max_words) for t in (p, r))
      truncated += tp + tr
      pairs.append((pc, rc))
    deadline = time.monotonic() + self.timeout_s
    try:
      if self._jar is None:
        self._jar = _Jar()
      stats_lines = [self._jar.ask(f"SCORE ||| {r} ||| {p}", 1, deadline)[0] for p, r in pairs]
      replies = self._jar.ask("EVAL ||| " + " ||| ".join(stats_lines), len(pairs) + 1, deadline)
      stats = np.array([[float(x) for x in line.split()] for line in stats_lines], np.float64)
      segments, corpus = np.array([float(x) for x in replies[:-1]]), float(replies[-1])
    except (OSError, TimeoutError, RuntimeError, ValueError) as e:
      self.close()
      return self._unavailable(f"METEOR jar failed: {type(e).__name__}: {e}")
    if stats.shape != (len(pairs), STATS_LENGTH):
      return self._unavailable(f"METEOR jar returned stats of shape {stats.shape}")
    stats = prepare_stats(stats)
    ours = float(score_from_stats(stats.sum(0)))
    if abs(ours - corpus) > 1e-6:
      return self._unavailable(f"corpus formula {ours:.6f} disagrees with the jar's {corpus:.6f}")
    sig = (f"pycocoevalcap=={version('pycocoevalcap')}|meteor-1.5.jar -l en -norm|{java_version()}"
           f"|inputs capped at {self.max_words} words ({truncated} texts cut)")
    return [SampleStats("meteor", stats, score_from_stats, sig + "|corpus score (jar EVAL)"),
            mean_metric("meteor_segment_mean", segments, sig + "|mean of segment scores")]

  def close(self) -> None:
    if self._jar is not None:
      jar, self._jar = self._jar, None
      jar.close()
