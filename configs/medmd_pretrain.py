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

Expected runtime (analytic FLOPs at 40% MFU, average text bucket 1024; not measured here, no
accelerator): 13B 20.6 PFLOP/step -> ~0.9 s/step, ~15 h on v5p-256 (128 chips); ~1.2B 1.7 PFLOP/step ->
~6 h on v5e-64 or ~9 h on 8 x H100. The log line reports the measured MFU per step.
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
