"""Input pipeline benchmark: the full Grain pipeline vs a raw TensorStore read of the same volumes.

  python -m radfm_jax.bench.pipeline [--volumes=32] [--vol_shape=256,256,64] [--batch=4] [--workers=0,1,2]
                                     [--image_dtypes=float32,uint16] [--image_channels=1]

Builds a store of n CT-like int16 volumes (bench/volumes.py: pydicom's real CT slice plus
noise, default chunks and codec), one 3D report sample per volume, and a small tokenizer; then measures
in one run:
  raw       Store.read_volume of every volume, one thread (decode only), and with `threads` threads;
  pipeline  make_pipeline(train=True) at RadFM's 3D grid (256x256 x depth bucket), per image dtype
            (data.image_dtype: float32, or uint16 = half the bytes through workers) and per count of Grain
            worker processes: read + min-max + resize + tokenize + batch of `image_channels` (C_host,
            1 = gray: the model replicates it on device) channels; the first batch (worker start-up)
            is timed apart.
MB/s counts the stored (native int16) bytes of the volumes consumed; "out MB/s" the images produced. Finishes in about 30 s on 2 cores. Measured there (loaded, 2-3 runs in one session), samples/s:
raw read 47-55 (1 thread), 41-73 (2 threads); pipeline with C_host = 1 (the default) 19-24 in process,
11-12 with 2 workers; with --image_channels=3 (the former 3-channel output) 9.6-12.9 and 2.8-7.3.
"""
from __future__ import annotations

import concurrent.futures
import os
import shutil
import tempfile
import time

from absl import app, flags, logging

from configs import common_data  # an entry module: builds its data config like the configs do
from radfm_jax.bench.volumes import ct_like_volumes
from radfm_jax.data import pipeline, schema, store, tokenizer

_N = flags.DEFINE_integer("volumes", 32, "number of 3D volumes (one sample each)")
_SHAPE = flags.DEFINE_list("vol_shape", ["256", "256", "64"], "H,W,D of each int16 volume")
_BATCH = flags.DEFINE_integer("batch", 4, "global batch of 3D samples")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Grain worker process counts to compare")
_DTYPES = flags.DEFINE_list("image_dtypes", ["float32", "uint16"], "host image dtypes (data.image_dtype)")
_THREADS = flags.DEFINE_integer("threads", 2, "read threads (raw threaded read, and per worker)")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "pipeline epochs timed after the first batch")
_CHANNELS = flags.DEFINE_integer("image_channels", 1, "host image channels (data.image_channels): 1 or 3")
_OUT = flags.DEFINE_string("scratch", "", "scratch folder (default: a temporary folder, removed after)")


def build(root: str, n: int, shape: tuple[int, int, int]) -> tuple[list[str], int]:
  """Writes the benchmark store; returns the volume keys and their total stored (native) bytes."""
  writer = store.StoreWriter(root)
  keys, nbytes = [], 0
  for i, vol in enumerate(ct_like_volumes(n, shape)):
    key = f"ct{i:04d}"
    writer.write_volume(key, vol, {"modality": "CT", "unit": "HU", "is_2d": False})
    nbytes += vol.nbytes
    s = schema.Sample(id=f"case{i}", task="report", question="Describe the findings of this CT scan.",
                      answer="Findings: no acute abnormality. Impression: normal study.",
                      images=[schema.ImageRef(field="question", char=0)])
    writer.add_record(s.to_record([key], {}))
    keys.append(key)
  writer.finish({"failures": []})
  return keys, nbytes


def raw_read(root: str, keys: list[str], threads: int) -> float:
  """Seconds to read every volume through a fresh Store."""
  st = store.Store.open(root)
  st.volume_meta(keys[0])  # manifest parsed outside the timing, as the pipeline plans before reading
  t0 = time.perf_counter()
  if threads <= 1:
    for k in keys:
      st.read_volume(k)
  else:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      list(pool.map(st.read_volume, keys))
  return time.perf_counter() - t0


def run_pipeline(root: str, tok_path: str, n: int, shape, batch: int, workers: int, threads: int,
                 epochs: int, channels: int = 1, image_dtype: str = "float32") -> dict[str, float]:
  tok = tokenizer.Tokenizer.load(tok_path, max_images=1, tokens_per_image=32)
  cfg = common_data.data_config(store=root, image_hw_3d=(256, 256), max_len=128, len_buckets=(128,),
                                slot_buckets=(1,), batch_size=batch, batch_size_3d=batch, workers=workers,
                                read_threads=threads, prefetch=2, worker_buffer=2,
                                image_channels=channels, image_dtype=image_dtype)
  t0 = time.perf_counter()
  it = pipeline.make_pipeline(cfg, tok, split="train", train=True, seed=0, process_index=0, process_count=1)
  first = next(it)
  t_first = time.perf_counter() - t0
  steps = max(1, epochs * n // batch)
  out_bytes = 0
  t0 = time.perf_counter()
  for _ in range(steps):
    b = next(it)
    out_bytes += b["images"].nbytes
  dt = time.perf_counter() - t0
  del first
  return {"first_s": t_first, "seconds": dt, "samples": steps * batch, "out_bytes": out_bytes,
          "grid": tuple(b["images"].shape[2:])}


def main(argv) -> None:
  del argv
  shape = tuple(int(x) for x in _SHAPE.value)
  n = _N.value
  scratch = _OUT.value or tempfile.mkdtemp(prefix="radfm_bench_")
  root = os.path.join(scratch, "store")
  try:
    t0 = time.perf_counter()
    keys, nbytes = build(root, n, shape)
    tok_path = tokenizer.train_tokenizer(root, os.path.join(scratch, "tok"), 256)
    print(f"built {n} volumes {shape} int16 ({nbytes / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f}s")
    mib = nbytes / 2**20
    per = nbytes / n / 2**20
    rows = []
    for threads in sorted({1, _THREADS.value}):
      dt = raw_read(root, keys, threads)
      rows.append((f"raw TensorStore read, {threads} thread(s)", n / dt, mib / dt, float("nan")))
    for dtype in _DTYPES.value:
      for workers in map(int, _WORKERS.value):
        r = run_pipeline(root, tok_path, n, shape, _BATCH.value, workers, _THREADS.value, _EPOCHS.value,
                         _CHANNELS.value, dtype)
        sps = r["samples"] / r["seconds"]
        rows.append((f"pipeline {dtype}, {workers} worker(s), first batch {r['first_s']:.1f}s",
                     sps, sps * per, r["out_bytes"] / 2**20 / r["seconds"]))
    print(f"\n| {shape} int16 volumes -> grid {r['grid']} | samples/s | stored MB/s | out MB/s |")
    print("|---|---|---|---|")
    for name, sps, mbs, out in rows:
      print(f"| {name} | {sps:.1f} | {mbs:.0f} | {out:.0f} |")
  finally:
    if not _OUT.value:
      shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main)
