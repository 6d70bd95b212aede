"""Mesh construction, golden partition specs of the tiny model on a (2,2,2) mesh, sharded init/forward."""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import tiny
from radfm_jax import models, sharding
from radfm_jax.inference import decoding
from radfm_jax.models.radfm import RadFM, image_token_id
from radfm_jax.training import data as train_data
from radfm_jax.training import state as train_state
from radfm_jax.training import step as train

CFG = tiny.model_config()

GOLDEN = {
    "fc/bias": P("fsdp"),
    "fc/kernel": P(None, "fsdp"),
    "image_marker_embed": P(None, "fsdp"),
    "lm/blocks/attn_norm/scale": P(None, None),
    "lm/blocks/down/kernel": P(None, "tensor", "fsdp"),
    "lm/blocks/gate/kernel": P(None, "fsdp", "tensor"),
    "lm/blocks/k/kernel": P(None, "fsdp", "tensor", None),
    "lm/blocks/mlp_norm/scale": P(None, None),
    "lm/blocks/o/kernel": P(None, "tensor", None, "fsdp"),
    "lm/blocks/q/kernel": P(None, "fsdp", "tensor", None),
    "lm/blocks/up/kernel": P(None, "fsdp", "tensor"),
    "lm/blocks/v/kernel": P(None, "fsdp", "tensor", None),
    "lm/embed_tokens": P("tensor", "fsdp"),
    "lm/final_norm/scale": P(None),
    "lm/lm_head/kernel": P("fsdp", "tensor"),
    "resampler/blocks/ff_in/kernel": P(None, "fsdp", "tensor"),
    "resampler/blocks/ff_norm/bias": P(None, None),
    "resampler/blocks/ff_norm/scale": P(None, None),
    "resampler/blocks/ff_out/kernel": P(None, "tensor", "fsdp"),
    "resampler/blocks/k/kernel": P(None, "fsdp", "tensor", None),
    "resampler/blocks/norm_latents/bias": P(None, None),
    "resampler/blocks/norm_latents/scale": P(None, None),
    "resampler/blocks/norm_media/bias": P(None, None),
    "resampler/blocks/norm_media/scale": P(None, None),
    "resampler/blocks/o/kernel": P(None, "tensor", None, "fsdp"),
    "resampler/blocks/q/kernel": P(None, "fsdp", "tensor", None),
    "resampler/blocks/v/kernel": P(None, "fsdp", "tensor", None),
    "resampler/latents": P(None, "fsdp"),
    "resampler/norm/bias": P(None),
    "resampler/norm/scale": P(None),
    "vision/blocks/attn_norm/bias": P(None, None),
    "vision/blocks/attn_norm/scale": P(None, None),
    "vision/blocks/fc1/bias": P(None, "tensor"),
    "vision/blocks/fc1/kernel": P(None, "fsdp", "tensor"),
    "vision/blocks/fc2/bias": P(None, "fsdp"),
    "vision/blocks/fc2/kernel": P(None, "tensor", "fsdp"),
    "vision/blocks/k/kernel": P(None, "fsdp", "tensor", None),
    "vision/blocks/mlp_norm/bias": P(None, None),
    "vision/blocks/mlp_norm/scale": P(None, None),
    "vision/blocks/o/bias": P(None, "fsdp"),
    "vision/blocks/o/kernel": P(None, "tensor", None, "fsdp"),
    "vision/blocks/q/kernel": P(None, "fsdp", "tensor", None),
    "vision/blocks/v/kernel": P(None, "fsdp", "tensor", None),
    "vision/patch_norm_in/bias": P(None),
    "vision/patch_norm_in/scale": P(None),
    "vision/patch_norm_out/bias": P(None),
    "vision/patch_norm_out/scale": P(None),
    "vision/patch_proj/bias": P("fsdp"),
    "vision/patch_proj/kernel": P(None, "fsdp"),
    "vision/pos_col": P(None, None),
    "vision/pos_dep": P(None, None),
    "vision/pos_row": P(None, None),
}


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))


