r"""Trains RadFM: the single training entry point.

  python -m radfm_jax.train --config=configs/demo.py --workdir=runs/demo [--config.total_steps=100]

Multi-process (one process per host; TPU pod slices and SLURM/MPI clusters need no extra flags):
  python -m radfm_jax.train --config=... --workdir=... --coordinator=HOST:PORT --num_processes=N --process_id=I

The loop itself is `radfm_jax.training.loop.train_and_evaluate` (sections: logging -> mesh -> data ->
model -> sharding -> update step -> checkpoint -> evals -> loop); this module holds only the flags.
"""
from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from radfm_jax import distributed
from radfm_jax.training import checkpoints
from radfm_jax.training import config as config_lib
from radfm_jax.training import loop
from radfm_jax.training import step

# Errors whose message says all a user needs (which key, checkpoint or file, and what to do): reported as
# one line at the end of the log, exit status 1, no traceback.
USER_ERRORS = (config_lib.ConfigError, checkpoints.CheckpointError, checkpoints.IncompatibleCheckpoint,
               checkpoints.NonFiniteState, step.NonFiniteError)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not flags.FLAGS.workdir or flags.FLAGS.config is None:
    raise app.UsageError("--config and --workdir are required")
  try:
    config_lib.validate(flags.FLAGS.config)  # before the distributed runtime starts
    distributed.initialize()
    loop.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except USER_ERRORS as e:
    logging.error("%s: %s", type(e).__name__, e)
    raise SystemExit(1) from None


def run() -> None:
  """Console entry point: defines the flags, parses them, runs `main`."""
  config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
  distributed.define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
