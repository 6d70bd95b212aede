"""RP3D (Radiopaedia 3D) adapters: case VQA, modality recognition, case report (caption) and rationale
diagnosis.

A RadFM RP3D case is one .npy per case holding every scan, `N x 3 x H x W x D`; each scan becomes one
ImageRef with `index` = its position in the case (a 4-D `3 x H x W x D` file is one scan, index None).
The adapters read only the .npy header, to learn N.

Released files:
  vqa:       image_path (case .npy), question, answer                                   (CSV)
  modality:  image_path (a NIfTI volume), answer (the modality)                         (CSV)
  caption:   pre, pat, npy_path, finding, impression                                    (JSON list)
  rationale: pre, pat, npy_path, radiographic_features (list), articles (list), title   (JSON list)
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from radfm_jax.data import schema
from radfm_jax.data.ingest import prompts
from radfm_jax.data.ingest.adapters import common


class CaseScans:
  """Scan counts of RP3D case files, read from the .npy header once per file."""

  def __init__(self, ctx: common.Context):
    self.ctx = ctx
    self.cache: dict[str, tuple[int, ...]] = {}

  def refs(self, raw: str, rng, max_images: int) -> tuple[list[str], list[int | None]]:
    """(paths, indices) of the case's scans, a seeded subset of at most max_images in order."""
    rel = self.ctx.image_path(raw)
    if rel not in self.cache:
      self.cache[rel] = self._shape(rel)
    shape = self.cache[rel]
    indices: list[int | None] = list(range(shape[0])) if len(shape) == 5 else [None]
    indices = common.subsample(indices, max_images, rng)
    return [rel] * len(indices), indices

  def _shape(self, rel: str) -> tuple[int, ...]:
    path = os.path.join(self.ctx.image_root, rel)
    try:
      shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
    except FileNotFoundError:
      raise common.BadRow(f"case file {rel!r} not found under image_root") from None
    except (OSError, ValueError, EOFError) as e:
      raise common.BadRow(f"case file {rel!r} is not a readable .npy: {e}") from None
    if len(shape) not in (4, 5) or shape[-4] not in (1, 3) or 0 in shape:
      raise common.BadRow(f"case file {rel!r} has shape {shape}; expected N x 3 x H x W x D or 3 x H x W x D")
    return tuple(shape)


def _patient(row: common.Row) -> str:
  parts = (common.cell(row, "pat", required=False), common.cell(row, "pre", required=False))
  return " ".join(p for p in parts if p)


def _meta(**extra) -> dict:
  return {"dim": "3D", **extra}


def rp3d_vqa(src: str, image_root: str, *, split: str = "train", seed: int = 0, dataset: str = "rp3d_vqa",
             strip_prefix: str = "", max_images: int = 10):
  """The given question about a case, with every scan of the case (at most max_images)."""
  ctx = common.Context.make(dataset, src, image_root, split, seed, strip_prefix)
  scans = CaseScans(ctx)

  def convert(row_id, row):
    question = common.cell(row, "question")
    answer = common.cell(row, "answer")
    rng = ctx.rng(row_id)
    paths, indices = scans.refs(common.cell(row, "image_path"), rng, max_images)
    answer, meta = common.given_answer(answer, dim="3D")
    return schema.Sample(id=ctx.sample_id(row_id), task="vqa", question=question, answer=answer,
                         images=common.around_question(paths, question, rng, indices), meta=meta)

  return ctx.run(convert, required=("image_path", "question", "answer"))


