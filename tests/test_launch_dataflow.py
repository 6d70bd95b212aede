"""launch/dataflow.py: the dry run prints the exact build command with DataflowRunner options."""
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args):
  return subprocess.run([sys.executable, "-m", "launch.dataflow", *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=60)


def test_dry_run_prints_the_build_command():
  proc = _launch("--name=medmd", "--project=p1", "--bucket=gs://b/x/", "--image=reg/img:2.77.0",
                 "--max_workers=64", "--machine_type=n2-highmem-8", "--dry_run", "--",
                 "--from=radfm", "--dataset=vqa_rad", "--src=/mnt/raw/a-*.csv", "--image_root=/mnt/raw",
                 "--out=gs://b/stores/medmd")
  assert proc.returncode == 0, proc.stderr
  cmd = shlex.split(proc.stdout.strip())
  assert cmd[:6] == [".venv-beam/bin/python", "-m", "radfm_jax.data.build", "--runner=beam", "--noprogress",
                     "--from=radfm"]
  assert "--src=/mnt/raw/a-*.csv" in cmd and "--out=gs://b/stores/medmd" in cmd
  (opts,) = [a[len("--beam_options="):] for a in cmd if a.startswith("--beam_options=")]
  opts = shlex.split(opts)
  for want in ("--runner=DataflowRunner", "--project=p1", "--job_name=medmd",
               "--temp_location=gs://b/x/dataflow/tmp",
               "--sdk_container_image=reg/img:2.77.0", "--experiments=use_runner_v2", "--max_num_workers=64",
               "--machine_type=n2-highmem-8"):
    assert want in opts, (want, opts)


def test_store_must_be_on_gcs_and_runner_is_ours():
  base = ["--project=p", "--bucket=gs://b", "--image=i", "--dry_run", "--", "--src=/mnt/raw"]
  proc = _launch(*base, "--out=/local/store")
  assert proc.returncode != 0 and "--out=gs://" in proc.stderr
  proc = _launch(*base, "--out=gs://b/s", "--runner=local")
  assert proc.returncode != 0 and "sets --runner" in proc.stderr
