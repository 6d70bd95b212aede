"""Measures store chunk shapes and codecs: write MB/s, full-read MB/s and size, on CT-like volumes.

  python -m radfm_jax.bench.store --n=6 --shape=256,256,64 [--out=/tmp/store_bench]

The volumes are CT-like int16 in HU: the real CT slice bundled with pydicom (693_J2KI.dcm, 512x512,
resampled to H x W), shifted a little from slice to slice as anatomy changes along the body, plus
Gaussian noise of 12 HU (quantum noise keeps real CT from compressing like a synthetic phantom).
Each configuration writes the n volumes through StoreWriter, then reads them back through a fresh
Store (one TensorStore open + full read per volume, as the pipeline does). Single process, 2 cores.

The measured table and the choice it led to are in store.py's docstring.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np
from absl import app, flags

from radfm_jax.bench.volumes import ct_like_volumes
from radfm_jax.data import store


CONFIGS = [
    ((256, 256, 64), "raw"),
    ((256, 256, 64), "zstd:1"),
    ((256, 256, 64), "zstd:3"),
    ((256, 256, 64), "zstd:9"),
    ((256, 256, 64), "blosc:lz4:5:shuffle"),
    ((256, 256, 64), "blosc:zstd:5:bitshuffle"),
    ((128, 128, 32), "zstd:3"),
    ((64, 64, 64), "zstd:3"),
    ((128, 128, 32), "blosc:lz4:5:bitshuffle"),
    ((128, 128, 32), "blosc:zstd:1:bitshuffle"),
    ((128, 128, 32), "blosc:zstd:5:bitshuffle"),
    ((128, 128, 16), "blosc:zstd:5:bitshuffle"),
    ((64, 64, 32), "blosc:zstd:5:bitshuffle"),
]


def _du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def bench(volumes: list[np.ndarray], root: str) -> list[dict]:
  rows = []
  raw_mb = sum(v.nbytes for v in volumes) / 2**20
  for chunks, codec in CONFIGS:
    path = os.path.join(root, f"{'x'.join(map(str, chunks))}_{codec.replace(':', '-')}")
    writer = store.StoreWriter(path, chunks=chunks, codec=codec)
    t0 = time.perf_counter()
    for i, v in enumerate(volumes):
      writer.write_volume(f"v{i}", v, {})
      writer.add_record({"id": str(i), "split": "train", "task": "caption",
                         "images": [{"key": f"v{i}", "field": "question", "char": 0}]})
    write_s = time.perf_counter() - t0
    writer.finish({})
    s = store.Store.open(path)
    t0 = time.perf_counter()
    for i, v in enumerate(volumes):
      got = s.read_volume(f"v{i}")
      assert got.shape == v.shape
    read_s = time.perf_counter() - t0
    size = _du(os.path.join(path, "volumes"))
    rows.append({"chunks": "x".join(map(str, chunks)), "codec": codec, "write_mb_s": raw_mb / write_s,
                 "read_mb_s": raw_mb / read_s, "ratio": raw_mb * 2**20 / size})
  return rows


def main(argv):
  del argv
  f = flags.FLAGS
  shape = tuple(int(s) for s in f.shape)
  volumes = ct_like_volumes(f.n, shape)
  root = f.out or tempfile.mkdtemp(prefix="store_bench_")
  try:
    rows = bench(volumes, root)
  finally:
    if not f.out:
      shutil.rmtree(root, ignore_errors=True)
  print(f"{f.n} volumes {shape} int16, {sum(v.nbytes for v in volumes) / 2**20:.0f} MiB raw")
  print(f"{'chunks':<14}{'codec':<26}{'write MB/s':>11}{'read MB/s':>11}{'ratio':>8}")
  for r in rows:
    print(f"{r['chunks']:<14}{r['codec']:<26}{r['write_mb_s']:>11.0f}{r['read_mb_s']:>11.0f}{r['ratio']:>8.2f}")


if __name__ == "__main__":
  flags.DEFINE_integer("n", 6, "volumes per configuration")
  flags.DEFINE_list("shape", ["256", "256", "64"], "H,W,D of each volume")
  flags.DEFINE_string("out", "", "scratch folder (default: a temporary folder, removed after)")
  app.run(main)
