"""RadFM model: parameter count, ViT geometry, input checks, embedding splice, loss, packing, remat/scan."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import radfm_13b, tiny
from radfm_jax.models import vit3d
from radfm_jax.models.radfm import RadFM, image_token_id, loss

CFG = tiny.model_config()
V = CFG.vocab_size
TPI = CFG.tokens_per_image


def _images(b, s, h=64, w=32, d=8, seed=0):
  return jnp.asarray(np.random.default_rng(seed).random((b, s, h, w, d, 3), np.float32))


def _image_block(cfg, slot):
  return [cfg.vocab_size] + [image_token_id(cfg, slot, j) for j in range(cfg.tokens_per_image)] + [cfg.vocab_size + 1]


@pytest.fixture(scope="module")
def model():
  return RadFM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward(model):
  graphdef, state = nnx.split(model)

  @jax.jit
  def f(state, ids, images, image_mask, positions, segment_ids):
    return nnx.merge(graphdef, state)(ids, images, image_mask, positions=positions, segment_ids=segment_ids)

  return lambda ids, images, mask, pos=None, seg=None: f(state, ids, images, mask, pos, seg)


def test_radfm_13b_param_count():
  abstract = nnx.eval_shape(lambda: RadFM(radfm_13b.model_config(), rngs=nnx.Rngs(0)))
  state = nnx.state(abstract, nnx.Param)
  count = lambda t: sum(x.size for x in jax.tree.leaves(t))
  parts = {k: count(state[k]) for k in ("vision", "resampler", "fc", "image_marker_embed", "lm")}
  assert parts == {"vision": 66_208_000, "resampler": 37_802_496, "fc": 3_937_280,
                   "image_marker_embed": 10_240, "lm": 13_015_864_320}
  total = count(state)
  assert total == 13_123_822_336
  assert abs(total - 13.12e9) / 13.12e9 < 0.005


def test_tiny_is_tiny():
  n = sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: RadFM(CFG, rngs=nnx.Rngs(0))))))
  assert n < 3_000_000


def test_position_index_rule():
  np.testing.assert_array_equal(vit3d.position_indices(8, 16), np.arange(1, 16, 2))
  np.testing.assert_array_equal(vit3d.position_indices(1, 128), [127])
  np.testing.assert_array_equal(vit3d.position_indices(16, 128), np.arange(7, 128, 8))
  np.testing.assert_array_equal(vit3d.position_indices(16, 16), np.arange(16))
  with pytest.raises(ValueError, match="position table"):
    vit3d.position_indices(17, 16)


def test_patchify_order_and_pos_embedding(model):
  vit = model.vision
  h, w, d, c = 64, 96, 8, 3
  x = np.random.default_rng(1).random((1, h, w, d, c), np.float32)
  got = np.asarray(vit.patchify(jnp.asarray(x)))
  gh, gw, gd = h // 32, w // 32, d // 4
  assert got.shape == (1, gh * gw * gd, 32 * 32 * 4 * 3)
  t = 0
  for i in range(gh):          # tokens: h-major, then w, then d fastest
    for j in range(gw):
      for k in range(gd):
        patch = x[0, 32 * i:32 * i + 32, 32 * j:32 * j + 32, 4 * k:4 * k + 4, :]  # (p_h, p_w, p_d, c)
        np.testing.assert_array_equal(got[0, t], patch.reshape(-1))
        t += 1
  pos = np.asarray(vit.pos_embedding(gh, gw, gd))
  rows, cols, deps = (np.asarray(p[...]) for p in (vit.pos_row, vit.pos_col, vit.pos_dep))
  tok = (1 * gw + 2) * gd + 1  # (h=1, w=2, d=1)
  np.testing.assert_array_equal(pos[tok], np.concatenate([rows[(1 + 1) * 8 - 1], cols[(2 + 1) * 5 - 1],
                                                          deps[(1 + 1) * 64 - 1]]))


@pytest.mark.parametrize("shape, match", [
    ((1, 1, 48, 32, 4, 3), "H=48 is not a positive multiple of the patch size 32"),
    ((1, 1, 32, 40, 4, 3), "W=40"),
    ((1, 1, 32, 32, 6, 3), "D=6 is not a positive multiple of the patch size 4"),
    ((1, 1, 32, 544, 4, 3), "W gives 17 patches; the position table allows at most 16"),
    ((1, 1, 32, 32, 516, 3), "D gives 129 patches"),
    ((1, 1, 32, 32, 4, 2), "2 channels"),  # C = 1 is replicated (below); other mismatches are errors
    ((1, 5, 32, 32, 4, 3), "5 slots; cfg.max_images=4"),
    ((1, 32, 32, 4, 3), r"\[B, S, H, W, D, C\]"),
])
def test_bad_image_shapes_fail_at_trace_time(model, shape, match):
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.encode_images, jax.ShapeDtypeStruct(shape, jnp.float32))


def test_bad_ids_and_lengths(model):
  imgs, mask = _images(1, 2, 32, 32, 4), jnp.array([[True, False]])
  with pytest.raises(ValueError, match=r"inputs\[0, 1\] = -3 is out of range"):
    model(jnp.array([[1, -3]]), imgs, mask)
  with pytest.raises(ValueError, match=f"= {V + 2 + 4 * TPI} is out of range"):
    model(jnp.array([[1, V + 2 + 4 * TPI]]), imgs, mask)
  with pytest.raises(ValueError, match=r"image token of slot 1.*image_mask\[0\] = \[True, False\]"):
    model(jnp.array([[1, image_token_id(CFG, 1, 0)]]), imgs, mask)
  with pytest.raises(ValueError, match="no images were given"):
    model(jnp.array([[1, image_token_id(CFG, 0, 0)]]))
  with pytest.raises(ValueError, match="exceeds cfg.lm.max_len=256"):
    jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((1, 257), jnp.int32))
  with pytest.raises(ValueError, match="image_mask must be"):
    jax.eval_shape(model.encode_images, jax.ShapeDtypeStruct((1, 2, 32, 32, 4, 3), jnp.float32),
                   jax.ShapeDtypeStruct((1, 3), bool))


def test_embedding_splice(model):
  imgs, mask = _images(2, 2, 32, 32, 4), jnp.array([[True, True], [True, False]])
  emb = model.encode_images(imgs, mask)
  assert emb.shape == (2, 2, TPI, CFG.lm.hidden)
  assert not np.asarray(emb[1, 1]).any()  # unused slot is zero
  ids = jnp.array([[5, V] + [image_token_id(CFG, 1, j) for j in range(TPI)] + [V + 1, 7],
                   [9, V] + [image_token_id(CFG, 0, j) for j in range(TPI)] + [V + 1, 8]])
  x = np.asarray(model.embed(ids, emb))
  table, markers = np.asarray(model.lm.embed_tokens[...]), np.asarray(model.image_marker_embed[...])
  np.testing.assert_array_equal(x[0, 0], table[5])
  np.testing.assert_array_equal(x[:, 1], markers[[0, 0]])
  np.testing.assert_array_equal(x[:, TPI + 2], markers[[1, 1]])
  np.testing.assert_array_equal(x[0, 2:2 + TPI], np.asarray(emb[0, 1]))
  np.testing.assert_array_equal(x[1, 2:2 + TPI], np.asarray(emb[1, 0]))


def test_gray_images_replicated_on_device(forward):
  """A 1-channel batch (what the input pipeline sends) gives the logits of its 3-channel host replica."""
  assert CFG.vision.channels == 3
  gray = _images(2, 2, 32, 32, 4)[..., :1]
  rgb = jnp.repeat(gray, 3, axis=-1)
  mask = jnp.array([[True, True], [True, False]])
  ids = jnp.array([[1] + _image_block(CFG, 0) + _image_block(CFG, 1) + [5, 6],
                   [1] + _image_block(CFG, 0) + [5, 6, 7, 8] + [0] * TPI])
  got, want = np.asarray(forward(ids, gray, mask)), np.asarray(forward(ids, rgb, mask))
  np.testing.assert_array_equal(got, want)
  other = np.asarray(forward(ids, rgb.at[..., 1].set(0.0), mask))  # the channels do matter
  assert not np.allclose(got[:, 1:], other[:, 1:])


def test_logits_cover_text_vocab_only(forward):
  ids = jnp.array([[1] + _image_block(CFG, 0) + [7, 8]])
  out = forward(ids, _images(1, 1, 32, 32, 4), jnp.ones((1, 1), bool))
  assert out.shape == (1, ids.shape[1], V) and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()


def test_loss_masking():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 6, V)), jnp.float32)
  targets = jnp.array([[5, V, V + 3, 7, 8, 0], [9, 10, 11, 12, V + 1, 2]])
  loss_mask = jnp.array([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]], bool)  # question (first) masked
  value, metrics = loss(logits, targets, loss_mask)
  lp = np.asarray(jax.nn.log_softmax(logits))
  counted = [(0, 3), (0, 4), (1, 2), (1, 3), (1, 5)]  # image/marker targets never count
  want = -np.mean([lp[b, t, targets[b, t]] for b, t in counted])
  np.testing.assert_allclose(value, want, rtol=1e-6)
  assert int(metrics["tokens"]) == 5
  g = np.asarray(jax.grad(lambda l: loss(l, targets, loss_mask)[0])(logits))
  assert not g[0, :3].any() and not g[1, :2].any() and not g[1, 4].any() and not g[0, 5].any()
  assert g[0, 3].any() and g[1, 5].any()
  empty, _ = loss(logits, targets, jnp.zeros_like(loss_mask))
  assert float(empty) == 0.0


def test_packed_segments_equal_separate(forward):
  imgs, mask = _images(1, 2, 32, 32, 4, seed=3), jnp.ones((1, 2), bool)
  a = [1, 11, 12] + _image_block(CFG, 0) + [13, 14]
  b = [1, 21] + _image_block(CFG, 1) + [22, 23, 24]
  pad = [0, 0, 0]
  ids = jnp.array([a + b + pad])
  seg = jnp.array([[1] * len(a) + [2] * len(b) + [0] * len(pad)])
  pos = jnp.array([list(range(len(a))) + list(range(len(b))) + [0] * len(pad)])
  packed = np.asarray(forward(ids, imgs, mask, pos, seg))
  alone_a = np.asarray(forward(jnp.array([a]), imgs, mask))
  alone_b = np.asarray(forward(jnp.array([b]), imgs, mask))
  np.testing.assert_allclose(packed[0, :len(a)], alone_a[0], atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(packed[0, len(a):len(a) + len(b)], alone_b[0], atol=2e-5, rtol=1e-5)
  # and the other segment matters when not separated
  joined = np.asarray(forward(ids, imgs, mask, pos, jnp.where(seg > 0, 1, 0)))
  assert np.abs(joined[0, len(a):len(a) + len(b)] - alone_b[0]).max() > 1e-3


def _loss_and_grad(cfg, state_pure, batch):
  model = nnx.eval_shape(lambda: RadFM(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract = nnx.split(model)

  def f(pure):
    st = jax.tree.map(lambda a: a, abstract)
    nnx.replace_by_pure_dict(st, pure)
    logits = nnx.merge(graphdef, st)(*batch)
    return loss(logits, jnp.roll(batch[0], -1, 1), jnp.ones(batch[0].shape, bool))[0], logits

  (value, logits), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(state_pure)
  return value, logits, grads


def test_remat_and_scan_configs_agree(model):
  state = nnx.to_pure_dict(nnx.state(model))
  ids = jnp.array([[1, 3] + _image_block(CFG, 0) + [4, 5, 6]])
  batch = (ids, _images(1, 1, 64, 32, 8), jnp.ones((1, 1), bool))  # 4 patches: ViT attention matters
  ref_val, ref_logits, ref_grads = _loss_and_grad(CFG, state, batch)
  for remat, scan in (("full", True), ("dots", False)):
    cfg = ml_collections.ConfigDict(CFG.to_dict())
    cfg.remat, cfg.scan_layers = remat, scan
    val, logits, grads = _loss_and_grad(cfg, state, batch)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(val, ref_val, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), grads, ref_grads)
  assert np.abs(np.asarray(ref_grads["vision"]["blocks"]["q"]["kernel"])).max() > 0  # towers get gradient


def test_bad_remat_name(model):
  cfg = ml_collections.ConfigDict(CFG.to_dict())
  cfg.remat = "some"
  m = RadFM(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="cfg.remat='some'"):
    jax.eval_shape(lambda x: m(x), jax.ShapeDtypeStruct((1, 4), jnp.int32))


def test_bf16_compute_close_to_fp32(model, forward):
  cfg = ml_collections.ConfigDict(CFG.to_dict())
  cfg.dtype = "bfloat16"
  graphdef = nnx.split(nnx.eval_shape(lambda: RadFM(cfg, rngs=nnx.Rngs(0))))[0]
  state = nnx.state(model)
  ids = jnp.array([[1, 3] + _image_block(CFG, 0) + [4, 5]])
  imgs, mask = _images(1, 1, 32, 32, 4), jnp.ones((1, 1), bool)
  lo = jax.jit(lambda s: nnx.merge(graphdef, s)(ids, imgs, mask))(state)
  hi = forward(ids, imgs, mask)
  assert lo.dtype == jnp.float32
  assert float(jnp.abs(lo - hi).max()) < 0.05 * float(jnp.abs(hi).max())
  assert int((lo.argmax(-1) == hi.argmax(-1)).sum()) >= ids.shape[1] - 2



_REMAT_PROBE = """
import jax
from flax import nnx
from radfm_jax import sharding
from radfm_jax.models import loss as loss_lib
from radfm_jax.models.radfm import RadFM
from train_utils import synthetic_batch, tiny_train_config
cfg = tiny_train_config()
mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
graphdef, state = sharding.create_sharded(RadFM, cfg.model, mesh, seed=0)
batch = sharding.shard_batch(synthetic_batch(cfg, 8), mesh)
def loss(st, bt):
  m = nnx.merge(graphdef, st)
  h = m(bt["inputs"], bt["images"], bt["image_mask"], positions=bt["positions"],
        segment_ids=bt["segment_ids"], head=False)
  return loss_lib.lm_loss(m.lm, h, bt["targets"], bt["loss_mask"])[0]
