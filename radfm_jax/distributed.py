"""Multi-process start-up: `jax.distributed.initialize` when the run spans several processes.

Call `initialize()` first thing in a CLI (before any other JAX call). What it does:
  * an explicit coordinator (the `--coordinator`, `--num_processes`, `--process_id` flags, or the env
    variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) -> initialise with it;
  * otherwise a cluster JAX detects by itself (Cloud TPU pod slices and GKE TPU, SLURM, Open MPI, ...)
    -> `jax.distributed.initialize()` with no arguments;
  * otherwise: a single process, nothing to do.

Example, two processes on one machine (each sees its own 4 CPU devices):
  python -m radfm_jax.train --config=configs/tiny.py --workdir=/tmp/w \
      --coordinator=127.0.0.1:12355 --num_processes=2 --process_id=0   # and --process_id=1
"""
from __future__ import annotations

import logging
import os

import jax
from absl import flags

_FLAGS = ("coordinator", "num_processes", "process_id", "distributed")


def define_flags() -> None:
  """Defines --coordinator, --num_processes, --process_id, --distributed. Called by entry modules only
  (train, generate, export, demo, eval.radbench), under `if __name__ == "__main__"`."""
  flags.DEFINE_string("coordinator", None, "host:port of process 0 for multi-process runs.")
  flags.DEFINE_integer("num_processes", None, "Number of processes of the run.")
  flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                    "auto: initialise when a coordinator is given or a cluster is detected.")


def _flag(name: str):
  """The flag's value when an entry module defined it and flags are parsed, else None."""
  return flags.FLAGS[name].value if name in flags.FLAGS and flags.FLAGS.is_parsed() else None


def _initialize_detected() -> bool:
  """`jax.distributed.initialize()` with JAX's own cluster detection (Cloud TPU pod slices, GKE, SLURM,
  Open MPI, ...); False when no cluster is detected (JAX then asks for a coordinator address)."""
  try:
    jax.distributed.initialize()
  except ValueError as e:
    if "coordinator" not in str(e).lower():
      raise
    return False
  except RuntimeError as e:  # JAX already ran in this process (a library call, e.g. eval.radbench.main in a test)
    if "before any JAX calls" not in str(e):
      raise
    logging.warning("jax.distributed not initialised: JAX was already in use (%s); single process", e)
    return False
  return True


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, mode: str | None = None) -> None:
  """Initialises multi-process JAX when needed (see the module docstring). Idempotent."""
  if jax.distributed.is_initialized():
    return
  coordinator = coordinator or _flag("coordinator") or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num_processes = num_processes or _flag("num_processes") or _env_int("JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _flag("process_id")
  if process_id is None:
    process_id = _env_int("JAX_PROCESS_ID")
  mode = mode or _flag("distributed") or "auto"
  if mode == "off":
    return
  if coordinator:
    if num_processes is None or process_id is None:
      raise ValueError(f"coordinator {coordinator!r} given without --num_processes and --process_id "
                       "(or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} is not in [0, {num_processes})")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
  elif mode == "on":
    jax.distributed.initialize()
  elif not _initialize_detected():
    return
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _env_int(name: str) -> int | None:
  v = os.environ.get(name)
  if v is None or v == "":
    return None
  try:
    return int(v)
  except ValueError:
    raise ValueError(f"environment variable {name}={v!r} is not an integer") from None
