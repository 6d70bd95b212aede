"""Markdown for plans and searches."""
from __future__ import annotations

import os
from typing import Any

GiB = 2**30


def _g(b) -> str:
  return "-" if b is None else f"{b / GiB:.1f}"


def _t(s) -> str:
  if s is None:
    return "-"
  return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


def _rate(x) -> str:
  if x is None:
    return "-"
  return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def _ratio(r: dict[str, Any]) -> str:
  x = r.get("xla_over_model")
  if not x:
    return "-"
  return f"{x:.2f}" + ("" if str(r.get("xla_flops_source", "")).startswith("cost_analysis") else " est.")


def plan_markdown(res: dict[str, Any], config_name: str = "") -> str:
  t = res["topology"]
  slices = f" x {t['num_slices']} slices" if t.get("num_slices", 1) > 1 else ""
  lines = [f"## {config_name} on {t['name']} ({t['libtpu'] or 'local devices'}{slices}): "
           f"{ {True: 'fits', False: 'DOES NOT FIT', None: 'not compiled'}[res['fits']] }",
           f"{t['chips']} chips ({t['device_kind']}, {_g(t['hbm_bytes'])} GiB HBM, "
           f"{t['peak_tflops'] or '?'} TFLOP/s each), {t['hosts']} hosts x {t['chips_per_host']} chips; "
           f"mesh {res['mesh']}, microbatches {res['microbatches']}, remat {res['remat']}; train state "
           f"{_g(res['state_bytes_per_chip'])} GiB per chip; compile {res['compile_seconds']:.0f} s", "",
           "| program | fits | GiB/chip (peak+args) | headroom | args | temp | code | compile | "
           "model TFLOP | XLA/model | step @peak | step @40% MFU | tokens/s | images/s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in res["programs"]:
    mem = r.get("memory", {})
    head = "-" if r.get("headroom") is None else f"{r['headroom']:.0%}"
    lines.append(
        f"| {r['name']} | { {True: 'yes', False: '**no**', None: '-'}[r.get('fits')] } | {_g(r.get('per_chip_bytes'))} | "
        f"{head} | {_g(mem.get('argument'))} | "
        f"{_g(mem.get('temp'))} | {_g(mem.get('generated_code'))} | {r.get('compile_seconds', 0):.0f} s | "
        f"{r['model_flops'] / 1e12:.1f} | {_ratio(r)} | {_t(r.get('step_s_at_peak'))} | "
        f"{_t(r.get('step_s_at_40_mfu'))} | {_rate(r.get('tokens_per_s_at_40_mfu'))} | "
        f"{_rate(r.get('images_per_s_at_40_mfu'))} |")
  for r in res["programs"]:
    if r.get("error"):
      lines.append(f"- {r['name']}: {r['error']}")
    elif r.get("largest_arrays") and r.get("per_chip_bytes"):
      arrays = [a for a in r["largest_arrays"][:3] if a["bytes"] >= 0.05 * r["per_chip_bytes"]]
      if not arrays:
        continue
      big = "; ".join(f"{a['bytes'] / GiB:.2f} GiB {a['shape']}" + (f" ({a['what']})" if a["what"] else "")
                      for a in arrays)
      lines.append(f"- {r['name']} largest arrays per chip: {big}")
  lines += [f"- note: {a}" for a in res.get("notes", [])]
  lines += [f"- advice: {a}" for a in res.get("advice", [])]
  return "\n".join(lines)


def search_markdown(res: dict[str, Any], config_name: str = "") -> str:
  t = res["topology"]
  lines = [f"## Search: {config_name} on {t['name']} ({t['chips']} chips, {_g(t['hbm_bytes'])} GiB HBM): "
           f"{len(res['fits'])} settings fit with >= {res['headroom_required']:.0%} headroom "
           f"({res['compiles']} compiles)", "",
           "| data x fsdp x tensor | microbatches | remat | GiB/chip | headroom | step @40% MFU | overrides |",
           "|---|---|---|---|---|---|---|"]
  for r in res["fits"]:
    lines.append(f"| {r['data']}x{r['fsdp']}x{r['tensor']} | {r['microbatches']} | {r['remat']} | "
                 f"{_g(r['per_chip_bytes'])} | {r['headroom']:.0%} | {_t(r['step_s_at_40_mfu'])} | "
                 f"`{r['overrides']}` |")
  rejected = [r for r in res["tried"] if not r["fits"]]
  if rejected:
    lines.append("")
  for r in rejected:
    why = r.get("error") or f"{_g(r.get('per_chip_bytes'))} GiB per chip, headroom < {res['headroom_required']:.0%}"
    lines.append(f"- rejected {r['data']}x{r['fsdp']}x{r['tensor']} mb={r['microbatches']} remat={r['remat']}: "
                 f"{why}")
  return "\n".join(lines)


def _days(d) -> str:
  return "-" if d is None else f"{d:.1f}" if d >= 1 else f"{d:.2f}"


def merge_plans(plans: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Plans of the same config, topology and setting merged program by program, compiled results
  winning over --nocompile ones (e.g. one run compiling the 2D bucket, one giving every bucket's times)."""
  merged: dict[tuple, dict[str, Any]] = {}
  for res in plans:
    m = res["mesh"]
    key = (res.get("config"), res["topology"]["name"], res["topology"].get("num_slices", 1), m["data"],
           m["fsdp"], m["tensor"], res["microbatches"], res["remat"])
    cur = merged.setdefault(key, {**res, "programs": []})
    by_name = {r["name"]: r for r in cur["programs"]}
    for r in res["programs"]:
      old = by_name.get(r["name"])
      if old is None or (old.get("fits") is None and r.get("fits") is not None):
        by_name[r["name"]] = r
    cur["programs"] = list(by_name.values())
    if res.get("epoch") and not (cur.get("epoch") or {}).get("days_at_40_mfu"):
      cur["epoch"] = res["epoch"]
    fits = [r.get("fits") for r in cur["programs"]]
    cur["fits"] = False if False in fits else None if None in fits else True
  return list(merged.values())


def scale_table(plans: list[dict[str, Any]]) -> str:
  """The README's scale table from plan.json files (merged by `merge_plans`): one row per config,
  topology and setting; the worst train program. fits: yes when every compiled train program leaves
  >= 10% of HBM free; a program not compiled leaves the row open unless the state alone overflows."""
  plans = merge_plans(plans)
  lines = ["| config | topology | chips (hosts) | fits (>= 10% free) | GiB/chip | mesh d x f x t, microbatches, "
           "remat | step @40% MFU (2D / 3D) | days / MedMD epoch |", "|---|---|---|---|---|---|---|---|"]
  for res in plans:
    t = res["topology"]
    train = [r for r in res["programs"] if r.get("kind") == "train"]
    compiled = [r for r in train if r.get("fits") is not None]
    worst = max((r["per_chip_bytes"] for r in compiled if r.get("per_chip_bytes")), default=None)
    state = f"state {_g(res.get('state_bytes_per_chip'))} GiB/chip"
    if any(r.get("fits") is False for r in train):
      fits = "**no**"
    elif not compiled:
      fits = f"not compiled ({state})"
    elif all((r.get("headroom") or 0) >= 0.10 for r in compiled):
      fits = "yes" + (f" ({', '.join(sorted(r['name'].split('/')[1].split('_')[0] for r in compiled))} compiled)"
                      if len(compiled) < len(train) else "")
    else:
      fits = f"tight ({min(r['headroom'] for r in compiled):.0%} free)"
    steps = {("3d" if r["bucket"]["group"] else "2d"): r.get("step_s_at_40_mfu") for r in train}
    m = res["mesh"]
    days = (res.get("epoch") or {}).get("days_at_40_mfu")
    lines.append(
        f"| {os.path.basename(str(res.get('config', '')))} | {t['name']} | {t['chips']} ({t['hosts']}) | {fits} | "
        f"{_g(worst)} | {m['data']}x{m['fsdp']}x{m['tensor']}, {res['microbatches']}, {res['remat']} | "
        f"{_t(steps.get('2d'))} / {_t(steps.get('3d'))} | {_days(days)} |")
  return "\n".join(lines)
