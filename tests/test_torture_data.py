"""Hostile input and faults for the data half: crafted headers on every reader (bounded work, clear
errors), non-regular files, bad names and --text lines (one failure each, the rest stored), process
workers that die with their parent, an atomic manifest commit, an empty rebuild that keeps the old
manifest, and --verify repairing damaged volume chunks. Every file is made on the fly in tmp_path."""
import gzip
import json
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from radfm_jax.data import store as store_lib
from radfm_jax.data.ingest import build, files
from radfm_jax.data.readers import Limits, ReadError, TooLarge, read_scan
from radfm_jax.data.store import DamagedStore, EmptyBuild, Store, StoreWriter
from radfm_jax.inference import inputs as generate_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CT5N = os.path.join(os.path.dirname(get_testdata_file("CT_small.dcm", download=False)), "dicomdirtests",
                    "98892001", "CT5N")


def dcm(name):
  return get_testdata_file(name, download=False)


# ------------------------------------------------------------------------------------ crafted files

def dicom_claiming(path, *, frames=None, rows=None, cols=None, source="CT_small.dcm"):
  """A real DICOM (a few KB of pixels) whose header claims more frames / pixels than it holds."""
  ds = pydicom.dcmread(dcm(source))
  if frames is not None:
    ds.NumberOfFrames = frames
  if rows is not None:
    ds.Rows, ds.Columns = rows, cols
  ds.save_as(path)
  return path


def dicom_with_long_value(path):
  """A real DICOM with a private OB element, just before the pixel data, claiming a 4 GiB value."""
  ds = pydicom.dcmread(dcm("CT_small.dcm"))
  ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"     # its own series, not CT_small's
  ds.save_as(path)
  blob = open(path, "rb").read()
  at = blob.index(b"\xe0\x7f\x10\x00")                          # (7FE0,0010) Pixel Data
  element = struct.pack("<HH", 0x0029, 0x1010) + b"OB\x00\x00" + struct.pack("<I", 0xFFFFFFF0)
  open(path, "wb").write(blob[:at] + element + blob[at:])
  return path


def nifti_claiming(path, shape, dtype=np.int16, vox_offset=352, data=b"\x01\x00" * 64):
  """A NIfTI-1 header claiming `shape`, followed by a few bytes of data (gzipped for .nii.gz)."""
  hdr = nib.Nifti1Header()
  hdr.set_data_shape(shape)
  hdr.set_data_dtype(dtype)
  hdr["vox_offset"] = vox_offset
  blob = hdr.binaryblock + b"\x00" * 4 + data
  with (gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb")) as f:
    f.write(blob)
  return path


def npy_claiming(path, shape, dtype="<f4", sparse_bytes=0):
  """A .npy header claiming `shape`; `sparse_bytes` > 0 extends the file (sparse: nothing on disk)."""
  header = {"descr": dtype, "fortran_order": False, "shape": tuple(shape)}
  with open(path, "wb") as f:
    np.lib.format.write_array_header_1_0(f, header)
    f.write(b"\x00" * 16)
    if sparse_bytes:
      f.truncate(sparse_bytes)
  return path


def png_claiming(path, width, height):
  """A PNG whose IHDR claims width x height (8-bit gray) with one tiny IDAT chunk."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  blob = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
          + chunk(b"IEND", b""))
  with open(path, "wb") as f:
    f.write(blob)
  return path


def jpeg_claiming(path, width, height):
  """A real 32x32 JPEG whose SOF0 marker is rewritten to claim width x height."""
  Image.fromarray(np.arange(1024, dtype=np.uint8).reshape(32, 32)).save(path, quality=90)
  blob = bytearray(open(path, "rb").read())
  sof = blob.index(b"\xff\xc0")
  blob[sof + 5:sof + 9] = struct.pack(">HH", height, width)
  open(path, "wb").write(bytes(blob))
  return path


def good_png(path, seed=0):
  Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16), dtype=np.uint8)).save(path)
  return path


# The build's own peak RSS: VmHWM of its address space (ru_maxrss would carry the forking parent's).
_PEAK = ("import atexit, re, runpy, sys; atexit.register(lambda: print('PEAK_KIB', "
         "re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1), file=sys.stderr)); "
         "runpy.run_module('radfm_jax.data.build', run_name='__main__', alter_sys=True)")


def _cli(*args, limit_as=None, **kw):
  """The build CLI in a subprocess (under RLIMIT_AS = limit_as; it prints its peak RSS on stderr)."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  def limit():
    if limit_as:
      resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))
  return subprocess.run([sys.executable, "-c", _PEAK, "--noprogress", *args],
                        capture_output=True, text=True, env=env, cwd=ROOT, preexec_fn=limit,
                        **{"timeout": 180, **kw})


