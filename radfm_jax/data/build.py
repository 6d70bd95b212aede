"""Builds a store from raw files: the ingest CLI (library: `radfm_jax.data.ingest`).

  # every readable scan under a folder (+ optional text; see data/ingest/files.py for the JSONL format)
  python -m radfm_jax.data.build --from=files --src=DIR --out=STORE [--text=FILE.jsonl] [--workers=N]
  # RadFM's released CSV/JSON text files, through radfm_jax.data.ingest.adapters
  python -m radfm_jax.data.build --from=radfm --dataset=vqa_rad --src=test.csv --image_root=DIR --out=STORE
  # the same on Apache Beam (own venv, see requirements-beam.txt): any runner by --beam_options
  .venv-beam/bin/python -m radfm_jax.data.build --runner=beam --src='DIR/part-*' --out=STORE
      --beam_options="--runner=FnApiRunner --direct_num_workers=2 --direct_running_mode=multi_processing"

--src (and --text) take a path, a comma-separated list or globs: each folder / file is a shard, listed by
its own step (radfm_jax.data.ingest.sources).

The exit status is the number of failures, capped at 100 (0: all good); see `ingest.build` for what a
build does and records.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from absl import app, flags

from radfm_jax.data import readers, schema
from radfm_jax.data.ingest import beam, build, sources
from radfm_jax.data.store import EmptyBuild

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_enum("from", "files", ["files", "radfm"], "source kind")
  flags.DEFINE_string("src", None, "files: the image folder(s); radfm: the released CSV/JSON file(s) "
                      "(comma-separated, globs allowed: each one is a shard)")
  flags.DEFINE_string("out", None, "store root: a local path or a kvstore URL (gs://bucket/path/)")
  flags.DEFINE_string("text", None, "files: JSONL file(s) of samples (see files.py; comma-separated, globs "
                      "allowed); none: image-only records")
  flags.DEFINE_string("dataset", None, "radfm: adapter name (radfm_jax.data.ingest.adapters.names())")
  flags.DEFINE_string("image_root", None, "radfm: folder the released image paths are under")
  flags.DEFINE_string("split", "train", "radfm: split of the released file (train|val|test)")
  flags.DEFINE_integer("seed", 0, "radfm: prompt-pool seed")
  flags.DEFINE_string("strip_prefix", None, "radfm: prefix removed from released image paths")
  flags.DEFINE_string("adapter_opts", None,
                      'radfm: JSON object of adapter options, e.g. \'{"window": 30, "paper_root": "papers"}\'')
  flags.DEFINE_integer("workers", min(4, os.cpu_count() or 1), "parallel readers (0: inline)")
  flags.DEFINE_enum("pool", "thread", ["thread", "process"], "worker kind")
  flags.DEFINE_list("chunks", None, "chunk shape h,w,d (default store.DEFAULT_CHUNKS)")
  flags.DEFINE_string("codec", None, "zstd:L | blosc:CNAME:L[:SHUFFLE] | raw (default store.DEFAULT_CODEC)")
  flags.DEFINE_bool("redact_paths", False, "record hashes of source paths instead of the paths")
  flags.DEFINE_bool("progress", True, "show a progress bar")
  flags.DEFINE_integer("max_voxels", readers.limits.DEFAULT_MAX_VOXELS,
                       "size cap per scan in values (H x W x D x C); larger scans are failures")
  flags.DEFINE_integer("max_bytes", readers.limits.DEFAULT_MAX_BYTES,
                       "size cap per scan in bytes of decoded data; larger scans are failures")
  flags.DEFINE_bool("verify", False, "decode and checksum stored volumes before reusing them; rewrite "
                    "damaged ones")
  flags.DEFINE_bool("allow_empty", False, "let a build that stores no records replace a manifest that has some")
  flags.DEFINE_enum("runner", "local", ["local", "beam"],
                    "local: this process + --workers; beam: an Apache Beam pipeline (.venv-beam)")
  flags.DEFINE_string("beam_options", None, "beam: Beam PipelineOptions flags, e.g. \"--runner=DataflowRunner "
                      f"--project=P ...\" (default {beam.DEFAULT_OPTIONS!r})")


def build_from_flags() -> dict[str, Any]:
  """Runs the build the flags describe; returns the report."""
  f = FLAGS
  if not f.src or not f.out:
    raise app.UsageError("--src and --out are required")
  chunks = tuple(int(c) for c in f.chunks) if f.chunks else None
  limits = readers.Limits(f.max_voxels, f.max_bytes)
  opts: dict[str, Any] = {}
  if f["from"].value == "radfm":
    if not f.dataset or not f.image_root:
      raise app.UsageError("--from=radfm needs --dataset and --image_root")
    opts = {"split": f.split, "seed": f.seed}
    if f.strip_prefix:
      opts["strip_prefix"] = f.strip_prefix
    if f.adapter_opts:
      try:
        extra = json.loads(f.adapter_opts)
      except json.JSONDecodeError as e:
        raise app.UsageError(f"--adapter_opts is not valid JSON: {e}") from e
      if not isinstance(extra, dict):
        raise app.UsageError(f"--adapter_opts must be a JSON object, got {type(extra).__name__}")
      opts.update(extra)
  try:
    src_root, shards = sources.plan_shards(f["from"].value, f.src, text=f.text, dataset=f.dataset,
                                           image_root=f.image_root, redact=f.redact_paths, opts=opts)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from e
  if f.runner == "beam":
    logging.getLogger("apache_beam").setLevel(logging.WARNING)   # Beam logs every bundle at INFO
    try:
      return beam.ingest(shards, src_root=src_root, out=f.out, chunks=chunks, codec=f.codec,
                         redact_paths=f.redact_paths, limits=limits, verify=f.verify,
                         allow_empty=f.allow_empty, beam_options=f.beam_options)
    except ImportError as e:
      if str(e) != beam.MISSING:
        raise
      raise SystemExit(f"error: {beam.MISSING}") from None
  samples, skipped, total = sources.open_all(shards)
  return build.ingest_samples(samples, src_root=src_root, out=f.out, workers=f.workers, pool=f.pool,
                              chunks=chunks, codec=f.codec, progress=f.progress, redact_paths=f.redact_paths,
                              skipped=skipped, total=total, limits=limits, verify=f.verify,
                              allow_empty=f.allow_empty)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:
    report = build_from_flags()
  except EmptyBuild as e:
    print(build.summary(e.report, FLAGS.out))
    print(f"ERROR: {e}", file=sys.stderr)
    sys.exit(max(1, schema.exit_status(e.report["n_failed"])))
  print(build.summary(report, FLAGS.out))
  sys.exit(schema.exit_status(report["n_failed"]))


def run() -> None:
  """Console entry point: defines the flags, parses them, runs `main`."""
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
