"""Train checkpoints: an Orbax CheckpointManager over the train state, the data-iterator state, the
config and per-array fingerprints, plus preemption (SIGTERM) handling.

Layout: WORKDIR/checkpoints/<step>/{state, data, config, checksums}/ (Orbax; a step directory appears only
when its save has completed, so a run killed mid-save resumes from the previous one).
  state      the train state (`radfm_jax.training.state`), restored against the *current* mesh's abstract
             state: each device reads only its shards, and a run saved on one topology resumes on another
  data       Grain iterator state, one JSON file per process (process_<i>-of-<n>.json)
  config     the full run config as JSON (self-describing)
  checksums  a fingerprint per array (`training.integrity`), compared after every restore

Integrity: a checkpoint whose arrays do not match their fingerprints, or that Orbax cannot read (a
truncated or missing file, missing metadata, a bad data-iterator file), is *damaged*. `restore_latest`
then logs one line naming it and the reason, moves it aside to `<step>.damaged`, and falls back to the
newest intact checkpoint (`fallback=False`: raises CheckpointError instead). A checkpoint whose arrays
have other shapes than the current config's is not damaged but incompatible: IncompatibleCheckpoint names
the parameter. Non-finite state is never saved (NonFiniteState). A save that fails (e.g. disk full) is
reported by `close()` as one CheckpointError line; earlier checkpoints stay intact.

`training.export` writes the params of a step as a params checkpoint (`python -m radfm_jax.export`).
"""
from __future__ import annotations

import json
import logging
import re
import signal
from typing import Any, Sequence

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from radfm_jax import paths
from radfm_jax.training import integrity

STATE, DATA, CONFIG, CHECKSUMS = "state", "data", "config", "checksums"


class CheckpointError(RuntimeError):
  """A damaged checkpoint, no intact checkpoint left, or a save that failed (message: one line)."""


class IncompatibleCheckpoint(ValueError):
  """The checkpoint's arrays do not fit the current config (names the array and both shapes)."""


class NonFiniteState(RuntimeError):
  """Refused to save a state holding NaN or infinity."""


def _one_line(e: BaseException, limit: int = 300) -> str:
  """The gist of an Orbax / TensorStore error in one line: the OS error when there is one (e.g. "No
  space left on device [errno 28]"), else the message without TensorStore's JSON specs, shortened."""
  text = " ".join(str(e).split())
  os_error = re.findall(r"([^:\"\]]+) \[os_error_code='(\d+)'\]", text)
  if os_error:
    return f"{os_error[-1][0].strip()} [errno {os_error[-1][1]}]"
  for cut in (" See full TensorStore details", " [tensorstore_spec="):  # long JSON specs follow
    text = text.split(cut)[0]
  return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


