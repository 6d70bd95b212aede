"""Ingest: files mode round trips real files, keeps PHI out, records every kind of bad input and goes on,
re-runs idempotently, runs in parallel, and wires --from=radfm to the adapters."""
import json
import os
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from radfm_jax.data.ingest import build, files
from radfm_jax.data.readers import read_scan
from radfm_jax.data.store import Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NIB_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")


def dcm(name):
  return get_testdata_file(name, download=False)


DICOMDIR = os.path.join(os.path.dirname(dcm("CT_small.dcm")), "dicomdirtests")


def _ct_png(path):
  hu = read_scan(dcm("CT_small.dcm")).array[..., 0, 0].astype(np.float32)
  Image.fromarray(np.clip((hu + 160) / 400 * 255, 0, 255).astype(np.uint8)).save(path)


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "radfm_jax.data.build", "--noprogress", *args],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def _ingest_folder(src, out, **kw):
  samples, skipped, total = files.samples_from_folder(str(src), redact=kw.get("redact_paths", False))
  return build.ingest_samples(samples, src_root=str(src), out=str(out), skipped=skipped, total=total,
                              progress=False, **kw)


@pytest.fixture
def real_tree(tmp_path):
  src = tmp_path / "src"
  (src / "ct").mkdir(parents=True)
  for name in ("CT_small.dcm", "MR_small.dcm", "693_J2KI.dcm"):
    shutil.copy(dcm(name), src / "ct" / name)
  shutil.copytree(os.path.join(DICOMDIR, "98892001", "CT5N"), src / "series" / "CT5N")
  (src / "nifti").mkdir()
  for name in ("anatomical.nii", "example4d.nii.gz"):
    shutil.copy(os.path.join(NIB_DATA, name), src / "nifti" / name)
  _ct_png(src / "slice.png")
  Image.open(src / "slice.png").save(src / "slice.jpg", quality=90)
  (src / "README.txt").write_text("not an image")
  return src


def test_files_mode_round_trip_and_idempotent_rerun(real_tree, tmp_path):
  out = tmp_path / "store"
  report = _ingest_folder(real_tree, out, workers=2)
  assert report["n_failed"] == 0, report["failures"]
  assert report["skipped"] == [{"path": "README.txt", "reason": "not an image file"}]
  store = Store.open(str(out))
  records = store.records()
  ids = [r["id"] for r in records]
  assert ids == ["ct/693_J2KI.dcm", "ct/CT_small.dcm", "ct/MR_small.dcm", "nifti/anatomical.nii",
                 "nifti/example4d.nii.gz#0", "nifti/example4d.nii.gz#1", "series/CT5N", "slice.jpg", "slice.png"]
  assert all(r["task"] == "caption" and r["question"] == r["answer"] == "" for r in records)
  for r in records:
    prov = r["provenance"]["images"][0]
    vol = read_scan(os.path.join(real_tree, prov["path"]), prov["index"])
    key = r["images"][0]["key"]
    np.testing.assert_array_equal(store.read_volume(key), vol.array)
    meta = store.volume_meta(key)
    assert meta["shape"] == list(vol.array.shape) and meta.get("spacing") == vol.meta.get("spacing")
    assert meta.get("orientation") == vol.meta.get("orientation") and meta["unit"] == vol.meta["unit"]
    assert key == prov["hash"][:32]
  assert report["volumes"] == {"written": 9, "reused": 0, "failed": 0, "repaired": 0}
  again = _ingest_folder(real_tree, out, workers=0)
  assert again["volumes"] == {"written": 0, "reused": 9, "failed": 0, "repaired": 0}
  assert Store.open(str(out)).records() == records


