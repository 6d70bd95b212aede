r"""`make demo`: build the phantom dataset, train a small RadFM on CPU, and show that it reads the images.

  python -m radfm_jax.demo --workdir=runs/demo [--config=configs/demo.py] [--radbench=false]

1. Train configs/demo.py (builds the demo store and tokenizer when missing; resumes or skips a finished
   run in the same workdir).
2. Closed questions whose answer is only in the image (schema meta `image_dependent`), on the val and
   test splits, scored by teacher-forced exact match (= greedy decoding reproduces the answer):
     model                 the trained model
     model, no image       the same model with its image tokens zeroed (image_mask off)
     text-only prior       the most frequent training answer to the same question text: the best any
                           model that does not look at the image can do on this balanced data
     chance                1 / number of choices, averaged
   and the validation loss per answer token, per closed-question template.
3. RadBench: the exported model generates answers for the test split (`radfm_jax.inference.split`,
   in this process), written as predictions files and scored by the RadBench CLI (`python -m
   eval.radbench --predictions=...`, a subprocess: the library never imports eval/) next to the
   text-only prior as a baseline; report in WORKDIR/radbench/report.md.
Numbers go to WORKDIR/demo_results.json as well.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from radfm_jax import sharding
from radfm_jax.data import store as store_lib
from radfm_jax.inference import split as split_lib
from radfm_jax.training import data as train_data
from radfm_jax.training import export as export_lib
from radfm_jax.training import loop
from radfm_jax.training import state as train_state
from radfm_jax.training import step as train_step



# ----------------------------------------------------------------------------------------------------
# Teacher-forced closed-question comparison.
# ----------------------------------------------------------------------------------------------------
def _norm(s: str) -> str:
  return " ".join(s.lower().strip().rstrip(".").split())


def text_prior(train_records: Sequence[dict]) -> Any:
  """`predict(record) -> answer`: the most frequent training answer to the same question text (ties:
  alphabetical), falling back to the most frequent answer of the same template, then overall."""
  by_q, by_t, overall = (collections.defaultdict(collections.Counter),
                         collections.defaultdict(collections.Counter), collections.Counter())
  for r in train_records:
    by_q[r["question"]][r["answer"]] += 1
    by_t[r.get("meta", {}).get("subtask")][r["answer"]] += 1
    overall[r["answer"]] += 1

  def top(c: collections.Counter) -> str:
    return sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]

  def predict(record: dict) -> str:
    for c in (by_q.get(record["question"]), by_t.get(record.get("meta", {}).get("subtask"))):
      if c:
        return top(c)
    return top(overall)

  return predict


def compare(cfg, data: train_data.TrainData, layout: train_state.Layout, state, split: str,
            prior) -> dict[str, Any]:
  """Model / model without image / text-only prior / chance on a split's closed image-dependent
  questions, overall and per template, plus the answer-token loss."""
  score = jax.jit(lambda s, b: train_step.example_scores(layout, cfg, s, b),
                  out_shardings=sharding.replicated(layout.mesh))
  records = data.eval_records(split)
  rows = []
  nll = tokens = 0.0
  for hb in data.eval_batches(split):
    batch = train_step.to_global(hb, layout.mesh)
    with_img = jax.device_get(score(state, batch))
    no_img = jax.device_get(score(state, dict(batch, image_mask=jax.numpy.zeros_like(batch["image_mask"]))))
    real = hb["example_mask"]
    nll += float(with_img["nll"][real].sum())
    tokens += float(with_img["tokens"][real].sum())
    for i in np.flatnonzero(real & hb["closed"] & hb["image_dependent"]):
      d, r = hb["record_index"][i, 0]
      rec = records[d][r]
      meta = rec.get("meta", {})
      rows.append({"subtask": meta.get("subtask", rec["task"]), "model": bool(with_img["exact"][i]),
                   "no_image": bool(no_img["exact"][i]),
                   "prior": _norm(prior(rec)) == _norm(rec["answer"]),
                   "chance": 1.0 / max(len(meta.get("choices") or []), 1)})

  def summarize(rs):
    return {k: float(np.mean([r[k] for r in rs])) for k in ("model", "no_image", "prior", "chance")} | {
        "n": len(rs)}

  per = collections.defaultdict(list)
  for r in rows:
    per[r["subtask"]].append(r)
  return {"loss": nll / max(tokens, 1.0), "closed_image_dependent": summarize(rows),
          "per_template": {k: summarize(v) for k, v in sorted(per.items())}}


def _table(res: dict[str, Any], split: str) -> str:
  o = res["closed_image_dependent"]
  lines = [f"{split}: answer-token loss {res['loss']:.3f}; closed image-dependent questions (n={o['n']}), "
           "exact-match accuracy:",
           f"  {'':22s} {'model':>7s} {'no image':>9s} {'text prior':>11s} {'chance':>7s} {'n':>4s}"]
  for name, r in [("ALL", o)] + list(res["per_template"].items()):
    lines.append(f"  {name:22s} {r['model']:7.1%} {r['no_image']:9.1%} {r['prior']:11.1%} "
                 f"{r['chance']:7.1%} {r['n']:4d}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# RadBench.
# ----------------------------------------------------------------------------------------------------
def radbench(cfg, workdir: str, prior, max_new_tokens: int) -> dict[str, Any]:
  """Exports the params, generates on the test split, scores the model and the text-only prior."""
  export = export_lib.export(workdir, os.path.join(workdir, "export"), overwrite=True)
  model, model_cfg, mesh = split_lib.load(export)
  store = store_lib.Store.open(cfg.data.store)
  records = split_lib.split_records(store, "test")
  outputs, errors, _ = split_lib.predict_records(model, model_cfg, records, store, mesh=mesh, batch_size=32,
                                                 max_new_tokens=max_new_tokens)
  for e in errors:
    logging.warning("RadBench: skipped %s row %s: %s", e.source, e.row, e.reason)
  out = os.path.join(workdir, "radbench")
  os.makedirs(out, exist_ok=True)
  model_file, prior_file = os.path.join(workdir, "predictions_model.jsonl"), os.path.join(workdir, "predictions_prior.jsonl")
  _write_predictions(model_file, records, lambda i, r: outputs[i], keep=outputs)
  _write_predictions(prior_file, records, lambda i, r: prior(r), keep=outputs)
  base_dir = os.path.join(out, "text_prior")
  _radbench_cli(f"--predictions={prior_file}", f"--out={base_dir}",
                "--title=RadBench: text-only prior on the demo test split")
  lines = _radbench_cli(f"--predictions={model_file}", f"--out={out}", f"--baseline={base_dir}/metrics.json",
                        "--baseline_label=text-only prior", "--title=RadBench: demo model on the demo test split")
  return {"report": os.path.join(out, "report.md"), "metrics": os.path.join(out, "metrics.json"),
          "baseline_metrics": os.path.join(base_dir, "metrics.json"), "headline": lines,
          "skipped": len(errors)}


def _write_predictions(path: str, records, predict, keep) -> None:
  """A RadBench predictions file (JSONL: id, task, question, answer, prediction, meta, source)."""
  with open(path, "w", encoding="utf-8") as f:
    for i, r in enumerate(records):
      if i in keep:
        f.write(json.dumps({"id": str(r.get("id", i)), "task": r["task"], "question": r.get("question", ""),
                            "answer": r.get("answer", ""), "prediction": predict(i, r),
                            "meta": r.get("meta") or {}, "source": str(r.get("source", ""))},
                           ensure_ascii=False) + "\n")


def _radbench_cli(*args: str) -> list[str]:
  """Runs `python -m eval.radbench ARGS` (scoring only: no JAX); returns its headline lines."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # eval/ lives beside radfm_jax/
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
  res = subprocess.run([sys.executable, "-m", "eval.radbench", *args], capture_output=True, text=True,
                       check=False, env=env)
  if res.returncode:
    raise RuntimeError(f"eval.radbench {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
  return [l for l in res.stdout.splitlines() if l.strip() and not l.startswith("report:")]


# ----------------------------------------------------------------------------------------------------
def run(cfg, workdir: str, *, with_radbench: bool = True, max_new_tokens: int = 64) -> dict[str, Any]:
  t0 = time.perf_counter()
  summary = loop.train_and_evaluate(cfg, workdir)
  t_train = time.perf_counter() - t0
  data = train_data.TrainData(cfg)
  layout = train_state.make_layout(cfg, sharding.make_mesh(cfg.mesh))
  prior = text_prior(store_lib.Store.open(cfg.data.store).records(split=cfg.data.train_split))
  results: dict[str, Any] = {"steps": summary["step"], "train_seconds": t_train,
                             "last_train_metrics": summary.get("last_metrics", {})}
  for split in (cfg.data.eval_split, "test"):
    results[split] = compare(cfg, data, layout, summary["state"], split, prior)
  t_eval = time.perf_counter()
  if with_radbench:
    results["radbench"] = radbench(cfg, workdir, prior, max_new_tokens)
  results["radbench_seconds"] = time.perf_counter() - t_eval
  results["total_seconds"] = time.perf_counter() - t0
  with open(os.path.join(workdir, "demo_results.json"), "w") as f:
    json.dump(results, f, indent=1)
  return results


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  res = run(f.config, f.workdir, with_radbench=f.radbench, max_new_tokens=f.radbench_max_new_tokens)
  cfg = f.config
  m = res["last_train_metrics"]
  print(f"\n== radfm_jax demo: {res['steps']} steps in {res['train_seconds']:.0f}s "
        f"(step {m.get('step_time', float('nan')):.2f}s, {m.get('text_tokens_per_s', 0):.0f} text tokens/s, "
        f"MFU {m.get('mfu', 0):.1%}) ==")
  for split in (cfg.data.eval_split, "test"):
    print(_table(res[split], split))
  if "radbench" in res:
    print(f"RadBench on the test split (model vs text-only prior), report: {res['radbench']['report']}")
    for line in res["radbench"]["headline"]:
      print("  " + line)
  print(f"Total wall time {res['total_seconds']:.0f}s (train {res['train_seconds']:.0f}s, "
        f"RadBench {res['radbench_seconds']:.0f}s). Results: {os.path.join(f.workdir, 'demo_results.json')}")


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", "configs/demo.py", "Demo training config.")
  flags.DEFINE_string("workdir", "runs/demo", "Where the run, export and reports go.")
  flags.DEFINE_bool("radbench", True, "Also generate on the test split and write the RadBench report.")
  flags.DEFINE_integer("radbench_max_new_tokens", 64, "RadBench generation length limit.")
  logging.getLogger("jax").setLevel(logging.WARNING)
  app.run(main)
