"""The einsum attention of radfm_jax before issue 11 (`layers.attention`), kept verbatim as the oracle
for tests/test_attention*.py: scores over a materialised [B, T, S] mask, float32 softmax."""
import math

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def reference(q, k, v, mask):
  """The einsum attention of radfm_jax before issue 11; mask broadcastable to [B, T, S] or None."""
  b, t, n, d = q.shape
  kh = k.shape[2]
  q = q.reshape(b, t, kh, n // kh, d)
  s = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (1.0 / math.sqrt(d))
  if mask is not None:
    s = jnp.where(jnp.broadcast_to(mask, (b, t, k.shape[1]))[:, None, None], s, NEG_INF)
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("bkgts,bskd->btkgd", p, v, preferred_element_type=jnp.float32).reshape(b, t, n, d)
