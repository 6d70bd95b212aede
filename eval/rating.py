"""Human evaluation: blinded rating sheets for radiologists, and their ratings read back with CIs and
inter-rater agreement.

RadFM's authors had clinicians rate generated reports and rationales; `SCALE` is a 0-5 scale, our reading
of the paper's range (the paper's text was not available offline to re-check it); the anchor wording is
ours. It is one constant: change it there if your protocol differs.

Sheet (`write_sheet`): every open-ended answer (report, caption, interleaved, rationale and open VQA) of
every system becomes one rating row with a random id; rows are shuffled (seeded) so that a system's
answers are neither grouped nor in store order, and nothing in the sheet names a system. Outputs in
the sheet folder: `ratings.csv` (rating_id, task, question, reference, answer, score, comment) and
`index.html`, one self-contained page (inline CSS and JavaScript, images as data: URIs, nothing
fetched) with the scale, each case's thumbnails (middle slice of each image, when the store is
given), a 0-5 choice and a comment box per row, and a button that downloads the filled CSV. The key
(rating id -> system, item id) goes to a separate file that raters must not receive.

Ratings (`summarize`): filled CSVs (one per rater; the rater is the CSV's `rater` column, else the file
name) are joined with the key. Per system: mean score with a 95% percentile bootstrap CI over rated
rows (`eval.bootstrap`), the score distribution, and rows left blank. Agreement over rows rated by two
or more raters: quadratic-weighted Cohen's kappa for every rater pair (scikit-learn), their mean, and
the fraction of pairs that agree exactly / within one point.
"""
from __future__ import annotations

import base64
import collections
import csv
import html
import io
import itertools
import json
import pathlib
import re
import secrets
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from eval import bootstrap
from eval.metrics.base import mean_metric
from eval.tasks import Item

SCALE = {
    0: "Unusable: wrong modality / anatomy, hallucinated, or empty",
    1: "Mostly wrong: the main finding is missed or a false major finding is stated",
    2: "Partly right: some true findings, but clinically important errors or omissions",
    3: "Acceptable: the main finding is right; minor errors or omissions",
    4: "Good: clinically correct; small wording or completeness issues",
    5: "Excellent: as a radiologist would write it",
}
RATED_KINDS = ("report", "caption", "interleaved", "rationale", "vqa_open")
SHEET_COLUMNS = ("rating_id", "task", "question", "reference", "answer", "score", "comment")
THUMB = 160


def rows_to_rate(systems: dict[str, Sequence[Item]], *, seed: int = 0, tasks: Sequence[str] | None = None,
                 limit: int = 0) -> tuple[list[dict[str, Any]], dict[str, dict[str, str]]]:
  """(sheet rows in random order, key {rating_id: {system, item_id}}). `limit` cases per system."""
  rng = np.random.default_rng(seed)
  rows, key = [], {}
  for system, items in systems.items():
    chosen = [i for i in items if i.kind in RATED_KINDS and (not tasks or i.task in tasks)]
    if limit:
      chosen = chosen[:limit]
    for item in chosen:
      rid = secrets.token_hex(4)
      while rid in key:
        rid = secrets.token_hex(4)
      key[rid] = {"system": system, "item_id": item.id}
      rows.append({"rating_id": rid, "task": item.task, "question": item.question, "reference": item.answer,
                   "answer": item.prediction, "score": "", "comment": "", "_item": item})
  order = rng.permutation(len(rows))
  return [rows[i] for i in order], key


