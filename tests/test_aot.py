"""The AOT planner: topology names, the tiny config compiled for small v5p and v6e slices from this CPU
box (libtpu's compile-only devices), the plan's JSON contract, OOM reports, the search, multislice."""
import json
import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from configs import tiny
from radfm_jax import sharding
from radfm_jax.aot import plan as plan_lib
from radfm_jax.aot import planner
from radfm_jax.aot import topology
from radfm_jax.training import data as train_data
from radfm_jax.training import loop
from radfm_jax.training import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_topology_names_map_to_libtpu_strings():
  want = {"v5p-8": ("v5p:2x2x1", 4), "v5p-32": ("v5p:2x2x4", 16), "v5p-128": ("v5p:4x4x4", 64),
          "v5p-256": ("v5p:4x4x8", 128), "v5p-512": ("v5p:4x8x8", 256), "v4-32": ("v4:2x2x4", 16),
          "v6e-8": ("v6e:2x4", 8), "v6e-16": ("v6e:4x4", 16), "v6e-64": ("v6e:8x8", 64),
          "v6e-256": ("v6e:16x16", 256), "v5litepod-16": ("v5e:4x4", 16), "v5e-4": ("v5e:2x2", 4),
          "v5p:2x2x4": ("v5p:2x2x4", 16)}
  for name, (libtpu, chips) in want.items():
    t = topology.parse(name)
    assert (t.libtpu, t.chips) == (libtpu, chips), name
  assert topology.parse("v5p-8", num_slices=2).chips == 8
  with pytest.raises(ValueError, match="GPU programs cannot be compiled ahead of time"):
    topology.parse("h100-8")
  with pytest.raises(ValueError, match="counts TensorCores"):
    topology.parse("v5p-7")
  with pytest.raises(ValueError, match="unknown TPU generation"):
    topology.parse("v7x-8")


@pytest.fixture(scope="module")
def v5p():
  return planner.setup("v5p-8", tiny.get_config())


@pytest.fixture(scope="module")
def tiny_plan(v5p):
  """Train, eval and generation of the tiny config's 2D bucket on v5p-8 (4 chips, one host)."""
  topo, devs = v5p
  cfg = tiny.get_config()
  bucket = train_data.buckets(cfg, largest_only=True)[0]
  return planner.plan(cfg, topo, devs, buckets=[bucket])


def test_plan_json_contract_and_memory(tiny_plan):
  t = tiny_plan["topology"]
  assert (t["name"], t["chips"], t["hosts"], t["chips_per_host"]) == ("v5p-8", 4, 1, 4)
  assert t["device_kind"] == "TPU v5" and t["peak_tflops"] == 459.0 and t["hbm_bytes"] == 95 * 2**30
  assert tiny_plan["fits"] is True and json.dumps(tiny_plan, default=str)
  names = [p["name"] for p in tiny_plan["programs"]]
  assert [n.split("/")[0] for n in names] == ["train", "eval", "generate"], names
  for p in tiny_plan["programs"]:
    m = p["memory"]
    assert p["fits"] is True and p["hbm_bytes"] == 95 * 2**30
    assert p["per_chip_bytes"] == m["peak"] + m["argument"] > 0
    assert 0.99 < p["headroom"] < 1.0
    assert m["argument"] > 0 and m["generated_code"] > 0 and p["compile_seconds"] > 0
    assert p["step_s_at_40_mfu"] == pytest.approx(p["model_flops"] / (0.4 * 4 * 459e12))
    assert p["tokens_per_s_at_40_mfu"] == pytest.approx(p["tokens_per_step"] / p["step_s_at_40_mfu"])
  train = tiny_plan["programs"][0]
  assert train["memory"]["alias"] > 0  # the donated state is reused for the new state
  assert train["tokens_per_step"] == 8 * 128 and train["images_per_step"] == 8 * 4


