"""RadBench model mode: a checkpoint's greedy answers to a store split, batched, bucketed and sharded.

Everything model- and data-side is the project's own code: `checkpoint.load_model` (params restored onto
the mesh by the sharding rules), `data.tokenizer` (`build_prompt`, `decode`), `data.preprocess`
(deterministic images: no rng, so no random crop at test time), `sharding.make_mesh` and
`batch_generate.run` (the batching shared with the `radfm_jax.generate` CLI: records grouped by image
grid, sorted by prompt length, LEFT-padded to length buckets, image slots to slot buckets, rows to the
batch shards; then `generate.generate`, jitted KV-cache decoding). A row's prediction does not depend on
the other rows or on its padding (tests/test_eval_generation.py checks batch 1 against batch 8).

An LM-only checkpoint (`model_class` "llama") is run on the same prompts without their image blocks:
the text-only baseline. Records that cannot be run (unreadable volume, prompt too long, too many
images) are returned as `RowError`s and the run goes on.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from absl import logging

from eval.tasks import Item
from radfm_jax import batch_generate, checkpoint, sharding
from radfm_jax.batch_generate import TEXT_ONLY
from radfm_jax.data import preprocess
from radfm_jax.data import tokenizer as tokenizer_lib
from radfm_jax.data.schema import TASKS, RowError
from radfm_jax.data.store import Store


@dataclasses.dataclass
class Prepared(batch_generate.Request):
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
      batch_generate.check_length(prompt, max_prompt)
    except (ValueError, KeyError) as e:
      errors.append(RowError(str(store.root), rid, str(e)))
      continue
    out.append(Prepared(index=i, prompt=prompt, group=group, n_images=len(keys), record=rec, keys=keys))
  return out, errors


def predict(model, cfg, records: Sequence[dict[str, Any]], store: Store, *, mesh, batch_size: int = 8,
            max_new_tokens: int = 128, prompt_buckets: Sequence[int] | None = None,
            ) -> tuple[list[Item], list[RowError], dict[str, Any]]:
  """Greedy predictions for `records` (see the module doc). Returns items in record order."""
  from radfm_jax.models.llama import Llama  # pylint: disable=import-outside-toplevel
  text_only = isinstance(model, Llama)
  if "data" not in cfg:
    raise ValueError("the checkpoint's config has no data section (tokenizer, image sizes)")
  tok = tokenizer_lib.Tokenizer.from_config(cfg.data, cfg.model)
  spec = preprocess.ImageSpec.from_config(cfg.data)
  shapes = batch_generate.shapes_for(cfg.data, cfg.model, max_new_tokens, prompt_buckets)
  prepared, errors = prepare(records, store, tok, spec, max_prompt=shapes.max_prompt, text_only=text_only)

  def load_images(p: Prepared, grid):  # every process reads every row: failures are known everywhere
    return preprocess.prepare_sample([store.read_volume(k) for k in p.keys],
                                     [store.volume_meta(k) for k in p.keys], spec, rng=None,
                                     names=[f"{store.root}:{k}" for k in p.keys], grid=grid)

  ids, failed, run_info = batch_generate.run(model, prepared, load_images, mesh=mesh, tok=tok, spec=spec,
                                             shapes=shapes, batch_size=batch_size,
                                             max_new_tokens=max_new_tokens)
  errors += [RowError(str(store.root), records[i].get("id", i), reason) for i, reason in failed.items()]
  outputs = {i: tok.decode(x) for i, x in ids.items()}
  items = []
  for i, rec in enumerate(records):
    if i not in outputs:
      continue
    items.append(Item(id=str(rec.get("id", i)), task=rec["task"], question=rec.get("question", ""),
                      answer=rec.get("answer", ""), prediction=outputs[i], meta=dict(rec.get("meta") or {}),
                      source=str(rec.get("source", ""))))
  info = {"mode": "model", "text_only": text_only, "records": len(records), "predicted": len(items),
          "batch_size": batch_size, "max_new_tokens": max_new_tokens, **run_info, "mesh": dict(mesh.shape)}
  logging.info("predicted %d of %d records", len(items), len(records))
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
