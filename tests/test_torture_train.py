"""Hostile configs and faults for training, checkpoints and handed-over files (small and fast, crafted on
the fly): every case ends in one clear error naming the key / step / file, or in a logged fallback, and a
non-finite state is never saved.

  config        schema == the defaults in configs/common_*.py; bad values fail before anything starts
  non-finite    lr overflowing to inf: updates rejected, nothing saved, the final message says so
  train ckpts   flipped bytes / truncated array file / missing metadata / bad data-iterator file in the
                latest checkpoint -> one line, fallback to the previous one (or an error with fallback
                off); other shapes -> the parameter named; a failed save (file too large) -> one line,
                earlier checkpoints intact; NaN state -> refused
  params ckpts  swapped tokenizer, tokenizer path outside the checkpoint, invalid JSON, unknown class
  HF dirs       shard names outside the directory, a bad safetensors header
"""
import glob
import json
import logging
import math
import os
import resource
import signal

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common_data, common_train, demo, medmd_pretrain, radmd_finetune, tiny
from radfm_jax import checkpoint
from radfm_jax.convert import sources
from radfm_jax.training import checkpoints as ckpt_lib
from radfm_jax.training import config as config_lib
from radfm_jax.training import data as train_data
from radfm_jax.training import integrity
from radfm_jax.training import loop as train_loop
from radfm_jax.training import metrics
from radfm_jax.training import step as train_step


# ====================================================================================================
# Config validation.
# ====================================================================================================
def _leaf_keys(cfg, prefix=""):
  out = set()
  for k, v in cfg.items():
    if isinstance(v, ml_collections.ConfigDict) and k != "model":
      out |= _leaf_keys(v, f"{prefix}{k}.")
    else:
      out.add(prefix + k)
  return out


def test_schema_names_exactly_the_keys_of_the_common_defaults():
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict()
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.data = common_data.data_config()
  common_train.add_train_config(c)
  optional = config_lib.OPTIONAL
  assert _leaf_keys(c) == config_lib.schema_keys() - optional
  assert config_lib.problems(c) == []


@pytest.mark.parametrize("make", [tiny.get_config, demo.get_config, lambda: medmd_pretrain.get_config("1b"),
                                  lambda: radmd_finetune.get_config("13b,/data/x")])
def test_every_shipped_training_config_is_valid(make):
  assert config_lib.problems(make()) == []


def test_bad_values_fail_before_anything_heavy_naming_every_key(tmp_path, monkeypatch):
  def heavy(*a, **k):
    raise AssertionError("training started despite an invalid config")

  monkeypatch.setattr(train_data, "TrainData", heavy)
  cfg = tiny.get_config()
  cfg.total_steps, cfg.checkpoint_every, cfg.log_every = 0, 0, 0
  cfg.optim.b2, cfg.optim.lr = 1.0, float("nan")
  cfg.data.workers = -1
  with cfg.unlocked():
    cfg.chekpoint_every = 5
  workdir = tmp_path / "run"
  with pytest.raises(config_lib.ConfigError) as e:
    train_loop.train_and_evaluate(cfg, str(workdir))
  msg = str(e.value)
  for want in ("total_steps=0: expected an integer >= 1", "checkpoint_every=0", "log_every=0",
               "optim.b2=1.0: expected a finite number >= 0 and < 1", "optim.lr=nan: expected a finite",
               "data.workers=-1", "chekpoint_every: unknown key (did you mean checkpoint_every?)"):
    assert want in msg, (want, msg)
  assert msg.startswith("invalid config (7 problems)")
  assert not workdir.exists()


def test_missing_keys_and_batch_split_are_named():
  cfg = tiny.get_config()
  del cfg["nonfinite_limit"]
  assert config_lib.problems(cfg) == ["nonfinite_limit: missing (defaults: configs/common_train.py, "
                                      "configs/common_data.py)"]
  cfg = tiny.get_config()
  cfg.data.batch_size = 6
  (p,) = config_lib.problems(cfg, {"data": 4, "fsdp": 1, "tensor": 1})
  assert p.startswith("data.batch_size=6: must split into microbatches=1")


