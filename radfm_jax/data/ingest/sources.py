"""A build's input as shards: each shard is listed by one call (one Beam step; the local runner lists
them in turn), and both runners number its items (shard, n), which fixes the order of the manifest.

--src (and, in files mode, --text) take one path, a comma-separated list, or glob patterns (matched here,
sorted, duplicates dropped):
  --from=files without --text  every folder is a shard; image paths, ids and skipped paths are relative to
                               the folders' common parent (one folder: the folder itself)
  --from=files --text=...      --src is the one image folder; every JSONL file is a shard
  --from=radfm                 every released CSV/JSON file is a shard; --image_root is the one image folder
"""
from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import os
from collections.abc import Iterator
from typing import Any

from radfm_jax.data import schema
from radfm_jax.data.ingest import adapters, files

Item = schema.Sample | schema.RowError


@dataclasses.dataclass(frozen=True)
class Shard:
  """One input shard: a folder ("folder"), a JSONL file ("text") or a released CSV/JSON file ("radfm").
  `root` is the source root its image paths are relative to. Picklable (Beam ships it to a worker)."""
  kind: str
  path: str
  root: str
  redact: bool = False
  dataset: str | None = None
  opts: str = "{}"          # radfm: the adapter's options as JSON

  def open(self) -> tuple[Iterator[Item], list[dict[str, str]], int | None]:
    """(items, skipped files, number of items or None when unknown before reading)."""
    if self.kind == "folder":
      return files.samples_from_folder(self.path, redact=self.redact, root=self.root)
    if self.kind == "text":
      return files.samples_from_folder(self.root, text=self.path)
    if self.kind == "radfm":
      return adapters.get(self.dataset)(self.path, self.root, **json.loads(self.opts)), [], None
    raise ValueError(f"shard kind {self.kind!r}: expected 'folder', 'text' or 'radfm'")


def expand(spec: str, flag: str) -> list[str]:
  """A path, comma-separated paths or glob patterns -> sorted absolute paths (each pattern must match)."""
  out: list[str] = []
  for part in (p.strip() for p in spec.split(",")):
    if not part:
      continue
    if glob.has_magic(part):
      matches = sorted(glob.glob(part))
      if not matches:
        raise FileNotFoundError(f"{flag} {part}: the pattern matches nothing")
      out += matches
    else:
      out.append(part)
  if not out:
    raise ValueError(f"{flag} {spec!r}: no path given")
  return sorted(dict.fromkeys(os.path.abspath(p) for p in out))


def plan_shards(kind: str, src: str, *, text: str | None = None, dataset: str | None = None,
                image_root: str | None = None, redact: bool = False,
                opts: dict[str, Any] | None = None) -> tuple[str, list[Shard]]:
  """(source root, shards) for a build; checks that every path exists before anything runs."""
  if kind == "files" and text is None:
    folders = expand(src, "--src")
    for f in folders:
      if not os.path.isdir(f):
        raise FileNotFoundError(f"--src {f}: no such folder")
    root = folders[0] if len(folders) == 1 else os.path.commonpath(folders)
    if len(folders) > 1 and root in folders:
      raise ValueError(f"--src: {root} contains the other folders given (list each folder once)")
    return root, [Shard("folder", f, root, redact=redact) for f in folders]
  if kind == "files":
    if "," in src or glob.has_magic(src):
      raise ValueError("--src with --text is the one image folder (the JSONL files are the shards)")
    root = os.path.abspath(src)
    if not os.path.isdir(root):
      raise FileNotFoundError(f"--src {root}: no such folder")
    paths, flag = expand(text, "--text"), "--text"
    shard_kind = "text"
  elif kind == "radfm":
    if not image_root or not os.path.isdir(image_root):
      raise FileNotFoundError(f"--image_root {image_root}: no such folder")
    root = os.path.abspath(image_root)
    paths, flag = expand(src, "--src"), "--src"
    shard_kind = "radfm"
  else:
    raise ValueError(f"source kind {kind!r}: expected 'files' or 'radfm'")
  for p in paths:
    if not os.path.isfile(p):
      raise FileNotFoundError(f"{flag} {p}: no such file")
  return root, [Shard(shard_kind, p, root, redact=redact, dataset=dataset,
                      opts=json.dumps(opts or {}, sort_keys=True)) for p in paths]


def open_all(shards: list[Shard]) -> tuple[Iterator[Item], list[dict[str, str]], int | None]:
  """The local runner's input: every shard's items in order, all skipped files, the total if known."""
  opened = [s.open() for s in shards]
  totals = [t for _, _, t in opened]
  total = None if any(t is None for t in totals) else sum(totals)
  return (itertools.chain.from_iterable(items for items, _, _ in opened),
          [s for _, skipped, _ in opened for s in skipped], total)
