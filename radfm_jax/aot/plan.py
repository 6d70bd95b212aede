"""Compile programs for a topology and turn XLA's analyses into a memory / time plan.

Per program (all bytes per chip):
  arguments, outputs, aliased (donated state reused for the new state), temporaries, generated code,
  peak (`memory_analysis().peak_memory_in_bytes`), total = peak + arguments (what the TPU compiler
  checks against HBM; `temp_size_in_bytes` alone can exceed HBM while the program fits);
  fits = total <= HBM, headroom = 1 - total / HBM (the planner's search asks for >= 10%).
Time: model FLOPs are analytic (metrics.train_flops / forward_flops, the MFU convention); XLA FLOPs
come from `cost_analysis()` only with `flops=True`, from unrolled compiles at depth 1 and 2 of each
tower extrapolated linearly (cost_analysis counts a scanned layer body, and the microbatch scan,
once); otherwise they are estimated as model FLOPs x the remat recompute factor.
  step_s_at_peak   = XLA FLOPs / (chips x peak)         (the compute floor)
  step_s_at_40_mfu = model FLOPs / (0.4 x chips x peak) (what a run logging MFU 0.4 takes)
On RESOURCE_EXHAUSTED the compiler's memory report (libtpu's ERROR log of this process) is parsed into
the largest buffers, each described in model terms where its shape says what it is.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import time
from typing import Any

import ml_collections

from radfm_jax.aot import programs as programs_lib
from radfm_jax.aot import topology as topology_lib

MFU_TARGET = 0.4
# Extra forward passes recomputed in the backward pass, per remat policy (estimate without --flops).
REMAT_FACTOR = {"none": 1.0, "dots": 1.0 + 1.0 / 6.0, "full": 4.0 / 3.0}
GiB = 2**30


def compile_program(p: programs_lib.Program, hbm_bytes: int | None, *, cfg=None) -> dict[str, Any]:
  """Lowers and compiles one program; its memory analysis (or the OOM report) as a dict."""
  out: dict[str, Any] = {"name": p.name, "kind": p.kind, "bucket": dataclasses.asdict(p.bucket), **p.info}
  t0 = time.perf_counter()
  try:
    compiled = p.lower().compile()
  except Exception as e:  # pylint: disable=broad-except  (the plan records the failure and goes on)
    out["compile_seconds"] = round(time.perf_counter() - t0, 1)
    return {**out, **describe_failure(e, hbm_bytes, cfg)}
  out["compile_seconds"] = round(time.perf_counter() - t0, 1)
  ma = compiled.memory_analysis()
  mem = {k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "alias", "temp", "generated_code")}
  mem["peak"] = int(getattr(ma, "peak_memory_in_bytes", 0) or 0) or mem["temp"] + mem["output"]
  mem["total"] = mem["peak"] + mem["argument"]
  out["memory"] = mem
  out["per_chip_bytes"] = mem["total"]
  out["hbm_bytes"] = hbm_bytes
  out["fits"] = bool(hbm_bytes is None or mem["total"] <= hbm_bytes)
  out["headroom"] = None if not hbm_bytes else round(1.0 - mem["total"] / hbm_bytes, 4)
  cost = _cost(compiled)
  out["bytes_accessed_per_chip"] = cost.get("bytes accessed")
  out["xla_flops_per_chip_scanned"] = cost.get("flops")
  out["largest_arrays"] = largest_arrays(compiled.as_text() or "", cfg)
  return out


def _cost(compiled) -> dict[str, float]:
  try:
    c = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (some backends have none)
    return {}
  if isinstance(c, (list, tuple)):
    c = c[0] if c else {}
  return {k: float(v) for k, v in (c or {}).items() if k in ("flops", "bytes accessed")}


# ----------------------------------------------------------------------------------------------------
# Out of memory: the compiler's report in plain words.
# ----------------------------------------------------------------------------------------------------
_ROW = re.compile(r"^\s*[\d.]+[KMGT]?i?B\(\s*\d+%\);\s*([\d.]+)([KMGT]?i?B);\s*\d+;\s*(\d+);\s*(.+?)\s*$")
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "K": 2**10, "M": 2**20,
          "G": 2**30, "T": 2**40, "": 1}


def _bytes(num: str, unit: str) -> int:
  return int(float(num) * _UNITS.get(unit, 1))


def describe_failure(e: Exception, hbm_bytes: int | None, cfg=None, wait_s: float = 30.0) -> dict[str, Any]:
  """A failed compile as plan fields: out of memory (with the bytes needed and the top buffers read
  from libtpu's log of this process) or another error (its first line)."""
  text = str(e)
  if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
    return {"fits": False, "error": f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:500]}
  need = None
  m = re.search(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)", text) or re.search(
      r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm", text)
  if m:
    need = _bytes(m.group(1), m.group(2))
  buffers = _oom_buffers(wait_s)
  if need is None and buffers.get("total"):
    need = buffers["total"]
  top = [dict(b, what=describe_shape(b["shape"], cfg)) for b in buffers.get("top", [])]
  words = "; ".join(f"{b['bytes'] / GiB:.2f} GiB {b['shape']}" + (f" ({b['what']})" if b["what"] else "")
                    for b in top[:5])
  return {"fits": False, "oom": True, "per_chip_bytes": need, "hbm_bytes": hbm_bytes,
          "headroom": None if not (need and hbm_bytes) else round(1.0 - need / hbm_bytes, 4),
          "top_buffers": top,
          "error": (f"out of memory: needs {need / GiB:.1f} GiB per chip" if need else "out of memory")
                   + (f" of {hbm_bytes / GiB:.0f} GiB HBM" if hbm_bytes else "")
                   + (f"; largest buffers: {words}" if words else
                      " (the compiler's buffer report was not found in libtpu's log)")}


