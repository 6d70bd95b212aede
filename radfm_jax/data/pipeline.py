"""The Grain input pipeline: store records -> homogeneous, statically shaped, per-process numpy batches.

  it = make_pipeline(cfg.data, tokenizer, split="train", train=True, seed=cfg.seed)
  batch = next(it)            # dict of numpy arrays, this process's rows of the global batch
  state = it.get_state()      # save with the train state; it.set_state(state) on a fresh pipeline resumes

Batch keys (b = global batch / process_count rows, T text length bucket, S image-slot bucket):
  to device (collate.DEVICE_KEYS): inputs, targets, loss_mask, positions, segment_ids  int32 [b, T]
    (segment_ids 0 = padding), images float32 [b, S, H, W, D, C] in [0, 1] (C = image_channels, 1 by
    default: gray, replicated to vision.channels by the model on device), image_mask bool [b, S]
  host only (collate.HOST_KEYS): record_index int64 [b, P, 2] ((dataset, record) of each sample of a
    row, -1 unused; P = pack_max_samples or 1), num_skipped int32 [] (rows skipped in this batch).

How it is built (everything random-access until the last step, so the state is one index per worker):
1. Plan (main process, from the manifests only; no volume is read): every record gets a group, 0 for
   2D/text-only samples or its 3D depth bucket (preprocess.sample_depth). Records with more images than
   the tokenizer's slots are excluded and counted. Rows are single records, or with `pack` records
   first-fit packed (within a dataset and group, after a seeded shuffle) up to max_len tokens,
   max_images images and pack_max_samples samples.
2. One Grain MapDataset stream per (dataset, group) of row ids: seeded shuffle + repeat (training; a new
   permutation each epoch), batched to the *global* batch of that group. Training mixes the streams by
   weight (dataset weight x the group's share of the dataset, per batch); evaluation concatenates them
   in order (every record once; a last partial batch is padded with empty rows).
3. `collate.BatchBuilder` maps each global batch of row ids to this process's numpy batch (all processes
   see the same global batch, pick the same buckets and load only their own rows); training uses
   Grain's per-element rng (crops), so results do not depend on worker count or restarts.
4. to_iter_dataset (read threads + prefetch), then mp_prefetch to `workers` processes.
Shapes: at most (number of groups) x len(slot_buckets) x len(len_buckets); see configs/common_data.py.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
import grain
import jax
import numpy as np

from radfm_jax.data import collate
from radfm_jax.data import preprocess
from radfm_jax.data import tokenizer as tokenizer_lib


DEVICE_KEYS = collate.DEVICE_KEYS
HOST_KEYS = collate.HOST_KEYS


def device_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The keys the model step takes (the rest stay on the host)."""
  return {k: batch[k] for k in DEVICE_KEYS}


@dataclasses.dataclass
class Plan:
  """What the pipeline will read: sources, rows and the (dataset, group) streams."""
  sources: list[collate.SourceRef]
  weights: list[float]
  num_records: list[int]
  rows: np.ndarray          # [N, P, 2] int32 (dataset, record), -1 unused
  row_group: np.ndarray     # [N] int32: 0 = 2D grid, else the 3D depth bucket
  streams: list[tuple[int, int, np.ndarray]]  # (dataset, group, row ids)
  excluded: dict[str, int]
  len_buckets: tuple[int, ...]
  slot_buckets: tuple[int, ...]

  @property
  def groups(self) -> list[int]:
    return sorted({g for _, g, _ in self.streams})

  @property
  def max_shapes(self) -> int:
    """Upper bound on distinct batch shapes (hence compilations) this plan can produce."""
    return len(self.groups) * len(self.slot_buckets) * len(self.len_buckets)


def mixture(data_cfg: Any) -> list[tuple[str, str, float]]:
  """(name, store root, weight) of every dataset: data_cfg.mix, or the single data_cfg.store."""
  mix = data_cfg.mix or [{"name": "data", "store": data_cfg.store, "weight": 1.0}]
  out = []
  for i, m in enumerate(mix):
    if not m.get("store"):
      raise ValueError(f"data.mix[{i}] ({m.get('name', '?')}): no store root given")
    weight = float(m.get("weight", 1.0))
    if weight <= 0:
      raise ValueError(f"data.mix[{i}] ({m.get('name', '?')}): weight {weight} must be > 0")
    out.append((str(m.get("name", f"data{i}")), str(m["store"]), weight))
  return out


def _pack(order: np.ndarray, lengths: np.ndarray, images: np.ndarray, max_len: int, max_images: int,
          max_samples: int, window: int = 64) -> list[list[int]]:
  """First-fit (over the last `window` open rows) packing of records in `order`."""
  rows, room = [], []   # room: [tokens left, images left, samples left] per row
  for r in order:
    n, k = int(lengths[r]), int(images[r])
    for j in range(max(0, len(rows) - window), len(rows)):
      t, i, s = room[j]
      if n <= t and k <= i and s > 0:
        rows[j].append(int(r))
        room[j] = [t - n, i - k, s - 1]
        break
    else:
      rows.append([int(r)])
      room.append([max_len - n, max_images - k, max_samples - 1])
  return rows


