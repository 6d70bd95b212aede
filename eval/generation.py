"""RadBench model mode: a checkpoint's greedy answers to a store split, batched, bucketed and sharded.

Everything model- and data-side is the project's own code: `checkpoint.load_model` (params restored onto
the mesh by the sharding rules), `data.tokenizer` (`build_prompt`, `decode`), `data.preprocess`
(deterministic images: no rng, so no random crop at test time), `data.collate.bucket`,
`sharding.make_mesh` / `batch_sharding`, and `generate.generate` (jitted KV-cache decoding).

Batching: records are grouped by image grid (`preprocess.sample_depth`: the 2D grid or a 3D depth
bucket), sorted by prompt length inside a group and cut into batches of `batch_size` rows. Prompts are
LEFT-padded to a length bucket, image slots padded to a slot bucket, and the rows padded with dummy
rows to `batch_size` rounded up to the number of batch shards (data x fsdp), so the number of compiled
shapes is at most groups x length buckets x slot buckets. A row's prediction does not depend on the
other rows or on its padding (tests/test_eval_generation.py checks batch 1 against batch 8).

An LM-only checkpoint (`model_class` "llama") is run on the same prompts without their image blocks:
the text-only baseline. Records that cannot be run (unreadable volume, prompt too long, too many
images) are returned as `RowError`s and the run goes on.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging

from eval.tasks import Item
from radfm_jax import checkpoint, generate, sharding
from radfm_jax.data import collate, preprocess
from radfm_jax.data import tokenizer as tokenizer_lib
from radfm_jax.data.schema import TASKS, RowError
from radfm_jax.data.store import Store

TEXT_ONLY = -1  # group id of records without images


@dataclasses.dataclass
class Prepared:
  index: int                 # position in the record list
  record: dict[str, Any]
  prompt: list[int]
  group: int                 # preprocess.sample_depth (0 = 2D grid) or TEXT_ONLY
  keys: list[str]


def prepare(records: Sequence[dict[str, Any]], store: Store, tok: tokenizer_lib.Tokenizer,
            spec: preprocess.ImageSpec, *, max_prompt: int, text_only: bool
            ) -> tuple[list[Prepared], list[RowError]]:
  """Prompt ids and image group of each record (images are read later, batch by batch)."""
  out, errors = [], []
  for i, rec in enumerate(records):
    rid = rec.get("id", i)
    try:
      if rec.get("task") not in TASKS:
        raise ValueError(f"task {rec.get('task')!r} is not one of {TASKS}")
      if text_only:
        rec_in, keys, group = {**rec, "images": []}, [], TEXT_ONLY
      else:
        keys = [im["key"] for im in rec.get("images", [])]
        metas = [store.volume_meta(k) for k in keys]
        group = preprocess.sample_depth([m["shape"] for m in metas], metas, spec) if keys else TEXT_ONLY
        rec_in = rec
      prompt = tok.build_prompt(rec_in)
      if len(prompt) > max_prompt:
        raise ValueError(f"prompt of {len(prompt)} tokens exceeds {max_prompt} (lm.max_len - max_new_tokens)")
    except (ValueError, KeyError) as e:
      errors.append(RowError(str(store.root), rid, str(e)))
      continue
    out.append(Prepared(i, rec, prompt, group, keys))
  return out, errors


def plan_batches(prepared: Sequence[Prepared], batch_size: int) -> list[list[Prepared]]:
  """Group by image grid, sort by prompt length (stable), cut into batches of batch_size."""
  batches = []
  for group in sorted({p.group for p in prepared}):
    members = sorted((p for p in prepared if p.group == group), key=lambda p: (len(p.prompt), p.index))
    batches += [members[i:i + batch_size] for i in range(0, len(members), batch_size)]
  return batches


def _buckets(values: Sequence[int] | None, top: int) -> tuple[int, ...]:
  return tuple(sorted({int(v) for v in (values or ()) if 0 < int(v) < top} | {top}))


def build_batch(rows: Sequence[Prepared], *, num_rows: int, prompt_len: int, slots: int,
                grid: tuple[int, int, int] | None, pad_id: int, bos_id: int) -> dict[str, np.ndarray]:
  """Host arrays of one batch: LEFT-padded prompts; dummy rows (just BOS) fill up to num_rows.
  Images are filled in by the caller (`images` zeros [num_rows, slots, *grid, 3])."""
  ids = np.full((num_rows, prompt_len), pad_id, np.int32)
  mask = np.zeros((num_rows, prompt_len), bool)
  ids[:, -1], mask[:, -1] = bos_id, True  # dummy rows
  for r, p in enumerate(rows):
    ids[r, prompt_len - len(p.prompt):] = p.prompt
    mask[r] = False
    mask[r, prompt_len - len(p.prompt):] = True
  batch = {"prompt_ids": ids, "prompt_mask": mask}
  if grid is not None:
    batch["images"] = np.zeros((num_rows, slots, *grid, 3), np.float32)
    batch["image_mask"] = np.zeros((num_rows, slots), bool)
  return batch


def _global(x: np.ndarray, mesh, local: slice) -> jax.Array:
  """This process's rows of a host array -> a global array sharded over (data, fsdp)."""
  return jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, x.ndim), x[local])


