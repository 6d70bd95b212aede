"""A ~1.2B RadFM: RadFM's vision tower and resampler with a TinyLlama-1.1B-shaped LLaMA (GQA).

  python -m radfm_jax.convert --from=hf-llama --src=/path/to/TinyLlama-1.1B --dst=/ckpt/tinyllama   # LM init
  python -m radfm_jax.train --config=configs/medmd_pretrain.py:1b,/data/radfm_stores --workdir=...

LM: hidden 2048, 22 layers, 32 query / 4 key-value heads of 64, SwiGLU 5632, vocab 32000 (the LLaMA
tokenizer, so RadFM's token ids and <image> layout are unchanged). Vision and resampler are RadFM's
exact sizes (configs/radfm_13b.py), projected to 2048. Parameter count: ~1.21B (LM 1.10B).
Model-only (like configs/radfm_13b.py): no optimizer, data or schedule, so `radfm_jax.train` rejects it;
train with configs/medmd_pretrain.py:1b or configs/radmd_finetune.py:1b, which use this model.
Same structure as configs/tiny.py: model_config() + get_config(arg).
"""
import ml_collections

from configs import common_data
from configs import radfm_13b


def model_config() -> ml_collections.ConfigDict:
  m = radfm_13b.model_config()
  m.lm = ml_collections.ConfigDict(dict(
      hidden=2048, layers=22, heads=32, kv_heads=4, head_dim=64, mlp=5632, rms_eps=1e-5,
      rope_theta=10000.0, max_len=2048))
  m.remat = "dots"
  return m


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config()
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.data = common_data.data_config()  # RadFM's input shapes: what generation (and its AOT plan) pads to
  return c
