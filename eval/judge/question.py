"""Reading a closed question: the finding a yes/no question asks about, and options written in it.

`finding(question)` -> `Finding`: the asked phrase with the question frame removed ("Is there evidence
of a pneumothorax in this image?" -> head "pneumothorax", location "image"; "Is the heart enlarged?" ->
subject "heart", predicate "enlarged"; "Is this a CT scan?" -> the modality CT).

`options(question)` -> the options of an "X or Y" question ("Is the lesion on the left or right side?"
-> ["left", "right"]; "Is it hypo- or hyperintense?" -> ["hypointense", "hyperintense"]; "hypodense,
isodense or hyperdense?" -> three), or [] when the question offers none.
"""
from __future__ import annotations

import dataclasses
import re

from eval.judge import context, modality

_FRAMES = [
    r"^(?:based on (?:the )?(?:findings|image|images)\s*,?\s*)",
    r"^(?:given (?:the|these) (?:findings|features|images?)\s*,?\s*)",
    r"^(?:in|on) (?:this|the) (?:image|scan|study|radiograph)\s*,?\s*",
]
_QUESTION = [
    r"^(?:does|do|did) (?:this|the|these) (?:[\w-]+ ){0,3}?(?:show|shows|demonstrate|reveal|depict|contain|have|"
    r"display|indicate|represent|suggest|exhibit|present with)\s+(?P<x>.+)$",
    r"^(?:does|do|did) (?:the )?patient (?:have|show|demonstrate)\s+(?P<x>.+)$",
    r"^(?:is|are) there (?:(?:any|evidence of|signs? of|a|an|some|findings? of|features? of)\s+)*(?P<x>.+)$",
    r"^(?:is|are) (?:the )?(?P<x>.+?) (?:present|seen|visible|noted|identified|evident|shown)(?: .*)?$",
    r"^(?:is|are) (?:this|these|it) (?:(?:consistent with|compatible with|suggestive of|indicative of|a case of|"
    r"likely|a|an)\s+)*(?P<x>.+)$",
    r"^(?:was|were) (?:this|the) (?:image|scan|study|picture|examination|exam)s? (?:acquired|taken|obtained|done|"
    r"performed|made) (?:with|using|by|on|as)\s+(?:(?:a|an)\s+)?(?P<x>.+)$",
    r"^(?:was|were|is|are) (?P<x>.+?) (?:used|given|administered|injected|performed)$",
    r"^(?:can|could) (?:(?:any|a|an)\s+)*(?P<x>.+?) (?:be )?(?:observed|seen|identified|detected|noted|"
    r"appreciated|visualized|visualised|found)(?: .*)?$",
    r"^(?:is|are|was|were) (?P<x>.+)$",
    r"^(?:can|could|do) you (?:see|identify|detect)\s+(?:(?:any|a|an)\s+)*(?P<x>.+)$",
]
_LOCATION = re.compile(r"\s(?:in|on|of|under|within|at|involving|near|from|along|around|inside|below|above|"
                       r"throughout|on the)\s")
ARTICLES = frozenset({"a", "an", "the", "any", "this", "these", "that", "some"})
IMAGE_WORDS = frozenset({"image", "images", "scan", "study", "picture", "exam", "examination", "film", "radiograph",
                         "x", "ray", "view", "slice", "series", "mammogram", "chest"})
# Predicates of copular questions ("Is the heart enlarged?").
PREDICATES = frozenset({"enlarged", "dilated", "thickened", "normal", "abnormal", "clear", "midline", "malignant",
                        "benign", "patent", "intact", "displaced", "deviated", "calcified", "enhancing",
                        "obstructed", "collapsed", "opacified", "distended", "narrowed", "herniated", "fractured",
                        "healthy", "unremarkable", "symmetric", "symmetrical", "widened", "increased",
                        "decreased", "aerated", "expanded", "atrophic", "inflamed", "infected", "ruptured"})