class Checkpoints:
  """Saves and restores (train state, data iterator, config, fingerprints) under `workdir/checkpoints`.

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
                       CONFIG: ocp.JsonCheckpointHandler(), CHECKSUMS: ocp.JsonCheckpointHandler()})
    self._saving: list[int] = []   # steps saved since the last successful wait

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> Sequence[int]:
    return self.manager.all_steps()

  # ------------------------------------------------------------------------------------------- save
  def save(self, step: int, state: Any, data_iter: Any, config: ml_collections.ConfigDict) -> None:
    """Saves asynchronously, with a fingerprint per array; raises NonFiniteState (saving nothing) when an
    array holds NaN or infinity, and CheckpointError when an earlier async save failed."""
    summ = integrity.summary(state)
    bad = integrity.nonfinite(summ)
    if bad:
      raise NonFiniteState(f"step {step}: refusing to save a state with non-finite values in {len(bad)} "
                           f"array(s), e.g. {bad[:3]}; the latest checkpoint stays {self.latest_step()}")
    items = {STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(config_json(config)),
             CHECKSUMS: ocp.args.JsonSave({"format": integrity.FORMAT,
                                           "arrays": {p: h for p, (h, _) in summ.items()}})}
    if data_iter is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # an earlier async save surfacing here, or this one failing to start
      raise self._save_error(step, e) from e
    self._saving.append(step)
    logging.info("Saving checkpoint %d to %s (async)", step, self.directory)

  def _save_error(self, step: int | None, e: BaseException) -> CheckpointError:
    self.manager.reload()
    intact = sorted(self.all_steps())
    steps = sorted((set(self._saving) | ({step} if step is not None else set())) - set(intact))
    self._saving = []
    return CheckpointError(f"saving checkpoint(s) {steps} to {self.directory} failed ({_one_line(e)}); "
                           f"intact checkpoints: {intact}")

  # ---------------------------------------------------------------------------------------- restore
  def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> tuple[Any, bool]:
    """(state, whether the data iterator was restored) of checkpoint `step`, verified against its
    fingerprints. `abstract_state`: ShapeDtypeStructs carrying the current mesh's shardings. The iterator
    is restored in place when the checkpoint holds a state for this process layout; after a change of
    process count it is not (logged), and the caller decides how to continue the data stream.

    Raises IncompatibleCheckpoint (other shapes) or CheckpointError (damaged: names the step and why)."""
    where = self.directory / str(step)
    self._check_shapes(step, abstract_state)
    try:
      state = self.manager.restore(step, args=ocp.args.Composite(
          **{STATE: ocp.args.StandardRestore(abstract_state)}))[STATE]
    except Exception as e:
      raise CheckpointError(f"checkpoint {step} ({where}) is damaged: {_one_line(e)}") from None
    self._verify(step, state)
    data_ok = data_iter is not None and self.has_data_state(step)
    if data_iter is not None and not data_ok:
      logging.warning("Checkpoint %d has no data-iterator state for process %d of %d; the data stream "
                      "restarts.", step, jax.process_index(), jax.process_count())
    if data_ok:
      try:
        self.manager.restore(step, args=ocp.args.Composite(**{DATA: grain.checkpoint.CheckpointRestore(data_iter)}))
      except Exception as e:
        raise CheckpointError(f"checkpoint {step} ({where}) is damaged: bad data-iterator state "
                              f"{self._data_file(step)}: {_one_line(e)}") from None
    return state, data_ok

  def restore_latest(self, abstract_state: Any, data_iter: Any = None, *, fallback: bool = True
                     ) -> tuple[int, Any, bool] | None:
    """(step, state, data restored) of the newest intact checkpoint, or None when there is none at all.

    A damaged checkpoint is logged in one line and moved aside to `<step>.damaged` (fallback=True), or
    raises CheckpointError (fallback=False). IncompatibleCheckpoint always raises."""
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      return None
    damaged = []
    for i, step in enumerate(steps):
      try:
        state, data_ok = self.restore(step, abstract_state, data_iter)
        return step, state, data_ok
      except CheckpointError as e:
        damaged.append(step)
        older = steps[i + 1] if i + 1 < len(steps) else None
        if not fallback:
          raise CheckpointError(f"{e}; checkpoint_fallback is off (set it to true to resume from "
                                f"{'checkpoint ' + str(older) if older is not None else 'scratch'})") from None
        logging.error("%s; falling back to %s", e,
                      f"checkpoint {older}" if older is not None else "no checkpoint (none is intact)")
        self._move_aside(step)
    raise CheckpointError(f"no intact checkpoint in {self.directory}: {damaged} are damaged (moved to "
                          "<step>.damaged); remove the workdir's checkpoints to start from scratch")

  def _check_shapes(self, step: int, abstract_state: Any) -> None:
    try:
      saved = self.manager.item_metadata(step)[STATE]
    except Exception as e:
      raise CheckpointError(f"checkpoint {step} ({self.directory / str(step)}) is damaged: unreadable "
                            f"metadata ({_one_line(e)})") from None
    if saved is None:
      raise CheckpointError(f"checkpoint {step} ({self.directory / str(step)}) is damaged: no state metadata")
    flat_saved = {jax.tree_util.keystr(p, simple=True, separator="/"): m
                  for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
    flat_want = dict(zip(integrity.paths(abstract_state), jax.tree.leaves(abstract_state)))
    missing = sorted(set(flat_want) - set(flat_saved))
    extra = sorted(set(flat_saved) - set(flat_want))
    if missing or extra:
      raise IncompatibleCheckpoint(
          f"checkpoint {step} in {self.directory} does not fit this config: arrays missing "
          f"{missing[:5]}, unexpected {extra[:5]}; resume with the config it was saved with (its copy: "
          f"{self.directory / str(step) / CONFIG}) or use a new workdir")
    for path, want in flat_want.items():
      got = tuple(getattr(flat_saved[path], "shape", ()) or ())
      if got != tuple(want.shape):
        raise IncompatibleCheckpoint(
            f"checkpoint {step} in {self.directory} does not fit this config: {path} has shape {got} "
            f"in the checkpoint and {tuple(want.shape)} in the config; resume with the config it was saved "
            f"with (its copy: {self.directory / str(step) / CONFIG}) or use a new workdir")

  def _verify(self, step: int, state: Any) -> None:
    if not (self.directory / str(step) / CHECKSUMS).exists():
      logging.warning("Checkpoint %d records no array fingerprints (saved by an older version): not "
                      "verified", step)
      return
    try:
      recorded = self.manager.restore(step, args=ocp.args.Composite(
          **{CHECKSUMS: ocp.args.JsonRestore()}))[CHECKSUMS]["arrays"]
    except Exception as e:
      raise CheckpointError(f"checkpoint {step} ({self.directory / str(step)}) is damaged: unreadable "
                            f"fingerprints ({_one_line(e)})") from None
    got = integrity.summary(state)
    bad = sorted(p for p, (h, _) in got.items() if recorded.get(p) != h)
    if bad:
      raise CheckpointError(f"checkpoint {step} ({self.directory / str(step)}) is damaged: {len(bad)} "
                            f"array(s) differ from their recorded fingerprints, e.g. {bad[:3]}")

  def _move_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      src = self.directory / str(step)
      dst = self.directory / f"{step}.damaged"
      n = 1
      while dst.exists():
        n += 1
        dst = self.directory / f"{step}.damaged{n}"
      src.rename(dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"radfm_jax.checkpoints.move_aside:{step}")
    self.manager.reload()

  def _data_file(self, step: int) -> epath.Path:
    return self.directory / str(step) / DATA / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def has_data_state(self, step: int) -> bool:
    return self._data_file(step).exists()

  def restore_config(self, step: int | None = None) -> ml_collections.ConfigDict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self.manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
    return ml_collections.ConfigDict(restored[CONFIG])

  # ------------------------------------------------------------------------------------------ close
  def wait(self) -> None:
    """Waits for pending saves; raises CheckpointError (one line) when one failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._save_error(None, e) from e
    self._saving = []

  def close(self) -> None:
    """Waits for pending saves and closes; raises CheckpointError (one line) when a save failed."""
    try:
      self.wait()
    finally:
      try:
        self.manager.close()
      except Exception as e:  # the same failure again, already reported by wait()
        logging.debug("closing the checkpoint manager: %s", _one_line(e))


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
