r"""Stage 2: fine-tune RadFM on the radiology-only RadMD mixture (configs/mixes.py), 13B or ~1.2B.

  python -m radfm_jax.train --config=configs/radmd_finetune.py:13b,/data/radfm_stores --workdir=gs://.../stage2 \
      --config.init_from=gs://.../stage1_params       # a stage-1 export (python -m radfm_jax.export), or
                                                      # python -m radfm_jax.convert --from=radfm-torch output
  Train only vision + resampler + projection with the LM frozen:
      ... --config.optim.freeze='("^lm/",)'

`init_from` is required (a params checkpoint: a full RadFM, or an LM-only one for the LM alone).
Schedule (our choice): 10k steps x 256 samples (~1 pass over RadMD's ~3M samples at the mixture
weights), AdamW lr 2e-5 (13B) / 5e-5 (1B), 500 warmup, cosine to 10%.

Where it runs: the same programs as stage 1 (same batch shapes, everything trains), so the same plans
(configs/medmd_pretrain.py docstring, README "Scale"): 13b on v5p-128 with microbatches 1, 1b on v5p-8 /
v6e-8 with microbatches 8. With the LM frozen its matmuls count once instead of three times (13B: ~2.9x
fewer FLOPs per step) and it holds no Adam state: plan it with --config.optim.freeze='("^lm/",)'.
Expected result: lower validation loss on radiology text than stage 1 and better RadBench scores
(python -m eval.radbench --checkpoint=EXPORT --store=... --split=test). Not measured here.
"""
from configs import mixes
from configs import stages


def get_config(arg=None):
  return stages.stage_config(arg, mixes.radmd_finetune, steps=10_000, lr={"13b": 2e-5, "1b": 5e-5},
                             warmup=500, init_required=True)