def _oom_buffers(wait_s: float) -> dict[str, Any]:
  """Largest buffers of the last 'Memory usage report' in libtpu's ERROR log of this process."""
  log_dir = os.environ.get("TPU_LOG_DIR", "/tmp/tpu_logs")
  deadline = time.time() + wait_s
  while True:
    files = sorted(glob.glob(os.path.join(log_dir, f"*ERROR*.{os.getpid()}")), key=os.path.getmtime)
    text = open(files[-1], errors="replace").read() if files else ""
    if "Memory usage report" in text or time.time() > deadline:
      break
    time.sleep(1.0)
  report = text[text.rfind("Memory usage report"):] if "Memory usage report" in text else ""
  report = report.split("Memory Space: vmem")[0]
  rows: dict[str, dict[str, Any]] = {}
  for line in report.splitlines():
    m = _ROW.match(line)
    if not m or m.group(4).startswith("("):  # tuples: 32-byte index tables
      continue
    shapes = [(_array_bytes(s), s) for s in (x.group(0) for x in _SHAPE.finditer(m.group(4)))]
    if not shapes:
      continue
    size, shape = _bytes(m.group(1), m.group(2)), max(shapes)[1]
    if size > rows.get(shape, {}).get("bytes", -1):
      rows[shape] = {"bytes": size, "shape": shape, "values": int(m.group(3)),
                     "shares_with": len(shapes) - 1}
  total = re.search(r"Total bytes: (\d+)", report)
  return {"total": int(total.group(1)) if total else None,
          "top": sorted(rows.values(), key=lambda r: -r["bytes"])[:8]}


# ----------------------------------------------------------------------------------------------------
# Large arrays of a compiled program (per chip, from the optimized HLO) and what they are.
# ----------------------------------------------------------------------------------------------------
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|bf16|f16|f32|f64)\[([\d,]+)\]")
_ITEM = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
         "f32": 4, "s64": 8, "f64": 8}


def _array_bytes(shape: str) -> int:
  m = _SHAPE.search(shape)
  size = _ITEM[m.group(1)]
  for d in m.group(2).split(","):
    size *= int(d) if d else 1
  return size


def largest_arrays(hlo: str, cfg=None, n: int = 5) -> list[dict[str, Any]]:
  """The n largest distinct array shapes defined in the per-chip optimized HLO (bytes, shape, what)."""
  seen: dict[str, int] = {}
  for line in hlo.splitlines():
    if " = " not in line:
      continue
    m = _SHAPE.search(line.split(" = ", 1)[1])
    if not m:
      continue
    seen[m.group(0)] = _array_bytes(m.group(0))
  top = sorted(seen.items(), key=lambda kv: -kv[1])[:n]
  return [{"bytes": b, "shape": s, "what": describe_shape(s, cfg)} for s, b in top]


