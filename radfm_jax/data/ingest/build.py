"""Ingest: raw files -> store (volumes + manifest). One path for every source: `ingest_samples`.

The CLI is `python -m radfm_jax.data.build` (radfm_jax/data/build.py); this module is its library.

`ingest_samples(samples, *, src_root, out, ...)` takes `schema.Sample`s (image paths relative to
src_root) and `schema.RowError`s, reads each referenced scan with `readers.read_scan` on a thread or
process pool, writes it under a content-addressed key (a hash of the source bytes and the scan index:
a re-run, or the same scan named twice, costs one hash and no decode) and adds one manifest record per
sample whose images were all stored. Anything that goes wrong (an unreadable row, a missing,
corrupt, empty, NaN or inconsistent scan, an invalid sample) becomes a failure in the report
(`{"path", "sample", "row", "reason"}`, paths relative to the source root) and the build goes on.
The process exit status is the number of failures, capped at 100 (0: all good).

Runners: `ingest_samples` is the local one (this process + a pool). ingest/beam.py runs the same steps
(`plan` -> `_run_job` per distinct scan -> `settle` -> `store_record`, `make_report`, `commit`) as an
Apache Beam pipeline, so both write byte-identical manifests and reports.

Hostile input (see README "Reliability"): each scan must pass the readers' size cap (--max_voxels,
--max_bytes; headers that claim more than their file holds are refused before any allocation); FIFOs
and devices are never opened; a file name that is not UTF-8, a broken symlink, or a bad --text line is
one failure; process workers exit when the build process dies (they watch their parent). The manifest
is committed atomically (store.py) and a build that stores nothing does not replace a manifest that
holds records (exit status 1, unless --allow_empty). `--verify` decodes every volume a rebuild would
reuse and rewrites the ones whose chunks are damaged (counted as "repaired").

Memory stays bounded: at most 2 x workers scans are in flight, a DICOM series is read one file at a
time, and only the (small) records are kept until the manifest is written.

PHI: scan metadata passes the readers' allowlist only. Source paths are recorded as given; if file or
folder names carry identifiers (e.g. DICOM folders named by patient ID), `--redact_paths` records a
hash of each relative path instead, in records, ids and the report.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

from radfm_jax.data import readers, schema
from radfm_jax.data.store import EmptyBuild, StoreWriter

READER_VERSION = 1      # part of every key: bump when readers change what a file turns into
MAX_EXIT_STATUS = schema.MAX_EXIT_STATUS


@dataclasses.dataclass(frozen=True)
class ScanJob:
  """One scan to store: a path relative to the source root (file or DICOM folder) or the files of a
  DICOM series, and the scan index within a multi-scan file."""
  path: str | tuple[str, ...]
  index: int | None = None

  @classmethod
  def of(cls, image: schema.ImageRef) -> ScanJob:
    paths = image.path if isinstance(image.path, (list, tuple)) else [image.path]
    clean = []
    for p in paths:
      if not isinstance(p, str) or not p:
        raise ValueError(f"image path {p!r}: expected a non-empty relative path")
      norm = os.path.normpath(p)
      if os.path.isabs(norm) or norm == ".." or norm.startswith("../"):
        raise ValueError(f"image path {p!r} is outside the source root (paths must be relative)")
      clean.append(norm)
    path = tuple(clean) if isinstance(image.path, (list, tuple)) else clean[0]
    return cls(path, image.index)

  def label(self, redact: bool) -> str | list[str]:
    if isinstance(self.path, tuple):
      return [redact_path(p) if redact else p for p in self.path]
    return redact_path(self.path) if redact else self.path


def redact_path(path: str) -> str:
  return "path:" + hashlib.blake2b(path.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def printable(value: Any) -> Any:
  """Strings (or lists of them) made safe to write as UTF-8 JSON (bad file-name bytes escaped)."""
  if isinstance(value, list):
    return [printable(v) for v in value]
  if not isinstance(value, str):
    return value
  try:
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
  except UnicodeEncodeError:
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclasses.dataclass
class _Result:
  key: str | None = None
  hash: str = ""
  written: bool = False
  reason: str | None = None
  repaired: str | None = None     # why a stored volume was rewritten (--verify)


def _file_digest(path: str) -> bytes:
  h = hashlib.blake2b(digest_size=32)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.digest()


def _source_files(abs_paths: list[str]) -> list[str]:
  files = []
  for p in abs_paths:
    if os.path.isdir(p):
      files += [os.path.join(p, n) for n in sorted(os.listdir(p)) if os.path.isfile(os.path.join(p, n))]
    else:
      files.append(p)
  return files


def content_hash(abs_paths: list[str], index: int | None) -> str:
  """Hash of the source bytes (order and names ignored), the scan index and READER_VERSION."""
  h = hashlib.blake2b(digest_size=32)
  h.update(f"radfm_jax.readers.v{READER_VERSION}|index={index}|".encode())
  for digest in sorted(_file_digest(f) for f in _source_files(abs_paths)):
    h.update(digest)
  return h.hexdigest()


def _run_job(job: ScanJob, src_root: str, writer: StoreWriter, limits: readers.Limits | None = None,
             verify: bool = False) -> _Result:
  rel = list(job.path) if isinstance(job.path, tuple) else [job.path]
  abs_paths = [os.path.join(src_root, p) for p in rel]
  for p, a in zip(rel, abs_paths):
    what = readers.not_regular(a)
    if what is not None:
      return _Result(reason=f"{p}: {what}, not a regular file (never opened)")
  missing = [p for p, a in zip(rel, abs_paths) if not os.path.exists(a)]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    return _Result(reason=f"missing image: {missing[0]}{more} does not exist under the source root")
  target = abs_paths if isinstance(job.path, tuple) else abs_paths[0]
  try:
    readers.check_claims(target, limits)   # header-only: a crafted header costs no hashing either
    digest = content_hash(abs_paths, job.index)
    key = digest[:32]
    with writer.key_lock(key):
      damage = None
      if writer.has_volume(key):
        damage = writer.check_volume(key) if verify else None
        if damage is None:
          return _Result(key, digest)
      vol = readers.read_scan(target, job.index, limits)
      writer.write_volume(key, vol.array, vol.meta)
    return _Result(key, digest, written=True, repaired=damage)
  except readers.ReadError as e:
    return _Result(reason=str(e))
  except Exception as e:  # noqa: BLE001 - a batch job records the failure and goes on
    return _Result(reason=f"{type(e).__name__}: {e}")


_WORKER: dict[str, Any] = {}


def _exit_with_parent(parent: int) -> None:
  """A worker's watchdog: exit when the build process is gone (kill -9 leaves pool workers blocked on
  a queue whose write end they hold themselves, so they would otherwise live on)."""
  while os.getppid() == parent:
    time.sleep(0.5)
  os._exit(1)


def _init_worker(out: Any, chunks: tuple[int, ...] | None, codec: str | None, parent: int) -> None:
  threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="parent-watch").start()
  _WORKER["writer"] = StoreWriter(out, chunks=chunks, codec=codec)


def _run_job_in_worker(job: ScanJob, src_root: str, limits: readers.Limits | None, verify: bool) -> _Result:
  return _run_job(job, src_root, _WORKER["writer"], limits, verify)


class _Inline(cf.Executor):
  """workers=0: run each job at submit time, in this thread (debugging, tiny inputs)."""

  def submit(self, fn, /, *args, **kwargs):
    future: cf.Future = cf.Future()
    future.set_result(fn(*args, **kwargs))
    return future


def _sanitize(reason: str, src_root: str, job: ScanJob, redact: bool) -> str:
  reason = reason.replace(src_root.rstrip(os.sep) + os.sep, "")
  if redact:
    for p in (job.path if isinstance(job.path, tuple) else (job.path,)):
      reason = reason.replace(p, redact_path(p))
  return reason


def failure(path: Any, reason: str, sample: str | None = None, row: Any = None) -> dict[str, Any]:
  """One entry of the report's "failures" (strings made safe to write as UTF-8 JSON)."""
  return {"path": printable(path), "sample": printable(sample), "row": row, "reason": printable(reason)}


