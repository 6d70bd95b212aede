"""KV-cache generation: equals uncached argmax decoding, independent of batch composition and padding,
stops on eos, samples within top-k / top-p, rejects bad prompts; the CLI prints ids as JSON."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from radfm_jax.inference import decoding as gen
from radfm_jax.models.llama import Llama
from radfm_jax.models.radfm import RadFM, image_token_id

CFG = tiny.model_config()
V, TPI = CFG.vocab_size, CFG.tokens_per_image
N_NEW = 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _block(slot):
  return [V] + [image_token_id(CFG, slot, j) for j in range(TPI)] + [V + 1]


def _left_pad(rows, length):
  ids = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, r in enumerate(rows):
    ids[i, length - len(r):], mask[i, length - len(r):] = r, True
  return ids, mask


@pytest.fixture(scope="module")
def model():
  m = RadFM(CFG, rngs=nnx.Rngs(1))
  # Sharpen the random head so greedy decoding moves between tokens instead of repeating one.
  m.lm.lm_head.kernel[...] = m.lm.lm_head.kernel[...] * 8.0
  return m


@pytest.fixture(scope="module")
def images():
  return jnp.asarray(np.random.default_rng(0).random((3, 2, 64, 32, 8, 3), np.float32))


PROMPTS = [
    [1, 17, 42] + _block(0) + [23, 99],
    [1, 5] + _block(1) + [7, 8, 9, 10] + _block(0) + [11],
    [1, 300],
]
IMAGE_MASK = np.array([[True, False], [True, True], [False, False]])


def greedy_uncached(model, ids, mask, images, image_mask, n):
  """Reference: full forward over a fixed buffer each step (no cache), argmax of the last real slot."""
  graphdef, state = nnx.split(model)
  b, p = ids.shape
  buf, m = np.zeros((b, p + n), np.int32), np.zeros((b, p + n), bool)
  buf[:, :p], m[:, :p] = ids, mask

  @jax.jit
  def logits_at(buf, m, t):
    seg = m.astype(jnp.int32)
    pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
    out = nnx.merge(graphdef, state)(buf, images, image_mask, positions=pos, segment_ids=seg)
    return jax.lax.dynamic_index_in_dim(out, t, axis=1, keepdims=False)

  for i in range(n):
    buf[:, p + i] = np.asarray(logits_at(buf, m, p + i - 1).argmax(-1))
    m[:, p + i] = True
  return buf[:, p:]


def test_cached_equals_uncached_and_batch_independent(model, images):
  ids, mask = _left_pad(PROMPTS, 30)
  cached = np.asarray(gen.generate(model, ids, mask, images, IMAGE_MASK, max_new_tokens=N_NEW, eos_id=-1))
  ref = greedy_uncached(model, ids, mask, images, jnp.asarray(IMAGE_MASK), N_NEW)
  np.testing.assert_array_equal(cached, ref)
  assert len(set(cached[0].tolist())) > 2  # a real sequence, not one repeated token
  # Row 0 alone, unpadded (different batch, length and padding) gives the same tokens.
  alone_ids, alone_mask = _left_pad(PROMPTS[:1], len(PROMPTS[0]))
  alone = np.asarray(gen.generate(model, alone_ids, alone_mask, images[:1], IMAGE_MASK[:1],
                                  max_new_tokens=N_NEW, eos_id=-1))
  np.testing.assert_array_equal(alone[0], cached[0])
  # The images matter.
  other = np.asarray(gen.generate(model, alone_ids, alone_mask, images[1:2], IMAGE_MASK[:1],
                                  max_new_tokens=N_NEW, eos_id=-1))
  assert (other[0] != cached[0]).any()


def test_stops_on_eos_then_pads(model, images):
  ids, mask = _left_pad(PROMPTS, 30)
  free = np.asarray(gen.generate(model, ids, mask, images, IMAGE_MASK, max_new_tokens=N_NEW, eos_id=-1))
  eos = int(free[0, 2])
  first = int(np.flatnonzero(free[0] == eos)[0])
  out = np.asarray(gen.generate(model, ids, mask, images, IMAGE_MASK, max_new_tokens=N_NEW, eos_id=eos,
                                pad_id=0))
  np.testing.assert_array_equal(out[0, :first + 1], free[0, :first + 1])
  assert (out[0, first + 1:] == 0).all()
  for r in range(1, 3):  # rows that never emit eos are unaffected
    if eos not in free[r]:
      np.testing.assert_array_equal(out[r], free[r])
  assert gen.trim(out, eos)[0] == free[0, :first + 1].tolist()


def test_sampling_modes(model, images):
  ids, mask = _left_pad(PROMPTS, 30)
  kw = dict(max_new_tokens=N_NEW, eos_id=-1)
  greedy = np.asarray(gen.generate(model, ids, mask, images, IMAGE_MASK, **kw))
  key = jax.random.key(0)
  top1 = gen.generate(model, ids, mask, images, IMAGE_MASK, temperature=1.0, top_k=1, rng=key, **kw)
  np.testing.assert_array_equal(top1, greedy)
  nucleus = gen.generate(model, ids, mask, images, IMAGE_MASK, temperature=1.0, top_p=1e-6, rng=key, **kw)
  np.testing.assert_array_equal(nucleus, greedy)
  a = gen.generate(model, ids, mask, images, IMAGE_MASK, temperature=5.0, rng=key, **kw)
  b = gen.generate(model, ids, mask, images, IMAGE_MASK, temperature=5.0, rng=key, **kw)
  np.testing.assert_array_equal(a, b)
  assert (np.asarray(a) != greedy).any()


def test_sample_logits_support():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 400))
  keys = jax.random.key(3)
  sample = jax.jit(gen.sample_logits)
  k2 = np.asarray(sample(logits, keys, 1.0, 2, 1.0))
  assert set(k2.tolist()) == {0, 1}
  p7 = np.asarray(sample(logits, keys, 1.0, 0, 0.7))  # 0.5 + 0.3 covers 0.7
  assert set(p7.tolist()) == {0, 1}
  k3p = np.asarray(sample(logits, keys, 1.0, 3, 0.8))  # top-3 renormalised: 0.53 + 0.32 covers 0.8
  assert set(k3p.tolist()) == {0, 1}
  full = np.asarray(sample(logits, keys, 1.0, 0, 1.0))
  assert set(full.tolist()) == {0, 1, 2, 3}
  assert abs((full == 0).mean() - 0.5) < 0.1
  np.testing.assert_array_equal(gen.sample_logits(logits[:2], None), [0, 0])


def test_bad_prompts(model):
  ids = np.array([[1, 5, 0]], np.int32)
  with pytest.raises(ValueError, match="LEFT-padded"):
    gen.generate(model, ids, ids != 0, max_new_tokens=2)
  with pytest.raises(ValueError, match=r"prompt rows \[0\] have no tokens"):
    gen.generate(model, ids, np.zeros_like(ids, bool), max_new_tokens=2)
  with pytest.raises(ValueError, match="exceeds cfg.lm.max_len"):
    gen.generate(model, ids[:, :2], np.ones((1, 2), bool), max_new_tokens=300)
  with pytest.raises(ValueError, match="no images were given"):
    gen.generate(model, np.array([[1, image_token_id(CFG, 0, 0)]]), np.ones((1, 2), bool), max_new_tokens=2)
  with pytest.raises(ValueError, match="needs rng"):
    gen.generate(model, ids[:, :2], np.ones((1, 2), bool), max_new_tokens=2, temperature=1.0)
  with pytest.raises(ValueError, match="typed key"):  # a legacy uint32 key would read as 2 row keys
    gen.generate(model, ids[:, :2], np.ones((1, 2), bool), max_new_tokens=2, temperature=1.0,
                 rng=jax.random.PRNGKey(0))


def test_lm_only_model_as_graphdef_state():
  lm = Llama(CFG, rngs=nnx.Rngs(2))
  ids, mask = _left_pad([[1, 2, 3, 4], [1, 9]], 4)
  out = np.asarray(gen.generate(nnx.split(lm), ids, mask, max_new_tokens=3, eos_id=-1))
  logits = lm(jnp.asarray(ids[1:, 2:]))  # row 1 alone, unpadded
  assert out[1, 0] == int(logits[0, -1].argmax())
  with pytest.raises(ValueError, match="outside the LM's vocabulary"):
    gen.generate(lm, np.array([[1, V]]), np.ones((1, 2), bool), max_new_tokens=2)


def test_cli_prints_ids_json(model, tmp_path):
  from radfm_jax import checkpoint
  ckpt = str(tmp_path / "ckpt")
  checkpoint.save_model(ckpt, model, tiny.get_config())
  want = gen.trim(np.asarray(gen.generate(model, np.array([[1, 17, 42]]), np.ones((1, 3), bool),
                                          max_new_tokens=6)))[0]
  res = subprocess.run([sys.executable, "-m", "radfm_jax.generate", f"--checkpoint={ckpt}",
                        "--token_ids=1,17,42", "--max_new_tokens=6"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  assert json.loads(res.stdout.strip().splitlines()[-1]) == {"ids": want}
