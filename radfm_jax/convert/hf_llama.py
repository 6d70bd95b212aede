"""Hugging Face LLaMA <-> our `Llama`: config.json translation and the key table.

Our LM parameter tree is documented in `radfm_jax.models.llama`. The same table serves RadFM's torch
file, whose LM lives under `lang_model.` (see `radfm_torch`), by choosing the prefixes.

config.json -> cfg.model fields: hidden_size -> lm.hidden, num_hidden_layers -> lm.layers,
num_attention_heads -> lm.heads, num_key_value_heads -> lm.kv_heads (default: heads), head_dim
(default hidden/heads) -> lm.head_dim, intermediate_size -> lm.mlp, rms_norm_eps -> lm.rms_eps,
rope_parameters.rope_theta (transformers 5) or rope_theta (4.x) -> lm.rope_theta,
max_position_embeddings -> lm.max_len, vocab_size -> vocab_size. Features our model does not have
(biases, RoPE scaling, a non-SiLU activation, tied embeddings) are rejected with the field named.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Mapping

import ml_collections
import numpy as np

from radfm_jax import checkpoint
from radfm_jax.convert import common
from radfm_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from radfm_jax.convert.mapping import Layout, Report, Rule
from radfm_jax.convert.sources import open_source


def lm_rules(theirs: str = "", ours: str = "") -> list[Rule]:
  """Key table for one LLaMA: HF keys under `theirs` (e.g. "" or "lang_model."), ours under `ours`
  (e.g. "" for a bare `Llama`, "lm/" inside RadFM)."""
  t, o = theirs + "model.", ours
  layer = t + "layers.{i}."
  return [
      Rule(t + "embed_tokens.weight", o + "embed_tokens"),
      Rule(layer + "input_layernorm.weight", o + "blocks/attn_norm/scale"),
      Rule(layer + "self_attn.q_proj.weight", o + "blocks/q/kernel", linear=True),
      Rule(layer + "self_attn.k_proj.weight", o + "blocks/k/kernel", linear=True),
      Rule(layer + "self_attn.v_proj.weight", o + "blocks/v/kernel", linear=True),
      Rule(layer + "self_attn.o_proj.weight", o + "blocks/o/kernel", linear=True, in_axes=2),
      Rule(layer + "post_attention_layernorm.weight", o + "blocks/mlp_norm/scale"),
      Rule(layer + "mlp.gate_proj.weight", o + "blocks/gate/kernel", linear=True),
      Rule(layer + "mlp.up_proj.weight", o + "blocks/up/kernel", linear=True),
      Rule(layer + "mlp.down_proj.weight", o + "blocks/down/kernel", linear=True),
      Rule(t + "norm.weight", o + "final_norm/scale"),
      Rule(theirs + "lm_head.weight", o + "lm_head/kernel", linear=True),
  ]


def lm_dropped(theirs: str = "") -> list[str]:
  """RoPE inverse-frequency buffers (older transformers saved them; we recompute RoPE)."""
  return [re.escape(theirs) + r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]


def hf_layout() -> Layout:
  return Layout(rules=lm_rules(), dropped=lm_dropped())


# ----------------------------------------------------------------------------------------------------
# config.json


def read_hf_config(model_dir: str) -> dict[str, Any]:
  path = os.path.join(model_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{model_dir}: no config.json (expected a Hugging Face LLaMA directory)")
  with open(path) as fh:
    return json.load(fh)


def rope_theta(hf: Mapping[str, Any], where: str = "config.json") -> float:
  rp = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  for d in (rp, scaling):
    kind = d.get("rope_type", d.get("type", "default"))
    if kind not in ("default", None):
      raise ValueError(f"{where}: rope type {kind!r} is not supported (only default RoPE)")
  theta = rp.get("rope_theta", hf.get("rope_theta", 10000.0))
  return float(theta)


def lm_config_from_hf(hf: Mapping[str, Any], where: str = "config.json") -> tuple[ml_collections.ConfigDict, int]:
  """(cfg.model.lm section, vocab_size) from a Hugging Face LLaMA config dict."""
  if hf.get("model_type", "llama") != "llama":
    raise ValueError(f"{where}: model_type={hf.get('model_type')!r}, expected 'llama'")
  for field, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu"),
                    ("tie_word_embeddings", False)):
    if hf.get(field, ok) != ok:
      raise ValueError(f"{where}: {field}={hf[field]!r} is not supported (our LLaMA needs {ok!r})")
  if hf.get("pretraining_tp", 1) not in (1, None):
    raise ValueError(f"{where}: pretraining_tp={hf['pretraining_tp']} is not supported (needs 1)")
  heads = int(hf["num_attention_heads"])
  lm = ml_collections.ConfigDict(dict(
      hidden=int(hf["hidden_size"]),
      layers=int(hf["num_hidden_layers"]),
      heads=heads,
      kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
      mlp=int(hf["intermediate_size"]),
      rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=rope_theta(hf, where),
      max_len=int(hf.get("max_position_embeddings", 2048)),
  ))
  return lm, int(hf["vocab_size"])


def hf_config_from_lm(lm: Any, vocab_size: int, dtype: str = "float32",
                      bos_id: int = BOS_ID, eos_id: int = EOS_ID, pad_id: int | None = PAD_ID) -> dict[str, Any]:
  """A transformers 5.x `LlamaConfig` dict (config.json) for our LM config (also read by 4.x)."""
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "hidden_size": int(lm.hidden),
      "num_hidden_layers": int(lm.layers),
      "num_attention_heads": int(lm.heads),
      "num_key_value_heads": int(lm.kv_heads),
      "head_dim": int(lm.head_dim),
      "intermediate_size": int(lm.mlp),
      "rms_norm_eps": float(lm.rms_eps),
      "rope_parameters": {"rope_type": "default", "rope_theta": float(lm.rope_theta)},
      "rope_theta": float(lm.rope_theta),
      "max_position_embeddings": int(lm.max_len),
      "vocab_size": int(vocab_size),
      "hidden_act": "silu",
      "attention_bias": False,
      "mlp_bias": False,
      "tie_word_embeddings": False,
      "bos_token_id": bos_id,
      "eos_token_id": eos_id,
      "pad_token_id": pad_id,
      "dtype": dtype,
      "torch_dtype": dtype,
  }


# ----------------------------------------------------------------------------------------------------
# Directory <-> checkpoint


def lm_model_config(lm: ml_collections.ConfigDict, vocab_size: int,
                    base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """cfg.model for an LM: `base` (e.g. a RadFM config's model section, which keeps its vision tower and
  compute settings) with lm / vocab_size replaced, or a minimal LM-only section (no image slots: a text
  vocabulary plus RadFM's two marker ids, fp32, no remat)."""
  if base is None:
    m = ml_collections.ConfigDict(dict(vocab_size=vocab_size, max_images=0, tokens_per_image=32,
                                       dtype="float32", param_dtype="float32", remat="none",
                                       scan_layers=True))
  else:
    m = ml_collections.ConfigDict(base.to_dict())
    m.vocab_size = vocab_size
  m.lm = lm
  return m


def hf_llama_config(src_dir: str, base_cfg: ml_collections.ConfigDict | None = None
                    ) -> ml_collections.ConfigDict:
  """The full config of an LM imported from `src_dir`: `base_cfg` (if any) with the LM from config.json."""
  lm, vocab = lm_config_from_hf(read_hf_config(src_dir), os.path.join(src_dir, "config.json"))
  cfg = ml_collections.ConfigDict(base_cfg.to_dict()) if base_cfg is not None else ml_collections.ConfigDict()
  cfg.model = lm_model_config(lm, vocab, cfg.get("model"))
  spm = os.path.join(src_dir, "tokenizer.model")
  if os.path.isfile(spm):  # the weights' own vocabulary wins over a base config's tokenizer
    if "data" not in cfg:
      cfg.data = ml_collections.ConfigDict()
    cfg.data.tokenizer = os.path.abspath(spm)  # copied into the checkpoint by save_model
  return cfg


def import_hf_llama(src_dir: str, dst: str, *, base_cfg: ml_collections.ConfigDict | None = None,
                    mesh: Any = None, dtype: Any = None, overwrite: bool = False) -> Report:
  """A Hugging Face LLaMA directory -> an LM-only ("llama") checkpoint at `dst`, dims from config.json.

  `base_cfg` (a full config) supplies everything but the LM (kept so the checkpoint can seed a RadFM);
  its mesh section, if any, places the params. The directory's `tokenizer.model`, if any, becomes
  cfg.data.tokenizer (copied into the checkpoint), replacing base_cfg's. Returns the key report.
  """
  hf = read_hf_config(src_dir)
  cfg = hf_llama_config(src_dir, base_cfg)
  mesh = mesh if mesh is not None else common.default_mesh(cfg)
  return common.torch_to_checkpoint(open_source(src_dir), hf_layout(), cfg, "llama", dst, mesh=mesh,
                                    dtype=dtype, overwrite=overwrite,
                                    extra={"source_format": "hf-llama", "hf_config": hf})


def export_hf_llama(ckpt_dir: str, dst_dir: str, *, dtype: Any = None,
                    max_shard_bytes: int = 5 << 30) -> list[str]:
  """Our checkpoint's LM (a "llama" checkpoint, or the `lm/` of a RadFM one) -> a Hugging Face LLaMA
  directory (config.json + safetensors, + tokenizer.model when the checkpoint has one) loadable by
  `LlamaForCausalLM.from_pretrained`. Returns the written weight (and tokenizer) file names."""
  meta = checkpoint.read_meta(ckpt_dir)
  cfg = checkpoint.load_config(ckpt_dir)
  prefix = "lm/" if meta["model_class"] == "radfm" else ""
  saved = {str(m.dtype) for p, m in checkpoint.param_metadata(ckpt_dir).items() if p.startswith(prefix)}
  out_dtype = np.dtype(dtype).name if dtype is not None else (saved.pop() if len(saved) == 1 else "float32")
  files = common.write_safetensors(
      common.checkpoint_to_torch(ckpt_dir, hf_layout(), prefix, dtype=np.dtype(out_dtype) if dtype else None),
      dst_dir, max_shard_bytes=max_shard_bytes)
  with open(os.path.join(dst_dir, "config.json"), "w") as fh:
    json.dump(hf_config_from_lm(cfg.model.lm, cfg.model.vocab_size, dtype=out_dtype), fh, indent=1)
  tok = checkpoint.tokenizer_file(ckpt_dir, meta)  # inside the checkpoint, sha256 checked
  if tok:  # the SentencePiece model travels with the weights (LLaMA's tokenizer.model)
    shutil.copyfile(tok, os.path.join(dst_dir, "tokenizer.model"))
    files.append("tokenizer.model")
  return files
