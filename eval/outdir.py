"""Writing a run's outputs so that a folder never mixes two runs.

`staged(out, names)` yields a fresh temporary folder next to `out` (same file system); when the block
ends without an exception, every file called one of `names` (the outputs any run may write) is removed
from `out`, then the new files are moved in and the temporary folder is removed. On an exception
the temporary folder is removed and `out` is left exactly as it was. Other files and folders in `out`
(e.g. a baseline's sub-folder) are never touched.

A remote `out` (gs://...) is staged in a local temporary folder and its files are copied up at the end
(object stores have no rename): the old outputs are replaced file by file, not all at once.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import Iterable, Iterator

from etils import epath

from radfm_jax import paths


@contextlib.contextmanager
def staged(out: str | os.PathLike, names: Iterable[str]) -> Iterator[pathlib.Path]:
  if paths.is_remote(out):
    with _staged_remote(paths.path(out), names) as tmp:
      yield tmp
    return
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    yield tmp
    out.mkdir(parents=True, exist_ok=True)
    for name in set(names) | {p.name for p in tmp.iterdir()}:
      old = out / name
      if old.is_file() or old.is_symlink():
        old.unlink()
    for new in sorted(tmp.iterdir()):
      os.replace(new, out / new.name)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _staged_remote(out: epath.Path, names: Iterable[str]) -> Iterator[pathlib.Path]:
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=".radbench.tmp-"))
  try:
    yield tmp
    out.mkdir(parents=True, exist_ok=True)
    for name in set(names) | {p.name for p in tmp.iterdir()}:
      if (out / name).is_file():
        (out / name).unlink()
    for new in sorted(tmp.iterdir()):
      (out / new.name).write_bytes(new.read_bytes())
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
