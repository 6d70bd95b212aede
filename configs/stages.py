"""Shared parts of the two RadFM training stages (configs/medmd_pretrain.py, configs/radmd_finetune.py).

`stage_config(arg, mix_fn, ...)` parses "SIZE[,STORES_ROOT]" (SIZE: 13b | 1b; STORES_ROOT holds one
store per dataset, ROOT/NAME, see configs/mixes.py, and the LLaMA tokenizer at ROOT/tokenizer.model).
"""
import ml_collections

from configs import common_data
from configs import common_train
from configs import radfm_13b
from configs import radfm_1b

MODELS = {"13b": radfm_13b.model_config, "1b": radfm_1b.model_config}
# Gradient accumulation for each size's documented slice (planner figures in the stage docstrings and
# the README's Scale table): 13B on v5p-128 (64 chips) runs the global batch at once; ~1.2B on v5p-8 /
# v6e-8 (one host) needs 8 microbatches. Other slices: the README table's --config overrides.
MICROBATCHES = {"13b": 1, "1b": 8}
DEFAULT_ROOT = "/data/radfm_stores"


def parse_arg(arg: str | None) -> tuple[str, str]:
  parts = (arg or "13b").split(",")
  size, root = parts[0].lower(), (parts[1] if len(parts) > 1 and parts[1] else DEFAULT_ROOT)
  if size not in MODELS or len(parts) > 2:
    raise ValueError(f"config arg {arg!r}: expected 'SIZE[,STORES_ROOT]' with SIZE one of {sorted(MODELS)}")
  return size, root.rstrip("/")


def stage_config(arg, mix_fn, *, steps: int, lr: dict, warmup: int, init_required: bool
                 ) -> ml_collections.ConfigDict:
  size, root = parse_arg(arg)
  c = ml_collections.ConfigDict()
  c.model = MODELS[size]()
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # ZeRO-3 style over all chips
  c.data = common_data.data_config(
      mix=mix_fn(root), tokenizer=f"{root}/tokenizer.model", batch_size=256, batch_size_3d=64,
      max_len=2048, len_buckets=(512, 1024, 2048), slot_buckets=(1, 2, 4, 10), depth_buckets=(16, 32, 64),
      workers=8)
  common_train.add_train_config(
      c, total_steps=steps, log_every=50, checkpoint_every=1000, keep_checkpoints=3, eval_every=2000,
      eval_batches=50, optim_overrides=dict(lr=lr[size], warmup_steps=warmup, end_lr_ratio=0.1,
                                            weight_decay=0.0, b2=0.95, clip_norm=1.0))
  c.init_required = init_required
  c.microbatches = MICROBATCHES[size]
  return c
