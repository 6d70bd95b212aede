"""report.md and its PNG plots (matplotlib, Agg) from a metrics.json body (`eval.scoring.score`).

Plots: `task_scores.png` (every headline metric per task with its 95% CI), `breakdown.png` (each
scoring kind's primary metric per 2D / 3D and CT / MR / X-ray group), `modality_confusion.png`.
An optional baseline metrics.json (e.g. a text-only model) adds a column to the headline table.
"""
from __future__ import annotations

import pathlib
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position

from radfm_jax import paths  # noqa: E402  pylint: disable=wrong-import-position
from eval.scoring import headline_rows  # noqa: E402  pylint: disable=wrong-import-position
from eval.tasks import KINDS  # noqa: E402  pylint: disable=wrong-import-position

_GROUP_ORDER = ("2D", "3D", "CT", "MR", "X-ray", "other")


def fmt(x: float | None) -> str:
  return "n/a" if x is None else f"{x:.3f}"


def fmt_ci(ci: list) -> str:
  return "n/a" if ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


# ------------------------------------------------------------------------------------------------ plots
_WIDE = ("cider",)  # metrics on a 0-10 scale: plotted in their own panel, never rescaled


def _bar_rows(body: dict[str, Any], wide: bool) -> list[tuple[str, float, float, float, int]]:
  rows = []
  for name, est in body["metrics"].items():
    if est["value"] is None or name.endswith(_WIDE) != wide:
      continue
    v = est["value"]
    lo = est["ci"][0] if est["ci"][0] is not None else v
    hi = est["ci"][1] if est["ci"][1] is not None else v
    rows.append((name, v, lo, hi, est["n"]))
  return rows[::-1]


def plot_task_scores(metrics: dict[str, Any], path: pathlib.Path) -> None:
  """One panel per task (and one per task for 0-10 metrics such as CIDEr); each bar is labelled with
  the value and n printed in the headline table."""
  panels = []
  for task, body in metrics["tasks"].items():
    for wide in (False, True):
      rows = _bar_rows(body, wide)
      if rows:
        panels.append((task, wide, rows))
  heights = [len(p[2]) for p in panels]
  fig, axes = plt.subplots(len(panels), 1, figsize=(8, 0.32 * sum(heights) + 0.9 * len(panels)),
                           gridspec_kw={"height_ratios": heights}, squeeze=False)
  for ax, (task, wide, rows) in zip(axes[:, 0], panels):
    names = [r[0] for r in rows]
    vals, lo, hi = (np.array([r[i] for r in rows]) for i in (1, 2, 3))
    y = np.arange(len(names))
    ax.barh(y, vals, color="#DD8452" if wide else "#4C72B0", alpha=0.85)
    ax.errorbar(vals, y, xerr=[vals - lo, hi - vals], fmt="none", ecolor="black", capsize=3, lw=1)
    top = max(1.0, float(hi.max())) * 1.25 if wide else 1.25
    for yi, v, h, r in zip(y, vals, hi, rows):
      ax.text(h + 0.01 * top, yi, f"{fmt(v)}  n={r[4]}", va="center", fontsize=7)
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlim(0, top)
    kinds = ", ".join(f"{k} n={n}" for k, n in metrics["tasks"][task].get("kinds", {}).items())
    ax.set_title(f"{task}{' (0-10 scale)' if wide else ''}: items by scoring kind: {kinds}", fontsize=9, loc="left")
    ax.grid(axis="x", alpha=0.3)
  axes[-1, 0].set_xlabel("score with 95% bootstrap CI (values as in the tables)")
  fig.tight_layout()
  with path.open("wb") as f:  # local or remote (gs://)
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)


def breakdown_series(metrics: dict[str, Any]) -> dict[str, dict[str, dict]]:
  """{'task:primary metric': {group: estimate}} over the dim and modality breakdowns."""
  series = {}
  for kind in KINDS.values():
    body = metrics["tasks"].get(kind.task)
    if not body or kind.primary not in body["metrics"]:
      continue
    groups = {}
    for bname in ("dim", "modality"):
      for group, entry in body["breakdown"][bname].items():
        if kind.primary in entry["metrics"]:
          groups[group] = entry["metrics"][kind.primary]
    series[f"{kind.task}: {kind.primary}"] = groups
  return series


