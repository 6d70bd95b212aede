"""PubMed Central adapters: PMC-CaseReport (QA over case reports), PMC-Inline (interleaved paper text and
figures) and PMC-OA (figure captions).

Released files:
  case report: PMC_id, img_ref (list of figure ids), context, question, answer; figures are image files
               named `{PMC_id}_{figure id}.jpg` under image_root.
  inline:      a list of papers (column PMC_path: a paper JSON, relative to paper_root, by default the
               source file's folder). A paper JSON is a list of sentences {"text": ..., "img_ref": [ids]};
               figures are `{paper name}_{id}.jpg` with the paper name the JSON file name up to its first dot.
  oa:          Figure_path, Caption.
"""
from __future__ import annotations

import json
import os
import re

from radfm_jax.data import schema
from radfm_jax.data.ingest import prompts
from radfm_jax.data.ingest.adapters import common

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
  """Splits text after '.', '!' or '?' followed by white space."""
  return [s for s in _SENTENCE_END.split(text.strip()) if s]


def case_context(text: str, keep_last: int = 4) -> str:
  """The first sentence and the last `keep_last` sentences of a case description."""
  parts = sentences(text)
  if len(parts) <= keep_last + 1:
    return " ".join(parts)
  return " ".join([parts[0], *parts[-keep_last:]])


def _strip_tag(text: str, tag: str) -> str:
  return text[len(tag):].strip() if text.startswith(tag) else text


def pmc_case_report(src: str, image_root: str, *, split: str = "train", seed: int = 0,
                    dataset: str = "pmc_case_report", strip_prefix: str = "", image_ext: str = ".jpg"):
  """Question = shortened case context (first sentence + last 4) + newline + the question; the figures
  go at the end of the context or at the end of the question (seeded)."""
  ctx = common.Context.make(dataset, src, image_root, split, seed, strip_prefix)

  def convert(row_id, row):
    pmc_id = common.cell(row, "PMC_id")
    refs = common.parse_list(row, "img_ref")
    if not refs:
      raise common.BadRow("field 'img_ref' lists no figures")
    context = case_context(common.cell(row, "context"))
    asked = _strip_tag(common.cell(row, "question"), "Q:")
    answer = _strip_tag(common.cell(row, "answer"), "A:")
    if not asked or not answer:
      raise common.BadRow("question or answer is empty after removing its 'Q:'/'A:' tag")
    question = f"{context}\n{asked}"
    rng = ctx.rng(row_id)
    char = len(context) if rng.random() < 0.5 else len(question)
    images = [schema.ImageRef(path=ctx.image_path(f"{pmc_id}_{r}{image_ext}"), field="question", char=char)
              for r in refs]
    return schema.Sample(id=ctx.sample_id(row_id), task="vqa", question=question, answer=answer,
                         images=images, meta={"dim": "2D", "subtask": "case_report", "closed": False})

  return ctx.run(convert, required=("PMC_id", "img_ref", "context", "question", "answer"))


def _paper_sentences(path: str, rel: str) -> list[tuple[str, list[str]]]:
  """(text, figure ids) per sentence of the paper JSON at `path` (`rel` names it in errors)."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except OSError as e:
    raise common.BadRow(f"paper {rel!r} unreadable: {e.strerror or e}") from None
  except ValueError as e:
    raise common.BadRow(f"paper {rel!r} is not valid JSON: {e}") from None
  if not isinstance(data, list):
    raise common.BadRow(f"paper {rel!r}: expected a list of sentences, got {type(data).__name__}")
  out = []
  for i, item in enumerate(data):
    if not isinstance(item, dict) or not isinstance(item.get("text"), str):
      raise common.BadRow(f"paper {rel!r} sentence {i}: expected {{'text': str, 'img_ref': list}}")
    try:
      refs = common.parse_list(item, "img_ref", required=False)
    except common.BadRow as e:
      raise common.BadRow(f"paper {rel!r} sentence {i}: {e}") from None
    out.append((item["text"], refs))
  return out


def windows(sents: list[tuple[str, list[str]]], window: int, max_images: int) -> list[tuple[int, int]]:
  """[start, end) sentence ranges: consecutive, covering every sentence, each at most `window` sentences
  and at most `max_images` figure references (a sentence with more references is a window alone)."""
  out, start, n_img = [], 0, 0
  for i, (_, refs) in enumerate(sents):
    if i > start and (i - start >= window or n_img + len(refs) > max_images):
      out.append((start, i))
      start, n_img = i, 0
    n_img += len(refs)
  if start < len(sents):
    out.append((start, len(sents)))
  return out


def pmc_inline(src: str, image_root: str, *, split: str = "train", seed: int = 0,
               dataset: str = "pmc_inline", strip_prefix: str = "", paper_root: str = "",
               window: int = 50, max_images: int = 3, image_ext: str = ".jpg", text_only: bool = False):
  """Interleaved samples: each paper is cut into consecutive windows of at most `window` sentences and
  `max_images` figures; the text goes in `answer` (empty question) with each figure placed at the start
  of the sentence that references it. Windows without figures are skipped unless text_only=True; a lone
  sentence citing more than max_images figures keeps the first max_images (meta dropped_images)."""
  ctx = common.Context.make(dataset, src, image_root, split, seed, strip_prefix)
  root = paper_root or os.path.dirname(os.path.abspath(src))

  def convert(row_id, row):
    rel = common.cell(row, "PMC_path")
    path = rel if os.path.isabs(rel) else os.path.join(root, rel)
    name = os.path.basename(rel).split(".")[0]
    sents = _paper_sentences(path, rel)
    samples = []
    for start, end in windows(sents, window, max_images):
      text, images, dropped = "", [], 0
      for sentence, refs in sents[start:end]:
        if text and sentence and not text[-1].isspace() and not sentence[0].isspace():
          text += " "
        dropped += max(0, len(refs) - max_images)
        for r in refs[:max_images]:
          images.append(schema.ImageRef(path=ctx.image_path(f"{name}_{r}{image_ext}"), field="answer",
                                        char=len(text)))
        text += sentence
      if not text.strip() or (not images and not text_only):
        continue
      meta = {"subtask": "interleaved", "dim": "2D", "paper": name, "sentences": [start, end]}
      if dropped:
        meta["dropped_images"] = dropped
      samples.append(schema.Sample(id=ctx.sample_id(f"{row_id}/{start}"), task="interleaved",
                                   question="", answer=text, images=images, meta=meta))
    return samples

  return ctx.run(convert, required=("PMC_path",))


def pmc_oa(src: str, image_root: str, *, split: str = "train", seed: int = 0, dataset: str = "pmc_oa",
           strip_prefix: str = ""):
  """A caption prompt; the answer is the figure caption."""
  ctx = common.Context.make(dataset, src, image_root, split, seed, strip_prefix)

  def convert(row_id, row):
    caption = common.cell(row, "Caption")
    path = ctx.image_path(common.cell(row, "Figure_path"))
    rng = ctx.rng(row_id)
    prompt = prompts.pick("caption", rng)
    return schema.Sample(id=ctx.sample_id(row_id), task="caption", question=prompt.text, answer=caption,
                         images=common.around_question([path], prompt.text, rng),
                         meta={"dim": "2D", "subtask": "caption", "closed": False, **prompt.meta()})

  return ctx.run(convert, required=("Figure_path", "Caption"))
