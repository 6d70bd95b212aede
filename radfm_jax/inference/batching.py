"""Many prompts -> batched, bucketed, sharded `decoding.generate` calls (the CLI and RadBench share it).

A `Request` is one prompt: its token ids (BOS + text with image blocks, `Tokenizer.build_prompt`), its
image group (the grid its images are resized to: `preprocess.sample_depth`, 0 = the 2D grid, TEXT_ONLY
when it has no image) and whatever the caller's image loader needs (`payload`).

`run` groups requests by image grid, sorts them by prompt length inside a group (stable) and cuts
batches of `batch_size`. Prompts are LEFT-padded to a length bucket, image slots padded to a slot bucket,
and the rows padded with dummy rows (just BOS) to `batch_size` rounded up to the number of batch shards
(data x fsdp), so at most groups x length buckets x slot buckets shapes are compiled. Images are loaded
batch by batch through the caller's `load_images(request, grid) -> float32 [n_images, *grid, C]`
(C = spec.image_channels: 1, gray, replicated by the model on device, or 3); a request whose images fail
to load becomes an error (the batch goes on without it).

A row's tokens depend on its own prompt and images only (left padding + masks; tests check batch 1
against batch 8) and, when sampling, on its own key `decoding.row_keys(seed, [request.index])`: the same
request gives the same answer whatever the batch size, the other requests or the padding.

Multi-process: every process plans the same batches and reads every row's images (so failures are known
everywhere), then hands its own rows to a global array sharded over (data, fsdp).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from radfm_jax import sharding
from radfm_jax.inference import decoding
from radfm_jax.data import collate, preprocess

TEXT_ONLY = -1  # group of requests without images


@dataclasses.dataclass
class Request:
  index: int                  # the caller's key: results are keyed by it; also the sampling key index
  prompt: list[int]           # BOS + text with image blocks
  group: int = TEXT_ONLY      # preprocess.sample_depth of its images (0 = 2D grid), or TEXT_ONLY
  n_images: int = 0
  payload: Any = None         # what `load_images` needs (store keys, preprocessed images, ...)


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Static shape budget of a run: the longest prompt and the padded prompt lengths / image slots."""
  max_prompt: int
  len_buckets: tuple[int, ...]
  slot_buckets: tuple[int, ...]


def shapes_for(data_cfg: Mapping[str, Any], model_cfg: Any, max_new_tokens: int,
               prompt_buckets: Sequence[int] | None = None) -> Shapes:
  """Prompt budget lm.max_len - max_new_tokens; length buckets from `prompt_buckets` or
  data.len_buckets; slot buckets from data.slot_buckets up to model.max_images."""
  max_prompt = int(model_cfg.lm.max_len) - int(max_new_tokens)
  if max_prompt < 2:
    raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in lm.max_len="
                     f"{model_cfg.lm.max_len}")
  return Shapes(max_prompt, collate.buckets(prompt_buckets or data_cfg.get("len_buckets"), max_prompt, "len_buckets"),
                collate.buckets(data_cfg.get("slot_buckets"), max(int(model_cfg.get("max_images", 1)), 1),
                                "slot_buckets"))


def check_length(prompt: Sequence[int], max_prompt: int) -> None:
  if len(prompt) > max_prompt:
    raise ValueError(f"prompt of {len(prompt)} tokens exceeds {max_prompt} (lm.max_len - max_new_tokens)")


def plan_batches(requests: Sequence[Request], batch_size: int) -> list[list[Request]]:
  """Group by image grid, sort by prompt length (stable), cut into batches of batch_size."""
  batches = []
  for group in sorted({r.group for r in requests}):
    members = sorted((r for r in requests if r.group == group), key=lambda r: (len(r.prompt), r.index))
    batches += [members[i:i + batch_size] for i in range(0, len(members), batch_size)]
  return batches