def _phi_values(paths):
  values = set()
  tags = ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate",
          "ContentDate", "AccessionNumber", "InstitutionName", "ReferringPhysicianName", "StudyInstanceUID",
          "SeriesInstanceUID", "SOPInstanceUID", "StudyID")
  for p in paths:
    try:
      ds = pydicom.dcmread(p, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - README files in the tree
      continue
    for tag in tags:
      value = str(ds.get(tag) or "").strip()
      values.update(v for v in [value, *value.split("^")] if len(v) >= 6)
  return values


def test_phi_never_reaches_the_store(tmp_path):
  src = tmp_path / "src"
  shutil.copytree(DICOMDIR, src / "dicomdirtests")
  for name in ("CT_small.dcm", "MR_small.dcm", "rtdose.dcm", "SC_rgb_rle_2frame.dcm", "eCT_Supplemental.dcm",
               "693_J2KI.dcm"):
    shutil.copy(dcm(name), src / name)
  all_files = [os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs]
  phi = _phi_values(all_files)
  assert {"Doe^Peter", "77654033", "CompressedSamples^CT1", "Lastname^Firstname", "20040119"} <= phi
  out = tmp_path / "store"
  report = _ingest_folder(src, out, workers=2, redact_paths=True)
  assert report["n_records"] >= 12          # the images made it in ...
  blobs = [open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(out) for f in fs]
  assert len(blobs) > 20
  for value in sorted(phi):                 # ... and no identifying value did, anywhere
    needle = value.encode()
    assert not any(needle in b for b in blobs), f"{value!r} found in the store"
  # without --redact_paths the folder named by patient ID is recorded as given (why the flag exists)
  plain = _ingest_folder(src, tmp_path / "plain", workers=0)
  assert any("77654033" in (f["path"] if isinstance(f["path"], str) else "") for f in plain["failures"])


def _bad_input_tree(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  _ct_png(src / "good.png")
  shutil.copy(dcm("MR_small.dcm"), src / "mr.dcm")
  shutil.copy(dcm("MR_truncated.dcm"), src / "truncated.dcm")
  (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
  (src / "notes.txt").write_text("not an image")
  np.save(src / "nan.npy", np.array([[1.0, np.nan], [2.0, 3.0]], np.float32))
  np.save(src / "empty.npy", np.zeros((0, 8, 8), np.int16))
  np.save(src / "flat.npy", np.full((8, 8, 4), 5, np.int16))
  (src / "mixed").mkdir()
  for i, (name, z) in enumerate([("CT_small.dcm", 0), ("CT_small.dcm", 5), ("MR_small.dcm", 10)]):
    ds = pydicom.dcmread(dcm(name))
    ds.SeriesInstanceUID, ds.ImagePositionPatient = "1.2.3", [0, 0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.save_as(src / "mixed" / f"{i}.dcm")
  rows = [
      {"id": "good1", "image": "good.png", "question": "What is shown?", "answer": "A CT slice.", "task": "vqa"},
      {"id": "good2", "image": ["good.png", "mr.dcm"], "question": "Compare.", "answer": "CT vs MR.",
       "task": "vqa", "split": "test"},
      {"id": "good3", "images": [{"path": "mr.dcm", "field": "answer", "char": 3}], "question": "Describe.",
       "answer": "An MR slice.", "task": "caption", "meta": {"modality": "MR"}},
      {"id": "trunc", "image": "truncated.dcm", "question": "q", "answer": "a", "task": "vqa"},
      {"id": "corrupt", "image": "corrupt.png", "question": "q", "answer": "a", "task": "vqa"},
      {"id": "text", "image": "notes.txt", "question": "q", "answer": "a", "task": "vqa"},
      {"id": "nan", "image": "nan.npy", "question": "q", "answer": "a", "task": "vqa"},
      {"id": "empty", "image": "empty.npy", "question": "q", "answer": "a", "task": "vqa"},
      {"id": "flat", "image": "flat.npy", "question": "q", "answer": "a", "task": "vqa"},
      {"id": "mixed", "image": "mixed", "question": "q", "answer": "a", "task": "vqa"},
      {"id": "missing", "image": "nowhere/scan.nii.gz", "question": "q", "answer": "a", "task": "vqa"},
      {"id": "escape", "image": "../outside.png", "question": "q", "answer": "a", "task": "vqa"},
      {"id": "badtask", "image": "good.png", "question": "q", "answer": "a", "task": "segmentation"},
      {"id": "good1", "image": "good.png", "question": "dup", "answer": "dup", "task": "vqa"},
  ]
  text = tmp_path / "text.jsonl"
  with open(text, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
    f.write("{not json\n")
    f.write(json.dumps({"image": "good.png", "question": "no answer or task"}) + "\n")
  return src, text


def test_bad_input_recorded_build_goes_on_exit_status_and_rerun(tmp_path):
  src, text = _bad_input_tree(tmp_path)
  out = tmp_path / "store"
  proc = _cli("--from=files", f"--src={src}", f"--text={text}", f"--out={out}", "--workers=2")
  store = Store.open(str(out))
  report = store.report
  assert proc.returncode == report["n_failed"] == 13, proc.stdout + proc.stderr
  assert sorted(r["id"] for r in store.records()) == ["good1", "good2", "good3"]
  assert store.records(split="test")[0]["images"][1]["key"] == store.records()[2]["images"][0]["key"]
  reasons = {(f["sample"] or f"row {f['row']}"): (f["path"], f["reason"]) for f in report["failures"]}
  expect = {
      "trunc": ("truncated.dcm", "cannot decode pixel data"), "corrupt": ("corrupt.png", "cannot decode"),
      "text": ("notes.txt", "not an image file"), "nan": ("nan.npy", "NaN"),
      "empty": ("empty.npy", "empty volume"), "flat": ("flat.npy", "constant volume"),
      "mixed": ("mixed", "inconsistent series: slice sizes"),
      "missing": ("nowhere/scan.nii.gz", "missing image"),
      "escape": ("text", "outside the source root"), "badtask": ("text", "task 'segmentation'"),
      "good1": ("text", "duplicate id"), "row 15": ("text.jsonl", "invalid JSON|Expecting"),
      "row 16": ("text.jsonl", "missing field"),
  }
  for sample, (path, pattern) in expect.items():
    got_path, reason = reasons[sample]
    assert got_path == path and re.search(pattern, reason), (sample, got_path, reason)
    assert str(tmp_path) not in reason                    # paths are relative to the source root
  assert len(report["failures"]) == 13 and report["volumes"]["written"] == 2
  # the re-run skips stored volumes and reproduces the manifest and the failures
  rerun = _cli("--from=files", f"--src={src}", f"--text={text}", f"--out={out}", "--workers=0")
  assert rerun.returncode == 13
  again = Store.open(str(out))
  assert again.records() == store.records() and again.report["volumes"]["written"] == 0
  assert again.report["failures"] == report["failures"]


def test_process_pool_matches_inline(real_tree, tmp_path):
  inline = _ingest_folder(real_tree, tmp_path / "a", workers=0)
  pooled = _ingest_folder(real_tree, tmp_path / "b", workers=2, pool="process")
  assert pooled["n_records"] == inline["n_records"] == 9
  assert Store.open(str(tmp_path / "a")).records() == Store.open(str(tmp_path / "b")).records()


def test_radfm_mode_calls_the_adapter(tmp_path):
  images = tmp_path / "images"
  (images / "figs").mkdir(parents=True)
  _ct_png(images / "figs" / "a.png")
  csv = tmp_path / "vqarad_test.csv"
  csv.write_text("Figure_path,Question,Answer\nfigs/a.png,Is this a CT?,yes\nfigs/missing.png,Where?,chest\n"
                 ",no figure,no\n")
  out = tmp_path / "store"
  proc = _cli("--from=radfm", "--dataset=vqa_rad", f"--src={csv}", f"--image_root={images}", f"--out={out}",
              "--split=test")
  store = Store.open(str(out))
  assert proc.returncode == store.report["n_failed"] == 2, proc.stdout + proc.stderr
  (rec,) = store.records()
  assert rec["split"] == "test" and rec["answer"] == "yes" and rec["meta"]["closed"]
  assert rec["provenance"]["images"][0]["path"] == "figs/a.png"
  paths = sorted(str(f["path"]) for f in store.report["failures"])
  assert "figs/missing.png" in paths
