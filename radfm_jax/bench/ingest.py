"""Ingest throughput: the local builder and the Beam runner (1 and 2 workers) on the same source folders.

  .venv-beam/bin/python -m radfm_jax.bench.ingest [--n3d=12] [--n2d=200] [--workers=2]

Two folders of real-looking inputs, each split in two shards (part-0, part-1): 3D CT-like int16 volumes
(bench.volumes, 256x256x64, NIfTI .nii.gz) and 2D 512x512 grayscale PNG slices (RadFM's MedMD is mostly 2D
figures plus a smaller share of 3D scans). Each row builds a fresh store (every volume written); the last
row rebuilds the local store (every volume reused: what a rerun after a crash costs). MB/s counts decoded
scan bytes (what is written, before compression). Rates are net of each runner's fixed cost (the time
it takes to build an empty folder: Beam's start-up, worker processes, the final step), which a real
corpus amortizes. Beam rows use FnApiRunner (the DirectRunner's batch
engine) in_memory for 1 worker and multi_processing for 2; they need apache_beam, so run this with the
Beam venv's Python (the main venv prints the local rows only).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

import nibabel as nib
import numpy as np
from absl import app, flags
from PIL import Image

from radfm_jax.bench.volumes import ct_like_volumes
from radfm_jax.data.ingest import beam, build, sources

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_integer("n3d", 12, "3D volumes (256x256x64 int16, .nii.gz)")
  flags.DEFINE_integer("n2d", 200, "2D slices (512x512 uint8 PNG)")
  flags.DEFINE_integer("workers", 2, "local builder threads")


def make_sources(root: str, n3d: int, n2d: int) -> dict[str, tuple[str, int]]:
  """{kind: (glob of its shards, decoded bytes)}."""
  out = {}
  vols = ct_like_volumes(n3d, (256, 256, 64), seed=1)
  for i, vol in enumerate(vols):
    folder = os.path.join(root, "3d", f"part-{i % 2}")
    os.makedirs(folder, exist_ok=True)
    nib.save(nib.Nifti1Image(vol[..., 0], np.diag([0.8, 0.8, 2.5, 1.0])),
             os.path.join(folder, f"ct{i:04d}.nii.gz"))
  out["3d"] = (os.path.join(root, "3d", "part-*"), sum(v.nbytes for v in vols))
  base = ct_like_volumes(1, (512, 512, 64), seed=2)[0][..., 0].astype(np.float32)
  rng = np.random.default_rng(3)
  for n in range(n2d):                              # a slice of the volume + fresh noise: distinct contents
    img = (base[:, :, n % 64] + 160) / 400 * 255 + rng.normal(0, 2, base.shape[:2])
    folder = os.path.join(root, "2d", f"part-{n % 2}")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"x{n:05d}.png"))
  out["2d"] = (os.path.join(root, "2d", "part-*"), n2d * 512 * 512)
  return out


def _local(pattern: str, out: str, workers: int) -> dict:
  src_root, shards = sources.plan_shards("files", pattern)
  items, skipped, total = sources.open_all(shards)
  return build.ingest_samples(items, src_root=src_root, out=out, workers=workers, progress=False,
                              skipped=skipped, total=total)


def _beam(pattern: str, out: str, workers: int) -> dict:
  src_root, shards = sources.plan_shards("files", pattern)
  mode = "in_memory" if workers == 1 else "multi_processing"
  return beam.ingest(shards, src_root=src_root, out=out,
                     beam_options=f"--runner=FnApiRunner --direct_num_workers={workers} "
                                  f"--direct_running_mode={mode} --default_sdk_harness_log_level=WARNING")


def main(argv):
  del argv
  try:
    import apache_beam  # noqa: F401 - heavy optional dependency (own venv): only the Beam rows need it
    has_beam = True
  except ImportError:
    has_beam = False
  logging.getLogger("apache_beam").setLevel(logging.WARNING)   # Beam logs every bundle at INFO
  tmp = tempfile.mkdtemp(prefix="bench_ingest_")
  try:
    kinds = make_sources(os.path.join(tmp, "src"), FLAGS.n3d, FLAGS.n2d)
    rows = [("local", f"{FLAGS.workers} threads", lambda p, o: _local(p, o, FLAGS.workers))]
    if has_beam:
      rows += [("beam FnApiRunner", "1 worker", lambda p, o: _beam(p, o, 1)),
               ("beam FnApiRunner", "2 workers", lambda p, o: _beam(p, o, 2))]
    empty = os.path.join(tmp, "src", "empty")
    os.makedirs(empty)
    overhead = {}
    for i, (name, what, fn) in enumerate(rows):           # fixed cost: a build of an empty folder
      t0 = time.perf_counter()
      fn(empty, os.path.join(tmp, f"store_empty_{i}"))
      overhead[i] = time.perf_counter() - t0
    print(f"{'kind':4s}  {'runner':17s} {'workers':10s} {'scans':>5s} {'s':>6s} {'fixed s':>7s} "
          f"{'scans/s':>8s} {'MB/s':>6s}   (rates net of the fixed cost: an empty build)")
    for kind, (pattern, nbytes) in kinds.items():
      for i, (name, what, fn) in enumerate(rows + [("local rerun", "reuse all", None)]):
        out = os.path.join(tmp, f"store_{kind}_{0 if fn is None else i}")
        t0 = time.perf_counter()
        report = (fn or rows[0][2])(pattern, out)
        dt = time.perf_counter() - t0
        fixed = overhead[0 if fn is None else i]
        net = max(dt - fixed, 1e-3)
        n = report["n_records"]
        assert report["n_failed"] == 0, report["failures"][:3]
        print(f"{kind:4s}  {name:17s} {what:10s} {n:5d} {dt:6.2f} {fixed:7.2f} {n / net:8.1f} "
              f"{nbytes / net / 1e6:6.1f}", flush=True)
    if not has_beam:
      print("(no apache_beam here: run with .venv-beam/bin/python for the Beam rows)")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def run() -> None:
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
