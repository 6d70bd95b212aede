"""RadFM's 3D vision transformer (no CLS token, no final norm), channels-last.

Input: volumes [N, H, W, D, C] (N = batch * image slots), float in [0, 1]. Output: patch tokens
[N, (H/ph)(W/ph)(D/pd), dim], token order h-major, then w, then d fastest; each patch vector is
flattened (p_h, p_w, p_d, c) with the channel fastest, as RadFM's weights expect.

Position embedding: three learned tables (rows [pos_rows, dim/3], cols [pos_cols, dim/3], depth
[pos_deps, dim/3]); an axis of n patches with table length T uses rows `(arange(n) + 1) * (T // n) - 1`
(strided from the end: h=8 of 16 -> 1,3,..,15; d=1 of 128 -> 127; d=16 -> 7,15,..,127); per token
[row | col | depth] is added after the patch embedding.

Parameter tree (L = depth, P = patch_hw*patch_hw*patch_d*channels, E = dim, h = heads, k = head_dim,
M = mlp_dim; logical axes in brackets):
  patch_norm_in/{scale,bias}   [P]                 ("norm",)
  patch_proj/kernel            [P, E]              ("patch", "embed");  patch_proj/bias [E] ("embed",)
  patch_norm_out/{scale,bias}  [E]                 ("norm",)
  pos_row [pos_rows, E/3], pos_col [pos_cols, E/3], pos_dep [pos_deps, E/3]   ("pos", "pos_embed")
  blocks/attn_norm/{scale,bias} [L, E]             ("layers", "norm")
  blocks/q|k|v/kernel          [L, E, h, k]        ("layers", "embed", "heads", "head_dim")  (no bias)
  blocks/o/kernel              [L, h, k, E]        ("layers", "heads", "head_dim", "embed")
  blocks/o/bias                [L, E]              ("layers", "embed")
  blocks/mlp_norm/{scale,bias} [L, E]              ("layers", "norm")
  blocks/fc1/kernel [L, E, M] ("layers", "embed", "mlp"), blocks/fc1/bias [L, M] ("layers", "mlp")
  blocks/fc2/kernel [L, M, E] ("layers", "mlp", "embed"), blocks/fc2/bias [L, E] ("layers", "embed")
RadFM torch keys map as: to_patch_embedding.{1,2,3} -> patch_norm_in, patch_proj, patch_norm_out;
pos_embedding.{row,col,dep}_embed -> pos_{row,col,dep}; layers.i.0.fn.to_qkv rows [q|k|v] (head-major)
-> q/k/v; to_out.0 -> o; layers.i.1.fn.net.{0,3} -> fc1, fc2; layers.i.{0,1}.norm -> attn_norm, mlp_norm.

Dropout (RadFM trains with 0.1 / 0.1): `cfg.vision.emb_dropout` after the position-embedding add and
`cfg.vision.dropout` on the attention output (after `o`), after the GELU and after `fc2` (lucidrains ViT
placement; a missing field means 0.0). It is purely functional: `__call__(volumes, dropout_key=None)`
applies it only when a key is given (training) and is deterministic otherwise (eval, generation). The
module holds no RNG state: the caller derives the key (the trainer: from (seed, step)), so a restarted
run draws the same masks. The key is split into one for the embedding and one per layer (fed to the
layer scan as xs, so scan and remat recompute the same masks); each block splits its key in three.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from radfm_jax.models import attention as attn_lib
from radfm_jax.models import layers
from radfm_jax.sharding import constrain

ACT = ("batch", "length", "act_embed")


def position_indices(n: int, table_len: int, axis: str = "axis") -> np.ndarray:
  """RadFM's strided position rule: rows (arange(n) + 1) * (table_len // n) - 1."""
  if n < 1 or n > table_len:
    raise ValueError(f"image grid has {n} patches along {axis}; the position table holds 1..{table_len}")
  return (np.arange(n) + 1) * (table_len // n) - 1


class ViTBlock(nnx.Module):
  """Pre-norm block: x += attn(LN(x)); x += MLP(LN(x)) with exact (erf) GELU."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    cfg = layers.frozen(cfg)
    v = cfg.vision
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    hk = (v.heads, v.head_dim)
    self.attn_norm = layers.LayerNorm(v.dim, eps=v.ln_eps, **kw)
    self.q = layers.Dense(v.dim, hk, axes=("embed", "heads", "head_dim"), use_bias=False, **kw)
    self.k = layers.Dense(v.dim, hk, axes=("embed", "heads", "head_dim"), use_bias=False, **kw)
    self.v = layers.Dense(v.dim, hk, axes=("embed", "heads", "head_dim"), use_bias=False, **kw)
    self.o = layers.Dense(hk, v.dim, axes=("heads", "head_dim", "embed"), use_bias=True, **kw)
    self.mlp_norm = layers.LayerNorm(v.dim, eps=v.ln_eps, **kw)
    self.fc1 = layers.Dense(v.dim, v.mlp_dim, axes=("embed", "mlp"), use_bias=True, **kw)
    self.fc2 = layers.Dense(v.mlp_dim, v.dim, axes=("mlp", "embed"), use_bias=True, **kw)
    self.dropout = nnx.Dropout(float(v.get("dropout", 0.0)))  # no rngs: the key comes with each call
    self.dtype = cfg.dtype
    self.impl = cfg.get("attention", "auto")

  def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """One block; `dropout_key` (a single key) turns dropout on, None runs deterministic."""
    keys = [None] * 3 if dropout_key is None else list(jax.random.split(dropout_key, 3))
    drop = lambda h, k: self.dropout(h, deterministic=k is None, rngs=k)
    a = self.attn_norm(x)
    o = attn_lib.attention(self.q(a), self.k(a), self.v(a), dtype=self.dtype, implementation=self.impl)
    x = x + drop(self.o(o), keys[0])
    m = self.mlp_norm(x)
    h = drop(jax.nn.gelu(self.fc1(m), approximate=False), keys[1])
    return constrain(x + drop(self.fc2(h), keys[2]), ACT)


class VisionTransformer3D(nnx.Module):
  """RadFM's 3D ViT. `__call__(volumes [N, H, W, D, C]) -> tokens [N, n_patches, dim]`."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    cfg = layers.frozen(cfg)
    v = cfg.vision
    if v.dim % 3:
      raise ValueError(f"cfg.vision.dim={v.dim} must be divisible by 3 (row|col|depth position tables)")
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.patch_dim = v.patch_hw * v.patch_hw * v.patch_d * v.channels
    self.patch_norm_in = layers.LayerNorm(self.patch_dim, eps=v.ln_eps, **kw)
    self.patch_proj = layers.Dense(self.patch_dim, v.dim, axes=("patch", "embed"), use_bias=True, **kw)
    self.patch_norm_out = layers.LayerNorm(v.dim, eps=v.ln_eps, **kw)
    normal = nnx.initializers.normal(1.0)  # torch nn.Embedding default
    third = v.dim // 3
    self.pos_row = layers.param(rngs, normal, (v.pos_rows, third), ("pos", "pos_embed"), cfg.param_dtype)
    self.pos_col = layers.param(rngs, normal, (v.pos_cols, third), ("pos", "pos_embed"), cfg.param_dtype)
    self.pos_dep = layers.param(rngs, normal, (v.pos_deps, third), ("pos", "pos_embed"), cfg.param_dtype)
    self.blocks = layers.stack_blocks(lambda r: ViTBlock(cfg, rngs=r), v.depth, rngs)
    self.emb_dropout = nnx.Dropout(float(v.get("emb_dropout", 0.0)))
    self.cfg = v
    self.remat, self.scan = cfg.remat, cfg.scan_layers
    self.dtype = layers.dtype_of(cfg.dtype)

  def grid(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Patch grid (h, w, d) for a volume shape [..., H, W, D, C]; raises ValueError on bad sizes."""
    v = self.cfg
    hh, ww, dd, c = shape[-4:]
    if c != v.channels:
      raise ValueError(f"images have {c} channels (last axis); cfg.vision.channels={v.channels}")
    for name, size, p in (("H", hh, v.patch_hw), ("W", ww, v.patch_hw), ("D", dd, v.patch_d)):
      if size % p or size == 0:
        raise ValueError(f"image {name}={size} is not a positive multiple of the patch size {p} "
                         f"(images are [B, S, H, W, D, C])")
    g = (hh // v.patch_hw, ww // v.patch_hw, dd // v.patch_d)
    for name, n, t in (("H", g[0], v.pos_rows), ("W", g[1], v.pos_cols), ("D", g[2], v.pos_deps)):
      if n > t:
        raise ValueError(f"image {name} gives {n} patches; the position table allows at most {t} "
                         f"(max {name} = {t * (v.patch_d if name == 'D' else v.patch_hw)})")
    return g

  def patchify(self, x: jax.Array) -> jax.Array:
    """[N, H, W, D, C] -> [N, h*w*d, ph*pw*pd*C] (tokens h, w, d-fastest; patch p_h, p_w, p_d, c)."""
    v = self.cfg
    gh, gw, gd = self.grid(x.shape)
    n = x.shape[0]
    x = x.reshape(n, gh, v.patch_hw, gw, v.patch_hw, gd, v.patch_d, v.channels)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(n, gh * gw * gd, self.patch_dim)

  def pos_embedding(self, gh: int, gw: int, gd: int) -> jax.Array:
    """[gh*gw*gd, dim] position embedding for a grid (RadFM's strided index rule)."""
    v = self.cfg
    r = self.pos_row[...][position_indices(gh, v.pos_rows, "H")]
    c = self.pos_col[...][position_indices(gw, v.pos_cols, "W")]
    d = self.pos_dep[...][position_indices(gd, v.pos_deps, "D")]
    third = r.shape[-1]
    pos = jnp.concatenate([
        jnp.broadcast_to(r[:, None, None], (gh, gw, gd, third)),
        jnp.broadcast_to(c[None, :, None], (gh, gw, gd, third)),
        jnp.broadcast_to(d[None, None, :], (gh, gw, gd, third))], axis=-1)
    return pos.reshape(gh * gw * gd, 3 * third)

  def __call__(self, volumes: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """volumes [N, H, W, D, C] -> tokens; dropout only when `dropout_key` (a PRNG key) is given."""
    if volumes.ndim != 5:
      raise ValueError(f"ViT expects volumes [N, H, W, D, C], got shape {volumes.shape}")
    gh, gw, gd = self.grid(volumes.shape)
    x = self.patch_norm_out(self.patch_proj(self.patch_norm_in(self.patchify(volumes))))
    x = (x.astype(jnp.float32) + self.pos_embedding(gh, gw, gd).astype(jnp.float32)).astype(self.dtype)
    emb_key, layer_keys = None, None
    if dropout_key is not None:
      emb_key, blocks_key = jax.random.split(dropout_key)
      layer_keys = jax.random.split(blocks_key, self.cfg.depth)
    x = self.emb_dropout(x, deterministic=emb_key is None, rngs=emb_key)
    x, _ = layers.scan_blocks(self.blocks, lambda blk, h, k: (blk(h, k), None), constrain(x, ACT),
                              layer_keys, remat=self.remat, scan=self.scan)
    return x
