"""The training loop: `train_and_evaluate(cfg, workdir)`, readable top to bottom.

Sections: config -> logging -> mesh -> data -> model + sharding -> restore -> update step -> checkpoint
-> evals -> loop -> cleanup. The config is validated first (`training.config`: every bad key named before
anything heavy starts). The run resumes by itself from the newest intact checkpoint in the workdir (same
data, same losses; a damaged latest checkpoint is reported in one line and skipped unless
checkpoint_fallback is off). A state holding NaN or infinity is never saved. Top-level config keys read
here: seed, total_steps, log_every, checkpoint_every, keep_checkpoints, checkpoint_fallback, eval_every,
eval_batches, microbatches, nonfinite_limit, init_from, init_required, profile_steps, profile_first,
tensorboard_dir, compilation_cache (JAX's persistent cache: path | "auto" | ""), optim.*, model.*, mesh.*,
data.* (defaults: configs/common_train.py, configs/common_data.py). The workdir may be a URL
(gs://bucket/run): checkpoints, metrics.jsonl and TensorBoard events (unless tensorboard_dir says
otherwise) go there.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging as absl_logging

from radfm_jax import paths
from radfm_jax import sharding
from radfm_jax.training import checkpoints as checkpoint_manager
from radfm_jax.training import config as config_lib
from radfm_jax.training import data as train_data
from radfm_jax.training import metrics as metrics_lib
from radfm_jax.training import state as train_state
from radfm_jax.training import step as train_step


class StepTimer:
  """Throughput over a logging window, host side: step time, input wait, text tokens/s, images/s, model
  FLOP/s and MFU. The first step of a run compiles: its time is reported once as `compile_time` and kept
  out of the rates."""

  def __init__(self, peak_flops: float):
    self.peak = peak_flops
    self.compile_time: float | None = None
    self._reset()

  def _reset(self) -> None:
    self.t0, self.wait, self.flops, self.steps, self.tokens, self.images = time.perf_counter(), 0.0, 0.0, 0, 0.0, 0.0

  def waited(self, seconds: float) -> None:
    """Time the loop spent waiting for the input pipeline."""
    self.wait += seconds

  def first_step(self, seconds: float) -> None:
    self.compile_time = seconds
    self._reset()

  def step(self, flops: float, text_tokens: float, images: float) -> None:
    self.steps += 1
    self.flops += flops
    self.tokens += text_tokens
    self.images += images

  def window(self) -> dict[str, float]:
    """The rates since the last call (or the first step), and starts a new window."""
    dt = time.perf_counter() - self.t0
    out: dict[str, float] = {}
    if self.compile_time is not None:  # reported on the first logged step only
      out["compile_time"], self.compile_time = self.compile_time, None
    if self.steps:
      out.update(step_time=dt / self.steps, input_wait=self.wait / self.steps, input_wait_fraction=self.wait / dt,
                 text_tokens_per_s=self.tokens / dt, images_per_s=self.images / dt,
                 model_tflops_per_s=self.flops / dt / 1e12, mfu=(self.flops / dt / self.peak) if self.peak else 0.0)
    self._reset()
    return out


# ====================================================================================================
# The run.
# ====================================================================================================
def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `cfg` in `workdir` (resuming when it holds a checkpoint); returns a summary with the final
  `state`, `step`, `start_step`, `last_metrics`, `eval` and `first_step_seconds`."""
  # ----------------------------------------------------------------------------------------- config
  config_lib.validate(cfg)  # ConfigError naming every bad key; nothing has started yet

  # ---------------------------------------------------------------------------------------- logging
  workdir = paths.absolute(workdir)  # a local folder or a URL (gs://bucket/run)
  paths.path(workdir).mkdir(parents=True, exist_ok=True)
  _quiet_library_logs()
  logging.info("Process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)

  enable_compilation_cache(cfg.get("compilation_cache", "auto"), workdir)

  # ------------------------------------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(cfg.mesh)
  logging.info("Mesh %s", dict(mesh.shape))
  config_lib.validate(cfg, dict(mesh.shape))  # batch sizes against the mesh's batch shards

  # ------------------------------------------------------------------------------------------- data
  data = train_data.TrainData(cfg)
  train_iter = data.train_iterator()

  # -------------------------------------------------------------------------------- model, sharding
  layout = train_state.make_layout(cfg, mesh)

  # ---------------------------------------------------------------------------------------- restore
  ckpts = checkpoint_manager.Checkpoints(workdir, keep=cfg.keep_checkpoints)
  # The newest intact checkpoint: a damaged one is logged in one line and moved aside (or, with
  # checkpoint_fallback off, CheckpointError); other shapes -> IncompatibleCheckpoint naming the array.
  restored = ckpts.restore_latest(layout.abstract, train_iter, fallback=cfg.checkpoint_fallback)
  if restored is None:
    if cfg.init_required and not cfg.init_from:
      raise ValueError("this config fine-tunes: give --config.init_from=PARAMS_CKPT (a stage-1 export from "
                       "`python -m radfm_jax.export`, or a `python -m radfm_jax.convert` output)")
    state = train_state.init_state(cfg, layout)
    start = 0
  else:
    start, state, data_restored = restored
    logging.info("Resuming from checkpoint %d in %s", start, ckpts.directory)
    if not data_restored:
      train_iter = data.train_iterator(seed_offset=start)
  n_train, n_frozen = (metrics_lib.count_params(state["params"]), metrics_lib.count_params(state["frozen"]))
  logging.info("Parameters: %s trainable, %s frozen", f"{n_train:,}", f"{n_frozen:,}")
  if jax.process_index() == 0 and start == 0:
    from clu import parameter_overview  # pylint: disable=g-import-not-at-top  (CLU imports TensorFlow)
    parameter_overview.log_parameter_overview(
        train_state.merge_params(state["params"], state["frozen"]), include_stats=False,
        msg="Parameter overview (trainable and frozen)")

  # ------------------------------------------------------------------------------------ update step
  step_fn = train_step.make_train_step(layout, cfg)
  compiled: dict[Any, Callable] = {}  # batch-shape signature -> jitted step (static shape buckets)
  flops: dict[Any, float] = {}
  towers = train_state.trainable_towers(state["params"])

  def run_step(state, host_batch):
    key = tuple((k, v.shape) for k, v in sorted(host_batch.items()) if isinstance(v, np.ndarray))
    batch = train_step.to_global(host_batch, mesh)
    if key not in compiled:
      compiled[key] = train_step.jit_step(step_fn, layout, batch)
      flops[key] = _batch_flops(cfg, batch, towers)
    return compiled[key](state, batch), flops[key]

  # ---------------------------------------------------------------------------------------- metrics
  writer = metrics_lib.MetricsWriter(workdir, start_step=start,
                                     tensorboard_dir=cfg.get("tensorboard_dir") or None)
  peak, peak_src = metrics_lib.peak_flops(cfg.model.dtype)
  logging.info("Peak for MFU: %.3g FLOP/s (%s)", peak, peak_src)
  timer = StepTimer(peak)
  limit = cfg.nonfinite_limit
  summary: dict[str, Any] = {"start_step": start}

  def handle_metrics(step: int, m: Mapping[str, Any], step_flops: float) -> None:
    """Host side of a finished step, in step order and one step behind the dispatch: the non-finite
    guard, throughput accounting and logging."""
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    if m["nonfinite"]:
      what = ("update (new parameters or optimizer state)" if m.get("nonfinite_update")
              else "loss/gradient")
      logging.warning("step %d: non-finite %s (loss=%s, grad_norm=%s); update skipped (%d in a row, %d "
                      "total)", step, what, m["loss"], m["grad_norm"], m["nonfinite_consecutive"],
                      m["nonfinite_total"])
      if m["nonfinite_consecutive"] >= limit:
        ckpts.wait()
        last = ckpts.latest_step()
        raise train_step.NonFiniteError(
            f"{limit} consecutive steps (up to step {step}) had a non-finite {what}; stopping. Their "
            f"updates were skipped and nothing non-finite was saved; "
            + (f"the last good checkpoint is step {last} in {ckpts.directory}." if last is not None
               else f"no checkpoint was saved in {ckpts.directory}.")
            + " Lower optim.lr, check the data, or raise nonfinite_limit.")
    if step > start + 1:  # the first step compiles: StepTimer.first_step has it
      timer.step(step_flops, m["text_tokens"], m.get("images", 0.0))
    if step % cfg.log_every and step != cfg.total_steps:
      return
    m.update(timer.window())
    writer.write(step, m)
    logging.info("step %d loss %.6f %s", step, m["loss"], _fmt(m, skip=("loss",)))
    summary["last_metrics"] = m

  # ------------------------------------------------------------------------------------------ evals
  eval_fn = train_step.jit_eval_step(layout, cfg)

  def run_eval(state, step: int) -> dict[str, float]:
    if not data.has_eval:
      return {}
    t0 = time.perf_counter()
    res = train_step.evaluate(eval_fn, state, data.eval_batches(), mesh)
    writer.write(step, {f"val/{k}": v for k, v in res.items()})
    logging.info("step %d validation %s (%.1fs)", step, _fmt(res), time.perf_counter() - t0)
    return res

  # ------------------------------------------------------------------------------------------- loop
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top  (CLU imports TensorFlow)
  hooks = [periodic_actions.ReportProgress(num_train_steps=cfg.total_steps, writer=writer.writer,
                                           every_steps=cfg.log_every)]
  if cfg.profile_steps and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=cfg.profile_steps,
                                          profile_duration_ms=None, every_secs=None,
                                          first_profile=start + cfg.profile_first))
  preemption = checkpoint_manager.Preemption()  # SIGTERM -> checkpoint at the end of the step, exit
  step, last_eval, pending, pending_save, saved = start, None, None, False, None
  try:
    with jax.set_mesh(mesh):  # activation sharding constraints (sharding.constrain) are on while tracing
      while step < cfg.total_steps:
        t0 = time.perf_counter()
        host_batch = next(train_iter)
        timer.waited(time.perf_counter() - t0)
        first = not compiled
        (state, m), step_flops = run_step(state, host_batch)
        step += 1
        if first:
          jax.block_until_ready(m)
          summary["first_step_seconds"] = time.perf_counter() - t0
          timer.first_step(summary["first_step_seconds"])
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
            ckpts.save(step, state, train_iter, cfg)  # NonFiniteState rather than saving NaN / inf
            saved = step
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.total_steps):
          summary["eval"] = run_eval(state, step)
          last_eval = step
        if preempted:
          if saved == step:
            logging.warning("Preempted: checkpoint %d saved, exiting.", step)
          else:
            logging.warning("Preempted at step %d: not saved (non-finite streak); latest checkpoint %s; "
                            "exiting.", step, ckpts.latest_step())
          summary["preempted"] = True
          break
      if pending is not None:
        handle_metrics(*pending)
      if step == cfg.total_steps and last_eval != step and data.has_eval:
        summary["eval"] = run_eval(state, step)
  except BaseException:  # also on an exception: finish (or abandon) the async save, flush, restore SIGTERM
    _cleanup(writer, preemption, ckpts, failing=True)
    raise
  _cleanup(writer, preemption, ckpts, failing=False)
  if pending_save:
    logging.warning("The run ended in a non-finite streak: step %d was not saved; the latest checkpoint is "
                    "%s in %s", step, ckpts.latest_step(), ckpts.directory)
  else:
    logging.info("Training finished at step %d; latest checkpoint %s in %s", step, ckpts.latest_step(),
                 ckpts.directory)
  summary.update(step=step, state=state)
  return summary


