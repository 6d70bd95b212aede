"""Params-only export of a training run, for eval and serving.

  python -m radfm_jax.export --workdir=runs/demo --dst=runs/demo/export [--step=N] [--overwrite]

Writes the trainable and frozen parameters of the latest (or the given) train checkpoint, with the run's
config, as a `radfm_jax.checkpoint` params checkpoint: `checkpoint.load_model(DST)` reads it, and so do
`radfm_jax.generate --checkpoint=DST` and `eval.radbench --checkpoint=DST`.
"""
from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags

from radfm_jax import checkpoint_manager

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).", required=True)
_DST = flags.DEFINE_string("dst", None, "Destination params checkpoint directory.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Step to export (default: the latest).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --dst.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  print(checkpoint_manager.export(_WORKDIR.value, _DST.value, _STEP.value, _OVERWRITE.value))


if __name__ == "__main__":
  app.run(main)
