"""Train checkpoints in a workdir given as a relative path (as `make demo` does: --workdir=runs/demo)."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from radfm_jax.training import checkpoints as checkpoint_manager


def test_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  state = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "step": jnp.asarray(7, jnp.int32)}
  cfg = ml_collections.ConfigDict({"seed": 3})
  ckpts = checkpoint_manager.Checkpoints("runs/demo", async_save=False)
  assert os.path.isabs(str(ckpts.directory))
  ckpts.save(5, state, None, cfg)
  ckpts.close()

  again = checkpoint_manager.Checkpoints("runs/demo", async_save=False)
  assert again.latest_step() == 5 and (tmp_path / "runs/demo/checkpoints/5").is_dir()
  restored, data_ok = again.restore(5, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert int(restored["step"]) == 7 and not data_ok
  assert again.restore_config(5).seed == 3
  again.close()
