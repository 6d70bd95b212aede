"""The ingest as an Apache Beam pipeline (`python -m radfm_jax.data.build --runner=beam`): any Beam runner.

The same steps and functions as the local runner (build.py), so both write the same store byte for byte:

  shards (sources.Shard)  --list: Shard.open, one step per shard, then Reshuffle-->  ((shard, n), item)
  --group by sample id: build.plan in input order-->  (sample, scan jobs) | failure
  --group by scan, hash it (build.content_hash), group by content: build._run_job for each distinct scan
    in input order; the worker reads it and writes the volume straight to the store's kvstore (local
    path, gs://, ...); one content is written once-->  results
  --join by sample: build.settle-->  record | failure
  --one step: build.store_record in input order, build.make_report, build.commit (StoreWriter.finish:
    the atomic manifest commit)-->  volumes.jsonl, records.jsonl, report.json, info.json

Volume keys are content addresses, so a rerun after a crash (same command) hashes each scan once and reuses
every volume already stored; only the manifest is written again. The runner and its settings come from
--beam_options (PipelineOptions flags): FnApiRunner (the DirectRunner's batch engine) here; DataflowRunner,
FlinkRunner, SparkRunner on a cluster (README "Data"; launch/dataflow.py). The source files must be readable at the
same path on every worker (a shared mount on Flink / Spark clusters).

Apache Beam is imported inside the functions that run the pipeline: it lives in its own venv (.venv-beam,
requirements-beam.txt) because it needs protobuf < 7 while the tokenizer's sentencepiece needs protobuf 7.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shlex
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from radfm_jax.data import readers, schema
from radfm_jax.data.ingest import build, sources
from radfm_jax.data.store import EmptyBuild, Store, StoreWriter, kvstore_spec, open_kvstore

MISSING = ("--runner=beam needs Apache Beam, which lives in its own venv (protobuf < 7, while the tokenizer "
           "needs protobuf 7): `make setup` builds .venv-beam from requirements-beam.txt; run "
           "`.venv-beam/bin/python -m radfm_jax.data.build --runner=beam ...`")
# the DirectRunner's batch engine, without the DirectRunner's first try of Prism (whose binary it downloads)
DEFAULT_OPTIONS = "--runner=FnApiRunner"


@dataclasses.dataclass(frozen=True)
class Config:
  """What every step needs; shipped to the workers with the step."""
  src_root: str
  out: Any
  chunks: tuple[int, ...]
  codec: str
  redact_paths: bool
  limits: readers.Limits | None
  verify: bool
  allow_empty: bool
  start: float
  run_id: str                 # names the key a refused (empty) build hands its report back through

  @property
  def refused_key(self) -> str:
    return f"beam-{self.run_id}.refused.json"


_WRITERS: dict[str, StoreWriter] = {}
_WRITERS_LOCK = threading.Lock()


def _writer(cfg: Config) -> StoreWriter:
  """One StoreWriter per worker process and store (thread-safe for volumes)."""
  key = json.dumps([cfg.out, cfg.chunks, cfg.codec], sort_keys=True, default=str)
  with _WRITERS_LOCK:
    if key not in _WRITERS:
      _WRITERS[key] = StoreWriter(cfg.out, chunks=cfg.chunks, codec=cfg.codec)
    return _WRITERS[key]


def _job_key(job: build.ScanJob) -> str:
  return json.dumps([list(job.path) if isinstance(job.path, tuple) else job.path, job.index])


def _id_key(position: tuple[int, int], item: Any) -> str:
  if isinstance(item, schema.RowError):
    return f"row:{position[0]}:{position[1]}"       # nothing to group: one key each
  sid = getattr(item, "id", None)
  return f"id:{sid}" if isinstance(sid, str) else f"id?:{sid!r}"


# ------------------------------------------------------------------------------------------------ steps
# Each yields (tag, value); _split routes tags to PCollections (plain functions: Beam pickles them by name).

def list_shard(indexed: tuple[int, sources.Shard]) -> Iterator[tuple[str, Any]]:
  i, shard = indexed
  items, skipped, _ = shard.open()
  yield "skipped", (i, list(skipped))
  for n, item in enumerate(items):
    yield "item", (_id_key((i, n), item), ((i, n), item))


def plan_id(group: tuple[str, Any]) -> Iterator[tuple[str, Any]]:
  """build.plan over the items of one sample id, in input order (a duplicate id fails after the first)."""
  ids: set[str] = set()
  for position, item in sorted(group[1], key=lambda e: e[0]):
    jobs, failed = build.plan(item, ids)
    if failed is not None:
      yield "outcome", (position, ("failure", failed))
    else:
      yield "planned", (position, (item, jobs))
      for job in dict.fromkeys(jobs):
        yield "scan", (_job_key(job), (position, job))


def hash_scan(group: tuple[str, Any], cfg: Config) -> tuple[str, Any]:
  """A distinct scan -> (its content address, the scan): scans with the same bytes meet in one group, so
  exactly one of them writes the volume (no two workers race on one key) and the others reuse it."""
  key, refs = group
  positions = sorted(pos for pos, _ in refs)
  job = refs[0][1]
  paths = [os.path.join(cfg.src_root, p) for p in (job.path if isinstance(job.path, tuple) else [job.path])]
  content = f"scan:{key}"                           # unhashable here: _run_job reports why, on its own
  if all(os.path.isfile(p) or os.path.isdir(p) for p in paths):   # never open a FIFO or a device
    try:
      content = "key:" + build.content_hash(paths, job.index)
    except OSError:
      pass
  return content, (positions, key, job)


def run_scans(group: tuple[str, Any], cfg: Config) -> Iterator[tuple[str, Any]]:
  """build._run_job for each distinct scan of one content, in input order (the first writes, the rest
  reuse, as in the local runner); each result goes to every sample that names the scan."""
  _, scans = group
  writer = _writer(cfg)
  entries = set()
  for positions, key, job in sorted(scans, key=lambda s: s[0][0]):
    result = build._run_job(job, cfg.src_root, writer, cfg.limits, cfg.verify)  # noqa: SLF001 - shared step
    yield "stat", (positions[0], (job, result))
    for position in positions:
      yield "result", (position, (key, result))
    if result.key is not None and result.key not in entries:    # the final step needs each volume's entry
      entries.add(result.key)
      yield "entry", writer.volume_entry(result.key)


def settle_sample(joined: tuple[tuple[int, int], dict[str, list]], cfg: Config) -> tuple[Any, Any]:
  position, groups = joined
  (sample, jobs), = groups["planned"]
  results = dict(groups["result"])
  record, failed = build.settle(sample, jobs, [results[_job_key(j)] for j in jobs], src_root=cfg.src_root,
                                redact_paths=cfg.redact_paths)
  # records travel pickled (~1 KB, a tenth of the dict in memory) to the final step, which holds them all
  return position, ("record", pickle.dumps(record)) if record is not None else ("failure", failed)


def commit(_: Any, outcomes: list, stats: list, skipped: list, entries: list, cfg: Config) -> dict[str, Any]:
  """The one final step: records in input order, the report, the manifest (StoreWriter.finish)."""
  writer = StoreWriter(cfg.out, chunks=cfg.chunks, codec=cfg.codec)
  for entry in entries:                             # the workers' volume entries: no meta.json re-read
    writer.remember(entry)
  outcomes = sorted(outcomes, key=lambda o: o[0])
  failures, n_records = [], 0
  for position, (kind, value) in outcomes:
    failed = build.store_record(writer, pickle.loads(value)) if kind == "record" else value
    n_records += failed is None
    if failed is not None:
      failures.append((position, failed))
  report = build.make_report(
      n_input=len(outcomes), n_records=n_records, failures=failures,
      results=[r for _, r in sorted(stats, key=lambda s: s[0])],
      skipped=[s for _, lst in sorted(skipped, key=lambda s: s[0]) for s in lst],
      redact_paths=cfg.redact_paths, start=cfg.start)
  try:
    build.commit(writer, report, cfg.allow_empty)
  except EmptyBuild as e:                           # the store is left as it was; the launcher raises it
    kv = open_kvstore(kvstore_spec(cfg.out))
    kv.write(cfg.refused_key, json.dumps({"error": str(e), "report": report}).encode()).result()
  return report


def _split(pcoll: Any, label: str, tags: Sequence[str]) -> list[Any]:
  import apache_beam as beam  # heavy optional dependency (own venv): only --runner=beam needs it
  parts = pcoll | f"{label}: split" >> beam.Partition(lambda e, n: tags.index(e[0]), len(tags))
  return [part | f"{label}: {tag}" >> beam.Map(lambda e: e[1]) for tag, part in zip(tags, parts)]


def build_pipeline(p: Any, shards: list[sources.Shard], cfg: Config) -> None:
  """Adds the ingest to Beam pipeline `p`."""
  import apache_beam as beam  # heavy optional dependency (own venv): only --runner=beam needs it
  from apache_beam.pvalue import AsList  # noqa: PLC0415 - same
  listed = (p | "shards" >> beam.Create(list(enumerate(shards)))
            | "list shards" >> beam.FlatMap(list_shard))
  skipped, items = _split(listed, "listed", ["skipped", "item"])
  planned_all = (items | "spread items" >> beam.Reshuffle()
                 | "group by id" >> beam.GroupByKey() | "plan" >> beam.FlatMap(plan_id))
  early, planned, scans = _split(planned_all, "planned", ["outcome", "planned", "scan"])
  ran = (scans | "group by scan" >> beam.GroupByKey() | "hash scans" >> beam.Map(hash_scan, cfg)
         | "group by content" >> beam.GroupByKey() | "read + write scans" >> beam.FlatMap(run_scans, cfg))
  stats, results, entries = _split(ran, "ran", ["stat", "result", "entry"])
  settled = ({"planned": planned, "result": results} | "join by sample" >> beam.CoGroupByKey()
             | "settle" >> beam.Map(settle_sample, cfg))
  outcomes = (early, settled) | "outcomes" >> beam.Flatten()
  _ = (p | "once" >> beam.Create([None])
       | "write manifest + report" >> beam.Map(commit, outcomes=AsList(outcomes), stats=AsList(stats),
                                                skipped=AsList(skipped), entries=AsList(entries), cfg=cfg))


def ingest(shards: list[sources.Shard], *, src_root: str, out: Any, chunks: tuple[int, ...] | None = None,
           codec: str | None = None, redact_paths: bool = False, limits: readers.Limits | None = None,
           verify: bool = False, allow_empty: bool = False,
           beam_options: str | Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the ingest on Beam and waits for it; returns the build report (read back from the store).
  Raises store.EmptyBuild (with .report) as build.ingest_samples does."""
  try:
    import apache_beam as beam  # heavy optional dependency (own venv): only --runner=beam needs it
    from apache_beam.options.pipeline_options import PipelineOptions  # noqa: PLC0415 - same
  except ImportError as e:
    raise ImportError(MISSING) from e
  writer = StoreWriter(out, chunks=chunks, codec=codec)   # checks chunks, codec and the store up front
  cfg = Config(os.path.abspath(src_root), out, writer.chunks, writer.codec, redact_paths, limits, verify,
               allow_empty, time.time(), uuid.uuid4().hex)
  args = shlex.split(beam_options or DEFAULT_OPTIONS) if isinstance(beam_options, (str, type(None))) \
      else list(beam_options)
  with beam.Pipeline(options=PipelineOptions(args)) as p:
    build_pipeline(p, shards, cfg)
  kv = open_kvstore(kvstore_spec(out))
  refused = kv.read(cfg.refused_key).result()
  if refused.state == "value":
    kv.write(cfg.refused_key, None).result()           # deletes it
    body = json.loads(refused.value)
    error = EmptyBuild(body["error"])
    error.report = body["report"]
    raise error
  return Store.open(out).report
