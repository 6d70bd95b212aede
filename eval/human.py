"""Human evaluation CLI: blinded rating sheets, then the ratings back into the report.

Write a sheet (one or more systems; names from --names or the file names; the key goes elsewhere):

  python -m eval.human --predictions=runs/rb/predictions.jsonl,runs/rb_text/predictions.jsonl \
      --names=radfm,text-only --store=runs/demo/store --out=sheet [--key=sheet.key.json] [--limit=50]

Raters open sheet/index.html in a browser (self-contained), score every answer 0-5 and download their
CSV (or fill sheet/ratings.csv in a spreadsheet). Read the filled sheets back:

  python -m eval.human --ratings=ratings_ab.csv,ratings_cd.csv --key=sheet.key.json --report=runs/rb

writes human_ratings.json and a "Human ratings" section in REPORT/report.md (replaced on a re-run), or
into --out when no --report is given. See eval/rating.py for the scale, blinding and statistics.
"""
from __future__ import annotations

import json
import pathlib
from typing import Sequence

from absl import app, flags

from eval import predictions, rating
from eval.tasks import Item
from radfm_jax.data.store import Store

_PREDICTIONS = flags.DEFINE_list("predictions", [], "Predictions files (.jsonl / .csv), one per system.")
_NAMES = flags.DEFINE_list("names", [], "System names (default: the predictions files' names).")
_STORE = flags.DEFINE_string("store", None, "Store root: adds image thumbnails to the sheet.")
_OUT = flags.DEFINE_string("out", None, "Sheet folder (sheet mode) or output folder (ratings mode).")
_KEY = flags.DEFINE_string("key", None, "Key file (default: OUT.key.json beside the sheet folder).")
_TASKS = flags.DEFINE_list("tasks", [], "Only these tasks (default: all open-ended ones).")
_LIMIT = flags.DEFINE_integer("limit", 0, "At most this many answers per system (0: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Order of the rows.")
_RATINGS = flags.DEFINE_list("ratings", [], "Filled rating CSVs (ratings mode).")
_REPORT = flags.DEFINE_string("report", None, "A RadBench --out folder whose report.md gets the ratings.")
_N_BOOT = flags.DEFINE_integer("n_boot", 1000, "Bootstrap replicates.")


def store_thumbnails(store_root: str):
  store = Store.open(store_root)
  records = {str(r.get("id")): r for r in store.records()}

  def thumbs(item: Item) -> list[bytes]:
    rec = records.get(item.id)
    if not rec:
      return []
    return [rating.thumbnail_png(store.read_volume(im["key"])) for im in rec.get("images", [])[:3]]
  return thumbs


def sheet_mode() -> None:
  names = _NAMES.value or [pathlib.Path(p).stem for p in _PREDICTIONS.value]
  if len(names) != len(_PREDICTIONS.value) or len(set(names)) != len(names):
    raise ValueError(f"--names {names} must name each of the {len(_PREDICTIONS.value)} predictions files once")
  systems = {}
  for name, path in zip(names, _PREDICTIONS.value):
    items, errors = predictions.read(path)
    for e in errors:
      print(f"skipped {e.source}:{e.row}: {e.reason}")
    systems[name] = items
  out = pathlib.Path(_OUT.value)
  key = pathlib.Path(_KEY.value or f"{out}.key.json")
  thumbs = store_thumbnails(_STORE.value) if _STORE.value else None
  counts = rating.write_sheet(systems, out, key, seed=_SEED.value, tasks=_TASKS.value or None,
                              limit=_LIMIT.value, thumbs=thumbs)
  print(f"sheet: {out / 'index.html'} and {out / 'ratings.csv'} ({counts['rows']} answers, {counts['systems']})")
  print(f"key: {key} (keep it away from the raters)")


def ratings_mode() -> None:
  if not _KEY.value:
    raise ValueError("--ratings needs --key (the key file written with the sheet)")
  key = json.loads(pathlib.Path(_KEY.value).read_text(encoding="utf-8"))["key"]
  summary = rating.summarize(rating.read_ratings(_RATINGS.value), key, n_boot=_N_BOOT.value, seed=_SEED.value)
  target = pathlib.Path(_REPORT.value or _OUT.value)
  target.mkdir(parents=True, exist_ok=True)
  (target / "human_ratings.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
  md = rating.markdown(summary)
  report = target / "report.md"
  if _REPORT.value and report.exists():
    rating.put_section(report, md)
  else:
    (target / "human_ratings.md").write_text(md, encoding="utf-8")
  print(md)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if bool(_PREDICTIONS.value) == bool(_RATINGS.value):
    raise app.UsageError("give --predictions (write a sheet) or --ratings (read filled sheets)")
  if _PREDICTIONS.value and not _OUT.value:
    raise app.UsageError("--predictions needs --out (the sheet folder)")
  if _RATINGS.value and not (_REPORT.value or _OUT.value):
    raise app.UsageError("--ratings needs --report or --out")
  try:
    sheet_mode() if _PREDICTIONS.value else ratings_mode()
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
