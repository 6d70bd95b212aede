"""Conversion: Hugging Face LLaMA parity (logits, greedy generation), our LM -> HF -> our LM, RadFM torch
layout (full key coverage, image-path numerics vs a torch reference, exact reverse), error messages, CLI."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

from configs import tiny
from convert_fixtures import UNUSED_KEYS, documented_shapes, inv_freq_keys, make_state_dict, reference_image_tokens
from radfm_jax import checkpoint, convert, sharding
from radfm_jax.inference import decoding as generate
from radfm_jax.convert.sources import DictSource, open_source
from radfm_jax.models.llama import Llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_VOCAB = 96


def _flat(module):
  return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  """A tiny random LlamaForCausalLM with GQA (4 query heads, 2 kv heads), saved as safetensors."""
  torch.manual_seed(0)
  cfg = LlamaConfig(vocab_size=HF_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, rms_norm_eps=1e-5,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
  model = LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # larger weights than the 0.02 init: a sharper, less tie-prone argmax
    for p in model.parameters():
      if p.ndim == 2:
        p.mul_(8.0)
  path = str(tmp_path_factory.mktemp("hf") / "tiny_llama")
  model.save_pretrained(path)
  with open(os.path.join(path, "tokenizer.model"), "wb") as fh:  # stands in for LLaMA's SentencePiece file
    fh.write(b"sentencepiece model bytes")
  return model, path


@pytest.fixture(scope="module")
def imported(hf_model, tmp_path_factory):
  _, path = hf_model
  dst = str(tmp_path_factory.mktemp("ck") / "lm")
  report = convert.import_hf_llama(path, dst)
  return dst, report


def test_hf_parity_logits_and_greedy_generation(hf_model, imported):
  hf, _ = hf_model
  ckpt, report = imported
  assert report.dropped == [] and len(report.consumed) == 3 + 9 * 2
  model, cfg = checkpoint.load_model(ckpt)
  assert isinstance(model, Llama)
  lm = cfg.model.lm
  assert (lm.hidden, lm.layers, lm.heads, lm.kv_heads, lm.head_dim, lm.mlp) == (32, 2, 4, 2, 8, 64)
  assert (lm.rope_theta, lm.rms_eps, lm.max_len, cfg.model.vocab_size) == (5000.0, 1e-5, 64, HF_VOCAB)

  ids = np.random.default_rng(0).integers(3, HF_VOCAB, (2, 16))
  ours = np.asarray(model(jnp.asarray(ids)))
  with torch.no_grad():
    ref = hf(torch.from_numpy(ids)).logits.numpy()
  err = np.abs(ours - ref).max()
  print(f"HF parity: max |logits ours - transformers| = {err:.3g} (logit scale {np.abs(ref).max():.3g})")
  assert err < 1e-4

  # Greedy decoding, two left-padded prompts of different lengths, eos 2.
  prompts = [[1, 17, 42, 5, 9, 33], [1, 60, 8]]
  p = max(map(len, prompts))
  pid = np.zeros((2, p), np.int64)
  mask = np.zeros((2, p), bool)
  for r, row in enumerate(prompts):
    pid[r, p - len(row):], mask[r, p - len(row):] = row, True
  n_new = 20
  out = generate.trim(np.asarray(generate.generate(model, pid, mask, max_new_tokens=n_new, eos_id=2)))
  with torch.no_grad():
    hf_out = hf.generate(torch.from_numpy(pid), attention_mask=torch.from_numpy(mask).long(),
                         max_new_tokens=n_new, do_sample=False, eos_token_id=2, pad_token_id=0).numpy()
  hf_new = generate.trim(hf_out[:, p:])
  print(f"greedy generations (ours == transformers): {out}")
  assert out == hf_new
  assert len(set(out[0])) > 3  # a non-degenerate continuation


def test_lm_to_hf_to_lm_exact(tmp_path):
  cfg = tiny.get_config()
  model = Llama(cfg.model, rngs=nnx.Rngs(3))
  ckpt = checkpoint.save_model(str(tmp_path / "ours"), model, cfg)
  files = convert.export_hf_llama(ckpt, str(tmp_path / "hf"))
  assert files[0] == "model.safetensors"
  hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
  assert hf.config.num_key_value_heads == cfg.model.lm.kv_heads
  ids = np.random.default_rng(1).integers(0, cfg.model.vocab_size, (1, 12))
  with torch.no_grad():
    ref = hf(torch.from_numpy(ids)).logits.numpy()
  assert np.abs(np.asarray(model(jnp.asarray(ids))) - ref).max() < 1e-4

  back = convert.import_hf_llama(str(tmp_path / "hf"), str(tmp_path / "back"))
  assert back.dropped == []
  model2, cfg2 = checkpoint.load_model(str(tmp_path / "back"))
  a, b = _flat(model), _flat(model2)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert cfg2.model.lm.to_dict() == cfg.model.lm.to_dict()


def test_hf_sharded_safetensors_and_bf16(tmp_path, hf_model):
  """Export in shards (index json), bf16; reading back gives the bf16-rounded weights."""
  hf, path = hf_model
  ckpt = str(tmp_path / "bf16")
  convert.import_hf_llama(path, ckpt, dtype="bfloat16")
  meta = checkpoint.read_meta(ckpt)
  assert meta["params"]["dtypes"] == ["bfloat16"] and meta["config"]["model"]["param_dtype"] == "bfloat16"
  files = convert.export_hf_llama(ckpt, str(tmp_path / "hf"), max_shard_bytes=8_000)
  assert len(files) > 1 and os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
  src = open_source(str(tmp_path / "hf"))
  ref = hf.state_dict()
  assert set(src.keys()) == set(ref)
  for k in ref:
    got = src.get(k)
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32),
                                  ref[k].numpy().astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=k)


# ----------------------------------------------------------------------------------------------------
# RadFM torch layout


@pytest.fixture(scope="module")
def radfm_bin(tmp_path_factory):
  cfg = tiny.get_config()
  sd = make_state_dict(cfg.model)
  path = str(tmp_path_factory.mktemp("radfm") / "pytorch_model.bin")
  torch.save(sd, path)
  return cfg, sd, path


def test_radfm_torch_full_coverage_numerics_and_exact_reverse(radfm_bin, tmp_path):
  cfg, sd, path = radfm_bin
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  report = convert.import_radfm_torch(path, cfg, str(tmp_path / "ck"), mesh=mesh)
  documented = set(documented_shapes(cfg.model))
  dropped = set(inv_freq_keys(cfg.model)) | set(UNUSED_KEYS)
  assert set(report.consumed) | set(report.dropped) | set(report.aliases) == set(sd)
  assert set(report.dropped) == dropped
  assert report.aliases == ["embedding_layer.weight"]
  assert set(report.consumed) == documented - {"embedding_layer.weight"}

  # Restored sharded onto a (2, 2, 2) mesh, as the sharding rules say.
  model, cfg2 = checkpoint.load_model(str(tmp_path / "ck"), mesh=mesh)
  specs = sharding.partition_specs(nnx.state(checkpoint.abstract_model(cfg2, "radfm", mesh), nnx.Param), mesh)
  for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    assert v.get_value().sharding.spec == specs["/".join(map(str, k))]
  assert model.lm.blocks.q.kernel.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)

  # The image path of the converted model equals a plain-torch RadFM reference on the same tensors.
  images = torch.rand(2, 3, 64, 32, 8, generator=torch.Generator().manual_seed(0))  # [N, C, H, W, D]
  with torch.no_grad():
    ref = reference_image_tokens(sd, cfg.model, images).numpy()
  graphdef, state = nnx.split(model)
  encode = jax.jit(lambda st, x: nnx.merge(graphdef, st).encode_images(x))
  ours = np.asarray(encode(state, jnp.asarray(images.permute(0, 2, 3, 4, 1).numpy())[:, None]))[:, 0]
  err = np.abs(ours - ref).max()
  print(f"RadFM image tokens: max |ours - torch reference| = {err:.3g} (scale {np.abs(ref).max():.3g})")
  assert err < 1e-4
  np.testing.assert_array_equal(np.asarray(model.image_marker_embed.get_value()),
                                sd["embedding_layer.figure_token_weight"].numpy())

  # Reverse: every documented key, bit-exact; nothing else.
  back = dict(convert.export_radfm_torch(str(tmp_path / "ck")))
  assert set(back) == documented
  for k in documented:
    np.testing.assert_array_equal(back[k], sd[k].numpy(), err_msg=k)

  # The RadFM's LM alone exports to Hugging Face layout.
  convert.export_hf_llama(str(tmp_path / "ck"), str(tmp_path / "hf"))
  lm_only = open_source(str(tmp_path / "hf"))
  assert set(lm_only.keys()) == {k[len("lang_model."):] for k in documented if k.startswith("lang_model.")}
  for k in lm_only.keys():
    np.testing.assert_array_equal(lm_only.get(k), sd["lang_model." + k].numpy(), err_msg=k)

  # ... and the CLI writes it as a torch file that loads with weights_only.
  out = tmp_path / "back.bin"
  _cli("--to=radfm-torch", f"--src={tmp_path / 'ck'}", f"--dst={out}")
  again = torch.load(out, weights_only=True)
  assert set(again) == documented and torch.equal(again["embedding_layer.weight"], sd["embedding_layer.weight"])


def test_radfm_torch_bf16_and_lm_size_by_config(radfm_bin, tmp_path):
  """RadFM vision + a different LM size (config-driven), stored as bf16."""
  cfg = tiny.get_config()
  cfg.model.lm.update(hidden=48, layers=1, heads=2, kv_heads=1, head_dim=24, mlp=80)
  sd = make_state_dict(cfg.model, seed=1)
  report = convert.import_radfm_torch(DictSource(sd), cfg, str(tmp_path / "ck"), dtype="bfloat16",
                                      mesh=sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1)))
  assert set(report.consumed) | set(report.dropped) | set(report.aliases) == set(sd)
  model, cfg2 = checkpoint.load_model(str(tmp_path / "ck"))
  assert cfg2.model.param_dtype == "bfloat16" and cfg2.model.lm.hidden == 48
  got = np.asarray(model.lm.blocks.k.kernel.get_value())
  assert got.dtype == jnp.bfloat16 and got.shape == (1, 48, 1, 24)
  want = sd["lang_model.model.layers.0.self_attn.k_proj.weight"].numpy().T.reshape(48, 1, 24)
  np.testing.assert_array_equal(got[0], want.astype(ml_dtypes.bfloat16))


def test_radfm_13b_key_table_matches_the_reference():
  """The full-size table, from abstract params only (no allocation): every documented key with the
  documented shape (spot-checked against the literal numbers of radfm_reference.md section 3)."""
  from configs import radfm_13b
  from radfm_jax.convert.common import abstract_params
  from radfm_jax.convert.mapping import expected_keys
  cfg = radfm_13b.get_config()
  want = expected_keys(convert.radfm_layout(), abstract_params(cfg, "radfm", None))
  assert want == documented_shapes(cfg.model)
  ve, lm = "embedding_layer.vision_encoder.", "lang_model.model."
  for key, shape in {ve + "to_patch_embedding.2.weight": (768, 12288), ve + "to_patch_embedding.1.weight": (12288,),
                     ve + "pos_embedding.dep_embed.weight": (128, 256), ve + "transformer.layers.11.0.fn.to_qkv.weight": (1536, 768),
                     ve + "transformer.layers.0.0.fn.to_out.0.weight": (768, 512),
                     ve + "transformer.layers.0.1.fn.net.0.weight": (2048, 768),
                     "embedding_layer.perceiver.latents": (32, 768), "embedding_layer.perceiver.layers.5.0.to_kv.weight": (1024, 768),
                     "embedding_layer.perceiver.layers.0.1.1.weight": (3072, 768), "embedding_layer.fc.weight": (5120, 768),
                     "embedding_layer.figure_token_weight": (2, 5120), "embedding_layer.weight": (32000, 5120),
                     lm + "layers.39.self_attn.q_proj.weight": (5120, 5120), lm + "layers.0.mlp.down_proj.weight": (5120, 13824),
                     "lang_model.lm_head.weight": (32000, 5120)}.items():
    assert want[key] == shape, key
  assert len(want) == 9 + 12 * 11 + 1 + 6 * 11 + 2 + 4 + 1 + 40 * 9 + 2


def test_dry_run_reports_every_problem(radfm_bin, tmp_path):
  from radfm_jax.convert.common import dry_run
  cfg, sd, path = radfm_bin
  assert dry_run(open_source(path), convert.radfm_layout(), cfg, "radfm") == []
  bad = dict(sd)
  del bad["embedding_layer.fc.bias"]
  bad["lang_model.model.norm.weight"] = torch.zeros(7)
  bad["embedding_layer.surprise"] = torch.zeros(1)
  problems = dry_run(DictSource(bad), convert.radfm_layout(), cfg, "radfm")
  assert problems == ["missing key 'embedding_layer.fc.bias' (expected shape [64])",
                      "key 'lang_model.model.norm.weight' has shape [7], expected [64]",
                      "key 'embedding_layer.surprise' is neither converted nor known to be unused"]
  torch.save(bad, tmp_path / "bad.bin")
  r = _cli("--from=radfm-torch", f"--src={tmp_path / 'bad.bin'}", "--config=configs/tiny.py", "--dry_run",
           f"--dst={tmp_path / 'unused'}", ok=False)
  assert r.returncode == 1 and "embedding_layer.fc.bias" in r.stdout and not os.path.exists(tmp_path / "unused")


def _broken(sd, key, value=None):
  sd = dict(sd)
  if value is None:
    del sd[key]
  else:
    sd[key] = value
  return DictSource(sd, name="radfm.bin")


@pytest.mark.parametrize("case", ["missing", "shape", "unknown", "alias"])
def test_radfm_torch_errors_name_the_key(radfm_bin, tmp_path, case):
  cfg, sd, _ = radfm_bin
  qkv = "embedding_layer.vision_encoder.transformer.layers.1.0.fn.to_qkv.weight"
  if case == "missing":
    src, err, msg = _broken(sd, qkv), ValueError, [qkv, "missing", "[96, 48]"]
  elif case == "shape":
    src, err, msg = _broken(sd, qkv, torch.zeros(90, 48)), ValueError, [qkv, "[90, 48]", "expected [96, 48]"]
  elif case == "unknown":
    src, err, msg = (_broken(sd, "embedding_layer.mystery.weight", torch.zeros(3)), ValueError,
                     ["embedding_layer.mystery.weight", "neither converted nor known"])
  else:
    src, err, msg = (_broken(sd, "embedding_layer.weight", sd["embedding_layer.weight"] + 1), ValueError,
                     ["embedding_layer.weight", "must equal", "lang_model.model.embed_tokens.weight"])
  with pytest.raises(err) as e:
    convert.import_radfm_torch(src, cfg, str(tmp_path / "ck"), mesh=sharding.make_mesh(dict(data=-1)))
  for m in msg:
    assert m in str(e.value)
  assert not os.path.exists(tmp_path / "ck" / checkpoint.META_FILE)


def test_hf_config_rejects_unsupported_features():
  from radfm_jax.convert.hf_llama import lm_config_from_hf
  base = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=10)
  for bad, field in ((dict(attention_bias=True), "attention_bias"), (dict(tie_word_embeddings=True), "tie_word"),
                     (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1.0}), "llama3"),
                     (dict(hidden_act="gelu"), "hidden_act")):
    with pytest.raises(ValueError, match=field):
      lm_config_from_hf({**base, **bad})
  lm, vocab = lm_config_from_hf({**base, "rope_theta": 500.0})  # transformers 4.x spelling
  assert (lm.rope_theta, lm.kv_heads, lm.head_dim, vocab) == (500.0, 4, 8, 10)


# ----------------------------------------------------------------------------------------------------
# CLI


def _cli(*args, ok=True):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  r = subprocess.run([sys.executable, "-m", "radfm_jax.convert", *args], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  if not ok:
    return r
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout


def test_cli_hf_llama_both_ways(hf_model, tmp_path):
  hf, path = hf_model
  out = _cli("--from=hf-llama", f"--src={path}", f"--dst={tmp_path / 'ck'}", "--config=configs/tiny.py")
  assert "consumed 21 tensors" in out
  cfg = checkpoint.load_config(str(tmp_path / "ck"))
  assert cfg.model.lm.kv_heads == 2 and cfg.model.vision.dim == tiny.get_config().model.vision.dim
  assert open(cfg.data.tokenizer, "rb").read() == b"sentencepiece model bytes"  # the checkpoint's copy
  assert cfg.data.tokenizer.startswith(str(tmp_path / "ck"))
  _cli("--to=hf-llama", f"--src={tmp_path / 'ck'}", f"--dst={tmp_path / 'hf'}")
  assert open(tmp_path / "hf" / "tokenizer.model", "rb").read() == b"sentencepiece model bytes"
  again = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
  ref = hf.state_dict()
  for k, v in again.state_dict().items():
    assert torch.equal(v, ref[k]), k
