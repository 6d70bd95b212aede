"""The dataset store: scans as TensorStore zarr3 arrays + a JSON manifest, on any TensorStore kvstore.

Layout under ROOT (a local path, or a kvstore URL / JSON spec: "gs://bucket/prefix/", "s3://...",
"file:///abs/path/"; see TensorStore's kvstore drivers; local disk is what the tests cover):

  ROOT/info.json                 {"schema_version", "counts": {records, volumes, by_split, by_task},
                                  "chunks", "codec", "manifest": {file: {"sha256", "bytes"}}};
                                  written last, so its presence means "complete"
  ROOT/records.jsonl             one manifest record per line (schema.Sample.to_record): id, split,
                                  source, task, question, answer, images [{key, field, char}], meta,
                                  provenance {images: [{path, index, hash}]}
  ROOT/volumes.jsonl             one line per referenced volume: {"key", "shape", "dtype", "meta",
                                  "zarr"}: what the pipeline needs (shapes for bucketing) in one read
  ROOT/report.json               the build report (failures with relative paths and reasons, counts)
  ROOT/volumes/KEY/              a zarr3 array [H, W, D, C] in the reader's dtype, chunked and compressed
  ROOT/volumes/KEY/meta.json     the volume's entry (+ "crc32" of the array bytes); written after the
                                  array data, so it marks the volume complete (an interrupted write is
                                  redone on the next build)

Commit: a build first deletes info.json, then writes volumes.jsonl, records.jsonl and report.json, and
info.json last with the sha256 and size of each. `Store.open` checks them, so a build killed between
the manifest files and info.json leaves either no info.json ("did not finish") or one that does not
match ("interrupted"), never an old info.json that vouches for new records. A build that stored no
records does not replace a manifest holding records (`EmptyBuild`) unless `allow_empty=True`.
`StoreWriter.check_volume(key)` decodes a stored volume and compares its checksum (build --verify
rewrites volumes that fail).

Keys are content addresses (a hash of the source bytes, see build.py), so a re-run skips what is
stored and identical scans are stored once. A build rewrites the manifest files; volumes that are no
longer referenced stay under volumes/ (harmless, content-addressed).

Chunks and codec, measured with `python -m radfm_jax.bench.store --n=6` (six 256x256x64 int16
CT-like volumes, 48 MiB raw, on the shared 2-core dev machine; two runs, MB/s of raw data, noisy):

  chunks       codec                     write MB/s  read MB/s  ratio
  256x256x64   raw                       161-202     575-730    1.00
  256x256x64   zstd:3                    33-37       137-233    1.87
  256x256x64   zstd:9                    8-13        96-287     1.99
  256x256x64   blosc:lz4:5:shuffle       112-169     474-1022   1.98
  128x128x32   zstd:3                    33-40       167-483    1.85
  128x128x32   blosc:lz4:5:bitshuffle    145-258     342-691    2.02
  128x128x32   blosc:zstd:1:bitshuffle   112-217     302-334    2.30   <- default
  128x128x32   blosc:zstd:5:bitshuffle   39-63       261-415    2.35
  128x128x16   blosc:zstd:5:bitshuffle   36-72       208-503    2.43

Bit-shuffled blosc/zstd level 1 keeps almost all of the best ratio at 3-5x the write speed of plain
zstd; reads (what training pays) run at 300+ MB/s, far above what the pipeline consumes, and
128x128x32 chunks let TensorStore decode a large volume on several threads while a demo-sized
volume is one chunk. Both are StoreWriter arguments (`chunks=(h, w, d)`, clipped to the array;
`codec="zstd:LEVEL" | "blosc:CNAME:LEVEL[:SHUFFLE]" | "raw"`) and build.py flags, and the array spec
travels with each volume, so stores written with other choices read the same.

  from radfm_jax.data.store import Store, StoreWriter
  w = StoreWriter("/data/store")
  if not w.has_volume(key): w.write_volume(key, array, meta)
  w.add_record(record); w.finish(report)
  s = Store.open("/data/store")
  s.records(split="train", task="vqa"); s.read_volume(key)  # -> np.ndarray [H, W, D, C]
  s.volume_meta(key); s.volume_spec(key); s.report; s.info
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import threading
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from radfm_jax.data import schema

DEFAULT_CHUNKS = (128, 128, 32)
DEFAULT_CODEC = "blosc:zstd:1:bitshuffle"
_CONTEXT = {"cache_pool": {"total_bytes_limit": 0}, "data_copy_concurrency": {"limit": 2},
            "file_io_concurrency": {"limit": 8}}
_CONTEXTS: dict[int, ts.Context] = {}
_CONTEXTS_LOCK = threading.Lock()


def context() -> ts.Context:
  """The one TensorStore context of this process (thread pools, no chunk cache), shared by every open.

  Never a context per `ts.open`: TensorStore (0.1.86) then frees the per-open data-copy thread pool while
  another thread is still queueing a chunk decode on it (a use-after-free that valgrind shows in
  `TaskGroup::AddTask`), which corrupted the heap of the training input path now and then. Keyed by
  process id, so a forked worker makes its own."""
  pid = os.getpid()
  with _CONTEXTS_LOCK:
    ctx = _CONTEXTS.get(pid)
    if ctx is None:
      ctx = _CONTEXTS[pid] = ts.Context(ts.Context.Spec(_CONTEXT))
    return ctx


def open_kvstore(spec: ts.KvStore.Spec) -> ts.KvStore:
  """`ts.KvStore.open(spec)` in the process's shared context."""
  return ts.KvStore.open(spec, context=context()).result()