step = jax.jit(jax.grad(loss), in_shardings=(sharding.state_shardings(state, mesh),
                                            {k: v.sharding for k, v in batch.items()}))
step.lower(state, batch).compile()
print("compiled without a mesh context", flush=True)
with jax.set_mesh(mesh):  # activation constraints on
  step.lower(state, batch).compile()
print("compiled under the mesh", flush=True)
"""


def test_no_involuntary_remat_on_2x2x2_mesh():
  """Issue 11: the image-marker gather (a [2, hidden] table, hidden over fsdp) and, under a mesh
  context, the token-embedding gather made XLA's SPMD partitioner replicate [B, T, hidden]
  ("Involuntary full rematerialization") on a (data, fsdp, tensor) = (2, 2, 2) mesh. Compile the loss
  gradient there in a subprocess (XLA logs to stderr; conftest's TF_CPP_MIN_LOG_LEVEL=3 would hide it)."""
  import os
  import subprocess
  import sys
  tests = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0", JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=os.pathsep.join([os.path.dirname(tests), tests]))
  res = subprocess.run([sys.executable, "-c", _REMAT_PROBE], env=env, capture_output=True, text=True,
                       timeout=900)
  assert "compiled under the mesh" in res.stdout, res.stderr[-3000:]
  assert "Involuntary full rematerialization" not in res.stderr, res.stderr[-3000:]


def test_uint16_and_uint8_images_scaled_on_device(forward):
  """The pipeline's compact transport: uint16 / uint8 images holding round(x * max) give the logits of
  the float images they round (uint16: within fp32 noise of the exact float input)."""
  ids = jnp.array([[1] + _image_block(CFG, 0) + [7, 8]])
  x = np.asarray(_images(1, 1, 32, 32, 4, seed=5))[..., :1]
  want = forward(ids, jnp.asarray(np.rint(x * 65535) / 65535, jnp.float32), jnp.ones((1, 1), bool))
  got = forward(ids, jnp.asarray(np.rint(x * 65535).astype(np.uint16)), jnp.ones((1, 1), bool))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  want8 = forward(ids, jnp.asarray(np.rint(x * 255) / 255, jnp.float32), jnp.ones((1, 1), bool))
  got8 = forward(ids, jnp.asarray(np.rint(x * 255).astype(np.uint8)), jnp.ones((1, 1), bool))
  np.testing.assert_allclose(got8, want8, rtol=1e-5, atol=1e-5)
