"""launch/: the topology table, golden dry runs of every launcher, the embedded command parsed with its
config (config_flags + overrides) and its mesh checked against the requested chips, and the planner gate
(a run that does not fit is refused with its plan printed).

Golden files: tests/fixtures/launch/golden/*.txt (this checkout's path is written <REPO>). After an
intended change, regenerate them with RADFM_UPDATE_GOLDEN=1 and read the diff.
"""
import concurrent.futures
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile

import pytest

from launch import gcp_batch, gke, slurm, spec, topology, tpu_vm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(REPO, "tests", "fixtures", "launch")
PLAN4 = os.path.join(FIX, "plan_tiny_v5p-8.json")
PLAN8 = os.path.join(FIX, "plan_tiny_v5p-16.json")
PLAN8_OOM = os.path.join(FIX, "plan_tiny_v5p-16_oom.json")

RUNS = {
    "tpu_vm_v5p-8_spot": ["launch.tpu_vm", "--name=r1", "--project=proj", "--zone=us-east5-a",
                          "--accelerator=v5p-8", "--spot", "--config=configs/tiny.py", "--config.total_steps=100",
                          "--config.mesh.fsdp=2", "--workdir=gs://bkt/runs/r1", f"--plan={PLAN4}"],
    "tpu_vm_v5p-16_x2": ["launch.tpu_vm", "--name=r2", "--project=proj", "--zone=us-east5-a",
                         "--accelerator=v5p-16", "--num_slices=2", "--config=configs/tiny.py",
                         "--workdir=gs://bkt/runs/r2", f"--plan={PLAN8}"],
    "gke_v5p-16_x2": ["launch.gke", "--name=r3", "--cluster=tpu-cluster", "--project=proj", "--zone=us-east5-a",
                      "--accelerator=v5p-16", "--num_slices=2", "--image=us-docker.pkg.dev/proj/radfm/radfm_jax:tpu",
                      "--config=configs/tiny.py", "--config.mesh.tensor=2", "--workdir=gs://bkt/runs/r3",
                      f"--plan={PLAN8}"],
    "batch_build_cpu": ["launch.gcp_batch", "--name=build-demo", "--project=proj", "--accelerator=cpu",
                        "--entry=build", "--store=gs://bkt/stores/demo", "--workdir=gs://bkt/builds/demo",
                        "--image=us-docker.pkg.dev/proj/radfm/radfm_jax:cpu", "--mount=gs://bkt/raw:/mnt/disks/raw",
                        "--", "--from=files", "--src=/mnt/disks/raw/demo", "--text=/mnt/disks/raw/demo/text.jsonl"],
    "batch_score_cpu": ["launch.gcp_batch", "--name=score-r1", "--project=proj", "--accelerator=cpu", "--cpus=8",
                        "--entry=eval", "--config=configs/tiny.py", "--workdir=gs://bkt/runs/r1",
                        "--image=us-docker.pkg.dev/proj/radfm/radfm_jax:cpu", "--",
                        "--predictions=gs://bkt/runs/r1/predictions.jsonl"],
    "batch_train_h100": ["launch.gcp_batch", "--name=g1", "--project=proj", "--accelerator=h100", "--spot",
                         "--config=configs/tiny.py", "--config.mesh.fsdp=8", "--workdir=gs://bkt/runs/g1",
                         "--image=us-docker.pkg.dev/proj/radfm/radfm_jax:cuda"],
    "slurm_h100_x4": ["launch.slurm", "--name=s1", "--accelerator=h100", "--nodes=4", "--partition=gpu",
                      "--venv=/shared/radfm_env", "--repo_dir=/shared/radfm_jax", "--config=configs/tiny.py",
                      "--config.mesh.fsdp=8", "--workdir=gs://bkt/runs/s1"],
}


TOOLS = ("gcloud", "gsutil", "xpk", "kubectl", "sbatch", "srun", "git", "docker")


