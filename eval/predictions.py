"""Predictions files: reading ours and RadFM's, writing predictions.jsonl + predictions.csv.

Ours (written by `write`, read back by `read`):
* JSONL: one object per line with the `Item` fields: id, task, question, answer (ground truth),
  prediction, meta (object), source.
* CSV: columns id, task, source, question, answer, prediction, modality, dim, meta (meta as JSON;
  modality and dim are copies for spreadsheet users; meta wins when both are present).

RadFM's `src/test.py` output CSV: columns Question, Ground Truth, Pred, belong_to. Its cells are
python list literals of one string ("['...']"), unwrapped here; image placeholders are stripped by the
scorers. `belong_to` names an upstream dataset class, mapped to a RadBench task and meta by
`RADFM_SOURCES` (else by keywords in the name); an unmappable row is recorded as an error and skipped.
"""
from __future__ import annotations

import ast
import csv
import json
import os
import pathlib
import sys
from typing import Any, Iterable

from eval.tasks import Item
from radfm_jax.data.schema import TASKS, RowError

RADFM_COLUMNS = ("Question", "Ground Truth", "Pred", "belong_to")
OUR_CSV_COLUMNS = ("id", "task", "source", "question", "answer", "prediction", "modality", "dim", "meta")

# RadFM dataset class (belong_to) -> (task, meta).
RADFM_SOURCES: dict[str, tuple[str, dict[str, Any]]] = {
    **{f"{n}_dataset_bn": ("diagnosis", {"dim": "2D", "modality": m, "closed": True})
       for n, m in (("chestxray", "X-ray"), ("pcxr", "X-ray"), ("spinexr", "X-ray"), ("mammo", "Mammography"))},
    **{f"{n}_dataset": ("diagnosis", {"dim": "2D", "modality": m, "subtask": "diagnosis_multilabel"})
       for n, m in (("chestxray", "X-ray"), ("pcxr", "X-ray"), ("spinexr", "X-ray"), ("mammo", "Mammography"))},
    "radiomodality_dataset": ("modality", {"dim": "3D"}),
    "medpix_single_dataset": ("modality", {"dim": "2D"}),
    "pmcvqa_dataset": ("vqa", {"dim": "2D"}),
    "vqarad_dataset": ("vqa", {"dim": "2D"}),
    "slake_dataset": ("vqa", {"dim": "2D"}),
    "casereport_dataset": ("vqa", {"dim": "2D"}),
    "medpix_qa_dataset": ("vqa", {"dim": "2D"}),
    "radiovqa_dataset": ("vqa", {"dim": "3D"}),
    "chestxray_caption_dataset": ("report", {"dim": "2D", "modality": "X-ray"}),
    "radiocaption_dataset": ("report", {"dim": "3D"}),
    "medpix_multi_dataset": ("report", {"dim": "2D"}),
    "pmcoa_dataset": ("caption", {"dim": "2D"}),
    "radiofeatures_dataset": ("rationale", {"dim": "3D"}),
}
_KEYWORDS = (("rationale", "rationale"), ("feature", "rationale"), ("modality", "modality"),
             ("vqa", "vqa"), ("report", "report"), ("caption", "report"), ("diagnos", "diagnosis"),
             ("_bn", "diagnosis"), ("cls", "diagnosis"))


def radfm_source(belong_to: str) -> tuple[str, dict[str, Any]] | None:
  """(task, meta) for a RadFM `belong_to` value, or None when it cannot be mapped."""
  if belong_to in RADFM_SOURCES:
    task, meta = RADFM_SOURCES[belong_to]
    return task, dict(meta)
  low = belong_to.lower()
  if low in TASKS:
    return low, {}
  for word, task in _KEYWORDS:
    if word in low:
      return task, {}
  return None


def unwrap_cell(cell: str) -> str:
  """"['text']" -> "text" (a python list literal of strings, as RadFM writes); other text unchanged."""
  s = (cell or "").strip()
  if s.startswith("[") and s.endswith("]"):
    try:
      value = ast.literal_eval(s)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
      return cell
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
      return " ".join(value)
  return cell


