r"""The pod-scale planner: compile a config's programs for a TPU topology from a CPU-only machine.

  JAX_PLATFORMS=cpu python -m radfm_jax.aot --config=configs/medmd_pretrain.py:1b --topology=v5p-8 \
      [--num_slices=2] [--out=DIR] [--programs=train,eval,generate] [--all_buckets] [--flops] \
      [--config.microbatches=8 ...]
  JAX_PLATFORMS=cpu python -m radfm_jax.aot --config=... --topology=v6e-16 --search [--max_compiles=12]

Prints a markdown table; --out writes DIR/plan.json (or DIR/search.json) and the markdown next to it.
Exit status: 0 every program fits (search: a setting fits), 2 something does not, 1 an error
(--nocompile: 0 unless the train state alone overflows HBM).
Topologies: gcloud names (v4-N, v5p-N count TensorCores, 2 per chip; v5e-N / v5litepod-N, v6e-N count
chips), libtpu strings (v5p:2x2x4), or "local" (this machine's devices, e.g. on a GPU host; GPU
programs cannot be compiled ahead of time without the GPU). See radfm_jax/aot/plan.py for what each
number means.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Sequence

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from radfm_jax.aot import planner
from radfm_jax.aot import report
from radfm_jax.training import data as train_data


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Training config file (any --config.key=value override).",
                                  lock_config=False)
  flags.DEFINE_string("topology", None, "v5p-128, v6e-64, v5litepod-16, v4-32, v5p:2x2x4, or local.")
  flags.DEFINE_integer("num_slices", 1, "Multislice: slices of --topology, data parallel over DCN.")
  flags.DEFINE_string("out", "", "Directory for plan.json / search.json and the markdown.")
  flags.DEFINE_list("programs", ["train", "eval", "generate"], "Programs to compile.")
  flags.DEFINE_bool("all_buckets", False, "Every batch shape the data can produce (default: the largest "
                    "of each batch size, which bounds the others).")
  flags.DEFINE_list("groups", [], "Only these image groups (0 = 2D, else a 3D depth bucket, e.g. 64); "
                    "default: all.")
  flags.DEFINE_bool("compile", True, "--nocompile: shapes, train-state bytes per chip and analytic times only.")
  flags.DEFINE_bool("flops", False, "XLA FLOPs from 4 extra unrolled small-depth compiles per program.")
  flags.DEFINE_integer("max_new_tokens", 64, "Generation program: new tokens per row.")
  flags.DEFINE_bool("search", False, "Search mesh x microbatches x remat for settings that fit with >= 10% "
                    "headroom (train programs), best predicted step time first.")
  flags.DEFINE_integer("max_compiles", 12, "Search: at most this many candidate compiles.")
  flags.DEFINE_integer("want", 3, "Search: stop after this many settings fit.")
  flags.DEFINE_list("remats", ["none", "dots", "full"], "Search: remat policies to try.")
  flags.DEFINE_list("tensors", ["1", "2", "4", "8"], "Search: tensor-parallel sizes to try.")
  flags.DEFINE_string("cache_dir", "", "JAX persistent compilation cache directory (off when empty).")
  flags.DEFINE_list("table", [], "Print the README scale table from these plan.json files (no compile).")
  flags.DEFINE_float("epoch_samples", 16e6, "Samples in one epoch for the days estimate (MedMD: ~16M).")
  flags.DEFINE_float("epoch_3d_fraction", 0.2, "Fraction of the epoch's samples in 3D batches (MedMD mix: "
                     "the rp3d datasets, 20%).")


def _name(path: str) -> str:
  return os.path.basename(path or "config")


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  if f.table:
    plans = []
    for path in f.table:
      with open(path) as fh:
        plans.append(json.load(fh))
    print(report.scale_table(plans))
    return 0
  if f.config is None or not f.topology:
    raise app.UsageError("--config and --topology are required")
  if f.cache_dir:
    jax.config.update("jax_compilation_cache_dir", f.cache_dir)
  cfg_file = config_flags.get_config_filename(f["config"])
  cfg_name = _name(cfg_file)
  try:
    topo, devs = planner.setup(f.topology, f.config, f.num_slices)
    if f.search:
      res = planner.search(f.config, topo, devs, max_compiles=f.max_compiles, want=f.want,
                           remats=tuple(f.remats), tensors=tuple(int(t) for t in f.tensors))
      md, ok, stem = report.search_markdown(res, cfg_name), bool(res["fits"]), "search"
    else:
      buckets = None
      if f.groups:
        buckets = [b for b in train_data.buckets(f.config, largest_only=not f.all_buckets)
                   if str(b.group) in f.groups]
        if not buckets:
          raise ValueError(f"--groups={','.join(f.groups)} selects no bucket of the config")
      res = planner.plan(f.config, topo, devs, kinds=tuple(f.programs), all_buckets=f.all_buckets,
                         flops=f.flops, max_new_tokens=f.max_new_tokens, buckets=buckets, compile=f.compile)
      days = planner.epoch_days(f.config, topo, f.epoch_samples, f.epoch_3d_fraction)
      res["epoch"] = {"samples": f.epoch_samples, "fraction_3d": f.epoch_3d_fraction,
                      "days_at_40_mfu": days}
      md, ok, stem = report.plan_markdown(res, cfg_name), res["fits"] is not False, "plan"
      if days is not None:
        md += (f"\n- one epoch of {f.epoch_samples / 1e6:.0f}M samples ({f.epoch_3d_fraction:.0%} 3D) at 40% "
               f"MFU (analytic FLOPs), every batch at its group's largest bucket: {days:.1f} days")
  except (ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  res["config"] = cfg_file
  print(md)
  if f.out:
    os.makedirs(f.out, exist_ok=True)
    with open(os.path.join(f.out, f"{stem}.json"), "w") as fh:
      json.dump(res, fh, indent=1, default=str)
    with open(os.path.join(f.out, f"{stem}.md"), "w") as fh:
      fh.write(md + "\n")
  return 0 if ok else 2


def run() -> None:
  """Console entry point: CPU-only JAX unless planning for this machine's devices, flags, `main`."""
  # Compiling for a topology needs no accelerator: libtpu only compiles (set before JAX's backends start).
  if not any(a.startswith("--topology=local") for a in sys.argv):
    jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS") or "cpu")
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