# ====================================================================================================
# Non-finite state is never saved.
# ====================================================================================================
def test_overflowing_lr_never_saves_nonfinite_params(tmp_path):
  """lr=1e39 passes validation (a finite float) but is inf in float32: every update is non-finite, so
  every step keeps the old state, none is counted as fine, nothing is saved, and the error says so."""
  cfg = tiny.get_config()
  cfg.total_steps, cfg.checkpoint_every, cfg.log_every, cfg.nonfinite_limit = 6, 1, 1, 3
  cfg.optim.lr, cfg.optim.warmup_steps = 1e39, 0
  cfg.data.eval_split = ""
  with pytest.raises(train_step.NonFiniteError, match=r"3 consecutive steps .* non-finite update .* "
                     r"nothing non-finite was saved; no checkpoint was saved"):
    train_loop.train_and_evaluate(cfg, str(tmp_path))
  assert ckpt_lib.Checkpoints(str(tmp_path)).all_steps() == []
  rows = [r for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl")) if "loss" in r]
  assert [(r["nonfinite"], r["nonfinite_update"]) for r in rows] == [(1, 1), (1, 1)]
  assert all(math.isfinite(r["param_norm"]) for r in rows)


def test_save_refuses_a_nonfinite_state(tmp_path):
  ck = ckpt_lib.Checkpoints(str(tmp_path), async_save=False)
  state = {"w": jnp.array([1.0, jnp.nan]), "step": jnp.asarray(1, jnp.int32)}
  with pytest.raises(ckpt_lib.NonFiniteState, match=r"step 3: refusing .* \['w'\]"):
    ck.save(3, state, None, ml_collections.ConfigDict({"seed": 0}))
  ck.close()
  assert ck.all_steps() == []


# ====================================================================================================
# Train checkpoints: integrity and fallback.
# ====================================================================================================
def _state(k: float):
  w = np.random.default_rng(int(k)).standard_normal((100, 300)).astype(np.float32)  # incompressible
  return {"params": {"w": jnp.asarray(w),
                     "b": jnp.full((7,), k, jnp.bfloat16)},
          "step": jnp.asarray(int(k), jnp.int32)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _data_iter():
  return iter(grain.MapDataset.range(100).to_iter_dataset())


@pytest.fixture
def two_ckpts(tmp_path):
  """Checkpoints 1 and 2 (state + data iterator + config + fingerprints) in a workdir."""
  ck = ckpt_lib.Checkpoints(str(tmp_path), async_save=False)
  it = _data_iter()
  for step in (1, 2):
    next(it)
    ck.save(step, _state(step), it, ml_collections.ConfigDict({"seed": step}))
  ck.close()
  return tmp_path


def _biggest_array_file(workdir, step):
  files = [f for f in glob.glob(f"{workdir}/checkpoints/{step}/state/**", recursive=True) if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def _flip(workdir, step):
  path = _biggest_array_file(workdir, step)
  b = bytearray(open(path, "rb").read())
  b[len(b) // 2] ^= 0x04
  open(path, "wb").write(b)


def _truncate(workdir, step):
  path = _biggest_array_file(workdir, step)
  os.truncate(path, os.path.getsize(path) // 2)


def _drop_metadata(workdir, step):
  os.remove(f"{workdir}/checkpoints/{step}/state/_METADATA")


def _bad_data_state(workdir, step):
  (path,) = glob.glob(f"{workdir}/checkpoints/{step}/data/process_0-of-1.json")
  open(path, "w").write("{not json")


DAMAGE = {"flipped bytes": (_flip, "array(s) differ from their recorded fingerprints, e.g. ['params/w']"),
          "truncated file": (_truncate, "Encountered error while reading array index"),
          "missing metadata": (_drop_metadata, "no state metadata"),
          "bad data-iterator state": (_bad_data_state, "bad data-iterator state")}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_with_one_line(two_ckpts, damage, caplog):
  fn, reason = DAMAGE[damage]
  fn(two_ckpts, 2)
  ck = ckpt_lib.Checkpoints(str(two_ckpts))
  it = _data_iter()
  with caplog.at_level(logging.WARNING):
    step, state, data_ok = ck.restore_latest(_abstract(_state(0)), it)
  ck.close()
  assert step == 1 and data_ok and next(it) == 1  # the iterator continues where checkpoint 1 left it
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.asarray(_state(1)["params"]["w"]))
  errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
  assert len(errors) == 1 and "\n" not in errors[0], errors
  assert errors[0].startswith("checkpoint 2 (") and reason in errors[0], errors[0]
  assert errors[0].endswith("; falling back to checkpoint 1")
  if damage == "bad data-iterator state":
    assert "process_0-of-1.json" in errors[0]
  assert os.path.isdir(two_ckpts / "checkpoints" / "2.damaged")  # kept for inspection, out of the way
  assert ckpt_lib.Checkpoints(str(two_ckpts)).all_steps() == [1]


def test_fallback_off_fails_naming_the_checkpoint(two_ckpts):
  _flip(two_ckpts, 2)
  ck = ckpt_lib.Checkpoints(str(two_ckpts))
  with pytest.raises(ckpt_lib.CheckpointError, match=r"checkpoint 2 .* is damaged: 1 array\(s\) differ.*"
                     r"checkpoint_fallback is off \(set it to true to resume from checkpoint 1\)"):
    ck.restore_latest(_abstract(_state(0)), fallback=False)
  ck.close()
  assert sorted(ckpt_lib.Checkpoints(str(two_ckpts)).all_steps()) == [1, 2]  # nothing moved


def test_no_intact_checkpoint_left(two_ckpts):
  _flip(two_ckpts, 2)
  _truncate(two_ckpts, 1)
  ck = ckpt_lib.Checkpoints(str(two_ckpts))
  with pytest.raises(ckpt_lib.CheckpointError, match=r"no intact checkpoint in .*: \[2, 1\] are damaged"):
    ck.restore_latest(_abstract(_state(0)))


def test_resume_with_other_shapes_names_the_parameter(two_ckpts):
  want = _abstract(_state(0))
  want["params"]["w"] = jax.ShapeDtypeStruct((100, 64), jnp.float32)
  ck = ckpt_lib.Checkpoints(str(two_ckpts))
  with pytest.raises(ckpt_lib.IncompatibleCheckpoint,
                     match=r"checkpoint 2 .*: params/w has shape \(100, 300\) in the checkpoint and \(100, 64\)"):
    ck.restore_latest(want)
  want = _abstract(_state(0))
  want["params"]["extra"] = jax.ShapeDtypeStruct((3,), jnp.float32)
  with pytest.raises(ckpt_lib.IncompatibleCheckpoint, match=r"arrays missing \['params/extra'\]"):
    ck.restore_latest(want)
  ck.close()


def test_failed_save_is_one_line_and_earlier_checkpoints_stay(tmp_path):
  """A save that cannot write its files (here: a file-size limit, as a full disk would) -> CheckpointError
  in one line at close; checkpoint 1 restores intact."""
  ck = ckpt_lib.Checkpoints(str(tmp_path), async_save=True)
  small = {"w": jnp.ones((8,), jnp.float32)}
  ck.save(1, small, None, ml_collections.ConfigDict({"seed": 0}))
  ck.wait()
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))
  try:
    ck.save(2, {"w": jnp.asarray(np.random.default_rng(0).random(1 << 18, np.float32))}, None,
            ml_collections.ConfigDict({"seed": 0}))
    with pytest.raises(ckpt_lib.CheckpointError) as e:
      ck.close()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("saving checkpoint(s) [2] to ") and "intact checkpoints: [1]" in msg
  assert "failed (File too large [errno 27])" in msg, msg
  again = ckpt_lib.Checkpoints(str(tmp_path))
  step, state, _ = again.restore_latest(_abstract(small))
  assert step == 1 and np.asarray(state["w"]).tolist() == [1.0] * 8
  again.close()


def test_fingerprints_do_not_depend_on_the_sharding():
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  x = np.random.default_rng(0).standard_normal((64, 24)).astype(np.float32)
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")))
  a = integrity.summary({"x": sharded, "i": jnp.arange(5), "h": jnp.ones(3, jnp.bfloat16)})
  b = integrity.summary({"x": jnp.asarray(x), "i": jnp.arange(5), "h": jnp.ones(3, jnp.bfloat16)})
  assert a == b
  y = x.copy()
  y.view(np.uint32)[3, 5] ^= 1 << 31  # one flipped bit (the sign)
  assert integrity.summary({"x": jnp.asarray(y)})["x"][0] != b["x"][0]


# ====================================================================================================
# Params checkpoints a user was handed.
# ====================================================================================================
@pytest.fixture
def params_ckpt(tmp_path):
  tok = tmp_path / "spm.model"
  tok.write_bytes(b"a tokenizer with a hash")
  cfg = ml_collections.ConfigDict(dict(model=dict(vocab_size=8, lm=dict(hidden=4)),
                                       data=dict(tokenizer=str(tok))))
  path = checkpoint.save_model(str(tmp_path / "ck"), {"lm": {"w": np.ones((2, 2), np.float32)}}, cfg)
  return path


def _edit_meta(path, fn):
  meta_path = os.path.join(path, checkpoint.META_FILE)
  meta = json.load(open(meta_path))
  fn(meta)
  json.dump(meta, open(meta_path, "w"))


def test_params_checkpoint_tokenizer_is_checked(params_ckpt):
  assert checkpoint.load_config(params_ckpt).data.tokenizer == os.path.join(params_ckpt, "tokenizer.model")
  with open(os.path.join(params_ckpt, "tokenizer.model"), "wb") as fh:
    fh.write(b"another tokenizer")  # swapped
  with pytest.raises(ValueError, match=r"tokenizer.model: sha256 .* does not match .* replaced or damaged"):
    checkpoint.load_config(params_ckpt)


@pytest.mark.parametrize("name", ["../../etc/hostname", "/etc/hostname", "."])
def test_params_checkpoint_tokenizer_must_stay_inside(params_ckpt, name):
  def edit(meta):
    meta["tokenizer"]["file"] = name
  _edit_meta(params_ckpt, edit)
  with pytest.raises(ValueError, match=r"tokenizer file .* is outside the checkpoint directory"):
    checkpoint.load_config(params_ckpt)


def test_params_checkpoint_bad_json_and_unknown_class_name_the_checkpoint(params_ckpt):
  meta_path = os.path.join(params_ckpt, checkpoint.META_FILE)
  _edit_meta(params_ckpt, lambda m: m.update(model_class="gpt5"))
  with pytest.raises(ValueError, match=rf"{meta_path}: unknown model_class 'gpt5' \(known: \['llama', 'radfm'\]\)"):
    checkpoint.load_model(params_ckpt)
  with open(meta_path, "w") as fh:
    fh.write('{"format": "radfm_jax.params/1", ')
  with pytest.raises(ValueError, match=rf"{meta_path}: not valid JSON"):
    checkpoint.load_config(params_ckpt)


# ====================================================================================================
# Hugging Face directories.
# ====================================================================================================
def test_hf_index_shards_must_stay_inside(tmp_path):
  hf = tmp_path / "hf"
  hf.mkdir()
  (tmp_path / "outside.safetensors").write_bytes(b"x")
  (hf / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"a": "model-1.safetensors", "b": "../outside.safetensors"}}))
  (hf / "model-1.safetensors").write_bytes(b"x")
  with pytest.raises(ValueError, match=r"shard '../outside.safetensors' is outside"):
    sources.open_source(str(hf))
  (hf / "model.safetensors.index.json").write_text("{oops")
  with pytest.raises(ValueError, match=r"model.safetensors.index.json: expected JSON with a `weight_map`"):
    sources.open_source(str(hf))


def test_safetensors_header_errors_name_the_file(tmp_path):
  bad = tmp_path / "model.safetensors"
  bad.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")  # header length far beyond the file
  with pytest.raises(ValueError, match=rf"{bad}: not a readable safetensors file"):
    sources.open_source(str(bad))