def open_array(spec: dict[str, Any], **kwargs: Any) -> ts.TensorStore:
  """`ts.open(spec, **kwargs)` in the process's shared context."""
  return ts.open(spec, context=context(), **kwargs).result()


MANIFEST = ("volumes.jsonl", "records.jsonl", "report.json")


class EmptyBuild(ValueError):
  """A build that stored no records would replace a manifest that holds some."""
  report: dict[str, Any] | None = None     # the refused build's report (set by build.ingest_samples)


class DamagedStore(ValueError):
  """The manifest files do not match what info.json recorded (an interrupted build, or edited files)."""


def kvstore_spec(root: str | os.PathLike | dict[str, Any]) -> ts.KvStore.Spec:
  """A local path, a kvstore URL ("gs://b/p/", "file:///p/") or a JSON kvstore spec -> directory spec."""
  if isinstance(root, dict):
    spec = ts.KvStore.Spec(root)
  elif "://" in (root := os.fspath(root)):
    spec = ts.KvStore.Spec(root)
  else:
    spec = ts.KvStore.Spec({"driver": "file", "path": os.path.abspath(root)})
  if spec.path and not spec.path.endswith("/"):
    spec = ts.KvStore.Spec({**spec.to_json(), "path": spec.path + "/"})
  return spec


def codecs(codec: str, dtype: np.dtype) -> list[dict[str, Any]]:
  """zarr3 codec chain for "zstd[:LEVEL]", "blosc[:CNAME[:LEVEL[:SHUFFLE]]]" or "raw"."""
  name, *args = codec.split(":")
  chain: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
  if name == "zstd":
    chain.append({"name": "zstd", "configuration": {"level": int(args[0]) if args else 3}})
  elif name == "blosc":
    cname = args[0] if args else "zstd"
    level = int(args[1]) if len(args) > 1 else 5
    shuffle = args[2] if len(args) > 2 else "shuffle"
    chain.append({"name": "blosc", "configuration": {
        "cname": cname, "clevel": level, "shuffle": shuffle, "typesize": int(np.dtype(dtype).itemsize),
        "blocksize": 0}})
  elif name != "raw":
    raise ValueError(f"codec {codec!r}: expected 'zstd[:LEVEL]', 'blosc[:CNAME[:LEVEL[:SHUFFLE]]]' or 'raw'")
  return chain


