"""Optimizer pieces: schedule, weight-decay mask on the real parameter tree, freezing by config, and the
multi-process start-up checks."""
import jax
import numpy as np
import pytest

from configs import common_train
from radfm_jax import distributed
from radfm_jax.training import optim
from radfm_jax import sharding
from radfm_jax.training import loop as train_loop
from radfm_jax.training import step as train
from radfm_jax.training import state as train_state
from train_utils import synthetic_batch, tiny_train_config


def test_schedule_warms_up_linearly_then_decays_to_the_end_ratio():
  cfg = common_train.optim_config()
  cfg.lr, cfg.warmup_steps, cfg.end_lr_ratio = 1e-3, 10, 0.1
  s = optim.schedule(cfg, 110)
  assert float(s(0)) == 0.0
  assert float(s(5)) == pytest.approx(5e-4)
  assert float(s(10)) == pytest.approx(1e-3)
  assert float(s(60)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-4)  # cosine midpoint
  assert float(s(110)) == pytest.approx(1e-4)


def test_weight_decay_mask_skips_norms_biases_embeddings_and_latents():
  layout = train_state.make_layout(tiny_train_config(), sharding.make_mesh({"data": -1}))
  flat = {optim.path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(
      optim.path_mask(layout.abstract["params"], common_train.NO_DECAY))[0]}
  no_decay = {k for k, v in flat.items() if v}
  for path in ("lm/embed_tokens", "image_marker_embed", "vision/pos_row", "resampler/latents",
               "vision/blocks/attn_norm/scale", "vision/patch_norm_in/bias", "lm/final_norm/scale",
               "fc/bias", "vision/blocks/fc1/bias"):
    assert path in no_decay, path
  for path in ("lm/lm_head/kernel", "lm/blocks/q/kernel", "vision/patch_proj/kernel", "fc/kernel",
               "resampler/blocks/ff_in/kernel"):
    assert path in flat and path not in no_decay, path
  # Every kernel decays; nothing else does.
  assert {k for k in flat if k.endswith("kernel")} == set(flat) - no_decay


def test_frozen_language_model_gets_no_update_and_no_optimizer_state():
  cfg = tiny_train_config()
  cfg.optim.freeze = (r"^lm/",)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  layout = train_state.make_layout(cfg, mesh)
  state = train_state.init_state(cfg, layout)
  assert set(state["params"]) == {"vision", "resampler", "fc", "image_marker_embed"}
  assert set(state["frozen"]) == {"lm"}
  assert "lm" not in state["opt_state"][1][0].mu
  assert train_state.trainable_towers(state["params"])["lm"] is False
  before = jax.device_get(state)
  batch = train.to_global(synthetic_batch(cfg, 8), mesh)
  step = train.jit_step(train.make_train_step(layout, cfg), layout, batch)
  for _ in range(2):
    state, m = step(state, batch)
  assert np.isfinite(float(m["loss"]))
  for a, b in zip(jax.tree.leaves(state["frozen"]), jax.tree.leaves(before["frozen"])):
    np.testing.assert_array_equal(np.asarray(a), b)
  moved = [not np.array_equal(np.asarray(a), b) for a, b in
           zip(jax.tree.leaves(state["params"]), jax.tree.leaves(before["params"]))]
  assert all(moved)


def test_freeze_patterns_must_match_something():
  cfg = tiny_train_config()
  cfg.optim.freeze = ("^nothing_like_this/",)
  with pytest.raises(ValueError, match="matches no parameter"):
    train_state.make_layout(cfg, sharding.make_mesh({"data": -1}))


def test_distributed_initialize_checks_its_arguments():
  with pytest.raises(ValueError, match="without --num_processes"):
    distributed.initialize("127.0.0.1:1234", None, None)
  with pytest.raises(ValueError, match="not in"):
    distributed.initialize("127.0.0.1:1234", 2, 5)
  distributed.initialize(mode="off")  # single process: nothing to do
  assert not jax.distributed.is_initialized()
