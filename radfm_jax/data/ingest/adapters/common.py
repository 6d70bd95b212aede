"""Shared machinery of the RadFM adapters: reading released CSV/JSON rows, parsing cells, seeded per-row
randomness, image paths, image placement, and the loop that turns rows into Samples or RowErrors.

Each adapter module defines a `convert(row_id, row) -> Sample | list[Sample]` that raises `BadRow` for a
malformed row; `Context.run` calls it for every row, stamps the split, validates the sample and yields
either the sample or a `schema.RowError`, so one bad row never stops a build.

Randomness (which prompt, yes or no, where the image goes) comes from `Context.rng(row_id)`: a
`random.Random` seeded by (seed, dataset, row id), so a row's sample depends only on the seed and the row,
not on row order or on other rows.
"""
from __future__ import annotations

import ast
import csv
import dataclasses
import json
import os
import posixpath
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from radfm_jax.data import jsonl, schema
from radfm_jax.data.ingest import prompts

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # released CSVs carry whole case texts in one cell

_MISSING = {"", "nan", "none", "null"}
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val", "dev": "val", "test": "test", "testing": "test"}

Row = dict[str, Any]
Output = schema.Sample | schema.RowError


class BadRow(Exception):
  """A row that cannot become a sample; the message says which field and why."""


# ----------------------------------------------------------------------------------------------- cells


def is_missing(value: Any) -> bool:
  if value is None:
    return True
  if isinstance(value, float) and value != value:  # NaN from a JSON writer
    return True
  return isinstance(value, str) and value.strip().lower() in _MISSING


def cell(row: Row, key: str, *, required: bool = True) -> str:
  """The stripped text of `row[key]`; '' when absent and not required; BadRow when required."""
  value = row.get(key)
  if is_missing(value):
    if required:
      raise BadRow(f"field {key!r} is {'missing' if key not in row else 'empty'}")
    return ""
  if isinstance(value, (list, dict)):
    raise BadRow(f"field {key!r}: expected text, got a {type(value).__name__}")
  return str(value).strip()


def parse_list(row: Row, key: str, *, required: bool = True) -> list[str]:
  """A list-valued field: a JSON list, or a CSV cell holding a stringified Python/JSON list
  ("['a', 'b']"). Parsed with json / ast.literal_eval, never eval."""
  value = row.get(key)
  if isinstance(value, list):
    items = value
  elif is_missing(value):
    if required:
      raise BadRow(f"field {key!r} is missing")
    return []
  else:
    text = str(value).strip()
    try:
      items = json.loads(text)
    except ValueError:
      try:
        items = ast.literal_eval(text)
      except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError) as e:
        raise BadRow(f"field {key!r}: expected a list like ['a', 'b'], got {_short(text)} "
                     f"({type(e).__name__})") from None
    if not isinstance(items, (list, tuple)):
      raise BadRow(f"field {key!r}: expected a list, got {type(items).__name__} {_short(text)}")
  out = []
  for item in items:
    if isinstance(item, (list, dict, tuple)) or is_missing(item):
      raise BadRow(f"field {key!r}: list item {_short(repr(item))} is not a non-empty string")
    out.append(str(item).strip())
  return out


def parse_labels(row: Row, key: str) -> list[str]:
  """Multi-label field: a list (see `parse_list`) or text separated by ',', ';' or '|'."""
  value = row.get(key)
  if isinstance(value, list) or (isinstance(value, str) and value.strip().startswith("[")):
    labels = parse_list(row, key)
  else:
    text = cell(row, key)
    for sep in ";|":
      text = text.replace(sep, ",")
    labels = [t.strip() for t in text.split(",") if t.strip()]
  if not labels:
    raise BadRow(f"field {key!r} holds no labels")
  return list(dict.fromkeys(labels))  # de-duplicated, first-seen order


def _short(text: str, n: int = 60) -> str:
  return repr(text if len(text) <= n else text[:n] + "...")


# ----------------------------------------------------------------------------------------------- source


class SourceError(Exception):
  """The source file as a whole cannot be read (bad JSON, not a list, broken CSV)."""