def zarr_metadata(shape: Sequence[int], dtype: np.dtype, chunks: Sequence[int], codec: str) -> dict:
  """The zarr3 array metadata of one volume: chunk = `chunks` clipped to (H, W, D), all channels."""
  if len(chunks) != 3 or any(int(c) < 1 for c in chunks):
    raise ValueError(f"chunks {tuple(chunks)}: expected three positive sizes (h, w, d)")
  chunk = [min(int(c), int(s)) for c, s in zip(chunks, shape[:3])] + [int(shape[3])]
  return {"shape": [int(s) for s in shape], "data_type": np.dtype(dtype).name,
          "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
          "codecs": codecs(codec, dtype), "fill_value": 0}


def _array_spec(base: ts.KvStore.Spec, key: str, metadata: dict | None = None) -> dict[str, Any]:
  spec: dict[str, Any] = {"driver": "zarr3", "kvstore": (base / f"volumes/{key}/").to_json()}
  if metadata is not None:
    spec["metadata"] = metadata
  return spec


def _read_json(kv: ts.KvStore, name: str) -> Any:
  result = kv.read(name).result()
  if result.state != "value":
    return None
  return json.loads(result.value)


def _read_jsonl(kv: ts.KvStore, name: str) -> list[dict[str, Any]]:
  result = kv.read(name).result()
  if result.state != "value":
    return []
  return _parse_jsonl(result.value)


def _parse_jsonl(blob: bytes) -> list[dict[str, Any]]:
  return [json.loads(line) for line in blob.decode().splitlines() if line.strip()]


def _dumps(obj: Any) -> bytes:
  return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()


def checksum(array: np.ndarray) -> str:
  """CRC-32 of an array's bytes in C order (what a volume's "crc32" records)."""
  return f"{zlib.crc32(np.ascontiguousarray(array).view(np.uint8).reshape(-1)):08x}"


def _digest(blob: bytes) -> dict[str, Any]:
  return {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}


