"""The sample schema shared by readers, adapters, the store, the pipeline and eval.

A `Sample` is what an ingest mode (own files, RadFM's released text files, the demo) produces before
storage. `build.ingest_samples` reads each image it references, writes the volume into the store and
adds a manifest record (`Sample.to_record`) whose images name volume keys instead of source paths.

Image placement: each image sits in `question` or `answer` (its `field`) *before* character `char` of
that text (`char == len(text)` puts it at the end). The tokenizer splices the 34-token image block there.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

# Batch jobs (data.build, data.demo, generate --batch_file, eval.radbench) exit with the number of
# failed items, capped here (0: all good): one convention, so scripts can test `$? -ne 0`.
MAX_EXIT_STATUS = 100


def exit_status(failures: int) -> int:
  """The process exit status of a batch job with `failures` failed items."""
  return min(int(failures), MAX_EXIT_STATUS)

SCHEMA_VERSION = 1
TASKS = ("modality", "diagnosis", "vqa", "report", "rationale", "caption", "interleaved")
SPLITS = ("train", "val", "test")
FIELDS = ("question", "answer")


@dataclasses.dataclass
class ImageRef:
  """One image of a sample. Before storage `path` is a source path (relative to the source root, or a
  list of paths forming one series); in the store `key` names the stored volume."""
  path: str | list[str] = ""
  field: str = "question"
  char: int = 0
  key: str = ""
  index: int | None = None  # for multi-scan sources (RadFM .npy cases: scan index N)


@dataclasses.dataclass
class Sample:
  id: str
  task: str
  question: str
  answer: str
  images: list[ImageRef] = dataclasses.field(default_factory=list)
  split: str = "train"
  source: str = ""
  # Labels and extras used by eval. Conventional keys (all optional):
  #   closed: bool            the answer is one of `choices` (accuracy-scored)
  #   choices: list[str]      e.g. ["yes", "no"] or the modality names
  #   image_dependent: bool   the answer cannot be known from the text alone
  #   modality: str           "CT" | "MR" | "X-ray" | ... ; dim: "2D" | "3D"
  #   labels: list[str]       multi-label diagnosis ground truth
  #   diagnosis: str          rationale diagnosis ground truth
  #   subtask: str            finer task name, e.g. "vqa_open", "diagnosis_multilabel"
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  def validate(self) -> None:
    """Raises ValueError naming the sample and the field that is wrong."""
    where = f"sample {self.id!r}"
    if not self.id:
      raise ValueError("sample with empty id")
    texts = {"id": self.id, "question": self.question, "answer": self.answer, "source": self.source}
    texts.update({f"image {i} path": p for i, im in enumerate(self.images)
                  for p in (im.path if isinstance(im.path, (list, tuple)) else [im.path]) if isinstance(p, str)})
    for name, text in texts.items():
      if not isinstance(text, str):
        raise ValueError(f"{where}: {name} must be a string, got {type(text).__name__}")
      try:
        text.encode("utf-8")
      except UnicodeEncodeError as e:
        raise ValueError(f"{where}: {name} is not valid Unicode (lone surrogate {text[e.start]!r} at "
                         f"{e.start})") from None
    try:
      json.dumps(self.meta, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}: meta cannot be stored as JSON ({type(e).__name__}: {e})") from None
    if self.task not in TASKS:
      raise ValueError(f"{where}: task {self.task!r} is not one of {TASKS}")
    if self.split not in SPLITS:
      raise ValueError(f"{where}: split {self.split!r} is not one of {SPLITS}")
    for i, im in enumerate(self.images):
      if im.field not in FIELDS:
        raise ValueError(f"{where}: image {i} field {im.field!r} is not one of {FIELDS}")
      text = getattr(self, im.field)
      if not 0 <= im.char <= len(text):
        raise ValueError(f"{where}: image {i} char {im.char} outside {im.field} of length {len(text)}")

  def to_record(self, keys: list[str], provenance: dict[str, Any]) -> dict[str, Any]:
    """The manifest record: images name stored volume keys; provenance holds relative source paths and
    content hashes."""
    if len(keys) != len(self.images):
      raise ValueError(f"sample {self.id!r}: {len(keys)} keys for {len(self.images)} images")
    return {
        "id": self.id, "split": self.split, "source": self.source, "task": self.task,
        "question": self.question, "answer": self.answer,
        "images": [{"key": k, "field": im.field, "char": im.char} for k, im in zip(keys, self.images)],
        "meta": dict(self.meta), "provenance": provenance,
    }


@dataclasses.dataclass
class RowError:
  """An unreadable source row, yielded by adapters in place of a Sample so the build records it and goes on."""
  source: str      # source file (relative to the source root)
  row: int | str | None  # row index or id within it; None when the source is a file of its own
  reason: str
