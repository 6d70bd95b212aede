"""Data for radfm_jax.train: the training stream and validation batches from radfm_jax.data.pipeline.

Demo data on demand: a data config with a `demo` section (`out`, `n`, `seed`; see configs/demo_store.py)
names a demo store that is built (radfm_jax.data.demo) when missing, together with a SentencePiece
tokenizer of the model's text vocabulary size trained on its text. Process 0 builds under a file lock
(parallel test workers share one build); other processes wait for it.

Validation batches carry host-side labels from the records' meta (schema.py): `closed`,
`image_dependent` and `example_mask` (False for padding rows), so `train.evaluate` can report
closed-question accuracy overall and on image-dependent questions.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from radfm_jax import paths
from radfm_jax.data import collate
from radfm_jax.data import demo as demo_lib
from radfm_jax.data import store as store_lib
from radfm_jax.data import pipeline
from radfm_jax.data import preprocess
from radfm_jax.data import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class Bucket:
  """One static batch shape the pipeline can produce: image group (0 = 2D grid, else the 3D depth
  bucket), global rows, image slots, text length and the (H, W, D) image grid."""
  group: int
  rows: int
  slots: int
  length: int
  grid: tuple[int, int, int]

  @property
  def name(self) -> str:
    return f"{'2d' if self.group == 0 else f'3d{self.group}'}_s{self.slots}_t{self.length}"


def buckets(cfg: ml_collections.ConfigDict, *, largest_only: bool = False) -> list[Bucket]:
  """Every batch shape `cfg.data` can produce (pipeline.plan's buckets: the 2D group and each depth
  bucket x slot buckets x length buckets), largest first within a group. `largest_only`: per batch
  size, the group with the largest images at the largest slots and length (memory grows with each of
  them, so these bound every other shape: the 2D group and the deepest 3D group)."""
  d = cfg.data
  spec = preprocess.ImageSpec.from_config(d)
  # collate.buckets: the same normalisation the pipeline applies (values below top, plus top).
  lengths = collate.buckets(d.get("len_buckets"), int(d.max_len), "len_buckets")
  slots = collate.buckets(d.get("slot_buckets"), max(int(cfg.model.max_images), 1), "slot_buckets")
  groups = [0] + list(spec.depth_buckets)
  if largest_only:
    groups = [0, spec.depth_buckets[-1]]
    slots, lengths = slots[-1:], lengths[-1:]
  b2, b3 = int(d.batch_size), int(d.get("batch_size_3d") or d.batch_size)
  return [Bucket(g, b2 if g == 0 else b3, s, t, preprocess.grid_of(g, spec))
          for g in groups for s in reversed(slots) for t in reversed(lengths)]


@contextlib.contextmanager
def _file_lock(path: str):
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def ensure_demo_data(data_cfg: ml_collections.ConfigDict, vocab_size: int) -> None:
  """Builds the demo store and its tokenizer when `data_cfg.demo` is set and they are missing."""
  demo = data_cfg.get("demo")
  if not demo:
    return
  if jax.process_index() == 0:
    with _file_lock(os.path.abspath(demo.out) + ".lock"):
      _build_demo(data_cfg, demo, vocab_size)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("radfm_jax.training.data.ensure_demo_data")


def _build_demo(data_cfg, demo, vocab_size: int) -> None:
  try:
    store_lib.Store.open(data_cfg.store)
  except FileNotFoundError:
    logging.info("Building the demo store (n=%d, seed=%d) in %s", demo.n, demo.seed, demo.out)
    report = demo_lib.make_demo(demo.out, n=int(demo.n), seed=int(demo.seed))
    if report["n_failed"]:
      raise RuntimeError(f"demo store build in {demo.out} had {report['n_failed']} failures")
  if not paths.path(data_cfg.tokenizer).exists():  # local or gs://
    prefix = data_cfg.tokenizer[:-len(".model")] if data_cfg.tokenizer.endswith(".model") else data_cfg.tokenizer
    logging.info("Training a %d-piece tokenizer on %s -> %s", vocab_size, data_cfg.store, data_cfg.tokenizer)
    tokenizer_lib.train_tokenizer(data_cfg.store, prefix, vocab_size)


class TrainData:
  """The run's tokenizer, training iterator and validation batches."""

  def __init__(self, cfg: ml_collections.ConfigDict):
    self.cfg = cfg
    ensure_demo_data(cfg.data, int(cfg.model.vocab_size))
    self.tokenizer = tokenizer_lib.Tokenizer.from_config(cfg.data, cfg.model)
    self.has_eval = bool(cfg.data.eval_split)
    self._plans: dict[str, Any] = {}     # split -> eval plan

  def train_iterator(self, seed_offset: int = 0) -> Any:
    """A checkpointable iterator of this process's training batches (seeded by cfg.seed + offset)."""
    return pipeline.make_pipeline(self.cfg.data, self.tokenizer, split=self.cfg.data.train_split,
                                  train=True, seed=int(self.cfg.seed) + seed_offset)

  def _eval_cfg(self) -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict(self.cfg.data.to_dict())
    d.pack = False     # one example per row: per-example scores
    d.workers = 0      # short passes: no worker start-up
    return d

  def eval_records(self, split: str | None = None) -> list[list[dict]]:
    """The records behind `record_index` of `eval_batches(split)`: [source][record] (for reports that
    need more than the batch's eval labels, e.g. the demo's per-template table)."""
    return [collate.open_records(src)[1] for src in self._plan(split or self.cfg.data.eval_split).sources]

  def _plan(self, split: str):
    if split not in self._plans:
      self._plans[split] = pipeline.plan(self._eval_cfg(), self.tokenizer, split=split, train=False, seed=0)
    return self._plans[split]

  def eval_batches(self, split: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One pass over a split (default: the validation split; at most cfg.eval_batches batches), with
    eval labels."""
    split = split or self.cfg.data.eval_split
    plan = self._plan(split)
    it = pipeline.make_pipeline(self._eval_cfg(), self.tokenizer, split=split, train=False, seed=0,
                                the_plan=plan)
    limit = int(self.cfg.eval_batches)
    for i, batch in enumerate(it):
      if limit and i >= limit:
        break
      yield batch  # eval labels (example_mask, closed, image_dependent) are host keys of the batch
