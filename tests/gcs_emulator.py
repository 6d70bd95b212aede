"""A local GCS endpoint for gs:// tests: gcp-storage-emulator, in memory, on a free port.

  with GcsEmulator() as gcs:
    subprocess.run([...], env=gcs.env())       # the real clients, pointed at the emulator
    gcs.fs.cat("testbucket/run/metrics.jsonl")  # read back from this process (gcsfs, explicit endpoint)

The variables are handed to subprocesses only (never set in the test process): TensorStore, gcsfs and
etils.epath read them when they first talk to GCS, and some cache the endpoint.
  STORAGE_EMULATOR_HOST            gcsfs / google-cloud-storage endpoint
  TENSORSTORE_GCS_HTTP_URL         TensorStore's gcs driver endpoint (Orbax arrays, stores)
  GOOGLE_AUTH_TOKEN_FOR_TESTING    TensorStore: no credential lookup
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false   gcsfs: no 60 s gRPC bucket-type probe
  FSSPEC_GCS_TOKEN=anon            gcsfs: anonymous
  EPATH_USE_TF=false               etils.epath: gcsfs, not TensorFlow's gfile (TensorFlow's GCS client has
                                   no endpoint override: it would go to storage.googleapis.com)
TensorBoard event files are written by TensorFlow, so runs against the emulator put them in a local
folder (the `tensorboard_dir` config key); everything else of a gs:// workdir goes to the emulator.

Two emulator gaps are filled here (both break TensorStore, hence stores and Orbax checkpoints):
  * its object listing ignores `startOffset` / `endOffset`, which TensorStore uses to delete a key range
    (e.g. `delete_existing` when a store volume is written): a range delete wiped the whole bucket;
  * its media downloads carry no `x-goog-generation` header, which TensorStore reads before a conditional
    overwrite ("Malformed StorageGeneration", e.g. Orbax re-saving a step a killed run left half-written).
"""
from __future__ import annotations

import os
import socket

from gcsfs.core import GCSFileSystem  # the plain client: no bucket-type (HNS) probe
from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.handlers import objects as emulator_objects
from gcp_storage_emulator.server import create_server

BUCKET = "testbucket"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _ls_with_offsets(request, response, storage, *args, **kwargs):
  """objects.list honouring startOffset (inclusive) and endOffset (exclusive) on object names."""
  start = (request.query.get("startOffset") or [None])[0]
  end = (request.query.get("endOffset") or [None])[0]
  if start is None and end is None:
    return emulator_objects.ls(request, response, storage, *args, **kwargs)
  keep = lambda name: (start is None or name >= start) and (end is None or name < end)  # noqa: E731
  unfiltered = storage.get_file_list

  def filtered(*a, **k):
    files, prefixes = unfiltered(*a, **k)
    return [f for f in files if keep(f.get("name") or "")], [p for p in prefixes if keep(p)]

  storage.get_file_list = filtered
  try:
    return emulator_objects.ls(request, response, storage, *args, **kwargs)
  finally:
    del storage.get_file_list


def _with_generation(handler):
  """`handler` (a media download) plus the object's generation headers, as GCS sends them."""
  def patched(request, response, storage, *args, **kwargs):
    handler(request, response, storage, *args, **kwargs)
    _add_generation(request, response, storage)
  return patched


def _add_generation(request, response, storage) -> None:
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # pylint: disable=broad-except  (not found: the download already answered 404)
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


_PATCHES = {emulator_objects.ls: _ls_with_offsets, emulator_objects.get: _with_generation(emulator_objects.get),
            emulator_objects.download: _with_generation(emulator_objects.download)}
for _, _handlers in emulator_server.HANDLERS:
  if _handlers.get(emulator_server.GET) in _PATCHES:
    _handlers[emulator_server.GET] = _PATCHES[_handlers[emulator_server.GET]]


class GcsEmulator:
  def __init__(self, bucket: str = BUCKET):
    self.bucket = bucket
    self.port = _free_port()
    self.url = f"http://localhost:{self.port}"
    self._server = create_server("localhost", self.port, in_memory=True, default_bucket=bucket)
    self.fs = GCSFileSystem(endpoint_url=self.url, token="anon", skip_instance_cache=True)

  def env(self, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    env.update(STORAGE_EMULATOR_HOST=self.url, TENSORSTORE_GCS_HTTP_URL=self.url,
               GOOGLE_AUTH_TOKEN_FOR_TESTING="dummy", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
               FSSPEC_GCS_TOKEN="anon", EPATH_USE_TF="false")
    return env

  def __enter__(self) -> GcsEmulator:
    self._server.start()
    return self

  def __exit__(self, *exc) -> None:
    self._server.stop()
