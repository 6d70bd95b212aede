"""Files mode of the build (`--from=files`): samples from an image folder, with or without text.

Without --text, every readable scan under SRC becomes one image-only record: task "caption",
question "" and answer "" (a scan without text: usable where images alone help, e.g. vision
pre-training, and easy to filter by task), split "train", source "files", the image at the start of
the question, id = the scan's relative path (plus "#INDEX" for one volume of a multi-scan file).
Discovery walks SRC in sorted order:
- DICOM files (.dcm or the DICM preamble) are grouped into series (SeriesInstanceUID per folder); a
  series that is every DICOM image of its folder is referenced by the folder, otherwise by its files.
  DICOM files without pixel data (DICOMDIR, reports, plans) are listed in the report's "skipped".
- 4D NIfTI and RadFM .npy case files become one scan per volume / per case scan (index 0..N-1).
- Anything that is not an image by name or magic (README.txt, .json, ...) is listed in "skipped";
  skipped files are not failures. Files that look like images but cannot be read are failures.
- Non-regular files (FIFOs, device nodes, sockets) are listed in "skipped" and never opened. Dangling
  or looping symlinks, names that are not valid UTF-8 and unreadable folders are failures (one each);
  the rest of the tree is stored.

With --text=FILE.jsonl, one sample per line (blank lines ignored):
  {"image": "rel/path" | ["rel/a.png", "rel/b.png"],      # images at the start of the question
   "question": "...", "answer": "...", "task": "vqa",     # task: one of schema.TASKS
   "split": "train", "id": "...", "source": "...", "meta": {...}}            # optional
or, for full control, "images": [{"path": "rel/p" | ["rel/series/1.dcm", ...], "field": "question" |
"answer", "char": 12, "index": 0}] (a list path is the files of one DICOM series). Image paths are
relative to SRC; a folder path is a DICOM series folder. The default id is "FILE_STEM:LINE".
Lines that are not JSON objects with these fields become RowErrors (file name, line number, reason):
invalid UTF-8, invalid JSON (incl. numbers out of range and absurd nesting), wrong types (a "char" or
"index" that is not a non-negative integer), strings that are not valid Unicode.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

from radfm_jax.data import jsonl, readers, schema
from radfm_jax.data.ingest.build import printable, redact_path
from radfm_jax.data.readers import dicom

Scan = tuple[str | list[str], int | None]   # (relative path or series files, index)


def _utf8(text: str) -> bool:
  try:
    text.encode("utf-8")
    return True
  except UnicodeEncodeError:
    return False


def discover(src: str,
             root: str | None = None) -> tuple[list[Scan], list[dict[str, str]], list[dict[str, str]]]:
  """Every scan under src (sorted), the files passed over and the entries that are failures (each as
  {"path", "reason"}); paths relative to root (default src; a folder among several --src folders is
  listed relative to their common parent)."""
  scans: list[Scan] = []
  skipped: list[dict[str, str]] = []
  bad: list[dict[str, str]] = []
  dicom_files: list[str] = []
  rel = lambda p: os.path.relpath(p, root or src)  # noqa: E731

  def unreadable(err: OSError) -> None:
    bad.append({"path": printable(rel(err.filename or src)),
                "reason": f"cannot list the folder: {err.strerror}"})

  for dirpath, dirnames, filenames in os.walk(src, onerror=unreadable):
    dirnames.sort()
    for name in sorted(filenames):
      full = os.path.join(dirpath, name)
      if not _utf8(rel(full)):
        bad.append({"path": printable(rel(full)), "reason": "the path is not valid UTF-8; rename the file"})
        continue
      what = readers.not_regular(full)
      if what in ("a dangling symlink", "a symlink loop"):
        bad.append({"path": rel(full), "reason": what})
        continue
      if what is not None:
        skipped.append({"path": rel(full), "reason": f"{what}, not a regular file (never opened)"})
        continue
      try:
        kind = readers.kind_of(full)
      except readers.NotAnImage:
        skipped.append({"path": rel(full), "reason": "not an image file"})
        continue
      if kind == "dicom":
        dicom_files.append(full)
        continue
      try:
        n = readers.n_items(full)
      except Exception:  # noqa: BLE001 - unreadable header: the reader reports it as a failure
        n = 1
      scans += [(rel(full), None)] if n == 1 else [(rel(full), i) for i in range(n)]
  series, no_pixels = dicom.group_series(dicom_files)
  skipped += [{"path": rel(p), "reason": reason} for p, reason in no_pixels]
  images_in = {}
  for files in series:
    images_in.setdefault(os.path.dirname(files[0]), set()).update(files)
  for files in series:
    folder = os.path.dirname(files[0])
    if len(files) == 1:
      scans.append((rel(files[0]), None))
    elif images_in[folder] == set(files):
      scans.append((rel(folder), None))
    else:
      scans.append(([rel(f) for f in files], None))
  scans.sort(key=lambda s: (s[0] if isinstance(s[0], str) else s[0][0], s[1] or 0))
  skipped.sort(key=lambda s: s["path"])
  bad.sort(key=lambda s: s["path"])
  return scans, skipped, bad


def image_only_samples(scans: list[Scan], *, redact: bool = False) -> Iterator[schema.Sample]:
  for path, index in scans:
    name = path if isinstance(path, str) else os.path.dirname(path[0]) + "/" + os.path.basename(path[0])
    sid = (redact_path(name) if redact else name) + ("" if index is None else f"#{index}")
    yield schema.Sample(id=sid, task="caption", question="", answer="", source="files",
                        images=[schema.ImageRef(path=path, field="question", char=0, index=index)])


def _image_refs(row: dict[str, Any]) -> list[schema.ImageRef]:
  if "images" in row:
    if not isinstance(row["images"], list):
      raise ValueError(f"'images' must be a list of objects, got {type(row['images']).__name__}")
    refs = []
    for i, im in enumerate(row["images"]):
      if not isinstance(im, dict) or "path" not in im:
        raise ValueError(f"images[{i}] must be an object with a 'path'")
      unknown = set(im) - {"path", "field", "char", "index"}
      if unknown:
        raise ValueError(f"images[{i}] has unknown keys {sorted(unknown)}")
      index = im.get("index")
      refs.append(schema.ImageRef(path=im["path"], field=im.get("field", "question"),
                                  char=_count(im.get("char", 0), f"images[{i}].char"),
                                  index=None if index is None else _count(index, f"images[{i}].index")))
    return refs
  image = row.get("image", [])
  paths = image if isinstance(image, list) else [image]
  if not all(isinstance(p, str) and p for p in paths):
    raise ValueError(f"'image' must be a relative path or a list of them, got {image!r}")
  return [schema.ImageRef(path=p, field="question", char=0) for p in paths]


def _count(value: Any, what: str) -> int:
  """A non-negative integer (not a bool, not a float), or ValueError naming the field."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"{what} must be a non-negative integer, got {value!r:.40}")
  return value