class StoreWriter:
  """Writes volumes (safe to share between threads, and to open once per worker process) and, from
  one process, the manifest (`add_record` + `finish`)."""

  def __init__(self, root: str | dict[str, Any], *, chunks: Sequence[int] | None = None,
               codec: str | None = None):
    self.root = root
    self.chunks = tuple(int(c) for c in (chunks or DEFAULT_CHUNKS))
    self.codec = codec or DEFAULT_CODEC
    codecs(self.codec, np.int16)  # validate early
    zarr_metadata((1, 1, 1, 1), np.int16, self.chunks, self.codec)
    self._base = kvstore_spec(root)
    self._kv = open_kvstore(self._base)
    self._lines: list[bytes] = []                 # records, serialized when added
    self._kinds: list[tuple[str, str]] = []       # their (split, task)
    self._keys: dict[str, None] = {}              # referenced volumes, in first-use order
    self._entries: dict[str, dict[str, Any]] = {}
    self._lock = threading.Lock()
    self._key_locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)

  def key_lock(self, key: str) -> threading.Lock:
    """A lock per volume key: threads storing the same content (duplicate files) take turns."""
    with self._lock:
      return self._key_locks[key]

  def has_volume(self, key: str) -> bool:
    """True when volume `key` was written completely (by this or an earlier build)."""
    if key in self._entries:
      return True
    entry = _read_json(self._kv, f"volumes/{key}/meta.json")
    if entry is None:
      return False
    with self._lock:
      self._entries[key] = entry
    return True

  def volume_entry(self, key: str) -> dict[str, Any] | None:
    """Volume `key`'s entry (its meta.json, cached), or None when it is not stored."""
    return self._entries[key] if self.has_volume(key) else None

  def remember(self, entry: dict[str, Any]) -> None:
    """Caches a volume entry that another process wrote or read (the Beam runner's final step gets the
    workers' entries this way instead of reading every meta.json again)."""
    with self._lock:
      self._entries[entry["key"]] = entry

  def write_volume(self, key: str, array: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    """Writes array [H, W, D, C] under `key` (replacing a partial earlier write), then its entry."""
    if array.ndim != 4:
      raise ValueError(f"volume {key}: expected [H, W, D, C], got shape {array.shape}")
    metadata = zarr_metadata(array.shape, array.dtype, self.chunks, self.codec)
    spec = _array_spec(self._base, key, metadata)
    # Open-or-create, then overwrite every chunk (chunks that are all fill value get deleted): a partial
    # or damaged earlier write is replaced without deleting the volume under a concurrent writer of the
    # same key. Other metadata, or a damaged zarr.json, means starting over.
    try:
      arr = open_array({**spec, "create": True, "open": True})
    except ValueError:
      arr = open_array({**spec, "create": True, "delete_existing": True})
    arr.write(np.ascontiguousarray(array)).result()
    entry = {"key": key, "shape": list(array.shape), "dtype": array.dtype.name, "meta": meta,
             "zarr": metadata, "crc32": checksum(array)}
    self._kv.write(f"volumes/{key}/meta.json", _dumps(entry)).result()
    with self._lock:
      self._entries[key] = entry
    return entry

  def check_volume(self, key: str) -> str | None:
    """None when volume `key` decodes to its recorded shape, dtype and checksum; else what is wrong.
    (Volumes written before checksums were recorded are checked for decoding, shape and dtype.)"""
    entry = self._entries.get(key) or _read_json(self._kv, f"volumes/{key}/meta.json")
    if entry is None:
      return "no meta.json"
    try:
      arr = open_array(_array_spec(self._base, key), read=True).read().result()
    except Exception as e:  # noqa: BLE001 - TensorStore reports damage as ValueError / RuntimeError / ...
      return f"cannot decode ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if list(arr.shape) != entry["shape"] or arr.dtype.name != entry["dtype"]:
      return f"stored as {list(arr.shape)} {arr.dtype.name}, meta.json says {entry['shape']} {entry['dtype']}"
    if "crc32" in entry and checksum(arr) != entry["crc32"]:
      return f"checksum {checksum(arr)} != recorded {entry['crc32']}"
    return None

  def add_record(self, record: dict[str, Any]) -> None:
    """Adds one manifest record; raises (and adds nothing) when it names a volume that is not stored
    or cannot be written as UTF-8 JSON."""
    for im in record["images"]:
      if not self.has_volume(im["key"]):
        raise ValueError(f"record {record['id']!r} names volume {im['key']!r}, which is not stored")
    line = _dumps(record) + b"\n"
    self._lines.append(line)
    self._kinds.append((record["split"], record["task"]))
    self._keys.update((im["key"], None) for im in record["images"])

  def finish(self, report: dict[str, Any], *, allow_empty: bool = False) -> dict[str, Any]:
    """Commits the manifest (see the module docstring): deletes info.json, writes volumes.jsonl,
    records.jsonl and report.json, then info.json with their hashes; returns info. Raises EmptyBuild,
    writing nothing, when no record was added and the store's current manifest holds records (unless
    allow_empty)."""
    if not self._lines and not allow_empty:
      old = _read_json(self._kv, "info.json")
      n_old = (old or {}).get("counts", {}).get("records", 0)
      if n_old:
        raise EmptyBuild(f"{self.root}: this build stored no records and would replace a manifest of "
                         f"{n_old} records; check the source (--src / --image_root), or pass --allow_empty "
                         "to replace it")
    blobs = {"volumes.jsonl": b"".join(_dumps(self._entries[k]) + b"\n" for k in self._keys),
             "records.jsonl": b"".join(self._lines), "report.json": _dumps(report)}
    self._kv.write("info.json", None).result()      # deletes it: from here on the store reads as unfinished
    for name in MANIFEST:
      self._kv.write(name, blobs[name]).result()
    info = {"schema_version": schema.SCHEMA_VERSION, "chunks": list(self.chunks), "codec": self.codec,
            "counts": _counts(self._kinds, len(self._keys)),
            "manifest": {name: _digest(blobs[name]) for name in MANIFEST}}
    self._kv.write("info.json", _dumps(info)).result()
    return info


def _counts(kinds: Iterable[tuple[str, str]], n_volumes: int) -> dict[str, Any]:
  kinds = list(kinds)
  return {"records": len(kinds), "volumes": n_volumes,
          "by_split": dict(sorted(collections.Counter(s for s, _ in kinds).items())),
          "by_task": dict(sorted(collections.Counter(t for _, t in kinds).items()))}


class Store:
  """A finished store, opened read-only. Picklable (holds the root and parsed JSON only)."""

  def __init__(self, root: str | dict[str, Any], info: dict[str, Any]):
    self.root = root
    self.info = info
    self._records: list[dict[str, Any]] | None = None
    self._volumes: dict[str, dict[str, Any]] | None = None
    self._report: dict[str, Any] | None = None

  @classmethod
  def open(cls, root: str | dict[str, Any]) -> Store:
    kv = open_kvstore(kvstore_spec(root))
    info = _read_json(kv, "info.json")
    if info is None:
      raise FileNotFoundError(f"{root}: no info.json: not a store, or its build did not finish")
    if info.get("schema_version") != schema.SCHEMA_VERSION:
      raise ValueError(f"{root}: store schema_version {info.get('schema_version')}, "
                       f"this code reads {schema.SCHEMA_VERSION}; rebuild the store")
    store = cls(root, info)
    blobs = {}
    for name, want in info.get("manifest", {}).items():   # stores from before manifest hashes: unchecked
      result = kv.read(name).result()
      blob = result.value if result.state == "value" else None
      if blob is None or _digest(blob) != want:
        got = "missing" if blob is None else f"{len(blob)} bytes, sha256 {_digest(blob)['sha256'][:12]}"
        raise DamagedStore(f"{root}: {name} does not match info.json ({got}; recorded {want['bytes']} "
                           f"bytes, sha256 {want['sha256'][:12]}): the last build was interrupted or the "
                           "file was changed; rerun the build")
      blobs[name] = blob
    if "records.jsonl" in blobs:
      store._records = _parse_jsonl(blobs["records.jsonl"])
    if "volumes.jsonl" in blobs:
      store._volumes = {e["key"]: e for e in _parse_jsonl(blobs["volumes.jsonl"])}
    return store

  def _kv(self) -> ts.KvStore:
    return open_kvstore(kvstore_spec(self.root))

  def records(self, split: str | None = None, task: str | None = None) -> list[dict[str, Any]]:
    if self._records is None:
      self._records = _read_jsonl(self._kv(), "records.jsonl")
    return [r for r in self._records
            if (split is None or r["split"] == split) and (task is None or r["task"] == task)]

  @property
  def report(self) -> dict[str, Any]:
    if self._report is None:
      self._report = _read_json(self._kv(), "report.json") or {}
    return self._report

  def _index(self) -> dict[str, dict[str, Any]]:
    if self._volumes is None:
      self._volumes = {e["key"]: e for e in _read_jsonl(self._kv(), "volumes.jsonl")}
    return self._volumes

  def _entry(self, key: str) -> dict[str, Any]:
    try:
      return self._index()[key]
    except KeyError:
      raise KeyError(f"{self.root}: no volume {key!r} in volumes.jsonl") from None

  def keys(self) -> list[str]:
    """Keys of the volumes the records reference."""
    return list(self._index())

  def volume_meta(self, key: str) -> dict[str, Any]:
    """The reader's meta plus "shape" and "dtype"."""
    entry = self._entry(key)
    return {**entry["meta"], "shape": list(entry["shape"]), "dtype": entry["dtype"]}

  def volume_spec(self, key: str) -> dict[str, Any]:
    """TensorStore spec of volume `key` with its metadata assumed (no metadata read on open); open it with
    `open_array` (the shared context)."""
    spec = _array_spec(kvstore_spec(self.root), key, self._entry(key)["zarr"])
    spec["assume_metadata"] = True
    return spec

  def read_volume(self, key: str) -> np.ndarray:
    """Volume `key` as a NumPy array [H, W, D, C] in its stored dtype."""
    return open_array(self.volume_spec(key), read=True).read().result()
