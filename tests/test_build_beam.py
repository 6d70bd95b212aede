"""The ingest on Apache Beam (`--runner=beam`, radfm_jax/data/ingest/beam.py) writes the store the local runner
writes: byte-identical records.jsonl / volumes.jsonl / info.json and volume files, the same report failures,
from several shards; a rerun after a crash reuses what is stored. Beam lives in its own venv (.venv-beam, made
by `make setup` / `make test`), so the Beam builds run as subprocesses of that venv's Python."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from test_build import DICOMDIR, NIB_DATA, _bad_input_tree, _ct_png, dcm

from radfm_jax.data.ingest import build, sources
from radfm_jax.data.store import Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEAM_PY = os.path.join(ROOT, ".venv-beam", "bin", "python")
TWO_WORKERS = "--runner=FnApiRunner --direct_num_workers=2 --direct_running_mode=multi_processing"


def _cli(python, *args):
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  env["PYTHONPATH"] = ROOT
  return subprocess.run([python, "-m", "radfm_jax.data.build", "--noprogress", *args], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=300)


def _beam(*args):
  assert os.access(BEAM_PY, os.X_OK), f"{BEAM_PY} missing: run `make setup` (builds .venv-beam)"
  return _cli(BEAM_PY, *args, "--runner=beam")


def _local(kind, src, out, **kw):
  src_root, shards = sources.plan_shards(kind, src, **{k: v for k, v in kw.items() if k in ("text",)})
  items, skipped, total = sources.open_all(shards)
  return build.ingest_samples(items, src_root=src_root, out=str(out), skipped=skipped, total=total,
                              progress=False, workers=0)


def _files(root):
  return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
          for d, _, fs in os.walk(root) for f in fs}


def _without_seconds(report):
  return {k: v for k, v in report.items() if k != "seconds"}


def _info_but_report(blob):
  """info.json without the report's hash (the report holds the build's seconds)."""
  info = json.loads(blob)
  del info["manifest"]["report.json"]
  return info


@pytest.fixture
def sharded_tree(tmp_path):
  """Two folders (shards) of real scans, a DICOM series and a file that is skipped."""
  src = tmp_path / "src"
  (src / "part-a" / "ct").mkdir(parents=True)
  for name in ("CT_small.dcm", "MR_small.dcm"):
    shutil.copy(dcm(name), src / "part-a" / "ct" / name)
  shutil.copytree(os.path.join(DICOMDIR, "98892001", "CT5N"), src / "part-a" / "series" / "CT5N")
  (src / "part-b").mkdir()
  shutil.copy(os.path.join(NIB_DATA, "example4d.nii.gz"), src / "part-b" / "example4d.nii.gz")
  _ct_png(src / "part-b" / "slice.png")
  shutil.copy(dcm("CT_small.dcm"), src / "part-b" / "same_as_a.dcm")     # same content as a shard-a scan
  (src / "part-b" / "README.txt").write_text("not an image")
  return src


def test_beam_matches_local_across_shards_and_rerun_after_crash_reuses_volumes(sharded_tree, tmp_path):
  pattern = str(sharded_tree / "part-*")
  local = _local("files", pattern, tmp_path / "local")
  assert local["n_failed"] == 0 and local["n_records"] == 7, local
  assert local["skipped"] == [{"path": "part-b/README.txt", "reason": "not an image file"}]
  ids = [r["id"] for r in Store.open(str(tmp_path / "local")).records()]
  assert ids == ["part-a/ct/CT_small.dcm", "part-a/ct/MR_small.dcm", "part-a/series/CT5N",
                 "part-b/example4d.nii.gz#0", "part-b/example4d.nii.gz#1", "part-b/same_as_a.dcm",
                 "part-b/slice.png"]

  out = tmp_path / "beam"
  proc = _beam(f"--src={pattern}", f"--out={out}", f"--beam_options={TWO_WORKERS}")
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  got, want = _files(out), _files(tmp_path / "local")
  assert sorted(got) == sorted(want)                   # the same files: manifest and every volume's chunks
  for name in want:
    if name not in ("report.json", "info.json"):
      assert got[name] == want[name], name             # byte for byte
  assert _info_but_report(got["info.json"]) == _info_but_report(want["info.json"])
  report = json.loads(got["report.json"])
  assert _without_seconds(report) == _without_seconds(local)
  assert report["volumes"] == {"written": 6, "reused": 1, "failed": 0, "repaired": 0}   # 7 scans, 6 contents

  # a crash after some volumes were stored: no manifest yet, one volume half-written (no meta.json)
  for name in ("info.json", "records.jsonl", "volumes.jsonl", "report.json"):
    os.remove(out / name)
  key = json.loads(want["records.jsonl"].splitlines()[2])["images"][0]["key"]
  os.remove(out / "volumes" / key / "meta.json")
  again = _beam(f"--src={pattern}", f"--out={out}")    # default options: one worker
  assert again.returncode == 0, again.stdout + again.stderr[-3000:]
  rerun = Store.open(str(out)).report
  assert rerun["volumes"] == {"written": 1, "reused": 6, "failed": 0, "repaired": 0}
  final = _files(out)
  assert {k: v for k, v in final.items() if k not in ("report.json", "info.json")} == \
      {k: v for k, v in got.items() if k not in ("report.json", "info.json")}
  assert _info_but_report(final["info.json"]) == _info_but_report(got["info.json"])


def test_beam_reports_bad_inputs_like_local(tmp_path):
  src, text = _bad_input_tree(tmp_path)
  text2 = tmp_path / "more.jsonl"                       # a second JSONL shard
  text2.write_text(json.dumps({"id": "m1", "image": "good.png", "question": "q", "answer": "a", "task": "vqa"})
                   + "\n" + json.dumps({"id": "good2", "image": "mr.dcm", "question": "q", "answer": "a",
                                        "task": "vqa"}) + "\nnot json\n")
  shards = f"{text2},{text}"
  local = _cli(sys.executable, f"--src={src}", f"--text={shards}", f"--out={tmp_path / 'local'}")
  beam = _beam(f"--src={src}", f"--text={shards}", f"--out={tmp_path / 'beam'}")
  a, b = Store.open(str(tmp_path / "local")), Store.open(str(tmp_path / "beam"))
  assert local.returncode == beam.returncode == a.report["n_failed"] == 15, beam.stdout + beam.stderr[-3000:]
  assert _without_seconds(a.report) == _without_seconds(b.report)
  for name in ("records.jsonl", "volumes.jsonl"):
    assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "beam" / name).read_bytes(), name
  assert _info_but_report((tmp_path / "local" / "info.json").read_bytes()) == \
      _info_but_report((tmp_path / "beam" / "info.json").read_bytes())
  assert [r["id"] for r in b.records()] == ["m1", "good2", "good1", "good3"]   # shards in sorted order
  dup = [f for f in b.report["failures"] if f["sample"] == "good2"]
  assert len(dup) == 1 and "duplicate id" in dup[0]["reason"]   # the later shard's good2 fails
  assert b.records()[1]["question"] == "q"
  # the summary printed by the CLI is the same too (bar the seconds)
  strip = lambda s: [ln for ln in s.splitlines() if "FAILED" in ln]  # noqa: E731
  assert strip(local.stdout) == strip(beam.stdout) and len(strip(beam.stdout)) == 15


def test_beam_runner_without_beam_says_which_venv(tmp_path):
  proc = _cli(sys.executable, f"--src={tmp_path}", f"--out={tmp_path / 'out'}", "--runner=beam")
  assert proc.returncode == 1
  (line,) = proc.stderr.strip().splitlines()
  assert ".venv-beam" in line and "requirements-beam.txt" in line and "protobuf" in line
  assert not (tmp_path / "out").exists()


def test_sources_shards_and_errors(tmp_path):
  for name in ("b", "a", "c"):
    (tmp_path / name).mkdir()
  root, shards = sources.plan_shards("files", f"{tmp_path}/[ab],{tmp_path}/c,{tmp_path}/a")
  assert root == str(tmp_path) and [os.path.basename(s.path) for s in shards] == ["a", "b", "c"]
  assert sources.plan_shards("files", str(tmp_path / "a"))[0] == str(tmp_path / "a")   # one folder: its root
  with pytest.raises(FileNotFoundError, match="matches nothing"):
    sources.plan_shards("files", f"{tmp_path}/zz*")
  with pytest.raises(ValueError, match="contains the other"):
    sources.plan_shards("files", f"{tmp_path},{tmp_path}/a")
  with pytest.raises(ValueError, match="one image folder"):
    sources.plan_shards("files", f"{tmp_path}/*", text=str(tmp_path / "t.jsonl"))


def test_beam_empty_build_leaves_the_store_as_local_does(tmp_path):
  (tmp_path / "one").mkdir()
  (tmp_path / "empty").mkdir()
  _ct_png(tmp_path / "one" / "a.png")
  out = tmp_path / "store"
  assert _local("files", str(tmp_path / "one"), out)["n_records"] == 1
  before = _files(out)
  proc = _beam(f"--src={tmp_path / 'empty'}", f"--out={out}")
  assert proc.returncode == 1 and "this build stored no records" in proc.stderr, proc.stderr[-2000:]
  assert "0 records" in proc.stdout                     # the refused build's summary
  assert _files(out) == before                         # untouched: no manifest change, no leftover key
