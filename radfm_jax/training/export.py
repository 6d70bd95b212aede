"""Params-only export of a training run, for eval and serving (`python -m radfm_jax.export`).

Writes the trainable and frozen parameters of a train checkpoint, with the run's config, as a
`radfm_jax.checkpoint` params checkpoint that `checkpoint.load_model`, `radfm_jax.generate` and
`eval.radbench` read. The state is restored onto fsdp over all local devices, never whole on one.
"""
from __future__ import annotations

import logging

from radfm_jax import checkpoint, models, paths, sharding
from radfm_jax.training import state as train_state
from radfm_jax.training.checkpoints import Checkpoints


def export(workdir: str, dst: str, step: int | None = None, overwrite: bool = False) -> str:
  """Writes the params of a train checkpoint as a `radfm_jax.checkpoint` params checkpoint."""
  ckpts = Checkpoints(workdir, async_save=False)
  step = ckpts.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{workdir}: no train checkpoint under {ckpts.directory}")
  cfg = ckpts.restore_config(step)
  mesh = sharding.inference_mesh()
  layout = train_state.make_layout(cfg, mesh)
  state, _ = ckpts.restore(step, layout.abstract)
  params = train_state.merge_params(state["params"], state["frozen"])
  out = checkpoint.save_model(dst, params, cfg, model_class=models.DEFAULT, overwrite=overwrite,
                              extra={"source": paths.absolute(workdir), "step": int(step)})
  ckpts.close()
  logging.info("Exported step %d of %s to %s", step, workdir, out)
  return out
