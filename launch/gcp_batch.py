r"""GCP Batch jobs: CPU work (a store build with many workers, RadBench scoring) and single-node GPU training.

  # a store build on one 32-vCPU machine, 32 reader processes
  python -m launch.gcp_batch --name=build-vqarad --project=P --region=us-central1 --accelerator=cpu \
      --entry=build --store=gs://BUCKET/stores/vqarad --workdir=gs://BUCKET/builds/vqarad \
      --image=REGION-docker.pkg.dev/P/radfm/radfm_jax:cpu --mount=gs://BUCKET/raw:/mnt/disks/raw \
      -- --from=radfm --dataset=vqa_rad --src=/mnt/disks/raw/vqarad/test.csv --image_root=/mnt/disks/raw/vqarad
  # RadBench scoring of a predictions file
  python -m launch.gcp_batch --name=score-r1 ... --accelerator=cpu --entry=eval --config=configs/tiny.py \
      --workdir=gs://BUCKET/runs/r1 -- --predictions=gs://BUCKET/runs/r1/predictions.jsonl
  # single-node GPU training (8 x H100)
  python -m launch.gcp_batch --name=r1 ... --accelerator=h100 --gpus_per_node=8 --entry=train \
      --config=configs/radfm_1b.py --workdir=gs://BUCKET/runs/r1 --image=...:cuda

Writes runs/launch/NAME/batch_job.json and submits it with `gcloud batch jobs submit`; --dry_run prints the
JSON and the command. Spot VMs (--spot) retry on preemption (maxRetryCount); training resumes from its
workdir. Stores, checkpoints and outputs are gs:// paths the libraries read and write themselves; raw
scans (read as local files) come through --mount (Cloud Storage FUSE, mounted into the container).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from absl import flags

from launch import spec as spec_lib


def define_flags() -> None:
  """Shared flags + this target's (defined only when run as a program)."""
  spec_lib.define_flags()
  flags.DEFINE_string("project", None, "GCP project.")
  flags.DEFINE_string("region", "us-central1", "Batch location (region).")
  flags.DEFINE_string("machine_type", None, "VM type (default: from --accelerator / --cpus).")
  flags.DEFINE_integer("cpus", 32, "CPU jobs: vCPUs (the build gets this many workers).")
  flags.DEFINE_bool("spot", False, "Spot VMs (preemptible; retried).")
  flags.DEFINE_integer("max_retries", 3, "Task retries (preemption, failure).")
  flags.DEFINE_integer("max_hours", 24, "Maximum run duration.")
  flags.DEFINE_multi_string("mount", [], "gs://BUCKET/PATH:/mnt/disks/NAME: a bucket folder mounted "
                                      "(Cloud Storage FUSE) where readers need local files (raw scans).")


# GPU type -> (machine type with 8 GPUs, Batch accelerator type)
GPUS = {"h100": ("a3-highgpu-8g", "nvidia-h100-80gb"), "a100": ("a2-highgpu-8g", "nvidia-tesla-a100"),
        "a100-80gb": ("a2-ultragpu-8g", "nvidia-a100-80gb"), "l4": ("g2-standard-96", "nvidia-l4")}


def machine(spec: spec_lib.RunSpec, machine_type: str | None, cpus: int) -> tuple[str, dict | None]:
  """(machine type, accelerator entry or None)."""
  if spec.is_gpu:
    if spec.accelerator not in GPUS:
      raise spec_lib.Refused(f"--accelerator={spec.accelerator!r}: GPU types known here: {sorted(GPUS)} "
                             "(or cpu); pass --machine_type for others")
    mt, acc = GPUS[spec.accelerator]
    return machine_type or mt, {"type": acc, "count": spec.gpus_per_node}
  return machine_type or f"n2-standard-{cpus}", None


def command(spec: spec_lib.RunSpec, cpus: int) -> list[str]:
  cmd = spec_lib.entry_command(spec)
  if spec.entry == "build" and not any(a.startswith("--workers") for a in spec.extra):
    cmd += [f"--workers={cpus}", "--pool=process", "--noprogress"]
  return cmd


def volumes(mounts: Sequence[str]) -> list[dict]:
  out = []
  for m in mounts:
    src, sep, dst = m.rpartition(":/")
    if not src.startswith("gs://") or not sep:
      raise spec_lib.Refused(f"--mount={m!r}: expected gs://BUCKET/PATH:/mnt/disks/NAME")
    out.append({"gcs": {"remotePath": src[len("gs://"):]}, "mountPath": "/" + dst})
  return out


def job(spec: spec_lib.RunSpec, *, machine_type: str | None, cpus: int, spot: bool, retries: int,
        hours: int, mounts: Sequence[str] = ()) -> dict:
  mt, acc = machine(spec, machine_type, cpus)
  policy: dict = {"machineType": mt, "provisioningModel": "SPOT" if spot else "STANDARD"}
  instance: dict = {"policy": policy}
  if acc:
    policy["accelerators"] = [acc]
    instance["installGpuDrivers"] = True
  variables = {"TF_CPP_MIN_LOG_LEVEL": "2", "RADFM_RUN": spec.name}
  if not acc:
    variables["JAX_PLATFORMS"] = "cpu"
  return {
      "taskGroups": [{
          "taskCount": 1, "parallelism": 1,
          "taskSpec": {
              "runnables": [{"container": {"imageUri": spec.image, "entrypoint": "bash",
                                           "commands": ["-c", spec_lib.shell(command(spec, cpus))]}}],
              "computeResource": {"cpuMilli": (cpus if not acc else 64) * 1000,
                                  "memoryMib": (cpus * 3584) if not acc else 512 * 1024},
              "maxRetryCount": retries, "maxRunDuration": f"{hours * 3600}s",
              "environment": {"variables": variables},
              **({"volumes": volumes(mounts)} if mounts else {}),
          },
      }],
      "allocationPolicy": {"instances": [instance]},
      "labels": {"radfm-run": spec.name, "radfm-entry": spec.entry},
      "logsPolicy": {"destination": "CLOUD_LOGGING"},
  }


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  runner = spec_lib.Runner(f.dry_run)
  try:
    spec = spec_lib.spec_from_flags(argv)
    if spec.tpu:
      raise spec_lib.Refused("TPUs: use launch.tpu_vm or launch.gke; Batch runs CPU and GPU jobs")
    if spec.nodes != 1:
      raise spec_lib.Refused("Batch jobs here are single-node; multi-node GPU runs: launch.slurm")
    if not spec.image:
      raise spec_lib.Refused("--image is required (launch/Dockerfile; ACCEL=cpu or cuda12)")
    runner.note(spec_lib.describe(spec))
    spec_lib.gate(spec, f.plan, f.plan_dir, log=lambda s: print(s, flush=True))
    body = job(spec, machine_type=f.machine_type, cpus=f.cpus, spot=f.spot, retries=f.max_retries,
               hours=f.max_hours, mounts=f.mount)
  except spec_lib.Refused as e:
    spec_lib.refuse_exit(e)
  path = os.path.join("runs", "launch", spec.name, "batch_job.json")
  runner.write(path, json.dumps(body, indent=2) + "\n")
  submit = ["gcloud", "batch", "jobs", "submit", spec.name, f"--location={f.region}",
            f"--config={path}"]
  if f.project:
    submit.append(f"--project={f.project}")
  runner.run(submit)
  runner.note(f"logs: gcloud batch jobs describe {spec.name} --location={f.region}; "
              f"Cloud Logging label radfm-run={spec.name}")


if __name__ == "__main__":
  define_flags()
  spec_lib.run(main)
