"""Grain pipeline over tiny StoreWriter-built stores: shapes, contents, sharding, mixing, packing,
corrupt volumes and iterator resume with worker processes (radfm_jax.data.pipeline)."""
import json
import pathlib

import numpy as np
import pytest

from configs import common_data, mixes
from radfm_jax.data import collate, pipeline, preprocess, schema
from radfm_jax.data.ingest import adapters
from radfm_jax.data import tokenizer as tok_lib
from radfm_jax.data.store import Store, StoreWriter

WORDS = "lesion nodule mass left right upper lower lobe lung liver brain scan shows normal".split()


def _text(rng, n):
  return " ".join(rng.choice(WORDS) for _ in range(n))


def build_store(root, *, seed=0, n2d=10, n3d=8, n_val=5, corrupt=False, name="s"):
  """2D X-ray-like uint8 images, 3D CT-like int16 volumes of several depths, 1-2 images per sample."""
  rng = np.random.default_rng(seed)
  w = StoreWriter(str(root))
  samples = []
  for i in range(n2d + n3d + n_val):
    is3d = n2d <= i < n2d + n3d or (i >= n2d + n3d and i % 2)
    n_img = 2 if i % 3 == 0 else 1
    keys = []
    for k in range(n_img):
      key = f"{name}{i}_{k}"
      if is3d:
        arr = rng.integers(-1000, 1000, size=(18, 14, int(rng.integers(3, 12)), 1)).astype(np.int16)
        meta = {"modality": "CT", "unit": "HU", "is_2d": False}
      else:
        arr = rng.integers(0, 256, size=(20, 24, 1, 1)).astype(np.uint8)
        meta = {"modality": "X-ray", "unit": "uint8", "is_2d": True}
      w.write_volume(key, arr, meta)
      keys.append(key)
    question = f"Question {i}: what does the scan show?"
    answer = _text(rng, int(rng.integers(2, 8)))
    images = [schema.ImageRef(field="question", char=0)]
    if n_img == 2:
      images.append(schema.ImageRef(field="answer", char=len(answer)))
    split = "train" if i < n2d + n3d else "val"
    s = schema.Sample(id=f"{name}-{i}", task="vqa", question=question, answer=answer, images=images,
                      split=split)
    s.validate()
    w.add_record(s.to_record(keys, {}))
    samples.append(s)
  if corrupt:
    key = f"{name}{n2d}_0"  # the first 3D training volume: garble its chunk bytes
    chunks = [p for p in (pathlib.Path(root) / "volumes" / key).rglob("*")
              if p.is_file() and p.name not in ("zarr.json", "meta.json")]
    assert chunks
    for p in chunks:
      p.write_bytes(b"\x00garbage" * 7)
  w.finish({"failures": []})
  return str(root)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  return build_store(tmp_path_factory.mktemp("store") / "s")


@pytest.fixture(scope="module")
def tok(store, tmp_path_factory):
  path = tok_lib.train_tokenizer(store, str(tmp_path_factory.mktemp("tok") / "t"), 160)
  return tok_lib.Tokenizer.load(path, max_images=2, tokens_per_image=4)


def cfg_for(store, **kw):
  base = dict(store=store, image_hw_2d=(16, 16), depth_2d=4, image_hw_3d=(16, 16), depth_buckets=(4, 8),
              max_len=64, len_buckets=(32,), slot_buckets=(1,), batch_size=4, batch_size_3d=2, workers=0,
              read_threads=1, prefetch=1)
  base.update(kw)
  return common_data.data_config(**base)


def take(it, n):
  return [next(it) for _ in range(n)]


