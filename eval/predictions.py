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

Files as users save them: the suffix is matched case-insensitively (.CSV), CSV text is decoded as UTF-8
with or without a byte-order mark (Excel), else Windows-1252, else Latin-1 (or `encoding=`); a row with
fewer or more cells than the header is an error row. Row numbers are 1-based file lines, as an editor
shows them. A file that cannot be read at all raises `PredictionsError` with a one-line message
naming the file (and line).

`write` adds the per-row scores of `eval.scoring.score(..., rows=...)` to predictions.csv (columns after
the item's own: kind, verdict, reason, chosen, then the per-row metric values) and to each JSONL
object (key "scores").
"""
from __future__ import annotations

import ast
import csv
import io
import json
import pathlib
import sys
from typing import Any, Iterable

from eval.tasks import Item
from radfm_jax import paths
from radfm_jax.data import jsonl
from radfm_jax.data.schema import TASKS, RowError

ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")


class PredictionsError(ValueError):
  """A predictions file that cannot be read; the message is one line naming file and line."""


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


def _read_radfm_csv(path: str, rows: list[tuple[int, Any]], task: str | None
                    ) -> tuple[list[Item], list[RowError]]:
  items, errors = [], []
  for i, row in rows:
    if isinstance(row, ValueError):
      errors.append(RowError(path, i, str(row)))
      continue
    belong = unwrap_cell(row["belong_to"]).strip()
    mapped = (task, {}) if task else radfm_source(belong)
    if mapped is None:
      errors.append(RowError(path, i, f"belong_to {belong!r} maps to no RadBench task; pass --task"))
      continue
    items.append(Item(id=f"line{i}", task=mapped[0], question=unwrap_cell(row["Question"]),
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
  return Item(id=str(row.get("id") or f"line{i}"), task=task or str(row.get("task", "")),
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


def _decode(path: str, encoding: str | None) -> tuple[str, str]:
  raw = paths.path(path).read_bytes()  # local or gs://
  for enc in ([encoding] if encoding else ENCODINGS):
    try:
      return raw.decode(enc), enc
    except UnicodeDecodeError as e:
      if encoding:
        line = raw[:e.start].count(b"\n") + 1
        raise PredictionsError(f"{path}:{line}: not valid {encoding} ({e.reason} at byte {e.start})") from e
    except LookupError as e:
      raise PredictionsError(f"{path}: unknown encoding {encoding!r}") from e
  raise PredictionsError(f"{path}: cannot decode")  # unreachable: latin-1 decodes any byte


def _jsonl_rows(text: str) -> Iterable[tuple[int, Any]]:
  return jsonl.objects(text.splitlines())


def _csv_rows(path: str, text: str) -> tuple[tuple[str, ...], list[tuple[int, Any]]]:
  """(header, [(1-based line, row dict | ValueError)])."""
  csv.field_size_limit(sys.maxsize)
  reader = csv.reader(io.StringIO(text, newline=""))
  try:
    header = tuple(h.strip() for h in next(reader))
  except StopIteration as e:
    raise PredictionsError(f"{path}:1: empty file (no header row)") from e
  except csv.Error as e:
    raise PredictionsError(f"{path}:{reader.line_num}: {e}") from e
  rows = []
  while True:
    start = reader.line_num + 1
    try:
      cells = next(reader)
    except StopIteration:
      break
    except csv.Error as e:
      raise PredictionsError(f"{path}:{start}: {e}") from e
    if not any(c.strip() for c in cells):
      continue
    if len(cells) != len(header):
      rows.append((start, ValueError(f"row has {len(cells)} cells, the header has {len(header)}")))
      continue
    rows.append((start, dict(zip(header, cells))))
  return header, rows


def read(path: str, task: str | None = None, encoding: str | None = None) -> tuple[list[Item], list[RowError]]:
  """Items and per-row errors of a predictions file (.jsonl, or .csv in our or RadFM's columns).
  `task` forces every row's task; `encoding` overrides the automatic choice (see module doc)."""
  if task is not None and task not in TASKS:
    raise PredictionsError(f"--task {task!r} is not one of {TASKS}")
  if not paths.path(path).is_file():
    raise FileNotFoundError(f"predictions file {path} does not exist")
  suffix = pathlib.Path(path).suffix.lower()
  if suffix not in (".jsonl", ".csv"):
    raise PredictionsError(f"{path}: expected a .jsonl or .csv file")
  text, _ = _decode(path, encoding)
  if suffix == ".jsonl":
    return _read_ours(path, _jsonl_rows(text.lstrip("\ufeff")), task)
  columns, rows = _csv_rows(path, text)
  if set(RADFM_COLUMNS) <= set(columns):
    return _read_radfm_csv(path, rows, task)
  if {"answer", "prediction"} <= set(columns) and ("task" in columns or task):
    return _read_ours(path, rows, task)
  raise PredictionsError(f"{path}:1: columns {list(columns)} are neither RadFM's {list(RADFM_COLUMNS)} "
                         f"nor ours {list(OUR_CSV_COLUMNS)} (task may come from --task)")


SCORE_COLUMNS = ("kind", "verdict", "reason", "chosen")


def write(items: list[Item], out_dir: str | pathlib.Path, rows: list[dict] | None = None
          ) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes predictions.jsonl and predictions.csv (with per-row scores when `rows` is given)."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  rows = rows if rows is not None else [{} for _ in items]
  if len(rows) != len(items):
    raise ValueError(f"{len(rows)} score rows for {len(items)} items")
  extra = list(SCORE_COLUMNS) + sorted({k for r in rows for k in r} - set(SCORE_COLUMNS))
  jl, cs = out / "predictions.jsonl", out / "predictions.csv"
  with open(jl, "w", encoding="utf-8") as f:
    for item, r in zip(items, rows):
      f.write(json.dumps({**item.to_json(), **({"scores": r} if r else {})}, ensure_ascii=False) + "\n")
  with open(cs, "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=list(OUR_CSV_COLUMNS) + extra)
    w.writeheader()
    for item, r in zip(items, rows):
      w.writerow({"id": item.id, "task": item.task, "source": item.source, "question": item.question,
                  "answer": item.answer, "prediction": item.prediction,
                  "modality": item.meta.get("modality", ""), "dim": item.meta.get("dim", ""),
                  "meta": json.dumps(item.meta, sort_keys=True, ensure_ascii=False),
                  **{k: "" if r.get(k) is None else r[k] for k in extra}})
  return jl, cs
