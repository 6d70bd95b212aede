"""A checkpoint's greedy answers to the records of a store split, batched, bucketed and sharded.

Everything is the project's own code: `checkpoint.load_model` (params restored onto the mesh by the
sharding rules), `data.tokenizer` (`build_prompt`, `decode`), `data.preprocess` (deterministic images: no
rng, so no random crop at test time) and `inference.batching.run` (records grouped by image grid, sorted
by prompt length, LEFT-padded to length buckets, image slots to slot buckets, rows to the batch shards;
then `inference.decoding.generate`). A row's prediction does not depend on the other rows or on its
padding. An LM-only model is run on the same prompts without their image blocks (the text-only
baseline). Records that cannot be run (unreadable volume, prompt too long, too many images) are
returned as `RowError`s and the run goes on. RadBench (`eval/generation.py`) and the demo use it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from absl import logging

from radfm_jax import checkpoint, models, sharding
from radfm_jax.data import preprocess
from radfm_jax.data import tokenizer as tokenizer_lib
from radfm_jax.data.schema import TASKS, RowError
from radfm_jax.data.store import Store
from radfm_jax.inference import batching
from radfm_jax.inference.batching import TEXT_ONLY


@dataclasses.dataclass
class Prepared(batching.Request):
  """A record as a generation request (index = position in the record list); payload unused."""
  record: dict[str, Any] = dataclasses.field(default_factory=dict)
  keys: list[str] = dataclasses.field(default_factory=list)   # store volume keys of its images


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
      batching.check_length(prompt, max_prompt)
    except (ValueError, KeyError) as e:
      errors.append(RowError(str(store.root), rid, str(e)))
      continue
    out.append(Prepared(index=i, prompt=prompt, group=group, n_images=len(keys), record=rec, keys=keys))
  return out, errors


def predict_records(model, cfg, records: Sequence[dict[str, Any]], store: Store, *, mesh,
                    batch_size: int = 8, max_new_tokens: int = 128,
                    prompt_buckets: Sequence[int] | None = None,
                    ) -> tuple[dict[int, str], list[RowError], dict[str, Any]]:
  """({record index: prediction}, errors, run info) for `records` (see the module doc)."""
  text_only = not models.takes_images(model)
  if "data" not in cfg:
    raise ValueError("the checkpoint's config has no data section (tokenizer, image sizes)")
  tok = tokenizer_lib.Tokenizer.from_config(cfg.data, cfg.model)
  spec = preprocess.ImageSpec.from_config(cfg.data)
  shapes = batching.shapes_for(cfg.data, cfg.model, max_new_tokens, prompt_buckets)
  prepared, errors = prepare(records, store, tok, spec, max_prompt=shapes.max_prompt, text_only=text_only)

  def load_images(p: Prepared, grid):  # every process reads every row: failures are known everywhere
    return preprocess.prepare_sample([store.read_volume(k) for k in p.keys],
                                     [store.volume_meta(k) for k in p.keys], spec, rng=None,
                                     names=[f"{store.root}:{k}" for k in p.keys], grid=grid)

  ids, failed, run_info = batching.run(model, prepared, load_images, mesh=mesh, tok=tok, spec=spec,
                                       shapes=shapes, batch_size=batch_size, max_new_tokens=max_new_tokens)
  errors += [RowError(str(store.root), records[i].get("id", i), reason) for i, reason in failed.items()]
  outputs = {i: tok.decode(x) for i, x in ids.items()}
  info = {"mode": "model", "text_only": text_only, "records": len(records), "predicted": len(outputs),
          "batch_size": batch_size, "max_new_tokens": max_new_tokens, **run_info, "mesh": dict(mesh.shape)}
  logging.info("predicted %d of %d records", len(outputs), len(records))
  return outputs, errors, info


def split_records(store: Store, split: str, tasks: Sequence[str] | None = None, limit: int = 0
                  ) -> list[dict[str, Any]]:
  """The records of a store split (only `tasks`, at most `limit`); an error when there are none."""
  for t in tasks or ():
    if t not in TASKS:
      raise ValueError(f"--tasks: {t!r} is not one of {TASKS}")
  records = [r for r in store.records(split=split) if not tasks or r["task"] in tasks]
  if limit:
    records = records[:limit]
  if not records:
    raise ValueError(f"{store.root}: no {split} records (tasks={list(tasks or [])})")
  return records


def load(ckpt: str, mesh_cfg: dict[str, int] | None = None):
  """(model, cfg, mesh): the checkpoint restored onto `sharding.inference_mesh` (cfg.mesh or mesh_cfg)."""
  cfg = checkpoint.load_config(ckpt)
  mesh = sharding.inference_mesh(mesh_cfg or cfg.get("mesh"))
  model, cfg = checkpoint.load_model(ckpt, mesh=mesh)
  return model, cfg, mesh
