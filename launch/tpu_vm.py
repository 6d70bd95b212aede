r"""TPU VM pod slices with gcloud queued resources: create, install, run on every worker, delete.

  python -m launch.tpu_vm --name=r1 --project=P --zone=us-east5-a --accelerator=v5p-64 [--spot] \
      --entry=train --config=configs/radmd_finetune.py --workdir=gs://BUCKET/runs/r1 [--config.k=v] \
      [--num_slices=2] [--dry_run] [--plan=plan.json]

Steps (each printed before it runs; --dry_run prints them all and runs none):
  1. the gate: config + overrides parse, mesh == chips, the planner says it fits (launch/spec.py);
  2. the committed code (git archive HEAD) goes to WORKDIR/code/radfm_jax.tgz;
  3. `gcloud compute tpus queued-resources create` (spot or on-demand; --num_slices > 1: a multislice
     request of that many nodes), polled until ACTIVE;
  4. on every worker of every node (`queued-resources ssh --node=all --worker=all`): fetch the code,
     create a venv with the pinned requirements + jax[tpu] (launch/requirements-tpu.txt);
  5. the same command on every worker; JAX finds the pod by itself (jax.distributed auto-detection,
     multislice included), logs stream back here and are kept in ~/radfm_run.log on each worker;
  6. the slice is deleted at the end or on failure (--keep to keep it).
Spot preemption: when the run ends with the queued resource SUSPENDED / FAILED, it is deleted, re-created
and the same command runs again (up to --max_restarts); the trainer checkpoints on SIGTERM and resumes
exactly from the checkpoints in the (gs://) workdir.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Sequence

from absl import flags

from launch import spec as spec_lib


def define_flags() -> None:
  """Shared flags + this target's (defined only when run as a program)."""
  spec_lib.define_flags()
  flags.DEFINE_string("project", None, "GCP project.")
  flags.DEFINE_string("zone", None, "Zone with TPU capacity (e.g. us-east5-a for v5p).")
  flags.DEFINE_bool("spot", False, "Spot capacity (preemptible; the run restarts and resumes).")
  flags.DEFINE_string("runtime_version", None, "TPU VM software version (default per generation).")
  flags.DEFINE_integer("max_restarts", 5, "Spot: how many times to re-create after preemption.")
  flags.DEFINE_bool("keep", False, "Keep the slice at the end (debugging); default: delete it.")
  flags.DEFINE_integer("poll_seconds", 30, "Seconds between queued-resource state checks.")


ENV_DIR = "~/radfm_env"
CODE_DIR = "~/radfm_jax"
LOG = "~/radfm_run.log"
RESTARTABLE = ("SUSPENDING", "SUSPENDED", "FAILED")


def code_uri(spec: spec_lib.RunSpec) -> str:
  return spec.workdir.rstrip("/") + "/code/radfm_jax.tgz"


def _gcloud(project: str | None, zone: str | None, *args: str) -> list[str]:
  out = ["gcloud", "compute", "tpus", "queued-resources", *args]
  if zone:
    out.append(f"--zone={zone}")
  if project:
    out.append(f"--project={project}")
  return out


def create_command(spec: spec_lib.RunSpec, project: str | None, zone: str | None, spot: bool,
                   runtime: str | None) -> list[str]:
  t = spec.tpu
  cmd = _gcloud(project, zone, "create", spec.name, f"--accelerator-type={t.name}",
                f"--runtime-version={runtime or t.runtime}")
  if spec.num_slices > 1:
    cmd += [f"--node-count={spec.num_slices}", f"--node-prefix={spec.name}"]
  else:
    cmd.append(f"--node-id={spec.name}")
  if spot:
    cmd.append("--spot")
  return cmd


def setup_script(spec: spec_lib.RunSpec) -> str:
  """Run on every worker: the code from the workdir, the pinned venv (kept across restarts). TPU VM images
  ship Python 3.10 and the pins need 3.11: uv provides the interpreter; torch comes from the CPU index
  (sentence-transformers, RadBench) so that pip does not pull a CUDA build."""
  uv = "~/.local/bin/uv"
  pip = f"{uv} pip install -q --python {ENV_DIR}/bin/python"
  return " && ".join([
      "set -euo pipefail", f"mkdir -p {CODE_DIR}", f"cd {CODE_DIR}",
      f"gcloud storage cp {code_uri(spec)} code.tgz", "tar xzf code.tgz",
      "python3 -m pip install -q --user uv",
      f"(test -x {ENV_DIR}/bin/python || {uv} venv --python 3.11 {ENV_DIR})",
      f"{pip} torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu",
      f"{pip} -r requirements.txt -r launch/requirements-tpu.txt"])