def check_rows(batch, st, tok, cfg, *, exact_images):
  """Every non-empty row matches the tokenizer and preprocessing applied to its record."""
  spec = preprocess.ImageSpec.from_config(cfg)
  t = batch["inputs"].shape[1]
  for j in range(batch["inputs"].shape[0]):
    d, r = batch["record_index"][j, 0]
    if d < 0:
      assert batch["segment_ids"][j].sum() == 0 and not batch["image_mask"][j].any()
      continue
    rec = RECORDS[(cfg.store, int(r))]
    ex = tok.build_example(rec, cfg.max_len)
    n = int(ex["length"])
    assert n <= t
    np.testing.assert_array_equal(batch["inputs"][j, :n], ex["inputs"][:n])
    np.testing.assert_array_equal(batch["targets"][j, :n], ex["targets"][:n])
    np.testing.assert_array_equal(batch["loss_mask"][j, :n], ex["loss_mask"][:n])
    np.testing.assert_array_equal(batch["positions"][j, :n], np.arange(n))
    np.testing.assert_array_equal(batch["segment_ids"][j], np.arange(t) < n)
    np.testing.assert_array_equal(batch["inputs"][j, n:], tok.pad_id)
    n_img = len(rec["images"])
    np.testing.assert_array_equal(batch["image_mask"][j], np.arange(batch["image_mask"].shape[1]) < n_img)
    vols = [st.read_volume(im["key"]) for im in rec["images"]]
    metas = [st.volume_meta(im["key"]) for im in rec["images"]]
    grid = batch["images"].shape[2:5]
    assert tuple(grid) == preprocess.sample_grid([v.shape for v in vols], metas, spec)
    if exact_images:
      np.testing.assert_array_equal(batch["images"][j, :n_img], preprocess.prepare_sample(vols, metas, spec))
    assert batch["images"][j, :n_img].min() >= 0 and batch["images"][j, :n_img].max() <= 1
    np.testing.assert_array_equal(batch["images"][j, n_img:], 0)


RECORDS = {}  # (store root, index in the split) -> record, for the split last indexed


def index_records(root, split):
  st = Store.open(root)
  for i, r in enumerate(st.records(split=split)):
    RECORDS[(root, i)] = r
  return st


def test_eval_pipeline_every_record_once_with_exact_contents(store, tok):
  cfg = cfg_for(store, len_buckets=(32, 64), slot_buckets=(1, 2))
  st = index_records(store, "val")
  p = pipeline.plan(cfg, tok, split="val", train=False, seed=0)
  it = pipeline.make_pipeline(cfg, tok, split="val", train=False, seed=0, process_index=0, process_count=1)
  batches = list(it)
  seen = []
  for b in batches:
    assert set(b) == set(collate.DEVICE_KEYS) | set(collate.HOST_KEYS)
    assert b["inputs"].dtype == np.int32 and b["images"].dtype == np.float32 and b["image_mask"].dtype == bool
    assert b["inputs"].shape[0] == (4 if _is_2d_batch(b, st) else 2)
    assert b["inputs"].shape[1] in p.len_buckets and b["images"].shape[1] in p.slot_buckets
    check_rows(b, st, tok, cfg, exact_images=True)
    seen += [int(r) for r in b["record_index"][:, 0, 1] if r >= 0]
    assert b["num_skipped"] == 0
  assert sorted(seen) == list(range(len(st.records(split="val"))))
  # The model accepts the ids (image ids only for used slots).
  from radfm_jax.models import radfm  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  mcfg = ml_collections.ConfigDict(dict(vocab_size=tok.text_vocab_size, max_images=2, tokens_per_image=4))
  for b in batches:
    radfm.check_token_ids(mcfg, b["inputs"], b["image_mask"])


def _is_2d_batch(b, st):
  d, r = b["record_index"][0, 0]
  rec = RECORDS[(st.root, int(r))]
  return all(st.volume_meta(im["key"])["is_2d"] for im in rec["images"])


def test_train_batches_homogeneous_bounded_shapes(store, tok):
  cfg = cfg_for(store, len_buckets=(32, 64), slot_buckets=(1, 2))
  st = index_records(store, "train")
  p = pipeline.plan(cfg, tok, split="train", train=True, seed=0)
  assert p.groups == [0, 4, 8] and p.max_shapes == 3 * 2 * 2
  it = pipeline.make_pipeline(cfg, tok, split="train", train=True, seed=0, process_index=0, process_count=1)
  shapes, seen = set(), []
  for b in take(it, 16):
    shapes.add((b["inputs"].shape, b["images"].shape))
    is2d = _is_2d_batch(b, st)
    for j in range(b["inputs"].shape[0]):
      rec = RECORDS[(store, int(b["record_index"][j, 0, 1]))]
      assert all(st.volume_meta(im["key"])["is_2d"] == is2d for im in rec["images"]), "mixed 2D/3D batch"
    assert b["inputs"].shape[0] == (4 if is2d else 2)
    check_rows(b, st, tok, cfg, exact_images=not is2d)  # 2D images get a random crop in training
    seen += b["record_index"][:, 0, 1].tolist()
  assert len(shapes) <= p.max_shapes
  assert set(seen) == set(range(len(st.records(split="train")))), "16 batches cover the 18 records"