def _dry_run(args, cwd):
  """Runs a launcher with --dry_run; every cloud tool on PATH is a trap that records being called."""
  cut = args.index("--") if "--" in args else len(args)
  args = [*args[:cut], "--dry_run", *args[cut:]]   # launcher flags go before `--`
  with tempfile.TemporaryDirectory() as trap:
    for tool in TOOLS:
      path = os.path.join(trap, tool)
      with open(path, "w") as f:
        f.write(f"#!/bin/sh\ntouch {trap}/called-{tool}\nexit 99\n")
      os.chmod(path, 0o755)
    env = dict(os.environ, PYTHONPATH=REPO, PATH=trap + os.pathsep + os.environ["PATH"])
    res = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                         env=env)
    called = sorted(n for n in os.listdir(trap) if n.startswith("called-"))
  assert not called, f"the dry run {args} ran {called}"
  return res.returncode, res.stdout.replace(REPO, "<REPO>").replace(tempfile.gettempdir(), "<TMP>"), res.stderr


@pytest.fixture(scope="module")
def outputs():
  """Every launcher's dry run (in parallel: each is a Python start-up plus a config load)."""
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    results = dict(zip(RUNS, pool.map(lambda args: _dry_run(args, REPO), RUNS.values())))
  for name, (rc, _, err) in results.items():
    assert rc == 0, (name, err[-3000:])
  return {name: text for name, (_, text, _) in results.items()}


def _entry_argv(text: str, module: str) -> list[str]:
  """The entry command embedded in a printed command / script / manifest, as argv after `-m module`."""
  m = re.search(r"-m " + re.escape(module) + r" ([^'\"\n|]*?)(?: 2>&1|\"|'|\n|$)", text)
  assert m, f"no `-m {module}` command in:\n{text}"
  return shlex.split(m.group(1))


def _check_entry(argv: list[str], devices: int) -> dict:
  """The embedded train command parses with its config and its mesh covers `devices`."""
  config = next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
  overrides = [a for a in argv if a.startswith("--config.")]
  cfg = spec.load_config(config, overrides)
  return spec.mesh_devices(cfg.mesh.to_dict(), devices)


# ------------------------------------------------------------------------------------------ topology
def test_topology_table_matches_the_docs():
  t = topology.parse("v5p-8")
  assert (t.chips, t.hosts, t.chips_per_host, t.libtpu, t.shape) == (4, 1, 4, "v5p:2x2x1", "2x2x1")
  t = topology.parse("v5p-128")
  assert (t.chips, t.hosts, t.libtpu, t.gke_accelerator) == (64, 16, "v5p:4x4x4", "tpu-v5p-slice")
  assert (topology.parse("v4-32").chips, topology.parse("v4-32").hosts) == (16, 4)
  assert topology.parse("v5e-16") == topology.parse("v5litepod-16")
  t = topology.parse("v5litepod-16")
  assert (t.name, t.chips, t.hosts, t.chips_per_host, t.libtpu) == ("v5litepod-16", 16, 4, 4, "v5e:4x4")
  t = topology.parse("v6e-8")
  assert (t.chips, t.hosts, t.chips_per_host, t.libtpu) == (8, 1, 8, "v6e:2x4")   # one 8-chip VM
  assert (topology.parse("v6e-4").hosts, topology.parse("v6e-256").hosts) == (1, 64)
  for t in topology.table():
    assert t.hosts * t.chips_per_host == t.chips
  with pytest.raises(ValueError, match="counts TensorCores"):
    topology.parse("v5p-7")
  with pytest.raises(ValueError, match="not a standard v5p slice"):
    topology.parse("v5p-24")
  with pytest.raises(ValueError, match="expected one of"):
    topology.parse("tpu-v5p-8")


