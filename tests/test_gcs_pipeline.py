"""gs:// end to end against a local GCS emulator (tests/gcs_emulator.py), with the real clients in
subprocesses: a store built to gs:// by the build CLI, training from that store with a gs:// workdir
killed (SIGKILL) and resumed with exactly the losses of an uninterrupted run, the params exported to
gs:// and read back, and RadBench scored from gs:// predictions into a gs:// report.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from gcs_emulator import BUCKET, GcsEmulator
from eval import predictions as predictions_lib
from eval import radbench
from eval.tasks import Item
from radfm_jax.data import demo
from radfm_jax.data import tokenizer as tokenizer_lib
from radfm_jax.data.ingest import files
from radfm_jax.data.ingest.build import ingest_samples

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_LINE = re.compile(r"step (\d+) loss ([0-9.eE+-]+|nan|inf)")
STEPS = 12
STORE = f"gs://{BUCKET}/store"
RUN = f"gs://{BUCKET}/run"


def _env(gcs, cache):
  env = gcs.env()
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


@pytest.fixture(scope="module")
def gcs():
  with GcsEmulator() as emulator:
    yield emulator


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  """Demo phantom files (12 phantoms, 24 samples), a local store of them and a tokenizer trained on it."""
  root = tmp_path_factory.mktemp("gcs_raw")
  text = demo.write_dataset(str(root), 12, 3)
  samples, _, total = files.samples_from_folder(str(root), text=text)
  report = ingest_samples(samples, src_root=str(root), out=str(root / "store"), workers=0, progress=False,
                          total=total)
  assert report["n_failed"] == 0
  tok = tokenizer_lib.train_tokenizer(str(root / "store"), str(root / "tok512"), 512)
  return {"root": root, "text": text, "store": str(root / "store"), "tok": tok,
          "cache": tmp_path_factory.mktemp("gcs_jax_cache")}


@pytest.fixture(scope="module")
def gcs_store(gcs, raw):
  """The build CLI writing straight to gs://."""
  proc = subprocess.run([sys.executable, "-m", "radfm_jax.data.build", "--from=files", f"--src={raw['root']}",
                         f"--text={raw['text']}", f"--out={STORE}", "--workers=2", "--noprogress"],
                        cwd=REPO, env=_env(gcs, raw["cache"]), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_build_store_to_gcs(gcs, raw, gcs_store):
  assert "24 records" in gcs_store.stdout and "0 failures" in gcs_store.stdout
  local = os.path.join(raw["store"])
  for name in ("records.jsonl", "volumes.jsonl"):   # content-addressed keys: the same bytes as a local build
    with open(os.path.join(local, name), "rb") as f:
      assert gcs.fs.cat(f"{BUCKET}/store/{name}") == f.read(), name
  info = json.loads(gcs.fs.cat(f"{BUCKET}/store/info.json"))
  assert info["counts"]["records"] == 24 and info["counts"]["by_split"] == {"test": 2, "train": 20, "val": 2}
  # Every volume is in the bucket: its entry (written last) and its zarr3 metadata.
  entries = [json.loads(x) for x in gcs.fs.cat(f"{BUCKET}/store/volumes.jsonl").decode().splitlines()]
  assert len({e["key"] for e in entries}) == 12
  for e in entries:
    assert json.loads(gcs.fs.cat(f"{BUCKET}/store/volumes/{e['key']}/meta.json")) == e
    assert json.loads(gcs.fs.cat(f"{BUCKET}/store/volumes/{e['key']}/zarr.json"))["shape"] == e["shape"]
  listed = {p.split("/")[-2] for p in gcs.fs.find(f"{BUCKET}/store/volumes") if p.endswith("/meta.json")}
  assert listed == {e["key"] for e in entries}


def _train(gcs, raw, workdir, tb, kill_when=None):
  cmd = [sys.executable, "-m", "radfm_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
         f"--config.total_steps={STEPS}", "--config.checkpoint_every=4", "--config.log_every=1",
         "--config.data.eval_split=", f"--config.data.store={STORE}", f"--config.data.tokenizer={raw['tok']}",
         f"--config.tensorboard_dir={tb}"]
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(gcs, raw["cache"]), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  losses, lines, killed, t0 = {}, [], False, time.time()
  for line in proc.stdout:
    lines.append(line)
    m = LOSS_LINE.search(line)
    if m:
      losses[int(m.group(1))] = m.group(2)
      if kill_when and not killed and kill_when(int(m.group(1))):
        proc.send_signal(signal.SIGKILL)
        killed = True
    if time.time() - t0 > 400:
      proc.kill()
  rc = proc.wait()
  log = "".join(lines)
  assert not kill_when or killed, f"the run ended before it could be killed:\n{log[-3000:]}"
  return rc, losses, log


def _committed(gcs, step):
  """Orbax on gs:// marks a finished step with commit_success.txt (no atomic rename on GCS)."""
  gcs.fs.invalidate_cache()
  return gcs.fs.exists(f"{BUCKET}/run/checkpoints/{step}/commit_success.txt")


def _trained(gcs, raw, tmp_path_factory):
  """An uninterrupted local-workdir run, then a gs:// workdir run SIGKILLed after its step-4 checkpoint and
  restarted."""
  ref_dir = tmp_path_factory.mktemp("gcs_ref")
  rc, ref, log = _train(gcs, raw, ref_dir, ref_dir / "tb")
  assert rc == 0, log[-3000:]
  tb = tmp_path_factory.mktemp("gcs_tb")
  rc1, first, log1 = _train(gcs, raw, RUN, tb, kill_when=lambda s: s >= 5 and _committed(gcs, 4))
  rc2, second, log2 = _train(gcs, raw, RUN, tb)
  return dict(ref=ref, ref_dir=ref_dir, rc1=rc1, first=first, rc2=rc2, second=second, log2=log2)


def test_train_on_gcs_killed_resumed_exactly_then_exported(gcs, raw, gcs_store, tmp_path_factory):
  """One test (not a shared fixture): under pytest-xdist the runs happen once, on one worker."""
  trained = _trained(gcs, raw, tmp_path_factory)
  ref, first, second = trained["ref"], trained["first"], trained["second"]
  assert sorted(ref) == list(range(1, STEPS + 1))
  assert trained["rc1"] == -signal.SIGKILL and max(first) < STEPS
  assert trained["rc2"] == 0, trained["log2"][-3000:]
  resumed = int(re.search(r"Resuming from checkpoint (\d+)", trained["log2"]).group(1))
  assert 4 <= resumed <= max(first)
  assert sorted(second) == list(range(resumed + 1, STEPS + 1))
  for step, loss in list(first.items()) + list(second.items()):
    assert loss == ref[step], (step, loss, ref[step])
  # Orbax checkpoints, Grain iterator state and metrics.jsonl all live in the bucket.
  gcs.fs.invalidate_cache()
  steps = sorted(int(p.rsplit("/", 1)[1]) for p in gcs.fs.ls(f"{BUCKET}/run/checkpoints") if p[-1].isdigit())
  assert steps == [4, 8, 12]
  assert all(gcs.fs.exists(f"{BUCKET}/run/checkpoints/{s}/commit_success.txt") for s in steps)
  assert gcs.fs.exists(f"{BUCKET}/run/checkpoints/{STEPS}/data/process_0-of-1.json")
  got = [json.loads(x) for x in gcs.fs.cat(f"{BUCKET}/run/metrics.jsonl").decode().splitlines()]
  with open(trained["ref_dir"] / "metrics.jsonl") as f:
    want = [json.loads(x) for x in f]
  losses = lambda records: [(r["step"], r["loss"]) for r in records if "loss" in r]  # noqa: E731
  assert losses(got) == losses(want)
  _export_and_read_back(gcs, raw, trained)


def _export_and_read_back(gcs, raw, trained):
  env = _env(gcs, raw["cache"])
  dst = f"gs://{BUCKET}/export"
  proc = subprocess.run([sys.executable, "-m", "radfm_jax.export", f"--workdir={RUN}", f"--dst={dst}"], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == dst
  meta = json.loads(gcs.fs.cat(f"{BUCKET}/export/radfm_jax.json"))
  assert meta["extra"] == {"source": RUN, "step": STEPS} and meta["tokenizer"]["file"] == "tokenizer.model"
  with open(raw["tok"], "rb") as f:
    assert gcs.fs.cat(f"{BUCKET}/export/tokenizer.model") == f.read()
  # The export read back from gs:// equals the uninterrupted local run's export, parameter for parameter.
  local = str(trained["ref_dir"] / "export")
  check = (
      "import sys, numpy as np\n"
      "from radfm_jax import checkpoint\n"
      "from radfm_jax.training import export\n"
      "export.export(sys.argv[1], sys.argv[2])\n"
      "names = sorted(checkpoint.param_metadata(sys.argv[2]))\n"
      "a, b = checkpoint.read_params(sys.argv[2], names), checkpoint.read_params(sys.argv[3], names)\n"
      "cfg = checkpoint.load_config(sys.argv[3])\n"
      "print(len(names), max(float(np.abs(a[n] - b[n]).max()) for n in names), cfg.data.tokenizer)\n")
  proc = subprocess.run([sys.executable, "-c", check, str(trained["ref_dir"]), local, dst], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  n, diff, tok = proc.stdout.split()
  assert int(n) > 20 and float(diff) == 0.0 and tok == f"{dst}/tokenizer.model"


def test_radbench_scores_gcs_predictions_into_gcs(gcs, raw, tmp_path):
  items = [Item(id=f"m{i}", task="modality", question="Which modality?", answer=a, prediction=p,
                meta={"dim": "2D"}, source="demo")
           for i, (a, p) in enumerate([("CT", "CT"), ("MR", "CT"), ("X-ray", "X-ray"), ("CT", "CT")])]
  items += [Item(id="r0", task="report", question="Findings?", answer="No acute abnormality.",
                 prediction="No acute abnormality seen.", meta={"dim": "2D"}, source="demo")]
  predictions_lib.write(items, tmp_path / "local_in")
  gcs.fs.put(str(tmp_path / "local_in" / "predictions.jsonl"), f"{BUCKET}/preds/predictions.jsonl")
  args = ["--n_boot=50", "--embedding_model=/nonexistent", "--nometeor"]
  preds = f"gs://{BUCKET}/preds/predictions.jsonl"
  proc = subprocess.run([sys.executable, "-m", "eval.radbench", f"--predictions={preds}",
                         f"--out=gs://{BUCKET}/radbench", *args], cwd=REPO, env=_env(gcs, raw["cache"]),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"report: gs://{BUCKET}/radbench/report.md" in proc.stdout
  names = {p.rsplit("/", 1)[1] for p in gcs.fs.ls(f"{BUCKET}/radbench")}
  assert {"predictions.jsonl", "predictions.csv", "metrics.json", "report.md", "task_scores.png"} <= names
  assert gcs.fs.cat(f"{BUCKET}/radbench/task_scores.png")[:8] == b"\x89PNG\r\n\x1a\n"
  remote = json.loads(gcs.fs.cat(f"{BUCKET}/radbench/metrics.json"))
  assert remote["tasks"]["modality"]["metrics"]["accuracy"]["value"] == pytest.approx(0.75)
  # The same scoring on local paths gives the same numbers.
  scorers = radbench.make_scorers(embedding_model="/nonexistent", meteor=False)
  try:
    local = radbench.score_and_report(*predictions_lib.read(str(tmp_path / "local_in" / "predictions.jsonl")),
                                      tmp_path / "local_out", scorers, n_boot=50)
  finally:
    scorers.close()
  assert remote["tasks"] == json.loads(json.dumps(local["tasks"]))
  csv_rows = gcs.fs.cat(f"{BUCKET}/radbench/predictions.csv").decode().splitlines()
  assert len(csv_rows) == len(items) + 1
