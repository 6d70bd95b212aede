"""Checkpoint import/export: Hugging Face LLaMA and RadFM's released torch file <-> our checkpoints.

  python -m radfm_jax.convert --from=hf-llama --src=HF_DIR --dst=CKPT [--config=configs/radfm_13b.py]
  python -m radfm_jax.convert --to=hf-llama --src=CKPT --dst=HF_DIR
  python -m radfm_jax.convert --from=radfm-torch --src=pytorch_model.bin --config=configs/radfm_13b.py \
      --dst=CKPT [--dtype=bfloat16]
  python -m radfm_jax.convert --to=radfm-torch --src=CKPT --dst=radfm_torch.bin
  python -m radfm_jax.convert --to=peft-lora --src=CKPT_WITH_ADAPTERS --dst=PEFT_DIR       (LM LoRA)
  python -m radfm_jax.convert --from=peft-lora --src=PEFT_DIR --base=BASE_CKPT --dst=ADAPTERS_CKPT
  add --dry_run to an import to check every key and shape against the config without converting.

Every source key is converted or on the layout's dropped list (else an error lists it); a missing key
or a shape that disagrees with the config is an error naming the key, expected and actual shape.
Tensors are read one at a time (torch files memory-mapped) and each parameter goes straight onto its
sharding, so host memory holds the converted model once plus about one parameter.
LM-only checkpoints ("llama", from Hugging Face) load as `Llama`; see radfm_jax.checkpoint for using
them as the LM of a RadFM.

Modules: sources (lazy torch/safetensors readers), mapping (key tables and the tensor-by-tensor
engine), hf_llama and radfm_torch (the two layouts), peft_lora (LM LoRA adapters <-> Hugging Face
PEFT), common (checkpoint glue and writers).
"""
from radfm_jax.convert.hf_llama import export_hf_llama, import_hf_llama
from radfm_jax.convert.mapping import Layout, Report, Rule, export_params, import_params
from radfm_jax.convert.radfm_torch import export_radfm_torch, import_radfm_torch, radfm_layout
from radfm_jax.convert.sources import DictSource, open_source
