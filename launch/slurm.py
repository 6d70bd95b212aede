r"""Multi-node GPU runs on SLURM: an sbatch script with one process per node.

  python -m launch.slurm --name=r1 --accelerator=h100 --nodes=4 --gpus_per_node=8 --partition=gpu \
      --venv=/shared/radfm_env --entry=train --config=configs/radfm_1b.py --workdir=gs://BUCKET/runs/r1 \
      [--time=48:00:00] [--dry_run]

Writes runs/launch/NAME/job.sbatch and submits it with sbatch. `srun` starts one task per node; each
process drives all GPUs of its node, and `jax.distributed.initialize()` finds the coordinator, the process
count and this process's id in SLURM's environment (SLURM_JOB_NODELIST, SLURM_NTASKS, SLURM_PROCID), so
the command carries no coordinator flags. The workdir can be a shared filesystem or gs://.
Preemption / time limit: SLURM sends SIGTERM 120 s before the end (--signal), the trainer checkpoints
and exits; `--requeue` reruns the job, which resumes from the workdir.
The planner plans TPU topologies only: GPU runs are checked for config and mesh, not memory.
"""
from __future__ import annotations

import os
from typing import Sequence

from absl import flags

from launch import spec as spec_lib


def define_flags() -> None:
  """Shared flags + this target's (defined only when run as a program)."""
  spec_lib.define_flags()
  flags.DEFINE_string("partition", None, "SLURM partition.")
  flags.DEFINE_string("account", None, "SLURM account.")
  flags.DEFINE_string("time", "24:00:00", "Time limit.")
  flags.DEFINE_integer("cpus_per_node", 32, "CPUs per task (= per node): input pipeline workers.")
  flags.DEFINE_string("venv", None, "Python environment on the nodes (pip install -r requirements.txt "
                              "-r launch/requirements-cuda.txt); default: the python on PATH.")
  flags.DEFINE_string("repo_dir", None, "The checkout on the nodes (default: this checkout).")



def script(spec: spec_lib.RunSpec, *, partition: str | None, account: str | None, time: str, cpus: int,
           venv: str | None, repo_dir: str) -> str:
  python = f"{venv.rstrip('/')}/bin/python" if venv else "python"
  head = [
      "#!/bin/bash",
      f"#SBATCH --job-name={spec.name}",
      f"#SBATCH --nodes={spec.nodes}",
      "#SBATCH --ntasks-per-node=1",
      f"#SBATCH --cpus-per-task={cpus}",
      f"#SBATCH --time={time}",
      f"#SBATCH --output=runs/launch/{spec.name}/%x-%j.out",
      "#SBATCH --signal=TERM@120",
      "#SBATCH --requeue",
      "#SBATCH --exclusive",
  ]
  if spec.is_gpu:
    head.append(f"#SBATCH --gpus-per-node={spec.gpus_per_node}")
  if partition:
    head.append(f"#SBATCH --partition={partition}")
  if account:
    head.append(f"#SBATCH --account={account}")
  body = [
      "set -euo pipefail",
      f"cd {repo_dir}",
      "export TF_CPP_MIN_LOG_LEVEL=2",
      "# One process per node; jax.distributed auto-detects SLURM (no coordinator flags).",
      f"srun --kill-on-bad-exit=1 {spec_lib.shell(spec_lib.entry_command(spec, python=python))}",
  ]
  return "\n".join(head + [""] + body) + "\n"


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  runner = spec_lib.Runner(f.dry_run)
  try:
    spec = spec_lib.spec_from_flags(argv)
    if spec.tpu:
      raise spec_lib.Refused("TPUs: use launch.tpu_vm or launch.gke")
    runner.note(spec_lib.describe(spec))
    spec_lib.gate(spec, f.plan, f.plan_dir, log=lambda s: print(s, flush=True))
  except spec_lib.Refused as e:
    spec_lib.refuse_exit(e)
  path = os.path.join("runs", "launch", spec.name, "job.sbatch")
  runner.write(path, script(spec, partition=f.partition, account=f.account, time=f.time,
                            cpus=f.cpus_per_node, venv=f.venv, repo_dir=f.repo_dir or spec_lib.REPO))
  runner.run(["sbatch", path])


if __name__ == "__main__":
  define_flags()
  spec_lib.run(main)
