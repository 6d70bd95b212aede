r"""Stage 2 with LoRA: fine-tune a converted RadFM on the RadMD mixture on ONE host (13B or ~1.2B).

  python -m radfm_jax.convert --from=radfm-torch --src=pytorch_model.bin --config=configs/radfm_13b.py \
      --dst=/ckpt/radfm13b --dtype=bfloat16
  python -m radfm_jax.train --config=configs/radmd_lora.py:13b,/data/radfm_stores --workdir=/runs/radmd_lora \
      --config.init_from=/ckpt/radfm13b
  python -m radfm_jax.export --workdir=/runs/radmd_lora --dst=/ckpt/radmd_adapters --adapters_only   # ~0.4 GB
  python -m radfm_jax.generate --checkpoint=/ckpt/radfm13b --adapters=/ckpt/radmd_adapters --prompt=...
  python -m radfm_jax.export --workdir=/runs/radmd_lora --dst=/ckpt/radmd_merged --merge_lora    # plain params
  python -m radfm_jax.convert --to=peft-lora --src=/ckpt/radmd_adapters --dst=/hf/radmd_peft      # HF PEFT

What trains: LoRA rank 16 (alpha 32, dropout 0.05) on the LM's q/k/v/o/gate/up/down, plus the perceiver
resampler, the vision->LM projection `fc` and the image-marker embeddings in full (RadFM's own
fine-tuning keeps the bridge trainable); the ViT and every LM weight are frozen and held in bfloat16.
Trainable parameters (counted from the layout): 13B 104.3M (LM adapters 62.6M, resampler 37.8M, fc
3.9M, markers) of 13.19B (0.8%); 1B 52.0M (adapters 12.6M + the same bridge) of 1.22B. Optimizer state
(AdamW moments, fp32) exists for those only: 13B 0.83 GB instead of 105 GB for full fine-tuning.

Schedule (our choice): 5k steps x 64 samples (32 in 3D batches; 4 microbatches), AdamW lr 2e-4 (13B) /
3e-4 (1B), 200 warmup, cosine to 10%, no weight decay, clip 1.0; mesh fsdp over the host's chips.

Per-chip memory (analytic, not compiled): 13B frozen bf16 weights 26.2 GB + trainable params, moments
and gradients 1.7 GB = 27.8 GB of state, fsdp over v5p-8's 4 chips -> ~7 GB/chip (v6e-8, 8 chips: ~3.5
GB/chip), the rest of the HBM (v5p 95 GB, v6e 32 GB per chip) for activations (remat "full").
Planner (compiled for TPU from this CPU box: `JAX_PLATFORMS=cpu python -m radfm_jax.aot
--config=configs/radmd_lora.py:13b --topology=v6e-8 --programs=train --groups=0`, 2D batch at the largest
bucket, 16 rows x 2048 tokens x 10 image slots per microbatch): 13B on one v6e-8 host FITS at 12.6 GiB/chip
of 32 (peak + args; args 3.9 GiB, temp 5.7 GiB; 61% free), 3.56 s/step at 40% MFU; on one v5p-8 host
22.8 GiB/chip of 95 (76% free), 14.3 s/step at 40% MFU.
The full 13B fine-tune on v6e-8 does not fit (44.3 GiB/chip, README "Scale"): on one host, use LoRA.
Expected result: not measured here (no RadMD stores or accelerator). The demo-scale comparison of LoRA
and full fine-tuning is `python -m radfm_jax.bench.lora` (README).
"""
import ml_collections

from configs import mixes
from configs import stages

LR = {"13b": 2e-4, "1b": 3e-4}


def get_config(arg=None):
  c = stages.stage_config(arg, mixes.radmd_finetune, steps=5_000, lr=LR, warmup=200, init_required=True)
  c.data.batch_size, c.data.batch_size_3d = 64, 32
  c.microbatches = 4
  c.checkpoint_every, c.eval_every = 500, 1000
  c.optim.weight_decay = 0.0
  c.lora = ml_collections.ConfigDict(dict(
      rank=16, alpha=32.0, dropout=0.05,
      targets=(r"^lm/blocks/(q|k|v|o|gate|up|down)/kernel$",),
      train=(r"^resampler/", r"^fc/", r"^image_marker_embed$"),
      base_dtype="bfloat16", init_adapters=""))
  return c
