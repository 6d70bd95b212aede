"""Top-level training keys shared by all training configs (radfm_jax.training.loop reads them).

  c = ml_collections.ConfigDict(); c.model = ...; c.mesh = ...; c.data = ...
  add_train_config(c, total_steps=1000, optim=dict(lr=1e-4))

Scripts rely on `seed`, `total_steps`, `log_every`, `checkpoint_every`; all keys are overridable with
--config.key=value (e.g. --config.optim.lr=1e-4 --config.optim.freeze='("^lm/",)').
LoRA (radfm_jax.models.lora): --config.lora.rank=8 (0 = off) trains adapters on `lora.targets` (default:
the LM's q/k/v/o/gate/up/down) with everything else frozen, e.g. configs/radmd_lora.py.
"""
import ml_collections

from radfm_jax.models import lora
from radfm_jax.training import optim


def add_train_config(c: ml_collections.ConfigDict, *, optim_overrides=None, **overrides
                     ) -> ml_collections.ConfigDict:
  c.seed = 0
  c.total_steps = 1000
  c.log_every = 10
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.eval_every = 0            # steps between validations (0: only at the end)
  c.eval_batches = 0          # validation batches per evaluation (0: the whole val split)
  c.microbatches = 1          # gradient accumulation: the global batch is split into this many scans
  c.nonfinite_limit = 10      # this many non-finite steps in a row stop the run
  c.init_from = ""            # params checkpoint (radfm_jax.checkpoint) to start from: RadFM or LM-only
  c.profile_steps = 0         # >0: profile this many steps (TensorBoard trace in the workdir)
  c.profile_first = 5         # ... starting this many steps after the (re)start
  c.optim = optim.default_config()
  c.lora = lora.default_config()  # rank, alpha, dropout, targets, train, base_dtype, init_adapters
  for k, v in (optim_overrides or {}).items():
    c.optim[k] = v
  for k, v in overrides.items():
    c[k] = v
  return c
