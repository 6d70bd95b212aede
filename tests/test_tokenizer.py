"""radfm_jax.data.tokenizer: id layout, chunked prompt building, loss masks, truncation, training."""
import random

import numpy as np
import pytest
import sentencepiece as spm

from radfm_jax.data import tokenizer as tok_lib

WORDS = ("what modality is this scan it a ct mr x-ray of the chest there lesion in left right lung yes no "
         "findings nodule upper lower lobe impression suspicious brain liver kidney mass cm size").split()


def corpus(n=300, seed=0):
  rng = random.Random(seed)
  return [" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "? Findings: 12, 3."
          for _ in range(n)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
  return tok_lib.train_tokenizer(corpus(), str(tmp_path_factory.mktemp("tok") / "t"), 300)


@pytest.fixture(scope="module")
def tok(model_path):
  return tok_lib.Tokenizer.load(model_path, max_images=3, tokens_per_image=4)


def rec(question, answer, images=(), rid="r1"):
  return {"id": rid, "question": question, "answer": answer,
          "images": [{"key": f"k{i}", "field": f, "char": c} for i, (f, c) in enumerate(images)]}


def test_trained_model_layout(model_path, tok):
  sp = spm.SentencePieceProcessor(model_file=model_path)
  assert sp.get_piece_size() == 300 == tok.text_vocab_size
  assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert (tok.image_start_id, tok.image_end_id) == (300, 301)
  assert tok.image_token_id(0, 0) == 302
  assert tok.image_token_id(2, 3) == 302 + 2 * 4 + 3 == tok.vocab_size - 1
  assert tok.vocab_size == 300 + 2 + 3 * 4
  assert tok.image_block(1) == [300, 306, 307, 308, 309, 301]
  with pytest.raises(ValueError):
    tok.image_token_id(3, 0)
  vocab = open(model_path[:-len(".model")] + ".vocab").read().splitlines()
  assert len(vocab) == 300 and vocab[1].startswith("<s>\t")
  assert len(tok.sha256) == 64


def test_small_corpus_padded_with_unused_pieces(tmp_path):
  path = tok_lib.train_tokenizer(["a b c", "b c d"] * 20, str(tmp_path / "small"), 200)
  sp = spm.SentencePieceProcessor(model_file=path)
  assert sp.get_piece_size() == 200
  assert sp.is_unused(199)
  ids = sp.encode("a b c d dcba " * 5)
  assert max(ids) < 20, "unused padding pieces must never be produced"
  assert len((tmp_path / "small.vocab").read_text().splitlines()) == 200
  # A model may still sample an unused id: decode drops it instead of printing "<unused199>".
  tok = tok_lib.Tokenizer.load(path, max_images=0, tokens_per_image=1)
  assert sp.decode([199]) != "" and tok.decode([*ids, 199, 198]) == tok.decode(ids)


def test_trains_from_store_like_object(tmp_path):
  class FakeStore:
    def __init__(self):
      self.asked = []

    def records(self, split=None, task=None):
      self.asked.append(split)
      return [rec(q, "yes") for q in corpus(50)]

  store = FakeStore()
  path = tok_lib.train_tokenizer(store, str(tmp_path / "s"), 100)
  assert store.asked == ["train"]
  tok = tok_lib.Tokenizer.load(path, max_images=0, tokens_per_image=1)
  assert tok.decode(tok.encode("is there a lesion")) == "is there a lesion"


def test_encode_decode_roundtrip(tok):
  text = "Findings: a 12 cm nodule in the left lower lobe."
  ids = tok.encode(text)
  assert all(0 <= i < tok.text_vocab_size for i in ids)
  assert tok.decode(ids) == text
  # decode stops at eos and drops image / pad / bos ids.
  assert tok.decode([tok.bos_id, *tok.image_block(0), *ids, tok.eos_id, *tok.encode("junk")]) == text


def test_text_only_example_matches_joined_string(tok, model_path):
  sp = spm.SentencePieceProcessor(model_file=model_path)
  q, a = "Is there a lesion in the left lung?", "Yes, a mass."
  ex = tok.build_example(rec(q, a), 64)
  want = sp.encode(q + " " + a, add_bos=True, add_eos=True)
  n = len(want)
  assert int(ex["length"]) == n
  np.testing.assert_array_equal(ex["inputs"][:n], want)
  np.testing.assert_array_equal(ex["inputs"][n:], 0)
  np.testing.assert_array_equal(ex["targets"][:n - 1], want[1:])
  np.testing.assert_array_equal(ex["positions"][:n], np.arange(n))
  n_q = len(sp.encode(q)) + 1  # bos + question
  mask = np.zeros(64, np.int32)
  mask[n_q - 1:n - 1] = 1  # targets n_q .. n-1: the answer and eos
  np.testing.assert_array_equal(ex["loss_mask"], mask)
  assert ex["targets"][n - 2] == tok.eos_id and ex["loss_mask"][n - 2] == 1
  assert tok.build_prompt(rec(q, a)) == [1, *sp.encode(q)]


def test_images_spliced_at_record_positions(tok):
  q, a = "Look at this scan. What is it?", "A CT of the chest."
  r = rec(q, a, images=[("question", 0), ("question", 8), ("answer", 5)])
  ex = tok.build_example(r, 80)
  ids = list(ex["inputs"][:int(ex["length"])])
  b0, b1, b2 = tok.image_block(0), tok.image_block(1), tok.image_block(2)
  assert ids[1:1 + 6] == b0  # char 0: right after BOS
  i1 = ids.index(b1[1]) - 1
  assert ids[i1:i1 + 6] == b1
  assert tok.decode(ids[7:i1]) == "Look at "
  i2 = ids.index(b2[1]) - 1
  assert ids[i2:i2 + 6] == b2
  # text round-trips around the blocks: a word cut by an image gains no space.
  assert tok.decode(ids) == q + " " + a
  mask, targets = ex["loss_mask"], ex["targets"]
  assert not np.any(mask[targets >= tok.text_vocab_size]), "image ids are never predicted"
  # targets <image>, the image ids and </image> are masked; the text after the block is not.
  np.testing.assert_array_equal(mask[i2 - 1:i2 + 5], 0)
  assert mask[i2 + 5] == 1 and mask[i2 - 2] == 1
  prompt = tok.build_prompt(r)
  assert prompt == ids[:len(prompt)] and tok.image_block(2)[1] not in prompt
  assert tok.decode(prompt) == q


def test_same_char_keeps_slot_order(tok):
  ex = tok.build_example(rec("Compare.", "ok", images=[("question", 8), ("question", 8)]), 64)
  ids = list(ex["inputs"])
  assert ids.index(tok.image_token_id(0, 0)) < ids.index(tok.image_token_id(1, 0))


def test_upstream_image_position_quirk(model_path):
  tok = tok_lib.Tokenizer.load(model_path, max_images=2, tokens_per_image=4, upstream_image_position=True)
  q = "What modality is this?"
  prompt = tok.build_prompt(rec(q, "CT", images=[("question", 0)]))
  block = tok.image_block(0)
  start = prompt.index(block[0])
  assert prompt[start:start + 6] == block
  assert tok.decode(prompt[:start]) == q[:-1]
  assert tok.decode(prompt[start + 6:]) == "?"


def test_too_many_images_names_record(tok):
  r = rec("q", "a", images=[("question", 0)] * 4, rid="case-77")
  with pytest.raises(ValueError, match="case-77.*4 images.*3 image slots"):
    tok.build_example(r, 64)
  with pytest.raises(ValueError, match="case-77"):
    tok.build_prompt(r)


def test_bad_char_names_record(tok):
  with pytest.raises(ValueError, match="case-9.*char 99"):
    tok.build_prompt(rec("short", "a", images=[("question", 99)], rid="case-9"))


def test_truncation_keeps_image_blocks(tok):
  long_answer = " ".join(["the nodule is in the left lung"] * 20)
  r = rec("Scan?", long_answer, images=[("question", 0)])
  ex = tok.build_example(r, 24)
  assert int(ex["length"]) == 24
  assert list(ex["inputs"][1:7]) == tok.image_block(0)
  assert tok.eos_id not in ex["inputs"]
  assert ex["loss_mask"][:23].sum() > 5 and ex["loss_mask"][23] == 0
  # An image that would be cut is an error, as is any truncation when evaluating.
  with pytest.raises(ValueError, match="r1.*never cuts an image"):
    tok.build_example(rec("Scan?", long_answer, images=[("answer", 200)]), 24)
  with pytest.raises(ValueError, match="r1.*exceed max_len 24"):
    tok.build_example(r, 24, train=False)
  ex_eval = tok.build_example(r, 400, train=False)
  assert tok.decode(ex_eval["inputs"]) == "Scan? " + long_answer


def test_special_strings_stay_text(tok):
  ex = tok.build_example(rec("What is <image> and </image>?", "text"), 96)
  assert ex["inputs"].max() < tok.text_vocab_size


def test_rejects_model_with_other_bos_eos(tmp_path):
  import io
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus(50)), model_writer=buf, vocab_size=60,
                                 hard_vocab_limit=False, bos_id=2, eos_id=1, unk_id=0, minloglevel=2)
  with pytest.raises(ValueError, match="bos/eos ids are \\(2, 1\\)"):
    tok_lib.Tokenizer(buf.getvalue(), max_images=1, tokens_per_image=1)
  with pytest.raises(FileNotFoundError, match="nowhere.model"):
    tok_lib.Tokenizer.load(tmp_path / "nowhere.model", max_images=1, tokens_per_image=1)


