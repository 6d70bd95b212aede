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

_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "auto: initialise when a coordinator is given or a cluster is detected.")


def _cluster_detected() -> bool:
  """True when JAX's own cluster detection (TPU pod, GKE, SLURM, MPI, ...) recognises the environment."""
  try:
    from jax._src import clusters  # JAX's registry of cluster environments.
    return any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types
               if env.__name__ not in ("ClusterEnv",))
  except Exception as e:  # pragma: no cover - private API moved: fall back to single process.
    logging.warning("JAX cluster detection unavailable (%s); assuming a single process.", e)
    return False


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, mode: str | None = None) -> None:
  """Initialises multi-process JAX when needed (see the module docstring). Idempotent."""
  if jax.distributed.is_initialized():
    return
  flag = lambda f: f.value if flags.FLAGS.is_parsed() else None
  coordinator = coordinator or flag(_COORDINATOR) or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num_processes = num_processes or flag(_NUM_PROCESSES) or _env_int("JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = flag(_PROCESS_ID)
  if process_id is None:
    process_id = _env_int("JAX_PROCESS_ID")
  mode = mode or flag(_DISTRIBUTED) or "auto"
  if mode == "off":
    return
  if coordinator:
    if num_processes is None or process_id is None:
      raise ValueError(f"coordinator {coordinator!r} given without --num_processes and --process_id "
                       "(or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} is not in [0, {num_processes})")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
  elif mode == "on" or _cluster_detected():
    jax.distributed.initialize()
  else:
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