def _reasons(report):
  return {f["path"] if isinstance(f["path"], str) else str(f["path"]): f["reason"] for f in report["failures"]}


# --------------------------------------------------------------------- readers: bounded, clear errors

@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
def test_dicom_header_claims_checked_before_allocation(tmp_path):
  t = time.time()
  with pytest.raises(TooLarge, match=r"frames\.dcm: the header claims 50000000 frame\(s\) x 128 x 128"):
    read_scan(dicom_claiming(tmp_path / "frames.dcm", frames=50_000_000))       # was: 15 GB, OOM kill
  with pytest.raises(TooLarge, match=r"rows\.dcm: .*16384 x 16384.*file holds only"):
    read_scan(dicom_claiming(tmp_path / "rows.dcm", rows=16384, cols=16384))
  # compressed (JPEG 2000): at least one item per frame must fit, and the size cap holds
  with pytest.raises(TooLarge, match=r"j2k_frames\.dcm: .*50000000 compressed frames"):
    read_scan(dicom_claiming(tmp_path / "j2k_frames.dcm", frames=50_000_000, source="JPEG2000.dcm"))
  with pytest.raises(TooLarge, match=r"j2k_big\.dcm: series of shape \[30000, 30000, 1, 1\].*over the size cap"):
    read_scan(dicom_claiming(tmp_path / "j2k_big.dcm", rows=30000, cols=30000, source="JPEG2000.dcm"))
  # the cap counts a whole series (5 slices of 16 x 16) and is configurable
  with pytest.raises(TooLarge, match=r"CT5N: series of shape \[16, 16, 5, 1\]"):
    read_scan(CT5N, limits=Limits(max_voxels=1000))
  assert read_scan(CT5N, limits=Limits(max_voxels=1280)).array.shape == (16, 16, 5, 1)
  # a value length of 4 GiB is never read (values over 1 MiB are deferred and this one is never asked for)
  with pytest.raises(ReadError, match=r"long\.dcm: cannot decode pixel data.*no 'Pixel Data'"):
    read_scan(dicom_with_long_value(tmp_path / "long.dcm"))
  bad = pydicom.dcmread(dcm("CT_small.dcm"))
  bad.NumberOfFrames = "12"
  bad.save_as(tmp_path / "nf_text.dcm")
  blob = (tmp_path / "nf_text.dcm").read_bytes()
  (tmp_path / "nf_text.dcm").write_bytes(blob.replace(b"\x28\x00\x08\x00IS\x02\x0012",
                                                       b"\x28\x00\x08\x00IS\x02\x00xx"))
  with pytest.raises(ReadError, match=r"nf_text\.dcm: NumberOfFrames 'xx' is not an integer"):
    read_scan(tmp_path / "nf_text.dcm")
  assert time.time() - t < 10


