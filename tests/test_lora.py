"""LoRA (radfm_jax.models.lora): adapters on scanned layers, sharded init, the frozen base in bf16 with
optimizer state for adapters only, exact resume, merge equivalence (logits and greedy generation),
adapters-only export loaded on top of the base (library and CLI), dropout keys."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from radfm_jax import checkpoint, sharding
from radfm_jax.inference import decoding
from radfm_jax.models import lora, radfm
from radfm_jax.training import checkpoints as checkpoint_manager
from radfm_jax.training import export as export_lib
from radfm_jax.training import metrics
from radfm_jax.training import state as train_state
from radfm_jax.training import step as train_step
from train_utils import synthetic_batch


def _cfg(rank=4, **lora_overrides):
  c = tiny.get_config()
  c.total_steps, c.checkpoint_every = 6, 3
  c.mesh = ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2))
  c.optim.lr, c.optim.warmup_steps = 3e-2, 1
  c.lora.rank = rank
  for k, v in lora_overrides.items():
    c.lora[k] = v
  return c


def _flat(tree):
  return checkpoint.nested_to_flat(tree)


def _randomize_b(model, seed=0):
  """Non-zero B factors (a fresh adapter has B = 0 and changes nothing)."""
  for i, ad in enumerate(lora.adapters(model)):
    ad.b.set_value(0.3 * jax.random.normal(jax.random.key(seed + i), ad.b.shape, ad.b.dtype))


def test_adapters_on_scanned_layers_and_towers():
  c = _cfg(targets=lora.LM_TARGETS + (r"^vision/blocks/(q|fc1)/kernel$", r"^fc/kernel$"))
  model = lora.wrap(radfm.RadFM, c)(c.model, rngs=nnx.Rngs(0))
  flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
  lm, L, r = c.model.lm, c.model.lm.layers, 4
  want = {  # path: (shape, logical axes) -- the leading "layers" axis of the scanned blocks
      "lm/blocks/q/lora/a": ((L, lm.hidden, r), ("layers", "embed", None)),
      "lm/blocks/q/lora/b": ((L, r, lm.heads, lm.head_dim), ("layers", None, "heads", "head_dim")),
      "lm/blocks/k/lora/b": ((L, r, lm.kv_heads, lm.head_dim), ("layers", None, "kv_heads", "head_dim")),
      "lm/blocks/o/lora/a": ((L, lm.heads, lm.head_dim, r), ("layers", "heads", "head_dim", None)),
      "lm/blocks/down/lora/a": ((L, lm.mlp, r), ("layers", "mlp", None)),
      "lm/blocks/down/lora/b": ((L, r, lm.hidden), ("layers", None, "embed")),
      "vision/blocks/fc1/lora/a": ((c.model.vision.depth, c.model.vision.dim, r), ("layers", "embed", None)),
      "fc/lora/a": ((c.model.vision.dim, r), ("vis_embed", None)),
      "fc/lora/b": ((r, lm.hidden), (None, "embed")),
  }
  for p, (shape, axes) in want.items():
    assert flat[p].shape == shape and flat[p].get_metadata()["out_sharding"] == axes, p
  assert len(flat) == 2 * (7 + 2 + 1)  # 7 LM projections, vision q + fc1, fc
  assert all(isinstance(v, nnx.LoRAParam) for v in flat.values())
  # B = 0: the adapted model computes exactly what the base (same seed: same base params) computes.
  base = radfm.RadFM(c.model, rngs=nnx.Rngs(0))
  b = synthetic_batch(c, 2, seq_len=32, slots=1)
  args = (jnp.asarray(b["inputs"]), jnp.asarray(b["images"]), jnp.asarray(b["image_mask"]))
  np.testing.assert_array_equal(np.asarray(model(*args)), np.asarray(base(*args)))
  _randomize_b(model)
  assert np.abs(np.asarray(model(*args)) - np.asarray(base(*args))).max() > 1e-3
  with pytest.raises(ValueError, match="match no Dense kernel"):
    lora.wrap(radfm.RadFM, _cfg(targets=("^lm/embed_tokens$",)))(c.model, rngs=nnx.Rngs(0))


def test_sharded_layout_frozen_bf16_and_adapter_only_optimizer():
  c = _cfg(base_dtype="bfloat16", train=("^fc/",))
  mesh = sharding.make_mesh(c.mesh)
  layout = train_state.make_layout(c, mesh)
  state = train_state.init_state(c, layout)
  train, frozen = _flat(state["params"]), _flat(state["frozen"])
  assert sorted(train) == sorted([f"lm/blocks/{n}/lora/{ab}" for n in ("q", "k", "v", "o", "gate", "up", "down")
                                  for ab in "ab"] + ["fc/kernel", "fc/bias"])
  assert "lm/blocks/q/kernel" in frozen and not any(lora.is_adapter(p) for p in frozen)
  assert {str(v.dtype) for v in frozen.values()} == {"bfloat16"}
  assert {str(v.dtype) for v in train.values()} == {"float32"}
  # Adapter factors sharded like their base weight's input / output axes; the rank axis replicated.
  P = sharding.P
  assert train["lm/blocks/q/lora/a"].sharding.spec == P(None, "fsdp", None)
  assert train["lm/blocks/q/lora/b"].sharding.spec == P(None, None, "tensor", None)
  assert train["lm/blocks/o/lora/a"].sharding.spec == P(None, "tensor", None, None)
  assert train["lm/blocks/down/lora/b"].sharding.spec == P(None, None, "fsdp")
  assert frozen["lm/blocks/q/kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
  # Adam moments exist for the trainable leaves only, with their shardings.
  opt_leaves = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim]
  assert sum(x.size for x in opt_leaves) == 2 * metrics.count_params(state["params"])
  n_train, n_all = metrics.count_params(state["params"]), metrics.count_params(frozen) + metrics.count_params(train)
  assert n_train / n_all < 0.05
  # The abstract state (restore target) agrees with the real one, dtypes included.
  for a, x in zip(jax.tree.leaves(layout.abstract), jax.tree.leaves(state)):
    assert a.shape == x.shape and a.dtype == x.dtype and a.sharding == x.sharding


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """A LoRA run from a saved base (init_from): 6 steps straight, and 3 + resume + 3 in another workdir."""
  c = _cfg(dropout=0.1, base_dtype="bfloat16")
  mesh = sharding.make_mesh(c.mesh)
  base_dir = str(tmp_path_factory.mktemp("base") / "base")
  base = radfm.RadFM(c.model, rngs=nnx.Rngs(7))
  base_cfg = ml_collections.ConfigDict(c.to_dict())
  base_cfg.lora.rank = 0
  checkpoint.save_model(base_dir, base, base_cfg)
  c.init_from = base_dir
  layout = train_state.make_layout(c, mesh)
  batches = [synthetic_batch(c, 8, seed=s, seq_len=40, slots=1) for s in range(c.total_steps)]
  init_a, init_b = train_state.init_state(c, layout), train_state.init_state(c, layout)  # no mesh context
  with jax.set_mesh(mesh):
    step = train_step.jit_step(train_step.make_train_step(layout, c), layout,
                               train_step.to_global(batches[0], mesh))

    def run(state, lo, hi):
      losses = []
      for i in range(lo, hi):
        state, m = step(state, train_step.to_global(batches[i], mesh))
        losses.append(float(m["loss"]))
      return state, losses

    straight, losses = run(init_a, 0, 6)
    wd = str(tmp_path_factory.mktemp("resume"))
    ckpts = checkpoint_manager.Checkpoints(wd, async_save=False)
    first, l1 = run(init_b, 0, 3)
    ckpts.save(3, first, None, c)
    ckpts.wait()
    restored, _ = ckpts.restore(3, layout.abstract)
    resumed, l2 = run(restored, 3, 6)
    ckpts.save(6, resumed, None, c)
    ckpts.close()
  return dict(cfg=c, mesh=mesh, base_dir=base_dir, base=base, straight=straight, resumed=resumed,
              losses=losses, resumed_losses=l1 + l2, workdir=wd)


def test_lora_trains_from_the_base_and_resumes_exactly(lora_run):
  r = lora_run
  assert r["losses"] == r["resumed_losses"]
  assert r["losses"][-1] < r["losses"][0]
  for a, b in zip(jax.tree.leaves(r["straight"]), jax.tree.leaves(r["resumed"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The frozen base is the saved base (in bf16), untouched by training; the adapters moved.
  frozen = _flat(r["straight"]["frozen"])
  want = _flat(checkpoint.param_dict(r["base"]))
  np.testing.assert_array_equal(np.asarray(frozen["lm/blocks/q/kernel"]),
                                np.asarray(want["lm/blocks/q/kernel"].astype(jnp.bfloat16)))
  assert float(jnp.abs(_flat(r["straight"]["params"])["lm/blocks/q/lora/b"]).max()) > 0


def _logits(layout, params, frozen, batch, key=None):
  """The train step's forward (training.step._hidden) with the LM head applied: logits [B, T, V]."""
  model = layout.model(params, frozen)
  if key is not None:
    lora.set_dropout_keys(model, jax.random.fold_in(key, 1))
  with sharding.activation_mesh(layout.mesh):
    return model(batch["inputs"], batch.get("images"), batch.get("image_mask"),
                 positions=batch.get("positions"), segment_ids=batch.get("segment_ids"), dropout_key=key)