class Source:
  """Rows of a released text file: .csv / .tsv (header row), .json (a list of objects) or .jsonl.

  Iterating yields (row_id, row) with row_id the 0-based row index; a row that cannot be parsed comes as
  (row_id, BadRow). Iterating again re-reads the file (adapters that need a vocabulary pass twice)."""

  def __init__(self, path: str):
    self.path = path
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".tsv", ".json", ".jsonl"):
      raise ValueError(f"{path}: unsupported source type {ext!r}; expected .csv, .tsv, .json or .jsonl")
    self.kind = ext[1:]

  def columns(self) -> list[str] | None:
    """The CSV header, or None for JSON sources (their keys are checked per row)."""
    if self.kind not in ("csv", "tsv"):
      return None
    with open(self.path, newline="", encoding="utf-8-sig") as f:
      try:
        return next(csv.reader(f, delimiter=self._delimiter()), [])
      except csv.Error as e:
        raise SourceError(f"unreadable CSV header: {e}") from None

  def _delimiter(self) -> str:
    return "\t" if self.kind == "tsv" else ","

  def __iter__(self) -> Iterator[tuple[int, Row | BadRow]]:
    if self.kind in ("csv", "tsv"):
      yield from self._csv()
    elif self.kind == "json":
      yield from self._json()
    else:
      yield from self._jsonl()

  def _csv(self):
    with open(self.path, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f, delimiter=self._delimiter())
      i = 0
      while True:
        try:
          row = next(reader)
        except StopIteration:
          return
        except csv.Error as e:
          raise SourceError(f"CSV unreadable after row {i - 1}: {e}") from None
        if None in row:
          yield i, BadRow(f"row has {len(row) - 1 + len(row[None])} fields, header has {len(row) - 1}")
        else:
          yield i, row
        i += 1

  def _json(self):
    with open(self.path, encoding="utf-8") as f:
      try:
        data = json.load(f)
      except ValueError as e:
        raise SourceError(f"invalid JSON: {e}") from None
    if not isinstance(data, list):
      raise SourceError(f"expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
      yield i, row if isinstance(row, dict) else BadRow(f"expected an object, got {type(row).__name__}")

  def _jsonl(self):
    for line, row in jsonl.read_objects(self.path):  # rows are 0-based here, like CSV data rows
      yield line - 1, BadRow(str(row)) if isinstance(row, ValueError) else row


def values_of(source: Source, key: str, where: Callable[[Row], bool] = lambda r: True) -> list[str]:
  """Sorted distinct non-empty values of `key` over the readable rows (for "pick another" choices)."""
  seen = set()
  try:
    for _, row in source:
      if isinstance(row, dict) and where(row) and not is_missing(row.get(key)):
        seen.add(str(row[key]).strip())
  except SourceError:
    pass  # reported by the conversion pass
  return sorted(seen)


# ----------------------------------------------------------------------------------------------- context


def normalise_split(value: str, where: str) -> str:
  split = _SPLIT_ALIASES.get(str(value).strip().lower())
  if split is None:
    raise ValueError(f"{where}: split {value!r} is not one of {schema.SPLITS}")
  return split


@dataclasses.dataclass
class Context:
  """One adapter call: the source file, image root, split, seed and dataset name."""
  dataset: str
  src: str
  image_root: str
  split: str
  seed: int
  strip_prefix: str = ""

  @classmethod
  def make(cls, dataset: str, src: str, image_root: str, split: str, seed: int,
           strip_prefix: str = "") -> Context:
    """Validates the call eagerly (bad arguments raise here, not mid-build)."""
    if not os.path.isfile(src):
      raise FileNotFoundError(f"{dataset}: source file {src!r} not found")
    split = normalise_split(split, dataset)
    Source(src)  # checks the extension
    return cls(dataset, src, image_root or "", split, int(seed), strip_prefix or "")

  @property
  def source_name(self) -> str:
    return os.path.basename(self.src)

  def source(self) -> Source:
    return Source(self.src)

  def rng(self, row_id: int | str) -> random.Random:
    return random.Random(f"{self.seed}|{self.dataset}|{self.source_name}|{row_id}")

  def sample_id(self, row_id: int | str) -> str:
    stem = os.path.splitext(self.source_name)[0]
    return f"{self.dataset}/{stem}/{row_id}"

  def image_path(self, raw: str) -> str:
    """A source image path made relative to image_root (after removing `strip_prefix`)."""
    path = str(raw).strip()
    if not path:
      raise BadRow("empty image path")
    if self.strip_prefix and path.startswith(self.strip_prefix):
      path = path[len(self.strip_prefix):]
    if os.path.isabs(path):
      root = os.path.abspath(self.image_root) if self.image_root else ""
      if not root or not path.startswith(root.rstrip(os.sep) + os.sep):
        raise BadRow(f"image path {path!r} is absolute and not under image_root {self.image_root!r}; "
                     "pass strip_prefix= to map the released paths onto image_root")
      path = os.path.relpath(path, root)
    path = posixpath.normpath(path.replace("\\", "/"))
    if path == ".." or path.startswith("../") or path == ".":
      raise BadRow(f"image path {raw!r} points outside image_root")
    return path

  def row_split(self, row: Row) -> str:
    """A row's own `split` column when it has one, else the split of the call."""
    if isinstance(row, dict) and not is_missing(row.get("split")):
      try:
        return normalise_split(row["split"], "field 'split'")
      except ValueError as e:
        raise BadRow(str(e)) from None
    return self.split

  def run(self, convert: Callable[[int, Row], schema.Sample | Iterable[schema.Sample]],
          required: Sequence[str] = ()) -> Iterator[Output]:
    """Converts every row; malformed rows become RowErrors, the rest validated Samples."""
    source = self.source()
    try:
      columns = source.columns()
      if columns is not None:
        missing = [k for k in required if k not in columns]
        if missing:
          yield self.error("header", f"missing column(s) {missing}; the header has {columns}")
          return
      for row_id, row in source:
        try:
          if isinstance(row, BadRow):
            raise row
          split = self.row_split(row)
          out = convert(row_id, row)
          samples = [out] if isinstance(out, schema.Sample) else list(out)
          for s in samples:
            s.split = split
            s.source = self.dataset
            s.validate()
        except (BadRow, ValueError) as e:
          yield self.error(row_id, str(e))
          continue
        yield from samples
    except SourceError as e:
      yield self.error("file", str(e))

  def error(self, row: int | str, reason: str) -> schema.RowError:
    return schema.RowError(source=self.source_name, row=row, reason=f"{self.dataset}: {reason}")


# ----------------------------------------------------------------------------------------------- images


def subsample(items: Sequence[Any], k: int, rng: random.Random) -> list[Any]:
  """At most k items, a seeded random subset in their original order."""
  if len(items) <= k:
    return list(items)
  return [items[i] for i in sorted(rng.sample(range(len(items)), k))]


def around_question(paths: Sequence[str], question: str, rng: random.Random,
                    indices: Sequence[int | None] | None = None) -> list[schema.ImageRef]:
  """Images all before the question or all after it (a seeded coin), in order."""
  char = 0 if rng.random() < 0.5 else len(question)
  indices = indices if indices is not None else [None] * len(paths)
  return [schema.ImageRef(path=p, field="question", char=char, index=i) for p, i in zip(paths, indices)]


def report_text(findings: str, impression: str) -> str:
  """'Findings: ... Impression: ...' with the sections that are present."""
  parts = [f"Findings: {findings}" if findings else "", f"Impression: {impression}" if impression else ""]
  text = " ".join(p for p in parts if p)
  if not text:
    raise BadRow("both findings and impression are empty")
  return text


def given_answer(answer: str, **meta: Any) -> tuple[str, dict[str, Any]]:
  """A released answer and its meta: a yes/no answer is lower-cased and marked closed, else open."""
  if answer.strip().lower() in ("yes", "no"):
    return answer.strip().lower(), yes_no_meta(subtask="vqa_closed", **meta)
  return answer, {"subtask": "vqa_open", "closed": False, "image_dependent": True, **meta}


def yes_no_meta(**extra: Any) -> dict[str, Any]:
  return {"closed": True, "choices": ["yes", "no"], "image_dependent": True, **extra}


def pick_other(choices: Sequence[str], true_value: str, rng: random.Random) -> str | None:
  """A choice different from the true value (case-insensitive), or None when there is none."""
  others = [c for c in choices if c.strip().lower() != true_value.strip().lower()]
  return rng.choice(others) if others else None


def open_or_yes_no(rng: random.Random, *, open_pool: str, yes_no_pool: str, field: str, value: str,
                   choices: Sequence[str], p_yes_no: float) -> tuple[prompts.Prompt, str, dict[str, Any]]:
  """Either an open question whose answer is `value`, or (with probability p_yes_no) a yes/no question
  naming `value` ("yes") or a different choice ("no"). The "no" branch always names a value other than
  the true one; when no other choice exists the open question is asked instead."""
  if rng.random() < p_yes_no:
    if rng.random() < 0.5:
      prompt = prompts.pick(yes_no_pool, rng, **{field: value})
      return prompt, "yes", yes_no_meta(asked=value, **prompt.meta())
    other = pick_other(choices, value, rng)
    if other is not None:
      prompt = prompts.pick(yes_no_pool, rng, **{field: other})
      return prompt, "no", yes_no_meta(asked=other, **prompt.meta())
  prompt = prompts.pick(open_pool, rng)
  meta = {"closed": True, "choices": sorted(set(choices) | {value}), "image_dependent": True}
  return prompt, value, {**meta, **prompt.meta()}
