"""Params-only export of a training run, for eval and serving.

  python -m radfm_jax.export --workdir=runs/demo --dst=runs/demo/export [--step=N] [--overwrite]

Writes the parameters of the latest (or the given) train checkpoint as a params checkpoint
(`radfm_jax.training.export`): `radfm_jax.generate --checkpoint=DST` and `eval.radbench --checkpoint=DST`
read it.
"""
from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags

from radfm_jax import distributed
from radfm_jax.training import export



def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  distributed.initialize()
  f = flags.FLAGS
  print(export.export(f.workdir, f.dst, f.step, f.overwrite))


def run() -> None:
  """Console entry point: defines the flags, parses them, runs `main`."""
  flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).", required=True)
  flags.DEFINE_string("dst", None, "Destination params checkpoint directory.", required=True)
  flags.DEFINE_integer("step", None, "Step to export (default: the latest).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --dst.")
  distributed.define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
