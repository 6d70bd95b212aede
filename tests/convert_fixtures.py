"""Test fixture: a RadFM-layout torch state dict with the keys documented in
/work/shared/radfm_reference.md section 3 (written here independently of radfm_jax.convert's tables),
small shapes from a config, plus a few keys of each unused upstream module, and a plain-torch
reference of RadFM's image path (ViT -> perceiver -> fc) written from the same document."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

UNUSED_KEYS = {  # a few keys per unused module, arbitrary small shapes (names as in the release)
    "embedding_layer.bert_model.embeddings.word_embeddings.weight": (11, 8),
    "embedding_layer.bert_model.encoder.layer.0.attention.self.query.weight": (8, 8),
    "embedding_layer.bert_projection_fc.weight": (6, 8),
    "embedding_layer.bert_projection_fc.bias": (6,),
    "embedding_layer.transformer_decoder.layers.0.self_attn.in_proj_weight": (24, 8),
    "embedding_layer.transformer_decoder_mlp.0.weight": (8, 8),
    "embedding_layer.cls_head.weight": (2, 8),
    "embedding_layer.output_upscaling.0.weight": (8, 4, 2, 2, 2),
    "embedding_layer.output_upscaling.1.weight": (4,),
    "embedding_layer.output_upscaling.1.running_mean": (4,),
    "embedding_layer.output_upscaling.1.running_var": (4,),
    "embedding_layer.output_upscaling.1.num_batches_tracked": (),
}


def documented_shapes(m) -> dict[str, tuple[int, ...]]:
  """{key: shape} of the used RadFM keys for model config `m` (torch Linear weights are [out, in])."""
  v, r, lm = m.vision, m.resampler, m.lm
  e, vi = v.dim, v.heads * v.head_dim
  pdim = v.patch_hw * v.patch_hw * v.patch_d * v.channels
  ri, f = r.heads * r.head_dim, v.dim * r.ff_mult
  h, q, kv = lm.hidden, lm.heads * lm.head_dim, lm.kv_heads * lm.head_dim
  s = {}
  ve = "embedding_layer.vision_encoder."
  s.update({ve + "to_patch_embedding.1.weight": (pdim,), ve + "to_patch_embedding.1.bias": (pdim,),
            ve + "to_patch_embedding.2.weight": (e, pdim), ve + "to_patch_embedding.2.bias": (e,),
            ve + "to_patch_embedding.3.weight": (e,), ve + "to_patch_embedding.3.bias": (e,),
            ve + "pos_embedding.row_embed.weight": (v.pos_rows, e // 3),
            ve + "pos_embedding.col_embed.weight": (v.pos_cols, e // 3),
            ve + "pos_embedding.dep_embed.weight": (v.pos_deps, e // 3)})
  for i in range(v.depth):
    b = f"{ve}transformer.layers.{i}."
    s.update({b + "0.norm.weight": (e,), b + "0.norm.bias": (e,), b + "0.fn.to_qkv.weight": (3 * vi, e),
              b + "0.fn.to_out.0.weight": (e, vi), b + "0.fn.to_out.0.bias": (e,),
              b + "1.norm.weight": (e,), b + "1.norm.bias": (e,),
              b + "1.fn.net.0.weight": (v.mlp_dim, e), b + "1.fn.net.0.bias": (v.mlp_dim,),
              b + "1.fn.net.3.weight": (e, v.mlp_dim), b + "1.fn.net.3.bias": (e,)})
  pr = "embedding_layer.perceiver."
  s[pr + "latents"] = (m.tokens_per_image, e)
  for i in range(r.depth):
    b = f"{pr}layers.{i}."
    s.update({b + "0.norm_media.weight": (e,), b + "0.norm_media.bias": (e,),
              b + "0.norm_latents.weight": (e,), b + "0.norm_latents.bias": (e,),
              b + "0.to_q.weight": (ri, e), b + "0.to_kv.weight": (2 * ri, e), b + "0.to_out.weight": (e, ri),
              b + "1.0.weight": (e,), b + "1.0.bias": (e,), b + "1.1.weight": (f, e), b + "1.3.weight": (e, f)})
  s.update({pr + "norm.weight": (e,), pr + "norm.bias": (e,)})
  s.update({"embedding_layer.fc.weight": (h, e), "embedding_layer.fc.bias": (h,),
            "embedding_layer.figure_token_weight": (2, h), "embedding_layer.weight": (m.vocab_size, h)})
  s["lang_model.model.embed_tokens.weight"] = (m.vocab_size, h)
  for i in range(lm.layers):
    b = f"lang_model.model.layers.{i}."
    s.update({b + "self_attn.q_proj.weight": (q, h), b + "self_attn.k_proj.weight": (kv, h),
              b + "self_attn.v_proj.weight": (kv, h), b + "self_attn.o_proj.weight": (h, q),
              b + "mlp.gate_proj.weight": (lm.mlp, h), b + "mlp.up_proj.weight": (lm.mlp, h),
              b + "mlp.down_proj.weight": (h, lm.mlp),
              b + "input_layernorm.weight": (h,), b + "post_attention_layernorm.weight": (h,)})
  s.update({"lang_model.model.norm.weight": (h,), "lang_model.lm_head.weight": (m.vocab_size, h)})
  return s


def inv_freq_keys(m) -> dict[str, tuple[int, ...]]:
  return {f"lang_model.model.layers.{i}.self_attn.rotary_emb.inv_freq": (m.lm.head_dim // 2,)
          for i in range(m.lm.layers)}


def make_state_dict(m, seed: int = 0) -> dict[str, torch.Tensor]:
  """Random tensors for every documented key + inv_freq + unused modules; norms near 1."""
  g = torch.Generator().manual_seed(seed)
  sd = {}
  for k, shape in {**documented_shapes(m), **inv_freq_keys(m), **UNUSED_KEYS}.items():
    if k.endswith("num_batches_tracked"):
      sd[k] = torch.tensor(7, dtype=torch.int64)
      continue
    fan_in = shape[-1] if len(shape) == 2 else 1
    t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    if len(shape) == 1 and ("norm" in k or k.endswith(("1.weight", "3.weight", "1.0.weight"))):
      t = 1.0 + 0.1 * t
    sd[k] = t
  sd["embedding_layer.weight"] = sd["lang_model.model.embed_tokens.weight"].clone()
  return sd


def _ln(x, sd, p, eps):
  return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], eps)


def _attn(q, k, v, heads):
  n, t, _ = q.shape
  split = lambda x: x.reshape(n, x.shape[1], heads, -1).transpose(1, 2)
  q, k, v = split(q), split(k), split(v)
  a = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
  return (a @ v).transpose(1, 2).reshape(n, t, -1)


def reference_image_tokens(sd: dict[str, torch.Tensor], m, images: torch.Tensor) -> torch.Tensor:
  """RadFM's image path in plain torch: images [N, C, H, W, D] (upstream layout) -> [N, T, hidden]."""
  v, r = m.vision, m.resampler
  n, c, hh, ww, dd = images.shape
  ph, pd = v.patch_hw, v.patch_d
  gh, gw, gd = hh // ph, ww // ph, dd // pd
  # 'b c (h p1) (w p2) (f pf) -> b (h w f) (p1 p2 pf c)'
  x = images.reshape(n, c, gh, ph, gw, ph, gd, pd).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(n, gh * gw * gd, -1)
  ve = "embedding_layer.vision_encoder."
  x = _ln(x, sd, ve + "to_patch_embedding.1", v.ln_eps)
  x = F.linear(x, sd[ve + "to_patch_embedding.2.weight"], sd[ve + "to_patch_embedding.2.bias"])
  x = _ln(x, sd, ve + "to_patch_embedding.3", v.ln_eps)
  idx = lambda k, t: (torch.arange(k) + 1) * (t // k) - 1
  row = sd[ve + "pos_embedding.row_embed.weight"][idx(gh, v.pos_rows)]
  col = sd[ve + "pos_embedding.col_embed.weight"][idx(gw, v.pos_cols)]
  dep = sd[ve + "pos_embedding.dep_embed.weight"][idx(gd, v.pos_deps)]
  third = row.shape[-1]
  pos = torch.cat([row[:, None, None].expand(gh, gw, gd, third), col[None, :, None].expand(gh, gw, gd, third),
                   dep[None, None].expand(gh, gw, gd, third)], dim=-1).reshape(gh * gw * gd, -1)
  x = x + pos
  for i in range(v.depth):
    b = f"{ve}transformer.layers.{i}."
    a = _ln(x, sd, b + "0.norm", v.ln_eps)
    q, k, vv = F.linear(a, sd[b + "0.fn.to_qkv.weight"]).chunk(3, dim=-1)
    x = x + F.linear(_attn(q, k, vv, v.heads), sd[b + "0.fn.to_out.0.weight"], sd[b + "0.fn.to_out.0.bias"])
    h = F.gelu(F.linear(_ln(x, sd, b + "1.norm", v.ln_eps), sd[b + "1.fn.net.0.weight"], sd[b + "1.fn.net.0.bias"]))
    x = x + F.linear(h, sd[b + "1.fn.net.3.weight"], sd[b + "1.fn.net.3.bias"])
  pr = "embedding_layer.perceiver."
  lat = sd[pr + "latents"].expand(n, -1, -1)
  for i in range(r.depth):
    b = f"{pr}layers.{i}."
    med, ln = _ln(x, sd, b + "0.norm_media", r.ln_eps), _ln(lat, sd, b + "0.norm_latents", r.ln_eps)
    q = F.linear(ln, sd[b + "0.to_q.weight"])
    k, vv = F.linear(torch.cat([med, ln], dim=1), sd[b + "0.to_kv.weight"]).chunk(2, dim=-1)
    lat = lat + F.linear(_attn(q, k, vv, r.heads), sd[b + "0.to_out.weight"])
    h = F.gelu(F.linear(F.layer_norm(lat, (lat.shape[-1],), sd[b + "1.0.weight"], sd[b + "1.0.bias"], r.ln_eps),
                        sd[b + "1.1.weight"]))
    lat = lat + F.linear(h, sd[b + "1.3.weight"])
  lat = _ln(lat, sd, pr + "norm", r.ln_eps)
  return F.linear(lat, sd["embedding_layer.fc.weight"], sd["embedding_layer.fc.bias"])