def test_process_shards_compose_the_global_batch(store, tok):
  cfg = cfg_for(store)
  whole = take(pipeline.make_pipeline(cfg, tok, split="train", train=True, seed=3, process_index=0,
                                      process_count=1), 5)
  parts = [take(pipeline.make_pipeline(cfg, tok, split="train", train=True, seed=3, process_index=i,
                                       process_count=2), 5) for i in range(2)]
  for k in range(5):
    for key in collate.DEVICE_KEYS + ("record_index",):
      np.testing.assert_array_equal(np.concatenate([parts[0][k][key], parts[1][k][key]]), whole[k][key])
  other_seed = take(pipeline.make_pipeline(cfg, tok, split="train", train=True, seed=4, process_index=0,
                                           process_count=1), 5)
  assert any(not np.array_equal(a["record_index"], b["record_index"]) for a, b in zip(whole, other_seed))
  with pytest.raises(ValueError, match="batch_size_3d=2 is not divisible by the 4 processes"):
    pipeline.make_pipeline(cfg, tok, split="train", train=True, seed=3, process_index=0, process_count=4)


def test_mixture_follows_weights(store, tok, tmp_path):
  other = build_store(tmp_path / "b", seed=1, n2d=6, n3d=0, n_val=0, name="b")
  mix = [{"name": "a", "store": store, "weight": 1.0}, {"name": "b", "store": other, "weight": 3.0}]
  cfg = cfg_for(store, mix=mix, batch_size=2, batch_size_3d=2, image_hw_2d=(8, 8), image_hw_3d=(8, 8))
  it = pipeline.make_pipeline(cfg, tok, split="train", train=True, seed=0, process_index=0, process_count=1)
  counts = np.zeros(2)
  for b in take(it, 40):
    ds = b["record_index"][:, 0, 0]
    counts += np.bincount(ds[ds >= 0], minlength=2)
  frac_b = counts[1] / counts.sum()
  assert 0.65 <= frac_b <= 0.85, counts
  with pytest.raises(ValueError, match=r"data.mix\[1\] \(b\): weight 0.0 must be > 0"):
    pipeline.mixture(cfg_for(store, mix=[mix[0], {**mix[1], "weight": 0.0}]))


def test_packing_segments_positions_and_slots(store, tok):
  cfg = cfg_for(store, pack=True, pack_max_samples=3, max_len=64, len_buckets=(64,), slot_buckets=(2,))
  st = index_records(store, "val")
  it = pipeline.make_pipeline(cfg, tok, split="val", train=False, seed=0, process_index=0, process_count=1)
  seen, multi = [], 0
  for b in it:
    for j in range(b["inputs"].shape[0]):
      refs = [(int(d), int(r)) for d, r in b["record_index"][j] if d >= 0]
      seen += [r for _, r in refs]
      multi += len(refs) > 1
      seg, pos = b["segment_ids"][j], b["positions"][j]
      slot = 0
      for k, (_, r) in enumerate(refs):
        rec = RECORDS[(store, r)]
        ex = tok.build_example(rec, None)
        n = int(ex["length"])
        where = np.flatnonzero(seg == k + 1)
        assert len(where) == n and np.all(np.diff(where) == 1)
        np.testing.assert_array_equal(pos[where], np.arange(n))
        shift = np.where(ex["inputs"] >= tok.image_start_id + 2, slot * tok.tokens_per_image, 0)
        np.testing.assert_array_equal(b["inputs"][j, where], ex["inputs"] + shift)
        np.testing.assert_array_equal(b["loss_mask"][j, where], ex["loss_mask"])
        assert b["loss_mask"][j, where[-1]] == 0, "no loss across a segment boundary"
        slot += len(rec["images"])
      np.testing.assert_array_equal(b["image_mask"][j], np.arange(2) < slot)
  assert sorted(seen) == list(range(len(st.records(split="val"))))
  assert multi >= 1, "short samples were packed together"
  # Packed rows never exceed the slots: the 2-image records fill a row on their own.


