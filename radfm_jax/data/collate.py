"""Global batch of row ids -> this process's numpy batch (text, packing, images); runs in Grain workers.

A *row* is one sequence of the batch: a single sample, or several short samples packed together
(segment ids 1, 2, ...; positions restart; image slots renumbered). Every process receives the same
global batch of row ids, tokenizes all of its rows (cheap) so that every process picks the same text
length and image-slot buckets, then loads the images of its own rows only:
rows [process_index * b, (process_index + 1) * b) with b = global batch / process_count.

A row that cannot be built (unreadable or corrupt volume, a record whose images do not fit max_len) is
left empty (pad tokens, segment id 0, no images, no loss) and counted in `num_skipped`; with
on_corrupt="fail" it raises instead. Nothing is ever replaced by other data.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from absl import logging
import numpy as np

from radfm_jax.data import preprocess
from radfm_jax.data import store as store_lib
from radfm_jax.data import tokenizer as tokenizer_lib

DEVICE_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids", "images", "image_mask")
# record_index [b, P, 2] = (dataset, record) of each sample of a row (-1 unused; kept for skipped rows).
# Eval labels of a row, from its first record's meta (evaluation rows hold one record): example_mask (a
# real, not skipped, row), closed, image_dependent.
HOST_KEYS = ("record_index", "num_skipped", "example_mask", "closed", "image_dependent")


def buckets(values: Sequence[int] | None, top: int, name: str) -> tuple[int, ...]:
  """The configured bucket sizes `values` (config key data.`name`) below `top`, plus `top`, sorted."""
  vals = sorted({int(v) for v in (values or ()) if int(v) < top} | {top})
  if vals[0] <= 0:
    raise ValueError(f"data.{name} {list(values or ())}: buckets must be positive")
  return tuple(vals)


def bucket(value: int, buckets: Sequence[int]) -> int:
  """Smallest bucket >= value (the largest bucket when value exceeds them all)."""
  for b in buckets:
    if value <= b:
      return b
  return buckets[-1]


@dataclasses.dataclass(frozen=True)
class SourceRef:
  """One dataset of the mix: a store root and the filter that selects its records."""
  name: str
  root: str
  split: str
  tasks: tuple[str, ...] | None = None


def open_records(src: SourceRef) -> tuple[Any, list[dict[str, Any]]]:
  """Opens a store and lists its records for a source (the same order in every process)."""
  store = store_lib.Store.open(src.root)
  records = [r for r in store.records(split=src.split) if src.tasks is None or r["task"] in src.tasks]
  return store, records


class _SkipRow(Exception):
  pass


class BatchBuilder:
  """Picklable callable `(row_ids [GB] int64, rng) -> numpy batch` (see the module docstring)."""

  def __init__(self, *, sources: Sequence[SourceRef], num_records: Sequence[int], rows: np.ndarray,
               row_group: np.ndarray, tokenizer: tokenizer_lib.Tokenizer, spec: preprocess.ImageSpec,
               max_len: int, len_buckets: Sequence[int], slot_buckets: Sequence[int],
               batch_size: int, batch_size_3d: int, train: bool, on_corrupt: str,
               process_index: int, process_count: int):
    if on_corrupt not in ("skip", "fail"):
      raise ValueError(f"on_corrupt={on_corrupt!r}: expected 'skip' or 'fail'")
    self.sources, self.num_records = list(sources), list(num_records)
    self.rows, self.row_group = rows, row_group   # rows [N, P, 2] (dataset, record), -1 = unused
    self.tok, self.spec = tokenizer, spec
    self.max_len, self.len_buckets, self.slot_buckets = max_len, tuple(len_buckets), tuple(slot_buckets)
    self.batch_size, self.batch_size_3d = batch_size, batch_size_3d
    self.train, self.on_corrupt = train, on_corrupt
    self.process_index, self.process_count = process_index, process_count
    self._opened = None  # per process: [(store, records)]

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_opened"] = None
    return state

  def _stores(self):
    if self._opened is None:
      opened = [open_records(s) for s in self.sources]
      for src, (_, recs), n in zip(self.sources, opened, self.num_records):
        if len(recs) != n:
          raise RuntimeError(f"store {src.root}: {len(recs)} {src.split} records now, {n} when the pipeline "
                             "was planned (the store changed under a running pipeline)")
      self._opened = opened
    return self._opened

  def global_batch(self, group: int) -> int:
    return self.batch_size if group == 0 else self.batch_size_3d

  # ------------------------------------------------------------------ text

  def _row_text(self, row: np.ndarray) -> dict[str, Any]:
    """Token arrays of one row (unpadded), its records and image keys; raises _SkipRow with a reason."""
    stores = self._stores()
    parts, keys = [], []
    for d, r in row:
      if d < 0:
        continue
      rec = stores[d][1][r]
      try:
        ex = self.tok.build_example(rec, self.max_len, train=self.train)
      except ValueError as e:
        raise _SkipRow(str(e)) from e
      n = int(ex["length"])
      ex = {k: v[:n] for k, v in ex.items() if k != "length"}
      offset = len(keys)
      if offset:  # renumber image slots after the previous samples' images
        img = ex["inputs"] >= self.tok.image_start_id + 2
        ex["inputs"] = np.where(img, ex["inputs"] + offset * self.tok.tokens_per_image, ex["inputs"])
        img = ex["targets"] >= self.tok.image_start_id + 2
        ex["targets"] = np.where(img, ex["targets"] + offset * self.tok.tokens_per_image, ex["targets"])
      ex["segment_ids"] = np.full((n,), len(parts) + 1, np.int32)
      parts.append(ex)
      keys.extend((int(d), im["key"]) for im in rec.get("images", []))
    if not parts:
      return {"length": 0, "keys": []}
    meta = stores[row[0][0]][1][row[0][1]].get("meta") or {}
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if len(out["inputs"]) > self.max_len or len(keys) > self.tok.max_images:
      raise _SkipRow(f"packed row of {len(out['inputs'])} tokens / {len(keys)} images exceeds max_len "
                     f"{self.max_len} / max_images {self.tok.max_images}")
    out.update(length=len(out["inputs"]), keys=keys, closed=bool(meta.get("closed", False)),
               image_dependent=bool(meta.get("image_dependent", False)))
    return out

  # ------------------------------------------------------------------ images

  def _row_images(self, text: dict[str, Any], grid, rng, out: np.ndarray) -> None:
    """Reads and preprocesses the row's images into `out` [S, *grid, C_host] (left zero on failure)."""
    stores = self._stores()
    vols, metas, names = [], [], []
    for d, key in text["keys"]:
      store = stores[d][0]
      name = f"{self.sources[d].root}:{key}"
      try:
        vols.append(store.read_volume(key))
        metas.append(store.volume_meta(key))
      except Exception as e:  # pylint: disable=broad-except
        raise _SkipRow(f"{name}: unreadable volume ({type(e).__name__}: {e})") from e
      names.append(name)
    try:
      if vols:
        preprocess.prepare_sample(vols, metas, self.spec, rng=rng, names=names, grid=grid, out=out)
    except ValueError as e:
      out[...] = 0
      raise _SkipRow(str(e)) from e

  # ------------------------------------------------------------------ batch

  def __call__(self, row_ids: np.ndarray, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    row_ids = np.asarray(row_ids, np.int64).reshape(-1)
    group = int(self.row_group[row_ids[0]])
    gb = self.global_batch(group)
    ids = np.full((gb,), -1, np.int64)   # an eval tail batch is padded with empty rows
    ids[:len(row_ids)] = row_ids
    texts, reasons = [], {}
    for i, rid in enumerate(ids):
      try:
        texts.append(self._row_text(self.rows[rid]) if rid >= 0 else {"length": 0, "keys": []})
      except _SkipRow as e:
        texts.append(None)
        reasons[i] = str(e)
    t = bucket(max([x["length"] for x in texts if x] + [1]), self.len_buckets)
    s = bucket(max([len(x["keys"]) for x in texts if x] + [1]), self.slot_buckets)
    grid = preprocess.grid_of(group, self.spec)
    b = gb // self.process_count
    start = self.process_index * b
    seed = None if rng is None else int(rng.integers(2**63))
    p = self.rows.shape[1]
    text_keys = ("inputs", "targets", "loss_mask", "positions", "segment_ids")
    batch = {k: np.zeros((b, t), np.int32) for k in text_keys}
    batch["inputs"][:] = self.tok.pad_id
    batch["targets"][:] = self.tok.pad_id
    batch["images"] = np.zeros((b, s, *grid, self.spec.image_channels), self.spec.image_dtype)
    batch["image_mask"] = np.zeros((b, s), bool)
    batch["record_index"] = np.full((b, p, 2), -1, np.int64)
    for k in ("example_mask", "closed", "image_dependent"):
      batch[k] = np.zeros((b,), bool)
    skipped = 0
    for j in range(b):
      i = start + j
      text = texts[i]
      if ids[i] >= 0:
        batch["record_index"][j] = self.rows[ids[i]]
      try:
        if text is None:
          raise _SkipRow(reasons[i])
        if not text["length"]:
          continue
        row_rng = None if seed is None else np.random.default_rng([seed, i])
        self._row_images(text, grid, row_rng, batch["images"][j])
      except _SkipRow as e:
        if self.on_corrupt == "fail":
          raise ValueError(f"row {ids[i]} ({self._describe(ids[i])}): {e}") from e
        logging.warning("skipping row %d (%s): %s", ids[i], self._describe(ids[i]), e)
        skipped += 1
        continue
      n = text["length"]
      for k in text_keys:
        batch[k][j, :n] = text[k]
      batch["image_mask"][j, :len(text["keys"])] = True
      batch["example_mask"][j] = True
      batch["closed"][j], batch["image_dependent"][j] = text["closed"], text["image_dependent"]
    batch["num_skipped"] = np.int32(skipped)
    return batch

  def _describe(self, rid: int) -> str:
    if rid < 0:
      return "padding"
    stores = self._opened
    names = []
    for d, r in self.rows[rid]:
      if d >= 0:
        rec_id = stores[d][1][r].get("id", r) if stores else r
        names.append(f"{self.sources[d].name}:{rec_id}")
    return ", ".join(names)
