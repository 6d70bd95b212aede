"""RadFM's released torch checkpoint (`pytorch_model.bin`) <-> our `RadFM` parameters: the key table.

Torch keys and shapes: /work/shared/radfm_reference.md section 3 (vision encoder, perceiver and fc under
`embedding_layer.`, the LLaMA under `lang_model.`). Our tree: `radfm_jax.models.radfm` (vision/,
resampler/, fc, image_marker_embed, lm/). Fused torch projections are split by rows: the ViT's
`to_qkv` is q|k|v, the perceiver's `to_kv` is k|v. `embedding_layer.weight` is upstream's second
reference to the LLaMA input embedding: it is checked equal to `lang_model.model.embed_tokens.weight`
on import and written as a copy on export.

Dropped on import (reported): modules RadFM never uses at inference (`embedding_layer.bert_model`,
`bert_projection_fc`, `transformer_decoder`, `transformer_decoder_mlp`, `cls_head`, `output_upscaling`,
incl. BatchNorm running statistics) and the LLaMA `rotary_emb.inv_freq` buffers.

The table is driven by our config, so RadFM's vision tower combines with any LM size (tests use the
tiny config).
"""
from __future__ import annotations

from typing import Any, Iterator

import ml_collections
import numpy as np

from radfm_jax import checkpoint
from radfm_jax.convert import common
from radfm_jax.convert.hf_llama import lm_dropped, lm_rules
from radfm_jax.convert.mapping import Layout, Report, Rule
from radfm_jax.convert.sources import Source, open_source

LM_PREFIX = "lang_model."
EMBED_ALIAS = "embedding_layer.weight"
UNUSED_MODULES = ("bert_model", "bert_projection_fc", "transformer_decoder", "transformer_decoder_mlp",
                  "cls_head", "output_upscaling")


def _norm(theirs: str, ours: str) -> list[Rule]:
  return [Rule(theirs + ".weight", ours + "/scale"), Rule(theirs + ".bias", ours + "/bias")]


def _dense(theirs: str, ours: str, in_axes: int = 1, bias: bool = True) -> list[Rule]:
  rules = [Rule(theirs + ".weight", ours + "/kernel", linear=True, in_axes=in_axes)]
  if bias:
    rules.append(Rule(theirs + ".bias", ours + "/bias"))
  return rules


def vision_rules(t: str = "embedding_layer.vision_encoder.", o: str = "vision/") -> list[Rule]:
  blk, ob = t + "transformer.layers.{i}.", o + "blocks/"
  return [
      *_norm(t + "to_patch_embedding.1", o + "patch_norm_in"),
      *_dense(t + "to_patch_embedding.2", o + "patch_proj"),
      *_norm(t + "to_patch_embedding.3", o + "patch_norm_out"),
      Rule(t + "pos_embedding.row_embed.weight", o + "pos_row"),
      Rule(t + "pos_embedding.col_embed.weight", o + "pos_col"),
      Rule(t + "pos_embedding.dep_embed.weight", o + "pos_dep"),
      *_norm(blk + "0.norm", ob + "attn_norm"),
      Rule(blk + "0.fn.to_qkv.weight", (ob + "q/kernel", ob + "k/kernel", ob + "v/kernel"), linear=True),
      *_dense(blk + "0.fn.to_out.0", ob + "o", in_axes=2),
      *_norm(blk + "1.norm", ob + "mlp_norm"),
      *_dense(blk + "1.fn.net.0", ob + "fc1"),
      *_dense(blk + "1.fn.net.3", ob + "fc2"),
  ]


def resampler_rules(t: str = "embedding_layer.perceiver.", o: str = "resampler/") -> list[Rule]:
  blk, ob = t + "layers.{i}.", o + "blocks/"
  return [
      Rule(t + "latents", o + "latents"),
      *_norm(blk + "0.norm_media", ob + "norm_media"),
      *_norm(blk + "0.norm_latents", ob + "norm_latents"),
      Rule(blk + "0.to_q.weight", ob + "q/kernel", linear=True),
      Rule(blk + "0.to_kv.weight", (ob + "k/kernel", ob + "v/kernel"), linear=True),
      Rule(blk + "0.to_out.weight", ob + "o/kernel", linear=True, in_axes=2),
      *_norm(blk + "1.0", ob + "ff_norm"),
      Rule(blk + "1.1.weight", ob + "ff_in/kernel", linear=True),
      Rule(blk + "1.3.weight", ob + "ff_out/kernel", linear=True),
      *_norm(t + "norm", o + "norm"),
  ]


def radfm_layout() -> Layout:
  """The full key table of RadFM's `pytorch_model.bin`."""
  rules = [
      *vision_rules(),
      *resampler_rules(),
      *_dense("embedding_layer.fc", "fc"),
      Rule("embedding_layer.figure_token_weight", "image_marker_embed"),
      *lm_rules(LM_PREFIX, "lm/"),
  ]
  dropped = [rf"embedding_layer\.{m}\..*" for m in UNUSED_MODULES] + lm_dropped(LM_PREFIX)
  return Layout(rules=rules, dropped=dropped,
                aliases={EMBED_ALIAS: LM_PREFIX + "model.embed_tokens.weight"})


def import_radfm_torch(src: str | Source, cfg: ml_collections.ConfigDict, dst: str, *, mesh: Any = None,
                       dtype: Any = None, overwrite: bool = False) -> Report:
  """RadFM's `pytorch_model.bin` (or a safetensors copy) -> a "radfm" checkpoint at `dst`.

  `src` is a path or an open `Source`. `cfg` is a full config whose model section matches the file (e.g. configs/radfm_13b.py); params go
  onto `mesh` (default: cfg.mesh) one tensor at a time, cast to `dtype` if given.
  """
  mesh = mesh if mesh is not None else common.default_mesh(cfg)
  return common.torch_to_checkpoint(
      src if isinstance(src, Source) else open_source(src), radfm_layout(), cfg, "radfm", dst, mesh=mesh,
                                    dtype=dtype, overwrite=overwrite,
                                    extra={"source_format": "radfm-torch"})


def export_radfm_torch(ckpt_dir: str, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
  """A "radfm" checkpoint as RadFM torch-layout (key, tensor) pairs, one parameter read at a time
  (the unused upstream modules are not produced)."""
  kind = checkpoint.read_meta(ckpt_dir)["model_class"]
  if kind != "radfm":
    raise ValueError(f"{ckpt_dir} holds a {kind!r} model; RadFM torch layout needs a 'radfm' checkpoint")
  return common.checkpoint_to_torch(ckpt_dir, radfm_layout(), dtype=dtype)