def test_too_many_images_excluded_and_counted(store, tmp_path):
  path = tok_lib.train_tokenizer(Store.open(store), str(tmp_path / "t1"), 160)
  tok1 = tok_lib.Tokenizer.load(path, max_images=1, tokens_per_image=4)
  p = pipeline.plan(cfg_for(store), tok1, split="train", train=True, seed=0)
  n_two = sum(len(r["images"]) == 2 for r in Store.open(store).records(split="train"))
  assert p.excluded == {"too_many_images": n_two} and n_two > 0
  assert int((p.rows[..., 0] >= 0).sum()) == 18 - n_two


def test_corrupt_volume_skipped_and_counted_or_fails(tmp_path, tok):
  root = build_store(tmp_path / "c", corrupt=True, name="c")
  index_records(root, "train")
  cfg = cfg_for(root, batch_size_3d=8)  # every 3D training row in one batch
  it = pipeline.make_pipeline(cfg, tok, split="train", train=True, seed=0, process_index=0, process_count=1)
  skipped = empty = 0
  for b in take(it, 12):
    skipped += int(b["num_skipped"])
    for j in np.flatnonzero(b["record_index"][:, 0, 0] >= 0):
      if b["segment_ids"][j].sum() == 0:  # the skipped row: empty, no loss, no images
        empty += 1
        assert RECORDS[(root, int(b["record_index"][j, 0, 1]))]["id"] == "c-10"
        assert b["loss_mask"][j].sum() == 0 and not b["image_mask"][j].any()
        assert np.all(b["images"][j] == 0) and np.all(b["inputs"][j] == tok.pad_id)
  assert skipped == empty >= 1
  it = pipeline.make_pipeline(cfg_for(root, batch_size_3d=8, on_corrupt="fail"), tok, split="train",
                              train=True, seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="c-10.*unreadable volume"):
    take(it, 12)


def test_resume_from_state_with_workers(store, tok):
  cfg = cfg_for(store, workers=2, worker_buffer=1)
  it = pipeline.make_pipeline(cfg, tok, split="train", train=True, seed=5, process_index=0, process_count=1)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # what grain.checkpoint.CheckpointSave writes
  want = take(it, 4)
  fresh = pipeline.make_pipeline(cfg, tok, split="train", train=True, seed=5, process_index=0,
                                 process_count=1)
  fresh.set_state(state)
  got = take(fresh, 4)
  for a, b in zip(want, got):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # Workers do not change the data: the same batches as in-process loading.
  single = pipeline.make_pipeline(cfg_for(store), tok, split="train", train=True, seed=5, process_index=0,
                                  process_count=1)
  for a, b in zip(take(single, 7)[3:], want):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_mixes_name_registered_datasets():
  for fn in (mixes.medmd_pretrain, mixes.radmd_finetune):
    mix = fn("gs://bucket/stores/")
    assert abs(sum(m["weight"] for m in mix) - 1.0) < 1e-9
    names = [m["name"] for m in mix]
    assert len(set(names)) == len(names) and set(names) <= set(adapters.names())
    assert all(m["store"] == f"gs://bucket/stores/{m['name']}" for m in mix)
  assert "pmc_inline" not in {m["name"] for m in mixes.radmd_finetune("r")}
  assert pipeline.mixture(common_data.data_config(store="x")) == [("data", "x", 1.0)]


def test_uint16_transport_is_the_rounded_float_batch(store, tok):
  """data.image_dtype="uint16": the same batches with images = round(float images * 65535), through a
  Grain worker as in process; the model scales them back on device (test_models)."""
  floats = take(pipeline.make_pipeline(cfg_for(store), tok, split="train", train=True, seed=3,
                                       process_index=0, process_count=1), 2)
  compact = take(pipeline.make_pipeline(cfg_for(store, image_dtype="uint16", workers=1), tok, split="train",
                                        train=True, seed=3, process_index=0, process_count=1), 2)
  for a, b in zip(floats, compact):
    assert b["images"].dtype == np.uint16 and b["images"].nbytes * 2 == a["images"].nbytes
    np.testing.assert_array_equal(b["images"], np.rint(a["images"] * 65535).astype(np.uint16))
    for k in a:
      if k != "images":
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
