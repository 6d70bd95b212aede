"""Store: zarr3 round trips through TensorStore, manifest files, idempotent volume writes, errors."""
import json
import pickle

import numpy as np
import pytest

from radfm_jax.data import schema
from radfm_jax.data import store as store_lib
from radfm_jax.data.store import Store, StoreWriter, codecs


def _record(rid, key, split="train", task="vqa"):
  return {"id": rid, "split": split, "task": task, "question": "q", "answer": "a", "source": "t",
          "images": [{"key": key, "field": "question", "char": 0}], "meta": {}, "provenance": {}}


@pytest.mark.parametrize("codec", ["blosc:zstd:1:bitshuffle", "zstd:3", "blosc:lz4:5:shuffle", "raw"])
def test_round_trip_dtypes_and_chunks(tmp_path, codec):
  rng = np.random.default_rng(0)
  arrays = {"ct": rng.integers(-1024, 3000, (70, 50, 9, 1)).astype(np.int16),
            "rgb": rng.integers(0, 256, (33, 40, 1, 3)).astype(np.uint8),
            "dose": rng.random((10, 10, 15, 1)).astype(np.float32)}
  w = StoreWriter(tmp_path / "s", chunks=(32, 32, 4), codec=codec)
  for k, a in arrays.items():
    assert not w.has_volume(k)
    w.write_volume(k, a, {"unit": "raw"})
    assert w.has_volume(k)
    w.add_record(_record(f"r-{k}", k, split="val" if k == "rgb" else "train", task="report"))
  info = w.finish({"n_failed": 0})
  assert info["schema_version"] == schema.SCHEMA_VERSION and info["codec"] == codec
  assert info["counts"] == {"records": 3, "volumes": 3, "by_split": {"train": 2, "val": 1}, "by_task": {"report": 3}}
  s = Store.open(str(tmp_path / "s"))
  for k, a in arrays.items():
    got = s.read_volume(k)
    assert got.dtype == a.dtype
    np.testing.assert_array_equal(got, a)
    assert s.volume_meta(k) == {"unit": "raw", "shape": list(a.shape), "dtype": a.dtype.name}
    raw = store_lib.open_array(s.volume_spec(k), read=True)        # the raw TensorStore path (benchmarks)
    np.testing.assert_array_equal(raw[:5, :5].read().result(), a[:5, :5])
    chunk = raw.chunk_layout.read_chunk.shape
    assert list(chunk) == [min(32, a.shape[0]), min(32, a.shape[1]), min(4, a.shape[2]), a.shape[3]]
  assert [r["id"] for r in s.records(split="val")] == ["r-rgb"]
  assert len(s.records(task="report")) == 3 and s.records(task="vqa") == []
  assert s.report == {"n_failed": 0} and sorted(s.keys()) == sorted(arrays)
  again = pickle.loads(pickle.dumps(s))
  np.testing.assert_array_equal(again.read_volume("ct"), arrays["ct"])


def test_kvstore_url_root(tmp_path):
  root = f"file://{tmp_path}/url_store/"
  w = StoreWriter(root)
  a = np.arange(2 * 3 * 4).reshape(2, 3, 4, 1).astype(np.int16)
  w.write_volume("k", a, {})
  w.add_record(_record("r", "k"))
  w.finish({})
  np.testing.assert_array_equal(Store.open(root).read_volume("k"), a)
  assert (tmp_path / "url_store" / "info.json").exists()


def test_interrupted_volume_is_not_complete_and_is_rewritten(tmp_path):
  w = StoreWriter(tmp_path)
  a = np.ones((4, 4, 2, 1), np.int16)
  w.write_volume("k", a, {})
  (tmp_path / "volumes" / "k" / "meta.json").unlink()          # as if killed before the entry was written
  fresh = StoreWriter(tmp_path)
  assert not fresh.has_volume("k")
  fresh.write_volume("k", a * 7, {})
  fresh.add_record(_record("r", "k"))
  fresh.finish({})
  assert Store.open(str(tmp_path)).read_volume("k").max() == 7


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no info.json"):
    Store.open(str(tmp_path / "nothing"))
  with pytest.raises(ValueError, match="codec 'lzma'"):
    StoreWriter(tmp_path / "x", codec="lzma")
  with pytest.raises(ValueError, match="chunks"):
    StoreWriter(tmp_path / "x", chunks=(0, 4, 4))
  w = StoreWriter(tmp_path / "y")
  with pytest.raises(ValueError, match="names volume 'missing', which is not stored"):
    w.add_record(_record("r", "missing"))
  with pytest.raises(ValueError, match=r"expected \[H, W, D, C\]"):
    w.write_volume("bad", np.zeros((4, 4)), {})
  w.finish({})
  info = json.loads((tmp_path / "y" / "info.json").read_text())
  info["schema_version"] = 999
  (tmp_path / "y" / "info.json").write_text(json.dumps(info))
  with pytest.raises(ValueError, match="schema_version 999"):
    Store.open(str(tmp_path / "y"))
  with pytest.raises(KeyError, match="no volume 'nope'"):
    Store(str(tmp_path / "y"), {}).volume_meta("nope")
  assert codecs("zstd", np.int16)[-1] == {"name": "zstd", "configuration": {"level": 3}}


def test_every_open_shares_the_process_context(tmp_path, monkeypatch):
  """Reads and writes go through one TensorStore context per process: a context per open (what a
  "context" member in each spec made) let TensorStore free a thread pool that another thread was still
  queueing decodes on, which corrupted the heap of the training input path (found with valgrind)."""
  import concurrent.futures
  import tensorstore as ts
  seen = []
  real_open, real_kv_open = ts.open, ts.KvStore.open
  monkeypatch.setattr(ts, "open", lambda spec, **kw: seen.append(("array", spec, kw)) or real_open(spec, **kw))
  monkeypatch.setattr(ts.KvStore, "open", staticmethod(
      lambda spec, **kw: seen.append(("kv", spec, kw)) or real_kv_open(spec, **kw)))
  w = StoreWriter(tmp_path / "s")
  a = np.arange(64 * 64 * 8).reshape(64, 64, 8, 1).astype(np.int16)
  for i in range(4):
    w.write_volume(f"v{i}", a + i, {})
    w.add_record(_record(f"r{i}", f"v{i}"))
  w.finish({})
  assert w.check_volume("v1") is None
  s = Store.open(str(tmp_path / "s"))
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    got = list(pool.map(s.read_volume, [f"v{i % 4}" for i in range(64)]))
  for i, g in enumerate(got):
    np.testing.assert_array_equal(g, a + i % 4)
  ctx = store_lib.context()
  assert ctx is store_lib.context() and len(seen) > 64
  for kind, spec, kw in seen:
    assert kw.get("context") is ctx, (kind, spec)
    assert "context" not in (spec if isinstance(spec, dict) else {}), spec
