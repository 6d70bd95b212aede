"""2D radiograph adapters: report generation (MIMIC-CXR), multi-label classification (chest X-ray, PCXR,
mammography, spine X-ray sets) and balanced binary diagnosis.

Released files (one row per image):
  report:     image_path, label (the report text)  -- or findings / impression columns instead of label
  multilabel: image_path, label (a list, or labels separated by ',', ';' or '|')
  binary:     image_path, disease, label (1 = present, 0 = absent)
`image_path` may also hold a list of images (a multi-view study).
"""
from __future__ import annotations

from radfm_jax.data import schema
from radfm_jax.data.ingest import prompts
from radfm_jax.data.ingest.adapters import common

_YES = {"1", "1.0", "yes", "true", "positive"}
_NO = {"0", "0.0", "no", "false", "negative"}


def _images(ctx: common.Context, row: common.Row) -> list[str]:
  value = row.get("image_path")
  if isinstance(value, list) or str(value or "").strip().startswith("["):
    raw = common.parse_list(row, "image_path")
  else:
    raw = [common.cell(row, "image_path")]
  if not raw:
    raise common.BadRow("field 'image_path' lists no images")
  return [ctx.image_path(p) for p in raw]


def cxr_report(src: str, image_root: str, *, split: str = "train", seed: int = 0,
               dataset: str = "mimic_cxr_report", strip_prefix: str = "", modality: str = "X-ray"):
  """A report prompt; the answer is the released report (`label`), or 'Findings: ... Impression: ...'
  built from `findings`/`finding` and `impression` columns when the file has those instead."""
  ctx = common.Context.make(dataset, src, image_root, split, seed, strip_prefix)

  def convert(row_id, row):
    if "label" in row:
      answer = common.cell(row, "label")
    else:
      findings = common.cell(row, "findings" if "findings" in row else "finding", required=False)
      answer = common.report_text(findings, common.cell(row, "impression", required=False))
    paths = _images(ctx, row)
    rng = ctx.rng(row_id)
    prompt = prompts.pick("report", rng)
    return schema.Sample(
        id=ctx.sample_id(row_id), task="report", question=prompt.text, answer=answer,
        images=common.around_question(paths, prompt.text, rng),
        meta={"dim": "2D", "modality": modality, "subtask": "report", "closed": False, **prompt.meta()})

  return ctx.run(convert, required=("image_path",))


def cxr_multilabel(src: str, image_root: str, *, split: str = "train", seed: int = 0,
                   dataset: str = "chestxray_multilabel", strip_prefix: str = "",
                   modality: str = "X-ray"):
  """A classification prompt; the answer lists the image's labels (', '-joined). meta: labels and the
  label vocabulary of the file (choices) for F1 scoring."""
  ctx = common.Context.make(dataset, src, image_root, split, seed, strip_prefix)

  def run():
    vocab = set()
    try:
      for _, row in ctx.source():
        try:
          vocab.update(common.parse_labels(row, "label") if isinstance(row, dict) else [])
        except common.BadRow:
          pass  # reported by the conversion pass
    except common.SourceError:
      pass
    choices = sorted(vocab)

    def convert(row_id, row):
      labels = common.parse_labels(row, "label")
      paths = _images(ctx, row)
      rng = ctx.rng(row_id)
      prompt = prompts.pick("classification", rng)
      return schema.Sample(
          id=ctx.sample_id(row_id), task="diagnosis", question=prompt.text, answer=", ".join(labels),
          images=common.around_question(paths, prompt.text, rng),
          meta={"dim": "2D", "modality": modality, "subtask": "diagnosis_multilabel", "closed": False,
                "labels": labels, "choices": choices, "image_dependent": True, **prompt.meta()})

    yield from ctx.run(convert, required=("image_path", "label"))

  return run()


def binary_diagnosis(src: str, image_root: str, *, split: str = "train", seed: int = 0,
                     dataset: str = "chestxray_binary", strip_prefix: str = "", modality: str = "X-ray"):
  """A yes/no question naming `disease`; the answer is 'yes' for label 1 and 'no' for label 0."""
  ctx = common.Context.make(dataset, src, image_root, split, seed, strip_prefix)

  def convert(row_id, row):
    disease = common.cell(row, "disease")
    label = common.cell(row, "label").lower()
    if label not in _YES | _NO:
      raise common.BadRow(f"field 'label' is {label!r}; expected 1/0 (or yes/no)")
    paths = _images(ctx, row)
    rng = ctx.rng(row_id)
    prompt = prompts.pick("yes_no", rng, disease=disease)
    return schema.Sample(
        id=ctx.sample_id(row_id), task="diagnosis", question=prompt.text,
        answer="yes" if label in _YES else "no",
        images=common.around_question(paths, prompt.text, rng),
        meta=common.yes_no_meta(dim="2D", modality=modality, subtask="diagnosis_binary", asked=disease,
                                **prompt.meta()))

  return ctx.run(convert, required=("image_path", "disease", "label"))
