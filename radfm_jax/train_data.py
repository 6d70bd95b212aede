"""Training and validation data for radfm_jax.train (wired to radfm_jax.data.pipeline)."""
from __future__ import annotations


class TrainData:

  def __init__(self, cfg, mesh):
    raise NotImplementedError("pipeline wiring pending")