def plan(data_cfg: Any, tokenizer: tokenizer_lib.Tokenizer, *, split: str, train: bool,
         seed: int) -> Plan:
  """Reads the manifests and builds rows and streams (see the module docstring)."""
  spec = preprocess.ImageSpec.from_config(data_cfg)
  tasks = tuple(data_cfg.tasks) if data_cfg.tasks else None
  pack = bool(data_cfg.pack)
  max_samples = int(data_cfg.pack_max_samples) if pack else 1
  sources, weights, num_records, excluded = [], [], [], {}
  all_rows, all_groups, streams = [], [], []
  for d, (name, root, weight) in enumerate(mixture(data_cfg)):
    src = collate.SourceRef(name=name, root=root, split=split, tasks=tasks)
    store, records = collate.open_records(src)
    sources.append(src)
    weights.append(weight)
    num_records.append(len(records))
    groups = np.zeros((len(records),), np.int32)
    keep = np.ones((len(records),), bool)
    lengths = np.zeros((len(records),), np.int64)
    n_images = np.zeros((len(records),), np.int64)
    for r, rec in enumerate(records):
      keys = [im["key"] for im in rec.get("images", [])]
      n_images[r] = len(keys)
      if len(keys) > tokenizer.max_images:
        keep[r] = False
        excluded["too_many_images"] = excluded.get("too_many_images", 0) + 1
        logging.warning("%s: record %r has %d images > %d slots; excluded", name, rec.get("id"), len(keys),
                        tokenizer.max_images)
        continue
      metas = [store.volume_meta(k) for k in keys]  # carries the stored "shape"
      groups[r] = preprocess.sample_depth([m["shape"] for m in metas], metas, spec)
      if pack:
        try:
          lengths[r] = int(tokenizer.build_example(rec, data_cfg.max_len, train=train)["length"])
        except ValueError as e:
          keep[r] = False
          excluded["too_long"] = excluded.get("too_long", 0) + 1
          logging.warning("%s: %s; excluded", name, e)
    rng = np.random.default_rng([seed, d])
    for g in sorted(set(groups[keep].tolist())):
      members = np.flatnonzero(keep & (groups == g))
      if pack:
        row_lists = _pack(rng.permutation(members), lengths, n_images, data_cfg.max_len,
                          tokenizer.max_images, max_samples)
      else:
        row_lists = [[int(r)] for r in members]
      start = sum(len(x) for x in all_rows)
      block = np.full((len(row_lists), max_samples, 2), -1, np.int32)
      for i, rl in enumerate(row_lists):
        block[i, :len(rl), 0] = d
        block[i, :len(rl), 1] = rl
      all_rows.append(block)
      all_groups.append(np.full((len(row_lists),), g, np.int32))
      streams.append((d, g, np.arange(start, start + len(row_lists), dtype=np.int64)))
  rows = np.concatenate(all_rows) if all_rows else np.zeros((0, max_samples, 2), np.int32)
  row_group = np.concatenate(all_groups) if all_groups else np.zeros((0,), np.int32)
  if not streams:
    raise ValueError(f"no {split} records in {[s.root for s in sources]} (tasks={tasks}, "
                     f"excluded={excluded})")
  return Plan(sources=sources, weights=weights, num_records=num_records, rows=rows, row_group=row_group,
              streams=streams, excluded=excluded,
              len_buckets=collate.buckets(data_cfg.len_buckets, int(data_cfg.max_len), "len_buckets"),
              slot_buckets=collate.buckets(data_cfg.slot_buckets, max(tokenizer.max_images, 1),
                                    "slot_buckets"))


def make_pipeline(data_cfg: Any, tokenizer: tokenizer_lib.Tokenizer, *, split: str, train: bool,
                  seed: int, process_index: int | None = None, process_count: int | None = None,
                  the_plan: Plan | None = None) -> grain.DatasetIterator:
  """A checkpointable iterator of this process's batches (see the module docstring)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  p = the_plan or plan(data_cfg, tokenizer, split=split, train=train, seed=seed)
  batch_size = int(data_cfg.batch_size)
  batch_size_3d = int(data_cfg.batch_size_3d)
  for name, gb in (("batch_size", batch_size), ("batch_size_3d", batch_size_3d)):
    if gb % process_count:
      raise ValueError(f"data.{name}={gb} is not divisible by the {process_count} processes")
  builder = collate.BatchBuilder(
      sources=p.sources, num_records=p.num_records, rows=p.rows, row_group=p.row_group,
      tokenizer=tokenizer, spec=preprocess.ImageSpec.from_config(data_cfg), max_len=int(data_cfg.max_len),
      len_buckets=p.len_buckets, slot_buckets=p.slot_buckets, batch_size=batch_size,
      batch_size_3d=batch_size_3d, train=train, on_corrupt=data_cfg.on_corrupt,
      process_index=process_index, process_count=process_count)
  streams, weights = [], []
  rows_per_dataset = [sum(len(r) for d2, _, r in p.streams if d2 == d) for d in range(len(p.sources))]
  for k, (d, g, row_ids) in enumerate(p.streams):
    ds = grain.MapDataset.source(row_ids)
    gb = batch_size if g == 0 else batch_size_3d
    if train:
      ds = ds.shuffle(seed=(int(seed) * 1_000_003 + 7919 * k) % 2**32).repeat()
    streams.append(ds.batch(gb, drop_remainder=train))
    # Per batch: the dataset's weight x this stream's share of the dataset's rows / rows per batch.
    weights.append(p.weights[d] * len(row_ids) / rows_per_dataset[d] / gb)
  if train:
    ds = grain.MapDataset.mix(streams, weights) if len(streams) > 1 else streams[0]
    ds = ds.random_map(builder, seed=int(seed) % 2**32)
  else:
    ds = grain.MapDataset.concatenate(streams) if len(streams) > 1 else streams[0]
    ds = ds.map(builder)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(data_cfg.read_threads),
                                            prefetch_buffer_size=int(data_cfg.prefetch)))
  workers = int(data_cfg.workers)
  if workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=int(data_cfg.worker_buffer)))
  logging.info("pipeline %s: %d rows in %d streams, groups %s, <= %d shapes, excluded %s", split,
               len(p.rows), len(p.streams), p.groups, p.max_shapes, p.excluded)
  return iter(it)
