"""The exact programs a run compiles, built by the functions the run itself uses, ready to lower.

Train step: `training.state.make_layout` + `training.step.make_train_step` + `jit_step` on
`training.step.abstract_batch` of each data bucket (`training.data.buckets`); eval step:
`training.step.jit_eval_step` on the same buckets with eval labels; generation:
`inference.decoding.lower` (prefill + decode loop, greedy) at the eval batch of the bucket's image group.
Nothing here re-implements a step: a change to the run changes what is planned.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import ml_collections
from flax import nnx

from radfm_jax import models
from radfm_jax import sharding
from radfm_jax.inference import batching
from radfm_jax.inference import decoding
from radfm_jax.training import data as train_data
from radfm_jax.training import metrics
from radfm_jax.training import state as train_state
from radfm_jax.training import step as train

KINDS = ("train", "eval", "generate")


@dataclasses.dataclass
class Program:
  name: str                           # e.g. train/2d_s10_t2048
  kind: str                           # train | eval | generate
  bucket: train_data.Bucket
  lower: Callable[[], Any]            # -> jax.stages.Lowered
  model_flops: float                  # analytic (metrics.train_flops / forward_flops), whole step
  tokens: int                         # text tokens (padded) per step
  images: int                         # image slots per step
  info: dict[str, Any] = dataclasses.field(default_factory=dict)


def _image_shape(bucket: train_data.Bucket) -> tuple[int, int, int, int]:
  return (bucket.slots, *bucket.grid)


def build(cfg: ml_collections.ConfigDict, mesh, *, kinds: Sequence[str] = KINDS, all_buckets: bool = False,
          max_new_tokens: int = 64, layout: train_state.Layout | None = None,
          buckets: Sequence[train_data.Bucket] | None = None) -> list[Program]:
  """The programs of `cfg` on `mesh`: for each bucket (`buckets`, else all of them or the largest of
  each batch size), the train step, the eval step and generation (as `kinds` selects)."""
  bad = set(kinds) - set(KINDS)
  if bad:
    raise ValueError(f"unknown program kinds {sorted(bad)}; expected some of {KINDS}")
  if layout is None and set(kinds) & {"train", "eval"}:
    layout = train_state.make_layout(cfg, mesh)
  towers = train_state.trainable_towers(layout.abstract["params"]) if layout else {}
  n_micro = int(cfg.get("microbatches", 1))
  out = []
  if buckets is None:
    buckets = train_data.buckets(cfg, largest_only=not all_buckets)
  for bucket in buckets:
    ishape = _image_shape(bucket)
    tokens, images = bucket.rows * bucket.length, bucket.rows * bucket.slots
    if "train" in kinds:
      batch = train.abstract_batch(cfg, mesh, bucket)
      fn = train.jit_step(train.make_train_step(layout, cfg), layout, batch)
      out.append(Program(
          f"train/{bucket.name}", "train", bucket, lambda fn=fn, batch=batch: fn.lower(layout.abstract, batch),
          metrics.train_flops(cfg.model, batch=bucket.rows, seq_len=bucket.length, image_shape=ishape,
                              trainable=towers), tokens, images, {"microbatches": n_micro}))
    if "eval" in kinds:
      batch = train.abstract_batch(cfg, mesh, bucket, eval_labels=True)
      fn = train.jit_eval_step(layout, cfg)
      fwd = metrics.forward_flops(cfg.model, batch=bucket.rows, seq_len=bucket.length, image_shape=ishape)
      out.append(Program(f"eval/{bucket.name}", "eval", bucket,
                         lambda fn=fn, batch=batch: fn.lower(layout.abstract, batch),
                         sum(fwd.values()), tokens, images))
    if "generate" in kinds:
      out.append(_generate_program(cfg, mesh, bucket, max_new_tokens))
  return out


def _generate_program(cfg, mesh, bucket: train_data.Bucket, max_new_tokens: int) -> Program:
  """Generation as `generate` runs it on a checkpoint loaded onto `mesh` (parameters in the model's
  param_dtype, sharded by the rules), at `inference.batching`'s row count for the bucket's batch size."""
  shapes = batching.shapes_for(cfg.data, cfg.model, max_new_tokens)
  rows = batching.rows_per_batch(bucket.rows, mesh)
  plen = shapes.len_buckets[-1]
  model_cls = models.get(models.DEFAULT)
  graphdef, abstract = nnx.split(sharding.abstract_sharded(lambda: model_cls(cfg.model, rngs=nnx.Rngs(0)), mesh))
  channels = int(cfg.data.get("image_channels", 1))

  def lower():
    return decoding.lower(graphdef, abstract, rows=rows, prompt_len=plen, slots=bucket.slots,
                          grid=bucket.grid, channels=channels, max_new_tokens=max_new_tokens)

  ishape = _image_shape(bucket)
  prefill = sum(metrics.forward_flops(cfg.model, batch=rows, seq_len=plen, image_shape=ishape).values())
  c = cfg.model.lm
  per_token = metrics.forward_flops(cfg.model, batch=rows, seq_len=1, image_shape=None)["lm"]
  attn = rows * c.layers * 4.0 * c.heads * c.head_dim * (plen + max_new_tokens / 2)  # scores + values
  flops = prefill + max_new_tokens * (per_token + attn)
  return Program(f"generate/{bucket.name[:bucket.name.index('_')]}_s{bucket.slots}_p{plen}+{max_new_tokens}",
                 "generate", bucket, lower, flops, rows * (plen + max_new_tokens), rows * bucket.slots,
                 {"rows": rows, "prompt_len": plen, "max_new_tokens": max_new_tokens})
