r"""Trains RadFM: the single training entry point, readable top to bottom.

  python -m radfm_jax.train --config=configs/demo.py --workdir=runs/demo [--config.total_steps=100]

Multi-process (one process per host; TPU pod slices and SLURM/MPI clusters need no extra flags):
  python -m radfm_jax.train --config=... --workdir=... --coordinator=HOST:PORT --num_processes=N --process_id=I

Sections: logging -> mesh -> data -> model -> sharding -> update step -> checkpoint -> evals -> loop.
Top-level config keys read here (scripts rely on the first four):
  seed, total_steps, log_every, checkpoint_every, keep_checkpoints, eval_every, eval_batches,
  batch_size (global), microbatches (gradient accumulation by lax.scan), nonfinite_limit (K non-finite
  steps in a row stop the run), init_from (params checkpoint to start from), profile_steps, optim.*
  (radfm_jax/optim.py), model.*, mesh.*, data.*.
The run resumes by itself from the latest complete checkpoint in the workdir (same data, same losses).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from radfm_jax import checkpoint_manager
from radfm_jax import distributed
from radfm_jax import metrics as metrics_lib
from radfm_jax import optim
from radfm_jax import sharding
from radfm_jax import train_data
from radfm_jax import train_state
from radfm_jax.data import pipeline
from radfm_jax.models import radfm

Batch = Mapping[str, Any]
EVAL_KEYS = ("example_mask", "closed", "image_dependent")  # host labels of validation rows
DEVICE_KEYS = tuple(pipeline.DEVICE_KEYS) + EVAL_KEYS


class NonFiniteError(RuntimeError):
  """K consecutive steps had a non-finite loss or gradient."""


# ====================================================================================================
# Update step.
# ====================================================================================================
def _valid_tokens(batch: Batch, vocab: int) -> jax.Array:
  t = batch["targets"]
  return batch["loss_mask"].astype(bool) & (t >= 0) & (t < vocab)


def dropout_key(seed: int, step: jax.Array | int, microbatch: jax.Array | int = 0) -> jax.Array:
  """The dropout key of one microbatch of one optimizer step: a pure function of (config seed, step,
  microbatch), so a run resumed from a checkpoint draws exactly the masks of an uninterrupted one."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), microbatch)


def _forward(layout: train_state.Layout, params, frozen, batch: Batch,
             key: jax.Array | None = None) -> jax.Array:
  """Logits; dropout (cfg.model.vision.dropout/emb_dropout) only when a key is given (training)."""
  model = layout.model(params, frozen)
  return model(batch["inputs"], batch.get("images"), batch.get("image_mask"),
               positions=batch.get("positions"), segment_ids=batch.get("segment_ids"), dropout_key=key)


