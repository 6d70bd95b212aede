"""Writing a run's outputs so that a folder never mixes two runs.

`staged(out, names)` yields a fresh temporary folder next to `out` (same file system); when the block
ends without an exception, every file called one of `names` (the outputs any run may write) is removed
from `out`, then the new files are moved in and the temporary folder is removed. On an exception
the temporary folder is removed and `out` is left exactly as it was. Other files and folders in `out`
(e.g. a baseline's sub-folder) are never touched.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import Iterable, Iterator


@contextlib.contextmanager
def staged(out: str | os.PathLike, names: Iterable[str]) -> Iterator[pathlib.Path]:
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
