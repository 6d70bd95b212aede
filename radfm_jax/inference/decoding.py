"""Jitted KV-cache decoding for RadFM and LM-only models (batched, left-padded prompts).

One jit holds the prefill (images encoded once, prompt written to a fixed-shape cache of
P + max_new_tokens slots) and a `lax.while_loop` of single-token steps that stops when every row has
emitted `eos_id` or after `max_new_tokens`. Prompts are LEFT-padded (`prompt_mask` False on the left);
positions count real tokens only and padded slots are masked, so a row's output does not depend on the
other rows or on its padding. Greedy when temperature == 0; otherwise temperature / top-k / top-p
sampling (one compiled program per (shapes, max_new_tokens, greedy-or-not); eos, pad, temperature,
top-k and top-p are runtime values). eos defaults to the tokenizer's (`tokenizer.EOS_ID` = 2, the id RadFM
was trained to stop on; its shipped config says 1, a bug).

Traced under the parameters' mesh: `generate` passes it (`params_mesh`) and `_generate` enters
`sharding.activation_mesh` itself, so the activation constraints are on however it is called;
`lower` builds the same program from abstract parameters for the AOT planner (radfm_jax.aot).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from radfm_jax import models
from radfm_jax import sharding
from radfm_jax.data.tokenizer import EOS_ID, PAD_ID
from radfm_jax.models import radfm as radfm_lib


def sample_logits(logits: jax.Array, rng: jax.Array | None, temperature: Any = 0.0, top_k: Any = 0,
                  top_p: Any = 1.0) -> jax.Array:
  """Next token ids [B] from logits [B, V]: argmax when temperature is (Python) 0, else a sample from
  softmax(logits / temperature) restricted to the top_k ids (0 = all) and then to the smallest set whose
  renormalised mass reaches top_p (Hugging Face order). temperature, top_k, top_p may be traced.
  rng: one key for the batch, or a [B] array of keys (one per row: a row's sample then depends on its
  own key only, not on its position in the batch)."""
  if isinstance(temperature, (int, float)) and temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  v = logits.shape[-1]
  neg = jnp.finfo(jnp.float32).min
  logits = logits.astype(jnp.float32) / temperature
  srt = jnp.sort(logits, axis=-1)[:, ::-1]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  in_k = jnp.arange(v) < k
  probs = jax.nn.softmax(jnp.where(in_k, srt, neg), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs            # mass strictly above each sorted id
  keep = in_k & (before < top_p)                         # always keeps the most likely id
  thresh = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
  masked = jnp.where(logits < thresh, neg, logits)
  if rng.ndim:  # one key per row
    return jax.vmap(jax.random.categorical)(rng, masked).astype(jnp.int32)
  return jax.random.categorical(rng, masked, axis=-1).astype(jnp.int32)


def row_keys(seed: int, indices: Any) -> jax.Array:
  """Per-row sampling keys [B]: fold_in(key(seed), index) (e.g. the request's position in the input), so a
  request samples the same tokens whatever batch it lands in."""
  return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.asarray(indices, jnp.uint32))


def _step_key(rng: jax.Array, i: jax.Array) -> jax.Array:
  return jax.vmap(jax.random.fold_in, (0, None))(rng, i) if rng.ndim else jax.random.fold_in(rng, i)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "mesh"))
def _generate(graphdef, state, prompt_ids, prompt_mask, images, image_mask, rng, sampling, *,
              max_new_tokens, greedy, mesh=None):
  with sharding.activation_mesh(mesh):  # the parameters' mesh: activation constraints on
    return _decode(graphdef, state, prompt_ids, prompt_mask, images, image_mask, rng, sampling,
                   max_new_tokens=max_new_tokens, greedy=greedy)


def _decode(graphdef, state, prompt_ids, prompt_mask, images, image_mask, rng, sampling, *,
            max_new_tokens, greedy):
  eos_id, pad_id, temperature, top_k, top_p = sampling
  model = nnx.merge(graphdef, state)
  b, p = prompt_ids.shape
  if not models.takes_images(model):  # LM-only model: text prompts
    lm, embeds = model, model.embed(prompt_ids)
  else:
    lm = model.lm
    image_embeds = None if images is None else model.encode_images(images, image_mask)
    embeds = model.embed(prompt_ids, image_embeds)
  seg = prompt_mask.astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
  cache = lm.init_cache(b, p + max_new_tokens)
  logits, cache = lm.decode(embeds, positions, seg, cache)
  next_pos = seg.sum(axis=1)
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)

  def cond(c):
    i, _, _, _, done = c
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(c):
    i, last, cache, out, done = c
    if greedy:
      tok = sample_logits(last, None)
    else:
      tok = sample_logits(last, _step_key(rng, i), temperature, top_k, top_p)
    tok = jnp.where(done, pad_id, tok)
    out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1)
    done = done | (tok == eos_id)
    logits, cache = lm.decode(lm.embed(tok[:, None]), (next_pos + i)[:, None],
                              jnp.ones((b, 1), jnp.int32), cache)
    return i + 1, logits[:, 0], cache, out, done

  init = (jnp.zeros((), jnp.int32), logits[:, -1], cache, out, jnp.zeros((b,), bool))
  return jax.lax.while_loop(cond, body, init)[3]


def params_mesh(state: Any) -> jax.sharding.Mesh | None:
  """The mesh the parameters live on (their NamedSharding's), or None (single device / unsharded)."""
  for leaf in jax.tree.leaves(state):
    sh = getattr(leaf, "sharding", None)
    if isinstance(sh, jax.sharding.NamedSharding) and set(sharding.MESH_AXES) <= set(sh.mesh.axis_names):
      return sh.mesh
  return None


def lower(graphdef: nnx.GraphDef, abstract_state: Any, *, rows: int, prompt_len: int, slots: int,
          grid: tuple[int, int, int] | None, channels: int = 1, max_new_tokens: int) -> jax.stages.Lowered:
  """The exact program `generate` runs (greedy; prefill + the decode loop) for these shapes, lowered
  from abstract parameters (ShapeDtypeStructs with shardings) for ahead-of-time compilation: prompts
  and masks as `inference.batching` passes them (host arrays, replicated), images sharded over the batch."""
  mesh = params_mesh(abstract_state)
  rep = None if mesh is None else sharding.replicated(mesh)
  sds = lambda shape, dt, sh=rep: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
  images = image_mask = None
  if grid is not None:
    images = sds((rows, slots, *grid, channels), jnp.float32,
                 None if mesh is None else sharding.batch_sharding(mesh, 6))
    image_mask = sds((rows, slots), jnp.bool_)
  sampling = (sds((), jnp.int32), sds((), jnp.int32), sds((), jnp.float32), sds((), jnp.int32),
              sds((), jnp.float32))
  return _generate.lower(graphdef, abstract_state, sds((rows, prompt_len), jnp.int32),
                         sds((rows, prompt_len), jnp.bool_), images, image_mask, None, sampling,
                         max_new_tokens=int(max_new_tokens), greedy=True, mesh=mesh)


def _split(model_or_split: Any) -> tuple[nnx.GraphDef, nnx.State]:
  if isinstance(model_or_split, nnx.Module):
    return nnx.split(model_or_split)
  graphdef, state = model_or_split
  return graphdef, state


def check_prompt(cfg, prompt_ids: np.ndarray, prompt_mask: np.ndarray, image_mask: Any,
                 max_new_tokens: int, text_only: bool = False) -> None:
  """Host-side checks with clear errors: shapes, left padding, non-empty rows, ids, length budget."""
  if prompt_ids.ndim != 2 or prompt_mask.shape != prompt_ids.shape:
    raise ValueError(f"prompt_ids [B, P] and prompt_mask [B, P] expected, got {prompt_ids.shape} and "
                     f"{prompt_mask.shape}")
  m = prompt_mask.astype(bool)
  if not m.any(axis=1).all():
    raise ValueError(f"prompt rows {np.flatnonzero(~m.any(axis=1)).tolist()} have no tokens")
  if (np.diff(m.astype(np.int8), axis=1) < 0).any():
    raise ValueError("prompts must be LEFT-padded: prompt_mask must be False...False True...True per row")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if prompt_ids.shape[1] + max_new_tokens > cfg.lm.max_len:
    raise ValueError(f"prompt length {prompt_ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                     f"cfg.lm.max_len={cfg.lm.max_len}")
  ids = np.where(m, prompt_ids, 0)
  if text_only and ((ids < 0) | (ids >= cfg.vocab_size)).any():
    b, t = np.argwhere((ids < 0) | (ids >= cfg.vocab_size))[0]
    raise ValueError(f"prompt_ids[{b}, {t}] = {ids[b, t]} is outside the LM's vocabulary [0, {cfg.vocab_size})")
  radfm_lib.check_token_ids(cfg, ids, image_mask, name="prompt_ids")


def generate(model, prompt_ids, prompt_mask, images=None, image_mask=None, *, max_new_tokens: int,
             eos_id: int = EOS_ID, pad_id: int = PAD_ID, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, rng: jax.Array | None = None) -> jax.Array:
  """Decodes up to `max_new_tokens` per row -> int32 [B, max_new_tokens] (eos, then pad_id after it).

  model: a RadFM (or LM-only Llama) module, or its (graphdef, state). prompt_ids [B, P] LEFT-padded,
  prompt_mask [B, P] (True = real token); images [B, S, H, W, D, C] with image_mask [B, S], or None for text only.
  Sampling (temperature > 0) needs `rng`: a key (jax.random.key) for the batch, or [B] keys, one per row
  (`row_keys`: a row's tokens then do not depend on the other rows). jax.Array inputs keep their
  sharding (e.g. batch over ("data", "fsdp")); value checks run on the host when the inputs are fully
  addressable.
  """
  graphdef, state = _split(model)
  merged = nnx.merge(graphdef, state)  # cheap: no array copies
  cfg, text_only = merged.cfg, not models.takes_images(merged)
  if text_only and images is not None:
    raise ValueError("an LM-only model (Llama) takes no images")
  if images is not None and image_mask is None:
    image_mask = np.ones(np.shape(images)[:2], bool)
  if all(_addressable(x) for x in (prompt_ids, prompt_mask, image_mask)):  # host checks where possible
    check_prompt(cfg, np.asarray(prompt_ids), np.asarray(prompt_mask),
                 None if image_mask is None else np.asarray(image_mask), max_new_tokens, text_only)
  elif np.shape(prompt_ids)[1] + max_new_tokens > cfg.lm.max_len:
    raise ValueError(f"prompt length {np.shape(prompt_ids)[1]} + max_new_tokens {max_new_tokens} exceeds "
                     f"cfg.lm.max_len={cfg.lm.max_len}")
  if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
    raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
  if temperature > 0:
    if rng is None:
      raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(seed)")
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) or rng.ndim > 1 or (
        rng.ndim == 1 and rng.shape[0] != np.shape(prompt_ids)[0]):
      raise ValueError(f"rng must be a typed key (jax.random.key) or [B={np.shape(prompt_ids)[0]}] of them "
                       f"(generate.row_keys); got {rng.dtype} {rng.shape}")
  greedy = temperature == 0
  sampling = (jnp.int32(eos_id), jnp.int32(pad_id), jnp.float32(temperature if not greedy else 1.0),
              jnp.int32(top_k), jnp.float32(top_p))
  return _generate(graphdef, state, _dev(prompt_ids, jnp.int32), _dev(prompt_mask, jnp.bool_),
                   _dev(images), _dev(image_mask, jnp.bool_), None if greedy else rng, sampling,
                   max_new_tokens=int(max_new_tokens), greedy=greedy, mesh=params_mesh(state))


def _addressable(x) -> bool:
  return x is None or not isinstance(x, jax.Array) or x.is_fully_addressable


def _dev(x, dtype=None):
  """To a device array; jax.Arrays keep their placement/sharding (cast only when the dtype differs)."""
  if x is None:
    return None
  if isinstance(x, jax.Array):
    return x if dtype is None or x.dtype == dtype else x.astype(dtype)
  return jnp.asarray(x, dtype)


def trim(ids: np.ndarray, eos_id: int = EOS_ID) -> list[list[int]]:
  """Per row: the generated ids up to and including the first eos."""
  out = []
  for row in np.asarray(ids).tolist():
    out.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
  return out