def make_train_step(layout: train_state.Layout, cfg: ml_collections.ConfigDict) -> Callable:
  """`step(state, batch) -> (state, metrics)`: one optimizer step on the global batch, with gradient
  accumulation over `cfg.microbatches` (lax.scan) and the non-finite guard. Not jitted (see `jit_step`).

  The loss is the mean over all answer tokens of the global batch, so any microbatch split gives the
  same gradient (up to float summation order). Dropout masks come from `dropout_key(cfg.seed, step,
  microbatch)`: no RNG lives in the state, and a resumed run reproduces every loss.
  """
  vocab, n_micro = cfg.model.vocab_size, int(cfg.get("microbatches", 1))
  seed = int(cfg.get("seed", 0))
  lr_schedule = optim.schedule(cfg.optim, cfg.total_steps)

  def loss_sum(params, frozen, mb, key):
    logits = _forward(layout, params, frozen, mb, key)
    loss, aux = radfm.loss(logits, mb["targets"], mb["loss_mask"])
    n = aux["tokens"].astype(jnp.float32)
    return loss * n, {"correct": aux["accuracy"] * n}

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

  def step(state, batch):
    params, frozen = state["params"], state["frozen"]
    n_tok = _valid_tokens(batch, vocab).sum().astype(jnp.float32)
    if n_micro == 1:
      (lsum, aux), grads = grad_fn(params, frozen, batch, dropout_key(seed, state["step"]))
    else:
      b = batch["inputs"].shape[0]
      micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((b // n_micro, n_micro) + x.shape[1:]), 0, 1),
                           dict(batch))
      micro = jax.lax.with_sharding_constraint(
          micro, jax.tree.map(lambda x: sharding.NamedSharding(
              layout.mesh, sharding.P(None, sharding.BATCH_AXES)), micro))

      def body(carry, inp):
        mb, i = inp
        (l, a), g = grad_fn(params, frozen, mb, dropout_key(seed, state["step"], i))
        return jax.tree.map(jnp.add, carry, (l, a, g)), None

      zeros = (jnp.zeros((), jnp.float32), {"correct": jnp.zeros((), jnp.float32)},
               jax.tree.map(jnp.zeros_like, params))
      (lsum, aux, grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(n_micro)))
    denom = jnp.maximum(n_tok, 1.0)
    loss = lsum / denom
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(_):
      updates, opt_state = layout.tx.update(grads, state["opt_state"], params)
      return optax.apply_updates(params, updates), opt_state

    new_params, new_opt = jax.lax.cond(ok, apply, lambda _: (params, state["opt_state"]), None)
    guard = state["guard"]
    new_state = {
        "step": state["step"] + 1, "params": new_params, "frozen": frozen, "opt_state": new_opt,
        "guard": {"consecutive": jnp.where(ok, 0, guard["consecutive"] + 1),
                  "total": guard["total"] + (~ok).astype(jnp.int32)}}
    text = (batch["inputs"] < vocab) & (batch["inputs"] > 0)
    out = {"loss": loss, "token_accuracy": aux["correct"] / denom, "grad_norm": grad_norm,
           "param_norm": optax.tree.norm(new_params), "learning_rate": lr_schedule(state["step"]),
           "loss_tokens": n_tok, "text_tokens": text.sum(), "nonfinite": (~ok).astype(jnp.int32),
           "nonfinite_consecutive": new_state["guard"]["consecutive"],
           "nonfinite_total": new_state["guard"]["total"]}
    if "image_mask" in batch:
      out["images"] = batch["image_mask"].sum()
    return new_state, out

  return step


def batch_shardings(batch: Batch, mesh) -> dict:
  return {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def jit_step(step: Callable, layout: train_state.Layout, batch: Batch) -> Callable:
  """jit with explicit shardings: state in its layout (donated), batch over (data, fsdp), metrics
  replicated."""
  return jax.jit(step, in_shardings=(layout.shardings, batch_shardings(batch, layout.mesh)),
                 out_shardings=(layout.shardings, sharding.replicated(layout.mesh)), donate_argnums=(0,))


def to_global(host_batch: Batch, mesh) -> dict:
  """This process's numpy batch -> global jax arrays sharded over (data, fsdp). Only the model inputs
  and eval labels go to the devices; host-only fields (e.g. record_index) stay behind."""
  return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in host_batch.items() if k in DEVICE_KEYS}


# ====================================================================================================
# Evals.
# ====================================================================================================
def example_scores(layout: train_state.Layout, cfg: ml_collections.ConfigDict, state, batch: Batch
                   ) -> dict[str, jax.Array]:
  """Per row: answer-token NLL sum and count, and `exact`: every answer token is the argmax, i.e. greedy
  decoding reproduces the answer (closed-question accuracy without generation)."""
  vocab = cfg.model.vocab_size
  logits = _forward(layout, state["params"], state["frozen"], batch).astype(jnp.float32)
  valid = _valid_tokens(batch, vocab)
  tgt = jnp.clip(batch["targets"], 0, vocab - 1)
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tgt[..., None], -1)[..., 0]
  return {"nll": jnp.where(valid, nll, 0.0).sum(-1), "tokens": valid.sum(-1),
          "exact": ~(valid & (logits.argmax(-1) != tgt)).any(-1) & valid.any(-1)}