def plot_breakdown(metrics: dict[str, Any], path: pathlib.Path) -> bool:
  series = breakdown_series(metrics)
  if not series:
    return False
  groups = [g for g in _GROUP_ORDER if any(g in s for s in series.values())]
  fig, ax = plt.subplots(figsize=(min(14, max(7, 1.8 * len(series))), 4.2))
  width = 0.8 / max(1, len(groups))
  x = np.arange(len(series))
  for gi, group in enumerate(groups):
    vals, err_lo, err_hi = [], [], []
    for s in series.values():
      est = s.get(group)
      v = est["value"] if est and est["value"] is not None else np.nan
      vals.append(v)
      err_lo.append(v - est["ci"][0] if est and est["ci"][0] is not None else 0)
      err_hi.append(est["ci"][1] - v if est and est["ci"][1] is not None else 0)
    bars = ax.bar(x + gi * width - 0.4 + width / 2, vals, width, label=group,
                  yerr=[err_lo, err_hi], capsize=2, error_kw={"lw": 0.8})
    for b, v in zip(bars, vals):
      if np.isfinite(v):
        ax.text(b.get_x() + b.get_width() / 2, 0.01, fmt(v), ha="center", va="bottom", fontsize=6, rotation=90)
  ax.set_xticks(x, list(series), rotation=20, ha="right", fontsize=8)
  ax.set_ylabel("score (95% CI)")
  ax.set_title("Primary metric per dimensionality and modality group", fontsize=10)
  ax.legend(fontsize=8, ncols=min(6, len(groups)), loc="upper center", bbox_to_anchor=(0.5, -0.28))
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  with path.open("wb") as f:  # local or remote (gs://)
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)
  return True


def plot_confusion(conf: dict[str, Any], path: pathlib.Path) -> None:
  labels, m = conf["labels"], np.asarray(conf["matrix"])
  fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 0.8 * len(labels)), max(4.0, 1.2 + 0.7 * len(labels))))
  im = ax.imshow(m, cmap="Blues")
  ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
  ax.set_yticks(range(len(labels)), labels, fontsize=8)
  ax.set_xlabel("predicted modality")
  ax.set_ylabel("reference modality")
  ax.set_title("Modality confusion (open questions)", fontsize=10)
  thresh = m.max() / 2 if m.size else 0
  for i in range(m.shape[0]):
    for j in range(m.shape[1]):
      ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8,
              color="white" if m[i, j] > thresh else "black")
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  fig.tight_layout()
  with path.open("wb") as f:  # local or remote (gs://)
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)


# ------------------------------------------------------------------------------------------- markdown
def _headline_table(metrics: dict[str, Any], baseline: dict[str, Any] | None, label: str) -> list[str]:
  floors = any(b.get("reference_rows") for b in metrics["tasks"].values())
  base_col = f" {label} |" if baseline else ""
  floor_cols = " constant report | shuffled references |" if floors else ""
  lines = [f"| task | metric | value | 95% CI | n |{floor_cols}{base_col}",
           "|---|---|---:|---|---:|" + ("---:|---:|" if floors else "") + ("---:|" if baseline else "")]
  for r in headline_rows(metrics):
    name = f"**{r['metric']}**" if r["primary"] else r["metric"]
    row = f"| {r['task']} | {name} | {fmt(r['value'])} | {fmt_ci([r['lo'], r['hi']])} | {r['n']} |"
    if floors:
      ref = metrics["tasks"][r["task"]].get("reference_rows") or {}
      row += "".join(f" {fmt(ref.get(k, {}).get(r['metric']))} |" for k in ("constant", "shuffled"))
    if baseline:
      b = baseline.get("tasks", {}).get(r["task"], {}).get("metrics", {}).get(r["metric"])
      row += f" {fmt(b['value']) if b else 'n/a'} |"
    lines.append(row)
  return lines


def _floor_notes(metrics: dict[str, Any]) -> list[str]:
  lines = []
  for task, body in metrics["tasks"].items():
    ref = body.get("reference_rows")
    if ref:
      text = ref["constant_text"]
      lines.append(f"- {task}: constant report = the most frequent report of the {ref['constant_source']} "
                   f"(\"{_cell(text[:160])}{'...' if len(text) > 160 else ''}\"); shuffled references = "
                   "each row scored against another row's reference (seeded).")
  if lines:
    lines = ["Reference rows: a model should beat both floors; a score below them carries no information "
             "about the image.", ""] + lines + [""]
  return lines


def _verdict_table(metrics: dict[str, Any]) -> list[str]:
  rows = [(t, b["verdicts"]) for t, b in metrics["tasks"].items() if b.get("verdicts")]
  if not rows:
    return []
  lines = ["## Closed answers: the judge's verdicts", "",
           "Hedges and contradictions are wrong; an answer naming no option is *unanswered* and scored wrong. "
           "Each row's verdict and reason is in predictions.csv.", "",
           "| task | correct | wrong | unanswered |", "|---|---:|---:|---:|"]
  lines += [f"| {t} | {v.get('correct', 0)} | {v.get('wrong', 0)} | {v.get('unanswered', 0)} |" for t, v in rows]
  return lines + [""]


def _cell(text: str) -> str:
  return str(text).replace("|", "\\|")


def breakdown_columns(body: dict[str, Any]) -> list[str]:
  """The metrics shown per group: the `columns` of the task's scoring kinds that were computed."""
  names = []
  for kind in body.get("kinds", {}):
    for name in KINDS[kind].columns or (KINDS[kind].primary,):
      if name in body["metrics"] and name not in names:
        names.append(name)
  return names


