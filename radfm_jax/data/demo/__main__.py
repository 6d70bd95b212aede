"""python -m radfm_jax.data.demo --out=DIR [--n=240] [--seed=0] [--workers=2]: writes and builds the
demo dataset (see the package docstring). The exit status is the number of build failures (capped)."""
from __future__ import annotations

import os
import sys

from absl import app, flags

from radfm_jax.data import demo, schema
from radfm_jax.data.ingest import build


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  report = demo.make_demo(f.out, n=f.n, seed=f.seed, workers=f.workers, progress=f.progress)
  print(build.summary(report, os.path.join(f.out, "store")))
  sys.exit(schema.exit_status(report["n_failed"]))


if __name__ == "__main__":
  flags.DEFINE_string("out", None, "output folder (files, text.jsonl, store/)", required=True)
  flags.DEFINE_integer("n", 240, "phantoms (two samples each), split 80/10/10")
  flags.DEFINE_integer("seed", 0, "seed: the same seed writes the same dataset")
  flags.DEFINE_integer("workers", 2, "build workers (threads)")
  flags.DEFINE_bool("progress", True, "show a progress bar")
  app.run(main)