# The steps below are shared by both runners: ingest_samples (here) and the Beam pipeline (ingest/beam.py).

def plan(item: schema.Sample | schema.RowError, ids: set[str]) -> tuple[list[ScanJob] | None, dict | None]:
  """One input item -> (its scan jobs, None) or (None, its failure). `ids`: the sample ids taken so far
  in input order (this adds the item's); Beam applies it to the items of each id in input order, which
  gives the same answers."""
  if isinstance(item, schema.RowError):
    return None, failure(item.source, item.reason, row=item.row)
  try:
    item.validate()
    if item.id in ids:
      raise ValueError(f"sample {item.id!r}: duplicate id")
    jobs = [ScanJob.of(im) for im in item.images]
  except (ValueError, TypeError) as e:
    return None, failure(item.source or None, str(e), getattr(item, "id", None))
  ids.add(item.id)
  return jobs, None


def settle(sample: schema.Sample, jobs: list[ScanJob], results: list[_Result], *, src_root: str,
           redact_paths: bool) -> tuple[dict | None, dict | None]:
  """A sample whose scans ran -> (its manifest record, None) or (None, the failure of its first bad scan)."""
  bad = [(j, r) for j, r in zip(jobs, results) if r.reason is not None]
  if bad:
    job, res = bad[0]
    return None, failure(job.label(redact_paths), _sanitize(res.reason, src_root, job, redact_paths), sample.id)
  provenance = {"images": [{"path": j.label(redact_paths), "index": j.index, "hash": r.hash}
                           for j, r in zip(jobs, results)]}
  return sample.to_record([r.key for r in results], provenance), None


