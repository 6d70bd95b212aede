"""Shared steps of every conversion: abstract target params, torch-layout -> checkpoint, checkpoint ->
torch-layout tensors, and writers (safetensors shards, torch pickle)."""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from radfm_jax import checkpoint, sharding
from radfm_jax.convert.mapping import Layout, Report, check_source, export_params, import_params
from radfm_jax.convert.sources import Source, numpy_to_torch


def abstract_params(cfg: ml_collections.ConfigDict, model_class: str, mesh: jax.sharding.Mesh | None,
                    ) -> dict[str, jax.ShapeDtypeStruct]:
  """{'a/b/kernel': ShapeDtypeStruct (with the mesh's sharding)} for the model `cfg.model` builds."""
  model = checkpoint.abstract_model(cfg, model_class, mesh)
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {"/".join(map(str, k)): v.get_value() for k, v in flat}


def default_mesh(cfg: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """cfg.mesh when the config has one, else fsdp over all devices (`sharding.inference_mesh`)."""
  return sharding.inference_mesh(cfg.get("mesh"))


def torch_to_checkpoint(source: Source, layout: Layout, cfg: ml_collections.ConfigDict, model_class: str,
                        dst: str, *, mesh: jax.sharding.Mesh | None = None, dtype: Any = None,
                        extra: Mapping[str, Any] | None = None, overwrite: bool = False) -> Report:
  """Converts `source` tensor by tensor onto `mesh` (cast to `dtype`; cfg.model.param_dtype records it)
  and saves a self-describing checkpoint at `dst`. Returns the key report."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())  # never mutate the caller's config
  if dtype is not None:
    cfg.model.param_dtype = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
  abstract = abstract_params(cfg, model_class, mesh)
  done = [0]

  def progress(path: str, arr: jax.Array) -> None:
    done[0] += 1
    logging.info("converted %d/%d %s %s %s", done[0], len(abstract), path, arr.shape, arr.dtype)

  params, report = import_params(source, layout, abstract, on_param=progress)
  logging.info("%s: %s", source.name, report.summary())
  checkpoint.save_model(dst, params, cfg, model_class=model_class, overwrite=overwrite,
                        extra={"converted_from": source.name, **dict(extra or {}),
                               "dropped_keys": len(report.dropped)})
  return report


def dry_run(source: Source, layout: Layout, cfg: ml_collections.ConfigDict, model_class: str) -> list[str]:
  """Checks every key and shape of `source` against the model `cfg` builds, reading no tensor data.
  Returns the problems found ([] = converts cleanly)."""
  return check_source(source, layout, abstract_params(cfg, model_class, None))


class CheckpointParams(Mapping):
  """A checkpoint's params read lazily as host numpy arrays.

  Reads come in batches of up to `batch_bytes` following `order` (one partial restore per batch, not
  per param); a param is dropped from the cache once handed out, so memory stays ~batch_bytes.
  """

  def __init__(self, ckpt_dir: str, prefix: str = "", order: Iterable[str] = (),
               batch_bytes: int = 1 << 30):
    self.ckpt_dir, self.prefix, self.batch_bytes = ckpt_dir, prefix, batch_bytes
    meta = checkpoint.param_metadata(ckpt_dir)
    self.shapes = {p[len(prefix):]: tuple(m.shape) for p, m in meta.items() if p.startswith(prefix)}
    self._nbytes = {p[len(prefix):]: int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize
                    for p, m in meta.items() if p.startswith(prefix)}
    if not self.shapes:
      raise ValueError(f"{ckpt_dir}: no parameters under {prefix!r}")
    order = [p for p in order if p in self.shapes]
    self._order = order + [p for p in self.shapes if p not in set(order)]
    self._cache: dict[str, np.ndarray] = {}

  def __getitem__(self, path: str) -> np.ndarray:
    if path not in self.shapes:
      raise KeyError(f"{self.ckpt_dir}: no parameter {self.prefix + path!r}")
    if path not in self._cache:
      batch, size = [path], self._nbytes[path]
      for p in self._order[self._order.index(path) + 1:]:
        if size + self._nbytes[p] > self.batch_bytes:
          break
        if p not in self._cache:
          batch.append(p)
          size += self._nbytes[p]
      got = checkpoint.read_params(self.ckpt_dir, [self.prefix + p for p in batch])
      self._cache.update({p: got[self.prefix + p] for p in batch})
    return self._cache.pop(path)

  def __iter__(self):
    return iter(self.shapes)

  def __len__(self) -> int:
    return len(self.shapes)


def checkpoint_to_torch(ckpt_dir: str, layout: Layout, prefix: str = "", dtype: Any = None,
                        ) -> Iterator[tuple[str, np.ndarray]]:
  """(torch key, tensor) pairs in torch layout, reading the checkpoint in bounded batches."""
  params = CheckpointParams(ckpt_dir, prefix, order=[p for r in layout.rules for p in r.ours])
  return export_params(params, layout, dtype=dtype, shapes=params.shapes)


def write_safetensors(items: Iterable[tuple[str, np.ndarray]], dst_dir: str, *,
                      max_shard_bytes: int = 5 << 30, basename: str = "model") -> list[str]:
  """Writes tensors to `basename.safetensors`, or to shards `basename-0000i-of-0000n.safetensors`
  plus `basename.safetensors.index.json` (Hugging Face layout) when they exceed max_shard_bytes.
  Holds at most one shard in memory. Returns the written file names."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(dst_dir, exist_ok=True)
  shards: list[tuple[str, list[str]]] = []
  buf: dict[str, np.ndarray] = {}
  size, total = 0, 0

  def flush():
    nonlocal buf, size
    if buf:
      name = f"{basename}-part{len(shards):05d}.safetensors"
      save_file(buf, os.path.join(dst_dir, name), metadata={"format": "pt"})
      shards.append((name, list(buf)))
      buf, size = {}, 0

  for key, t in items:
    if buf and size + t.nbytes > max_shard_bytes:
      flush()
    buf[key] = np.ascontiguousarray(t)
    size += t.nbytes
    total += t.nbytes
  flush()
  if len(shards) == 1:
    final = f"{basename}.safetensors"
    os.replace(os.path.join(dst_dir, shards[0][0]), os.path.join(dst_dir, final))
    return [final]
  names, weight_map = [], {}
  for i, (tmp, keys) in enumerate(shards):
    name = f"{basename}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    os.replace(os.path.join(dst_dir, tmp), os.path.join(dst_dir, name))
    names.append(name)
    weight_map.update({k: name for k in keys})
  with open(os.path.join(dst_dir, f"{basename}.safetensors.index.json"), "w") as fh:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=1)
  return names


def write_torch(items: Iterable[tuple[str, np.ndarray]], path: str) -> int:
  """Saves a torch state dict (`torch.save`, loadable with weights_only=True). Returns the key count."""
  import torch  # pylint: disable=g-import-not-at-top
  sd = {k: numpy_to_torch(v) for k, v in items}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  torch.save(sd, path)
  return len(sd)
