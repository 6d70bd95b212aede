"""MedPix adapters: single images (modality / plane / caption), multi-image cases, and MedPix QA.

Released files (one row per sample):
  single: name (image file), context (the label or caption), type in {modality, plane, caption}
  multi:  name (comma-separated image files), context (the case text), type (case section), history
  qa:     name (image file), question, answer, explanation
"""
from __future__ import annotations

import re

from radfm_jax.data import schema
from radfm_jax.data.ingest import prompts
from radfm_jax.data.ingest.adapters import common

# MedPix case section -> (prompt pool, task). Case diagnoses are free text, so they are open VQA (eval
# scores task "diagnosis" as yes/no or multi-label); meta.diagnosis keeps the diagnosis.
CASE_TYPES = {
    "findings": ("case_findings", "report"),
    "diagnosis": ("case_diagnosis", "vqa"),
    "ddx": ("case_differential", "vqa"),
    "exam": ("case_exam", "vqa"),
    "discussion": ("case_discussion", "vqa"),
    "txFollowup": ("case_treatment", "vqa"),
    "dxHow": ("case_imaging", "vqa"),
}
SINGLE_TYPES = ("modality", "plane", "caption")
_BULLET = re.compile(r"•\s*")


def _names(row: common.Row) -> list[str]:
  value = row.get("name")
  if isinstance(value, list) or str(value or "").strip().startswith("["):
    return common.parse_list(row, "name")
  names = [n.strip() for n in common.cell(row, "name").split(",") if n.strip()]
  if not names:
    raise common.BadRow("field 'name' lists no images")
  return names


def medpix_single(src: str, image_root: str, *, split: str = "train", seed: int = 0,
                  dataset: str = "medpix_single", strip_prefix: str = "", p_yes_no: float = 0.5):
  """One image per row. Modality and plane rows become an open question or (p_yes_no) a yes/no question
  naming the true label ("yes") or another label of the same type from the file ("no"); caption rows
  draw a caption prompt. The image goes before or after the question (seeded)."""
  ctx = common.Context.make(dataset, src, image_root, split, seed, strip_prefix)

  def run():
    source = ctx.source()
    choices = {t: common.values_of(source, "context", lambda r, t=t: str(r.get("type", "")).strip() == t)
               for t in ("modality", "plane")}

    def convert(row_id, row):
      kind = common.cell(row, "type")
      label = common.cell(row, "context")
      rng = ctx.rng(row_id)
      if kind == "caption":
        prompt = prompts.pick("caption", rng)
        task, answer, meta = "caption", label, {"subtask": "caption", **prompt.meta()}
      elif kind in ("modality", "plane"):
        prompt, answer, meta = common.open_or_yes_no(
            rng, open_pool=f"{kind}_open", yes_no_pool=f"{kind}_yes_no", field=kind, value=label,
            choices=choices[kind], p_yes_no=p_yes_no)
        meta.update({kind: label, "subtask": f"{kind}_{'yes_no' if 'asked' in meta else 'open'}"})
        task = "modality" if kind == "modality" else "vqa"
      else:
        raise common.BadRow(f"field 'type' is {kind!r}; expected one of {SINGLE_TYPES}")
      image = ctx.image_path(common.cell(row, "name"))
      return schema.Sample(
          id=ctx.sample_id(row_id), task=task, question=prompt.text, answer=answer,
          images=common.around_question([image], prompt.text, rng), meta={"dim": "2D", **meta})

    yield from ctx.run(convert, required=("name", "context", "type"))

  return run()


def medpix_multi(src: str, image_root: str, *, split: str = "train", seed: int = 0,
                 dataset: str = "medpix_multi", strip_prefix: str = "", p_history: float = 0.5,
                 max_images: int = 10):
  """A MedPix case: all its images (a seeded subset of at most max_images, in order) and a prompt for the
  case section in `type`; the patient history is prepended to the question with probability p_history."""
  ctx = common.Context.make(dataset, src, image_root, split, seed, strip_prefix)

  def convert(row_id, row):
    kind = common.cell(row, "type")
    if kind not in CASE_TYPES:
      raise common.BadRow(f"field 'type' is {kind!r}; expected one of {sorted(CASE_TYPES)}")
    pool, task = CASE_TYPES[kind]
    answer = _BULLET.sub("", common.cell(row, "context")).strip()
    if not answer:
      raise common.BadRow("field 'context' is empty")
    history = common.cell(row, "history", required=False)
    paths = [ctx.image_path(n) for n in _names(row)]
    rng = ctx.rng(row_id)
    prompt = prompts.pick(pool, rng)
    with_history = bool(history) and rng.random() < p_history
    question = f"{history} {prompt.text}" if with_history else prompt.text
    paths = common.subsample(paths, max_images, rng)
    meta = {"dim": "2D", "subtask": f"medpix_{kind}", "history_included": with_history,
            "image_dependent": True, **prompt.meta()}
    if task == "vqa":
      meta["closed"] = False
    if kind == "diagnosis":
      meta["diagnosis"] = answer
    return schema.Sample(id=ctx.sample_id(row_id), task=task, question=question, answer=answer,
                         images=common.around_question(paths, question, rng), meta=meta)

  return ctx.run(convert, required=("name", "context", "type"))


def medpix_qa(src: str, image_root: str, *, split: str = "train", seed: int = 0,
              dataset: str = "medpix_qa", strip_prefix: str = ""):
  """MedPix question/answer pairs; the answer is followed by its explanation when there is one (a bare
  yes/no answer is closed)."""
  ctx = common.Context.make(dataset, src, image_root, split, seed, strip_prefix)

  def convert(row_id, row):
    question = common.cell(row, "question")
    answer = common.cell(row, "answer")
    explanation = common.cell(row, "explanation", required=False)
    if explanation:
      answer = f"{answer}{'' if answer[-1] in '.!?' else '.'} {explanation}"
    image = ctx.image_path(common.cell(row, "name"))
    rng = ctx.rng(row_id)
    answer, meta = common.given_answer(answer, dim="2D")
    return schema.Sample(id=ctx.sample_id(row_id), task="vqa", question=question, answer=answer,
                         images=common.around_question([image], question, rng),
                         meta={**meta, "subtask": "medpix_qa"})

  return ctx.run(convert, required=("name", "question", "answer"))
