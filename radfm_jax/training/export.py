"""Params-only export of a training run, for eval and serving (`python -m radfm_jax.export`).

Writes the trainable and frozen parameters of a train checkpoint, with the run's config, as a
`radfm_jax.checkpoint` params checkpoint that `checkpoint.load_model`, `radfm_jax.generate` and
`eval.radbench` read. The state is restored onto fsdp over all local devices, never whole on one.

LoRA runs (radfm_jax.models.lora), `mode`:
  "full"           every parameter, adapters included (the config keeps `lora`: loads with adapters on)
  "merge_lora"     plain params: W + (alpha/rank) A.B in cfg.model.param_dtype, no adapters, lora.rank=0
  "adapters_only"  just the trained parameters (adapters + `lora.train` ones): small; load them on top
                   of the base (`load_model(BASE, adapters=DST)`, `generate --checkpoint=BASE --adapters=DST`)
"""
from __future__ import annotations

import logging

import ml_collections

from radfm_jax import checkpoint, models, paths, sharding
from radfm_jax.models import lora
from radfm_jax.training import state as train_state
from radfm_jax.training.checkpoints import Checkpoints

MODES = ("full", "merge_lora", "adapters_only")


def export(workdir: str, dst: str, step: int | None = None, overwrite: bool = False,
           mode: str = "full") -> str:
  """Writes the params of a train checkpoint as a `radfm_jax.checkpoint` params checkpoint."""
  if mode not in MODES:
    raise ValueError(f"export mode {mode!r}; expected one of {MODES}")
  ckpts = Checkpoints(workdir, async_save=False)
  step = ckpts.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{workdir}: no train checkpoint under {ckpts.directory}")
  cfg = ckpts.restore_config(step)
  if mode != "full" and lora.section(cfg) is None:
    raise ValueError(f"{workdir}: --{mode} needs a LoRA run (its config has lora.rank=0 or no lora section)")
  mesh = sharding.inference_mesh()
  layout = train_state.make_layout(cfg, mesh)
  state, _ = ckpts.restore(step, layout.abstract)
  ckpts.close()
  extra = {"source": paths.absolute(workdir), "step": int(step)}
  params = train_state.merge_params(state["params"], state["frozen"])
  if mode == "merge_lora":
    extra["merged_lora"] = cfg.lora.to_dict()
    params = lora.merge(params, cfg.lora, dtype=cfg.model.param_dtype)
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.lora.rank = 0
  elif mode == "adapters_only":
    params = state["params"]
    extra.update(adapters_only=True, base=cfg.get("init_from") or "")
  out = checkpoint.save_model(dst, params, cfg, model_class=models.DEFAULT, overwrite=overwrite, extra=extra)
  logging.info("Exported step %d of %s to %s (%s)", step, workdir, out, mode)
  return out