def _breakdown_tables(metrics: dict[str, Any]) -> list[str]:
  lines = []
  for task, body in metrics["tasks"].items():
    names = breakdown_columns(body)
    if not names:
      continue
    lines += [f"### {task}", "", "| group | n | " + " | ".join(names) + " |",
              "|---|---:|" + "---:|" * len(names)]
    for bname in ("dim", "modality", "source"):
      for group, entry in body["breakdown"][bname].items():
        n, ests = entry["n"], entry["metrics"]
        cells = []
        for name in names:
          e = ests.get(name)
          cells.append("n/a" if not e or e["value"] is None else
                       f"{e['value']:.3f} {fmt_ci(e['ci'])}")
        lines.append(f"| {bname}: {group} | {n} | " + " | ".join(cells) + " |")
    lines.append("")
  return lines


def write(metrics: dict[str, Any], out_dir: str | pathlib.Path, *, title: str = "RadBench report",
          source: str = "", errors: int = 0, baseline: dict[str, Any] | None = None,
          baseline_label: str = "baseline") -> pathlib.Path:
  """Writes report.md and its PNGs into out_dir; returns the report path."""
  out = paths.path(out_dir)  # local or remote (gs://)
  out.mkdir(parents=True, exist_ok=True)
  boot = metrics["bootstrap"]
  md = [f"# {title}", ""]
  if source:
    md.append(f"Scored: `{source}`  ")
  md += [f"Items scored: {metrics['n_items']}; rows skipped with errors: {errors}.  ",
         f"Intervals: {boot['level']:.0%} {boot['method']} bootstrap, {boot['replicates']} replicates, "
         f"seed {boot['seed']}. Bold: each scoring kind's primary metric.", "",
         "## Headline numbers", ""]
  md += _headline_table(metrics, baseline, baseline_label)
  md.append("")
  md += _floor_notes(metrics)
  md += _verdict_table(metrics)
  dups = metrics.get("duplicates") or []
  if dups:
    md += [f"Duplicated rows: {len(dups)} groups ({sum(d['count'] for d in dups)} rows), scored as given; "
           "ids in metrics.json `duplicates`.", ""]
  cut = {t: b["truncated_predictions"] for t, b in metrics["tasks"].items() if b.get("truncated_predictions")}
  if cut:
    md += ["Predictions cut to the text metrics' word cap: " + ", ".join(f"{t} {n}" for t, n in cut.items()), ""]
  if any(b["metrics"] for b in metrics["tasks"].values()):
    plot_task_scores(metrics, out / "task_scores.png")
    md += ["![Per-task scores with 95% CIs](task_scores.png)", ""]
  md += ["## Breakdown by dimensionality, modality and source", "",
         "Each cell: value [95% CI]. Groups are subsets of the same per-sample scores.", ""]
  if plot_breakdown(metrics, out / "breakdown.png"):
    md += ["![Primary metric per group](breakdown.png)", ""]
  md += _breakdown_tables(metrics)
  conf = metrics["tasks"].get("modality", {}).get("confusion")
  if conf:
    plot_confusion(conf, out / "modality_confusion.png")
    md += ["## Modality confusion matrix", "", "![Modality confusion](modality_confusion.png)", "",
           "| reference \\ predicted | " + " | ".join(conf["labels"]) + " |",
           "|---|" + "---:|" * len(conf["labels"])]
    md += [f"| {lab} | " + " | ".join(str(v) for v in row) + " |" for lab, row in zip(conf["labels"], conf["matrix"])]
    md.append("")
  per_label = metrics["tasks"].get("diagnosis", {}).get("per_label")
  if per_label:
    md += ["## Multi-label diagnosis per label", "", "| label | precision | recall | F1 | support |",
           "|---|---:|---:|---:|---:|"]
    md += [f"| {lab} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
           for lab, v in per_label.items()]
    md.append("")
  unavailable = [(t, n, r) for t, b in metrics["tasks"].items() for n, r in b["unavailable"].items()]
  if unavailable:
    md += ["## Unavailable metrics (not computed; not zero)", "", "| task | metric | reason |", "|---|---|---|"]
    md += [f"| {t} | {n} | {_cell(r)} |" for t, n, r in unavailable]
    md.append("")
  sigs = {}
  for body in metrics["tasks"].values():
    for name, sig in body["signatures"].items():
      sigs.setdefault(name, sig)
  md += ["## Metric signatures", "", "| metric | signature |", "|---|---|"]
  md += [f"| {n} | {_cell(s)} |" for n, s in sigs.items()]
  md += ["", "Libraries: " + ", ".join(f"{k} {v}" for k, v in metrics["libraries"].items()), ""]
  path = out / "report.md"
  path.write_text("\n".join(md), encoding="utf-8")
  return path
