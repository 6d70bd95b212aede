"""End to end: scoring a RadFM-format CSV with the CLI, our JSONL round trip, bad input."""
import csv
import json
import os
import subprocess
import sys

import pytest

from eval import predictions, radbench, report
from eval.tasks import Item

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMG = "<image>" + "".join(f"<image{i}>" for i in range(32)) + "</image>"


def _cell(text):
  return repr([text])  # RadFM writes batch-1 python lists


RADFM_ROWS = [
    # modality (3D): 3 of 4 right -> accuracy 0.75
    ("What modality is this" + IMG + "?", "CT", "This is a CT scan.", "radiomodality_dataset"),
    ("What modality is this" + IMG + "?", "MRI", "MR, T1 weighted", "radiomodality_dataset"),
    ("What modality is this" + IMG + "?", "X-ray", "computed tomography", "radiomodality_dataset"),
    ("Is this a CT scan" + IMG + "?", "yes", "Yes.", "radiomodality_dataset"),
    # binary diagnosis: 2 of 3 right, F1 (positive yes): tp=1 fp=0 fn=1 -> 2/3
    ("Does the image show pneumonia" + IMG + "?", "yes", "yes", "chestxray_dataset_bn"),
    ("Does the image show effusion" + IMG + "?", "yes", "no", "chestxray_dataset_bn"),
    ("Does the image show edema" + IMG + "?", "no", "No.", "chestxray_dataset_bn"),
    # open VQA: token F1 1.0 and 0.0
    ("Where is the lesion" + IMG + "?", "left lung", "The left lung.", "vqarad_dataset"),
    ("Which organ is abnormal" + IMG + "?", "liver", "spleen", "slake_dataset"),
    # reports
    ("Write a report" + IMG + ".", "Findings: The lungs are clear. No pleural effusion. Impression: Normal chest.",
     "Findings: The lungs are clear. No pleural effusion or pneumothorax. Impression: No acute process.",
     "chestxray_caption_dataset"),
    ("Write a report" + IMG + ".", "Findings: Right lower lobe consolidation. Impression: Pneumonia.",
     "Findings: Right lower lobe opacity. Impression: Pneumonia.", "chestxray_caption_dataset"),
    ("Describe" + IMG, "Large hepatic mass with central necrosis.", "Hepatic mass.", "radiocaption_dataset"),
    # an upstream source name that maps to no task: recorded and skipped
    ("?", "x", "y", "mystery_dataset"),
]


def _write_radfm_csv(path):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["Question", "Ground Truth", "Pred", "belong_to"])
    for q, gt, pred, src in RADFM_ROWS:
      w.writerow([_cell(q), _cell(gt), _cell(pred), _cell(src)])


def test_read_radfm_csv(tmp_path):
  path = tmp_path / "radfm.csv"
  _write_radfm_csv(path)
  items, errors = predictions.read(str(path))
  assert len(items) == len(RADFM_ROWS) - 1
  assert [(e.row, "mystery_dataset" in e.reason) for e in errors] == [(len(RADFM_ROWS) + 1, True)]  # file line
  first = items[0]
  assert (first.task, first.answer, first.prediction, first.source) == (
      "modality", "CT", "This is a CT scan.", "radiomodality_dataset")
  assert first.meta["dim"] == "3D" and first.kind == "modality"
  assert [i.kind for i in items[4:9]] == ["diagnosis_binary"] * 3 + ["vqa_open"] * 2
  forced, errors = predictions.read(str(path), task="report")
  assert len(forced) == len(RADFM_ROWS) and not errors
  assert predictions.unwrap_cell("['a', 'b']") == "a b"
  assert predictions.unwrap_cell("[not a list") == "[not a list"


