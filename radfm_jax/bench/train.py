r"""Training throughput: the jitted step alone (MFU against a matmul probe of the same run) and, with
--trainer, the real trainer (Grain pipeline, metrics) once per Grain worker count.

  python -m radfm_jax.bench.train --config=configs/bench_cpu.py [--steps=8] [--trainer --workers=0,1]

Step alone: the train step of `radfm_jax.training.step` (sharded, donated state) on one pipeline-shaped synthetic
batch (one image block, answer tokens in the last quarter of each row): compiled, one warm-up step (timed
apart: on CPU the first run after compiling is 2-3x slower), then the median of --steps timed steps.
MFU = analytic model FLOPs (radfm_jax.training.metrics.train_flops) / step time / peak; on CPU the peak is a
bf16-in / f32-accumulate matmul probe (the model's precision) measured before and after the steps (their
mean; both printed: the machine may be shared), on TPU/GPU the chip table.
Trainer: --steps steps in a temporary workdir; the table holds the steady-state medians of the logged
figures (the first step, which compiles, is reported separately).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Sequence

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from radfm_jax import sharding
from radfm_jax.training import loop
from radfm_jax.training import metrics
from radfm_jax.training import state as train_state
from radfm_jax.training import step as train_step

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_cpu.py", "Training config to measure.")
_STEPS = flags.DEFINE_integer("steps", 8, "Timed steps (after compilation).")
_TRAINER = flags.DEFINE_bool("trainer", False, "Also run the real trainer (Grain pipeline) per worker count.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1"], "Grain worker processes to compare (--trainer).")

COLUMNS = (("step_time", "step s", "{:.3f}"), ("text_tokens_per_s", "text tok/s", "{:.0f}"),
           ("images_per_s", "images/s", "{:.1f}"), ("model_tflops_per_s", "model TFLOP/s", "{:.3f}"),
           ("mfu", "MFU", "{:.1%}"), ("input_wait_fraction", "input wait", "{:.1%}"))


def synthetic_batch(cfg, seed: int = 0) -> dict[str, np.ndarray]:
  """A global batch shaped like the pipeline's (cfg.data sizes): bos, one image block, question text,
  answer (loss) in the last quarter, then eos; gray images in [0, 1]."""
  m, d = cfg.model, cfg.data
  rng = np.random.default_rng(seed)
  b, t = d.batch_size, d.len_buckets[-1]
  v, tpi = m.vocab_size, m.tokens_per_image
  block = [v] + [v + 2 + j for j in range(tpi)] + [v + 1]
  inputs = rng.integers(3, v, (b, t)).astype(np.int32)
  inputs[:, 0] = 1
  inputs[:, 1:1 + len(block)] = block
  inputs[:, -1] = 2
  loss_mask = np.zeros((b, t), bool)
  loss_mask[:, t - t // 4 - 1:t - 1] = True
  targets = np.concatenate([inputs[:, 1:], np.zeros((b, 1), np.int32)], 1)
  hh, ww = d.image_hw_3d
  images = rng.random((b, 1, hh, ww, d.depth_buckets[-1], 1), np.float32)
  return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask,
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
          "segment_ids": np.ones((b, t), np.int32), "images": images, "image_mask": np.ones((b, 1), bool)}


def measure_step(cfg, steps: int) -> dict[str, float]:
  """Step time, model FLOP/s and MFU of the jitted train step on a synthetic batch."""
  mesh = sharding.make_mesh(cfg.mesh)
  layout = train_state.make_layout(cfg, mesh)
  state = train_state.init_state(cfg, layout)
  host = synthetic_batch(cfg)
  batch = train_step.to_global(host, mesh)
  step = train_step.jit_step(train_step.make_train_step(layout, cfg), layout, batch)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):  # traced as the trainer traces it (activation constraints on)
    state, m = step(state, batch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  # The first run after compiling is 2-3x slower on CPU (buffers first touched, kernels set up): timed
  # alone as "warm-up", not averaged in.
  t0 = time.perf_counter()
  state, m = step(state, batch)
  jax.block_until_ready(m)
  warmup_s = time.perf_counter() - t0
  probe_dtype = cfg.model.dtype
  peak0, src = metrics.peak_flops(probe_dtype)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  peak1, _ = metrics.peak_flops(probe_dtype)
  towers = train_state.trainable_towers(state["params"])
  flops = metrics.train_flops(cfg.model, batch=host["inputs"].shape[0], seq_len=host["inputs"].shape[1],
                              image_shape=tuple(host["images"].shape[1:5]), trainable=towers)
  peak = (peak0 + peak1) / 2
  return {"compile_s": compile_s, "warmup_s": warmup_s, "step_s": step_s, "tflops": flops / step_s / 1e12,
          "peak0": peak0, "peak1": peak1, "mfu": flops / step_s / peak if peak else 0.0, "peak_src": src,
          "loss": float(m["loss"])}


def measure_trainer(cfg, steps: int, workers: int) -> dict[str, float]:
  """Median of the logged steady-state figures of one short run of the real trainer."""
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
  m = cfg.model
  n_params = sum(x.size for x in jax.tree.leaves(train_state.make_layout(
      cfg, sharding.make_mesh(cfg.mesh)).abstract["params"]))
  head = (f"{m.vision.dim}-dim x {m.vision.depth} ViT / {m.lm.hidden}-dim {m.lm.layers}-layer LM "
          f"({n_params / 1e6:.1f}M trainable params), {m.dtype} compute, global batch "
          f"{cfg.data.batch_size} x {cfg.data.len_buckets[-1]} tokens")
  r = measure_step(cfg, _STEPS.value)
  print(f"\nradfm_jax.bench.train (step alone, {_STEPS.value} steps): {head}")
  print(f"peak: {r['peak_src']}; probe before {r['peak0'] / 1e9:.0f}, after {r['peak1'] / 1e9:.0f} GFLOP/s\n")
  print("| compile s | warm-up step s | step s (median) | model TFLOP/s | MFU (vs same-run probe) | loss |")
  print("|---|---|---|---|---|---|")
  print(f"| {r['compile_s']:.1f} | {r['warmup_s']:.2f} | {r['step_s']:.3f} | {r['tflops']:.3f} | {r['mfu']:.1%} | "
        f"{r['loss']:.3f} |")
  if _TRAINER.value:
    rows = [(int(w), measure_trainer(cfg, max(_STEPS.value, 12), int(w))) for w in _WORKERS.value]
    print(f"\nradfm_jax.bench.train (trainer with Grain input): {head}\n")
    print("| Grain workers | first step (compile) s | " + " | ".join(h for _, h, _ in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for w, t in rows:
      print(f"| {w} | {t['compile_time']:.1f} | " + " | ".join(f.format(t[k]) for k, _, f in COLUMNS) + " |")


if __name__ == "__main__":
  app.run(main)
