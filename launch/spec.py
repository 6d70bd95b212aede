"""The run description every launcher shares, its checks, and the planner gate.

A run is: an entry point (train | eval | build | export), a config file with `--config.key=value`
overrides, a workdir (gs:// for anything remote), stores, the accelerator (a TPU type such as v5p-64 with
a slice count, GPUs per node with a node count, or cpu), and extra arguments for the entry point
(everything after `--` on the launcher's command line).

  python -m launch.tpu_vm --name=r1 --entry=train --config=configs/tiny.py --config.total_steps=100 \
      --workdir=gs://BUCKET/runs/r1 --accelerator=v5p-8 --dry_run

Before anything is created, each launcher
  1. loads the config with ml_collections' config_flags and applies the overrides (a typo fails here,
     not on the pod), and checks that the config's mesh covers exactly the accelerator's chips;
  2. runs the planner `python -m radfm_jax.aot --config=CFG --topology=TOPO --out=DIR` (TPU targets) and
     refuses a run that does not fit, printing the plan (`--plan=plan.json` uses a precomputed plan).
`--dry_run` prints the exact commands / manifests and touches no network.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from launch import topology as topology_lib

ENTRIES = ("train", "eval", "build", "export")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANNER = ("-m", "radfm_jax.aot")
EXIT_REFUSED = 2

_OVERRIDES: list[str] = []   # the --config.* arguments of this command line (split_overrides)


class Refused(Exception):
  """The run was refused before anything was created (it does not fit, or the description is wrong)."""


def define_flags() -> None:
  """The shared flags (each launcher adds its target's own)."""
  flags.DEFINE_string("name", None, "Run name: the TPU / job / workload name (lower case, digits, -).")
  flags.DEFINE_enum("entry", "train", ENTRIES, "What to run.")
  flags.DEFINE_string("config", None, "Config file (configs/*.py[:ARG]); --config.key=value overrides follow.")
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, outputs (gs://BUCKET/... remote).")
  flags.DEFINE_multi_string("store", [], "Store root(s): train (overrides data.store), eval input, build output.")
  flags.DEFINE_string("checkpoint", None, "Params checkpoint: eval input, export output (default WORKDIR/export).")
  flags.DEFINE_string("accelerator", "v5p-8", "TPU type (v5p-64, v6e-16, ...), a GPU type (h100, a100) or cpu.")
  flags.DEFINE_integer("num_slices", 1, "TPU slices (multislice: data parallel over slices, over DCN).")
  flags.DEFINE_integer("nodes", 1, "GPU / CPU nodes (SLURM).")
  flags.DEFINE_integer("gpus_per_node", 8, "GPUs per node (GPU accelerators).")
  flags.DEFINE_string("image", None, "Container image (built from launch/Dockerfile).")
  flags.DEFINE_string("plan", None, "A precomputed planner plan.json (skips running the planner).")
  flags.DEFINE_string("plan_dir", None, "Where the planner writes (default runs/launch/NAME/plan).")
  flags.DEFINE_bool("dry_run", False, "Print the exact commands / manifests; touch no network.")


@dataclasses.dataclass
class RunSpec:
  name: str
  entry: str
  config: str | None
  overrides: list[str]
  workdir: str
  stores: list[str]
  checkpoint: str | None
  accelerator: str
  num_slices: int = 1
  nodes: int = 1
  gpus_per_node: int = 8
  image: str | None = None
  extra: list[str] = dataclasses.field(default_factory=list)

  @property
  def tpu(self) -> topology_lib.Topology | None:
    return topology_lib.parse(self.accelerator) if topology_lib.is_tpu(self.accelerator) else None

  @property
  def is_gpu(self) -> bool:
    return not self.tpu and self.accelerator != "cpu"

  def devices(self) -> int:
    """Accelerator chips (TPU) or GPUs of the whole run; 0 for cpu."""
    if self.tpu:
      return self.tpu.chips * self.num_slices
    return self.gpus_per_node * self.nodes if self.is_gpu else 0

  def processes(self) -> int:
    """JAX processes of the run: one per TPU host / per node."""
    return self.tpu.hosts * self.num_slices if self.tpu else self.nodes


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(argv without the --config.key=value arguments, those arguments). Stops at `--`."""
  rest, over, passthrough = [], [], False
  for a in argv:
    if a == "--":
      passthrough = True
    if not passthrough and a.startswith("--config."):
      if "=" not in a:
        raise app.UsageError(f"{a}: write overrides as --config.key=value")
      over.append(a)
    else:
      rest.append(a)
  return rest, over


def run(main: Callable[[Sequence[str]], Any]) -> None:
  """app.run(main) for a launcher: --config.* arguments are kept for the run description."""
  argv, over = split_overrides(sys.argv)
  _OVERRIDES[:] = over
  app.run(main, argv=argv)


def spec_from_flags(argv: Sequence[str]) -> RunSpec:
  f = flags.FLAGS
  extra = list(argv[1:])
  if extra and extra[0] == "--":
    extra = extra[1:]
  misplaced = [a for a in extra if a.split("=")[0] in ("--dry_run", "--nodry_run", "--plan", "--name")]
  if misplaced:
    raise app.UsageError(f"{misplaced} come after `--` and would go to the entry point; put launcher flags "
                         "before `--`")
  for name in ("name", "workdir"):
    if not f[name].value:
      raise app.UsageError(f"--{name} is required")
  if f.entry in ("train", "eval") and not f.config:
    raise app.UsageError(f"--entry={f.entry} needs --config (the planner and the mesh check read it)")
  spec = RunSpec(name=f.name, entry=f.entry, config=f.config, overrides=list(_OVERRIDES), workdir=f.workdir,
                 stores=list(f.store), checkpoint=f.checkpoint, accelerator=f.accelerator.lower(),
                 num_slices=f.num_slices, nodes=f.nodes, gpus_per_node=f.gpus_per_node, image=f.image,
                 extra=extra)
  validate(spec)
  return spec


def validate(spec: RunSpec) -> None:
  if not spec.name or not all(c.islower() or c.isdigit() or c == "-" for c in spec.name):
    raise Refused(f"--name={spec.name!r}: use lower-case letters, digits and '-' (cloud resource names)")
  if spec.entry not in ENTRIES:
    raise Refused(f"--entry={spec.entry!r}: expected one of {ENTRIES}")
  if spec.entry == "build" and len(spec.stores) != 1:
    raise Refused("--entry=build writes one store: give exactly one --store (the output, gs://...)")
  if spec.entry == "eval" and len(spec.stores) != 1 and not scores_predictions(spec):
    raise Refused("--entry=eval reads one store: give exactly one --store (or `-- --predictions=FILE`)")
  if spec.entry == "train" and len(spec.stores) > 1:
    raise Refused("--entry=train takes at most one --store (several: a data.mix in the config)")
  if spec.num_slices < 1 or spec.nodes < 1:
    raise Refused("--num_slices and --nodes must be >= 1")
  if spec.num_slices > 1 and not spec.tpu:
    raise Refused(f"--num_slices={spec.num_slices} needs a TPU --accelerator, got {spec.accelerator!r}")


# ----------------------------------------------------------------------------------------------------
# The command the run executes on every host.
# ----------------------------------------------------------------------------------------------------
def scores_predictions(spec: RunSpec) -> bool:
  return any(a.startswith("--predictions") for a in spec.extra)


def checkpoint_path(spec: RunSpec) -> str:
  return spec.checkpoint or spec.workdir.rstrip("/") + "/export"


def entry_command(spec: RunSpec, python: str = "python") -> list[str]:
  """The program every process runs (the same on all hosts: JAX finds its process id by itself)."""
  if spec.entry == "train":
    cmd = [python, "-m", "radfm_jax.train", f"--config={spec.config}", f"--workdir={spec.workdir}"]
    cmd += spec.overrides
    if spec.stores:
      cmd.append(f"--config.data.store={spec.stores[0]}")
  elif spec.entry == "eval":
    cmd = [python, "-m", "eval.radbench", f"--out={spec.workdir.rstrip('/')}/radbench"]
    if not scores_predictions(spec):  # else: scoring a predictions file given after `--`
      cmd[3:3] = [f"--checkpoint={checkpoint_path(spec)}", f"--store={spec.stores[0]}"]
  elif spec.entry == "export":
    cmd = [python, "-m", "radfm_jax.export", f"--workdir={spec.workdir}", f"--dst={checkpoint_path(spec)}"]
  else:
    cmd = [python, "-m", "radfm_jax.data.build", f"--out={spec.stores[0]}"]
  return cmd + spec.extra


def shell(argv: Sequence[str]) -> str:
  return " ".join(shlex.quote(str(a)) for a in argv)


# ----------------------------------------------------------------------------------------------------
# Config and mesh checks.
# ----------------------------------------------------------------------------------------------------
def load_config(config: str, overrides: Sequence[str] = ()):
  """The config file with its overrides applied, parsed exactly as the entry points parse it."""
  argv = ["launch", f"--config={config}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "run config", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  try:
    fv(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    raise Refused(f"--config={config} with {list(overrides)} does not parse: {e}") from e
  return fv.config


def mesh_devices(mesh: dict[str, int], devices: int) -> dict[str, int]:
  """The mesh's axis sizes on `devices` devices (one axis may be -1); Refused when they do not match."""
  sizes = {k: int(v) for k, v in dict(mesh).items()}
  free = [k for k, v in sizes.items() if v == -1]
  fixed = 1
  for k, v in sizes.items():
    if v != -1:
      if v < 1:
        raise Refused(f"mesh {sizes}: axis {k} has size {v}")
      fixed *= v
  if len(free) > 1:
    raise Refused(f"mesh {sizes}: at most one axis may be -1")
  if free:
    if devices % fixed:
      raise Refused(f"mesh {sizes} needs a multiple of {fixed} devices; the accelerator has {devices}")
    sizes[free[0]] = devices // fixed
  elif fixed != devices:
    raise Refused(f"mesh {sizes} covers {fixed} devices; the accelerator has {devices} "
                  f"(set --config.mesh.<axis>=-1 or match the topology)")
  return sizes


def check_config(spec: RunSpec) -> dict[str, int] | None:
  """Parses the config with the overrides; returns the resolved mesh (None when nothing to check)."""
  if not spec.config:
    return None
  cfg = load_config(spec.config, spec.overrides)
  if spec.devices() == 0 or "mesh" not in cfg:
    return None
  return mesh_devices(cfg.mesh.to_dict(), spec.devices())


# ----------------------------------------------------------------------------------------------------
# The planner gate.
# ----------------------------------------------------------------------------------------------------
def plan_command(spec: RunSpec, out_dir: str, python: str = sys.executable) -> list[str]:
  cmd = [python, *PLANNER, f"--config={spec.config}", f"--topology={spec.tpu.name}", f"--out={out_dir}"]
  if spec.num_slices > 1:
    cmd.append(f"--num_slices={spec.num_slices}")
  return cmd + spec.overrides


def plan_table(plan: dict) -> str:
  rows = ["| program | fits | per-chip GiB | HBM GiB |", "|---|---|---:|---:|"]
  for p in plan.get("programs", []):
    rows.append(f"| {p.get('name')} | {'yes' if p.get('fits') else 'NO'} | "
                f"{p.get('per_chip_bytes', 0) / 2**30:.2f} | {p.get('hbm_bytes', 0) / 2**30:.2f} |")
  return "\n".join(rows)


def check_plan(spec: RunSpec, plan: dict) -> None:
  """Refused unless the plan is for this topology and every program fits."""
  topo = spec.tpu
  got = plan.get("topology") or {}
  if got.get("chips") not in (None, topo.chips, topo.chips * spec.num_slices):
    raise Refused(f"the plan is for {got.get('name')} ({got.get('chips')} chips); this run is {topo.name} "
                  f"({topo.chips} chips) x {spec.num_slices} slice(s)")
  if got.get("hosts") not in (None, topo.hosts, topo.hosts * spec.num_slices):
    raise Refused(f"the plan counts {got.get('hosts')} hosts; {topo.name} has {topo.hosts} per slice")
  if not plan.get("fits") or not all(p.get("fits") for p in plan.get("programs", [])):
    raise Refused(f"{spec.config} does not fit on {topo.name} (planner):\n{plan_table(plan)}")


def gate(spec: RunSpec, plan_path: str | None = None, plan_dir: str | None = None,
         runner: Callable[..., subprocess.CompletedProcess] = subprocess.run, log=print) -> dict | None:
  """Config + mesh check, then the planner (TPU only). Returns the plan (None when not planned)."""
  mesh = check_config(spec)
  if mesh:
    log(f"# mesh {mesh} on {spec.devices()} devices: ok")
  if not spec.tpu or spec.entry not in ("train", "eval"):
    log(f"# planner: not run ({'CPU / GPU target' if not spec.tpu else 'entry ' + spec.entry}); "
        "AOT planning covers TPU topologies")
    return None
  if plan_path is None:
    out = plan_dir or os.path.join("runs", "launch", spec.name, "plan")
    cmd = plan_command(spec, out)
    log(f"# planner: {shell(cmd)}")
    res = runner(cmd, cwd=REPO)
    if res.returncode not in (0, 2):
      raise Refused(f"the planner failed (exit {res.returncode}): {shell(cmd)}")
    plan_path = os.path.join(out, "plan.json")
  with open(plan_path, encoding="utf-8") as fh:
    plan = json.load(fh)
  check_plan(spec, plan)
  log(f"# plan {plan_path}: fits\n" + "\n".join("# " + r for r in plan_table(plan).splitlines()))
  return plan


def refuse_exit(e: Refused) -> None:
  print(f"REFUSED: {e}", file=sys.stderr)
  sys.exit(EXIT_REFUSED)


# ----------------------------------------------------------------------------------------------------
# Running (or, in a dry run, printing) the target's commands.
# ----------------------------------------------------------------------------------------------------
class Runner:
  """Prints every command; runs it unless dry_run. Output streams through (logs)."""

  def __init__(self, dry_run: bool, out=None):
    self.dry_run = dry_run
    self.out = out or sys.stdout

  def note(self, text: str) -> None:
    print("\n".join("# " + line for line in text.splitlines()), file=self.out, flush=True)

  def run(self, argv: Sequence[str], check: bool = True) -> int:
    print(shell(argv), file=self.out, flush=True)
    if self.dry_run:
      return 0
    rc = subprocess.run(list(argv)).returncode
    if check and rc:
      raise RuntimeError(f"exit {rc}: {shell(argv)}")
    return rc

  def output(self, argv: Sequence[str]) -> str:
    """stdout of a query command (dry run: printed, returns "")."""
    print(shell(argv), file=self.out, flush=True)
    if self.dry_run:
      return ""
    return subprocess.run(list(argv), capture_output=True, text=True).stdout.strip()

  def write(self, path: str, text: str) -> None:
    """Writes a generated file (job JSON, sbatch script, manifest); the dry run prints it instead."""
    print(f"# ---- {path} ----\n{text.rstrip()}\n# ---- end {path} ----", file=self.out, flush=True)
    if not self.dry_run:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def describe(spec: RunSpec) -> str:
  """One line: what runs where."""
  if spec.tpu:
    t = spec.tpu
    where = (f"{t.name} ({t.chips} chips, {t.hosts} host(s) x {t.chips_per_host} chips) x {spec.num_slices} "
             f"slice(s)")
  elif spec.is_gpu:
    where = f"{spec.nodes} node(s) x {spec.gpus_per_node} {spec.accelerator}"
  else:
    where = f"{spec.nodes} CPU node(s)"
  return f"run {spec.name}: {spec.entry} on {where}; {spec.processes()} JAX process(es)"
