"""RadBench model mode on a tiny random RadFM: batch-size invariance, bucketing, the text-only baseline."""
import json

import numpy as np
import pytest
from absl.testing import flagsaver

import generation_fixtures
from eval import generation, radbench
from radfm_jax import checkpoint, sharding
from radfm_jax.inference import batching as batch_generate
from radfm_jax.data import demo, preprocess
from radfm_jax.inference import split as split_lib
from radfm_jax.data import tokenizer as tokenizer_lib
from radfm_jax.data.store import Store

MAX_NEW = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("evalgen")
  demo.make_demo(str(root / "demo"), n=20, seed=1, workers=0)
  store = str(root / "demo" / "store")
  return generation_fixtures.tiny_checkpoint(root, store, store=store), store


def test_batch1_equals_batch8(setup):
  ckpt, store = setup
  one, err1, info1 = generation.predict_store(ckpt, store, "train", limit=10, batch_size=1,
                                              max_new_tokens=MAX_NEW)
  eight, err8, info8 = generation.predict_store(ckpt, store, "train", limit=10, batch_size=8,
                                                max_new_tokens=MAX_NEW)
  assert not err1 and not err8 and len(one) == len(eight) == 10
  assert [i.id for i in one] == [i.id for i in eight]  # record order, whatever the batching
  assert [i.prediction for i in one] == [i.prediction for i in eight]
  assert any(i.prediction for i in one), "a random tiny model still emits text pieces"
  # The batch-8 run really mixed prompt lengths (left padding) and image grids (2D and 3D batches).
  assert len({i.question for i in eight}) > 1 and {i.meta["dim"] for i in eight} == {"2D", "3D"}
  assert info8["rows_per_batch"] == 8 and info1["rows_per_batch"] == 8  # 8 batch shards: 7 dummy rows
  assert info1["compiled_shapes"] >= 2 and info8["mesh"]["data"] == 8


def test_text_only_baseline_then_cli_model_mode(setup, tmp_path):
  ckpt, store = setup
  # The text-only baseline: the same LM without images (prompts lose their image blocks).
  mesh = sharding.make_mesh({"data": -1})
  model, cfg = checkpoint.load_model(ckpt, mesh=mesh)
  recs = Store.open(store).records(split="test")
  items, errors, info = generation.predict(model.lm, cfg, recs, Store.open(store), mesh=mesh, batch_size=4,
                                           max_new_tokens=MAX_NEW)
  assert not errors and len(items) == len(recs) and info["text_only"] and info["compiled_shapes"] == 1
  scorers = radbench.make_scorers(embedding_model="/nonexistent", meteor=False)
  radbench.score_and_report(items, errors, tmp_path / "base", scorers, n_boot=20, run_info=info)
  # The CLI in model mode, with that baseline next to it.
  with flagsaver.flagsaver(checkpoint=ckpt, store=store, split="test", out=str(tmp_path / "out"),
                           max_new_tokens=MAX_NEW, n_boot=20, embedding_model="/nonexistent", meteor=False,
                           baseline=str(tmp_path / "base" / "metrics.json"), baseline_label="text-only"):
    radbench.main([])
  saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
  assert saved["run"]["mode"] == "model" and not saved["run"]["text_only"] and saved["n_items"] == len(recs)
  assert saved["run"]["checkpoint"] == ckpt and saved["run"]["split"] == "test"
  md = (tmp_path / "out" / "report.md").read_text()
  assert "| text-only |" in md and f"Items scored: {len(recs)}" in md


def test_bad_records_are_recorded_not_fatal(setup):
  ckpt, store = setup
  cfg = checkpoint.load_config(ckpt)
  tok = tokenizer_lib.Tokenizer.from_config(cfg.data, cfg.model)
  st = Store.open(store)
  recs = st.records(split="test")[:2]
  bad = [dict(recs[0], id="too-long", question="word " * 400), dict(recs[1], id="bad-task", task="surgery")]
  prepared, errors = split_lib.prepare(bad + recs, st, tok, preprocess.ImageSpec(),
                                        max_prompt=100, text_only=False)
  assert [p.record["id"] for p in prepared] == [r["id"] for r in recs]
  assert [e.row for e in errors] == ["too-long", "bad-task"]
  assert "exceeds 100" in errors[0].reason and "surgery" in errors[1].reason
  rows = batch_generate.build_batch(prepared, num_rows=4, prompt_len=64, slots=1, grid=(64, 64, 4),
                                pad_id=0, bos_id=1)
  n0 = len(prepared[0].prompt)
  np.testing.assert_array_equal(rows["prompt_ids"][0, -n0:], prepared[0].prompt)
  assert not rows["prompt_mask"][0, :-n0].any() and rows["prompt_mask"][0, -n0:].all()
  assert rows["prompt_mask"][3].sum() == 1 and rows["prompt_ids"][3, -1] == 1  # dummy row: BOS only
  assert rows["images"].shape == (4, 1, 64, 64, 4, 1)  # gray by default; the model replicates it
  assert batch_generate.build_batch(prepared, num_rows=4, prompt_len=64, slots=1, grid=(64, 64, 4), pad_id=0,
                                    bos_id=1, channels=3)["images"].shape == (4, 1, 64, 64, 4, 3)
