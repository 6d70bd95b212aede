r"""The store build on Google Cloud Dataflow: `radfm_jax.data.build --runner=beam` with DataflowRunner options.

  python -m launch.dataflow --name=medmd --project=P --region=us-central1 --bucket=gs://BUCKET \
      --image=REGION-docker.pkg.dev/P/radfm/radfm_jax-beam:2.77.0 --max_workers=100 [--dry_run] \
      -- --from=radfm --dataset=pmc_oa --src='/mnt/raw/medmd/pmc_oa/train-*.csv' --image_root=/mnt/raw/medmd \
         --out=gs://BUCKET/stores/medmd

Everything after `--` goes to `radfm_jax.data.build` unchanged; this adds `--runner=beam` and the Dataflow
pipeline options (project, region, temp/staging locations under --bucket, the worker image, worker
count and machine type, Runner v2). --dry_run prints the exact command instead of running it. The job
runs from this machine's Beam venv (.venv-beam, `make setup`) and waits for the pipeline to finish, then
prints the build summary; its exit status is the build's (the number of failures, capped at 100).

The worker image (--image) carries the same Beam, pins and radfm_jax as .venv-beam, built from
launch/Dockerfile.beam (`docker build -f launch/Dockerfile.beam -t IMAGE . && docker push IMAGE`); Dataflow
starts it with `--sdk_container_image` (Runner v2). Workers write volumes straight to the store's gs://
kvstore. The raw scans must be readable as local files at the same path on this machine (listing) and on
every worker (reading): bake or mount them into the image (e.g. /mnt/raw), as the readers open files.
A rerun of the same command after a failed or cancelled job reuses every volume already stored.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Sequence

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("name", "radfm-build", "Dataflow job name (lowercase letters, digits, '-').")
  flags.DEFINE_string("project", None, "GCP project.")
  flags.DEFINE_string("region", "us-central1", "Dataflow region.")
  flags.DEFINE_string("bucket", None, "gs://BUCKET[/PREFIX] for Dataflow's temp and staging files.")
  flags.DEFINE_string("image", None, "Worker SDK container image (launch/Dockerfile.beam).")
  flags.DEFINE_integer("max_workers", 100, "Autoscaling ceiling (--max_num_workers).")
  flags.DEFINE_integer("num_workers", 10, "Workers at start.")
  flags.DEFINE_string("machine_type", "n2-standard-4",
                      "Worker machine type (the final manifest step holds every record and volume entry in "
                      "memory: ~8 GB per million samples; a highmem type for MedMD).")
  flags.DEFINE_integer("disk_size_gb", 50, "Worker boot disk.")
  flags.DEFINE_string("service_account", None, "Worker service account email (default: Compute default).")
  flags.DEFINE_string("network", None, "VPC network (default: 'default').")
  flags.DEFINE_string("subnetwork", None, "Subnetwork URL, for private-IP workers.")
  flags.DEFINE_bool("spot", False, "FlexRS (delayed, discounted batch scheduling; preemptible workers).")
  flags.DEFINE_string("python", ".venv-beam/bin/python", "Python of the Beam venv that submits the job.")
  flags.DEFINE_bool("dry_run", False, "Print the command instead of running it.")


def beam_options(*, name: str, project: str, region: str, bucket: str, image: str, max_workers: int,
                 num_workers: int, machine_type: str, disk_size_gb: int, service_account: str | None = None,
                 network: str | None = None, subnetwork: str | None = None, spot: bool = False) -> list[str]:
  """DataflowRunner pipeline options for the build."""
  bucket = bucket.rstrip("/")
  opts = ["--runner=DataflowRunner", f"--project={project}", f"--region={region}", f"--job_name={name}",
          f"--temp_location={bucket}/dataflow/tmp", f"--staging_location={bucket}/dataflow/staging",
          f"--sdk_container_image={image}", "--sdk_location=container", "--experiments=use_runner_v2",
          f"--num_workers={num_workers}", f"--max_num_workers={max_workers}",
          "--autoscaling_algorithm=THROUGHPUT_BASED", f"--machine_type={machine_type}",
          f"--disk_size_gb={disk_size_gb}"]
  if service_account:
    opts.append(f"--service_account_email={service_account}")
  if network:
    opts.append(f"--network={network}")
  if subnetwork:
    opts += [f"--subnetwork={subnetwork}", "--no_use_public_ips"]
  if spot:
    opts.append("--flexrs_goal=COST_OPTIMIZED")
  return opts


def command(build_args: Sequence[str], opts: Sequence[str], python: str) -> list[str]:
  for a in build_args:
    if a.startswith(("--runner", "--beam_options")):
      raise app.UsageError(f"{a}: the launcher sets --runner and --beam_options itself")
  if not any(a.startswith("--out=gs://") for a in build_args):
    raise app.UsageError("give the build --out=gs://BUCKET/PATH (Dataflow workers write the store there)")
  return [python, "-m", "radfm_jax.data.build", "--runner=beam", "--noprogress", *build_args,
          f"--beam_options={shlex.join(opts)}"]


def main(argv: Sequence[str]) -> None:
  build_args = list(argv[1:])
  missing = [n for n in ("project", "bucket", "image") if not getattr(FLAGS, n)]
  if missing:
    raise app.UsageError(f"missing --{', --'.join(missing)}")
  if not FLAGS.bucket.startswith("gs://"):
    raise app.UsageError(f"--bucket {FLAGS.bucket}: expected gs://BUCKET[/PREFIX]")
  opts = beam_options(name=FLAGS.name, project=FLAGS.project, region=FLAGS.region, bucket=FLAGS.bucket,
                      image=FLAGS.image, max_workers=FLAGS.max_workers, num_workers=FLAGS.num_workers,
                      machine_type=FLAGS.machine_type, disk_size_gb=FLAGS.disk_size_gb,
                      service_account=FLAGS.service_account, network=FLAGS.network,
                      subnetwork=FLAGS.subnetwork, spot=FLAGS.spot)
  cmd = command(build_args, opts, FLAGS.python)
  if FLAGS.dry_run:
    print(shlex.join(cmd))
    return
  if not os.access(cmd[0], os.X_OK):
    raise app.UsageError(f"{cmd[0]}: no Beam venv here (run `make setup`, or pass --python)")
  sys.exit(subprocess.run(cmd, check=False).returncode)


if __name__ == "__main__":
  define_flags()
  app.run(main)
