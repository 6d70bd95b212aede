"""Per-array fingerprints and finiteness of a train state, computed on the devices in one jitted pass.

  summary(state) -> {"params/lm/blocks/q/kernel": ("c0ffee01d00dfeed", True), ...}

A fingerprint is two position-weighted sums of the array's bit patterns as uint32 (wrapping), so it is
exact and independent of the sharding, the mesh and the reduction order: a checkpoint saved on one mesh
verifies on another. Any single flipped bit changes the first sum (its weights are odd); the second,
with scrambled weights over rotated bits, catches what would cancel in the first. `Checkpoints` records
the fingerprints at save and compares them after every restore; the finite flags keep non-finite state
out of checkpoints.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "radfm_jax.fingerprint/1"


def _bits(x: jax.Array) -> jax.Array:
  """The array's bit patterns as uint32 (8-byte types: two words per element, on a trailing axis)."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = np.dtype(x.dtype).itemsize
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _linear_index(shape: tuple[int, ...]) -> jax.Array:
  idx = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % (1 << 32))
    stride *= shape[axis]
  return idx


def _leaf_summary(x: jax.Array) -> jax.Array:
  """[fingerprint word 1, word 2, finite] as uint32[3]."""
  bits = _bits(x)
  idx = _linear_index(bits.shape)
  h1 = jnp.sum(bits * (idx * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  rot = (bits << jnp.uint32(7)) | (bits >> jnp.uint32(25))
  h2 = jnp.sum(rot * ((idx * jnp.uint32(0x9E3779B9)) | jnp.uint32(1)), dtype=jnp.uint32)
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
  return jnp.stack([h1, h2, finite.astype(jnp.uint32)])


@jax.jit
def _summaries(state: Any) -> Any:
  return jax.tree.map(_leaf_summary, state)


def paths(state: Any) -> list[str]:
  return [jax.tree_util.keystr(p, simple=True, separator="/")
          for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]


def summary(state: Any) -> dict[str, tuple[str, bool]]:
  """{leaf path: (fingerprint as 16 hex digits, all values finite)} for every array of `state`."""
  leaves = jax.device_get(jax.tree.leaves(_summaries(state)))
  return {p: (f"{int(h1):08x}{int(h2):08x}", bool(fin)) for p, (h1, h2, fin) in zip(paths(state), leaves)}


def nonfinite(summ: dict[str, tuple[str, bool]]) -> list[str]:
  """Paths of the arrays holding a NaN or an infinity."""
  return [p for p, (_, fin) in summ.items() if not fin]
