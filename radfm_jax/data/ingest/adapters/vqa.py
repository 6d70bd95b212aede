"""2D visual question answering adapters: PMC-VQA, VQA-RAD and SLAKE share one released layout.

Released files (one row per question): img_root_dir (optional; a folder, relative to image_root or an
absolute path under it), Figure_path, Question, Answer. The question is asked as given; yes/no answers
are marked closed.
"""
from __future__ import annotations

import posixpath

from radfm_jax.data import schema
from radfm_jax.data.ingest.adapters import common


def vqa(src: str, image_root: str, *, split: str = "train", seed: int = 0, dataset: str = "vqa",
        strip_prefix: str = ""):
  """The given question and answer; the image goes before or after the question (seeded)."""
  ctx = common.Context.make(dataset, src, image_root, split, seed, strip_prefix)

  def convert(row_id, row):
    question = common.cell(row, "Question")
    answer = common.cell(row, "Answer")
    folder = common.cell(row, "img_root_dir", required=False)
    figure = common.cell(row, "Figure_path")
    path = ctx.image_path(posixpath.join(folder, figure) if folder else figure)
    rng = ctx.rng(row_id)
    answer, meta = common.given_answer(answer, dim="2D")
    return schema.Sample(id=ctx.sample_id(row_id), task="vqa", question=question, answer=answer,
                         images=common.around_question([path], question, rng), meta=meta)

  return ctx.run(convert, required=("Figure_path", "Question", "Answer"))