def test_dropout_only_with_keys_and_remat_gives_the_same_gradients():
  c = _cfg(dropout=0.5)
  mesh = sharding.make_mesh(c.mesh)
  b = synthetic_batch(c, 8, seq_len=32, slots=1)
  outs = {}
  for remat in ("none", "full"):
    c.model.remat = remat
    layout = train_state.make_layout(c, mesh)
    st = train_state.init_state(c, layout)
    st["params"] = jax.tree.map(lambda x: x + 0.05, st["params"])  # B != 0 so dropout shows
    with jax.set_mesh(mesh):
      batch = train_step.to_global(b, mesh)
      f = jax.jit(lambda p, k: _logits(layout, p, st["frozen"], batch, k))
      g = jax.jit(jax.grad(lambda p, k: f(p, k).astype(jnp.float32).mean()))
      k1, k2 = jax.random.key(1), jax.random.key(2)
      outs[remat] = jax.tree.map(np.asarray, g(st["params"], k1))
      if remat == "none":
        plain = jax.jit(lambda p: _logits(layout, p, st["frozen"], batch))
        assert np.array_equal(np.asarray(plain(st["params"])), np.asarray(plain(st["params"])))
        assert not np.allclose(np.asarray(f(st["params"], k1)), np.asarray(f(st["params"], k2)))
        np.testing.assert_array_equal(np.asarray(f(st["params"], k1)), np.asarray(f(st["params"], k1)))
  for a, b_ in zip(jax.tree.leaves(outs["none"]), jax.tree.leaves(outs["full"])):
    np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-6)  # same masks; float summation order only