def _gather(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def predict(model, cfg, records: Sequence[dict[str, Any]], store: Store, *, mesh, batch_size: int = 8,
            max_new_tokens: int = 128, prompt_buckets: Sequence[int] | None = None,
            ) -> tuple[list[Item], list[RowError], dict[str, Any]]:
  """Greedy predictions for `records` (see the module doc). Returns items in record order."""
  from radfm_jax.models.llama import Llama  # pylint: disable=import-outside-toplevel
  text_only = isinstance(model, Llama)
  if "data" not in cfg:
    raise ValueError("the checkpoint's config has no data section (tokenizer, image sizes)")
  data_cfg = cfg.data
  tok = tokenizer_lib.Tokenizer.from_config(data_cfg, cfg.model)
  spec = preprocess.ImageSpec.from_config(data_cfg)
  max_prompt = int(cfg.model.lm.max_len) - int(max_new_tokens)
  if max_prompt < 2:
    raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in lm.max_len="
                     f"{cfg.model.lm.max_len}")
  len_buckets = _buckets(prompt_buckets or data_cfg.get("len_buckets"), max_prompt)
  slot_buckets = _buckets(data_cfg.get("slot_buckets"), max(int(cfg.model.get("max_images", 1)), 1))
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  num_rows = -(-batch_size // shards) * shards
  local = slice(jax.process_index() * num_rows // jax.process_count(),
                (jax.process_index() + 1) * num_rows // jax.process_count())
  prepared, errors = prepare(records, store, tok, spec, max_prompt=max_prompt, text_only=text_only)
  outputs: dict[int, str] = {}
  shapes, t0, new_tokens = set(), time.time(), 0
  for rows in plan_batches(prepared, batch_size):
    group = rows[0].group
    grid = None if group == TEXT_ONLY else preprocess.grid_of(group, spec)
    slots = collate.bucket(max(len(p.keys) for p in rows), slot_buckets) if grid else 0
    plen = collate.bucket(max(len(p.prompt) for p in rows), len_buckets)
    batch = build_batch(rows, num_rows=num_rows, prompt_len=plen, slots=slots, grid=grid,
                        pad_id=tok.pad_id, bos_id=tok.bos_id)
    ok = list(range(len(rows)))
    if grid is not None:
      for r, p in enumerate(rows):  # every process reads every row: failures are known everywhere
        try:
          vols = [store.read_volume(k) for k in p.keys]
          metas = [store.volume_meta(k) for k in p.keys]
          batch["images"][r, :len(vols)] = preprocess.prepare_sample(
              vols, metas, spec, rng=None, names=[f"{store.root}:{k}" for k in p.keys], grid=grid)
          batch["image_mask"][r, :len(vols)] = True
        except Exception as e:  # pylint: disable=broad-except  (a batch job records and goes on)
          errors.append(RowError(str(store.root), p.record.get("id", p.index),
                                 f"unreadable image ({type(e).__name__}: {e})"))
          ok.remove(r)
          batch["prompt_ids"][r], batch["prompt_mask"][r] = tok.pad_id, False
          batch["prompt_ids"][r, -1], batch["prompt_mask"][r, -1] = tok.bos_id, True
    shapes.add((group, plen, slots))
    images = image_mask = None
    if grid is not None:
      images = _global(batch["images"], mesh, local)
      image_mask = batch["image_mask"]
    with jax.set_mesh(mesh):
      out = generate.generate(model, batch["prompt_ids"], batch["prompt_mask"], images, image_mask,
                              max_new_tokens=max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id)
    ids = _gather(out)
    for r in ok:
      trimmed = generate.trim(ids[r:r + 1], tok.eos_id)[0]
      new_tokens += len(trimmed)
      outputs[rows[r].index] = tok.decode(trimmed)
  seconds = time.time() - t0
  items = []
  for i, rec in enumerate(records):
    if i not in outputs:
      continue
    items.append(Item(id=str(rec.get("id", i)), task=rec["task"], question=rec.get("question", ""),
                      answer=rec.get("answer", ""), prediction=outputs[i], meta=dict(rec.get("meta") or {}),
                      source=str(rec.get("source", ""))))
  info = {"mode": "model", "text_only": text_only, "records": len(records), "predicted": len(items),
          "batch_size": batch_size, "rows_per_batch": num_rows, "max_new_tokens": max_new_tokens,
          "compiled_shapes": len(shapes), "generate_seconds": round(seconds, 2),
          "new_tokens": new_tokens, "mesh": dict(mesh.shape)}
  logging.info("generated %d answers in %.1f s (%d shapes)", len(items), seconds, len(shapes))
  return items, errors, info


def predict_store(ckpt: str, store_root: str, split: str, *, tasks: Sequence[str] | None = None,
                  limit: int = 0, batch_size: int = 8, max_new_tokens: int = 128,
                  mesh_cfg: dict[str, int] | None = None,
                  ) -> tuple[list[Item], list[RowError], dict[str, Any]]:
  """Loads the checkpoint onto a mesh (cfg.mesh, or `mesh_cfg`) and predicts a store split."""
  for t in tasks or ():
    if t not in TASKS:
      raise ValueError(f"--tasks: {t!r} is not one of {TASKS}")
  cfg = checkpoint.load_config(ckpt)
  mesh = sharding.make_mesh(mesh_cfg or cfg.get("mesh") or {"data": -1})
  model, cfg = checkpoint.load_model(ckpt, mesh=mesh)
  store = Store.open(store_root)
  records = [r for r in store.records(split=split) if not tasks or r["task"] in tasks]
  if limit:
    records = records[:limit]
  if not records:
    raise ValueError(f"{store_root}: no {split} records (tasks={list(tasks or [])})")
  items, errors, info = predict(model, cfg, records, store, mesh=mesh, batch_size=batch_size,
                                max_new_tokens=max_new_tokens)
  info.update(checkpoint=ckpt, store=store_root, split=split)
  return items, errors, info