@dataclasses.dataclass(frozen=True)
class Finding:
  words: tuple[str, ...]           # the asked phrase (lower case), location removed
  location: tuple[str, ...] = ()   # words of "in the liver" etc.
  subject: tuple[str, ...] = ()    # copular questions: "heart" of "Is the heart enlarged?"
  predicate: str = ""              # copular questions: "enlarged"
  modality: str | None = None      # "Is this a CT scan?" -> "CT"

  @property
  def head(self) -> str:
    return self.predicate or (self.words[-1] if self.words else "")


def _norm(question: str) -> str:
  text = context.clean(question).lower()
  text = re.sub(r"[?!.]+\s*$", "", text.strip())
  text = re.sub(r"[^\w\s,/-]|_", " ", text)
  text = re.sub(r"[/-]", " ", text)
  return " ".join(text.split())


def finding(question: str) -> Finding | None:
  q = _norm(question).replace(",", " ")
  q = " ".join(q.split())
  for frame in _FRAMES:
    q = re.sub(frame, "", q)
  for pattern in _QUESTION:
    m = re.match(pattern, q)
    if m:
      x = m.group("x")
      break
  else:
    return None
  mod = modality.canonical(x)
  if mod and not [w for w in x.split() if w not in ARTICLES and w not in IMAGE_WORDS
                  and modality.canonical(w) is None and w not in ("scan", "weighted", "sequence")]:
    return Finding(tuple(x.split()), modality=mod)
  loc = ()
  lm = _LOCATION.search(f" {x} ")
  if lm and lm.start() > 0:
    loc = tuple(w for w in x[lm.end() - 1:].split() if w not in ARTICLES and w not in IMAGE_WORDS)
    x = x[:lm.start()]
  words = tuple(w for w in x.split() if w not in ARTICLES)
  if not words:
    return None
  if words[-1] in PREDICATES and len(words) > 1:
    subject = tuple(w for w in words[:-1] if w not in IMAGE_WORDS and w not in ("lesion",)) or words[:-1]
    return Finding(words, loc, subject, words[-1])
  if words[0] in ("normal", "abnormal") and len(words) > 1:
    return Finding(words, loc, tuple(w for w in words[1:] if w not in IMAGE_WORDS), words[0])
  return Finding(words, loc)


_OR = re.compile(r"^(?P<before>.*?)\s+or\s+(?P<after>.+)$")
_STOP = frozenset({"is", "are", "was", "were", "does", "do", "in", "on", "at", "of", "this", "that", "it", "there",
                   "a", "an", "the", "which", "what", "seen", "located", "image", "lesion", "mass", "located",
                   "side", "affected", "involved", "kidney", "lung", "scan", "weighted", "relative", "to",
                   "lobe", "organ", "sequence"})


def _run(words: list[str]) -> list[str]:
  out = []
  for w in words:
    if w in _STOP:
      break
    out.append(w)
  return out


def options(question: str) -> list[str]:
  q = _norm(question)
  m = _OR.match(q)
  if not m:
    return []
  before = m.group("before").replace(",", " , ").split()
  after = [w for w in m.group("after").replace(",", " ").split() if w not in ("a", "an", "the")]
  y = _run(after)
  if not y:
    return []
  opts_before: list[str] = []
  # "hypodense, isodense or hyperdense": commas separate earlier options.
  chunks = " ".join(before).split(" , ")
  last = _run(chunks[-1].split()[::-1])[::-1]
  if not last:
    return []
  for c in chunks[:-1]:
    run = _run(c.split()[::-1])[::-1]
    if run and len(chunks) > 1 and c is not chunks[0]:
      opts_before.append(" ".join(run))
  if len(chunks) > 1:
    first = _run(chunks[0].split()[::-1])[::-1]
    if first and len(first) <= 2:
      opts_before.insert(0, " ".join(first))
  x = last
  if len(x) == 1 and len(y) > 1:
    y = y[:1]
  if len(x) > len(y):
    x = x[-len(y):]
  if x[-1] in ("hypo", "hyper", "iso", "intra", "extra", "pre", "post") and len(y) == 1:
    for prefix in ("hypo", "hyper", "iso", "intra", "extra", "pre", "post"):
      if y[0].startswith(prefix):
        x = [x[-1] + y[0][len(prefix):]]
        break
  opts = opts_before + [" ".join(x), " ".join(y)]
  return opts if len(set(opts)) == len(opts) else []