def test_cli_trains_on_a_store(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from radfm_jax.data import schema  # pylint: disable=g-import-not-at-top
  from radfm_jax.data.store import StoreWriter  # pylint: disable=g-import-not-at-top
  w = StoreWriter(str(tmp_path / "store"))
  for i, q in enumerate(corpus(40)):
    w.add_record(schema.Sample(id=f"s{i}", task="vqa", question=q, answer="yes",
                               split="train" if i % 4 else "val").to_record([], {}))
  w.finish({})
  out = subprocess.run([sys.executable, "-m", "radfm_jax.data.tokenizer", f"--store={tmp_path / 'store'}",
                        "--vocab_size=128", f"--out={tmp_path / 'tk'}"], capture_output=True, text=True,
                       check=True)
  assert "128 text ids" in out.stdout
  tok = tok_lib.Tokenizer.load(tmp_path / "tk.model", max_images=1, tokens_per_image=2)
  assert tok.text_vocab_size == 128 and tok.decode(tok.encode("left lung")) == "left lung"
  with pytest.raises(ValueError, match="no text in store .* split 'test'"):
    tok_lib.train_tokenizer(str(tmp_path / "store"), str(tmp_path / "x"), 64, split="test")


def test_from_config_checks_vocab(model_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import common_data  # pylint: disable=g-import-not-at-top
  model = ml_collections.ConfigDict(dict(vocab_size=300, max_images=2, tokens_per_image=5))
  tok = tok_lib.Tokenizer.from_config(
      common_data.data_config(tokenizer=model_path, upstream_image_position=True), model)
  assert tok.vocab_size == 300 + 2 + 10 and tok.upstream_image_position
  model.vocab_size = 512
  with pytest.raises(ValueError, match="300 text ids but model.vocab_size is 512"):
    tok_lib.Tokenizer.from_config(common_data.data_config(tokenizer=model_path), model)
  with pytest.raises(ValueError, match="data.tokenizer is empty"):
    tok_lib.Tokenizer.from_config(common_data.data_config(), model)