def test_nifti_header_claims_and_gzip_bomb(tmp_path):
  with pytest.raises(TooLarge, match=r"huge\.nii: the header claims shape \[1000, 1000, 1000\] of int16"):
    read_scan(nifti_claiming(tmp_path / "huge.nii", (1000, 1000, 1000)))
  with pytest.raises(TooLarge, match=r"huge\.nii\.gz: volume of shape \[4096, 4096, 4096\].*over the size cap"):
    read_scan(nifti_claiming(tmp_path / "huge.nii.gz", (4096, 4096, 4096), np.float32))
  with pytest.raises(TooLarge, match=r"ext\.nii\.gz: the header claims vox_offset"):
    read_scan(nifti_claiming(tmp_path / "ext.nii.gz", (4, 4, 4), vox_offset=3 * 2**30))
  # a real bomb: 32 MiB of int16 in ~150 KB of gzip, refused by a 1 Mi-voxel cap before expanding
  data = np.zeros((256, 256, 256), np.int16)
  data[0, 0, 0] = 1
  nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "bomb.nii.gz")
  assert os.path.getsize(tmp_path / "bomb.nii.gz") < 200_000
  with pytest.raises(TooLarge, match=r"bomb\.nii\.gz: volume of shape \[256, 256, 256\]"):
    read_scan(tmp_path / "bomb.nii.gz", limits=Limits(max_voxels=2**20))
  # 4D: only the selected volume counts against the cap
  nib.save(nib.Nifti1Image(np.arange(4 * 4 * 4 * 3, dtype=np.int16).reshape(4, 4, 4, 3), np.eye(4)),
           tmp_path / "t.nii.gz")
  assert read_scan(tmp_path / "t.nii.gz", 2, limits=Limits(max_voxels=64)).array.shape == (4, 4, 4, 1)
  (tmp_path / "junk.nii").write_bytes(b"\x00" * 100)
  with pytest.raises(ReadError, match=r"junk\.nii: not a readable NIfTI file"):
    read_scan(tmp_path / "junk.nii")


def test_npy_header_claims_sparse_file_and_dtypes(tmp_path):
  with pytest.raises(TooLarge, match=r"short\.npy: the header claims shape \[100000, 100000, 100\] of float32"):
    read_scan(npy_claiming(tmp_path / "short.npy", (100000, 100000, 100)))
  # 8 KB on disk, 4.4 GB apparent: the header and the file size agree, the cap refuses it
  sparse = npy_claiming(tmp_path / "sparse.npy", (1024, 1024, 1050), sparse_bytes=128 + 1024 * 1024 * 1050 * 4)
  assert os.stat(sparse).st_blocks * 512 < 1 << 20
  with pytest.raises(TooLarge, match=r"sparse\.npy: array of shape \[1024, 1024, 1050\].*over the size cap"):
    read_scan(sparse)
  np.save(tmp_path / "mask.npy", np.eye(8, dtype=bool)[..., None])
  with pytest.raises(ReadError, match=r"mask\.npy: boolean array"):
    read_scan(tmp_path / "mask.npy")
  np.save(tmp_path / "c.npy", np.ones((4, 4, 2), np.complex64))
  with pytest.raises(ReadError, match=r"c\.npy: unsupported dtype complex64"):
    read_scan(tmp_path / "c.npy")
  np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
  with pytest.raises(ReadError, match=r"obj\.npy: the array holds Python objects"):
    read_scan(tmp_path / "obj.npy")
  # a 5D case file: the cap counts the selected scan only
  np.save(tmp_path / "case.npy", np.arange(3 * 3 * 4 * 4 * 2, dtype=np.float32).reshape(3, 3, 4, 4, 2))
  assert read_scan(tmp_path / "case.npy", 1, limits=Limits(max_voxels=96)).array.shape == (4, 4, 2, 3)
  with pytest.raises(ReadError, match=r"case\.npy: index 'x' is not a non-negative integer"):
    read_scan(tmp_path / "case.npy", "x")


def test_png_jpeg_bombs_and_cap(tmp_path):
  with pytest.raises(TooLarge, match=r"bomb\.png: refused by pillow's decompression-bomb guard"):
    read_scan(png_claiming(tmp_path / "bomb.png", 100_000, 100_000))
  with pytest.raises(TooLarge, match=r"bomb\.jpg: refused by pillow's decompression-bomb guard"):
    read_scan(jpeg_claiming(tmp_path / "bomb.jpg", 65000, 65000))
  with pytest.raises(TooLarge, match=r"ok\.png: picture of shape \[16, 16, 1, 1\].*over the size cap"):
    read_scan(good_png(tmp_path / "ok.png"), limits=Limits(max_voxels=100))
  assert read_scan(tmp_path / "ok.png", limits=Limits(max_voxels=256)).array.shape == (16, 16, 1, 1)


