r"""Training throughput on this machine: step time, tokens/s, images/s, MFU and the input-wait fraction.

  python -m radfm_jax.bench.train [--config=configs/demo.py] [--steps=60] [--workers=0,1]

Runs the real trainer (`radfm_jax.training.loop.train_and_evaluate`: Grain pipeline, jitted sharded step,
metrics) for --steps steps in a temporary workdir once per Grain worker count, and prints a markdown table
of the steady-state figures (the first step, which compiles, is reported separately). MFU is against the
peak in the log line: a matmul probe of the compute dtype on CPU, the chip table on TPU/GPU.
"""
from __future__ import annotations

import os
import statistics
import tempfile
from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from radfm_jax.training import loop, metrics

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Training config to measure.")
_STEPS = flags.DEFINE_integer("steps", 60, "Steps per measurement (the first compiles).")
_WORKERS = flags.DEFINE_list("workers", ["0", "1"], "Grain worker processes to compare.")

COLUMNS = (("step_time", "step s", "{:.3f}"), ("text_tokens_per_s", "text tok/s", "{:.0f}"),
           ("images_per_s", "images/s", "{:.1f}"), ("model_tflops_per_s", "model TFLOP/s", "{:.3f}"),
           ("mfu", "MFU", "{:.1%}"), ("input_wait_fraction", "input wait", "{:.1%}"))


def measure(cfg, steps: int, workers: int) -> dict[str, float]:
  """Median of the logged steady-state figures of one short run."""
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.total_steps = steps
    cfg.log_every = max(steps // 6, 1)
    cfg.checkpoint_every = 10 * steps
    cfg.eval_every = 0
    cfg.data.eval_split = ""
    cfg.data.workers = workers
  with tempfile.TemporaryDirectory() as workdir:
    loop.train_and_evaluate(cfg, workdir)
    records = [r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
  steady = [r for r in records if "step_time" in r][1:] or [r for r in records if "step_time" in r]
  out = {k: statistics.median(r[k] for r in steady) for k, _, _ in COLUMNS}
  out["compile_time"] = next(r["compile_time"] for r in records if "compile_time" in r)
  return out


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  cfg = _CONFIG.value
  rows = [(int(w), measure(cfg, _STEPS.value, int(w))) for w in _WORKERS.value]
  b = cfg.data.batch_size
  print(f"\nradfm_jax.bench.train: {cfg.model.vision.dim}-dim ViT / {cfg.model.lm.hidden}-dim "
        f"{cfg.model.lm.layers}-layer LM, {cfg.model.dtype} compute, global batch {b}, {_STEPS.value} steps\n")
  print("| Grain workers | first step (compile) s | " + " | ".join(h for _, h, _ in COLUMNS) + " |")
  print("|---|---|" + "---|" * len(COLUMNS))
  for w, r in rows:
    print(f"| {w} | {r['compile_time']:.1f} | " + " | ".join(f.format(r[k]) for k, _, f in COLUMNS) + " |")


if __name__ == "__main__":
  app.run(main)
