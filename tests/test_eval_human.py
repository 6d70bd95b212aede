"""Human evaluation: a blinded sheet (CSV + self-contained HTML, checked by parsing), ratings read back with
bootstrap CIs and inter-rater agreement, the CLI end to end with a store's thumbnails."""
import csv
import html.parser
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from eval import predictions, rating
from eval.tasks import Item
from radfm_jax.data import schema
from radfm_jax.data.store import StoreWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORTS = ["Normal chest.", "Right lower lobe pneumonia.", "Small left pleural effusion.", "Cardiomegaly."]


def _systems():
  a = [Item(f"c{i}", "report", "Write the report.", r, r) for i, r in enumerate(REPORTS)]
  b = [Item(f"c{i}", "report", "Write the report.", r, "No acute process.") for i, r in enumerate(REPORTS)]
  closed = Item("y", "vqa", "Is there an effusion?", "yes", "yes")  # closed: never rated
  return {"secret-model-A": a + [closed], "secret-model-B": b}


class _Page(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.cases, self.radios, self.imgs, self.external = [], [], [], []

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    if tag == "div" and a.get("class") == "case":
      self.cases.append(json.loads(a["data-row"]))
    if tag == "input" and a.get("type") == "radio":
      self.radios.append((a["name"], a["value"]))
    if tag == "img":
      self.imgs.append(a["src"])
    for k in ("src", "href"):
      if a.get(k) and not a[k].startswith("data:"):
        self.external.append(a[k])


def test_sheet_is_blinded_shuffled_and_self_contained(tmp_path):
  thumbs = lambda item: [rating.thumbnail_png(np.random.default_rng(0).random((40, 30, 5, 1)))]
  counts = rating.write_sheet(_systems(), tmp_path / "sheet", tmp_path / "key.json", seed=1, thumbs=thumbs)
  assert counts == {"rows": 8, "systems": {"secret-model-A": 4, "secret-model-B": 4}}
  page_text = (tmp_path / "sheet" / "index.html").read_text()
  csv_text = (tmp_path / "sheet" / "ratings.csv").read_text()
  for text in (page_text, csv_text):
    assert "secret-model" not in text  # hidden model identity
  page = _Page()
  page.feed(page_text)
  assert len(page.cases) == 8 and not page.external
  assert len(page.radios) == 8 * len(rating.SCALE) and {v for _, v in page.radios} == {"0", "1", "2", "3", "4", "5"}
  assert len(page.imgs) == 8 and all(s.startswith("data:image/png;base64,") for s in page.imgs)
  assert all(desc in page_text for desc in (v.replace("/", "/") for v in rating.SCALE.values()))
  key = json.loads((tmp_path / "key.json").read_text())["key"]
  order = [key[c["rating_id"]]["system"] for c in page.cases]
  assert order != sorted(order) and order != sorted(order, reverse=True)  # systems interleaved
  rows = list(csv.DictReader(open(tmp_path / "sheet" / "ratings.csv", newline="")))
  assert [r["rating_id"] for r in rows] == [c["rating_id"] for c in page.cases]
  assert all(r["score"] == "" for r in rows)
  evil = {"x": [Item("e", "report", "Q", "ref", "<script>alert(1)</script> & 'quotes'")]}
  rating.write_sheet(evil, tmp_path / "evil", tmp_path / "evil.key.json")
  evil_page = (tmp_path / "evil" / "index.html").read_text()
  assert "<script>alert(1)" not in evil_page and "&lt;script&gt;alert(1)" in evil_page
  with pytest.raises(ValueError, match="must not be inside the sheet folder"):
    rating.write_sheet(_systems(), tmp_path / "s2", tmp_path / "s2" / "key.json")


def test_thumbnail_is_the_middle_slice():
  vol = np.zeros((64, 48, 9, 1), np.float32)
  vol[:, :, 4] = np.linspace(0, 1, 48)[None, :, None]  # only the middle slice has a gradient
  from PIL import Image
  import io
  img = np.asarray(Image.open(io.BytesIO(rating.thumbnail_png(vol, size=32))))
  assert img.shape == (32, 24) and img[:, -1].mean() > 200 and img[:, 0].mean() < 30


def _fill(path, rows, scores, rater):
  with open(path, "w", newline="", encoding="utf-8-sig") as f:  # Excel's BOM
    w = csv.DictWriter(f, fieldnames=list(rows[0]) + (["rater"] if "rater" not in rows[0] else []))
    w.writeheader()
    for r, s in zip(rows, scores):
      w.writerow({**r, "score": s, "rater": rater})


def test_ratings_back_with_cis_and_agreement(tmp_path):
  rating.write_sheet(_systems(), tmp_path / "sheet", tmp_path / "key.json", seed=3)
  key = json.loads((tmp_path / "key.json").read_text())["key"]
  rows = list(csv.DictReader(open(tmp_path / "sheet" / "ratings.csv", newline="")))
  truth = [5 if key[r["rating_id"]]["system"] == "secret-model-A" else 1 for r in rows]
  _fill(tmp_path / "r1.csv", rows, truth, "ab")
  second = [min(5, t + (i % 2)) for i, t in enumerate(truth)]  # agrees within one point
  second[0] = ""  # one row left blank
  _fill(tmp_path / "r2.csv", rows, second, "cd")
  summary = rating.summarize(rating.read_ratings([tmp_path / "r1.csv", tmp_path / "r2.csv"]), key, n_boot=200)
  a, b = summary["systems"]["secret-model-A"], summary["systems"]["secret-model-B"]
  assert a["mean"] == pytest.approx(5.0) and a["ci"] == [5.0, 5.0]
  assert 1.0 <= b["mean"] <= 2.0 and b["ci"][0] <= b["mean"] <= b["ci"][1]
  assert a["n"] + b["n"] == 15 and a["blank"] + b["blank"] == 1
  agree = summary["agreement"]
  from sklearn.metrics import cohen_kappa_score
  both = [(t, s) for t, s in zip(truth, second) if s != ""]
  assert agree["mean_kappa_quadratic"] == pytest.approx(
      cohen_kappa_score([t for t, _ in both], [s for _, s in both], weights="quadratic", labels=list(range(6))))
  assert agree["within_one"] == 1.0 and agree["n_pairs_compared"] == 7
  md = rating.markdown(summary)
  assert "| secret-model-A | 5.00 | [5.00, 5.00] | 8 | 0 |" in md and "quadratic-weighted" in md
  bad = tmp_path / "bad.csv"
  bad.write_text("rating_id,score\nx,7\n")
  with pytest.raises(ValueError, match=r"bad.csv:2: score '7' is not one of"):
    rating.read_ratings([bad])


def _tiny_store(root):
  w = StoreWriter(str(root))
  rng = np.random.default_rng(0)
  for i, r in enumerate(REPORTS):
    w.write_volume(f"v{i}", rng.integers(0, 255, size=(24, 20, 3, 1)).astype(np.uint8), {"modality": "CT"})
    s = schema.Sample(id=f"c{i}", task="report", question="Write the report.", answer=r,
                      images=[schema.ImageRef(field="question", char=0)], split="test")
    w.add_record(s.to_record([f"v{i}"], {}))
  w.finish({})


def test_cli_sheet_with_store_then_ratings_into_the_report(tmp_path):
  _tiny_store(tmp_path / "store")
  systems = _systems()
  paths = []
  for name, items in systems.items():
    d = tmp_path / name
    predictions.write(items, d)
    paths.append(str(d / "predictions.jsonl"))
  run = lambda *a: subprocess.run([sys.executable, "-m", "eval.human", *a], cwd=ROOT, capture_output=True,
                                  text=True, timeout=300)
  proc = run(f"--predictions={','.join(paths)}", "--names=m1,m2", f"--store={tmp_path / 'store'}",
             f"--out={tmp_path / 'sheet'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  page = _Page()
  page.feed((tmp_path / "sheet" / "index.html").read_text())
  assert len(page.cases) == 8 and len(page.imgs) == 8  # one thumbnail per case, from the store
  assert (tmp_path / "sheet.key.json").exists() and not list((tmp_path / "sheet").glob("*key*"))
  rows = list(csv.DictReader(open(tmp_path / "sheet" / "ratings.csv", newline="")))
  _fill(tmp_path / "filled.csv", rows, [3] * len(rows), "ab")
  (tmp_path / "rb").mkdir()
  (tmp_path / "rb" / "report.md").write_text("# RadBench report\n")
  proc = run(f"--ratings={tmp_path / 'filled.csv'}", f"--key={tmp_path / 'sheet.key.json'}",
             f"--report={tmp_path / 'rb'}", "--n_boot=50")
  assert proc.returncode == 0, proc.stderr[-2000:]
  rating.put_section(tmp_path / "rb" / "report.md", "## Human ratings\nagain\n")  # a re-run replaces it
  md = (tmp_path / "rb" / "report.md").read_text()
  assert md.count("## Human ratings") == 1 and md.rstrip().endswith("again\n<!-- /human-ratings -->".rstrip())
  rating.put_section(tmp_path / "rb" / "report.md", rating.markdown(
      json.loads((tmp_path / "rb" / "human_ratings.json").read_text())))
  md = (tmp_path / "rb" / "report.md").read_text()
  assert md.startswith("# RadBench report") and md.count("## Human ratings") == 1 and "| m1 | 3.00 |" in md
  assert json.loads((tmp_path / "rb" / "human_ratings.json").read_text())["systems"]["m2"]["n"] == 4
  proc = run(f"--ratings={tmp_path / 'filled.csv'}", f"--out={tmp_path / 'x'}")
  assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1] == (
      "error: --ratings needs --key (the key file written with the sheet)")