def test_fifo_and_device_are_never_opened(tmp_path):
  fifo = tmp_path / "scan.png"
  os.mkfifo(fifo)
  unblock = threading.Timer(5, lambda: os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)))
  unblock.start()
  t = time.time()
  try:
    with pytest.raises(ReadError, match=r"scan\.png: a FIFO, not a regular file"):
      read_scan(fifo)
  finally:
    unblock.cancel()
  assert time.time() - t < 2
  os.symlink("/dev/zero", tmp_path / "zero.npy")
  with pytest.raises(ReadError, match=r"zero\.npy: a character device"):
    read_scan(tmp_path / "zero.npy")


def test_generate_image_goes_through_the_same_checks(tmp_path):
  arg = generate_inputs.parse_image(str(dicom_claiming(tmp_path / "h.dcm", frames=50_000_000)))
  with pytest.raises(TooLarge, match=r"h\.dcm: the header claims"):
    arg.read()


def test_build_under_a_memory_limit_records_hostile_scans(tmp_path):
  """A build given crafted headers (each would cost GBs unchecked) runs under RLIMIT_AS = 3 GiB, stores
  the good scan, records each hostile one, and its peak RSS stays small."""
  src = tmp_path / "src"
  src.mkdir()
  good_png(src / "good.png")
  dicom_claiming(src / "frames.dcm", frames=50_000_000)
  dicom_claiming(src / "j2k.dcm", frames=50_000_000, source="JPEG2000.dcm")
  nifti_claiming(src / "bomb.nii.gz", (4096, 4096, 4096), np.float32)
  npy_claiming(src / "sparse.npy", (1024, 1024, 1050), sparse_bytes=128 + 1024 * 1024 * 1050 * 4)
  png_claiming(src / "bomb.png", 100_000, 100_000)
  dicom_with_long_value(src / "long.dcm")
  out = tmp_path / "store"
  t = time.time()
  proc = _cli("--from=files", f"--src={src}", f"--out={out}", "--workers=2", limit_as=3 << 30)
  assert time.time() - t < 60     # headers are checked before a byte is hashed (the sparse file: 4 GiB)
  peak_kib = int(re.search(r"PEAK_KIB (\d+)", proc.stderr).group(1))
  assert peak_kib < 1 << 20, f"peak RSS {peak_kib} KiB"   # < 1 GiB (measured ~0.1 GiB)
  report = Store.open(str(out)).report
  assert proc.returncode == report["n_failed"] == 6, proc.stdout + proc.stderr
  assert report["n_records"] == 1 and [r["id"] for r in Store.open(str(out)).records()] == ["good.png"]
  reasons = _reasons(report)
  assert set(reasons) == {"frames.dcm", "j2k.dcm", "bomb.nii.gz", "sparse.npy", "bomb.png", "long.dcm"}
  assert all(re.search("claims|size cap|bomb|no 'Pixel Data'", r) for r in reasons.values()), reasons


# ------------------------------------------------------------------- a build survives any bad item

