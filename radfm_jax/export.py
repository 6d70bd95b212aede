"""Params-only export of a training run, for eval and serving.

  python -m radfm_jax.export --workdir=runs/demo --dst=runs/demo/export [--step=N] [--overwrite]

Writes the parameters of the latest (or the given) train checkpoint as a params checkpoint
(`radfm_jax.training.export`): `radfm_jax.generate --checkpoint=DST` and `eval.radbench --checkpoint=DST`
read it.

LoRA runs: --merge_lora writes plain params (adapters folded into the weights); --adapters_only writes
just the trained parameters (adapters + lora.train ones), loaded on top of the base checkpoint with
`python -m radfm_jax.generate --checkpoint=BASE --adapters=DST`. Without either flag the adapters are
kept as they are (the checkpoint loads with adapters on).
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
  if f.merge_lora and f.adapters_only:
    raise app.UsageError("give at most one of --merge_lora, --adapters_only")
  mode = "merge_lora" if f.merge_lora else "adapters_only" if f.adapters_only else "full"
  print(export.export(f.workdir, f.dst, f.step, f.overwrite, mode=mode))


def run() -> None:
  """Console entry point: defines the flags, parses them, runs `main`."""
  flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).", required=True)
  flags.DEFINE_string("dst", None, "Destination params checkpoint directory.", required=True)
  flags.DEFINE_integer("step", None, "Step to export (default: the latest).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --dst.")
  flags.DEFINE_bool("merge_lora", False, "LoRA run: fold the adapters into the weights (plain params).")
  flags.DEFINE_bool("adapters_only", False, "LoRA run: write only the trained parameters (adapters).")
  distributed.define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
