"""Clauses, phrase matching and ConText-style assertion status (negated / uncertain / asserted).

Own rules, not medspacy / negspacy: medspacy 1.3.1 pins spaCy 3.7.5 + thinc 8.2.4, whose compiled
extensions fail to import with numpy 2.4.6 ("numpy.dtype size changed"); negspacy 1.1.0 imports with
spaCy 3.8 but adds spaCy and ~20 packages to the pinned set and only detects negation (no
uncertainty, so no hedges). The trigger lists below follow NegEx / ConText (Chapman et al.):

* The answer is cut into sentences (. ; ! ? newline, not decimal points), then into clauses before
  "but / however / although / though / whereas / while / except / yet", and at a comma followed by a
  clause opener ("Not a CT, this is an MRI"); a comma inside a list ("no effusion, edema or mass")
  does not cut. Concessive clauses (although / though / while / despite) are marked.
* Negation: pre-triggers ("no", "not", "without", "negative for", "free of", "absence of", "ruled out",
  "never", "neither / nor") govern the next `PRE_WINDOW` tokens of the clause; "non" only the next
  token; post-triggers ("absent", "excluded", "resolved", "ruled out", "not seen / present /
  enlarged...") govern the words before them in the clause. "Cannot be excluded" and friends are
  uncertainty, never negation.
* Uncertainty ("possibly", "may", "might", "could", "cannot exclude", "suspicious for", "either",
  "not sure", "questionable", "versus"...) covers its whole clause. "Likely", "probable",
  "consistent with", "suggestive of" are commitments (radiology reporting convention), not hedges.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import unicodedata
from typing import Iterable, Sequence

ASSERTED, NEGATED, UNCERTAIN = "asserted", "negated", "uncertain"

_IMAGE_TOKEN = re.compile(r"</?image\d*>")
_SENTENCE = re.compile(r"(?<!\d)[.;!?](?!\d)|\n")
_TOKEN = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?|,")
_CONJ = frozenset({"but", "however", "although", "though", "whereas", "while", "except", "yet", "despite"})
CONCESSIVE = frozenset({"although", "though", "while", "despite"})
# A comma followed by one of these opens a new clause.
_OPENERS = frozenset({"this", "it", "there", "that", "these", "they", "i", "we", "the", "and", "which", "its",
                      "it's", "on", "so"})

PRE_WINDOW, POST_WINDOW = 6, 5

NEG_PRE = (("no",), ("not",), ("without",), ("never",), ("neither",), ("nor",), ("negative", "for"),
           ("free", "of"), ("absence", "of"), ("absent",), ("ruled", "out"), ("rules", "out"), ("exclude",),
           ("excludes",), ("nothing", "to", "suggest"), ("rather", "than"), ("instead", "of"), ("unlikely",),
           ("than",))
NEG_POST = (("absent",), ("excluded",), ("resolved",), ("ruled", "out"), ("negative",), ("none",), ("unlikely",))
UNCERTAIN_TRIGGERS = (
    ("possible",), ("possibly",), ("maybe",), ("perhaps",), ("may",), ("might",), ("could",),
    ("can", "not", "exclude"), ("can", "not", "be", "excluded"), ("can", "not", "rule", "out"),
    ("can", "not", "be", "ruled", "out"), ("not", "excluded"), ("not", "be", "excluded"),
    ("not", "sure"), ("unsure",), ("uncertain",), ("unclear",), ("questionable",), ("equivocal",),
    ("indeterminate",), ("suspicious", "for"), ("suspected",), ("suspect",), ("either",),
    ("differential",), ("versus",), ("vs",), ("hard", "to", "say"), ("difficult", "to", "say"),
    ("not", "certain"), ("query",), ("cannot", "say"), ("can", "not", "say"), ("or", "not"))
# "not" + one of these (or a participle-like word) after a finding negates the words before it.
_POST_NOT = frozenset({"seen", "present", "identified", "visualized", "visualised", "demonstrated", "noted",
                       "evident", "appreciated", "visible", "detected", "shown", "there", "found",
                       "midline", "normal", "clear", "malignant", "benign", "cystic", "solid"})
_SKIP_AFTER_NOT = frozenset({"be", "been", "is", "are", "was", "were", "seem", "appear", "appears", "really"})
_DETERMINERS = frozenset({"a", "an", "the", "any", "this", "that", "on", "in", "of", "at"})


@dataclasses.dataclass(frozen=True)
class Clause:
  tokens: tuple[str, ...]  # lower case (n't split into "not")
  raw: tuple[str, ...]     # as written (case kept, for abbreviations such as US)
  stems: tuple[str, ...]
  concessive: bool = False

  def __len__(self):
    return len(self.tokens)


@functools.lru_cache(maxsize=None)
def _porter():
  from nltk.stem.porter import PorterStemmer  # pylint: disable=import-outside-toplevel  (nltk loads slowly)
  return PorterStemmer()


@functools.lru_cache(maxsize=65536)
def stem(word: str) -> str:
  """Porter stem, then a trailing i/u dropped ("emboli", "embolus" -> "embol"; "calcified" -> "calcif")."""
  s = _porter().stem(word.lower())
  return s[:-1] if len(s) > 5 and s[-1] in "iu" else s


def clean(text: str) -> str:
  return unicodedata.normalize("NFKC", _IMAGE_TOKEN.sub(" ", str(text or "")))


def _split_words(raw_tokens: Iterable[str]) -> tuple[list[str], list[str]]:
  low, raw = [], []
  for tok in raw_tokens:
    lw = tok.lower()
    if lw.endswith("n't"):
      base = {"ca": "can", "wo": "will", "sha": "shall"}.get(lw[:-3], lw[:-3])
      low += [base, "not"]
      raw += [tok[:-3], "not"]
    elif lw == "cannot":
      low += ["can", "not"]
      raw += ["can", "not"]
    else:
      low.append(lw)
      raw.append(tok)
  return low, raw


def clauses(text: str) -> list[Clause]:
  """The answer cut into clauses (see module doc)."""
  out = []
  for sentence in _SENTENCE.split(clean(text)):
    low, raw = _split_words(_TOKEN.findall(sentence))
    start, concessive = 0, False
    cuts = []
    for i, tok in enumerate(low):
      if i > start and tok in _CONJ and not (tok == "while" and i + 1 < len(low) and low[i + 1] == "the"):
        cuts.append(i)
      elif tok == "," and i + 1 < len(low) and low[i + 1] in _OPENERS:
        cuts.append(i + 1)
    bounds = [0] + cuts + [len(low)]
    for a, b in zip(bounds, bounds[1:]):
      seg_low, seg_raw = low[a:b], raw[a:b]
      if not seg_low:
        continue
      concessive = seg_low[0] in CONCESSIVE or (seg_low[:2] == ["even", "though"])
      while seg_low and seg_low[0] in _CONJ:
        seg_low, seg_raw = seg_low[1:], seg_raw[1:]
      if any(t != "," for t in seg_low):
        out.append(Clause(tuple(seg_low), tuple(seg_raw), tuple(stem(t) for t in seg_low), concessive))
  return out


def find_phrase(seq: Sequence[str], phrase: Sequence[str]) -> list[int]:
  """Start positions of `phrase` in `seq` (token sequences)."""
  n = len(phrase)
  if n == 0:
    return []
  return [i for i in range(len(seq) - n + 1) if tuple(seq[i:i + n]) == tuple(phrase)]


def _spans(tokens: Sequence[str], triggers: Sequence[tuple[str, ...]]) -> list[tuple[int, int]]:
  return [(i, i + len(t)) for t in triggers for i in find_phrase(tokens, t)]


def _breaks(tokens: Sequence[str], i: int) -> bool:
  return tokens[i] in _CONJ or (tokens[i] == "," and i + 1 < len(tokens) and tokens[i + 1] in _OPENERS)


@functools.lru_cache(maxsize=8192)
def uncertain_spans(clause: Clause) -> tuple[tuple[int, int], ...]:
  return tuple(_spans(clause.tokens, UNCERTAIN_TRIGGERS))


@functools.lru_cache(maxsize=8192)
def negated_positions(clause: Clause) -> frozenset[int]:
  """Token positions governed by a negation trigger (uncertainty phrases excluded)."""
  toks = clause.tokens
  blocked = {i for a, b in uncertain_spans(clause) for i in range(a, b)}
  out: set[int] = set()
  for a, b in _spans(toks, NEG_PRE):
    if any(i in blocked for i in range(a, b)):
      continue
    if toks[a] in ("absent", "unlikely") and a > 0:
      continue  # "X is absent": a post-trigger (below)
    for i in range(b, min(len(toks), b + PRE_WINDOW)):
      if _breaks(toks, i) or toks[i] == "yes":
        break
      out.add(i)
  for a, _ in _spans(toks, (("non",),)):
    out.add(a + 1)
  post = [s for s in _spans(toks, NEG_POST) if not any(i in blocked for i in range(*s))]
  for a, _ in _spans(toks, (("not",),)):
    if a in blocked:
      continue
    j = a + 1
    while j < len(toks) and toks[j] in _SKIP_AFTER_NOT:
      j += 1
    if j >= len(toks) or toks[j] == "," or toks[j] in _POST_NOT or (
        toks[j] not in _DETERMINERS and re.search(r"(ed|en|ble|ent)$", toks[j])):
      post.append((a, a + 1))
  for a, _ in post:
    for i in range(a - 1, max(-1, a - 1 - POST_WINDOW), -1):
      if _breaks(toks, i) or toks[i] == "yes":
        break
      out.add(i)
  return frozenset(out)


def status(clause: Clause, positions: Iterable[int]) -> str:
  """ASSERTED / NEGATED / UNCERTAIN for the words at `positions` of `clause`."""
  positions = list(positions)
  if uncertain_spans(clause):
    return UNCERTAIN
  neg = negated_positions(clause)
  return NEGATED if any(p in neg for p in positions) else ASSERTED


@dataclasses.dataclass(frozen=True)
class Mention:
  what: str       # the concept / option found
  clause: int     # clause index
  positions: tuple[int, ...]
  status: str
  concessive: bool = False


def phrase_positions(stems: Sequence[str], phrase_stems: Sequence[str]) -> list[tuple[int, ...]]:
  return [tuple(range(i, i + len(phrase_stems))) for i in find_phrase(stems, phrase_stems)]


def phrase_stems(text: str) -> tuple[str, ...]:
  low, _ = _split_words(_TOKEN.findall(clean(text)))
  return tuple(stem(t) for t in low if t != ",")


def statuses(text: str, phrase: str) -> list[str]:
  """The status of every occurrence of `phrase` (matched on stems) in `text`."""
  key = phrase_stems(phrase)
  out = []
  for c in clauses(text):
    out += [status(c, pos) for pos in phrase_positions(c.stems, key)] if key else []
  return out


MAX_WORDS = 1000


def asserted(text: str, phrase: str) -> bool:
  """True when `text` (read up to MAX_WORDS words) names `phrase` at least once without negating or
  hedging it."""
  words = str(text or "").split()
  return ASSERTED in statuses(" ".join(words[:MAX_WORDS]) if len(words) > MAX_WORDS else text, phrase)
