"""Robust runs: CSV as users save it, one-line errors, empty ground truth, duplicates, a staged --out,
per-row scores, reference rows, plots that show the tables' numbers."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from eval import predictions, radbench, report, scoring, tasks
from eval.tasks import Item

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = ["Question", "Ground Truth", "Pred", "belong_to"]
ROWS = [["Is there an effusion?", "yes", "Yes, small effusion. No pneumothorax.", "chestxray_dataset_bn"],
        ["Which modality?", "CT", "Not an MRI; a CT of the chest with café-au-lait", "radiomodality_dataset"]]


@pytest.fixture(scope="module")
def light():
  scorers = radbench.make_scorers(embedding_model="/nonexistent", meteor=False)
  yield scorers
  scorers.close()


def _write(path, rows, encoding="utf-8", header=HEADER):
  with open(path, "w", newline="", encoding=encoding) as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


@pytest.mark.parametrize("name,encoding", [("excel.csv", "utf-8-sig"), ("win.CSV", "cp1252"), ("plain.csv", "utf-8")])
def test_csv_encodings_bom_and_suffix(tmp_path, name, encoding):
  path = tmp_path / name
  _write(path, ROWS, encoding)
  items, errors = predictions.read(str(path))
  assert not errors and [i.task for i in items] == ["diagnosis", "modality"]
  assert "café" in items[1].prediction and items[0].question == "Is there an effusion?"  # BOM not in a column


def test_short_rows_and_bad_files_name_file_and_line(tmp_path):
  path = tmp_path / "short.csv"
  _write(path, [ROWS[0], ["only", "two"], ROWS[1]])
  items, errors = predictions.read(str(path))
  assert len(items) == 2 and [(e.row, e.reason) for e in errors] == [(3, "row has 2 cells, the header has 4")]
  assert [i.id for i in items] == ["line2", "line4"]
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(predictions.PredictionsError, match=r"notes.txt: expected a .jsonl or .csv"):
    predictions.read(str(tmp_path / "notes.txt"))
  bad = tmp_path / "latin.csv"
  bad.write_bytes(b"Question,Ground Truth,Pred,belong_to\nq,a,\xe9\xff,x\n")
  with pytest.raises(predictions.PredictionsError, match=r"latin.csv:2: not valid utf-8"):
    predictions.read(str(bad), encoding="utf-8")


def test_cli_error_is_one_line(tmp_path):
  bad = tmp_path / "bad.csv"
  bad.write_text("foo,bar\n1,2\n")
  proc = subprocess.run([sys.executable, "-m", "eval.radbench", f"--predictions={bad}", f"--out={tmp_path / 'o'}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {bad}:1: columns ['foo', 'bar']")
  assert not (tmp_path / "o").exists()


def test_empty_ground_truth_is_an_error_row_and_duplicates_are_listed(tmp_path, light):
  items = [Item("a", "vqa", "Is there an effusion?", "yes", "yes"),
           Item("b", "vqa", "Is there an effusion?", "nan", "yes"),        # pandas' empty cell
           Item("c", "report", "Report.", "", ""),                         # empty/empty pair: never 1.0
           Item("d", "diagnosis", "Labels?", "None", "nan"),               # never a perfect 'nan' F1
           Item("e", "vqa", "Is there an effusion?", "yes", "yes")]        # duplicate of a
  m = radbench.score_and_report(items, [], tmp_path / "out", light, n_boot=20)
  assert sorted(s["row"] for s in m["skipped"]) == ["b", "c", "d"]
  assert all("empty ground truth" in s["reason"] for s in m["skipped"])
  assert m["n_items"] == 2 and set(m["tasks"]) == {"vqa"}
  assert m["duplicates"] == [{"ids": ["a", "e"], "count": 2, "task": "vqa", "question": "Is there an effusion?"}]
  md = (tmp_path / "out" / "report.md").read_text()
  assert "rows skipped with errors: 3" in md and "Duplicated rows: 1 groups (2 rows)" in md


def test_out_is_staged_and_never_mixes_runs(tmp_path, light, monkeypatch):
  out = tmp_path / "out"
  (out / "text_prior").mkdir(parents=True)
  (out / "text_prior" / "metrics.json").write_text("{}")          # someone else's: kept
  for stale in ("metrics.json", "report.md", "modality_confusion.png", "predictions.csv"):
    (out / stale).write_text("previous run")
  items = [Item("a", "vqa", "Is there an effusion?", "yes", "Yes.")]
  radbench.score_and_report(items, [], out, light, n_boot=20)
  assert not (out / "modality_confusion.png").exists()            # not produced this run: removed
  assert json.loads((out / "metrics.json").read_text())["n_items"] == 1
  assert (out / "text_prior" / "metrics.json").read_text() == "{}"
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
  before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

  def boom(*a, **k):
    raise RuntimeError("scorer crashed")
  monkeypatch.setattr(scoring, "score", boom)
  with pytest.raises(RuntimeError):
    radbench.score_and_report(items * 2, [], out, light, n_boot=20)
  assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # untouched
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]


def test_per_row_scores_and_reference_rows(tmp_path, light):
  refs = ["Normal chest.", "Normal chest.", "Right lower lobe pneumonia.", "Left pleural effusion.",
          "Normal chest."]
  preds = ["Normal chest.", "No acute process.", "Pneumonia in the right lower lobe.", "Normal chest.",
           "Cardiomegaly."]
  items = [Item(f"r{i}", "report", "Report.", r, p) for i, (r, p) in enumerate(zip(refs, preds))]
  items.append(Item("q", "vqa", "Is the lesion on the left or right?", "left", "Left and right."))
  rows = []
  m = scoring.score(items, light, n_boot=20, rows=rows)
  assert rows[-1]["verdict"] == "wrong" and "several options" in rows[-1]["reason"]
  rouge = [r["rouge_l"] for r in rows[:5]]
  assert np.mean(rouge) == pytest.approx(m["tasks"]["report"]["metrics"]["rouge_l"]["value"], abs=1e-6)
  assert rows[0]["rouge_l"] == 1.0 and rows[0]["bleu1"] == pytest.approx(1.0)
  floors = m["tasks"]["report"]["reference_rows"]
  assert floors["constant_text"] == "Normal chest."
  const = tasks.text_metrics(["Normal chest."] * 5, refs, light)
  assert floors["constant"]["rouge_l"] == pytest.approx(next(x.value() for x in const if x.name == "rouge_l"))
  assert tasks.shuffled(refs) != refs and sorted(tasks.shuffled(refs)) == sorted(refs)
  assert all(a != b for a, b in zip(tasks.shuffled(list("abcdef")), "abcdef"))  # a derangement
  trained = radbench.make_scorers(embedding_model="/nonexistent", meteor=False,
                                  train_reports={"report": ["No acute process."] * 3 + ["Normal chest."]})
  m2 = scoring.score(items[:5], trained, n_boot=0)
  assert m2["tasks"]["report"]["reference_rows"]["constant_text"] == "No acute process."
  assert m2["tasks"]["report"]["reference_rows"]["constant_source"] == "training split"


def test_plots_show_the_tables_numbers(tmp_path, light):
  items = [Item(f"r{i}", "report", "Report.", r, p) for i, (r, p) in enumerate(
      [("Normal chest.", "Normal chest."), ("Pneumonia.", "Pneumonia on the right."), ("Effusion.", "No effusion.")])]
  items += [Item("y", "vqa", "Is there an effusion?", "yes", "Yes."), Item("o", "vqa", "Where?", "left", "left")]
  m = scoring.score(items, light, n_boot=20)
  body = m["tasks"]["report"]
  narrow, wide = report._bar_rows(body, False), report._bar_rows(body, True)  # pylint: disable=protected-access
  assert [r[0] for r in wide] == ["cider"] and wide[0][1] == body["metrics"]["cider"]["value"]  # not /10
  assert {r[0]: r[1] for r in narrow}["rouge_l"] == body["metrics"]["rouge_l"]["value"]
  vqa = {r[0]: r[4] for r in report._bar_rows(m["tasks"]["vqa"], False)}  # pylint: disable=protected-access
  assert vqa["closed_accuracy"] == 1 and vqa["open_token_f1"] == 1  # each bar's own n, not the task's 2
  report.plot_task_scores(m, tmp_path / "t.png")
  assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_a_1mb_prediction_finishes_with_every_text_metric(tmp_path, light):
  import time
  huge = ("Right lower lobe consolidation, no effusion. " * 23000)[:1_000_000]
  items = [Item("big", "report", "Report.", "Right lower lobe consolidation.", huge),
           Item("ok", "report", "Report.", "Normal chest.", "Normal chest.")]
  t0 = time.monotonic()
  m = radbench.score_and_report(items, [], tmp_path / "out", light, n_boot=50)
  assert time.monotonic() - t0 < 60
  body = m["tasks"]["report"]
  assert body["truncated_predictions"] == 1 and {"rouge_l", "cider", "bleu4", "term_recall"} <= set(body["metrics"])
  assert "Predictions cut to the text metrics' word cap: report 1" in (tmp_path / "out" / "report.md").read_text()


def test_a_failing_scorer_is_unavailable_and_the_run_finishes(tmp_path, light, monkeypatch):
  def broken(preds, refs):
    raise MemoryError("out of memory in the scorer")
  monkeypatch.setattr(light, "terms", broken)
  m = radbench.score_and_report([Item("a", "report", "Report.", "Normal chest.", "Normal.")], [], tmp_path / "o",
                                light, n_boot=20)
  reasons = m["tasks"]["report"]["unavailable"]
  assert reasons["term_precision"] == reasons["term_recall"] == "failed: MemoryError: out of memory in the scorer"
  assert "rouge_l" in m["tasks"]["report"]["metrics"]
