r"""Stage 1: pre-train RadFM on the MedMD mixture (configs/mixes.py), 13B or ~1.2B.

  python -m radfm_jax.train --config=configs/medmd_pretrain.py:13b,/data/radfm_stores --workdir=gs://.../stage1 \
      --config.init_from=/ckpt/medllama13b       # LM from a converted MedLLaMA-13B (vision from scratch)
  python -m radfm_jax.train --config=configs/medmd_pretrain.py:1b,/data/radfm_stores --workdir=... \
      --config.init_from=/ckpt/tinyllama          # configs/radfm_1b.py: a converted TinyLlama-1.1B LM

As RadFM: the language model starts from a medical LLaMA, the 3D ViT and resampler from scratch, and
everything trains (remat on; freeze parts with e.g. --config.optim.freeze='("^lm/",)'). Stores: one
per dataset under STORES_ROOT (python -m radfm_jax.data.build --from=radfm ...), LLaMA's tokenizer.model
at STORES_ROOT/tokenizer.model. Launch one process per host (TPU pod slices need no extra flags).

Schedule (our choice; RadFM's release does not fix one): 60k steps x 256 samples (~1 pass over MedMD's
~16M samples), AdamW lr 5e-5 (13B) / 1e-4 (1B), 2k warmup, cosine to 10%, clip 1.0.

Where it runs (python -m radfm_jax.aot --config=configs/medmd_pretrain.py:SIZE --topology=T; README "Scale",
compiled by libtpu for the topology on a CPU machine; GiB per chip = peak + arguments, 1 GiB = 2**30 B):
  13b on v5p-128 (64 chips, 16 hosts), mesh fsdp=64, microbatches 1, remat full (the defaults): 2D step
    (256 x 2048 tokens, 10 images 512x512x4) 12.4 GiB of 95 (87% free), 3D step (64 x 10 volumes
    256x256x64) 10.0 GiB. Step at 40% MFU: 3.58 s (2D) / 0.92 s (3D); one MedMD epoch (16M samples, 20% 3D,
    every batch at its largest bucket: an upper bound) 2.6 days. Also compiled: v5p-32 49.7 GiB (48% free),
    v5p-256 with --config.mesh.fsdp=64 --config.mesh.tensor=2 8.3 GiB, v6e-64 12.3 GiB of 32.
  1b on v5p-8 (4 chips, one host), mesh fsdp=4, microbatches 8 (the default for 1b), remat dots: 2D step
    38.4 GiB per chip of 95 (60% free); on v6e-8 19.8 GiB of 32 (38% free). Step at 40% MFU 5.25 s /
    1.66 s on v5p-8; epoch <= 4.0 days. With microbatches 1 the 2D step needs 210 GiB per chip.
  Bigger slices: fewer microbatches (data x fsdp x microbatches must divide the 3D batch of 64) and, past 64
  chips, tensor parallelism (--config.mesh.fsdp=64 --config.mesh.tensor=2|4): the README table.

Expected result: the training loss falls steadily from the LLaMA initialisation; validation loss and
closed-question accuracy are logged every 2k steps. Not measured here: no MedMD stores or accelerator in
this environment. Stage 2 (configs/radmd_finetune.py) starts from this run's export:
  python -m radfm_jax.export --workdir=gs://.../stage1 --dst=gs://.../stage1_params
"""
from configs import mixes
from configs import stages


def get_config(arg=None):
  return stages.stage_config(arg, mixes.medmd_pretrain, steps=60_000, lr={"13b": 5e-5, "1b": 1e-4},
                             warmup=2000, init_required=False)