def describe_shape(shape: str, cfg=None) -> str:
  """Plain words for a buffer shape when its dims give it away: logits [batch, seq, vocab], attention
  masks / scores [batch, (heads,) seq, seq], the KV cache, MLP activations, stacked layer weights."""
  if cfg is None:
    return ""
  m = _SHAPE.search(shape)
  if not m:
    return ""
  dims = [int(d) for d in m.group(2).split(",") if d]
  model = cfg.model
  vocab, lm = int(model.vocab_size), model.lm
  lens = {int(t) for t in (cfg.data.get("len_buckets") or ())} | {int(cfg.data.max_len), int(lm.max_len)}
  if dims and dims[-1] == vocab and len(dims) >= 3:
    return "logits [batch, seq, vocab]" + (" in f32" if m.group(1) == "f32" else "")
  if len(dims) >= 3 and dims[-1] == dims[-2] and dims[-1] in lens:
    return ("attention mask [batch, seq, seq]" if m.group(1) == "pred" or len(dims) == 3
            else "attention scores [batch, heads, seq, seq]")
  v = model.vision
  if len(dims) >= 3 and dims[0] == int(lm.layers):
    return ("LM MLP activations saved for the backward pass, all layers" if dims[-1] == int(lm.mlp)
            else "per-layer stack over the LM layers (weights, grads or saved activations)")
  if len(dims) >= 3 and dims[0] == int(v.depth):
    return ("ViT MLP activations saved for the backward pass, all layers" if dims[-1] == int(v.mlp_dim)
            else "per-layer stack over the ViT layers (saved activations)")
  if dims and dims[-1] == int(lm.mlp):
    return "LM MLP activations"
  if vocab in dims:
    return "embedding / unembedding weights or their gradient"
  return ""


# ----------------------------------------------------------------------------------------------------
# Time.
# ----------------------------------------------------------------------------------------------------
def timing(p: programs_lib.Program, topo: topology_lib.Topology, xla_flops: float | None,
           remat: str) -> dict[str, Any]:
  """Predicted step time at peak and at 40% MFU, and the throughput they imply."""
  peak = (topo.peak_tflops or 0.0) * 1e12 * topo.chips
  est = p.model_flops * (REMAT_FACTOR.get(remat, 1.0) if p.kind == "train" else 1.0)
  flops = xla_flops if xla_flops else est
  out = {"model_flops": p.model_flops, "xla_flops": flops,
         "xla_flops_source": "cost_analysis (unrolled, extrapolated)" if xla_flops else
                             f"estimate: model FLOPs x {REMAT_FACTOR.get(remat, 1.0) if p.kind == 'train' else 1.0:.3g} (remat {remat})",
         "xla_over_model": round(flops / p.model_flops, 3) if p.model_flops else None,
         "tokens_per_step": p.tokens, "images_per_step": p.images}
  if peak:
    out["step_s_at_peak"] = flops / peak
    out["step_s_at_40_mfu"] = p.model_flops / (MFU_TARGET * peak)
    out["tokens_per_s_at_40_mfu"] = p.tokens / out["step_s_at_40_mfu"]
    out["images_per_s_at_40_mfu"] = p.images / out["step_s_at_40_mfu"]
  return out


def _with_depths(cfg: ml_collections.ConfigDict, vision: int, resampler: int, lm: int
                 ) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(cfg.to_dict())
  c.model.vision.depth, c.model.resampler.depth, c.model.lm.layers = vision, resampler, lm
  c.model.scan_layers = False
  return c


def xla_flops(cfg: ml_collections.ConfigDict, mesh, program: programs_lib.Program) -> float | None:
  """XLA's FLOPs of the whole program (all chips): `cost_analysis` of unrolled compiles at depth 1
  and 2 of each tower, extrapolated linearly to the config's depths (4 small compiles), times the
  microbatch count (the accumulation scan's body is counted once)."""
  depths = (int(cfg.model.vision.depth), int(cfg.model.resampler.depth), int(cfg.model.lm.layers))

  def flops(v, r, l):
    c = _with_depths(cfg, v, r, l)
    (p,) = programs_lib.build(c, mesh, kinds=(program.kind,), buckets=[program.bucket],
                              max_new_tokens=int(program.info.get("max_new_tokens", 64)))
    f = _cost(p.lower().compile()).get("flops")
    if f is None:
      raise RuntimeError("cost_analysis() reported no flops")
    return f * mesh.size

  try:
    base = flops(1, 1, 1)
    per = [flops(2, 1, 1) - base, flops(1, 2, 1) - base, flops(1, 1, 2) - base]
  except Exception:  # pylint: disable=broad-except  (an estimate then; the plan says which)
    return None
  total = base + sum((d - 1) * x for d, x in zip(depths, per))
  return total * (int(cfg.get("microbatches", 1)) if program.kind == "train" else 1)
