"""RadFM's Perceiver resampler (Flamingo style, no media/time embeddings), applied per image.

`__call__(media [N, n_tokens, dim]) -> latents [N, num_latents, dim]` with num_latents =
cfg.tokens_per_image. Per layer: latents += attn(media, latents); latents += FF(latents); final LN.
Attention: separate LayerNorms on media and latents; q from normed latents; k, v from
concat(normed media, normed latents) along tokens; no biases anywhere in attention or FF.

Parameter tree (L = resampler.depth, E = vision.dim, h = heads, k = head_dim, F = dim*ff_mult):
  latents                                [T, E]        ("latents", "embed")
  blocks/norm_media/{scale,bias}         [L, E]        ("layers", "norm")
  blocks/norm_latents/{scale,bias}       [L, E]        ("layers", "norm")
  blocks/q|k|v/kernel                    [L, E, h, k]  ("layers", "embed", "heads", "head_dim")
  blocks/o/kernel                        [L, h, k, E]  ("layers", "heads", "head_dim", "embed")
  blocks/ff_norm/{scale,bias}            [L, E]        ("layers", "norm")
  blocks/ff_in/kernel                    [L, E, F]     ("layers", "embed", "mlp")
  blocks/ff_out/kernel                   [L, F, E]     ("layers", "mlp", "embed")
  norm/{scale,bias}                      [E]           ("norm",)
RadFM torch keys: perceiver.layers.i.0.{norm_media,norm_latents,to_q,to_kv (rows k then v),to_out},
perceiver.layers.i.1.{0 (LN) -> ff_norm, 1 -> ff_in, 3 -> ff_out}, perceiver.norm, perceiver.latents.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from radfm_jax.models import attention as attn_lib
from radfm_jax.models import layers


class PerceiverBlock(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    cfg = layers.frozen(cfg)
    r, dim = cfg.resampler, cfg.vision.dim
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    hk = (r.heads, r.head_dim)
    qkv_axes = ("embed", "heads", "head_dim")
    self.norm_media = layers.LayerNorm(dim, eps=r.ln_eps, **kw)
    self.norm_latents = layers.LayerNorm(dim, eps=r.ln_eps, **kw)
    self.q = layers.Dense(dim, hk, axes=qkv_axes, use_bias=False, **kw)
    self.k = layers.Dense(dim, hk, axes=qkv_axes, use_bias=False, **kw)
    self.v = layers.Dense(dim, hk, axes=qkv_axes, use_bias=False, **kw)
    self.o = layers.Dense(hk, dim, axes=("heads", "head_dim", "embed"), use_bias=False, **kw)
    self.ff_norm = layers.LayerNorm(dim, eps=r.ln_eps, **kw)
    self.ff_in = layers.Dense(dim, dim * r.ff_mult, axes=("embed", "mlp"), use_bias=False, **kw)
    self.ff_out = layers.Dense(dim * r.ff_mult, dim, axes=("mlp", "embed"), use_bias=False, **kw)
    self.dtype = cfg.dtype
    self.impl = cfg.get("attention", "auto")

  def __call__(self, media: jax.Array, latents: jax.Array) -> jax.Array:
    m, lat = self.norm_media(media), self.norm_latents(latents)
    kv_in = jnp.concatenate([m, lat], axis=1)
    latents = latents + self.o(attn_lib.attention(self.q(lat), self.k(kv_in), self.v(kv_in), dtype=self.dtype,
                                              implementation=self.impl))
    return latents + self.ff_out(jax.nn.gelu(self.ff_in(self.ff_norm(latents)), approximate=False))


class PerceiverResampler(nnx.Module):
  """`__call__(media [N, n, dim]) -> [N, tokens_per_image, dim]`."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    cfg = layers.frozen(cfg)
    dim = cfg.vision.dim
    self.latents = layers.param(rngs, nnx.initializers.normal(1.0), (cfg.tokens_per_image, dim),
                                ("latents", "embed"), cfg.param_dtype)
    self.blocks = layers.stack_blocks(lambda r: PerceiverBlock(cfg, rngs=r), cfg.resampler.depth, rngs)
    self.norm = layers.LayerNorm(dim, eps=cfg.resampler.ln_eps, dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype, rngs=rngs)
    self.remat, self.scan = cfg.remat, cfg.scan_layers
    self.dtype = layers.dtype_of(cfg.dtype)

  def __call__(self, media: jax.Array) -> jax.Array:
    if media.ndim != 3 or media.shape[-1] != self.latents.shape[-1]:
      raise ValueError(f"resampler expects media [N, tokens, {self.latents.shape[-1]}], got {media.shape}")
    media = media.astype(self.dtype)
    lat = jnp.broadcast_to(self.latents[...].astype(self.dtype), (media.shape[0],) + self.latents.shape)
    lat, _ = layers.scan_blocks(self.blocks, lambda blk, x, _: (blk(media, x), None), lat,
                                remat=self.remat, scan=self.scan)
    return self.norm(lat)
