"""The jitted update step on 8 fake CPU devices: sharded training on a (2,2,2) mesh, gradient accumulation,
the non-finite guard, and the analytic FLOP count against XLA's cost analysis."""
import jax
import numpy as np
import pytest

from radfm_jax.training import metrics
from radfm_jax import sharding
from radfm_jax.training import loop as train_loop
from radfm_jax.training import step as train
from radfm_jax.training import state as train_state
from train_utils import synthetic_batch, tiny_train_config

BATCH = 16


def _setup(cfg, mesh_shape, init=None):
  """Mesh, layout and initial state (`init`: a host copy of an initial state to place on this mesh)."""
  mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
  layout = train_state.make_layout(cfg, mesh)
  if init is None:
    return mesh, layout, train_state.init_state(cfg, layout)
  return mesh, layout, jax.device_put(init, layout.shardings)


def _run(cfg, mesh, layout, state, batches):
  step = None
  losses = []
  for hb in batches:
    batch = train.to_global(hb, mesh)
    step = step or train.jit_step(train.make_train_step(layout, cfg), layout, batch)
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  return state, losses, step


@pytest.fixture(scope="module")
def cfg():
  return tiny_train_config()


@pytest.fixture(scope="module")
def batches(cfg):
  return [synthetic_batch(cfg, BATCH, seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def init():
  """(2,2,2) mesh, layout, and a host copy of the initial state."""
  mesh, layout, state = _setup(tiny_train_config(), (2, 2, 2))
  return mesh, layout, state, jax.device_get(state)


@pytest.fixture(scope="module")
def run222(cfg, batches, init):
  mesh, layout, state, _ = init
  state, losses, step = _run(cfg, mesh, layout, state, batches)
  return mesh, layout, state, losses, step


def test_sharded_training_on_222_mesh(cfg, batches, run222):
  mesh, layout, state, losses, _ = run222
  # Parameters and Adam moments live in the layout of the sharding rules (fsdp x tensor split).
  q = state["params"]["lm"]["blocks"]["q"]["kernel"]
  assert q.sharding.spec == sharding.P(None, "fsdp", "tensor", None)
  assert len({d for s in q.addressable_shards for d in [s.device]}) == 8
  assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 2, q.shape[3])
  mu = state["opt_state"][1][0].mu["lm"]["blocks"]["q"]["kernel"]
  assert mu.sharding.spec == q.sharding.spec
  assert int(state["step"]) == 3 and losses[2] < losses[0] - 0.1
  assert all(np.isfinite(losses))


def test_gradient_accumulation_equals_one_large_batch(batches, init, run222):
  """4 microbatches of 4 (lax.scan) on a (4,1,2) mesh == one batch of 16 on the (2,2,2) mesh, after 3
  optimizer steps from the same initial params (so this also checks that the mesh does not change the
  numbers). Tolerance: float32 sums in another order; losses 1e-5 relative, params 1e-5 absolute
  (AdamW normalises by sqrt(nu), so tiny gradient differences stay tiny)."""
  _, _, state1, losses1, _ = run222
  cfg4 = tiny_train_config(microbatches=4)
  mesh, layout, state4 = _setup(cfg4, (4, 1, 2), init=init[3])
  state4, losses4, _ = _run(cfg4, mesh, layout, state4, batches)
  np.testing.assert_allclose(losses4, losses1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state4["params"]), jax.tree.leaves(state1["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  for a, b in zip(jax.tree.leaves(state4["opt_state"]), jax.tree.leaves(state1["opt_state"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_nonfinite_step_is_skipped_and_counted(cfg, batches, run222):
  mesh, layout, state, _, step = run222
  before = jax.tree.map(np.asarray, state)
  bad = dict(batches[0], images=np.full_like(batches[0]["images"], np.nan))
  for i in range(2):
    state, m = step(state, train.to_global(bad, mesh))
    assert not np.isfinite(float(m["loss"])) and int(m["nonfinite"]) == 1
    assert int(m["nonfinite_consecutive"]) == i + 1
  # Params and optimizer state untouched; the step counter still advances.
  for a, b in zip(jax.tree.leaves(state["params"]) + jax.tree.leaves(state["opt_state"]),
                  jax.tree.leaves(before["params"]) + jax.tree.leaves(before["opt_state"])):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert int(state["step"]) == int(before["step"]) + 2
  state, m = step(state, train.to_global(batches[0], mesh))
  assert np.isfinite(float(m["loss"])) and int(m["nonfinite_consecutive"]) == 0
  assert int(m["nonfinite_total"]) == 2


def test_flops_match_xla_cost_analysis():
  """Analytic FLOPs of one training step (no remat, layers unrolled so XLA counts every layer) are
  within 10% of XLA's count; the analytic count has no norms/softmax/optimizer, XLA's does.
  Decoder attention is counted in full here, as XLA computes it (MFU uses the causal half)."""
  cfg = tiny_train_config()
  cfg.model.scan_layers = False
  mesh, layout = None, None
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  layout = train_state.make_layout(cfg, mesh)
  hb = synthetic_batch(cfg, 4, seq_len=128, hw=64, depth=16, slots=2)
  batch = train.to_global(hb, mesh)
  compiled = train.jit_step(train.make_train_step(layout, cfg), layout, batch).lower(
      layout.abstract, batch).compile()
  cost = compiled.cost_analysis()
  xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
  towers = train_state.trainable_towers(layout.abstract["params"])
  ours = metrics.train_flops(cfg.model, batch=4, seq_len=128, image_shape=(2, 64, 64, 16),
                             trainable=towers, causal_halved=False)
  assert abs(ours - xla) / xla < 0.10, (ours, xla)
  # Freezing the LM counts its matmuls once instead of three times.
  frozen = metrics.train_flops(cfg.model, batch=4, seq_len=128, image_shape=(2, 64, 64, 16),
                               trainable=dict(towers, lm=False), causal_halved=False)
  fwd = metrics.forward_flops(cfg.model, batch=4, seq_len=128, image_shape=(2, 64, 64, 16),
                              causal_halved=False)
  assert frozen == pytest.approx(ours - 2 * fwd["lm"])
