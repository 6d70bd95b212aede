r"""Generation throughput: radfm_jax's KV-cache decoding next to Hugging Face `generate` on the same
weights, and the memory-bandwidth bound of the model on this machine.

  python -m radfm_jax.bench.generate [--hidden=512] [--layers=8] [--vocab=32000] [--prompt=32]
                                     [--new_tokens=32] [--batches=1,8]

Builds a random `LlamaForCausalLM` (transformers, float32, GQA 8/4 heads), saves it as safetensors,
imports it with `radfm_jax.convert.import_hf_llama` (the path real LLaMA weights take) and loads the
checkpoint. Per batch size: greedy decoding of --new_tokens tokens after a --prompt-token prompt with
`radfm_jax.inference.decoding.generate` (compiled once, then timed) and with `LlamaForCausalLM.generate`
(eager torch, KV cache), the tokens compared. Bound: every decode step reads the weights (all but the
embedding table, of which only B rows) and the filled KV cache, so tokens/s <= B x bandwidth / bytes per
step, with the bandwidth measured in the same run (a jitted reduction over a 512 MiB array).
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from radfm_jax import checkpoint
from radfm_jax import convert
from radfm_jax.inference import decoding

_HIDDEN = flags.DEFINE_integer("hidden", 512, "LM hidden size")
_LAYERS = flags.DEFINE_integer("layers", 8, "decoder layers")
_VOCAB = flags.DEFINE_integer("vocab", 32000, "vocabulary (LLaMA: 32000)")
_PROMPT = flags.DEFINE_integer("prompt", 32, "prompt tokens")
_NEW = flags.DEFINE_integer("new_tokens", 32, "generated tokens per row")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "batch sizes")
_REPEATS = flags.DEFINE_integer("repeats", 2, "timed repeats per measurement (the best is kept)")


def bandwidth_probe(mib: int = 512) -> float:
  """Bytes/s of a jitted full read of a float32 array (the decode step's dominant access pattern)."""
  x = jnp.ones((mib << 18,), jnp.float32)
  f = jax.jit(jnp.sum)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(5):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return x.nbytes / best


def _best(fn, repeats: int) -> tuple[float, object]:
  out, best = None, float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t0)
  return best, out


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  # torch/transformers only for the reference side of this bench.
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import LlamaConfig, LlamaForCausalLM  # pylint: disable=g-import-not-at-top

  e, layers, vocab, p, n = _HIDDEN.value, _LAYERS.value, _VOCAB.value, _PROMPT.value, _NEW.value
  heads, kv_heads = 8, 4
  torch.manual_seed(0)
  hf_cfg = LlamaConfig(vocab_size=vocab, hidden_size=e, intermediate_size=int(e * 8 / 3) // 64 * 64,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=p + n, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0)
  hf = LlamaForCausalLM(hf_cfg).eval()
  with torch.no_grad():  # sharper logits than the 0.02 init: no near-ties in the greedy argmax
    for w in hf.parameters():
      if w.ndim == 2:
        w.mul_(4.0)
  hf.generation_config.eos_token_id = None  # always --new_tokens tokens
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(os.path.join(tmp, "hf"))
    convert.import_hf_llama(os.path.join(tmp, "hf"), os.path.join(tmp, "ckpt"))
    model, cfg = checkpoint.load_model(os.path.join(tmp, "ckpt"))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  bw = bandwidth_probe()
  c = cfg.model.lm
  param_bytes = 4 * (n_params - vocab * e)  # the embedding table is gathered (B rows), not read whole
  print(f"\nradfm_jax.bench.generate: LLaMA {e}-dim x {layers} layers, {heads}/{kv_heads} heads, vocab {vocab} "
        f"({n_params / 1e6:.1f}M params, float32), prompt {p} + {n} new tokens, greedy; "
        f"memory bandwidth probe {bw / 1e9:.1f} GB/s\n")
  print("| batch | radfm_jax tok/s | transformers tok/s | ratio | bandwidth bound tok/s | of bound | "
        "same tokens |")
  print("|---|---|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  for b in map(int, _BATCHES.value):
    ids = rng.integers(3, vocab, (b, p)).astype(np.int32)
    mask = np.ones((b, p), bool)
    run = lambda: np.asarray(decoding.generate(model, ids, mask, max_new_tokens=n, eos_id=-1))
    run()  # compile
    t_ours, ours = _best(run, _REPEATS.value)
    with torch.no_grad():
      t_hf, theirs = _best(lambda: hf.generate(torch.from_numpy(ids.astype(np.int64)), do_sample=False,
                                                max_new_tokens=n, min_new_tokens=n, pad_token_id=0),
                           _REPEATS.value)
    theirs = theirs[:, p:].numpy()
    kv_bytes = 4 * 2 * layers * b * (p + n / 2) * kv_heads * c.head_dim  # mean filled cache per step
    bound = b * bw / (param_bytes + kv_bytes)
    ours_tps, hf_tps = b * n / t_ours, b * n / t_hf
    same = np.array_equal(ours, theirs)
    print(f"| {b} | {ours_tps:.1f} | {hf_tps:.1f} | {ours_tps / hf_tps:.2f}x | {bound:.0f} | "
          f"{ours_tps / bound:.0%} | {'yes' if same else f'no ({(ours == theirs).mean():.0%} equal)'} |")


if __name__ == "__main__":
  app.run(main)
