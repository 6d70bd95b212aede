r"""GKE TPU workloads: an xpk workload (what MaxText users run) or the equivalent JobSet manifest.

  python -m launch.gke --name=r1 --cluster=C --project=P --zone=Z --accelerator=v5p-128 --num_slices=2 \
      --image=REGION-docker.pkg.dev/P/radfm/radfm_jax:tpu --entry=train --config=configs/radmd_finetune.py \
      --workdir=gs://BUCKET/runs/r1 [--via=xpk|kubectl] [--dry_run] [--plan=plan.json]

One workload per run: a JobSet of `num_slices` replicated jobs, one pod per TPU host (TPU VM), each pod
holding all chips of its host. Every pod runs the same command; JAX detects the GKE TPU environment
(TPU_WORKER_HOSTNAMES / TPU_WORKER_ID injected by GKE) and, with several slices, the MEGASCALE_*
variables set here make the slices one job: data parallel over slices (DCN), the config's mesh inside
each slice (ICI) — so a multislice config's mesh covers chips x slices.
--dry_run prints both the xpk command and the manifest; without it, --via picks which one is submitted.
The image comes from launch/Dockerfile (ACCEL=tpu). The workload restarts up to --max_restarts times
(preemption, host failure); training resumes from its gs:// workdir.
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
  flags.DEFINE_string("cluster", None, "GKE cluster with a TPU node pool of --accelerator.")
  flags.DEFINE_string("project", None, "GCP project.")
  flags.DEFINE_string("zone", None, "Zone of the cluster's TPU node pool.")
  flags.DEFINE_enum("via", "xpk", ["xpk", "kubectl"], "Submit with xpk or kubectl apply of the manifest.")
  flags.DEFINE_integer("max_restarts", 5, "Workload restarts (preemption, host failure).")


CONTAINER = "radfm"
MEGASCALE_PORT = 8080


def xpk_command(spec: spec_lib.RunSpec, cluster: str | None, project: str | None, zone: str | None,
                max_restarts: int) -> list[str]:
  cmd = ["xpk", "workload", "create", f"--cluster={cluster}", f"--workload={spec.name}",
         f"--tpu-type={spec.tpu.name}", f"--num-slices={spec.num_slices}", f"--docker-image={spec.image}",
         f"--command={spec_lib.shell(spec_lib.entry_command(spec))}", f"--max-restarts={max_restarts}"]
  if project:
    cmd.append(f"--project={project}")
  if zone:
    cmd.append(f"--zone={zone}")
  return cmd


def env(spec: spec_lib.RunSpec) -> list[dict]:
  """Container environment: multislice coordination (slice 0's first pod) when num_slices > 1."""
  out = [{"name": "TF_CPP_MIN_LOG_LEVEL", "value": "2"}]
  if spec.num_slices > 1:
    out += [
        {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": f"{spec.name}-slice-0-0.{spec.name}"},
        {"name": "MEGASCALE_NUM_SLICES", "value": str(spec.num_slices)},
        {"name": "MEGASCALE_PORT", "value": str(MEGASCALE_PORT)},
        {"name": "MEGASCALE_SLICE_ID", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}}},
    ]
  return out


def jobset(spec: spec_lib.RunSpec, max_restarts: int) -> dict:
  """The JobSet manifest (JSON is valid YAML: `kubectl apply -f` takes it as it is)."""
  t = spec.tpu
  pod = {
      "restartPolicy": "Never",
      "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": t.gke_accelerator,
                       "cloud.google.com/gke-tpu-topology": t.shape},
      "containers": [{
          "name": CONTAINER, "image": spec.image,
          "command": ["bash", "-c", spec_lib.shell(spec_lib.entry_command(spec))],
          "ports": [{"containerPort": 8471}, {"containerPort": MEGASCALE_PORT}],
          "env": env(spec),
          "resources": {"limits": {"google.com/tpu": t.chips_per_host}},
      }],
  }
  return {
      "apiVersion": "jobset.x-k8s.io/v1alpha2",
      "kind": "JobSet",
      "metadata": {"name": spec.name, "annotations": {
          "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
      "spec": {
          "failurePolicy": {"maxRestarts": max_restarts},
          "replicatedJobs": [{
              "name": "slice", "replicas": spec.num_slices,
              "template": {"spec": {"parallelism": t.hosts, "completions": t.hosts, "backoffLimit": 0,
                                    "template": {"spec": pod}}},
          }],
      },
  }


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  runner = spec_lib.Runner(f.dry_run)
  try:
    spec = spec_lib.spec_from_flags(argv)
    if not spec.tpu:
      raise spec_lib.Refused(f"--accelerator={spec.accelerator!r} is not a TPU type (v5p-8, v6e-16, ...)")
    if not spec.image:
      raise spec_lib.Refused("--image is required (build it from launch/Dockerfile with ACCEL=tpu)")
    if not spec.workdir.startswith("gs://"):
      raise spec_lib.Refused(f"--workdir={spec.workdir}: pods share nothing but GCS; use gs://")
    runner.note(spec_lib.describe(spec))
    spec_lib.gate(spec, f.plan, f.plan_dir, log=lambda s: print(s, flush=True))
  except spec_lib.Refused as e:
    spec_lib.refuse_exit(e)
  xpk = xpk_command(spec, f.cluster, f.project, f.zone, f.max_restarts)
  manifest = os.path.join("runs", "launch", spec.name, "jobset.json")
  text = json.dumps(jobset(spec, f.max_restarts), indent=2) + "\n"
  if f.dry_run or f.via == "kubectl":
    runner.write(manifest, text)
  if f.dry_run:
    runner.note("submit with xpk:")
    runner.run(xpk)
    runner.note("or with kubectl (JobSet controller installed):")
    runner.run(["kubectl", "apply", "-f", manifest])
    return
  runner.run(xpk if f.via == "xpk" else ["kubectl", "apply", "-f", manifest])


if __name__ == "__main__":
  define_flags()
  spec_lib.run(main)
