"""Per-array fingerprints and finiteness of a train state, computed on the host shard by shard.

  summary(state) -> {"params/lm/blocks/q/kernel": ("c0ffee01d00dfeed", True), ...}

A fingerprint is two position-weighted sums of the array's bit patterns as uint32 (wrapping), so it is
exact and independent of the sharding, the mesh and the summation order: a checkpoint saved on one mesh
verifies on another. Any single flipped bit changes the first sum (its weights are odd); the second,
with scrambled weights over rotated bits, catches what would cancel in the first. Each process sums the
shards it holds (one replica of each), and processes add their partial sums. Host-side NumPy on purpose:
one jitted program over a whole train state took ~100 s to compile on a loaded 2-core machine, longer
than the save it guards. `Checkpoints` records the fingerprints at save and compares them after every
restore; the finite flags keep non-finite state out of checkpoints.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

FORMAT = "radfm_jax.fingerprint/1"
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}


def _bits(a: np.ndarray) -> np.ndarray:
  """The array's bit patterns as uint32 (8-byte types: two words per element, on a trailing axis)."""
  if a.dtype == np.bool_:
    a = a.astype(np.uint8)
  a = np.ascontiguousarray(a)
  return a.view(_UNSIGNED[a.dtype.itemsize]).reshape(a.shape + ((2,) if a.dtype.itemsize == 8 else ()))\
      .astype(np.uint32)


def _block_index(shape: tuple[int, ...], index: tuple[slice, ...], words: int) -> np.ndarray:
  """Linear (row-major) positions, as uint32, of the block `index` of an array of `shape` (x words)."""
  full = tuple(shape) + ((words,) if words > 1 else ())
  index = tuple(index) + ((slice(None),) if words > 1 else ())
  idx = np.zeros((), np.uint32)
  stride = 1
  for axis in reversed(range(len(full))):
    start, stop, _ = index[axis].indices(full[axis])
    pos = np.arange(start, stop, dtype=np.uint64) * np.uint64(stride % (1 << 32))
    shape_k = [1] * len(full)
    shape_k[axis] = stop - start
    idx = idx + (pos % (1 << 32)).astype(np.uint32).reshape(shape_k)
    stride *= full[axis]
  return idx


def _partial(a: np.ndarray, shape: tuple[int, ...], index: tuple[slice, ...]) -> tuple[int, int, bool]:
  bits = _bits(a)
  words = 2 if a.dtype.itemsize == 8 else 1
  idx = np.broadcast_to(_block_index(shape, index, words), bits.shape)
  h1 = np.sum(bits * (idx * np.uint32(2) + np.uint32(1)), dtype=np.uint32)
  rot = (bits << np.uint32(7)) | (bits >> np.uint32(25))
  h2 = np.sum(rot * ((idx * np.uint32(0x9E3779B9)) | np.uint32(1)), dtype=np.uint32)
  finite = bool(np.isfinite(a).all()) if np.issubdtype(a.dtype, np.inexact) or a.dtype.kind == "V" else True
  return int(h1), int(h2), finite


def _leaf(x: Any) -> tuple[int, int, bool]:
  """This process's share of one leaf: sums over the shards it holds (replica 0 of each) + finiteness."""
  if isinstance(x, jax.Array):
    h1 = h2 = 0
    finite = True
    for shard in x.addressable_shards:
      if shard.replica_id != 0:
        continue
      p1, p2, f = _partial(np.asarray(shard.data), x.shape, shard.index)
      h1, h2, finite = (h1 + p1) % (1 << 32), (h2 + p2) % (1 << 32), finite and f
    return h1, h2, finite
  a = np.asarray(x)
  return _partial(a, a.shape, tuple(slice(None) for _ in a.shape))


def paths(state: Any) -> list[str]:
  return [jax.tree_util.keystr(p, simple=True, separator="/")
          for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]


def summary(state: Any) -> dict[str, tuple[str, bool]]:
  """{leaf path: (fingerprint as 16 hex digits, all values finite)} for every array of `state`."""
  parts = np.array([_leaf(x) for x in jax.tree.leaves(state)], np.int64).reshape(-1, 3)
  if jax.process_count() > 1:  # each process summed its own shards: add them up
    every = np.asarray(multihost_utils.process_allgather(parts))
    parts = np.stack([every[..., 0].sum(0) % (1 << 32), every[..., 1].sum(0) % (1 << 32),
                      every[..., 2].min(0)], -1)
  return {p: (f"{int(h1):08x}{int(h2):08x}", bool(fin)) for p, (h1, h2, fin) in zip(paths(state), parts)}


def nonfinite(summ: dict[str, tuple[str, bool]]) -> list[str]:
  """Paths of the arrays holding a NaN or an infinity."""
  return [p for p, (_, fin) in summ.items() if not fin]
