"""models/loss.py: the chunked, fused head + cross-entropy equals `radfm.loss` on full logits (value,
accuracy, token count and every parameter gradient, fp32: rtol 1e-5), per-token eval scores equal the
full-logit ones, and the compiled gradient never holds a [B, T, V] array."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from radfm_jax.models import loss as loss_lib
from radfm_jax.models.radfm import RadFM, image_token_id, loss as full_loss

CFG = tiny.model_config()
V = CFG.vocab_size


@pytest.fixture(scope="module")
def setup():
  model = RadFM(CFG, rngs=nnx.Rngs(5))
  rng = np.random.default_rng(0)
  b, t = 3, 40
  ids = rng.integers(1, V, (b, t)).astype(np.int32)
  ids[0, 2:2 + CFG.tokens_per_image] = [image_token_id(CFG, 0, j) for j in range(CFG.tokens_per_image)]
  targets = np.roll(ids, -1, 1)
  targets[1, 5] = V + 1                       # a marker target: never counted
  loss_mask = np.zeros((b, t), bool)
  loss_mask[:, 25:38] = True                  # answers at the end: chunks 0-2 of 8 are skipped
  loss_mask[2] = False                        # a row with no answer
  images = jnp.asarray(rng.random((b, 1, 32, 32, 4, 3), np.float32))
  batch = dict(inputs=jnp.asarray(ids), images=images, image_mask=jnp.asarray([[True], [False], [False]]),
               targets=jnp.asarray(targets), loss_mask=jnp.asarray(loss_mask))
  return model, batch


def _loss_fns(model, batch, chunk):
  graphdef, state = nnx.split(model)

  def run(fn):
    def f(st):
      m = nnx.merge(graphdef, st)
      return fn(m)
    return jax.jit(jax.value_and_grad(f, has_aux=True))(state)

  def full(m):
    logits = m(batch["inputs"], batch["images"], batch["image_mask"])
    return full_loss(logits, batch["targets"], batch["loss_mask"])

  def chunked(m):
    h = m(batch["inputs"], batch["images"], batch["image_mask"], head=False)
    return loss_lib.lm_loss(m.lm, h, batch["targets"], batch["loss_mask"], chunk=chunk)

  return run(full), run(chunked)


def test_chunked_loss_and_gradients_equal_full(setup, chunk=8):
  model, batch = setup
  ((l0, a0), g0), ((l1, a1), g1) = _loss_fns(model, batch, chunk)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  np.testing.assert_allclose(a1["accuracy"], a0["accuracy"], rtol=1e-6)
  assert int(a1["tokens"]) == int(a0["tokens"]) == 26
  flat0, flat1 = dict(nnx.to_flat_state(g0)), dict(nnx.to_flat_state(g1))
  assert flat0.keys() == flat1.keys()
  for k in flat0:
    a, b = np.asarray(flat0[k].get_value()), np.asarray(flat1[k].get_value())
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7 + 1e-5 * np.abs(a).max(), err_msg=str(k))
  assert np.abs(np.asarray(flat1[("lm", "lm_head", "kernel")].get_value())).max() > 0


def test_no_counted_token_gives_zero(setup):
  model, batch = setup
  h = model(batch["inputs"], batch["images"], batch["image_mask"], head=False)
  l, aux = loss_lib.lm_loss(model.lm, h, batch["targets"], jnp.zeros_like(batch["loss_mask"]), chunk=8)
  assert float(l) == 0.0 and int(aux["tokens"]) == 0


def test_token_scores_equal_full_logits(setup):
  model, batch = setup
  logits = model(batch["inputs"], batch["images"], batch["image_mask"])
  h = model(batch["inputs"], batch["images"], batch["image_mask"], head=False)
  valid = loss_lib.valid_positions(batch["targets"], batch["loss_mask"], V)
  nll, correct = loss_lib.token_scores(model.lm, h, batch["targets"], valid, chunk=16)
  tgt = jnp.clip(batch["targets"], 0, V - 1)
  want = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tgt[..., None], -1)[..., 0]
  np.testing.assert_allclose(nll, jnp.where(valid, want, 0.0), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(correct, valid & (logits.argmax(-1) == batch["targets"]))


def test_compiled_gradient_never_holds_full_logits(setup):
  model, batch = setup
  graphdef, state = nnx.split(model)
  b, t = batch["inputs"].shape

  def f(st):
    m = nnx.merge(graphdef, st)
    h = m(batch["inputs"] % V, head=False)
    return loss_lib.lm_loss(m.lm, h, batch["targets"], batch["loss_mask"], chunk=8)[0]

  hlo = jax.jit(jax.grad(f)).lower(state).compile().as_text()
  assert f"f32[{b},8,{V}]" in hlo                      # one chunk of logits
  assert not re.search(rf"\[{b},{t},{V}\]", hlo)        # never the whole [B, T, V]
