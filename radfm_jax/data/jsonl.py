"""JSON Lines with per-line errors: the one reader behind every JSONL input of the project (build --text,
generate --batch_file, RadFM's released JSONL files, RadBench predictions).

`objects(lines)` / `read_objects(path)` yield (1-based line number, the JSON object) for each non-blank
line, or (line number, ValueError) when the line is not valid UTF-8, not valid JSON ("not valid JSON:
..."), nested too deeply, or not an object. A bad line never stops the rest: batch jobs record it and go on.
Files are read as bytes (one bad byte spoils only its line), through etils.epath (local or gs://).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from etils import epath


def parse(line: bytes | str) -> dict[str, Any] | ValueError:
  """One line -> its JSON object, or a ValueError saying why it is not one."""
  if isinstance(line, bytes):
    try:
      line = line.decode("utf-8")
    except UnicodeDecodeError as e:
      return ValueError(f"invalid UTF-8 at byte {e.start} of the line")
  try:
    obj = json.loads(line)
  except RecursionError:
    return ValueError("JSON nested too deeply")
  except ValueError as e:  # JSONDecodeError, and ints past Python's digit limit
    return ValueError(f"not valid JSON (invalid JSON: {e})")
  if not isinstance(obj, dict):
    return ValueError(f"expected a JSON object, got {type(obj).__name__}")
  return obj


def objects(lines: Iterable[bytes | str]) -> Iterator[tuple[int, dict[str, Any] | ValueError]]:
  """(1-based line number, object or ValueError) of each non-blank line."""
  for n, line in enumerate(lines, 1):
    if line.strip():
      yield n, parse(line)


def read_objects(path: str) -> Iterator[tuple[int, dict[str, Any] | ValueError]]:
  """`objects` of a file (local path or any etils.epath location)."""
  with epath.Path(path).open("rb") as f:
    yield from objects(f)
