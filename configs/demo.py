r"""Demo: a small RadFM learns the phantom dataset on CPU in a few minutes.

  python -m radfm_jax.train --config=configs/demo.py --workdir=runs/demo
  (or `make demo`, which also evaluates: python -m radfm_jax.demo --workdir=runs/demo)

Data: the demo phantom store (radfm_jax.data.demo, n=1000 phantoms: 1600 train / 200 val / 200 test
samples; CT and MR volumes, X-rays; closed image-dependent questions balanced so that text alone is at
chance), built with its tokenizer on first use under data_cache/. Model: 1.5M parameters, RadFM's
architecture at small sizes (3D ViT with 16x16x4 patches on 64x64x8 inputs, perceiver resampler with 8
latents, 3-layer LLaMA), bf16 compute with fp32 params.

Expected on 2 CPU cores (measured): 600 steps in ~5 minutes on a quiet machine (766-770 s for two runs at
once beside a TPU compile); the demo store (n=1000) builds in ~25 s on first use. Result: validation loss
0.162 per answer token; closed image-dependent questions (n=89) answered exactly 68.5% (val) / 62.9% (test)
against 46% for the text-only prior (most frequent training answer per question) and 46% chance; modality
questions 100% (measured at commit de503b4; a change to the traced program moves float rounding and these
figures).

Determinism (README, "The demo"): bit-identical figures run to run, also for two runs at once under load
(losses, accuracies and RadBench metrics). The heap corruption that used to kill or perturb runs was a
TensorStore use-after-free triggered by a context per volume read (data/store.py now shares one per process).
"""
import ml_collections

from configs import common_train
from configs import demo_store


def model_config() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.vocab_size = 512
  m.max_images = 1
  m.tokens_per_image = 8
  m.dtype = "bfloat16"
  m.param_dtype = "float32"
  m.remat = "none"
  m.scan_layers = True
  m.vision = ml_collections.ConfigDict(dict(
      patch_hw=16, patch_d=4, channels=3, dim=96, depth=3, heads=4, head_dim=24, mlp_dim=256,
      pos_rows=16, pos_cols=16, pos_deps=128, ln_eps=1e-5, dropout=0.0, emb_dropout=0.0))
  m.resampler = ml_collections.ConfigDict(dict(depth=2, heads=4, head_dim=24, ff_mult=2, ln_eps=1e-5))
  m.lm = ml_collections.ConfigDict(dict(
      hidden=128, layers=3, heads=4, kv_heads=4, head_dim=32, mlp=384, rms_eps=1e-6,
      rope_theta=10000.0, max_len=128))
  return m


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.model = model_config()
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.data = demo_store.demo_data_config(c.model.vocab_size, n=1000, batch_size=32, batch_size_3d=32,
                                       workers=1)
  common_train.add_train_config(
      c, total_steps=600, log_every=25, checkpoint_every=200, eval_every=200,
      optim_overrides=dict(lr=1e-3, warmup_steps=50, weight_decay=0.05, end_lr_ratio=0.05))
  return c
