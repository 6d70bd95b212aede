"""LLaMA decoder (RMSNorm, rotate_half RoPE, SwiGLU, optional grouped-query attention, no biases,
untied head) with packing-aware masks and a fixed-shape KV cache for decoding.

Masking rule (both modes): query i attends key j iff slot(j) <= slot(i) and segment(i) == segment(j).
Training/packing: slots are 0..T-1 and segments are `segment_ids` (0 = padding); positions (RoPE) are
given by the caller and restart per segment. Decoding: a `KVCache` holds keys/values for S slots plus
the segment id of each slot (0 = never written / padding); new tokens are written at `cache.index`.
Both go through `models.attention.attention` (causal flag + segment ids + cache offset; no [B, T, T]
mask is ever built outside the attention call), whose backend is `cfg.attention` ("auto" by default).

Parameter tree (L = lm.layers, E = lm.hidden, H = heads, K = kv_heads, k = head_dim, M = lm.mlp,
V = vocab_size):
  embed_tokens                   [V, E]        ("vocab", "embed")
  blocks/attn_norm/scale         [L, E]        ("layers", "norm")
  blocks/q/kernel                [L, E, H, k]  ("layers", "embed", "heads", "head_dim")
  blocks/k|v/kernel              [L, E, K, k]  ("layers", "embed", "kv_heads", "head_dim")
  blocks/o/kernel                [L, H, k, E]  ("layers", "heads", "head_dim", "embed")
  blocks/mlp_norm/scale          [L, E]        ("layers", "norm")
  blocks/gate|up/kernel          [L, E, M]     ("layers", "embed", "mlp")
  blocks/down/kernel             [L, M, E]     ("layers", "mlp", "embed")
  final_norm/scale               [E]           ("norm",)
  lm_head/kernel                 [E, V]        ("embed", "vocab")
Hugging Face keys map as: model.embed_tokens -> embed_tokens; layers.i.self_attn.{q,k,v}_proj.weight
[H*k, E] -> q/k/v kernel = W.T.reshape(E, H, k); o_proj [E, H*k] -> o kernel = W.T.reshape(H, k, E);
mlp.{gate,up,down}_proj -> gate/up/down (transposed); input_layernorm -> attn_norm;
post_attention_layernorm -> mlp_norm; model.norm -> final_norm; lm_head.weight [V, E] -> lm_head kernel.T.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from radfm_jax.models import attention as attn_lib
from radfm_jax.models import layers
from radfm_jax.sharding import constrain

ACT = ("batch", "length", "act_embed")


class KVCache(NamedTuple):
  """Fixed-shape decoding cache. k, v: [L, B, S, K, k]; segment: [B, S] int32; index: [] int32 (next slot)."""
  k: jax.Array
  v: jax.Array
  segment: jax.Array
  index: jax.Array


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Hugging Face `rotate_half` RoPE. x [B, T, N, D], positions [B, T] -> same shape/dtype."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  ang = positions.astype(jnp.float32)[..., None] * inv_freq          # [B, T, D/2]
  ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]           # [B, T, 1, D]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
  rot = jnp.concatenate([-x2, x1], axis=-1)
  return (xf * jnp.cos(ang) + rot * jnp.sin(ang)).astype(x.dtype)


class LlamaBlock(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    cfg = layers.frozen(cfg)
    c = cfg.lm
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs, use_bias=False)
    nkw = dict(eps=c.rms_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.attn_norm = layers.RMSNorm(c.hidden, **nkw)
    self.q = layers.Dense(c.hidden, (c.heads, c.head_dim), axes=("embed", "heads", "head_dim"), **kw)
    self.k = layers.Dense(c.hidden, (c.kv_heads, c.head_dim), axes=("embed", "kv_heads", "head_dim"), **kw)
    self.v = layers.Dense(c.hidden, (c.kv_heads, c.head_dim), axes=("embed", "kv_heads", "head_dim"), **kw)
    self.o = layers.Dense((c.heads, c.head_dim), c.hidden, axes=("heads", "head_dim", "embed"), **kw)
    self.mlp_norm = layers.RMSNorm(c.hidden, **nkw)
    self.gate = layers.Dense(c.hidden, c.mlp, axes=("embed", "mlp"), **kw)
    self.up = layers.Dense(c.hidden, c.mlp, axes=("embed", "mlp"), **kw)
    self.down = layers.Dense(c.mlp, c.hidden, axes=("mlp", "embed"), **kw)
    self.theta, self.dtype = c.rope_theta, cfg.dtype
    self.impl = cfg.get("attention", "auto")

  def project(self, x, positions):
    """Attention inputs: q [B, T, H, k], k/v [B, T, K, k] (RoPE applied to q and k)."""
    a = self.attn_norm(x)
    return rope(self.q(a), positions, self.theta), rope(self.k(a), positions, self.theta), self.v(a)

  def finish(self, x, q, keys, values, q_segment_ids, kv_segment_ids, q_offset=None):
    """Causal attention over keys/values [B, S, K, k] (segment ids [B, T] / [B, S] or None; q_offset:
    the queries' first cache slot when decoding), output projection, SwiGLU MLP."""
    x = x + self.o(attn_lib.attention(q, keys, values, causal=True, q_segment_ids=q_segment_ids,
                                      kv_segment_ids=kv_segment_ids, q_offset=q_offset, dtype=self.dtype,
                                      implementation=self.impl))
    m = self.mlp_norm(x)
    x = x + self.down(jax.nn.silu(self.gate(m).astype(jnp.float32)).astype(m.dtype) * self.up(m))
    return constrain(x, ACT)

  def __call__(self, x, positions, segment_ids):
    """Causal self-attention block over x [B, T, E]; segment_ids [B, T] (packing) or None."""
    q, k, v = self.project(x, positions)
    return self.finish(x, q, k, v, segment_ids, segment_ids)


class Llama(nnx.Module):
  """Decoder-only LM over the text vocabulary (cfg.vocab_size); sizes from cfg.lm."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    cfg = layers.frozen(cfg)
    c = cfg.lm
    if c.heads % c.kv_heads:
      raise ValueError(f"cfg.lm.heads={c.heads} must be a multiple of cfg.lm.kv_heads={c.kv_heads}")
    self.embed_tokens = layers.param(rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, c.hidden),
                                     ("vocab", "embed"), cfg.param_dtype)
    self.blocks = layers.stack_blocks(lambda r: LlamaBlock(cfg, rngs=r), c.layers, rngs)
    self.final_norm = layers.RMSNorm(c.hidden, eps=c.rms_eps, dtype=cfg.dtype,
                                     param_dtype=cfg.param_dtype, rngs=rngs)
    self.lm_head = layers.Dense(c.hidden, cfg.vocab_size, axes=("embed", "vocab"), use_bias=False,
                                dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
                                kernel_init=nnx.initializers.normal(0.02))
    self.cfg = cfg  # the model config (sizes under cfg.lm)
    self.vocab_size = cfg.vocab_size
    self.remat, self.scan = cfg.remat, cfg.scan_layers
    self.dtype = layers.dtype_of(cfg.dtype)

  def embed(self, ids: jax.Array) -> jax.Array:
    """Text embedding rows (ids are clipped into range; validate ids on the host beforehand)."""
    # Under a mesh context the table's embed dim is gathered over fsdp first (FSDP's per-use weight
    # gather; vocab stays split over tensor) so the rows come out batch-sharded: gathering straight from
    # the (vocab, embed)-sharded table made XLA replicate the [B, T, E] result to move fsdp from its
    # embed dim to its batch dim ("involuntary full rematerialization" on a (2, 2, 2) mesh).
    table = constrain(self.embed_tokens[...], ("vocab", None))
    x = jnp.take(table, jnp.clip(ids, 0, self.vocab_size - 1), axis=0).astype(self.dtype)
    return constrain(x, ACT)

  def logits(self, x: jax.Array) -> jax.Array:
    """Final norm + head: hidden [B, T, E] (as `__call__(..., head=False)` returns) -> [B, T, V] float32."""
    return constrain(self.lm_head(self.final_norm(x), out_dtype=jnp.float32), ("batch", "length", "vocab"))

  def __call__(self, inputs: jax.Array | None = None, *, embeds: jax.Array | None = None,
               positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
               head: bool = True) -> jax.Array:
    """Full-sequence forward. inputs [B, T] ids or embeds [B, T, E]; returns logits [B, T, V] float32,
    or with `head=False` the last block's hidden states [B, T, E] (for `models.loss`, which applies
    `logits` in sequence chunks so [B, T, V] never exists whole).

    positions default to 0..T-1; segment_ids None means one unpadded sequence per row.
    """
    x = self.embed(inputs) if embeds is None else embeds.astype(self.dtype)
    b, t = x.shape[:2]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x, _ = layers.scan_blocks(self.blocks, lambda blk, h, _: (blk(h, positions, segment_ids), None),
                              constrain(x, ACT), remat=self.remat, scan=self.scan)
    return self.logits(x) if head else x

  def init_cache(self, batch: int, length: int, dtype=None) -> KVCache:
    c = self.cfg.lm
    shape = (c.layers, batch, length, c.kv_heads, c.head_dim)
    dtype = dtype or self.dtype
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, length), jnp.int32),
                   jnp.zeros((), jnp.int32))

  def decode(self, embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array,
             cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Runs T new tokens (embeds [B, T, E]) at cache slots index..index+T-1; returns (logits, cache).

    segment_ids [B, T] of the new tokens (0 = padding, e.g. left-padded prompt slots).
    """
    t = embeds.shape[1]
    segment_ids = segment_ids.astype(jnp.int32)
    seg = jax.lax.dynamic_update_slice_in_dim(cache.segment, segment_ids, cache.index, 1)

    # The whole cache rides in the scan carry; the new tokens are written first and the layer's slice
    # read after, so XLA updates the cache in place.
    def body(blk, carry, layer):
      h, ck, cv = carry
      q, k, v = blk.project(h, positions)
      start = (layer, 0, cache.index, 0, 0)
      ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), start)
      cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), start)
      h = blk.finish(h, q, jax.lax.dynamic_index_in_dim(ck, layer, 0, keepdims=False),
                     jax.lax.dynamic_index_in_dim(cv, layer, 0, keepdims=False), segment_ids, seg,
                     cache.index)
      return (h, ck, cv), None

    (x, k, v), _ = layers.scan_blocks(self.blocks, body, (embeds.astype(self.dtype), cache.k, cache.v),
                                      jnp.arange(cache.k.shape[0]), remat="none", scan=self.scan)
    return self.logits(x), KVCache(k, v, seg, cache.index + t)