def make_eval_step(layout: train_state.Layout, cfg: ml_collections.ConfigDict) -> Callable:
  """`eval_step(state, batch) -> sums` over the global batch of `example_scores`: NLL and answer tokens,
  closed-question exact matches overall and on image-dependent questions. Rows with example_mask False
  (padding) count nowhere. Sums (not per-row arrays) keep it correct with several processes."""

  def eval_step(state, batch):
    s = example_scores(layout, cfg, state, batch)
    real = batch["example_mask"]
    closed = real & batch["closed"]
    closed_img = closed & batch["image_dependent"]
    return {"nll": jnp.where(real, s["nll"], 0.0).sum(), "tokens": jnp.where(real, s["tokens"], 0).sum(),
            "closed_correct": (s["exact"] & closed).sum(), "closed": closed.sum(),
            "closed_image_correct": (s["exact"] & closed_img).sum(), "closed_image": closed_img.sum()}

  return eval_step


def evaluate(eval_fn: Callable, state, batches: Iterator[Batch], mesh) -> dict[str, float]:
  """Validation loss (mean NLL per answer token) and closed-question accuracy, overall and on
  image-dependent questions, over `batches` (from `TrainData.eval_batches`)."""
  total: dict[str, float] = {}
  for host_batch in batches:
    out = jax.device_get(eval_fn(state, to_global(host_batch, mesh)))
    for k, v in out.items():
      total[k] = total.get(k, 0.0) + float(v)
  res = {"loss": total.get("nll", 0.0) / max(total.get("tokens", 0.0), 1.0),
         "answer_tokens": total.get("tokens", 0.0)}
  for name in ("closed", "closed_image"):
    if total.get(name):
      res[f"{name}_accuracy"] = total[f"{name}_correct"] / total[name]
      res[f"{name}_count"] = total[name]
  return res