# ------------------------------------------------------------------------------------------- goldens
@pytest.mark.parametrize("name", sorted(RUNS))
def test_dry_run_matches_golden(outputs, name):
  path = os.path.join(FIX, "golden", f"{name}.txt")
  if os.environ.get("RADFM_UPDATE_GOLDEN"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(outputs[name])
  with open(path) as f:
    assert outputs[name] == f.read()


def test_tpu_vm_commands(outputs):
  text = outputs["tpu_vm_v5p-8_spot"]
  lines = text.splitlines()
  create = next(shlex.split(x) for x in lines if "queued-resources create" in x)
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "r1"]
  assert {"--accelerator-type=v5p-8", "--runtime-version=v2-alpha-tpuv5", "--node-id=r1", "--spot",
          "--zone=us-east5-a", "--project=proj"} <= set(create)
  ssh = [shlex.split(x) for x in lines if "queued-resources ssh" in x]
  assert len(ssh) == 2 and all({"--node=all", "--worker=all"} <= set(s) for s in ssh)
  assert "gcloud storage cp gs://bkt/runs/r1/code/radfm_jax.tgz" in ssh[0][-3]
  assert "launch/requirements-tpu.txt" in ssh[0][-3]
  assert lines[-1].startswith("gcloud compute tpus queued-resources delete r1 --force --quiet")
  assert "re-create and rerun" in text and "1 JAX process(es)" in lines[0]
  assert _check_entry(_entry_argv(text, "radfm_jax.train"), 4) == {"data": 2, "fsdp": 2, "tensor": 1}
  # Multislice: one request of two nodes; 2 slices x 2 hosts = 4 processes over 16 chips.
  text = outputs["tpu_vm_v5p-16_x2"]
  assert "--node-count=2 --node-prefix=r2" in text and "--node-id" not in text and "--spot" not in text
  assert "4 JAX process(es)" in text
  assert _check_entry(_entry_argv(text, "radfm_jax.train"), 16)["data"] == 16


def test_gke_xpk_and_jobset(outputs):
  text = outputs["gke_v5p-16_x2"]
  xpk = next(shlex.split(x) for x in text.splitlines() if x.startswith("xpk "))
  assert {"--tpu-type=v5p-16", "--num-slices=2", "--workload=r3", "--cluster=tpu-cluster",
          "--docker-image=us-docker.pkg.dev/proj/radfm/radfm_jax:tpu"} <= set(xpk)
  body = text.split("# ---- runs/launch/r3/jobset.json ----\n")[1].split("# ---- end")[0]
  js = json.loads(body)
  job = js["spec"]["replicatedJobs"][0]
  assert job["replicas"] == 2                                   # slices
  assert job["template"]["spec"]["parallelism"] == 2            # hosts per slice: one pod each
  pod = job["template"]["spec"]["template"]["spec"]
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                 "cloud.google.com/gke-tpu-topology": "2x2x2"}
  c = pod["containers"][0]
  assert c["resources"]["limits"]["google.com/tpu"] == 4 and c["image"].endswith(":tpu")
  env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
  assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "r3-slice-0-0.r3" and env["MEGASCALE_NUM_SLICES"] == "2"
  assert "job-index" in env["MEGASCALE_SLICE_ID"]["fieldRef"]["fieldPath"]
  argv = shlex.split(c["command"][2])
  assert argv[:3] == ["python", "-m", "radfm_jax.train"]
  assert _check_entry(argv[3:], 16) == {"data": 8, "fsdp": 1, "tensor": 2}
  assert shlex.split(next(a for a in xpk if a.startswith("--command="))[len("--command="):]) == argv
  # A single slice has no MEGASCALE variables (JAX reads GKE's TPU_WORKER_* by itself).
  s = spec.RunSpec(name="x", entry="train", config="configs/tiny.py", overrides=[], workdir="gs://b/x",
                   stores=[], checkpoint=None, accelerator="v6e-16", image="img")
  js = gke.jobset(s, 3)
  pod = js["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert pod["parallelism"] == 4 and pod["template"]["spec"]["containers"][0]["resources"]["limits"] == {
      "google.com/tpu": 4}
  assert not [e for e in gke.env(s) if e["name"].startswith("MEGASCALE")]


def _batch_json(text, name):
  return json.loads(text.split(f"# ---- runs/launch/{name}/batch_job.json ----\n")[1].split("# ---- end")[0])


