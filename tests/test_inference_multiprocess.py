"""Multi-process inference, as the launchers run it (one process per host): `generate --batch_file` and
`eval.radbench --checkpoint` with 2 processes x 4 CPU devices (jax.distributed over gloo on localhost)
give exactly the predictions of 1 process x 8 devices."""
import json
import os
import socket
import subprocess
import sys

import pytest

import generation_fixtures
from radfm_jax.data import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW = 6


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, cache) -> dict:
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
              TF_CPP_MIN_LOG_LEVEL="3", JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _run(cmd, processes: int, cache):
  """Runs `cmd` as 1 process x 8 devices or 2 processes x 4 devices; returns each process's stdout."""
  if processes == 1:
    res = subprocess.run(cmd, cwd=REPO, env=_env(8, cache), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    return [res.stdout], [res.stderr]
  port = _free_port()
  procs = [subprocess.Popen([*cmd, f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                            cwd=REPO, env=_env(4, cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  return [o for o, _ in outs], [e for _, e in outs]


def _json_lines(out: str) -> list[dict]:
  """The answers on stdout (gloo prints its own "[Gloo] ..." lines there too)."""
  return [json.loads(x) for x in out.splitlines() if x.startswith("{")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("infer_mp")
  demo.make_demo(str(root / "demo"), n=20, seed=1, workers=0)
  store = str(root / "demo" / "store")
  ckpt = generation_fixtures.tiny_checkpoint(root, store, store=store)
  lines = [json.loads(x) for x in open(root / "demo" / "text.jsonl")][:11]   # 2D PNGs and 3D NIfTIs
  with open(root / "batch.jsonl", "w") as f:
    for x in lines:
      f.write(json.dumps({"id": x["id"], "prompt": x["question"], "images": [x["image"]]}) + "\n")
  assert {os.path.splitext(x["image"])[1] for x in lines} == {".png", ".gz"}
  return dict(root=root, store=store, ckpt=ckpt, batch=str(root / "demo" / "batch.jsonl"),
              cache=tmp_path_factory.mktemp("infer_mp_cache"))


def test_generate_batch_file_two_processes_equals_one(setup):
  os.replace(setup["root"] / "batch.jsonl", setup["batch"])  # image paths are relative to the batch file
  cmd = [sys.executable, "-m", "radfm_jax.generate", f"--checkpoint={setup['ckpt']}",
         f"--batch_file={setup['batch']}", "--batch_size=8", f"--max_new_tokens={MAX_NEW}"]
  (one,), _ = _run(cmd, 1, setup["cache"])
  (p0, p1), errs = _run(cmd, 2, setup["cache"])
  assert "process 0 of 2, 4 local / 8 global devices" in errs[0]
  want = _json_lines(one)
  assert len(want) == 11 and all("prediction" in r for r in want)
  assert _json_lines(p0) == want
  assert _json_lines(p1) == []   # every process holds every answer; process 0 prints them
  assert len({r["prediction"] for r in want}) > 1


def test_radbench_two_processes_equals_one(setup, tmp_path):
  def cmd(out):
    return [sys.executable, "-m", "eval.radbench", f"--checkpoint={setup['ckpt']}", f"--store={setup['store']}",
            "--split=train", "--limit=12", f"--out={out}", f"--max_new_tokens={MAX_NEW}", "--n_boot=20",
            "--embedding_model=/nonexistent", "--nometeor"]
  _run(cmd(tmp_path / "one"), 1, setup["cache"])
  _, errs = _run(cmd(tmp_path / "two"), 2, setup["cache"])
  assert "process 1 of 2, 4 local / 8 global devices" in errs[1]
  one = [json.loads(x) for x in open(tmp_path / "one" / "predictions.jsonl")]
  two = [json.loads(x) for x in open(tmp_path / "two" / "predictions.jsonl")]
  assert len(one) >= 10 and one == two   # 12 records; scoring may set aside duplicates / empty answers
  m1, m2 = (json.load(open(tmp_path / d / "metrics.json")) for d in ("one", "two"))
  assert m1["tasks"] == m2["tasks"] and m2["run"]["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