def thumbnail_png(volume: np.ndarray, size: int = THUMB) -> bytes:
  """PNG bytes of the middle depth slice of a [H, W, D, C] (or [H, W]) volume, scaled to `size`."""
  v = np.asarray(volume, np.float32)
  if v.ndim == 4:
    v = v[:, :, v.shape[2] // 2, :].mean(-1)  # middle slice, channels averaged
  elif v.ndim == 3:
    v = v[:, :, v.shape[2] // 2]
  lo, hi = np.percentile(v, [1, 99]) if v.size else (0.0, 1.0)
  img = np.clip((v - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
  pil = Image.fromarray((img * 255).astype(np.uint8), mode="L")
  pil.thumbnail((size, size))
  buf = io.BytesIO()
  pil.save(buf, format="PNG")
  return buf.getvalue()


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#222}
.case{border:1px solid #ccc;border-radius:6px;padding:.8em;margin:1em 0}.case h3{margin:.1em 0 .5em}
.text{white-space:pre-wrap;background:#f6f6f6;padding:.5em;border-radius:4px}.thumbs img{margin-right:6px}
table.scale td{padding:2px 8px}label{margin-right:1em}textarea{width:100%;height:3em}"""
_JS = """function csvCell(s){s=String(s);return /[",\\n\\r]/.test(s)?'"'+s.replace(/"/g,'""')+'"':s}
function download(){var cols=COLS,lines=[cols.join(',')];
document.querySelectorAll('.case').forEach(function(c){var d=JSON.parse(c.dataset.row);
var r=c.querySelector('input[type=radio]:checked');d.score=r?r.value:'';
d.comment=c.querySelector('textarea').value;lines.push(cols.map(function(k){return csvCell(d[k]||'')}).join(','))});
var rater=document.getElementById('rater').value;lines[0]+=',rater';for(var i=1;i<lines.length;i++)lines[i]+=','+csvCell(rater);
var a=document.createElement('a');a.href='data:text/csv;charset=utf-8,'+encodeURIComponent(lines.join('\\n'));
a.download='ratings_'+(rater||'rater')+'.csv';document.body.appendChild(a);a.click();a.remove()}"""


def render_html(rows: Sequence[dict[str, Any]], thumbs: Callable[[Item], list[bytes]] | None = None,
                title: str = "RadBench rating sheet") -> str:
  e = html.escape
  scale = "".join(f"<tr><td><b>{k}</b></td><td>{e(v)}</td></tr>" for k, v in SCALE.items())
  out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style>"
         f"<script>var COLS={json.dumps(list(SHEET_COLUMNS))};{_JS}</script></head><body>",
         f"<h1>{e(title)}</h1><p>Rate each answer against the image and the reference. The systems are hidden "
         f"and the cases are in random order. {len(rows)} answers.</p><table class='scale'>{scale}</table>",
         "<p>Your name or initials: <input id='rater' type='text'></p>"]
  for n, row in enumerate(rows, 1):
    data = {k: row[k] for k in SHEET_COLUMNS}
    imgs = ""
    if thumbs is not None:
      imgs = "".join(f"<img alt='image {j + 1}' src='data:image/png;base64,{base64.b64encode(p).decode()}'>"
                     for j, p in enumerate(thumbs(row["_item"])))
    radios = "".join(f"<label><input type='radio' name='s{e(row['rating_id'])}' value='{k}'> {k}</label>"
                     for k in SCALE)
    out.append(f"<div class='case' id='r{e(row['rating_id'])}' data-row='{e(json.dumps(data))}'>"
               f"<h3>{n}. {e(row['task'])} <small>[{e(row['rating_id'])}]</small></h3>"
               f"<div class='thumbs'>{imgs}</div><p><b>Question</b></p><div class='text'>{e(row['question'])}</div>"
               f"<p><b>Reference</b></p><div class='text'>{e(row['reference'])}</div>"
               f"<p><b>Answer to rate</b></p><div class='text'>{e(row['answer'])}</div>"
               f"<p>{radios}</p><textarea placeholder='comment (optional)'></textarea></div>")
  out.append("<p><button onclick='download()'>Download my ratings (CSV)</button></p></body></html>")
  return "\n".join(out)


def write_sheet(systems: dict[str, Sequence[Item]], out: str | pathlib.Path, key_path: str | pathlib.Path, *,
                seed: int = 0, tasks: Sequence[str] | None = None, limit: int = 0,
                thumbs: Callable[[Item], list[bytes]] | None = None) -> dict[str, Any]:
  """Writes OUT/ratings.csv, OUT/index.html and the key file; returns counts."""
  out, key_path = pathlib.Path(out), pathlib.Path(key_path)
  if key_path.resolve().is_relative_to(out.resolve()):
    raise ValueError(f"the key file {key_path} must not be inside the sheet folder {out} (raters get that folder)")
  rows, key = rows_to_rate(systems, seed=seed, tasks=tasks, limit=limit)
  if not rows:
    raise ValueError(f"nothing to rate: no open-ended answers ({', '.join(RATED_KINDS)}) in the predictions")
  out.mkdir(parents=True, exist_ok=True)
  with open(out / "ratings.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=list(SHEET_COLUMNS) + ["rater"], extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  (out / "index.html").write_text(render_html(rows, thumbs), encoding="utf-8")
  key_path.parent.mkdir(parents=True, exist_ok=True)
  key_path.write_text(json.dumps({"scale": SCALE, "seed": seed, "key": key}, indent=1), encoding="utf-8")
  return {"rows": len(rows), "systems": {s: sum(1 for k in key.values() if k["system"] == s) for s in systems}}


# --------------------------------------------------------------------------------------------- ratings
def read_ratings(paths: Sequence[str]) -> list[dict[str, Any]]:
  """[{rater, rating_id, score (int | None), comment}] from filled sheets; bad scores name file and line."""
  out = []
  for path in paths:
    text = pathlib.Path(path).read_bytes().decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not {"rating_id", "score"} <= set(reader.fieldnames or ()):
      raise ValueError(f"{path}:1: a filled rating sheet needs columns rating_id and score, got {reader.fieldnames}")
    for row in reader:
      raw = (row.get("score") or "").strip()
      score = None
      if raw:
        try:
          score = int(float(raw))
        except ValueError:
          score = -1
        if score not in SCALE or float(raw) != score:
          raise ValueError(f"{path}:{reader.line_num}: score {raw!r} is not one of {list(SCALE)}")
      out.append({"rater": (row.get("rater") or "").strip() or pathlib.Path(path).stem,
                  "rating_id": row["rating_id"].strip(), "score": score, "comment": row.get("comment") or ""})
  return out


def agreement(scores_by_rater: dict[str, dict[str, int]]) -> dict[str, Any]:
  """Quadratic-weighted Cohen's kappa per rater pair on their common items, exact / within-one agreement."""
  from sklearn.metrics import cohen_kappa_score  # pylint: disable=import-outside-toplevel  (sklearn loads slowly)
  pairs, exact, within = {}, [], []
  for a, b in itertools.combinations(sorted(scores_by_rater), 2):
    common = sorted(set(scores_by_rater[a]) & set(scores_by_rater[b]))
    if len(common) < 2:
      continue
    x = [scores_by_rater[a][i] for i in common]
    y = [scores_by_rater[b][i] for i in common]
    kappa = cohen_kappa_score(x, y, weights="quadratic", labels=list(SCALE))
    pairs[f"{a} vs {b}"] = {"n": len(common), "kappa_quadratic": None if np.isnan(kappa) else float(kappa)}
    exact += [u == v for u, v in zip(x, y)]
    within += [abs(u - v) <= 1 for u, v in zip(x, y)]
  kappas = [p["kappa_quadratic"] for p in pairs.values() if p["kappa_quadratic"] is not None]
  return {"pairs": pairs, "mean_kappa_quadratic": float(np.mean(kappas)) if kappas else None,
          "exact": float(np.mean(exact)) if exact else None, "within_one": float(np.mean(within)) if within else None,
          "n_pairs_compared": len(exact)}


def summarize(ratings: Sequence[dict[str, Any]], key: dict[str, dict[str, str]], *, n_boot: int = 1000,
              seed: int = 0) -> dict[str, Any]:
  unknown = sorted({r["rating_id"] for r in ratings} - set(key))
  if unknown:
    raise ValueError(f"rating ids not in the key file (a sheet from another run?): {unknown[:5]}")
  by_system: dict[str, list[int]] = collections.defaultdict(list)
  blank: dict[str, int] = collections.Counter()
  per_rater: dict[str, dict[str, int]] = collections.defaultdict(dict)
  for r in ratings:
    system = key[r["rating_id"]]["system"]
    if r["score"] is None:
      blank[system] += 1
      continue
    by_system[system].append(r["score"])
    per_rater[r["rater"]][r["rating_id"]] = r["score"]
  systems = {}
  for system in sorted(set(k["system"] for k in key.values())):
    scores = by_system.get(system, [])
    est = bootstrap.estimate([mean_metric("score", scores)], n_boot=n_boot, seed=seed)["score"] if scores else None
    systems[system] = {"n": len(scores), "blank": blank.get(system, 0),
                       "mean": est.value if est else None, "ci": [est.lo, est.hi] if est else [None, None],
                       "distribution": {str(k): scores.count(k) for k in SCALE}}
  return {"scale": SCALE, "raters": sorted(per_rater), "systems": systems, "agreement": agreement(per_rater),
          "bootstrap": {"replicates": n_boot, "seed": seed, "level": 0.95}}


def markdown(summary: dict[str, Any]) -> str:
  fmt = lambda x: "n/a" if x is None else f"{x:.2f}"
  lines = ["## Human ratings", "", f"Raters: {', '.join(summary['raters']) or 'none'}. Scale 0-5 "
           "(RadFM's range; anchors in eval/rating.py). Mean with 95% bootstrap CI over rated answers.", "",
           "| system | mean | 95% CI | rated | blank | " + " | ".join(str(k) for k in SCALE) + " |",
           "|---|---:|---|---:|---:|" + "---:|" * len(SCALE)]
  for name, s in summary["systems"].items():
    lines.append(f"| {name} | {fmt(s['mean'])} | [{fmt(s['ci'][0])}, {fmt(s['ci'][1])}] | {s['n']} | {s['blank']} | "
                 + " | ".join(str(s["distribution"][str(k)]) for k in SCALE) + " |")
  a = summary["agreement"]
  lines += ["", f"Inter-rater agreement ({a['n_pairs_compared']} double-rated pairs): mean quadratic-weighted "
            f"Cohen's kappa {fmt(a['mean_kappa_quadratic'])}, exact {fmt(a['exact'])}, within one point "
            f"{fmt(a['within_one'])}."]
  lines += [f"- {p}: kappa {fmt(v['kappa_quadratic'])} on {v['n']} answers" for p, v in a["pairs"].items()]
  return "\n".join(lines) + "\n"


_SECTION = re.compile(r"\n<!-- human-ratings -->.*?<!-- /human-ratings -->\n", re.DOTALL)


def put_section(report_md: str | pathlib.Path, md: str) -> None:
  """Adds the human-ratings section to a report.md, replacing the one a previous run added."""
  path = pathlib.Path(report_md)
  body = _SECTION.sub("\n", path.read_text(encoding="utf-8"))
  path.write_text(body.rstrip("\n") + f"\n\n<!-- human-ratings -->\n{md}<!-- /human-ratings -->\n", encoding="utf-8")