def rows_per_batch(batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """batch_size rounded up to a multiple of the batch shards (data x fsdp)."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  return -(-batch_size // shards) * shards


def build_batch(rows: Sequence[Request], *, num_rows: int, prompt_len: int, slots: int,
                grid: tuple[int, int, int] | None, pad_id: int, bos_id: int,
                channels: int = 1) -> dict[str, np.ndarray]:
  """Host arrays of one batch: LEFT-padded prompts; dummy rows (just BOS) fill up to num_rows.
  With a grid, `images` zeros [num_rows, slots, *grid, channels] and `image_mask` False, for the caller
  to fill."""
  ids = np.full((num_rows, prompt_len), pad_id, np.int32)
  mask = np.zeros((num_rows, prompt_len), bool)
  ids[:, -1], mask[:, -1] = bos_id, True  # dummy rows
  for r, p in enumerate(rows):
    ids[r, prompt_len - len(p.prompt):] = p.prompt
    mask[r] = False
    mask[r, prompt_len - len(p.prompt):] = True
  batch = {"prompt_ids": ids, "prompt_mask": mask}
  if grid is not None:
    batch["images"] = np.zeros((num_rows, slots, *grid, channels), np.float32)
    batch["image_mask"] = np.zeros((num_rows, slots), bool)
  return batch


def _dummy_row(batch: dict[str, np.ndarray], r: int, pad_id: int, bos_id: int) -> None:
  batch["prompt_ids"][r], batch["prompt_mask"][r] = pad_id, False
  batch["prompt_ids"][r, -1], batch["prompt_mask"][r, -1] = bos_id, True
  if "images" in batch:
    batch["images"][r], batch["image_mask"][r] = 0.0, False


def _gather(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def run(model, requests: Sequence[Request], load_images: Callable[[Request, tuple[int, int, int]], np.ndarray],
        *, mesh: jax.sharding.Mesh, tok: Any, spec: preprocess.ImageSpec, shapes: Shapes, batch_size: int,
        max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
        ) -> tuple[dict[int, list[int]], dict[int, str], dict[str, Any]]:
  """Decodes every request (see the module doc).

  model: a RadFM or LM-only Llama (or its graphdef, state), params on `mesh`. tok: pad_id, bos_id, eos_id.
  Returns (ids: request.index -> generated ids up to and including eos, errors: request.index -> reason,
  info: rows_per_batch, compiled_shapes, generate_seconds, new_tokens).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  errors: dict[int, str] = {}
  for r in requests:
    try:
      check_length(r.prompt, shapes.max_prompt)
    except ValueError as e:
      errors[r.index] = str(e)
  requests = [r for r in requests if r.index not in errors]
  num_rows = rows_per_batch(batch_size, mesh)
  local = slice(jax.process_index() * num_rows // jax.process_count(),
                (jax.process_index() + 1) * num_rows // jax.process_count())
  outputs: dict[int, list[int]] = {}
  seen, t0, new_tokens = set(), time.time(), 0
  for rows in plan_batches(requests, batch_size):
    group = rows[0].group
    grid = None if group == TEXT_ONLY else preprocess.grid_of(group, spec)
    slots = collate.bucket(max(r.n_images for r in rows), shapes.slot_buckets) if grid else 0
    plen = collate.bucket(max(len(r.prompt) for r in rows), shapes.len_buckets)
    batch = build_batch(rows, num_rows=num_rows, prompt_len=plen, slots=slots, grid=grid,
                        pad_id=tok.pad_id, bos_id=tok.bos_id, channels=spec.image_channels)
    ok = []
    for r, req in enumerate(rows):
      try:
        if grid is not None and req.n_images:
          images = load_images(req, grid)
          want = (req.n_images, *grid, spec.image_channels)
          if images.shape != want:
            raise ValueError(f"images of shape {images.shape}, expected {want}")
          batch["images"][r, :req.n_images] = images
          batch["image_mask"][r, :req.n_images] = True
        ok.append(r)
      except Exception as e:  # pylint: disable=broad-except  (a batch job records and goes on)
        errors[req.index] = f"unreadable image ({type(e).__name__}: {e})"
        _dummy_row(batch, r, tok.pad_id, tok.bos_id)
    seen.add((group, plen, slots))
    rng = None
    if temperature > 0:
      index = np.zeros((num_rows,), np.int64)
      index[:len(rows)] = [req.index for req in rows]
      rng = decoding.row_keys(seed, index)
    images = image_mask = None
    if grid is not None:
      images, image_mask = sharding.host_to_global(batch["images"][local], mesh), batch["image_mask"]
    with jax.set_mesh(mesh):
      out = decoding.generate(model, batch["prompt_ids"], batch["prompt_mask"], images, image_mask,
                              max_new_tokens=max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
                              temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)
    ids = _gather(out)
    for r in ok:
      outputs[rows[r].index] = decoding.trim(ids[r:r + 1], tok.eos_id)[0]
      new_tokens += len(outputs[rows[r].index])
  seconds = time.time() - t0
  info = {"rows_per_batch": num_rows, "compiled_shapes": len(seen), "generate_seconds": round(seconds, 2),
          "new_tokens": new_tokens}
  logging.info("generated %d answers in %.1f s (%d shapes)", len(outputs), seconds, len(seen))
  return outputs, errors, info