def _cleanup(writer, preemption, ckpts, *, failing: bool) -> None:
  """Flushes metrics, restores the SIGTERM handler and waits for the last async save. A failed save (e.g.
  disk full) raises CheckpointError, one line, unless another error is already on its way (then it is
  logged, so that the first error stays the one reported)."""
  writer.close()
  preemption.restore_handler()
  try:
    ckpts.close()
  except checkpoint_manager.CheckpointError as e:
    if not failing:
      raise
    logging.error("%s", e)


def _batch_flops(cfg, batch: train_step.Batch, towers: Mapping[str, bool]) -> float:
  b, t = batch["inputs"].shape
  images = batch.get("images")
  shape = None if images is None else tuple(images.shape[1:5])
  return metrics_lib.train_flops(cfg.model, batch=b, seq_len=t, image_shape=shape, trainable=towers)


def enable_compilation_cache(setting: str, workdir: str) -> str | None:
  """JAX's persistent compilation cache, so a restarted pod job does not recompile: `setting` is a
  path, "auto" (WORKDIR/compile_cache on TPU/GPU; off on CPU, where compiles are cheap) or "" (off).
  The first setting in a process wins (JAX reads it once). Returns the directory in use, or None."""
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  if setting == "auto":
    setting = "" if jax.default_backend() == "cpu" else os.path.join(workdir, "compile_cache")
  if setting:
    jax.config.update("jax_compilation_cache_dir", setting)
    logging.info("Persistent compilation cache: %s", setting)
  return setting or None


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