def test_make_mesh():
  m = sharding.make_mesh(dict(data=-1, fsdp=2, tensor=1))
  assert m.axis_names == ("data", "fsdp", "tensor") and dict(m.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.make_mesh(dict(data=-1, fsdp=-1, tensor=1))
  with pytest.raises(ValueError, match="needs 6 devices, have 8"):
    sharding.make_mesh(dict(data=3, fsdp=2, tensor=1))
  with pytest.raises(ValueError, match="not divisible by 3"):
    sharding.make_mesh(dict(data=-1, fsdp=3, tensor=1))
  with pytest.raises(ValueError, match="unknown axes"):
    sharding.make_mesh(dict(data=-1, model=2))


def test_logical_to_spec():
  assert sharding.logical_to_spec(("batch", None, "unknown")) == P(("data", "fsdp"), None, None)
  assert sharding.logical_to_spec(("layers", "embed", "mlp")) == P(None, "fsdp", "tensor")
  with pytest.raises(ValueError, match="twice"):
    sharding.logical_to_spec(("batch", "embed"))  # fsdp used twice
  m = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  assert sharding.spec_for(("vocab", "embed"), (7, 64), m) == P(None, "fsdp")  # 7 % 2: replicated


def test_golden_partition_specs(mesh):
  abstract = nnx.state(nnx.eval_shape(lambda: RadFM(CFG, rngs=nnx.Rngs(0))))
  assert sharding.partition_specs(abstract, mesh) == GOLDEN


def test_sharded_init_and_forward_match_single_device(mesh):
  graphdef, state = sharding.create_sharded(models.get("radfm"), CFG, mesh, seed=0)
  emb = state["lm"]["embed_tokens"][...]
  assert emb.sharding.spec == P("tensor", "fsdp")
  assert {s.data.shape for s in emb.addressable_shards} == {(CFG.vocab_size // 2, CFG.lm.hidden // 2)}
  # The same values on one device.
  ref_state = jax.tree.map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), state)

  b, tpi = 4, CFG.tokens_per_image
  blk = [CFG.vocab_size] + [image_token_id(CFG, 0, j) for j in range(tpi)] + [CFG.vocab_size + 1]
  ids = np.array([[1, 3 + i] + blk + [5, 6 + i] for i in range(b)], np.int32)
  imgs = np.random.default_rng(0).random((b, 1, 64, 32, 8, 3), np.float32)
  mask = np.ones((b, 1), bool)
  batch = sharding.shard_batch((ids, imgs, mask), mesh)
  assert batch[0].sharding.spec == P(("data", "fsdp"), None)

  def fwd(gd):
    return jax.jit(lambda st, i, x, m: nnx.merge(gd, st)(i, x, m))

  with jax.set_mesh(mesh):  # activates the activation constraints
    sharded = fwd(graphdef)(state, *batch)
  single = fwd(graphdef)(ref_state, ids, imgs, mask)
  assert len(single.sharding.device_set) == 1
  assert sharded.sharding.spec == P(("data", "fsdp"), None, "tensor")
  # Tolerance: fp32 with different reduction orders across shards.
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=1e-5)


def test_abstract_sharded(mesh):
  model = sharding.abstract_sharded(lambda: RadFM(CFG, rngs=nnx.Rngs(0)), mesh)
  leaf = model.lm.blocks.q.kernel.get_value()
  assert isinstance(leaf, jax.ShapeDtypeStruct)
  assert leaf.sharding.spec == P(None, "fsdp", "tensor", None)