def store_record(writer: StoreWriter, record: dict[str, Any]) -> dict | None:
  """Adds a record to the manifest; None, or its failure (a record that cannot be stored is one)."""
  try:
    writer.add_record(record)
    return None
  except (ValueError, TypeError) as e:
    images = record.get("provenance", {}).get("images") or [{}]
    return failure(images[0].get("path"), f"cannot store the record ({e})", record.get("id"))


def make_report(*, n_input: int, n_records: int, failures: Iterable[tuple[Any, dict]],
                results: Iterable[tuple[ScanJob, _Result]], skipped: Iterable[dict[str, str]],
                redact_paths: bool, start: float) -> dict[str, Any]:
  """The build report. failures: (input position, failure), reported in position order; results: one
  (job, result) per distinct scan job, in the order the jobs were first named."""
  failures, results = list(failures), list(results)
  rs = [r for _, r in results]
  return {
      "n_input": n_input, "n_records": n_records, "n_failed": len(failures),
      "volumes": {"written": sum(r.written for r in rs),
                  "reused": sum(r.key is not None and not r.written for r in rs),
                  "failed": sum(r.reason is not None for r in rs),
                  "repaired": sum(r.repaired is not None for r in rs)},
      "failures": [f for _, f in sorted(failures, key=lambda pf: pf[0])], "skipped": list(skipped),
      "repaired": [{"path": printable(j.label(redact_paths)), "key": r.key, "reason": r.repaired}
                   for j, r in results if r.repaired is not None],
      "seconds": round(time.time() - start, 2), "reader_version": READER_VERSION,
  }


def commit(writer: StoreWriter, report: dict[str, Any], allow_empty: bool) -> None:
  """Writes the manifest (StoreWriter.finish); an EmptyBuild carries the refused build's report."""
  try:
    writer.finish(report, allow_empty=allow_empty)
  except EmptyBuild as e:
    e.report = report
    raise


