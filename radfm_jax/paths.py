"""Local paths and remote URLs (gs://, s3://, ...) behind one small API, for every file the project
writes outside TensorStore/Orbax: params checkpoints' metadata, metrics.jsonl, eval outputs.

  paths.absolute("runs/demo")        -> "/abs/runs/demo"      (local: made absolute)
  paths.absolute("gs://b/run")       -> "gs://b/run"          (URLs are kept as they are)
  paths.path("gs://b/run") / "x"     -> an etils.epath.Path (local disk, or the remote filesystem)

etils.epath serves remote paths through TensorFlow's gfile when TensorFlow is installed (it is, for
CLU), else through fsspec (gcsfs for gs://). Tests against a GCS emulator set EPATH_USE_TF=false:
TensorFlow's GCS client has no endpoint override (see launch/README.md).
"""
from __future__ import annotations

import os

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  """True for URLs such as gs://bucket/dir (anything with a scheme), False for local paths."""
  return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
  """An absolute local path, or the URL unchanged."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def path(p: str | os.PathLike) -> epath.Path:
  """An etils.epath.Path of `p` (made absolute when local)."""
  return epath.Path(absolute(p))