def test_merge_and_adapters_only_exports(lora_run, tmp_path):
  """Merged params give the unmerged model's logits (fp32: max abs diff < 1e-5) and the same greedy
  tokens; the adapters-only export is small and loads on top of the base."""
  r = lora_run
  mesh = r["mesh"]
  out = {m: export_lib.export(r["workdir"], str(tmp_path / m), mode=m) for m in export_lib.MODES}
  full, cfg_full = checkpoint.load_model(out["full"], mesh)
  merged, cfg_m = checkpoint.load_model(out["merge_lora"], mesh)
  on_base, _ = checkpoint.load_model(r["base_dir"], mesh, adapters=out["adapters_only"])
  assert lora.section(cfg_full) is not None and lora.section(cfg_m) is None
  assert not lora.adapters(merged) and len(lora.adapters(full)) == 7
  assert not any(lora.is_adapter(p) for p in checkpoint.param_metadata(out["merge_lora"]))
  saved = checkpoint.param_metadata(out["adapters_only"])
  assert saved and all(lora.is_adapter(p) for p in saved)
  n_ad = sum(int(np.prod(m.shape)) for m in saved.values())
  n_all = sum(int(np.prod(m.shape)) for m in checkpoint.param_metadata(out["full"]).values())
  assert n_ad < 0.05 * n_all
  with pytest.raises(ValueError, match="adapters only"):
    checkpoint.load_model(out["adapters_only"], mesh)
  # lora.init_adapters starts a new run from them (on the same base).
  c2 = ml_collections.ConfigDict(r["cfg"].to_dict())
  c2.lora.init_adapters = out["adapters_only"]
  again = train_state.init_state(c2, train_state.make_layout(c2, mesh))
  for a, b_ in zip(jax.tree.leaves(again["params"]), jax.tree.leaves(r["straight"]["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b_))

  b = synthetic_batch(r["cfg"], 8, seed=11, seq_len=40, slots=1)
  args = (jnp.asarray(b["inputs"]), jnp.asarray(b["images"]), jnp.asarray(b["image_mask"]))
  with jax.set_mesh(mesh):
    lf, lm_, lb = (np.asarray(m(*args)) for m in (full, merged, on_base))
  # On the fp32 base the adapters see the base unrounded (they trained against its bf16 copy).
  np.testing.assert_allclose(lb, lf, atol=1e-2)
  err = np.abs(lf - lm_).max()
  print(f"merge: max |logits unmerged - merged| = {err:.3g} (logit scale {np.abs(lf).max():.3g})")
  assert err < 1e-5
  prompt = np.asarray([[1, 17, 42, 5, 9, 33, 7, 8]] * 8, np.int32)
  mask = np.ones_like(prompt, bool)
  with jax.set_mesh(mesh):
    g_full = np.asarray(decoding.generate(full, prompt, mask, max_new_tokens=12, eos_id=-1))
    g_merged = np.asarray(decoding.generate(merged, prompt, mask, max_new_tokens=12, eos_id=-1))
  np.testing.assert_array_equal(g_full, g_merged)


def test_cli_export_adapters_only_then_generate_on_the_base(lora_run, tmp_path):
  """`python -m radfm_jax.export --adapters_only` + `python -m radfm_jax.generate --checkpoint=BASE
  --adapters=DIR` give the greedy tokens of the full LoRA export loaded in process."""
  r = lora_run
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  dst = str(tmp_path / "adapters")
  res = subprocess.run([sys.executable, "-m", "radfm_jax.export", f"--workdir={r['workdir']}", f"--dst={dst}",
                        "--adapters_only"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  ids = [1, 17, 42, 5, 9, 33]
  res = subprocess.run([sys.executable, "-m", "radfm_jax.generate", f"--checkpoint={r['base_dir']}",
                        f"--adapters={dst}", "--token_ids=" + ",".join(map(str, ids)), "--max_new_tokens=10",
                        "--eos_id=-1", "--mesh=1,1,1"], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  got = json.loads(res.stdout.strip().splitlines()[-1])["ids"]
  model, _ = checkpoint.load_model(r["base_dir"], r["mesh"], adapters=dst)
  prompt = np.asarray([ids] * 8, np.int32)
  with jax.set_mesh(r["mesh"]):
    want = np.asarray(decoding.generate(model, prompt, np.ones_like(prompt, bool), max_new_tokens=10, eos_id=-1))
  assert got == want[0].tolist()