def rp3d_modality(src: str, image_root: str, *, split: str = "train", seed: int = 0,
                  dataset: str = "rp3d_modality", strip_prefix: str = "", p_yes_no: float = 0.5,
                  modalities: Sequence[str] | None = None):
  """An open "which modality" question, or (p_yes_no) "is this a {modality} scan?": half the time with
  the true modality (answer "yes"), half the time with a different one (answer "no"). The other modality
  comes from `modalities` or, by default, from the modalities seen in the file. (Upstream named the true
  modality in the "no" branch too, so half its "no" labels were wrong.)"""
  ctx = common.Context.make(dataset, src, image_root, split, seed, strip_prefix)

  def run():
    choices = sorted(modalities) if modalities else common.values_of(ctx.source(), "answer")

    def convert(row_id, row):
      modality = common.cell(row, "answer")
      path = ctx.image_path(common.cell(row, "image_path"))
      rng = ctx.rng(row_id)
      prompt, answer, meta = common.open_or_yes_no(
          rng, open_pool="modality_open", yes_no_pool="modality_yes_no", field="modality", value=modality,
          choices=choices, p_yes_no=p_yes_no)
      meta = _meta(modality=modality, subtask=f"modality_{'yes_no' if 'asked' in meta else 'open'}", **meta)
      return schema.Sample(id=ctx.sample_id(row_id), task="modality", question=prompt.text, answer=answer,
                           images=common.around_question([path], prompt.text, rng), meta=meta)

    yield from ctx.run(convert, required=("image_path", "answer"))

  return run()


def rp3d_caption(src: str, image_root: str, *, split: str = "train", seed: int = 0,
                 dataset: str = "rp3d_caption", strip_prefix: str = "", max_images: int = 10):
  """Report generation: patient info + a report prompt; the answer is 'Findings: ... Impression: ...'."""
  ctx = common.Context.make(dataset, src, image_root, split, seed, strip_prefix)
  scans = CaseScans(ctx)

  def convert(row_id, row):
    answer = common.report_text(common.cell(row, "finding", required=False),
                                common.cell(row, "impression", required=False))
    rng = ctx.rng(row_id)
    paths, indices = scans.refs(common.cell(row, "npy_path"), rng, max_images)
    prompt = prompts.pick("report", rng)
    question = " ".join(p for p in (_patient(row), prompt.text) if p)
    return schema.Sample(id=ctx.sample_id(row_id), task="report", question=question, answer=answer,
                         images=common.around_question(paths, question, rng, indices),
                         meta=_meta(subtask="report", closed=False, **prompt.meta()))

  return ctx.run(convert, required=("npy_path",))


def rp3d_rationale(src: str, image_root: str, *, split: str = "train", seed: int = 0,
                   dataset: str = "rp3d_rationale", strip_prefix: str = "", p_yes_no: float = 0.5,
                   max_images: int = 10, diseases: Sequence[str] | None = None):
  """Rationale diagnosis: patient info + a rationale prompt, answered 'Diagnosis: {articles}.
  Radiographic features: {features}'; or (p_yes_no) a yes/no question about the case title (answer
  "yes") or about another disease (answer "no"; from `diseases`, by default the file's other titles).
  Both are task "rationale" (eval scores the yes/no ones as rationale_binary); meta.diagnosis = title."""
  ctx = common.Context.make(dataset, src, image_root, split, seed, strip_prefix)
  scans = CaseScans(ctx)

  def run():
    choices = sorted(diseases) if diseases else common.values_of(ctx.source(), "title")

    def convert(row_id, row):
      title = common.cell(row, "title")
      features = common.parse_list(row, "radiographic_features")
      if not features:
        raise common.BadRow("field 'radiographic_features' is an empty list")
      articles = common.parse_list(row, "articles", required=False)
      rng = ctx.rng(row_id)
      paths, indices = scans.refs(common.cell(row, "npy_path"), rng, max_images)
      other = None
      if rng.random() < p_yes_no:
        other = title if rng.random() < 0.5 else common.pick_other(choices, title, rng)
      if other is not None:
        prompt = prompts.pick("yes_no", rng, disease=other)
        question, answer = prompt.text, "yes" if other == title else "no"
        meta = common.yes_no_meta(subtask="rationale_yes_no", asked=other, **prompt.meta())
      else:
        prompt = prompts.pick("rationale", rng)
        question = " ".join(p for p in (_patient(row), prompt.text) if p)
        diagnosis = (", ".join(articles) if articles else title).rstrip(".")
        answer = f"Diagnosis: {diagnosis}. Radiographic features: {' '.join(features)}"
        meta = {"subtask": "rationale", "closed": False, **prompt.meta()}
      return schema.Sample(id=ctx.sample_id(row_id), task="rationale", question=question, answer=answer,
                           images=common.around_question(paths, question, rng, indices),
                           meta=_meta(diagnosis=title, **meta))

    yield from ctx.run(convert, required=("npy_path", "title", "radiographic_features"))

  return run()
