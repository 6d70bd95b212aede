"""Vision-tower dropout: off by default (bit-identical to no dropout), keyed and reproducible when on,
absent from eval, consistent under scan/unroll/remat, and a train step that depends only on its step."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import demo, radfm_13b, radfm_1b, tiny
from radfm_jax import sharding
from radfm_jax.training import loop as train_loop
from radfm_jax.training import step as train
from radfm_jax.training import state as train_state
from radfm_jax.models import vit3d
from train_utils import synthetic_batch, tiny_train_config

K0, K1 = jax.random.key(0), jax.random.key(1)
VOLS = jnp.asarray(np.random.default_rng(0).random((2, 64, 32, 8, 3), np.float32))


def _cfg(dropout=None, emb_dropout=None, **top) -> ml_collections.ConfigDict:
  """tiny's model config with the dropout fields set (None: field removed, like an old config)."""
  c = tiny.model_config()
  for name, rate in (("dropout", dropout), ("emb_dropout", emb_dropout)):
    if rate is None:
      del c.vision[name]
    else:
      c.vision[name] = rate
  for k, v in top.items():
    c[k] = v
  return c


@functools.cache
def _vit_for(dropout, emb_dropout):
  return _vit(_cfg(dropout, emb_dropout))


def _vit(cfg):
  """A jitted `f(volumes, key | None)` for a ViT built with seed 0 (same params for any dropout)."""
  graphdef, state = nnx.split(vit3d.VisionTransformer3D(cfg, rngs=nnx.Rngs(0)))
  f = jax.jit(lambda st, x, k: nnx.merge(graphdef, st)(x, k))
  return lambda x, k=None: np.asarray(f(state, x, k)), state


def test_config_defaults():
  assert tiny.model_config().vision.dropout == 0.0 and tiny.model_config().vision.emb_dropout == 0.0
  assert demo.model_config().vision.dropout == 0.0 and demo.model_config().vision.emb_dropout == 0.0
  for mod in (radfm_13b, radfm_1b):
    v = mod.model_config().vision
    assert (v.dropout, v.emb_dropout) == (0.1, 0.1), mod.__name__


def test_zero_dropout_is_exactly_the_old_model():
  old, old_state = _vit_for(None, None)  # no dropout fields (an old checkpoint's config)
  zero, zero_state = _vit_for(0.0, 0.0)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(old_state), nnx.to_pure_dict(zero_state))
  ref = old(VOLS)
  np.testing.assert_array_equal(zero(VOLS), ref)
  np.testing.assert_array_equal(zero(VOLS, K0), ref)  # a key with rate 0 changes nothing
  np.testing.assert_array_equal(old(VOLS, K0), ref)


def test_dropout_is_keyed_and_reproducible():
  f, _ = _vit_for(0.1, 0.1)
  ref = f(VOLS)
  a, a2, b = f(VOLS, K0), f(VOLS, K0), f(VOLS, K1)
  np.testing.assert_array_equal(a, a2)
  assert np.abs(a - ref).max() > 1e-2
  assert np.abs(a - b).max() > 1e-2
  # Block dropout alone changes the output too (embedding dropout alone: the next test).
  g, _ = _vit_for(0.1, 0.0)
  assert np.abs(g(VOLS, K0) - ref).max() > 1e-2


def test_eval_path_ignores_dropout_config():
  f, _ = _vit_for(0.5, 0.5)
  g, _ = _vit_for(0.0, 0.0)
  np.testing.assert_array_equal(f(VOLS), g(VOLS))


def test_emb_dropout_drops_the_expected_fraction():
  """Only embedding dropout at rate 0.5 on a 1-layer ViT whose block is made the identity: about half
  the embedding entries are zero and the kept ones are scaled by 2."""
  cfg = _cfg(0.0, 0.5)
  cfg.vision.depth = 1
  model = vit3d.VisionTransformer3D(cfg, rngs=nnx.Rngs(0))
  blocks = model.blocks
  for lin in (blocks.o, blocks.fc2):
    lin.kernel[...] = jnp.zeros_like(lin.kernel[...])
    lin.bias[...] = jnp.zeros_like(lin.bias[...])
  clean, dropped = np.asarray(model(VOLS)), np.asarray(model(VOLS, K0))
  zeros = dropped == 0
  assert 0.45 < zeros.mean() < 0.55
  np.testing.assert_allclose(dropped[~zeros], 2 * clean[~zeros], rtol=1e-5, atol=1e-6)


def test_same_masks_and_gradients_scanned_and_unrolled_with_remat():
  """Scanned without remat vs unrolled with full remat: the same per-layer masks, so the same loss and
  gradients (a different mask would move them by O(1))."""
  grads = []
  for scan, remat in ((True, "none"), (False, "full")):
    cfg = _cfg(0.1, 0.1, scan_layers=scan, remat=remat)
    graphdef, state = nnx.split(vit3d.VisionTransformer3D(cfg, rngs=nnx.Rngs(0)))
    loss = lambda st: jnp.sum(nnx.merge(graphdef, st)(VOLS, K0) ** 2)
    grads.append(jax.jit(jax.grad(loss))(state))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
               nnx.to_pure_dict(grads[0]), nnx.to_pure_dict(grads[1]))


def test_train_step_with_dropout_depends_only_on_step():
  cfg = tiny_train_config()
  cfg.model.vision.dropout = cfg.model.vision.emb_dropout = 0.1
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  layout = train_state.make_layout(cfg, mesh)
  init = jax.device_get(train_state.init_state(cfg, layout))
  batch = train.to_global(synthetic_batch(cfg, 2, seed=0, seq_len=32, slots=1, hw=32, depth=4), mesh)
  step = jax.jit(train.make_train_step(layout, cfg), in_shardings=(layout.shardings, None),
                 out_shardings=(layout.shardings, sharding.replicated(mesh)))

  def run(at_step):
    state = jax.device_put(dict(init, step=np.int32(at_step)), layout.shardings)
    new, m = step(state, batch)
    return float(m["loss"]), jax.device_get(new["params"])

  (l0, p0), (l0b, p0b), (l5, _) = run(0), run(0), run(5)
  assert l0 == l0b
  jax.tree.map(np.testing.assert_array_equal, p0, p0b)
  assert l0 != l5  # another step draws other masks
