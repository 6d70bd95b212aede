"""models/attention.py against the einsum attention it replaced (fp32: |diff| <= 2e-6 abs + rel).

The reference below is the pre-issue-11 `layers.attention` (einsum over a materialised [B, T, S] mask,
float32 softmax) kept verbatim as the oracle. Every backend reachable on CPU is compared: XLA
(`jax.nn.dot_product_attention`) and Pallas splash in interpret mode (the TPU kernel's own code).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radfm_jax.models import attention as attn_lib
from radfm_jax.sharding import make_mesh
from attention_reference import reference

TOL = dict(rtol=2e-6, atol=2e-6)       # fp32, XLA path
SPLASH_TOL = dict(rtol=2e-5, atol=2e-5)  # fp32, online-softmax kernel (different summation order)
def qkv(b, t, s, n, kh, d, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, t, n, d)), jax.random.normal(ks[1], (b, s, kh, d)),
          jax.random.normal(ks[2], (b, s, kh, d)))


def packed_segments(b, t, seed=0):
  """Rows of 1..3 packed segments followed by padding (id 0), as the pipeline packs them."""
  rng = np.random.default_rng(seed)
  seg = np.zeros((b, t), np.int32)
  for r in range(b):
    cuts = np.sort(rng.choice(np.arange(1, t), 3, replace=False))
    for i, (lo, hi) in enumerate(zip([0, *cuts[:-1]], cuts)):
      seg[r, lo:hi] = i + 1
  return jnp.asarray(seg)


def causal_segment_mask(seg):
  t = seg.shape[1]
  return jnp.tril(jnp.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_lm_causal_segments_gqa_xla(heads, kv_heads):
  q, k, v = qkv(2, 24, 24, heads, kv_heads, 16)
  seg = packed_segments(2, 24)
  out = attn_lib.attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg,
                           implementation="xla")
  np.testing.assert_allclose(out, reference(q, k, v, causal_segment_mask(seg)), **TOL)
  out = attn_lib.attention(q, k, v, causal=True, implementation="xla")
  np.testing.assert_allclose(out, reference(q, k, v, jnp.tril(jnp.ones((24, 24), bool))[None]), **TOL)


def test_gradients_match_reference():
  q, k, v = qkv(2, 16, 16, 4, 2, 8, seed=1)
  seg = packed_segments(2, 16, seed=1)
  f = lambda *a: (attn_lib.attention(*a, causal=True, q_segment_ids=seg, kv_segment_ids=seg,
                                     implementation="xla") ** 2).sum()
  g = lambda *a: (reference(*a, causal_segment_mask(seg)) ** 2).sum()
  for a, b in zip(jax.grad(f, (0, 1, 2))(q, k, v), jax.grad(g, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_cache_decode_one_query_over_fixed_cache():
  """Query length 1 at slot `index` over a 32-slot cache: only written slots of the same segment count."""
  b, s, n, kh, d = 3, 32, 4, 2, 16
  q, k, v = qkv(b, 1, s, n, kh, d, seed=2)
  index = 11
  kv_seg = np.zeros((b, s), np.int32)
  kv_seg[:, : index + 1] = 1
  kv_seg[1, :4] = 0  # left padding of row 1
  kv_seg, q_seg = jnp.asarray(kv_seg), jnp.ones((b, 1), jnp.int32)
  out = jax.jit(lambda q, k, v, i: attn_lib.attention(
      q, k, v, causal=True, q_segment_ids=q_seg, kv_segment_ids=kv_seg, q_offset=i,
      implementation="xla"))(q, k, v, jnp.int32(index))
  mask = (jnp.arange(s) <= index)[None, None] & (q_seg[:, :, None] == kv_seg[:, None, :])
  np.testing.assert_allclose(out, reference(q, k, v, mask), **TOL)
  # Equal to attending over the valid prefix only (what the cache stands for).
  np.testing.assert_allclose(out[0], reference(q[:1], k[:1, : index + 1], v[:1, : index + 1], None)[0], **TOL)


def test_prefill_block_in_cache():
  """T new tokens at slots index..index+T-1 (prefill / chunked decode)."""
  b, s, t, n, d, index = 2, 40, 8, 2, 16, 5
  q, k, v = qkv(b, t, s, n, n, d, seed=3)
  kv_seg = jnp.asarray((np.arange(s) < index + t)[None].repeat(b, 0).astype(np.int32))
  q_seg = jnp.ones((b, t), jnp.int32)
  out = attn_lib.attention(q, k, v, causal=True, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                           q_offset=jnp.int32(index), implementation="xla")
  mask = (jnp.arange(s)[None] <= (index + jnp.arange(t))[:, None])[None] & (kv_seg[:, None, :] == 1)
  np.testing.assert_allclose(out, reference(q, k, v, mask), **TOL)


def test_vit_and_resampler_full_attention():
  q, k, v = qkv(3, 40, 40, 2, 2, 16, seed=4)      # ViT: self-attention over patch tokens
  np.testing.assert_allclose(attn_lib.attention(q, k, v, implementation="xla"), reference(q, k, v, None), **TOL)
  q, k, v = qkv(3, 8, 48, 2, 2, 16, seed=5)       # resampler: 8 latents over 40 media + 8 latents
  np.testing.assert_allclose(attn_lib.attention(q, k, v, implementation="xla"), reference(q, k, v, None), **TOL)


def test_fully_masked_row_is_uniform_not_nan():
  q, k, v = qkv(1, 4, 4, 1, 1, 8, seed=6)
  q_seg, kv_seg = jnp.asarray([[1, 1, 2, 2]]), jnp.asarray([[1, 1, 1, 1]])
  out = attn_lib.attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, implementation="xla")
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(out[0, 2:, 0], jnp.broadcast_to(v[0, :, 0].mean(0), (2, 8)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_splash_kernel_interpret_matches_reference(causal):
  """The TPU Pallas splash kernel (interpret mode on CPU): causal + packed segments + GQA."""
  b, t, n, kh, d = 2, 256, 4, 2, 64
  q, k, v = qkv(b, t, t, n, kh, d, seed=7)
  seg = packed_segments(b, t, seed=7)
  out = attn_lib.attention(q, k, v, causal=causal, q_segment_ids=seg, kv_segment_ids=seg,
                           implementation="splash", interpret=True)
  mask = (seg[:, :, None] == seg[:, None, :]) & (jnp.tril(jnp.ones((t, t), bool))[None] if causal else True)
  np.testing.assert_allclose(out, reference(q, k, v, mask), **SPLASH_TOL)


def test_splash_under_shard_map_on_mesh():
  """Splash under shard_map over (data, fsdp) x tensor on 8 fake devices equals the reference."""
  mesh = make_mesh(dict(data=2, fsdp=2, tensor=2))
  b, t, n, kh, d = 4, 128, 4, 2, 64
  q, k, v = qkv(b, t, t, n, kh, d, seed=8)
  seg = packed_segments(b, t, seed=8)
  with jax.set_mesh(mesh):
    out = jax.jit(lambda q, k, v, s: attn_lib.attention(
        q, k, v, causal=True, q_segment_ids=s, kv_segment_ids=s, implementation="splash",
        interpret=True))(q, k, v, seg)
  np.testing.assert_allclose(out, reference(q, k, v, causal_segment_mask(seg)), **SPLASH_TOL)


def test_resolve_and_errors():
  assert attn_lib.resolve("auto", 128, 128, 64) == "xla"            # this CPU box
  assert attn_lib.resolve("splash", 1, 128, 64, q_offset=3) == "xla"  # decode step: no tiles
  assert attn_lib.resolve("splash", 32, 1056, 64) == "xla"            # resampler's 32 latents
  assert attn_lib.resolve("splash", 2048, 2048, 128) == "splash"
  with pytest.raises(ValueError, match="implementation"):
    attn_lib.resolve("flash", 8, 8, 8)
  q, k, v = qkv(1, 4, 4, 3, 2, 8)
  with pytest.raises(ValueError, match="multiple"):
    attn_lib.attention(q, k, v)
  q, k, v = qkv(1, 4, 4, 2, 2, 8)
  with pytest.raises(ValueError, match="both"):
    attn_lib.attention(q, k, v, q_segment_ids=jnp.ones((1, 4), jnp.int32))


def test_xla_path_bf16_gradients_match_float32_reference():
  """bf16 inputs through the XLA path (the CPU trainer's): loss and gradients stay within bf16 resolution of
  the float32 reference (jax.nn.dot_product_attention in float32), causal + packed segments + GQA."""
  rng = np.random.default_rng(0)
  b, t, n, kh, d = 2, 64, 4, 2, 32
  q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
             for shape in ((b, t, n, d), (b, t, kh, d), (b, t, kh, d)))
  seg = jnp.asarray(np.repeat([[1] * 40 + [2] * 24], b, 0), jnp.int32)

  def ours(q, k, v):
    o = attn_lib.attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg, implementation="xla")
    return (o.astype(jnp.float32) ** 2).sum()

  def ref(q, k, v):
    m = attn_lib.local_mask(t, t, causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    f32 = lambda x: x.astype(jnp.float32)
    return (jax.nn.dot_product_attention(f32(q), f32(k), f32(v), mask=m, is_causal=True) ** 2).sum()

  np.testing.assert_allclose(float(ours(q, k, v)), float(ref(q, k, v)), rtol=1e-3)
  for got, want in zip(jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v)):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.dtype == np.float32 and np.abs(got - want).max() <= 2e-2 * np.abs(want).max()