def run_script(spec: spec_lib.RunSpec) -> str:
  """Run on every worker: the entry command, its log kept on the worker too."""
  cmd = spec_lib.shell(spec_lib.entry_command(spec)[1:])  # ENV_DIR stays unquoted: ~ must expand
  return f"set -o pipefail && cd {CODE_DIR} && {ENV_DIR}/bin/python {cmd} 2>&1 | tee -a {LOG}"


def ssh_command(spec: spec_lib.RunSpec, project: str | None, zone: str | None, script: str) -> list[str]:
  return _gcloud(project, zone, "ssh", spec.name, "--node=all", "--worker=all", f"--command={script}")


def commands(spec: spec_lib.RunSpec, project: str | None, zone: str | None, spot: bool,
             runtime: str | None, tarball: str) -> dict[str, list[str]]:
  """Every command of the run, by step."""
  return {
      "package": ["git", "-C", spec_lib.REPO, "archive", "--format=tar.gz", "-o", tarball, "HEAD"],
      "upload": ["gcloud", "storage", "cp", tarball, code_uri(spec)],
      "create": create_command(spec, project, zone, spot, runtime),
      "state": _gcloud(project, zone, "describe", spec.name, "--format=value(state.state)"),
      "setup": ssh_command(spec, project, zone, setup_script(spec)),
      "run": ssh_command(spec, project, zone, run_script(spec)),
      "delete": _gcloud(project, zone, "delete", spec.name, "--force", "--quiet"),
  }


def launch(spec: spec_lib.RunSpec, cmds: dict[str, list[str]], runner: spec_lib.Runner, *, spot: bool,
           max_restarts: int, keep: bool, poll_seconds: int) -> int:
  runner.run(cmds["package"])
  runner.run(cmds["upload"])
  attempt = 0
  try:
    while True:
      runner.run(cmds["create"])
      runner.note("poll until ACTIVE:")
      while (state := runner.output(cmds["state"])) != "ACTIVE" and not runner.dry_run:
        if state in ("FAILED", "SUSPENDED"):
          raise RuntimeError(f"queued resource {spec.name} is {state} before the run started")
        time.sleep(poll_seconds)
      runner.run(cmds["setup"])
      rc = runner.run(cmds["run"], check=False)
      if rc == 0:
        return 0
      state = runner.output(cmds["state"])
      if not (spot and state in RESTARTABLE and attempt < max_restarts):
        runner.note(f"run failed (exit {rc}, queued resource {state or 'unknown'}); not restarting")
        return rc or 1
      attempt += 1
      runner.note(f"preempted ({state}): re-creating, attempt {attempt} of {max_restarts}; "
                  "the run resumes from its last checkpoint")
      runner.run(cmds["delete"], check=False)
  finally:
    if keep:
      runner.note(f"--keep: {spec.name} is left running; delete it with: {spec_lib.shell(cmds['delete'])}")
    else:
      runner.run(cmds["delete"], check=False)


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  runner = spec_lib.Runner(f.dry_run)
  try:
    spec = spec_lib.spec_from_flags(argv)
    if not spec.tpu:
      raise spec_lib.Refused(f"--accelerator={spec.accelerator!r} is not a TPU type (v5p-8, v6e-16, ...)")
    if not spec.workdir.startswith("gs://"):
      raise spec_lib.Refused(f"--workdir={spec.workdir}: TPU VM workers share nothing but GCS; use gs://")
    runner.note(spec_lib.describe(spec))
    spec_lib.gate(spec, f.plan, f.plan_dir, log=lambda s: print(s, flush=True))
  except spec_lib.Refused as e:
    spec_lib.refuse_exit(e)
  tarball = os.path.join(tempfile.gettempdir(), f"{spec.name}-radfm_jax.tgz")
  cmds = commands(spec, f.project, f.zone, f.spot, f.runtime_version, tarball)
  if f.dry_run:
    for step in ("package", "upload", "create"):
      runner.run(cmds[step])
    runner.note("poll until ACTIVE:")
    runner.output(cmds["state"])
    for step in ("setup", "run"):
      runner.run(cmds[step])
    if f.spot:
      runner.note(f"spot: if the run fails and the queued resource is {'/'.join(RESTARTABLE)}, delete, "
                  f"re-create and rerun (up to {f.max_restarts} times); training resumes from the workdir")
    runner.run(cmds["delete"])
    return
  raise SystemExit(launch(spec, cmds, runner, spot=f.spot, max_restarts=f.max_restarts, keep=f.keep,
                          poll_seconds=f.poll_seconds))


if __name__ == "__main__":
  define_flags()
  spec_lib.run(main)