def test_tiny_compiles_for_v6e_through_the_cli(tmp_path):
  """The planner CLI on a v6e slice: exit status 0, plan.json with the launcher's fields."""
  env = dict(os.environ, PYTHONPATH=REPO)
  res = subprocess.run([sys.executable, "-m", "radfm_jax.aot", "--config=configs/tiny.py", "--topology=v6e-8",
                        "--programs=train", "--groups=0", f"--out={tmp_path}"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=1200)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "| train/2d_s4_t128 | yes |" in res.stdout
  plan = json.load(open(tmp_path / "plan.json"))
  assert plan["fits"] is True
  assert {k: plan["topology"][k] for k in ("name", "chips", "hosts", "chips_per_host")} == {
      "name": "v6e-8", "chips": 8, "hosts": 1, "chips_per_host": 8}
  for p in plan["programs"]:
    assert {"name", "fits", "per_chip_bytes", "hbm_bytes"} <= set(p) and p["hbm_bytes"] == 32 * 2**30
  assert (tmp_path / "plan.md").read_text().startswith("## tiny.py on v6e-8")


def test_oom_is_reported_with_the_compilers_top_buffers(v5p):
  """A batch far too large for HBM: fits False, the bytes needed and the largest buffers in words."""
  topo, devs = v5p
  cfg = tiny.get_config()
  cfg.model.vocab_size = 32000
  cfg.data.batch_size = cfg.data.batch_size_3d = 65536  # the chunked loss and fused attention keep 4096 in HBM
  cfg.data.max_len = cfg.model.lm.max_len = 2048
  cfg.data.len_buckets = (2048,)
  bucket = train_data.buckets(cfg, largest_only=True)[0]
  res = planner.plan(cfg, topo, devs, kinds=("eval",), buckets=[bucket])
  (p,) = res["programs"]
  assert res["fits"] is False and p["fits"] is False and p["oom"] is True
  assert p["per_chip_bytes"] > 95 * 2**30 and "out of memory: needs" in p["error"]
  assert p["top_buffers"], p["error"]
  top = p["top_buffers"][0]
  # Per chip: 16384 rows; the largest buffer is named in words in the error.
  assert top["shape"].startswith(("f32[", "bf16[", "s32[")) and "16384" in top["shape"], top
  assert top["what"] and top["what"] in p["error"]


def test_search_finds_a_fit_with_headroom(v5p):
  topo, devs = v5p
  cfg = tiny.get_config()
  res = planner.search(cfg, topo, devs, max_compiles=2, want=1, remats=("none",), tensors=(1,),
                       buckets=train_data.buckets(cfg, largest_only=True)[:1], log=lambda *_: None)
  assert res["fits"] and res["compiles"] == 1
  best = res["fits"][0]
  assert best["headroom"] >= 0.10 and best["data"] * best["fsdp"] * best["tensor"] == 4
  assert best["overrides"] == ("--config.mesh.data=4 --config.mesh.fsdp=1 --config.mesh.tensor=1 "
                               "--config.microbatches=1 --config.model.remat=none")


def test_search_candidates_respect_batch_and_order():
  cfg = tiny.get_config()  # batch 8 (2D and 3D)
  cands = planner.candidates(cfg, 4, tensors=(1, 2))
  assert all(8 % c["microbatches"] == 0 and (8 // c["microbatches"]) % (c["data"] * c["fsdp"]) == 0
             for c in cands)
  assert cands[0] == dict(data=4, fsdp=1, tensor=1, microbatches=1, remat="none")
  assert [c["remat"] for c in cands][-1] == "full"
  # A failure prunes every setting of that mesh needing no less memory.
  fail = dict(data=4, fsdp=1, tensor=1, microbatches=2, remat="dots")
  assert planner._dominated(dict(fail, microbatches=1, remat="none"), [fail])  # pylint: disable=protected-access
  assert not planner._dominated(dict(fail, remat="full"), [fail])  # pylint: disable=protected-access


def test_multislice_mesh_puts_slices_on_the_data_axis():
  t = topology.parse("v5p-8", num_slices=2)
  devs = topology.devices(t)
  assert topology.with_devices(t, devs).hosts == 2
  mesh = sharding.make_mesh(dict(data=-1, fsdp=2, tensor=1), devices=devs)  # slices found on the devices
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  slices = [[d.slice_index for d in row.ravel()] for row in mesh.devices]
  assert slices == [[0, 0], [0, 0], [1, 1], [1, 1]]  # data-major: only data crosses the DCN
  with pytest.raises(ValueError, match="multiple of 2"):
    sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1), devices=devs)


def test_describe_shape_names_avoidable_buffers():
  cfg = ml_collections.ConfigDict(dict(model=tiny.model_config(), data=tiny.get_config().data))
  assert plan_lib.describe_shape("f32[8,128,512]", cfg) == "logits [batch, seq, vocab] in f32"
  assert plan_lib.describe_shape("pred[8,128,128]", cfg) == "attention mask [batch, seq, seq]"
  assert plan_lib.describe_shape("bf16[8,4,128,128]", cfg) == "attention scores [batch, heads, seq, seq]"
  assert plan_lib.describe_shape("f32[3,5]", cfg) == ""