def _read_radfm_csv(path: str, rows: list[dict], task: str | None) -> tuple[list[Item], list[RowError]]:
  items, errors = [], []
  for i, row in enumerate(rows):
    belong = unwrap_cell(row["belong_to"]).strip()
    mapped = (task, {}) if task else radfm_source(belong)
    if mapped is None:
      errors.append(RowError(path, i, f"belong_to {belong!r} maps to no RadBench task; pass --task"))
      continue
    items.append(Item(id=f"row{i}", task=mapped[0], question=unwrap_cell(row["Question"]),
                      answer=unwrap_cell(row["Ground Truth"]), prediction=unwrap_cell(row["Pred"]),
                      meta=mapped[1], source=belong))
  return items, errors


def _our_item(path: str, i: int, row: dict[str, Any], task: str | None) -> Item:
  meta = row.get("meta") or {}
  if isinstance(meta, str):
    try:
      meta = json.loads(meta)
    except json.JSONDecodeError as e:
      raise ValueError(f"meta is not JSON ({e})") from e
  if not isinstance(meta, dict):
    raise ValueError(f"meta must be an object, got {type(meta).__name__}")
  for key in ("modality", "dim"):
    if row.get(key) and key not in meta:
      meta[key] = row[key]
  for key in ("answer", "prediction"):
    if row.get(key) is None:
      raise ValueError(f"missing field {key!r}")
  return Item(id=str(row.get("id") or f"row{i}"), task=task or str(row.get("task", "")),
              question=str(row.get("question") or ""), answer=str(row["answer"]),
              prediction=str(row["prediction"]), meta=meta, source=str(row.get("source") or ""))


def _read_ours(path: str, rows: Iterable[tuple[int, Any]], task: str | None) -> tuple[list[Item], list[RowError]]:
  items, errors = [], []
  for i, row in rows:
    try:
      if isinstance(row, ValueError):
        raise row
      if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}")
      items.append(_our_item(path, i, row, task))
    except ValueError as e:
      errors.append(RowError(path, i, str(e)))
  return items, errors


def _jsonl_rows(path: str) -> Iterable[tuple[int, Any]]:
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f):
      if not line.strip():
        continue
      try:
        yield i, json.loads(line)
      except json.JSONDecodeError as e:
        yield i, ValueError(f"invalid JSON: {e}")


def read(path: str, task: str | None = None) -> tuple[list[Item], list[RowError]]:
  """Items and per-row errors of a predictions file (.jsonl, or .csv in our or RadFM's columns).
  `task` forces every row's task."""
  if task is not None and task not in TASKS:
    raise ValueError(f"--task {task!r} is not one of {TASKS}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"predictions file {path} does not exist")
  if path.endswith(".jsonl"):
    return _read_ours(path, _jsonl_rows(path), task)
  if not path.endswith(".csv"):
    raise ValueError(f"predictions file {path}: expected a .jsonl or .csv file")
  csv.field_size_limit(sys.maxsize)
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    columns = tuple(reader.fieldnames or ())
    rows = list(reader)
  if set(RADFM_COLUMNS) <= set(columns):
    return _read_radfm_csv(path, rows, task)
  if {"answer", "prediction"} <= set(columns) and ("task" in columns or task):
    return _read_ours(path, enumerate(rows), task)
  raise ValueError(f"predictions file {path}: columns {list(columns)} are neither RadFM's "
                   f"{list(RADFM_COLUMNS)} nor ours {list(OUR_CSV_COLUMNS)} (task may come from --task)")


def write(items: list[Item], out_dir: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes predictions.jsonl and predictions.csv; returns their paths."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  jl, cs = out / "predictions.jsonl", out / "predictions.csv"
  with open(jl, "w", encoding="utf-8") as f:
    for item in items:
      f.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")
  with open(cs, "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=OUR_CSV_COLUMNS)
    w.writeheader()
    for item in items:
      w.writerow({"id": item.id, "task": item.task, "source": item.source, "question": item.question,
                  "answer": item.answer, "prediction": item.prediction,
                  "modality": item.meta.get("modality", ""), "dim": item.meta.get("dim", ""),
                  "meta": json.dumps(item.meta, sort_keys=True, ensure_ascii=False)})
  return jl, cs
