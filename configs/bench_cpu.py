r"""CPU throughput bench: a ~63M-parameter RadFM (bf16 compute) sized so its matmuls can run near the
host's matmul peak. Not a model to train; the figure it exists for is MFU.

  python -m radfm_jax.bench.train --config=configs/bench_cpu.py            # step alone: MFU vs probe
  python -m radfm_jax.bench.train --config=configs/bench_cpu.py --trainer  # + the real trainer (Grain)

Model: 3D ViT 384-dim x 4 on 64x64x8 volumes (16x16x4 patches: 32 tokens per image), resampler with
32 latents, LLaMA 768-dim x 8 layers (12 heads, SwiGLU 2048), text vocab 512 (the demo tokenizer);
global batch 16 x 256 tokens, one image per sample. Params: LM 57M, vision 6M.
Expected on 2 shared CPU cores: see README "Benchmarks" (MFU is printed against a bf16 matmul probe
measured in the same run).
"""
import ml_collections

from configs import common_train
from configs import demo_store


def model_config() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.vocab_size = 512
  m.max_images = 1
  m.tokens_per_image = 32
  m.dtype = "bfloat16"
  m.param_dtype = "float32"
  m.remat = "none"
  m.scan_layers = True
  m.vision = ml_collections.ConfigDict(dict(
      patch_hw=16, patch_d=4, channels=3, dim=384, depth=4, heads=6, head_dim=64, mlp_dim=1536,
      pos_rows=16, pos_cols=16, pos_deps=128, ln_eps=1e-5, dropout=0.0, emb_dropout=0.0))
  m.resampler = ml_collections.ConfigDict(dict(depth=2, heads=6, head_dim=64, ff_mult=4, ln_eps=1e-5))
  m.lm = ml_collections.ConfigDict(dict(
      hidden=768, layers=8, heads=12, kv_heads=12, head_dim=64, mlp=2048, rms_eps=1e-6,
      rope_theta=10000.0, max_len=256))
  return m


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.model = model_config()
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.data = demo_store.demo_data_config(c.model.vocab_size, n=1000, batch_size=16, batch_size_3d=16,
                                       max_len=256, len_buckets=(256,), workers=0)
  common_train.add_train_config(c, total_steps=20, log_every=5, checkpoint_every=1000,
                                optim_overrides=dict(lr=1e-4, warmup_steps=5))
  return c