def test_peak_table_knows_v5p():
  assert [metrics.peak_tflops(k) for k in ("TPU v5", "TPU v5 lite", "TPU v6 lite", "TPU v4", "NVIDIA H200")] == [
      459.0, 197.0, 918.0, 275.0, 989.0]
  assert jax.devices()[0].platform == "cpu"  # the planner never needed an accelerator


def test_compilation_cache_setting(tmp_path):
  assert jax.config.jax_compilation_cache_dir in (None, "")
  try:
    assert loop.enable_compilation_cache("auto", str(tmp_path)) is None  # CPU: off
    assert loop.enable_compilation_cache(str(tmp_path / "cc"), "/unused") == str(tmp_path / "cc")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cc")
    assert loop.enable_compilation_cache("/elsewhere", "/unused") == str(tmp_path / "cc")  # first wins
  finally:
    jax.config.update("jax_compilation_cache_dir", None)


def test_model_only_config_plans_generation(v5p):
  """radfm_13b.py / radfm_1b.py carry no optimizer: the planner compiles generation only and says so."""
  topo, devs = v5p
  full = tiny.get_config()
  cfg = ml_collections.ConfigDict(dict(seed=0, model=full.model, mesh=full.mesh, data=full.data))
  res = planner.plan(cfg, topo, devs, buckets=train_data.buckets(cfg, largest_only=True)[:1])
  assert [p["kind"] for p in res["programs"]] == ["generate"] and res["fits"] is True
  assert "model-only config" in res["notes"][0] and res["state_bytes_per_chip"] is None


def test_train_and_eval_steps_use_the_pallas_kernel_on_tpu(v5p):
  """The steps trace under `sharding.activation_mesh` (not `jax.set_mesh`); attention must still see the
  TPU mesh and lower the LM's self-attention (T a multiple of 128) to the splash kernel, not to XLA."""
  from radfm_jax.aot import programs
  from radfm_jax.models import attention as attn_lib
  _, devs = v5p
  cfg = tiny.get_config()
  cfg.data.max_len = cfg.model.lm.max_len = 256
  cfg.data.len_buckets = (256,)
  cfg.model.lm.head_dim = 64  # splash tiles: head_dim a multiple of 64
  mesh = sharding.make_mesh(cfg.mesh, devices=devs)
  bucket = train_data.buckets(cfg, largest_only=True)[0]
  progs = programs.build(cfg, mesh, kinds=("train", "eval"), buckets=[bucket])
  for p in progs:
    assert "tpu_custom_call" in p.lower().as_text(), p.name
  assert attn_lib.platform() == "cpu"  # outside the steps: the default backend
  with sharding.activation_mesh(mesh):
    assert attn_lib.platform() == "tpu"


SHIPPED = [("demo", None), ("bench_cpu", None), ("tiny", None), ("radfm_13b", None), ("radfm_1b", None),
           ("medmd_pretrain", "13b"), ("medmd_pretrain", "1b"), ("radmd_finetune", "13b"),
           ("radmd_finetune", "1b"), ("radmd_lora", "13b"), ("radmd_lora", "1b")]


def test_every_shipped_config_plans(v5p):
  """Every config in configs/ that defines get_config is planned (shapes, state, times; no compile) on
  v5p-8 without an error: the planner runs for every shipped config."""
  import importlib
  import pkgutil
  import configs
  shipped = {m.name for m in pkgutil.iter_modules(configs.__path__)
             if hasattr(importlib.import_module(f"configs.{m.name}"), "get_config")}
  assert shipped == {name for name, _ in SHIPPED}, shipped
  topo, devs = v5p
  for name, arg in SHIPPED:
    cfg = importlib.import_module(f"configs.{name}").get_config(arg)
    res = planner.plan(cfg, topo, devs, compile=False)
    assert res["programs"], (name, arg)
    for p in res["programs"]:
      assert p["step_s_at_40_mfu"] > 0, (name, arg, p["name"])
    if "optim" in cfg:
      assert res["state_bytes_per_chip"] > 0, (name, arg)
    else:
      assert {p["kind"] for p in res["programs"]} == {"generate"}, (name, arg)