def test_cli_scores_radfm_csv_end_to_end(tmp_path):
  src, out = tmp_path / "radfm.csv", tmp_path / "out"
  _write_radfm_csv(src)
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "eval.radbench", f"--predictions={src}", f"--out={out}",
                         "--n_boot=200"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "modality     accuracy               0.750" in proc.stdout
  for name in ("predictions.jsonl", "predictions.csv", "metrics.json", "report.md", "task_scores.png",
               "breakdown.png", "modality_confusion.png"):
    assert (out / name).stat().st_size > 0, name
  for png in out.glob("*.png"):
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  m = json.loads((out / "metrics.json").read_text())
  t = m["tasks"]
  assert t["modality"]["metrics"]["accuracy"]["value"] == pytest.approx(0.75)
  assert t["diagnosis"]["metrics"]["binary_accuracy"]["value"] == pytest.approx(2 / 3)
  assert t["diagnosis"]["metrics"]["binary_f1"]["value"] == pytest.approx(2 / 3)
  assert t["vqa"]["metrics"]["open_token_f1"]["value"] == pytest.approx(0.5)
  rep = t["report"]["metrics"]
  assert set(rep) >= {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider", "meteor", "semantic",
                      "term_precision", "term_recall"}
  assert "ratescore" in t["report"]["unavailable"] and "ratescore" not in rep
  for est in [e for body in t.values() for e in body["metrics"].values()]:
    assert est["ci"][0] <= est["value"] <= est["ci"][1]
  assert t["modality"]["breakdown"]["dim"]["3D"]["n"] == 4
  assert t["report"]["breakdown"]["dim"]["3D"]["n"] == 1 and t["report"]["breakdown"]["dim"]["2D"]["n"] == 2
  assert t["modality"]["confusion"]["labels"] == ["CT", "MR", "X-ray"]
  assert "sacrebleu" in t["report"]["signatures"]["bleu4"] and "13a" in t["report"]["signatures"]["bleu4"]
  assert m["libraries"]["sacrebleu"] == "2.6.0"
  assert len(m["skipped"]) == 1 and m["bootstrap"]["replicates"] == 200
  md = (out / "report.md").read_text()
  acc = t["modality"]["metrics"]["accuracy"]
  assert f"| modality | **accuracy** | 0.750 | {report.fmt_ci(acc['ci'])} | 4 |" in md
  assert f"{rep['rouge_l']['value']:.3f}" in md and f"{rep['cider']['value']:.3f}" in md
  assert "![Modality confusion](modality_confusion.png)" in md and "ratescore" in md
  # METEOR: the library's corpus score; the per-segment mean under its own name.
  assert "corpus score" in t["report"]["signatures"]["meteor"]
  assert rep["meteor"]["value"] != pytest.approx(rep["meteor_segment_mean"]["value"])
  # Floors next to every report score.
  floors = t["report"]["reference_rows"]
  assert set(floors["constant"]) >= {"rouge_l", "bleu4", "meteor", "cider"} and floors["constant_source"] == "references"
  assert "| constant report | shuffled references |" in md
  with open(out / "predictions.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(RADFM_ROWS) - 1
  assert [r["verdict"] for r in rows[:4]] == ["correct", "correct", "wrong", "correct"]
  assert rows[2]["reason"].startswith("chooses 'CT'")
  report_rows = [r for r in rows if r["task"] == "report"]
  assert all(r["rouge_l"] and r["meteor"] and r["verdict"] == "" for r in report_rows)
  assert sum(float(r["rouge_l"]) for r in report_rows) / 3 == pytest.approx(rep["rouge_l"]["value"], abs=1e-5)


@pytest.fixture(scope="module")
def light_scorers():
  """No JVM and no embedding model: the in-process tests check plumbing, not those metrics."""
  scorers = radbench.make_scorers(embedding_model="/nonexistent", meteor=False)
  yield scorers
  scorers.close()


def test_jsonl_round_trip_and_baseline_column(tmp_path, light_scorers):
  items = [Item("a", "vqa", "Is there effusion?", "yes", "yes", {"dim": "2D", "modality": "CT"}, "demo"),
           Item("b", "vqa", "Is there effusion?", "no", "yes", {"dim": "3D", "modality": "MRI"}, "demo"),
           Item("c", "rationale", "Diagnose.", "Findings suggest appendicitis.", "Appendicitis with fat stranding.",
                {"diagnosis": "Appendicitis", "dim": "3D"}, "demo")]
  base = radbench.score_and_report(items[:2], [], tmp_path / "base", light_scorers, n_boot=50)
  m = radbench.score_and_report(items, [], tmp_path / "run", light_scorers, n_boot=50, baseline=base,
                                baseline_label="text-only")
  back, errors = predictions.read(str(tmp_path / "run" / "predictions.jsonl"))
  assert not errors and [b.to_json() for b in back] == [i.to_json() for i in items]
  back_csv, _ = predictions.read(str(tmp_path / "run" / "predictions.csv"))
  assert [b.meta for b in back_csv] == [i.meta for i in items]
  assert m["tasks"]["vqa"]["metrics"]["closed_accuracy"]["value"] == pytest.approx(0.5)
  assert m["tasks"]["vqa"]["breakdown"]["modality"]["MR"]["metrics"]["closed_accuracy"]["value"] == 0.0
  assert m["tasks"]["rationale"]["metrics"]["diagnosis_accuracy"]["value"] == 1.0
  assert "java" not in m["tasks"]["rationale"]["unavailable"]["meteor"]  # disabled, said so
  assert "/nonexistent" in m["tasks"]["rationale"]["unavailable"]["semantic"]
  md = (tmp_path / "run" / "report.md").read_text()
  assert "| text-only |" in md and "| vqa | **closed_accuracy** | 0.500 |" in md


def test_bad_input_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.csv"):
    predictions.read(str(tmp_path / "missing.csv"))
  bad = tmp_path / "bad.csv"
  bad.write_text("foo,bar\n1,2\n")
  with pytest.raises(predictions.PredictionsError, match=r"bad.csv:1: columns \['foo', 'bar'\]"):
    predictions.read(str(bad))
  rows = tmp_path / "rows.jsonl"
  rows.write_text('{"id": "1", "task": "vqa", "answer": "yes", "prediction": "no"}\n'
                  '{"id": "2", "task": "surgery", "answer": "a", "prediction": "b"}\n'
                  'not json\n{"id": "4", "task": "report", "answer": "a"}\n')
  items, errors = predictions.read(str(rows))
  assert [i.id for i in items] == ["1"]
  assert [(e.row, k in e.reason) for e, k in zip(errors, ("surgery", "invalid JSON", "prediction"))] == [
      (2, True), (3, True), (4, True)]  # 1-based file lines
