"""radfm_jax.train end to end, in process, on the tiny config and the demo store (8 fake CPU devices):
determinism, restore onto another mesh, the non-finite guard stopping a run, and params-only export."""
import math

import jax
import numpy as np
import pytest

from configs import tiny
from radfm_jax import checkpoint
from radfm_jax.training import checkpoints as checkpoint_manager
from radfm_jax.training import export as export_lib
from radfm_jax.training import metrics
from radfm_jax import sharding
from radfm_jax.training import loop as train_loop
from radfm_jax.training import step as train
from radfm_jax.training import state as train_state


def _cfg(**overrides):
  c = tiny.get_config()
  c.total_steps, c.checkpoint_every, c.log_every = 4, 2, 1
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 8, 1, 1
  for k, v in overrides.items():
    c[k] = v
  return c


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  out = []
  for name in ("a", "b"):
    workdir = tmp_path_factory.mktemp(f"run_{name}")
    summary = train_loop.train_and_evaluate(_cfg(), str(workdir))
    out.append((workdir, summary))
  return out


def test_two_runs_are_identical(two_runs):
  (wa, sa), (wb, sb) = two_runs
  ra = [r for r in metrics.read_jsonl(str(wa / "metrics.jsonl")) if "loss" in r]
  rb = [r for r in metrics.read_jsonl(str(wb / "metrics.jsonl")) if "loss" in r]
  losses_a, losses_b = [r["loss"] for r in ra], [r["loss"] for r in rb]
  assert len(losses_a) == 4 and losses_a == losses_b
  assert all(math.isfinite(x) for x in losses_a) and losses_a[-1] < losses_a[0]
  # Validation at the end, identical too; closed questions exist in the demo val split.
  assert sa["eval"] == sb["eval"] and sa["eval"]["closed_count"] > 0
  for a, b in zip(jax.tree.leaves(sa["state"]["params"]), jax.tree.leaves(sb["state"]["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Every logged step carries the throughput and MFU figures; the first one the compile time.
  assert "compile_time" in ra[0]
  for key in ("grad_norm", "param_norm", "learning_rate", "step_time", "text_tokens_per_s", "images_per_s",
              "input_wait", "model_tflops_per_s", "mfu"):
    assert key in ra[-1], key
  assert 0 < ra[-1]["mfu"] < 1
  assert sorted(checkpoint_manager.Checkpoints(str(wa)).all_steps()) == [2, 4]


def test_restore_on_another_mesh_gives_identical_params(two_runs):
  """Saved on (8,1,1), restored against the (2,2,2) mesh's abstract state: same values, new layout."""
  (workdir, summary), _ = two_runs
  cfg = _cfg()
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  layout = train_state.make_layout(cfg, mesh)
  ckpts = checkpoint_manager.Checkpoints(str(workdir))
  state, _ = ckpts.restore(4, layout.abstract)
  ckpts.close()
  q = state["params"]["lm"]["blocks"]["q"]["kernel"]
  assert q.sharding.spec == sharding.P(None, "fsdp", "tensor", None)
  saved = summary["state"]
  assert int(state["step"]) == 4
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_writes_a_loadable_params_checkpoint(two_runs, tmp_path):
  (workdir, summary), _ = two_runs
  dst = export_lib.export(str(workdir), str(tmp_path / "export"))
  model, cfg = checkpoint.load_model(dst)
  assert cfg.model.vocab_size == tiny.get_config().model.vocab_size
  from flax import nnx
  loaded = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  want = train_state.merge_params(summary["state"]["params"], summary["state"]["frozen"])
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_from_a_params_checkpoint(two_runs, tmp_path):
  """Stage-2 style start: `init_from` an exported params checkpoint (here with the LM frozen)."""
  (workdir, summary), _ = two_runs
  dst = export_lib.export(str(workdir), str(tmp_path / "export"))
  cfg = _cfg(init_from=dst)
  cfg.optim.freeze = (r"^lm/",)
  layout = train_state.make_layout(cfg, sharding.make_mesh(cfg.mesh))
  state = train_state.init_state(cfg, layout)
  got = train_state.merge_params(state["params"], state["frozen"])
  want = train_state.merge_params(summary["state"]["params"], summary["state"]["frozen"])
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert set(state["frozen"]) == {"lm"} and int(state["step"]) == 0


def test_nonfinite_streak_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  """Batches from step 5 on carry NaN images: steps 5..7 are skipped, the third in a row stops the run
  with a clear error; checkpoint 4 (good) stays the latest and nothing is saved during the streak."""
  original, calls = train.to_global, []

  def poisoned(host_batch, mesh):
    calls.append(1)
    if len(calls) >= 5:
      host_batch = dict(host_batch, images=np.full_like(host_batch["images"], np.nan))
    return original(host_batch, mesh)

  monkeypatch.setattr(train, "to_global", poisoned)
  cfg = _cfg(total_steps=10, checkpoint_every=4, nonfinite_limit=3)
  cfg.data.eval_split = ""
  with pytest.raises(train.NonFiniteError, match=r"3 consecutive steps .* last good checkpoint is step 4"):
    train_loop.train_and_evaluate(cfg, str(tmp_path))
  ckpts = checkpoint_manager.Checkpoints(str(tmp_path))
  assert ckpts.all_steps() == [4]
  layout = train_state.make_layout(cfg, sharding.make_mesh(cfg.mesh))
  state, _ = ckpts.restore(4, layout.abstract)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
  records = [r for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl")) if "loss" in r]
  assert [r["nonfinite"] for r in records] == [0, 0, 0, 0, 1, 1]
