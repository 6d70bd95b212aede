"""The three towers and KV-cache decoding through models/attention.py equal the pre-issue-11 einsum
attention (the oracle in test_attention.py, patched in for comparison): LM logits with packed
segments and GQA, ViT tokens, resampler latents, cache decode logits (fp32, 2e-5), greedy tokens
identical on the tiny config."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from radfm_jax.inference import decoding as gen
from radfm_jax.models import attention as attn_lib
from radfm_jax.models.radfm import RadFM, image_token_id
from attention_reference import reference

CFG = tiny.model_config()
V, TPI = CFG.vocab_size, CFG.tokens_per_image
TOL = dict(rtol=2e-5, atol=2e-5)


def einsum_attention(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None, q_offset=None,
                     dtype=None, implementation="auto", interpret=False):
  """The old masking: a materialised [B, T, S] mask, then the einsum reference."""
  del implementation, interpret
  t, s = q.shape[1], k.shape[1]
  mask = None
  if causal:
    off = 0 if q_offset is None else q_offset
    mask = (jnp.arange(s)[None, :] <= (off + jnp.arange(t))[:, None])[None]
  if q_segment_ids is not None:
    seg = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    mask = seg if mask is None else mask & seg
  dtype = dtype or q.dtype
  return reference(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask).astype(dtype)


@pytest.fixture(scope="module")
def model():
  m = RadFM(CFG, rngs=nnx.Rngs(3))
  m.lm.lm_head.kernel[...] = m.lm.lm_head.kernel[...] * 8.0  # greedy decoding moves between tokens
  return m


@pytest.fixture
def old(monkeypatch):
  """Context: run the models with the einsum oracle instead of the fused function."""
  class Old:
    def __enter__(self):
      monkeypatch.setattr(attn_lib, "attention", einsum_attention)

    def __exit__(self, *exc):
      monkeypatch.undo()
  return Old()


def _images(b, s, seed=0):
  return jnp.asarray(np.random.default_rng(seed).random((b, s, 64, 32, 8, 3), np.float32))


def _block(slot):
  return [V] + [image_token_id(CFG, slot, j) for j in range(TPI)] + [V + 1]


def test_packed_lm_forward_matches_einsum(model, old):
  """Two packed samples per row + padding, images, GQA (tiny LM: 4 heads over 2 kv heads)."""
  a = [1, 17] + _block(0) + [23, 99, 5]
  b = [1, 40, 41, 42]
  row = a + b + [0] * 6
  ids = jnp.asarray([row, row], jnp.int32)
  seg = jnp.asarray([[1] * len(a) + [2] * len(b) + [0] * 6] * 2, jnp.int32)
  pos = jnp.asarray([list(range(len(a))) + list(range(len(b))) + [0] * 6] * 2, jnp.int32)
  images, mask = _images(2, 1), jnp.asarray([[True], [False]])
  f = lambda: jax.jit(lambda i, im, m, p, s: model(i, im, m, positions=p, segment_ids=s))(ids, images, mask, pos, seg)
  new = f()
  with old:
    want = f()
  np.testing.assert_allclose(new, want, **TOL)


def test_vit_and_resampler_match_einsum(model, old):
  vol = _images(3, 1, seed=1)[:, 0]
  f = lambda: jax.jit(lambda x: (lambda t: (t, model.resampler(t)))(model.vision(x)))(vol)
  tok, lat = f()
  with old:
    tok0, lat0 = f()
  np.testing.assert_allclose(tok, tok0, **TOL)
  np.testing.assert_allclose(lat, lat0, **TOL)


def test_cache_decode_logits_and_greedy_tokens_match_einsum(model, old):
  rows = [[1, 17, 42] + _block(0) + [23, 99], [1, 300]]
  length = max(map(len, rows))
  ids = np.zeros((2, length), np.int32)
  pmask = np.zeros((2, length), bool)
  for i, r in enumerate(rows):
    ids[i, length - len(r):], pmask[i, length - len(r):] = r, True
  images, imask = _images(2, 1, seed=2), np.array([[True], [False]])

  def run():
    out = np.asarray(gen.generate(model, ids, pmask, images, imask, max_new_tokens=10))
    cache = model.lm.init_cache(2, 24)
    emb = model.embed(jnp.asarray(ids), model.encode_images(images, jnp.asarray(imask)))
    pos = jnp.cumsum(pmask, 1) - 1
    logits, cache = jax.jit(model.lm.decode)(emb, jnp.maximum(pos, 0), jnp.asarray(pmask, jnp.int32), cache)
    step, _ = jax.jit(model.lm.decode)(model.lm.embed(jnp.asarray(out[:, :1])), pos[:, -1:] + 1,
                                       jnp.ones((2, 1), jnp.int32), cache)
    return out, logits, step

  new = run()
  with old:
    want = run()
  np.testing.assert_array_equal(new[0], want[0])
  assert len(set(new[0][0].tolist())) > 1  # the tokens move (a meaningful comparison)
  np.testing.assert_allclose(new[1], want[1], **TOL)
  np.testing.assert_allclose(new[2], want[2], **TOL)
