"""LoRA adapters of the language model <-> Hugging Face PEFT (adapter_config.json + adapter_model.safetensors).

  python -m radfm_jax.convert --to=peft-lora --src=CKPT --dst=PEFT_DIR
      CKPT: a checkpoint with adapters (an adapters-only one from `export --adapters_only`, or a full one)
  python -m radfm_jax.convert --from=peft-lora --src=PEFT_DIR --base=BASE_CKPT --dst=ADAPTERS_CKPT
      -> an adapters-only checkpoint for BASE_CKPT (an LM-only "llama" checkpoint or a RadFM one)

`peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(HF_DIR), PEFT_DIR)` loads the export onto
the LM that `convert --to=hf-llama` writes from the base checkpoint, with the same logits.

Key table (i = layer; our factors a [L, *in, r], b [L, r, *out], see radfm_jax.models.lora):
  lm/blocks/{q,k,v,o}/lora/{a,b}      base_model.model.model.layers.i.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight
  lm/blocks/{gate,up,down}/lora/{a,b} base_model.model.model.layers.i.mlp.{gate,up,down}_proj.lora_{A,B}.weight
  lm/lm_head/lora/{a,b}               base_model.model.lm_head.lora_{A,B}.weight
  lora_A.weight [r, in] = a[i].reshape(in, r).T ;  lora_B.weight [out, r] = b[i].reshape(r, out).T
(PEFT's y = x W^T + (alpha/r) (x A^T) B^T is ours with A = a^T, B = b^T.) Adapters elsewhere (vision,
resampler) and other trained parameters have no place in an HF LLaMA adapter: they are listed and left out.
Imports accept what PEFT's LoRA writes for LLaMA: rsLoRA (scale alpha/sqrt(r), folded into alpha), a
subset of layers (`layers_to_transform`: other layers get zero adapters); DoRA, biases, per-module
ranks/alphas and fan_in_fan_out are rejected with the field named.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from radfm_jax import checkpoint
from radfm_jax.models import lora

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_KEY = re.compile(r"^base_model\.model\.(?:model\.layers\.(\d+)\.([a-z_]+\.[a-z_]+)|(lm_head))\."
                  r"lora_([AB])\.(?:[A-Za-z0-9_]+\.)?weight$")


def _prefix(model_class: str) -> str:
  return "lm/" if model_class == "radfm" else ""


def _features(cfg_model: Any) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
  """Our (in_features, out_features) of each adaptable LM Dense."""
  lm, v = cfg_model.lm, int(cfg_model.vocab_size)
  e, h, k, d, m = int(lm.hidden), int(lm.heads), int(lm.kv_heads), int(lm.head_dim), int(lm.mlp)
  return {"q": ((e,), (h, d)), "k": ((e,), (k, d)), "v": ((e,), (k, d)), "o": ((h, d), (e,)),
          "gate": ((e,), (m,)), "up": ((e,), (m,)), "down": ((m,), (e,)), "lm_head": ((e,), (v,))}


def _our_path(prefix: str, name: str) -> str:
  return f"{prefix}lm_head/" if name == "lm_head" else f"{prefix}blocks/{name}/"


# ----------------------------------------------------------------------------------------------------
# Export


def export_peft(ckpt_dir: str, dst_dir: str, *, base_model_name_or_path: str | None = None) -> list[str]:
  """Writes the LM adapters of `ckpt_dir` as a PEFT LoRA directory; returns the tensor keys written."""
  from safetensors.numpy import save_file  # optional dependency of the export only
  meta = checkpoint.read_meta(ckpt_dir)
  cfg = ml_collections.ConfigDict(meta["config"])
  lcfg = lora.section(cfg)
  if lcfg is None:
    raise ValueError(f"{ckpt_dir}: no LoRA in its config (lora.rank is 0 or missing)")
  prefix = _prefix(meta["model_class"])
  saved = checkpoint.param_metadata(ckpt_dir)
  ad_paths = sorted(p for p in saved if lora.is_adapter(p))
  feats = _features(cfg.model)
  names = {n: _our_path(prefix, n) for n in feats}
  ours = {n: (p + "lora/a", p + "lora/b") for n, p in names.items() if p + "lora/a" in saved}
  left_out = [p for p in ad_paths if not any(p in pair for pair in ours.values())]
  if left_out:
    logging.warning("%s: adapters outside the HF LLaMA are not exported to PEFT: %s", ckpt_dir, left_out)
  if not ours:
    raise ValueError(f"{ckpt_dir}: no language-model adapters to export (adapters: {ad_paths[:8]})")
  arrays = checkpoint.read_params(ckpt_dir, [p for pair in ours.values() for p in pair])
  r = int(lcfg.rank)
  tensors: dict[str, np.ndarray] = {}
  for name, (pa, pb) in ours.items():
    a, b = np.asarray(arrays[pa], np.float32), np.asarray(arrays[pb], np.float32)
    stacked = name != "lm_head"
    for i in range(a.shape[0] if stacked else 1):
      ai, bi = (a[i], b[i]) if stacked else (a, b)
      key = ("base_model.model.lm_head" if name == "lm_head"
             else f"base_model.model.model.layers.{i}.{HF_MODULES[name]}")
      tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(ai.reshape(-1, r).T)
      tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(bi.reshape(r, -1).T)
  os.makedirs(dst_dir, exist_ok=True)
  save_file(tensors, os.path.join(dst_dir, WEIGHTS_FILE), metadata={"format": "pt"})
  targets = sorted("lm_head" if n == "lm_head" else HF_MODULES[n].split(".")[1] for n in ours)
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": float(lcfg.alpha),
      "lora_dropout": float(lcfg.get("dropout", 0.0)), "target_modules": targets, "bias": "none",
      "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
      "inference_mode": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
      "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": base_model_name_or_path,
      "revision": None,
      "auto_mapping": {"base_model_class": "LlamaForCausalLM",
                       "parent_library": "transformers.models.llama.modeling_llama"},
  }
  with open(os.path.join(dst_dir, CONFIG_FILE), "w") as fh:
    json.dump(config, fh, indent=1)
  return sorted(tensors)


# ----------------------------------------------------------------------------------------------------
# Import


def _check_config(pc: dict, where: str) -> None:
  if pc.get("peft_type") != "LORA":
    raise ValueError(f"{where}: peft_type={pc.get('peft_type')!r}, expected 'LORA'")
  for field, ok in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none"), ("lora_bias", False)):
    if pc.get(field, ok) not in (ok, None):
      raise ValueError(f"{where}: {field}={pc[field]!r} is not supported (needs {ok!r})")
  for field in ("rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication",
                "trainable_token_indices", "target_parameters"):
    if pc.get(field):
      raise ValueError(f"{where}: {field}={pc[field]!r} is not supported")


def import_peft(src_dir: str, base_ckpt: str, dst: str, *, overwrite: bool = False) -> list[str]:
  """A PEFT LoRA directory for the LM of `base_ckpt` -> an adapters-only checkpoint at `dst`
  (load with `checkpoint.load_model(base_ckpt, adapters=dst)`). Returns our parameter paths written."""
  from safetensors.numpy import load_file  # optional dependency of the import only
  where = os.path.join(src_dir, CONFIG_FILE)
  if not os.path.isfile(where):
    raise FileNotFoundError(f"{src_dir}: no {CONFIG_FILE} (expected a PEFT LoRA directory)")
  with open(where) as fh:
    pc = json.load(fh)
  _check_config(pc, where)
  r, alpha = int(pc["r"]), float(pc["lora_alpha"])
  if pc.get("use_rslora"):  # PEFT scale alpha/sqrt(r) == (alpha*sqrt(r))/r
    alpha *= math.sqrt(r)
  weights = os.path.join(src_dir, WEIGHTS_FILE)
  if not os.path.isfile(weights):
    raise FileNotFoundError(f"{src_dir}: no {WEIGHTS_FILE}")
  tensors = load_file(weights)
  meta = checkpoint.read_meta(base_ckpt)
  cfg = checkpoint.load_config(base_ckpt)
  prefix, feats, n_layers = _prefix(meta["model_class"]), _features(cfg.model), int(cfg.model.lm.layers)
  hf_to_ours = {v: k for k, v in HF_MODULES.items()}
  found: dict[str, dict[int, dict[str, np.ndarray]]] = {}
  for key, t in tensors.items():
    m = _KEY.match(key)
    if not m or (m.group(2) and m.group(2) not in hf_to_ours):
      raise ValueError(f"{weights}: key {key!r} is not a LoRA factor of a LLaMA q/k/v/o/gate/up/down "
                       "projection or lm_head")
    name = "lm_head" if m.group(3) else hf_to_ours[m.group(2)]
    layer = 0 if m.group(3) else int(m.group(1))
    if layer >= n_layers:
      raise ValueError(f"{weights}: {key} names layer {layer}; the base has {n_layers}")
    found.setdefault(name, {}).setdefault(layer, {})[m.group(4)] = np.asarray(t, np.float32)
  if not found:
    raise ValueError(f"{weights}: no LoRA tensors")
  params: dict[str, np.ndarray] = {}
  for name, per_layer in found.items():
    fin, fout = feats[name]
    n_in, n_out = math.prod(fin), math.prod(fout)
    stack = () if name == "lm_head" else (n_layers,)
    a = np.zeros(stack + fin + (r,), np.float32)
    b = np.zeros(stack + (r,) + fout, np.float32)
    for i, ab in per_layer.items():
      if set(ab) != {"A", "B"}:
        raise ValueError(f"{weights}: {name} layer {i} has lora_{''.join(ab)} only")
      if ab["A"].shape != (r, n_in) or ab["B"].shape != (n_out, r):
        raise ValueError(f"{weights}: {name} layer {i}: lora_A {ab['A'].shape}, lora_B {ab['B'].shape}; "
                         f"expected {(r, n_in)} and {(n_out, r)} for rank {r}")
      ai, bi = ab["A"].T.reshape(fin + (r,)), ab["B"].T.reshape((r,) + fout)
      if stack:
        a[i], b[i] = ai, bi
      else:
        a, b = ai, bi
    base = _our_path(prefix, name)
    params[base + "lora/a"], params[base + "lora/b"] = a, b
  names = sorted(found)
  out_cfg = ml_collections.ConfigDict(cfg.to_dict())
  out_cfg.lora = lora.default_config()
  out_cfg.lora.update(dict(rank=r, alpha=alpha, dropout=float(pc.get("lora_dropout") or 0.0),
                           targets=tuple(f"^{re.escape(_our_path(prefix, n))}kernel$" for n in names)))
  checkpoint.save_model(dst, checkpoint.flat_to_nested(params), out_cfg, model_class=meta["model_class"],
                        overwrite=overwrite,
                        extra={"adapters_only": True, "base": os.path.abspath(base_ckpt),
                               "converted_from": os.path.abspath(src_dir), "source_format": "peft-lora"})
  return sorted(params)