def test_gcp_batch_jobs(outputs):
  build = _batch_json(outputs["batch_build_cpu"], "build-demo")
  task = build["taskGroups"][0]["taskSpec"]
  cmd = shlex.split(task["runnables"][0]["container"]["commands"][1])
  assert cmd[:4] == ["python", "-m", "radfm_jax.data.build", "--out=gs://bkt/stores/demo"]
  assert "--workers=32" in cmd and "--pool=process" in cmd and "--from=files" in cmd
  assert task["volumes"] == [{"gcs": {"remotePath": "bkt/raw"}, "mountPath": "/mnt/disks/raw"}]
  assert task["environment"]["variables"]["JAX_PLATFORMS"] == "cpu"
  assert build["allocationPolicy"]["instances"][0]["policy"] == {"machineType": "n2-standard-32",
                                                                 "provisioningModel": "STANDARD"}
  assert "gcloud batch jobs submit build-demo --location=us-central1" in outputs["batch_build_cpu"]
  score = _batch_json(outputs["batch_score_cpu"], "score-r1")
  cmd = shlex.split(score["taskGroups"][0]["taskSpec"]["runnables"][0]["container"]["commands"][1])
  assert cmd == ["python", "-m", "eval.radbench", "--out=gs://bkt/runs/r1/radbench",
                 "--predictions=gs://bkt/runs/r1/predictions.jsonl"]
  gpu = _batch_json(outputs["batch_train_h100"], "g1")
  inst = gpu["allocationPolicy"]["instances"][0]
  assert inst["installGpuDrivers"] and inst["policy"]["provisioningModel"] == "SPOT"
  assert inst["policy"]["accelerators"] == [{"type": "nvidia-h100-80gb", "count": 8}]
  assert inst["policy"]["machineType"] == "a3-highgpu-8g"
  argv = _entry_argv(gpu["taskGroups"][0]["taskSpec"]["runnables"][0]["container"]["commands"][1] + "\n",
                     "radfm_jax.train")
  assert _check_entry(argv, 8) == {"data": 1, "fsdp": 8, "tensor": 1}


def test_slurm_script(outputs):
  text = outputs["slurm_h100_x4"]
  script = text.split("# ---- runs/launch/s1/job.sbatch ----\n")[1].split("# ---- end")[0]
  for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
               "#SBATCH --partition=gpu", "#SBATCH --signal=TERM@120", "#SBATCH --requeue", "cd /shared/radfm_jax"):
    assert line in script.splitlines(), line
  srun = next(x for x in script.splitlines() if x.startswith("srun "))
  assert "/shared/radfm_env/bin/python -m radfm_jax.train" in srun
  assert "coordinator" not in srun and "process_id" not in srun   # jax.distributed detects SLURM
  assert _check_entry(_entry_argv(script, "radfm_jax.train"), 32) == {"data": 4, "fsdp": 8, "tensor": 1}
  assert text.rstrip().endswith("sbatch runs/launch/s1/job.sbatch")


# ------------------------------------------------------------------------------------------- refusals
def test_run_that_does_not_fit_is_refused_with_its_plan():
  rc, out, err = _dry_run(["launch.tpu_vm", "--name=big", "--accelerator=v5p-16", "--config=configs/tiny.py",
                           "--workdir=gs://b/big", f"--plan={PLAN8_OOM}"], REPO)
  assert rc == spec.EXIT_REFUSED
  assert "REFUSED: configs/tiny.py does not fit on v5p-16" in err
  assert "| train_step | NO | 103.00 | 95.00 |" in err and "| eval_step | yes |" in err
  assert "gcloud" not in out   # nothing was created


def test_mesh_and_override_errors_are_refused():
  rc, _, err = _dry_run(["launch.tpu_vm", "--name=m", "--accelerator=v5p-8", "--config=configs/tiny.py",
                         "--config.mesh.data=2", "--workdir=gs://b/m", f"--plan={PLAN4}"], REPO)
  assert rc == spec.EXIT_REFUSED and "covers 2 devices; the accelerator has 4" in err
  rc, _, err = _dry_run(["launch.slurm", "--name=m", "--accelerator=h100", "--config=configs/tiny.py",
                         "--config.no_such_key=1", "--workdir=/shared/m"], REPO)
  assert rc == spec.EXIT_REFUSED and "does not parse" in err and "no_such_key" in err
  rc, _, err = _dry_run(["launch.tpu_vm", "--name=m", "--accelerator=v5p-8", "--config=configs/tiny.py",
                         "--workdir=/local/m", f"--plan={PLAN4}"], REPO)
  assert rc == spec.EXIT_REFUSED and "use gs://" in err
  with pytest.raises(spec.Refused, match="needs a multiple of 3"):
    spec.mesh_devices({"data": -1, "fsdp": 3, "tensor": 1}, 8)


