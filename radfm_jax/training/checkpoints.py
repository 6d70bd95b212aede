"""Train checkpoints: an Orbax CheckpointManager over the train state, the data-iterator state and the
config, plus preemption (SIGTERM) handling.

Layout: WORKDIR/checkpoints/<step>/{state, data, config}/ (Orbax; a step directory appears only when its
save has completed, so a run killed mid-save resumes from the previous one).
  state   the train state (`radfm_jax.training.state`), restored against the *current* mesh's abstract
          state: each device reads only its shards, and a run saved on one topology resumes on another
  data    Grain iterator state, one JSON file per process (process_<i>-of-<n>.json)
  config  the full run config as JSON (self-describing)

`training.export` writes the params of a step as a params checkpoint (`python -m radfm_jax.export`).
"""
from __future__ import annotations

import json
import logging
import signal
from typing import Any, Sequence

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from radfm_jax import paths

STATE, DATA, CONFIG = "state", "data", "config"


class Checkpoints:
  """Saves and restores (train state, data iterator, config) under `workdir/checkpoints`.

  keep: how many recent checkpoints to keep. Saves are asynchronous: `save` returns once the arrays are
  copied off the devices; call `wait()` before reading the directory, `close()` at the end.
  """

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    # Orbax restores need absolute paths; kvstore URLs (gs://...) are left as they are.
    workdir = str(workdir)
    self.directory = paths.path(workdir) / "checkpoints"  # local (absolute) or gs://
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler(),
                       CONFIG: ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> Sequence[int]:
    return self.manager.all_steps()

  def save(self, step: int, state: Any, data_iter: Any, config: ml_collections.ConfigDict) -> None:
    items = {STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(config_json(config))}
    if data_iter is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    logging.info("Saving checkpoint %d to %s (async)", step, self.directory)

  def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> tuple[Any, bool]:
    """(state, whether the data iterator was restored). `abstract_state`: ShapeDtypeStructs carrying
    the current mesh's shardings. The iterator is restored in place when the checkpoint holds a state
    for this process layout; after a change of process count it is not (logged), and the caller
    decides how to continue the data stream."""
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    data_ok = data_iter is not None and self.has_data_state(step)
    if data_iter is not None and not data_ok:
      logging.warning("Checkpoint %d has no data-iterator state for process %d of %d; the data stream "
                      "restarts.", step, jax.process_index(), jax.process_count())
    if data_ok:
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored[STATE], data_ok

  def has_data_state(self, step: int) -> bool:
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return (self.directory / str(step) / DATA / name).exists()

  def restore_config(self, step: int | None = None) -> ml_collections.ConfigDict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self.manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
    return ml_collections.ConfigDict(restored[CONFIG])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


class Preemption:
  """SIGTERM -> save and exit cleanly. `reached(step)` is True at the step all processes agree to stop.

  Multi-process runs use JAX's preemption sync manager (it catches SIGTERM and picks a common step);
  a single process installs its own SIGTERM handler.
  """

  def __init__(self):
    self.requested = False
    self._multi = jax.process_count() > 1
    self._previous = None
    if not self._multi:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: checkpointing at the end of this step, then exiting.")
    self.requested = True

  def reached(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def restore_handler(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
