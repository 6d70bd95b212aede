"""Multi-process training: 2 processes x 4 CPU devices on localhost (jax.distributed over gloo) train and
checkpoint; then 1 process x 8 devices resumes from that checkpoint."""
import os
import re
import socket
import subprocess
import sys

from radfm_jax.training import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_LINE = re.compile(r"step (\d+) loss ([0-9.eE+-]+|nan|inf)")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  return env


def _command(workdir, steps, *extra):
  return [sys.executable, "-m", "radfm_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
          f"--config.total_steps={steps}", "--config.checkpoint_every=2", "--config.log_every=1", *extra]


def _losses(log: str) -> dict[int, str]:
  return {int(m.group(1)): m.group(2) for m in LOSS_LINE.finditer(log)}


def test_two_processes_train_then_one_process_resumes(tmp_path):
  port = _free_port()
  procs = [subprocess.Popen(
      _command(tmp_path, 4, "--coordinator=127.0.0.1:%d" % port, "--num_processes=2", f"--process_id={i}"),
      cwd=REPO, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=400)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]
  assert "Process 0/2, 4 local / 8 global devices" in logs[0]
  assert "Process 1/2, 4 local / 8 global devices" in logs[1]
  # Both processes compute the same global step: identical losses.
  l0, l1 = _losses(logs[0]), _losses(logs[1])
  assert sorted(l0) == [1, 2, 3, 4] and l0 == l1
  ckpt = tmp_path / "checkpoints" / "4"
  assert sorted(f for f in os.listdir(ckpt / "data") if f.endswith(".json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
  # Only process 0 writes metrics.jsonl. Validation at the end: each process feeds its half of every
  # batch with its rows' labels; all 21 closed questions of the demo val split are counted once.
  records = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
  val = [r for r in records if "val/loss" in r]
  assert len(val) == 1 and val[0]["val/closed_count"] == 21
  v0, v1 = (re.findall(r"validation (.*) \(", log) for log in logs)
  assert len(v0) == 1 and v0 == v1

  single = subprocess.run(_command(tmp_path, 6, "--config.data.eval_split="), cwd=REPO, env=_env(8),
                          capture_output=True, text=True, timeout=400)
  log = single.stdout + single.stderr
  assert single.returncode == 0, log[-4000:]
  assert "Process 0/1, 8 local / 8 global devices" in log
  assert "Resuming from checkpoint 4" in log
  assert "no data-iterator state for process 0 of 1" in log  # 2 -> 1 processes: the stream restarts
  resumed = _losses(log)
  assert sorted(resumed) == [5, 6]
  assert all(float(v) < float(l0[1]) for v in resumed.values())
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [2, 4, 6]
