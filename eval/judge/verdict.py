"""The answer judge: reads a free-text answer relative to its question and gives a `Verdict`.

Routing (`closed_options`):
* reference yes / no -> a yes/no question about the finding the question names;
* options given (meta.choices) -> a multiple-choice question;
* modality task -> a choice among the imaging modalities;
* otherwise the options written in the question ("left or right?"), when the reference is one of
  them; else the question is open (`OPEN`: not scored as closed).

Yes/no: explicit words ("yes", a bare "no", "negative", "there isn't") and the asked finding's status
in the answer (asserted / negated / uncertain; implicit denial by "normal" wording about the asked
place) must agree. Options: every option named, with its status; rejected ones ("not the left")
never count. Verdicts: CORRECT; WRONG with a reason (another option, a hedge: uncertain or several
options, a contradiction); UNANSWERED (names no option; scored wrong, counted apart).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from eval.judge import context, findings, modality, question as questions
from eval.judge.context import ASSERTED, NEGATED, UNCERTAIN, Clause

CORRECT, WRONG, UNANSWERED, OPEN = "correct", "wrong", "unanswered", "open"
LABELS = (CORRECT, WRONG, UNANSWERED, OPEN)
YES, NO = "yes", "no"

_YES_WORDS = frozenset({"yes", "yeah", "yep", "affirmative"})
_FILLER = frozenset({"it", "is", "are", "was", "were", "be", "this", "that", "there", "the", "a", "an", "i", "do",
                     "does", "did", "not", "no", "yes", "so", "its", "it's", "they", "one", "any", "here", "has",
                     "have", "evidence", "seen", "present", "identified", "visible", "found", "sign", "signs",
                     "definitely", "clearly", "certainly", "indeed", "think", "believe", "would", "say", "answer",
                     "correct", "noted", "shown", "none", ",", "and", "there's", "that's", "it's", "can", "could",
                     "observed", "observe", "see", "detected", "d", "i'd"})
_NO_NEXT = frozenset({",", "it", "this", "there", "the", "i", "that", "they", "we", "its", "it's", "there's"})
_LETTER = re.compile(r"^\s*\(?([A-H])\)?\s*(?:[:.)\-]|$)|\b(?:answer|option|choice)\s*(?:is\s*)?:?\s*\(?([A-H])\)?\b")
_ABNORMAL_Q = re.compile(r"\b(abnormal|affected|involved|diseased|pathologic|lesion)\b", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Verdict:
  label: str          # CORRECT | WRONG | UNANSWERED | OPEN
  reason: str         # one line a reader can check against the answer
  chosen: str | None = None  # the option the answer commits to
  kind: str = ""      # "yes_no" | "choice" | "open"

  @property
  def correct(self) -> bool:
    return self.label == CORRECT


def norm(text: str) -> str:
  return " ".join(t for c in context.clauses(text) for t in c.tokens if t != ",")


# --------------------------------------------------------------------------------------------- routing
def closed_options(question: str, reference: str, options: Sequence[str] | None = None,
                   task: str | None = None) -> list[str] | None:
  """The options the answer must choose among ([yes, no] for yes/no), or None for an open question."""
  ref = norm(reference)
  if ref in (YES, NO):
    return [YES, NO]
  if options:
    opts = [str(o) for o in options if norm(o)]
    return opts if any(_same(o, reference) for o in opts) else opts + [reference]
  if task == "modality":
    return list(modality.MODALITIES) if modality.canonical(reference) else [reference]
  opts = questions.options(question)
  return opts if any(_same(o, reference) for o in opts) else None


def _same(a: str, b: str, by_modality: bool = True) -> bool:
  if context.phrase_stems(a) == context.phrase_stems(b):
    return True
  if not by_modality:
    return False
  ma, mb = modality.canonical(a), modality.canonical(b)
  return bool(ma) and ma == mb and len(norm(a).split()) <= 3 and len(norm(b).split()) <= 3


# ----------------------------------------------------------------------------------------------- yes/no
def _explicit(clause: Clause) -> set[str]:
  toks = clause.tokens
  out = set()
  if any(t in _YES_WORDS for t in toks):
    out.add(YES)
  for i, t in enumerate(toks):
    if t in ("no", "nope") and (i + 1 == len(toks) or toks[i + 1] in _NO_NEXT):
      out.add(NO)
  if toks in (("negative",), ("absent",)):
    out.add(NO)
  elif toks == ("positive",):
    out.add(YES)
  elif not [t for t in toks if t not in _FILLER]:  # only fillers: "There isn't.", "Not present.", "yes there is"
    if {"not", "no", "none"} & set(toks):
      out.add(NO)
    elif NO not in out and ({"present", "seen", "identified", "visible"} & set(toks) or "there" in toks):
      out.add(YES)
  return out


def _relevant(clause: Clause, places: set[tuple[str, ...]], head: str) -> bool:
  """A 'normal' clause speaks about the asked place (subject / location), or the whole study."""
  stems = clause.stems
  if any(p and context.find_phrase(stems, p) for p in places):
    return True
  anatomy = [s for s in stems if s in findings.anatomy_terms() and s not in findings.STUDY_WORDS]
  if head and any(len(s) >= 6 and s[:6] == head[:6] for s in stems):
    return True
  return not anatomy


def _normal_votes(cls: list[Clause], places, head) -> tuple[int, int]:
  """(clauses calling the asked place / study normal, clauses asserting any abnormal finding)."""
  normal = abnormal = 0
  abn = findings.abnormal_terms()
  for c in cls:
    neg = context.negated_positions(c)
    unc = bool(context.uncertain_spans(c))
    is_normal = False
    for p in findings.normal_phrases():
      for pos in context.phrase_positions(c.stems, p):
        if not any(i in neg for i in pos) and not unc:
          is_normal = True
    for p in (context.phrase_stems(w) for w in ("abnormality", "abnormal", "acute process", "pathology",
                                                 "disease", "acute findings")):
      for pos in context.phrase_positions(c.stems, p):
        if any(i in neg for i in pos):
          is_normal = True
    if is_normal and _relevant(c, places, head):
      normal += 1
    for term in abn:
      for pos in context.phrase_positions(c.stems, term):
        if not any(i in neg for i in pos) and not unc:
          abnormal += 1
  return normal, abnormal

_SIDES = {"left": "right", "right": "left"}
_GENERIC_MODIFIERS = frozenset({"acute", "small", "large", "any", "new", "significant", "obvious", "definite",
                                "suspicious", "mild", "moderate", "severe", "chronic", "free", "left", "right",
                                "focal", "possible", "evidence", "sign", "signs"})


def _finding_mentions(f: questions.Finding, cls: list[Clause], concept) -> list[tuple[Clause, tuple[int, ...]]]:
  """Mentions of a plain finding. When the answer uses the asked modifier ("subdural") on its own
  ("... rather than a subdural one") or right before the head, a head word under another modifier
  ("epidural hematoma") is about something else and does not count."""
  mods = {context.phrase_stems(w) for w in f.words[:-1] if w not in _GENERIC_MODIFIERS} - {()}
  found = [(c, pos) for c in cls for pos in findings.match(c, concept)]
  if not mods:
    return found
  def modified(c, pos):
    return any(context.find_phrase(c.stems[max(0, pos[0] - 4):pos[0]], m) for m in mods)
  alone = []
  for c in cls:
    for m in mods:
      for i in context.find_phrase(c.stems, m):
        j = i + len(m)
        if j < len(c.tokens) and c.tokens[j] in ("one", "ones", "type", "kind"):
          alone.append((c, tuple(range(i, j))))
  if not alone and not any(modified(c, pos) for c, pos in found):
    return found
  return [(c, pos) for c, pos in found if modified(c, pos)] + alone


def _finding_evidence(f: questions.Finding, cls: list[Clause]) -> tuple[str | None, str]:
  """('yes' | 'no' | 'hedge' | 'mixed' | None, what was read)."""
  head = context.phrase_stems(f.head)
  head_s = head[0] if head else ""
  normal_q = f.predicate in findings.NORMAL_PREDICATES or (not f.predicate and f.head in ("normal",))
  abnormal_q = not f.predicate and f.head in findings.ABNORMAL_HEADS
  if f.predicate:
    concept = findings.predicate_concept(f.subject, f.predicate)
    antonym = findings.antonym_concept(f.subject, f.predicate)
  elif abnormal_q:
    concept, antonym = [[{t}] for t in findings.abnormal_terms()], None
  else:
    concept, antonym = findings.concept(f.words), None
  places = {context.phrase_stems(w) for w in f.subject + f.location + f.words[:-1] if w}
  for alt in concept:
    if len(alt) == 2:
      places |= alt[0]
  votes, read = [], []
  what = " ".join(f.words)
  plain = not f.predicate and not abnormal_q
  side = next((w for w in f.location + f.words + f.subject if w in _SIDES), None)
  for c, pos in _finding_mentions(f, cls, concept) if plain else [
      (c, pos) for c in cls for pos in findings.match(c, concept)]:
    st = context.status(c, pos)
    if side and _SIDES[side] in c.tokens and side not in c.tokens:
      if not plain or st != ASSERTED:
        continue  # about the other side ("the right kidney is enlarged" to "Is the left kidney enlarged?")
      votes.append(NO)
      read.append(f"puts '{' '.join(c.tokens[i] for i in pos)}' on the {_SIDES[side]}")
      continue
    votes.append({ASSERTED: YES, NEGATED: NO, UNCERTAIN: "hedge"}[st])
    read.append(f"{'denies' if st == NEGATED else 'hedges on' if st == UNCERTAIN else 'asserts'} "
                f"'{' '.join(c.tokens[i] for i in pos)}'")
  for c in cls:
    if antonym:
      for pos in findings.match(c, antonym):
        st = context.status(c, pos)
        if st != NEGATED:
          votes.append({ASSERTED: NO, UNCERTAIN: "hedge"}[st])
          read.append(f"asserts the opposite '{' '.join(c.tokens[i] for i in pos)}'")
  if abnormal_q:
    votes = [v for v in votes if v != NO]  # "no effusion" does not deny every abnormality
  normal, abnormal = _normal_votes(cls, places, head_s)
  if normal_q:
    if not votes:
      if normal:
        votes.append(YES)
        read.append("calls it normal")
      elif abnormal:
        votes.append(NO)
        read.append("asserts an abnormal finding")
  elif abnormal_q:
    if normal and not votes:
      votes.append(NO)
      read.append("calls it normal")
  elif normal and (not votes or YES in votes):
    votes.append(NO)
    read.append(f"calls the {'/'.join(' '.join(p) for p in sorted(places) if p) or 'study'} normal")
  if not votes:
    return None, f"does not mention '{what}'"
  kinds = set(votes)
  if "hedge" in kinds:
    return "hedge", "; ".join(read)
  if len(kinds) > 1:
    return "mixed", "; ".join(read)
  return votes[0], "; ".join(read)


def _modality_evidence(asked: str, answer: str) -> tuple[str | None, str]:
  ms = modality.mentions(answer)
  own = [m for m in ms if m.what == asked]
  others = {m.what for m in ms if m.what != asked and m.status == ASSERTED and not m.concessive}
  sts = {m.status for m in own}
  if UNCERTAIN in sts or any(m.status == UNCERTAIN for m in ms):
    return "hedge", "uncertain modality"
  if ASSERTED in sts and NEGATED in sts:
    return "mixed", f"asserts and rejects {asked}"
  if ASSERTED in sts:
    return (YES, f"names {asked}") if not others else ("mixed", f"names {asked} and {', '.join(sorted(others))}")
  if NEGATED in sts:
    return NO, f"rejects {asked}"
  if others:
    return NO, f"names {', '.join(sorted(others))}, not {asked}"
  return None, "names no modality"


def _yes_no(question: str, reference: str, answer: str) -> Verdict:
  ref = norm(reference)
  cls = context.clauses(answer)
  explicit = set().union(*[_explicit(c) for c in cls]) if cls else set()
  f = questions.finding(question)
  if f is not None and f.modality:
    ev, read = _modality_evidence(f.modality, answer)
  elif f is not None:
    ev, read = _finding_evidence(f, cls)
  else:
    ev, read = None, "question names no finding"
  uncertain = any(context.uncertain_spans(c) for c in cls)
  say = lambda label, why, chosen=None: Verdict(label, why, chosen, "yes_no")
  if explicit == {YES, NO}:
    return say(WRONG, "contradiction: says both yes and no")
  if ev == "mixed":
    return say(WRONG, f"contradiction: {read}")
  if ev == "hedge":
    return say(WRONG, f"hedge: {read}")
  if explicit and ev and explicit != {ev}:
    return say(WRONG, f"contradiction: says {next(iter(explicit))} but {read}")
  if explicit:
    ans, why = next(iter(explicit)), f"says {next(iter(explicit))}" + (f"; {read}" if ev else "")
    if uncertain and not ev:
      return say(WRONG, f"hedge: says {ans} with uncertainty")
  elif ev:
    ans, why = ev, read
  elif uncertain:
    return say(WRONG, "hedge: uncertain, commits to no answer")
  else:
    return say(UNANSWERED, f"no yes/no and {read}")
  return say(CORRECT if ans == ref else WRONG, f"{why} (expected {ref})", ans)


# ---------------------------------------------------------------------------------------------- options
def _option_mentions(opts: Sequence[str], answer: str, abnormal_q: bool) -> list[context.Mention]:
  keyed = sorted(((context.phrase_stems(o), o) for o in opts), key=lambda ko: -len(ko[0]))
  out = []
  for ci, c in enumerate(context.clauses(answer)):
    taken: set[int] = set()
    normal_clause = abnormal_q and any(
        context.phrase_positions(c.stems, p) for p in findings.normal_phrases())
    for key, opt in keyed:
      for pos in context.phrase_positions(c.stems, key):
        if taken & set(pos):
          continue
        taken |= set(pos)
        st = NEGATED if normal_clause else context.status(c, pos)
        out.append(context.Mention(opt, ci, pos, st, c.concessive))
  return out


def _choice(question: str, reference: str, answer: str, opts: Sequence[str]) -> Verdict:
  canon = [modality.canonical(o) for o in opts]
  say = lambda label, why, chosen=None: Verdict(label, why, chosen, "choice")
  if all(canon) and len(set(canon)) == len(canon):
    by_canon = dict(zip(canon, opts))
    ms = modality.mentions(answer)
  else:
    by_canon = None
    ms = _option_mentions(opts, answer, bool(_ABNORMAL_Q.search(question)))
  letter = _LETTER.search(context.clean(answer))
  if letter:
    idx = ord((letter.group(1) or letter.group(2))) - ord("A")
    if idx < len(opts):
      what = canon[idx] if by_canon else opts[idx]
      ms.append(context.Mention(what, -1, (), ASSERTED))
  kind, chosen = modality.choose(ms)
  names = lambda: ", ".join(sorted({m.what for m in ms if m.status == ASSERTED}))
  toks = {t for c in context.clauses(answer) for t in c.tokens}
  if kind == "none" and "both" in toks and len(opts) == 2:
    kind = "several"
  if kind == "none" and len(opts) == 2:
    rejected = {m.what for m in ms if m.status == NEGATED}
    rest = [o for o in (list(by_canon) if by_canon else opts) if o not in rejected]
    if rejected and len(rest) == 1:
      kind, chosen = "chosen", rest[0]
  if kind == "several":
    return say(WRONG, f"hedge: names several options ({names() or 'both'})")
  if kind == "hedge":
    return say(WRONG, "hedge: uncertain about " + ", ".join(sorted({m.what for m in ms if m.status == UNCERTAIN})))
  if kind == "none":
    if any(context.uncertain_spans(c) for c in context.clauses(answer)):
      return say(WRONG, "hedge: uncertain, names no option")
    rej = sorted({m.what for m in ms if m.status == NEGATED})
    return say(UNANSWERED, "names no option" + (f" (rejects {', '.join(rej)})" if rej else ""))
  if by_canon is not None:
    if chosen not in by_canon:
      return say(WRONG, f"names {chosen}, not one of the options", chosen)
    chosen = by_canon[chosen]
  ok = _same(chosen, reference, by_modality=by_canon is not None)
  return say(CORRECT if ok else WRONG, f"chooses '{chosen}' (expected '{reference}')", chosen)


MAX_WORDS = context.MAX_WORDS  # a closed answer is read up to here (a degenerate 1 MB answer stays fast)


def judge(question: str, reference: str, answer: str, options: Sequence[str] | None = None,
          task: str | None = None) -> Verdict:
  """The verdict on `answer` to `question` whose right answer is `reference` (see module doc)."""
  words = str(answer or "").split()
  if len(words) > MAX_WORDS:
    v = judge(question, reference, " ".join(words[:MAX_WORDS]), options, task)
    return dataclasses.replace(v, reason=f"{v.reason} (answer read up to word {MAX_WORDS} of {len(words)})")
  opts = closed_options(question, reference, options, task)
  if opts is None:
    return Verdict(OPEN, "open question: no options given or readable from the question", None, "open")
  if opts == [YES, NO]:
    return _yes_no(question, reference, answer)
  return _choice(question, reference, answer, opts)