# ------------------------------------------------------------------------------------------------------
# Non-divisible axes, advice, and the activation constraints being on in every program a run traces.
# ------------------------------------------------------------------------------------------------------
def test_non_divisible_parameter_axis_is_an_error_naming_parameter_and_axis():
  abstract = nnx.state(nnx.eval_shape(lambda: RadFM(CFG, rngs=nnx.Rngs(0))))
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=8))  # tiny: 4 LM heads, 2 vision heads
  with pytest.raises(ValueError, match=r"parameter lm/blocks/k/kernel: dim 2 \('kv_heads' = 2\) is not divisible "
                                       r"by mesh axis tensor of size 8 .*tensor divides 2"):
    sharding.state_shardings(abstract, mesh)
  with pytest.raises(ValueError, match="parameter lm/embed_tokens: dim 1 \\('embed' = 64\\) .* fsdp"):
    sharding.spec_for(("vocab", "embed"), (512, 64), _FakeMesh(fsdp=3), what="lm/embed_tokens")
  assert sharding.spec_for(("batch", "mlp"), (6, 64), _FakeMesh(data=4)) == P(None, "tensor")  # activations: replicated


class _FakeMesh:
  """Only `.shape` is read by spec_for: a 3-way fsdp axis without needing 3 devices."""

  def __init__(self, **sizes):
    self.shape = {"data": 1, "fsdp": 1, "tensor": 1, **sizes}


def test_advice_says_when_a_logical_axis_could_use_a_larger_mesh_axis():
  abstract = nnx.state(nnx.eval_shape(lambda: RadFM(CFG, rngs=nnx.Rngs(0))))
  mesh = sharding.make_mesh(dict(data=8, fsdp=1, tensor=1))
  notes = sharding.advice(abstract, mesh, min_bytes=0)
  assert any(n.startswith("logical axis 'embed' is sharded over fsdp (size 1) but mesh axis 'data' (size 8)")
             and "--config.mesh.fsdp=8 --config.mesh.data=1" in n for n in notes), notes
  fsdp = sharding.advice(abstract, sharding.make_mesh(dict(data=1, fsdp=8, tensor=1)), min_bytes=0)
  assert not any("'embed'" in n for n in fsdp), fsdp
  assert sharding.advice(abstract, mesh) == []  # below the default 256 MiB threshold


def _constraints(lowered) -> int:
  """Activation sharding constraints in a lowered program (Shardy or GSPMD spelling)."""
  text = lowered.as_text()
  return text.count("sdy.sharding_constraint") + text.count("@Sharding")


@pytest.fixture(scope="module")
def run_programs():
  cfg = tiny.get_config()
  mesh = sharding.make_mesh(dict(data=4, fsdp=2, tensor=1))
  layout = train_state.make_layout(cfg, mesh)
  bucket = train_data.buckets(cfg, largest_only=True)[0]
  batch = train.abstract_batch(cfg, mesh, bucket)
  ebatch = train.abstract_batch(cfg, mesh, bucket, eval_labels=True)
  abstract_model = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                layout.abstract_model, sharding.state_shardings(layout.abstract_model, mesh))
  return {
      "train": train.jit_step(train.make_train_step(layout, cfg), layout, batch).lower(layout.abstract, batch),
      "eval": train.jit_eval_step(layout, cfg).lower(layout.abstract, ebatch),
      "generate": decoding.lower(layout.graphdef, abstract_model, rows=8, prompt_len=64, slots=1,
                                 grid=bucket.grid, max_new_tokens=8),
      "bare": jax.jit(lambda p, b: layout.model(p, {})(b["inputs"], b["images"], b["image_mask"])).lower(
          layout.abstract["params"], batch),
  }


@pytest.mark.parametrize("kind", ["train", "eval", "generate"])
def test_programs_are_traced_under_their_mesh(run_programs, kind):
  """The train step, eval step and generation enter their mesh themselves: the model's activation
  constraints (embedding, every layer body, logits) are in the program however it is traced (here with
  no mesh context at all). Without it XLA may keep the whole global batch on every chip."""
  assert _constraints(run_programs["bare"]) == 0  # the same model traced without a mesh: none
  assert _constraints(run_programs[kind]) >= 5, kind