def ingest_samples(samples: Iterable[schema.Sample | schema.RowError], *, src_root: str, out: Any,
                   workers: int = 0, pool: str = "thread", chunks: tuple[int, ...] | None = None,
                   codec: str | None = None, progress: bool = True, total: int | None = None,
                   redact_paths: bool = False, skipped: Iterable[dict[str, str]] = (),
                   limits: readers.Limits | None = None, verify: bool = False,
                   allow_empty: bool = False) -> dict[str, Any]:
  """Stores every sample's scans and writes the manifest; returns the build report (also stored).

  workers: 0 runs in this thread; N > 0 uses a pool of N threads (pool="thread": readers release the
  GIL in decoding, hashing and TensorStore) or N spawned processes (pool="process").
  skipped: files a discovery step passed over (not failures), copied into the report.
  limits: the readers' size cap per scan (default readers.Limits()).
  verify: decode and checksum every stored volume before reusing it; rewrite the damaged ones.
  allow_empty: let a build that stored no records replace a manifest that holds records (otherwise
  store.EmptyBuild is raised, with `.report` attached, and the store is left as it was)."""
  start = time.time()
  src_root = os.path.abspath(src_root)
  writer = StoreWriter(out, chunks=chunks, codec=codec)
  if workers <= 0:
    executor: cf.Executor = _Inline()
    submit = lambda job: executor.submit(_run_job, job, src_root, writer, limits, verify)  # noqa: E731
  elif pool == "thread":
    executor = cf.ThreadPoolExecutor(workers)
    submit = lambda job: executor.submit(_run_job, job, src_root, writer, limits, verify)  # noqa: E731
  elif pool == "process":
    executor = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_init_worker,
                                      initargs=(out, writer.chunks, writer.codec, os.getpid()))
    submit = lambda job: executor.submit(_run_job_in_worker, job, src_root, limits, verify)  # noqa: E731
  else:
    raise ValueError(f"pool {pool!r}: expected 'thread' or 'process'")
  max_inflight = 2 * max(workers, 1)

  futures: dict[ScanJob, cf.Future] = {}
  inflight: set[cf.Future] = set()
  pending: list[tuple[int, schema.Sample, list[ScanJob]]] = []
  failures: list[tuple[int, dict[str, Any]]] = []   # (input position, failure): reported in input order
  ids: set[str] = set()
  n_records = n_input = 0
  bar = tqdm(total=total, disable=not progress, unit="sample", desc="ingest", file=sys.stderr)

  def settle_ready(block: bool) -> None:
    nonlocal n_records
    while pending:
      position, sample, jobs = pending[0]
      if not block and not all(futures[j].done() for j in jobs):
        return
      pending.pop(0)
      record, failed = settle(sample, jobs, [futures[j].result() for j in jobs], src_root=src_root,
                              redact_paths=redact_paths)
      if record is not None:
        failed = store_record(writer, record)
        n_records += failed is None
      if failed is not None:
        failures.append((position, failed))
      bar.update(1)

  try:
    for item in samples:
      n_input += 1
      jobs, failed = plan(item, ids)
      if failed is not None:
        failures.append((n_input, failed))
        bar.update(1)
        continue
      for job in jobs:
        if job not in futures:
          futures[job] = submit(job)
          inflight.add(futures[job])
      pending.append((n_input, item, jobs))
      inflight = {f for f in inflight if not f.done()}
      while len(inflight) >= max_inflight:
        _, inflight = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
      settle_ready(block=False)
    settle_ready(block=True)
  finally:
    executor.shutdown(wait=True, cancel_futures=True)
    bar.close()

  report = make_report(n_input=n_input, n_records=n_records, failures=failures,
                       results=[(job, f.result()) for job, f in futures.items()], skipped=skipped,
                       redact_paths=redact_paths, start=start)
  commit(writer, report, allow_empty)
  return report


def summary(report: dict[str, Any], out: Any) -> str:
  v = report["volumes"]
  repaired = f", {v['repaired']} repaired" if v.get("repaired") else ""
  lines = [f"{report['n_records']} records, {v['written']} volumes written{repaired}, {v['reused']} reused, "
           f"{report['n_failed']} failures, {len(report['skipped'])} files skipped, {report['seconds']} s"]
  for f in report["failures"][:20]:
    lines.append(f"  FAILED {f['path']}{'' if f['sample'] is None else ' [' + str(f['sample']) + ']'}: "
                 f"{f['reason']}")
  if report["n_failed"] > 20:
    lines.append(f"  ... {report['n_failed'] - 20} more in {out}/report.json")
  return "\n".join(lines)