# ====================================================================================================
# The run.
# ====================================================================================================
def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `cfg` in `workdir` (resuming when it holds a checkpoint); returns a summary."""
  # ---------------------------------------------------------------------------------------- logging
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  _quiet_library_logs()
  logging.info("Process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)

  # ------------------------------------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(cfg.mesh)
  logging.info("Mesh %s", dict(mesh.shape))
  _check_config(cfg, mesh)

  # ------------------------------------------------------------------------------------------- data
  data = train_data.TrainData(cfg)
  train_iter = data.train_iterator()

  # -------------------------------------------------------------------------------- model, sharding
  layout = train_state.make_layout(cfg, mesh)
  ckpts = checkpoint_manager.Checkpoints(workdir, keep=cfg.get("keep_checkpoints", 3))
  start = ckpts.latest_step()
  if start is None:
    if cfg.get("init_required") and not cfg.get("init_from"):
      raise ValueError("this config fine-tunes: give --config.init_from=PARAMS_CKPT (a stage-1 export from "
                       "`python -m radfm_jax.export`, or a `python -m radfm_jax.convert` output)")
    state = train_state.init_state(cfg, layout)
    start = 0
  else:
    logging.info("Resuming from checkpoint %d in %s", start, ckpts.directory)
    state, data_restored = ckpts.restore(start, layout.abstract, train_iter)
    if not data_restored:
      train_iter = data.train_iterator(seed_offset=start)
  n_train, n_frozen = (metrics_lib.count_params(state["params"]), metrics_lib.count_params(state["frozen"]))
  logging.info("Parameters: %s trainable, %s frozen", f"{n_train:,}", f"{n_frozen:,}")
  if jax.process_index() == 0 and start == 0:
    from clu import parameter_overview  # pylint: disable=g-import-not-at-top
    parameter_overview.log_parameter_overview(
        train_state.merge_params(state["params"], state["frozen"]), include_stats=False,
        msg="Parameter overview (trainable and frozen)")
  writer = metrics_lib.MetricsWriter(workdir, start_step=start)
  peak, peak_src = metrics_lib.peak_flops(cfg.model.dtype)
  logging.info("Peak for MFU: %.3g FLOP/s (%s)", peak, peak_src)
  towers = train_state.trainable_towers(state["params"])

  # ------------------------------------------------------------------------------------ update step
  step_fn = make_train_step(layout, cfg)
  compiled: dict[Any, Callable] = {}  # batch-shape signature -> jitted step (static shape buckets)
  flops: dict[Any, float] = {}

  def run_step(state, host_batch):
    key = tuple((k, v.shape) for k, v in sorted(host_batch.items()) if isinstance(v, np.ndarray))
    batch = to_global(host_batch, mesh)
    if key not in compiled:
      compiled[key] = jit_step(step_fn, layout, batch)
      flops[key] = _batch_flops(cfg, batch, towers)
    return compiled[key](state, batch), flops[key]

  # ------------------------------------------------------------------------------------- checkpoint
  preemption = checkpoint_manager.Preemption()  # SIGTERM -> checkpoint at the end of the step, exit

  # ------------------------------------------------------------------------------------------ evals
  eval_fn = jax.jit(make_eval_step(layout, cfg), out_shardings=sharding.replicated(mesh))

  def run_eval(step):
    if not data.has_eval:
      return {}
    t0 = time.perf_counter()
    res = evaluate(eval_fn, state, data.eval_batches(), mesh)
    writer.write(step, {f"val/{k}": v for k, v in res.items()})
    logging.info("step %d validation %s (%.1fs)", step, _fmt(res), time.perf_counter() - t0)
    return res

  # ------------------------------------------------------------------------------------------- loop
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  hooks = [periodic_actions.ReportProgress(num_train_steps=cfg.total_steps, writer=writer.writer,
                                           every_steps=cfg.log_every)]
  if cfg.get("profile_steps") and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=cfg.profile_steps,
                                          profile_duration_ms=None, every_secs=None,
                                          first_profile=start + cfg.get("profile_first", 5)))
  limit = int(cfg.get("nonfinite_limit", 10))
  summary: dict[str, Any] = {"start_step": start}
  window = dict(t=time.perf_counter(), wait=0.0, flops=0.0, steps=0, tokens=0.0, images=0.0)

  def handle_metrics(step: int, m: Mapping[str, Any], step_flops: float) -> None:
    """Host side of a finished step, in step order and one step behind the dispatch: the non-finite
    guard, throughput accounting and logging."""
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    if m["nonfinite"]:
      logging.warning("step %d: non-finite loss/gradient (loss=%s, grad_norm=%s); update skipped "
                      "(%d in a row, %d total)", step, m["loss"], m["grad_norm"],
                      m["nonfinite_consecutive"], m["nonfinite_total"])
      if m["nonfinite_consecutive"] >= limit:
        ckpts.close()
        writer.close()
        preemption.restore_handler()
        raise NonFiniteError(
            f"{limit} consecutive steps (up to step {step}) had a non-finite loss or gradient; stopping. "
            f"Their updates were skipped; the last good checkpoint is step {ckpts.latest_step()} in "
            f"{ckpts.directory}. Lower optim.lr, check the data, or raise nonfinite_limit.")
    if step == start + 1:  # the first step compiles: report it, keep it out of the rates
      window.update(t=time.perf_counter(), wait=0.0, compile_time=summary["first_step_seconds"])
    else:
      window["steps"] += 1
      window["flops"] += step_flops
      window["tokens"] += m["text_tokens"]
      window["images"] += m.get("images", 0.0)
    if step % cfg.log_every and step != cfg.total_steps:
      return
    dt = time.perf_counter() - window["t"]
    if "compile_time" in window:  # on the first logged step
      m["compile_time"] = window.pop("compile_time")
    if window["steps"]:
      m.update(step_time=dt / window["steps"], input_wait=window["wait"] / window["steps"],
               input_wait_fraction=window["wait"] / dt, text_tokens_per_s=window["tokens"] / dt,
               images_per_s=window["images"] / dt, model_tflops_per_s=window["flops"] / dt / 1e12,
               mfu=(window["flops"] / dt / peak) if peak else 0.0)
    writer.write(step, m)
    logging.info("step %d loss %.6f %s", step, m["loss"], _fmt(m, skip=("loss",)))
    summary["last_metrics"] = m
    window.update(t=time.perf_counter(), wait=0.0, flops=0.0, steps=0, tokens=0.0, images=0.0)

  step, last_eval, pending, pending_save = start, None, None, False
  while step < cfg.total_steps:
    t0 = time.perf_counter()
    host_batch = next(train_iter)
    window["wait"] += time.perf_counter() - t0
    first = not compiled
    (state, m), step_flops = run_step(state, host_batch)
    step += 1
    if first:
      jax.block_until_ready(m)
      summary["first_step_seconds"] = time.perf_counter() - t0
      logging.info("First step (compile + run) took %.1fs", summary["first_step_seconds"])
    if pending is not None:
      handle_metrics(*pending)  # the previous step: the device is busy with this one meanwhile
    pending = (step, m, step_flops)
    for h in hooks:
      h(step)
    preempted = preemption.reached(step)
    if step % cfg.checkpoint_every == 0 or step == cfg.total_steps or preempted or pending_save:
      pending_save = bool(jax.device_get(m["nonfinite_consecutive"]))  # never save in a bad streak
      if not pending_save:
        handle_metrics(*pending)
        pending = None
        ckpts.save(step, state, train_iter, cfg)
    if cfg.get("eval_every") and (step % cfg.eval_every == 0 or step == cfg.total_steps):
      summary["eval"] = run_eval(step)
      last_eval = step
    if preempted:
      logging.warning("Preempted: checkpoint %d saved, exiting.", step)
      summary["preempted"] = True
      break
  if pending is not None:
    handle_metrics(*pending)
  if step == cfg.total_steps and last_eval != step and data.has_eval:
    summary["eval"] = run_eval(step)
  ckpts.close()
  writer.close()
  preemption.restore_handler()
  summary.update(step=step, state=state)
  return summary


def _batch_flops(cfg, batch: Batch, towers: Mapping[str, bool]) -> float:
  b, t = batch["inputs"].shape
  images = batch.get("images")
  shape = None if images is None else tuple(images.shape[1:5])
  return metrics_lib.train_flops(cfg.model, batch=b, seq_len=t, image_shape=shape, trainable=towers)


def _check_config(cfg: ml_collections.ConfigDict, mesh) -> None:
  for key in ("seed", "total_steps", "log_every", "checkpoint_every", "optim", "model", "mesh", "data"):
    if key not in cfg:
      raise ValueError(f"config has no top-level `{key}` (see configs/common_train.py)")
  n_micro = int(cfg.get("microbatches", 1))
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  for name in ("batch_size", "batch_size_3d"):
    b = int(cfg.data.get(name) or cfg.data.batch_size)
    if n_micro < 1 or b % n_micro or (b // n_micro) % shards:
      raise ValueError(f"data.{name}={b} must split into microbatches={n_micro} microbatches whose size "
                       f"is a multiple of the {shards} batch shards of mesh {dict(mesh.shape)}")


class _LibraryInfoFilter(logging.Filter):
  """Drops INFO lines of Orbax (tens per checkpoint); warnings and errors pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def _quiet_library_logs() -> None:
  logger = absl_logging.get_absl_logger()
  if not any(isinstance(f, _LibraryInfoFilter) for f in logger.filters):
    logger.addFilter(_LibraryInfoFilter())


def _fmt(d: Mapping[str, Any], skip: Sequence[str] = ()) -> str:
  return " ".join(f"{k}={v:.4g}" for k, v in sorted(d.items()) if k not in skip)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not flags.FLAGS.workdir or flags.FLAGS.config is None:
    raise app.UsageError("--config and --workdir are required")
  distributed.initialize()
  train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  # Flags live here so that other CLIs (radfm_jax.demo, bench) can import this module.
  config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
  app.run(main)
