"""Preemption and exact resume of `python -m radfm_jax.train` (tiny config, 8 fake CPU devices).

A reference run goes uninterrupted; other runs of the same command are stopped mid-run by SIGTERM (they
checkpoint and exit cleanly) or SIGKILL (no warning), then restarted in the same workdir. Every step
printed by any of them must show exactly the reference's loss (same data, same order, same numbers).
The runs share a persistent compilation cache so that only the first one compiles.
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from radfm_jax.training import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40
LOSS_LINE = re.compile(r"step (\d+) loss ([0-9.eE+-]+|nan|inf)")


def _command(workdir):
  return [sys.executable, "-m", "radfm_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
          f"--config.total_steps={STEPS}", "--config.checkpoint_every=4", "--config.log_every=1",
          "--config.data.eval_split="]


def _env(cache_dir):
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  return env


def _run(workdir, cache_dir, stop_when=None, sig=None, timeout=300):
  """Runs the training command; when `stop_when(step, workdir)` first holds for a printed step, sends
  `sig`. Returns (return code, {step: printed loss}, full log)."""
  proc = subprocess.Popen(_command(workdir), cwd=REPO, env=_env(cache_dir), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  losses, lines, sent, t0 = {}, [], False, time.time()
  for line in proc.stdout:
    lines.append(line)
    m = LOSS_LINE.search(line)
    if m:
      step = int(m.group(1))
      losses[step] = m.group(2)
      if stop_when and not sent and stop_when(step, workdir):
        proc.send_signal(sig)
        sent = True
    if time.time() - t0 > timeout:
      proc.kill()
      break
  rc = proc.wait()
  log = "".join(lines)
  crash = log.find("Fatal Python error")
  context = log[crash:crash + 3000] if crash >= 0 else log[-3000:]
  assert not stop_when or sent, (f"the run ended (rc={rc}, last step {max(losses, default=None)}) before it "
                                 f"could be stopped:\n{context}")
  return rc, losses, log


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
  workdir = tmp_path_factory.mktemp("reference")
  rc, losses, log = _run(workdir, cache_dir)
  assert rc == 0, log[-3000:]
  assert sorted(losses) == list(range(1, STEPS + 1))
  return workdir, losses


def _checkpointed(step: int):
  return lambda s, workdir: s >= step and os.path.isdir(os.path.join(workdir, "checkpoints", "4"))


def test_sigkill_then_restart_reproduces_every_loss(reference, cache_dir, tmp_path):
  ref_dir, ref = reference
  rc, first, log1 = _run(tmp_path, cache_dir, stop_when=_checkpointed(6), sig=signal.SIGKILL)
  assert rc == -signal.SIGKILL
  killed_at = max(first)
  assert killed_at < STEPS
  rc, second, log2 = _run(tmp_path, cache_dir)
  assert rc == 0, log2[-3000:]
  resumed = int(re.search(r"Resuming from checkpoint (\d+)", log2).group(1))
  assert 4 <= resumed <= killed_at
  assert sorted(second) == list(range(resumed + 1, STEPS + 1))
  for step, loss in list(first.items()) + list(second.items()):
    assert loss == ref[step], (step, loss, ref[step])
  # metrics.jsonl holds each step once, with the reference's numbers.
  got = [(r["step"], r["loss"]) for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl")) if "loss" in r]
  want = [(r["step"], r["loss"]) for r in metrics.read_jsonl(str(ref_dir / "metrics.jsonl")) if "loss" in r]
  assert got == want


def test_sigterm_checkpoints_exits_cleanly_and_resumes_exactly(reference, cache_dir, tmp_path):
  _, ref = reference
  rc, first, log1 = _run(tmp_path, cache_dir, stop_when=lambda s, _: s >= 5, sig=signal.SIGTERM)
  assert rc == 0, log1[-3000:]
  stopped = int(re.search(r"Preempted: checkpoint (\d+) saved", log1).group(1))
  assert stopped == max(first) < STEPS
  assert os.path.isdir(tmp_path / "checkpoints" / str(stopped))
  rc, second, log2 = _run(tmp_path, cache_dir)
  assert rc == 0, log2[-3000:]
  assert f"Resuming from checkpoint {stopped}" in log2
  assert sorted(second) == list(range(stopped + 1, STEPS + 1))
  for step, loss in list(first.items()) + list(second.items()):
    assert loss == ref[step], (step, loss, ref[step])
