"""Top-level training keys shared by all training configs (radfm_jax.training.loop reads them).

  c = ml_collections.ConfigDict(); c.model = ...; c.mesh = ...; c.data = ...
  add_train_config(c, total_steps=1000, optim_overrides=dict(lr=1e-4))

These are the defaults of every training key (the data section's are in configs/common_data.py); the
library reads cfg.x and never repeats them. What each value must be (type, range) is checked once, before
anything heavy starts, by radfm_jax.training.config.validate (a test checks both name the same keys).
All keys are overridable with --config.key=value (e.g. --config.optim.lr=1e-4
--config.optim.freeze='("^lm/",)').
LoRA (radfm_jax.models.lora): --config.lora.rank=8 (0 = off) trains adapters on `lora.targets` (default:
the LM's q/k/v/o/gate/up/down) with everything else frozen, e.g. configs/radmd_lora.py.
"""
import ml_collections

from radfm_jax.models import lora

# Norm scales and all biases; token, image-marker and position embeddings; the resampler's latents.
NO_DECAY = (r"(^|/)bias$", r"(^|/)scale$", r"embed", r"(^|/)pos_", r"(^|/)latents$")


def optim_config(**overrides) -> ml_collections.ConfigDict:
  """The `optim` section (radfm_jax.training.optim): AdamW, warmup + cosine schedule, clipping."""
  o = ml_collections.ConfigDict(dict(
      lr=3e-4,                  # peak learning rate
      warmup_steps=100,         # linear warmup from 0 (capped at total_steps - 1)
      end_lr_ratio=0.1,         # cosine decay to lr * end_lr_ratio at total_steps
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
      clip_norm=1.0,            # global gradient-norm clipping (0 or None: off)
      freeze=(),                # regexes of parameter paths that do not train
      no_decay=NO_DECAY))       # regexes of parameter paths without weight decay
  for k, v in overrides.items():
    o[k] = v
  return o


def add_train_config(c: ml_collections.ConfigDict, *, optim_overrides=None, **overrides
                     ) -> ml_collections.ConfigDict:
  c.seed = 0
  c.total_steps = 1000
  c.log_every = 10
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.checkpoint_fallback = True  # latest checkpoint damaged: resume from the newest intact one (False: fail)
  c.eval_every = 0            # steps between validations (0: only at the end)
  c.eval_batches = 0          # validation batches per evaluation (0: the whole val split)
  c.microbatches = 1          # gradient accumulation: the global batch is split into this many scans
  c.nonfinite_limit = 10      # this many non-finite steps in a row stop the run
  c.init_from = ""            # params checkpoint (radfm_jax.checkpoint) to start from: RadFM or LM-only
  c.init_required = False     # True: refuse to start without init_from (fine-tuning stages)
  c.profile_steps = 0         # >0: profile this many steps (TensorBoard trace in the workdir)
  c.profile_first = 5         # ... starting this many steps after the (re)start
  c.tensorboard_dir = ""       # TensorBoard events ("" = the workdir; local or gs://)
  c.compilation_cache = "auto"  # JAX persistent compilation cache: a path, "auto" (WORKDIR/compile_cache
                                # on TPU/GPU, off on CPU) or "" (off); a restarted job skips recompiling
  c.optim = optim_config(**(optim_overrides or {}))
  c.lora = lora.default_config()  # rank 0 = off; defaults in radfm_jax.models.lora (the PEFT importer uses them too)
  for k, v in overrides.items():
    c[k] = v
  return c
