"""RadBench model mode: a checkpoint's greedy answers to a store split, as scorable `Item`s.

The generation itself is `radfm_jax.inference.split` (batched, bucketed, sharded KV-cache decoding shared
with the `radfm_jax.generate` CLI and the demo); this module turns its outputs into `eval.tasks.Item`s. A
row's prediction does not depend on the other rows or on its padding (tests/test_eval_generation.py
checks batch 1 against batch 8). An LM-only checkpoint ("llama") gives the text-only baseline.
"""
from __future__ import annotations

from typing import Any, Sequence

from eval.tasks import Item
from radfm_jax.data.schema import RowError
from radfm_jax.data.store import Store
from radfm_jax.inference import split as split_lib


def predict(model, cfg, records: Sequence[dict[str, Any]], store: Store, *, mesh, batch_size: int = 8,
            max_new_tokens: int = 128, prompt_buckets: Sequence[int] | None = None,
            ) -> tuple[list[Item], list[RowError], dict[str, Any]]:
  """Greedy predictions for `records`, as items in record order (records that failed are errors)."""
  outputs, errors, info = split_lib.predict_records(model, cfg, records, store, mesh=mesh,
                                                    batch_size=batch_size, max_new_tokens=max_new_tokens,
                                                    prompt_buckets=prompt_buckets)
  items = [Item(id=str(rec.get("id", i)), task=rec["task"], question=rec.get("question", ""),
                answer=rec.get("answer", ""), prediction=outputs[i], meta=dict(rec.get("meta") or {}),
                source=str(rec.get("source", "")))
           for i, rec in enumerate(records) if i in outputs]
  info["predicted"] = len(items)
  return items, errors, info


def predict_store(ckpt: str, store_root: str, split: str, *, tasks: Sequence[str] | None = None,
                  limit: int = 0, batch_size: int = 8, max_new_tokens: int = 128,
                  mesh_cfg: dict[str, int] | None = None,
                  ) -> tuple[list[Item], list[RowError], dict[str, Any]]:
  """Loads the checkpoint onto a mesh (cfg.mesh, or `mesh_cfg`) and predicts a store split."""
  store = Store.open(store_root)
  records = split_lib.split_records(store, split, tasks, limit)
  model, cfg, mesh = split_lib.load(ckpt, mesh_cfg)
  items, errors, info = predict(model, cfg, records, store, mesh=mesh, batch_size=batch_size,
                                max_new_tokens=max_new_tokens)
  info.update(checkpoint=ckpt, store=store_root, split=split)
  return items, errors, info
