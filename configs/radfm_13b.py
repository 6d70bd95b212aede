"""The published RadFM model (MedLLaMA-13B + 3D ViT + Perceiver resampler), ~13.12B params at inference.

  python -m radfm_jax.convert --from=radfm-torch --src=pytorch_model.bin --config=configs/radfm_13b.py --dst=CKPT
  python -m radfm_jax.generate --checkpoint=CKPT --token_ids=1,17,42 --max_new_tokens=24

Model-only: this config has no optimizer, data or schedule, so `radfm_jax.train` rejects it; train with
the stage configs, which use this model (configs/medmd_pretrain.py:13b, configs/radmd_finetune.py:13b).
Sizes follow ../shared/radfm_reference.md section 2. bf16 compute, fp32 params (the release is fp32;
convert with a dtype option to store bf16). Mesh: fsdp over all devices by default (13B fp32 = 52 GB of
params; tensor parallelism by --config.mesh.tensor=N).
Same structure as configs/tiny.py: model_config() + get_config(arg).
"""
import ml_collections

from configs import common_data


def model_config() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.vocab_size = 32000        # LLaMA text vocabulary; <image>=32000, </image>=32001, <imageK>=32002+K
  m.max_images = 10           # image slots per sample (RadFM test sets use <= 10; its tokenizer has 100)
  m.tokens_per_image = 32     # perceiver latents per image
  m.dtype = "bfloat16"
  m.param_dtype = "float32"
  m.remat = "full"            # RadFM trains with gradient checkpointing on the LLM
  m.scan_layers = True

  m.vision = ml_collections.ConfigDict(dict(
      patch_hw=32, patch_d=4, channels=3, dim=768, depth=12, heads=8, head_dim=64, mlp_dim=2048,
      pos_rows=16, pos_cols=16, pos_deps=128, ln_eps=1e-5,
      dropout=0.1, emb_dropout=0.1))  # RadFM: ViT dropout 0.1, emb dropout 0.1 (training only)
  m.resampler = ml_collections.ConfigDict(dict(depth=6, heads=8, head_dim=64, ff_mult=4, ln_eps=1e-5))
  m.lm = ml_collections.ConfigDict(dict(
      hidden=5120, layers=40, heads=40, kv_heads=40, head_dim=128, mlp=13824, rms_eps=1e-6,
      rope_theta=10000.0, max_len=2048))
  return m


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config()
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.data = common_data.data_config()  # RadFM's input shapes: what generation (and its AOT plan) pads to
  return c
