r"""LoRA vs full fine-tuning on the demo data: accuracy on new question types, trainable parameters, step time.

  python -m radfm_jax.bench.lora [--config=configs/demo.py] [--pretrain_steps=300] [--finetune_steps=150]

1. Pre-train the demo model from scratch on the open samples and HALF of the closed question templates
   (group A: every other template of radfm_jax.data.demo.CLOSED).
2. From that model, fine-tune on the closed samples of the OTHER half (group B) only, twice: full
   fine-tuning (every parameter) and LoRA (rank --rank on the LM's q/k/v/o/gate/up/down, everything else
   frozen), same steps, batch and data order; learning rates --full_lr / --lora_lr.
3. Score closed questions exactly (every answer token is the argmax, as the trainer's validation) on the
   val + test splits, per group: B = the new types, A = the pre-training types (forgetting).
Prints a markdown table: accuracy on B and A, trainable parameters, median step time (compile excluded).

Rows come from the demo store through the pipeline's evaluation path (one example per row; the demo
config gives every row the same shape) and training batches are drawn from them with a seeded RNG.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from radfm_jax import checkpoint, sharding
from radfm_jax.data import demo as demo_lib
from radfm_jax.models import lora
from radfm_jax.training import data as train_data
from radfm_jax.training import metrics
from radfm_jax.training import state as train_state
from radfm_jax.training import step as train_step

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Demo training config.")
_PRE = flags.DEFINE_integer("pretrain_steps", 300, "Pre-training steps (groups A + open).")
_FT = flags.DEFINE_integer("finetune_steps", 150, "Fine-tuning steps (group B) for each method.")
_RANK = flags.DEFINE_integer("rank", 8, "LoRA rank.")
_FULL_LR = flags.DEFINE_float("full_lr", 3e-4, "Full fine-tuning peak learning rate.")
_LORA_LR = flags.DEFINE_float("lora_lr", 3e-3, "LoRA peak learning rate.")

GROUP_A, GROUP_B = demo_lib.CLOSED[0::2], demo_lib.CLOSED[1::2]


def rows(data: train_data.TrainData, split: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """All rows of a split (one example each): (arrays, subtask per row, closed per row)."""
  records = data.eval_records(split)
  parts, sub, closed = [], [], []
  for b in data.eval_batches(split):
    keep = b["example_mask"]
    first = b["record_index"][:, 0]
    parts.append({k: v[keep] for k, v in b.items() if k in train_step.DEVICE_KEYS})
    for i in np.flatnonzero(keep):
      meta = records[first[i, 0]][first[i, 1]].get("meta", {})
      sub.append(meta.get("subtask", ""))
      closed.append(bool(meta.get("closed")))
  shapes = {tuple((k, v.shape[1:]) for k, v in sorted(p.items())) for p in parts}
  if len(shapes) != 1:
    raise ValueError(f"{split}: rows of several shapes {shapes}; use a config with one batch shape")
  out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  return out, np.asarray(sub), np.asarray(closed)


def train(cfg, pool: dict[str, np.ndarray], steps: int, mesh, seed: int):
  """`steps` optimizer steps on batches drawn from `pool`; returns (state, layout, step times)."""
  layout = train_state.make_layout(cfg, mesh)
  state = train_state.init_state(cfg, layout)
  rng = np.random.default_rng(seed)
  n, bsz = len(pool["inputs"]), int(cfg.data.batch_size)
  times = []
  with jax.set_mesh(mesh):
    step = None
    for i in range(steps):
      idx = rng.choice(n, bsz, replace=n < bsz)
      batch = train_step.to_global({k: v[idx] for k, v in pool.items()}, mesh)
      if step is None:
        step = train_step.jit_step(train_step.make_train_step(layout, cfg), layout, batch)
      t0 = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
  return state, layout, times


def exact(cfg, layout, state, pool: dict[str, np.ndarray], mesh) -> np.ndarray:
  """Per row: the answer is reproduced exactly by argmax (closed-question accuracy)."""
  bsz = int(cfg.data.batch_size)
  n = len(pool["inputs"])
  out = []
  with jax.set_mesh(mesh):
    f = jax.jit(lambda s, b: train_step.example_scores(layout, cfg, s, b)["exact"])
    for lo in range(0, n, bsz):
      idx = np.arange(lo, lo + bsz) % n
      out.append(np.asarray(f(state, train_step.to_global({k: v[idx] for k, v in pool.items()}, mesh))))
  return np.concatenate(out)[:n]


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  cfg = _CONFIG.value.copy_and_resolve_references()
  mesh = sharding.make_mesh(cfg.mesh)
  data = train_data.TrainData(cfg)
  tr, tr_sub, tr_closed = rows(data, cfg.data.train_split)
  ev_parts = [rows(data, s) for s in ("val", "test")]
  ev = {k: np.concatenate([p[0][k] for p in ev_parts]) for k in ev_parts[0][0]}
  ev_sub = np.concatenate([p[1] for p in ev_parts])
  pre_rows = (~tr_closed) | np.isin(tr_sub, GROUP_A)
  ft_rows = tr_closed & np.isin(tr_sub, GROUP_B)
  take = lambda pool, m: {k: v[m] for k, v in pool.items()}
  groups = {"B": np.isin(ev_sub, GROUP_B), "A": np.isin(ev_sub, GROUP_A)}
  print(f"rows: pre-train {pre_rows.sum()} (open + A), fine-tune {ft_rows.sum()} (B), eval closed "
        f"B {groups['B'].sum()} / A {groups['A'].sum()} (val + test)")

  def score(c, layout, state):
    ok = exact(c, layout, state, ev, mesh)
    return {g: float(ok[m].mean()) for g, m in groups.items()}

  base_cfg = ml_collections.ConfigDict(cfg.to_dict())
  base_cfg.optim.warmup_steps = min(int(base_cfg.optim.warmup_steps), _PRE.value // 10)
  base_cfg.total_steps = _PRE.value
  state, layout, _ = train(base_cfg, take(tr, pre_rows), _PRE.value, mesh, seed=1)
  results = {"pre-trained (A + open)": (score(base_cfg, layout, state), None, None)}
  with tempfile.TemporaryDirectory() as tmp:
    base_dir = checkpoint.save_model(os.path.join(tmp, "base"),
                                     train_state.merge_params(state["params"], state["frozen"]), base_cfg)
    for name, rank, lr in (("full fine-tuning", 0, _FULL_LR.value),
                           (f"LoRA rank {_RANK.value}", _RANK.value, _LORA_LR.value)):
      c = ml_collections.ConfigDict(base_cfg.to_dict())
      c.init_from, c.total_steps = base_dir, _FT.value
      c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = lr, max(_FT.value // 10, 1), 0.0
      c.lora = lora.default_config()
      c.lora.rank, c.lora.alpha = rank, 2.0 * rank
      st, lay, times = train(c, take(tr, ft_rows), _FT.value, mesh, seed=2)
      results[name] = (score(c, lay, st), metrics.count_params(st["params"]),
                       statistics.median(times[1:]) if len(times) > 1 else times[0])
  print(f"\nradfm_jax.bench.lora: demo model ({cfg.model.lm.layers}-layer LM, hidden {cfg.model.lm.hidden}), "
        f"batch {cfg.data.batch_size}, pre-train {_PRE.value} steps, fine-tune {_FT.value} steps, "
        f"{jax.device_count()} {jax.devices()[0].platform} devices\n")
  print("| model | closed acc. new types (B) | closed acc. pre-training types (A) | trainable params | step s |")
  print("|---|---|---|---|---|")
  for name, (acc, n, t) in results.items():
    print(f"| {name} | {acc['B']:.1%} | {acc['A']:.1%} | {'-' if n is None else f'{n:,}'} | "
          f"{'-' if t is None else f'{t:.3f}'} |")


if __name__ == "__main__":
  app.run(main)
