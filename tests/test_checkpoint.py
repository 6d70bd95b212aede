"""Self-describing params checkpoints: exact round trip, config + tokenizer recorded, sharded restore
on a (2, 2, 2) mesh, dtype cast on restore, LM-only checkpoints, clear errors."""
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from radfm_jax import checkpoint, sharding
from radfm_jax.models.llama import Llama
from radfm_jax.models.radfm import RadFM


def _flat(module):
  return {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  root = tmp_path_factory.mktemp("ckpt")
  tok = root / "spm.model"
  tok.write_bytes(b"not really a sentencepiece model, but a file with a hash")
  cfg = tiny.get_config()
  if "data" not in cfg:
    cfg.data = ml_collections.ConfigDict()
  cfg.data.tokenizer = str(tok)
  model = RadFM(cfg.model, rngs=nnx.Rngs(0))
  path = checkpoint.save_model(str(root / "ck"), model, cfg, extra={"note": "test"})
  return path, model, cfg, tok


def test_round_trip_exact_and_self_describing(saved):
  path, model, cfg, tok = saved
  meta = json.load(open(os.path.join(path, checkpoint.META_FILE)))
  assert meta["model_class"] == "radfm" and meta["extra"] == {"note": "test"}
  want = _flat(model)
  assert meta["params"]["count"] == sum(int(np.prod(x.shape)) for x in want.values())
  assert meta["tokenizer"]["sha256"] == hashlib.sha256(tok.read_bytes()).hexdigest()
  assert meta["tokenizer"]["source_path"] == str(tok)

  cfg2 = checkpoint.load_config(path)
  assert cfg2.model.to_dict() == cfg.model.to_dict() and cfg2.mesh.to_dict() == cfg.mesh.to_dict()
  assert cfg2.data.tokenizer == os.path.join(path, checkpoint.TOKENIZER_FILE)  # the checkpoint's own copy
  assert open(cfg2.data.tokenizer, "rb").read() == tok.read_bytes()

  model2, cfg3 = checkpoint.load_model(path)
  assert isinstance(model2, RadFM) and cfg3.model.to_dict() == cfg.model.to_dict()
  got = _flat(model2)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


def test_restore_sharded_on_current_mesh(saved):
  path, model, cfg, _ = saved
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  model2, _ = checkpoint.load_model(path, mesh=mesh)
  specs = sharding.partition_specs(nnx.state(checkpoint.abstract_model(cfg, "radfm", mesh), nnx.Param), mesh)
  want = _flat(model)
  for k, x in _flat(model2).items():
    assert x.sharding.mesh == mesh and x.sharding.spec == specs[k], k
    np.testing.assert_array_equal(np.asarray(x), np.asarray(want[k]), err_msg=k)
  q = model2.lm.blocks.q.kernel.get_value()  # [L, E, H, k]: embed over fsdp, heads over tensor
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert {s.data.shape for s in q.addressable_shards} == {(q.shape[0], q.shape[1] // 2, q.shape[2] // 2, q.shape[3])}


def test_restore_casts_dtype(saved):
  path, model, _, _ = saved
  model2, cfg2 = checkpoint.load_model(path, dtype=jnp.bfloat16)
  assert cfg2.model.param_dtype == "bfloat16"
  want = _flat(model)
  for k, x in _flat(model2).items():
    assert x.dtype == jnp.bfloat16, k
    np.testing.assert_array_equal(np.asarray(x), np.asarray(want[k]).astype(jnp.bfloat16), err_msg=k)


def test_lm_only_checkpoint(saved, tmp_path):
  _, model, cfg, _ = saved
  lm = model.lm  # a Llama submodule: saved on its own it is an LM-only checkpoint
  path = checkpoint.save_model(str(tmp_path / "lm"), lm, cfg)
  assert checkpoint.read_meta(path)["model_class"] == "llama"
  loaded, _ = checkpoint.load_model(path)
  assert isinstance(loaded, Llama)
  want = _flat(lm)

  # As a RadFM: LM from the checkpoint, the rest freshly initialised (sharded when a mesh is given).
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  radfm, _ = checkpoint.load_model(path, mesh=mesh, model_class="radfm")
  assert isinstance(radfm, RadFM)
  for k, x in _flat(radfm.lm).items():
    np.testing.assert_array_equal(np.asarray(x), np.asarray(want[k]), err_msg=k)
  assert radfm.lm.blocks.q.kernel.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  pos = np.asarray(radfm.vision.pos_row.get_value())
  assert pos.shape == (cfg.model.vision.pos_rows, cfg.model.vision.dim // 3) and np.isfinite(pos).all() and pos.std() > 0.5

  # restore_params into an existing module keeps its shardings and dtypes.
  before = {k: (x.sharding, x.dtype) for k, x in _flat(radfm).items()}
  checkpoint.restore_params(path, radfm.lm)
  assert {k: (x.sharding, x.dtype) for k, x in _flat(radfm).items()} == before


def test_errors(saved, tmp_path):
  path, model, cfg, _ = saved
  with pytest.raises(FileExistsError, match="exists"):
    checkpoint.save_model(path, model, cfg)
  with pytest.raises(FileNotFoundError, match=checkpoint.META_FILE):
    checkpoint.load_model(str(tmp_path))
  small = cfg.model.copy_and_resolve_references()
  small.lm.mlp = 96
  with pytest.raises(ValueError, match=r"lm/blocks/gate/kernel: checkpoint \(2, 64, 128\) vs model \(2, 64, 96\)"):
    checkpoint.restore_params(path, RadFM(small, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="missing .*unexpected"):
    checkpoint.restore_params(path, Llama(cfg.model, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="cannot load it as 'llama'"):
    checkpoint.load_model(path, model_class="llama")
