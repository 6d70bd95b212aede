"""Next-token cross-entropy from the LM's hidden states, in sequence chunks: the [B, T, V] logits never
exist whole (the 1B step held bf16[256, 2048, 32000] before), and chunks without a counted token are
skipped (prompts and image tokens are most of a RadFM sequence; only answers are scored).

  hidden = model(inputs, images, image_mask, positions=..., segment_ids=..., head=False)   # [B, T, E]
  loss, aux = lm_loss(model.lm, hidden, targets, loss_mask)            # training (fused gradient)
  nll, correct = token_scores(model.lm, hidden, targets, valid)        # eval: per-token NLL / argmax hit

Contract (as `radfm.loss` on full logits): a position counts iff loss_mask and 0 <= target < V (image ids
and markers are never predicted); loss = mean NLL over counted positions (0 when none); logits in float32.

Training uses a fused kernel (`nll_sum`, a custom VJP): one pass over chunks computes the logits, the NLL
and, at once, the gradients w.r.t. the normed hidden states and the head kernel (softmax - one-hot), so
the backward pass only scales them and no logits chunk is recomputed. Its cost is the three head matmuls
of plain autodiff (forward, d_hidden, d_kernel), done in the forward pass.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from radfm_jax.sharding import constrain

CHUNK = 256  # sequence positions per chunk: logits live as [B, CHUNK, V] float32 at a time


def _chunks(x: jax.Array, c: int) -> jax.Array:
  """[B, T, ...] -> [T/c, B, c, ...] (T padded up to a multiple of c with zeros)."""
  b, t = x.shape[:2]
  n = -(-t // c)
  x = jnp.pad(x, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x.ndim - 2))
  return jnp.swapaxes(x.reshape((b, n, c) + x.shape[2:]), 0, 1)


def _unchunk(x: jax.Array, t: int) -> jax.Array:
  n, b, c = x.shape[:3]
  return jnp.swapaxes(x, 0, 1).reshape((b, n * c) + x.shape[3:])[:, :t]


def _chunk_stats(logits: jax.Array, targets: jax.Array, valid: jax.Array):
  v = logits.shape[-1]
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, jnp.clip(targets, 0, v - 1)[..., None], axis=-1)[..., 0]
  nll = jnp.where(valid, lse - tgt, 0.0)
  correct = valid & (logits.argmax(-1) == targets)
  return nll, correct, lse


def valid_positions(targets: jax.Array, loss_mask: jax.Array, vocab: int) -> jax.Array:
  return loss_mask.astype(bool) & (targets >= 0) & (targets < vocab)


# ----------------------------------------------------------------------------------------------------
# Eval: per-token scores through any head (no gradient shortcuts; differentiable, chunk-rematerialised).
# ----------------------------------------------------------------------------------------------------
def token_scores(lm, hidden: jax.Array, targets: jax.Array, valid: jax.Array, *, chunk: int = CHUNK
                 ) -> tuple[jax.Array, jax.Array]:
  """Per position (nll [B, T] float32, 0 where not valid; correct [B, T] bool: valid and argmax hit),
  with `lm.logits` applied per chunk of `chunk` positions (chunks with no valid position skipped)."""
  t = hidden.shape[1]
  c = min(chunk, t)

  @jax.checkpoint  # under grad, recompute a chunk's logits instead of saving them
  def one(h, tgt, ok):
    return _chunk_stats(lm.logits(h), tgt, ok)[:2]

  def body(_, x):
    h, tgt, ok = x
    zeros = (jnp.zeros(ok.shape, jnp.float32), jnp.zeros(ok.shape, bool))
    return None, jax.lax.cond(ok.any(), one, lambda *_: zeros, h, tgt, ok)

  _, (nll, correct) = jax.lax.scan(body, None, (_chunks(hidden, c), _chunks(targets, c), _chunks(valid, c)))
  return _unchunk(nll, t), _unchunk(correct, t)


# ----------------------------------------------------------------------------------------------------
# Training: fused head + cross-entropy with the gradient computed in the forward pass.
# ----------------------------------------------------------------------------------------------------
def _nll_sum_fwd_impl(h, kernel, targets, valid, chunk):
  """(nll sum, correct count, d nll_sum / d h, d nll_sum / d kernel) over chunks of h [B, T, E]."""
  t = h.shape[1]
  c = min(chunk, t)

  def one(acc, x):
    hc, tgt, ok = x
    logits = jnp.einsum("bce,ev->bcv", hc, kernel, preferred_element_type=jnp.float32)
    logits = constrain(logits, ("batch", "length", "vocab"))
    nll, correct, lse = _chunk_stats(logits, tgt, ok)
    d = jnp.exp(logits - lse[..., None]) - jax.nn.one_hot(tgt, logits.shape[-1], dtype=jnp.float32)
    d = jnp.where(ok[..., None], d, 0.0).astype(hc.dtype)
    dh = jnp.einsum("bcv,ev->bce", d, kernel, preferred_element_type=jnp.float32).astype(hc.dtype)
    dk = acc[2] + jnp.einsum("bce,bcv->ev", hc, d, preferred_element_type=jnp.float32)
    return (acc[0] + nll.sum(), acc[1] + correct.sum(), dk), dh

  def body(acc, x):
    skip = lambda acc, x: (acc, jnp.zeros(x[0].shape, x[0].dtype))
    return jax.lax.cond(x[2].any(), one, skip, acc, x)

  init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros(kernel.shape, jnp.float32))
  (total, correct, dk), dh = jax.lax.scan(body, init, (_chunks(h, c), _chunks(targets, c), _chunks(valid, c)))
  return total, correct, _unchunk(dh, t), dk


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def nll_sum(h: jax.Array, kernel: jax.Array, targets: jax.Array, valid: jax.Array, chunk: int = CHUNK
            ) -> tuple[jax.Array, jax.Array]:
  """(sum of NLL over valid positions, number of valid argmax hits) of logits = h [B, T, E] . kernel
  [E, V] (float32 accumulation), never holding more than one [B, chunk, V] block."""
  total, correct, _, _ = _nll_sum_fwd_impl(h, kernel, targets, valid, chunk)
  return total, correct


def _nll_sum_fwd(h, kernel, targets, valid, chunk):
  total, correct, dh, dk = _nll_sum_fwd_impl(h, kernel, targets, valid, chunk)
  return (total, correct), (dh, dk.astype(kernel.dtype))


def _nll_sum_bwd(chunk, res, g):
  del chunk
  dh, dk = res
  g_total = g[0]
  return (dh * g_total.astype(dh.dtype), dk * g_total.astype(dk.dtype), None, None)


nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd)


def lm_loss(lm, hidden: jax.Array, targets: jax.Array, loss_mask: jax.Array, *, chunk: int = CHUNK
            ) -> tuple[jax.Array, dict]:
  """(loss, {"loss", "accuracy", "tokens"}) from the LM's last hidden states [B, T, E]: final norm, then
  the fused chunked head + cross-entropy (`nll_sum`). Same value and gradients as `radfm.loss` on
  `lm.logits(hidden)`, up to float summation order."""
  head = lm.lm_head
  if head.bias is not None or len(head.in_features) != 1 or len(head.out_features) != 1:
    raise ValueError("lm_loss expects a bias-free [E, V] head (LLaMA's lm_head)")
  vocab = head.out_features[0]
  valid = valid_positions(targets, loss_mask, vocab)
  h = lm.final_norm(hidden).astype(head.dtype)
  total, correct = nll_sum(h, head.kernel[...].astype(head.dtype), targets, valid, chunk)
  n = valid.sum()
  denom = jnp.maximum(n, 1).astype(jnp.float32)
  loss = total / denom
  return loss, {"loss": loss, "accuracy": correct.astype(jnp.float32) / denom, "tokens": n}

