"""Tiny RadFM for tests: 823K params (823,216 by eval_shape), sub-second steps on CPU.

  python -m radfm_jax.train --config=configs/tiny.py --workdir=/tmp/tiny

Sections: model (owned by radfm_jax.models), mesh (radfm_jax.sharding), data (radfm_jax.data.pipeline),
top-level training keys (radfm_jax.training.loop). Every field is overridable with --config.key=value.
"""
import ml_collections


def model_config() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.vocab_size = 512          # text vocabulary (ids < vocab_size); image ids follow (tokenizer layout)
  m.max_images = 4            # image slots per sample
  m.tokens_per_image = 8      # perceiver latents per image (RadFM: 32)
  m.dtype = "float32"         # compute dtype
  m.param_dtype = "float32"
  m.remat = "none"            # none | full | dots  (policy applied to each scanned block)
  m.scan_layers = True

  m.vision = ml_collections.ConfigDict(dict(
      patch_hw=32, patch_d=4, channels=3, dim=48, depth=2, heads=2, head_dim=16, mlp_dim=96,
      pos_rows=16, pos_cols=16, pos_deps=128, ln_eps=1e-5, dropout=0.0, emb_dropout=0.0))
  m.resampler = ml_collections.ConfigDict(dict(depth=2, heads=2, head_dim=16, ff_mult=2, ln_eps=1e-5))
  m.lm = ml_collections.ConfigDict(dict(
      hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=128, rms_eps=1e-6,
      rope_theta=10000.0, max_len=256))
  return m


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config()
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Training (radfm_jax.training.loop): the demo phantom store, built on first use; a few quick steps.
  from configs import common_train, demo_store  # pylint: disable=g-import-not-at-top
  c.data = demo_store.demo_data_config(c.model.vocab_size)
  common_train.add_train_config(c, total_steps=20, log_every=1, checkpoint_every=10,
                                optim_overrides=dict(lr=3e-3, warmup_steps=5))
  return c