def test_bad_names_links_and_special_files_one_failure_each(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  good_png(src / "a.png", 1)
  good_png(src / "b.png", 2)
  with open(os.path.join(os.fsencode(src), b"bad\xff name.png"), "wb") as f:
    f.write(open(src / "a.png", "rb").read())
  os.symlink("loop.png", src / "loop.png")
  os.symlink("nowhere.png", src / "dangling.png")
  os.symlink("a.png", src / "alias.png")                   # a good link is followed
  os.mkfifo(src / "pipe.png")
  os.symlink("/dev/zero", src / "dev.dcm")
  proc = _cli("--from=files", f"--src={src}", f"--out={tmp_path / 'store'}", "--workers=2", timeout=60)
  store = Store.open(str(tmp_path / "store"))
  report = store.report
  assert proc.returncode == report["n_failed"] == 3, proc.stdout + proc.stderr
  assert sorted(r["id"] for r in store.records()) == ["a.png", "alias.png", "b.png"]
  reasons = _reasons(report)
  assert reasons == {"bad\\xff name.png": "the path is not valid UTF-8; rename the file",
                     "dangling.png": "a dangling symlink", "loop.png": "a symlink loop"}
  assert {s["path"]: s["reason"].split(",")[0] for s in report["skipped"]} == {
      "dev.dcm": "a character device", "pipe.png": "a FIFO"}
  assert "bad\\xff name.png" in proc.stdout      # the summary names it too


def test_bad_text_lines_one_failure_each(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  good_png(src / "a.png")
  ok = {"image": "a.png", "question": "q?", "answer": "a.", "task": "vqa"}
  lines = [
      json.dumps({**ok, "id": "good1"}).encode(),
      json.dumps({"id": "char_inf", "images": [{"path": "a.png", "char": 1e400}], "question": "q", "answer": "a",
                  "task": "vqa"}).encode(),
      json.dumps({**ok, "id": "big_index", "images": [{"path": "a.png", "index": 10**30}]}).encode(),
      b'{"id": "huge_int", "image": "a.png", "question": "q", "answer": "a", "task": "vqa", "split": '
      + b"9" * 5000 + b"}",
      json.dumps({**ok, "id": "char_str", "images": [{"path": "a.png", "char": "3"}]}).encode(),
      json.dumps({**ok, "id": "neg_index", "images": [{"path": "a.png", "index": -1}]}).encode(),
      json.dumps({**ok, "id": "q_type", "question": 5}).encode(),
      json.dumps({**ok, "id": "images_type", "images": "a.png"}).encode(),
      b'{"id": "bad_utf8", "image": "a.png", "question": "caf\xe9", "answer": "a", "task": "vqa"}',
      json.dumps({**ok, "id": "surrogate", "answer": "x\ud800"}).encode(),
      b"[" * 100_000 + b"]" * 100_000,
      json.dumps({**ok, "id": "good2", "question": "caf\u00e9 \u2603"}, ensure_ascii=False).encode(),
  ]
  text = tmp_path / "t.jsonl"
  text.write_bytes(b"\n".join(lines) + b"\n")
  proc = _cli("--from=files", f"--src={src}", f"--text={text}", f"--out={tmp_path / 'store'}", "--workers=0")
  store = Store.open(str(tmp_path / "store"))
  report = store.report
  assert proc.returncode == report["n_failed"] == 10, proc.stdout + proc.stderr
  assert [r["id"] for r in store.records()] == ["good1", "good2"]
  assert store.records()[1]["question"] == "caf\u00e9 \u2603"
  why = {f["sample"] or f"line {f['row']}": f["reason"] for f in report["failures"]}
  expect = {"line 2": "char must be a non-negative integer, got inf", "big_index": "index 10{30} out of range|"
            "index 10{30} given", "line 4": "Exceeds the limit|integer string conversion",
            "line 5": "char must be a non-negative integer, got '3'",
            "line 6": "index must be a non-negative integer, got -1", "line 7": "must be strings",
            "line 8": "'images' must be a list", "line 9": "invalid UTF-8 at byte",
            "surrogate": "answer is not valid Unicode", "line 11": "nested too deeply"}
  assert set(why) == set(expect), why
  for k, pattern in expect.items():
    assert re.search(pattern, why[k]), (k, why[k])


# ---------------------------------------------------------------------------- process-pool workers

def _children(pid):
  kids = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        stat = open(f"/proc/{entry}/stat").read()
      except OSError:
        continue
      fields = stat[stat.rindex(")") + 2:].split()
      if int(fields[1]) == pid and fields[0] != "Z":
        kids.append(int(entry))
  return kids


def _alive(pid):
  try:
    stat = open(f"/proc/{pid}/stat").read()
  except OSError:
    return False
  return stat[stat.rindex(")") + 2] != "Z"


def test_pool_workers_exit_when_the_build_is_killed(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  for i in range(600):
    good_png(src / f"{i:03d}.png", i)
  out = tmp_path / "store"
  proc = subprocess.Popen([sys.executable, "-m", "radfm_jax.data.build", "--noprogress", "--from=files",
                           f"--src={src}", f"--out={out}", "--workers=2", "--pool=process"],
                          env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  workers = []
  try:
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:   # wait until the workers are storing scans
      if os.path.isdir(out / "volumes") and len(os.listdir(out / "volumes")) >= 4:
        break
      time.sleep(0.05)
    workers = _children(proc.pid)
    assert proc.poll() is None and len(workers) >= 2, "the build ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(w) for w in workers):
      time.sleep(0.1)
    left = [w for w in workers if _alive(w)]
    assert not left, f"workers {left} outlived their parent"
  finally:
    if proc.poll() is None:
      proc.kill()
    for w in workers + _children(proc.pid):     # never leave a stray worker behind, even on failure
      if _alive(w):
        os.kill(w, signal.SIGKILL)


# ---------------------------------------------------------------------------- store commit, verify

def _tree(tmp_path, n):
  src = tmp_path / f"src{n}"
  src.mkdir(exist_ok=True)
  for i in range(n):
    good_png(src / f"{i}.png", i)
  return src


def _build(src, out, **kw):
  samples, skipped, total = files.samples_from_folder(str(src))
  return build.ingest_samples(samples, src_root=str(src), out=str(out), skipped=skipped, total=total,
                              progress=False, **kw)


class _CrashAt:
  """Wraps a StoreWriter's kvstore: raises when `name` is about to be written (a kill at that point)."""

  def __init__(self, kv, name):
    self._kv, self._name = kv, name

  def write(self, key, value):
    if key == self._name and value is not None:
      raise KeyboardInterrupt(f"killed before writing {key}")
    return self._kv.write(key, value)

  def __getattr__(self, attr):
    return getattr(self._kv, attr)


def test_manifest_commit_is_atomic(tmp_path, monkeypatch):
  out = tmp_path / "store"
  _build(_tree(tmp_path, 2), out)
  old_info = (out / "info.json").read_bytes()
  assert len(Store.open(str(out)).records()) == 2

  class Crashing(StoreWriter):
    def __init__(self, *a, **kw):
      super().__init__(*a, **kw)
      self._kv = _CrashAt(self._kv, "info.json")
  monkeypatch.setattr(build, "StoreWriter", Crashing)
  with pytest.raises(KeyboardInterrupt):
    _build(_tree(tmp_path, 3), out)                   # records.jsonl now holds 3 records, info.json ...
  assert len((out / "records.jsonl").read_text().splitlines()) == 3
  with pytest.raises(FileNotFoundError, match="did not finish"):
    Store.open(str(out))                              # ... is gone: never the old one beside new records
  (out / "info.json").write_bytes(old_info)           # even an old info.json put back is not accepted
  with pytest.raises(DamagedStore, match=r"records\.jsonl does not match info\.json.*interrupted"):
    Store.open(str(out))
  monkeypatch.setattr(build, "StoreWriter", StoreWriter)
  _build(_tree(tmp_path, 3), out)                     # the rerun commits
  assert len(Store.open(str(out)).records()) == 3


def test_empty_rebuild_keeps_the_manifest(tmp_path):
  out = tmp_path / "store"
  _build(_tree(tmp_path, 2), out)
  records = Store.open(str(out)).records()
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(EmptyBuild, match=rf"{re.escape(str(out))}: this build stored no records and would "
                                       "replace a manifest of 2 records"):
    _build(empty, out)
  assert Store.open(str(out)).records() == records
  proc = _cli("--from=files", f"--src={empty}", f"--out={out}")
  assert proc.returncode == 1 and "--allow_empty" in proc.stderr and str(out) in proc.stderr
  assert Store.open(str(out)).records() == records
  proc = _cli("--from=files", f"--src={empty}", f"--out={out}", "--allow_empty")
  assert proc.returncode == 0, proc.stderr
  assert Store.open(str(out)).records() == []


def test_verify_rewrites_damaged_chunks(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  vol = np.random.default_rng(0).integers(-1000, 1000, (40, 40, 12), dtype=np.int16)
  np.save(src / "ct.npy", vol)
  good_png(src / "x.png")
  out = tmp_path / "store"
  first = _build(src, out, chunks=(16, 16, 4))
  key = next(r["images"][0]["key"] for r in Store.open(str(out)).records() if r["id"] == "ct.npy")
  chunk_dir = out / "volumes" / key / "c"
  chunks = sorted(os.path.join(d, f) for d, _, fs in os.walk(chunk_dir) for f in fs)
  assert first["volumes"]["written"] == 2 and len(chunks) == 27
  blob = bytearray(open(chunks[5], "rb").read())      # flip bytes inside one compressed chunk
  blob[len(blob) // 2:len(blob) // 2 + 8] = bytes(b ^ 0xFF for b in blob[len(blob) // 2:len(blob) // 2 + 8])
  open(chunks[5], "wb").write(bytes(blob))
  os.remove(chunks[9])                                # and lose another (reads back as zeros)
  plain = _build(src, out, chunks=(16, 16, 4))        # a plain rebuild trusts meta.json
  assert plain["volumes"]["reused"] == 2 and plain["volumes"]["repaired"] == 0
  writer = StoreWriter(str(out))
  assert re.search("cannot decode|checksum", writer.check_volume(key))
  verified = _build(src, out, chunks=(16, 16, 4), verify=True)
  assert verified["volumes"] == {"written": 1, "reused": 1, "failed": 0, "repaired": 1}
  assert verified["repaired"][0]["path"] == "ct.npy"
  np.testing.assert_array_equal(Store.open(str(out)).read_volume(key)[..., 0], vol)
  assert StoreWriter(str(out)).check_volume(key) is None
  os.remove(chunks[9])                                # a missing chunk alone is caught by the checksum
  assert "checksum" in StoreWriter(str(out)).check_volume(key)
  proc = _cli("--from=files", f"--src={src}", f"--out={out}", "--verify", "--chunks=16,16,4")
  assert proc.returncode == 0 and "1 repaired" in proc.stdout, proc.stdout + proc.stderr
  np.testing.assert_array_equal(Store.open(str(out)).read_volume(key)[..., 0], vol)


def test_store_open_rejects_an_edited_manifest(tmp_path):
  out = tmp_path / "store"
  _build(_tree(tmp_path, 2), out)
  lines = (out / "records.jsonl").read_text().splitlines()
  (out / "records.jsonl").write_text(lines[0] + "\n")
  with pytest.raises(DamagedStore, match=r"records\.jsonl does not match info\.json \(\d+ bytes"):
    Store.open(str(out))
  (out / "records.jsonl").write_text("\n".join(lines) + "\n")
  assert len(Store.open(str(out)).records()) == 2
  os.remove(out / "volumes.jsonl")
  with pytest.raises(DamagedStore, match=r"volumes\.jsonl does not match info\.json \(missing"):
    Store.open(str(out))
  assert store_lib.MANIFEST == ("volumes.jsonl", "records.jsonl", "report.json")


def test_store_files_stay_valid_utf8(tmp_path):
  """Every manifest file is strict UTF-8 JSON even when failures name undecodable paths."""
  src = tmp_path / "src"
  src.mkdir()
  good_png(src / "a.png")
  with open(os.path.join(os.fsencode(src), b"\xfe\xff.png"), "wb") as f:
    f.write(b"not a png")
  report = _build(src, tmp_path / "store")
  assert report["n_failed"] == 1
  for name in ("records.jsonl", "volumes.jsonl", "report.json", "info.json"):
    (tmp_path / "store" / name).read_bytes().decode("utf-8")
