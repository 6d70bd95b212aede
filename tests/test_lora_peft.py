"""LoRA <-> Hugging Face PEFT on a tiny LLaMA: our adapters exported with `convert --to=peft-lora` load with
`PeftModel.from_pretrained` onto the `convert --to=hf-llama` export and give our logits; a PEFT adapter
trained in torch imports (`--from=peft-lora`) and gives PEFT's logits in our model."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

from radfm_jax import checkpoint, convert
from radfm_jax.convert import peft_lora
from radfm_jax.models import lora
from radfm_jax.models.llama import Llama

VOCAB = 96


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A tiny random HF LLaMA (GQA) imported as our LM-only checkpoint."""
  torch.manual_seed(0)
  cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5)
  hf = LlamaForCausalLM(cfg).eval()
  src = str(tmp_path_factory.mktemp("hf") / "src")
  hf.save_pretrained(src)
  ckpt = str(tmp_path_factory.mktemp("ck") / "base")
  convert.import_hf_llama(src, ckpt)
  return ckpt


def _hf_logits(hf_dir, peft_dir, ids):
  model = LlamaForCausalLM.from_pretrained(hf_dir).eval()
  pm = peft.PeftModel.from_pretrained(model, peft_dir).eval()
  with torch.no_grad():
    return pm(torch.from_numpy(ids)).logits.numpy(), pm


def test_export_to_peft_gives_our_logits(base, tmp_path):
  cfg = checkpoint.load_config(base)
  cfg.lora = lora.default_config()
  cfg.lora.update(dict(rank=4, alpha=8.0, targets=lora.LM_TARGETS + (r"^lm_head/kernel$",)))
  model = lora.wrap(Llama, cfg)(cfg.model, rngs=nnx.Rngs(3))
  checkpoint.restore_params(base, model)
  for i, ad in enumerate(lora.adapters(model)):
    ad.b.set_value(0.5 * jax.random.normal(jax.random.key(i), ad.b.shape))
  adapters = {k: v for k, v in checkpoint.nested_to_flat(checkpoint.param_dict(model)).items()
              if lora.is_adapter(k)}
  ad_dir = str(tmp_path / "adapters")
  checkpoint.save_model(ad_dir, checkpoint.flat_to_nested(adapters), cfg, model_class="llama",
                        extra={"adapters_only": True})
  keys = peft_lora.export_peft(ad_dir, str(tmp_path / "peft"))
  assert len(keys) == 2 * (7 * 2 + 1)
  with open(tmp_path / "peft" / "adapter_config.json") as fh:
    pc = json.load(fh)
  assert (pc["r"], pc["lora_alpha"], pc["peft_type"]) == (4, 8.0, "LORA")
  assert sorted(pc["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                 "up_proj", "down_proj", "lm_head"])
  convert.export_hf_llama(base, str(tmp_path / "hf"))

  ids = np.random.default_rng(0).integers(3, VOCAB, (2, 12))
  ref, pm = _hf_logits(str(tmp_path / "hf"), str(tmp_path / "peft"), ids)
  ours = np.asarray(model(jnp.asarray(ids)))
  plain, _ = checkpoint.load_model(base)
  assert np.abs(ours - np.asarray(plain(jnp.asarray(ids)))).max() > 0.05  # the adapters matter
  err = np.abs(ours - ref).max()
  print(f"PEFT export: max |logits ours - peft| = {err:.3g} (scale {np.abs(ref).max():.3g})")
  assert err < 1e-4
  # Our loader on top of the base, from the adapters-only checkpoint, agrees too.
  on_base, _ = checkpoint.load_model(base, adapters=ad_dir)
  np.testing.assert_allclose(np.asarray(on_base(jnp.asarray(ids))), ours, atol=1e-6)


def test_import_from_peft_gives_peft_logits(base, tmp_path):
  hf_dir = str(tmp_path / "hf")
  convert.export_hf_llama(base, hf_dir)
  torch.manual_seed(1)
  model = LlamaForCausalLM.from_pretrained(hf_dir)
  conf = peft.LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                         layers_to_transform=[1], use_rslora=True, init_lora_weights=False)
  pm = peft.get_peft_model(model, conf)  # init_lora_weights=False: random A and B
  pm.save_pretrained(str(tmp_path / "peft"))
  paths = peft_lora.import_peft(str(tmp_path / "peft"), base, str(tmp_path / "ours"))
  assert paths == sorted(f"blocks/{n}/lora/{ab}" for n in ("q", "v", "down") for ab in "ab")
  ours, cfg = checkpoint.load_model(base, adapters=str(tmp_path / "ours"))
  assert cfg.lora.rank == 8 and abs(cfg.lora.alpha - 4 * 8 ** 0.5) < 1e-9
  ids = np.random.default_rng(1).integers(3, VOCAB, (2, 12))
  ref, _ = _hf_logits(hf_dir, str(tmp_path / "peft"), ids)
  err = np.abs(np.asarray(ours(jnp.asarray(ids))) - ref).max()
  print(f"PEFT import: max |logits ours - peft| = {err:.3g} (scale {np.abs(ref).max():.3g})")
  assert err < 1e-4
  # Layer 0 was not transformed: its imported adapters are zero.
  a = checkpoint.read_params(str(tmp_path / "ours"), ["blocks/q/lora/b"])["blocks/q/lora/b"]
  assert not a[0].any() and a[1].any()


def test_import_rejects_what_it_cannot_represent(base, tmp_path):
  d = tmp_path / "dora"
  d.mkdir()
  (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                     "use_dora": True}))
  with pytest.raises(ValueError, match="use_dora"):
    peft_lora.import_peft(str(d), base, str(tmp_path / "x"))