def _spec(**kw):
  base = dict(name="p1", entry="train", config="configs/tiny.py", overrides=["--config.total_steps=5"],
              workdir="gs://b/p1", stores=[], checkpoint=None, accelerator="v5p-16", num_slices=1)
  base.update(kw)
  return spec.RunSpec(**base)


def test_gate_runs_the_planner_and_reads_its_plan(tmp_path):
  calls = []

  def fake_planner(plan_file):
    def runner(cmd, cwd):
      calls.append(cmd)
      out = next(a.split("=", 1)[1] for a in cmd if a.startswith("--out="))
      os.makedirs(out, exist_ok=True)
      with open(plan_file) as src, open(os.path.join(out, "plan.json"), "w") as dst:
        dst.write(src.read())
      return subprocess.CompletedProcess(cmd, 0 if "oom" not in plan_file else 2)
    return runner

  log = []
  plan = spec.gate(_spec(), plan_dir=str(tmp_path / "ok"), runner=fake_planner(PLAN8), log=log.append)
  assert plan["fits"] and calls[0][1:] == ["-m", "radfm_jax.aot", "--config=configs/tiny.py",
                                           "--topology=v5p-16", f"--out={tmp_path / 'ok'}",
                                           "--config.total_steps=5"]
  assert any("fits" in line for line in log)
  with pytest.raises(spec.Refused, match="does not fit"):
    spec.gate(_spec(), plan_dir=str(tmp_path / "oom"), runner=fake_planner(PLAN8_OOM), log=log.append)
  with pytest.raises(spec.Refused, match="planner failed"):
    spec.gate(_spec(), plan_dir=str(tmp_path / "err"),
              runner=lambda cmd, cwd: subprocess.CompletedProcess(cmd, 1), log=log.append)
  with pytest.raises(spec.Refused, match="plan is for v5p-16"):
    spec.gate(_spec(accelerator="v5p-8"), plan_path=PLAN8, log=log.append)
  assert "--num_slices=2" in spec.plan_command(_spec(num_slices=2), "d")
  # CPU / GPU targets: config and mesh checked, no planner.
  assert spec.gate(_spec(accelerator="h100", gpus_per_node=8), log=log.append) is None


def test_entry_commands():
  s = _spec(entry="export", overrides=[])
  assert spec.entry_command(s) == ["python", "-m", "radfm_jax.export", "--workdir=gs://b/p1",
                                   "--dst=gs://b/p1/export"]
  s = _spec(entry="eval", stores=["gs://b/store"], extra=["--split=test"])
  assert spec.entry_command(s) == ["python", "-m", "eval.radbench", "--checkpoint=gs://b/p1/export",
                                   "--store=gs://b/store", "--out=gs://b/p1/radbench", "--split=test"]
  s = _spec(stores=["gs://b/store"], overrides=[])
  assert spec.entry_command(s)[-1] == "--config.data.store=gs://b/store"
  with pytest.raises(spec.Refused, match="exactly one --store"):
    spec.validate(_spec(entry="build"))
  assert spec.split_overrides(["x", "--config.a=1", "--name=n", "--", "--config.b=2"]) == (
      ["x", "--name=n", "--", "--config.b=2"], ["--config.a=1"])
  assert tpu_vm.code_uri(_spec()) == "gs://b/p1/code/radfm_jax.tgz"
  assert gcp_batch.volumes(["gs://b/raw:/mnt/disks/raw"]) == [
      {"gcs": {"remotePath": "b/raw"}, "mountPath": "/mnt/disks/raw"}]
  assert slurm.script(_spec(accelerator="cpu", nodes=2), partition=None, account=None, time="1:00:00", cpus=4,
                      venv=None, repo_dir="/r").count("--gpus-per-node") == 0