def text_samples(text: str) -> Iterator[schema.Sample | schema.RowError]:
  """Samples from a JSONL file (see the module docstring); bad lines as RowErrors."""
  name = os.path.basename(text)
  stem = name.split(".")[0]
  for lineno, row in jsonl.read_objects(text):
    try:
      if isinstance(row, ValueError):
        raise row
      missing = [k for k in ("question", "answer", "task") if k not in row]
      if missing:
        raise ValueError(f"missing field(s) {missing}")
      if not all(isinstance(row[k], str) for k in ("question", "answer", "task")):
        raise ValueError("question, answer and task must be strings")
      meta = row.get("meta", {})
      if not isinstance(meta, dict):
        raise ValueError(f"'meta' must be an object, got {type(meta).__name__}")
      yield schema.Sample(id=str(row.get("id", f"{stem}:{lineno}")), task=row["task"],
                          question=row["question"], answer=row["answer"], images=_image_refs(row),
                          split=row.get("split", "train"), source=str(row.get("source", stem)),
                          meta=meta)
    except (ValueError, TypeError, OverflowError) as e:
      yield schema.RowError(source=name, row=lineno, reason=printable(str(e)))


def samples_from_folder(src: str, *, text: str | None = None, redact: bool = False, root: str | None = None):
  """(samples, skipped, total) for ingest_samples: the JSONL's samples, or every scan under src (paths
  relative to root, default src)."""
  if not os.path.isdir(src):
    raise FileNotFoundError(f"--src {src}: no such folder")
  if text is not None:
    if not os.path.isfile(text):
      raise FileNotFoundError(f"--text {text}: no such file")
    with open(text, "rb") as f:
      total = sum(1 for line in f if line.strip())  # for the progress bar
    return text_samples(text), [], total
  scans, skipped, bad = discover(src, root)
  errors = [schema.RowError(source=b["path"], row=None, reason=b["reason"]) for b in bad]
  return itertools.chain(errors, image_only_samples(scans, redact=redact)), skipped, len(scans) + len(bad)
