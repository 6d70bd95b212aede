"""TPU slice names as users type them for gcloud / GKE -> chips, hosts, chips per host, libtpu topology.

  topology.parse("v5p-64")       -> Topology(name="v5p-64", chips=32, hosts=8, chips_per_host=4, shape="2x4x4")
  topology.parse("v5litepod-16") -> 16 chips on 4 hosts (v5e-16 is the same slice)
  topology.parse("v6e-8")        -> 8 chips on 1 host

Naming (Cloud TPU docs, "TPU versions" / v4 / v5e / v5p / v6e pages):
  * v4-N and v5p-N count TensorCores: 2 per chip, so v5p-8 is 4 chips (2x2x1) on one host.
  * v5litepod-N (= v5e-N) and v6e-N count chips.
  * Hosts (TPU VMs, one JAX process each) hold 4 chips, except the single-host v5e / v6e slices of 1, 4
    and 8 chips (an 8-chip VM, ct5lp-hightpu-8t / ct6e-standard-8t). Multi-host v5e / v6e slices use
    4-chip VMs.
  * `libtpu` is the string `jax.experimental.topologies.get_topology_desc(platform="tpu",
    topology_name=...)` takes ("v5p:2x4x4"); `shape` is what GKE's cloud.google.com/gke-tpu-topology wants.

One table for the whole project: the launchers read it, and the planner (`python -m radfm_jax.aot`) should
too (import `launch.topology`, or move this module under radfm_jax/ and point launch/ at it).
"""
from __future__ import annotations

import dataclasses
import re

# chips -> the default slice shape (3D torus for v4 / v5p, 2D for v5e / v6e).
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16", 6144: "16x16x24"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


@dataclasses.dataclass(frozen=True)
class Generation:
  name: str                 # canonical gcloud prefix
  aliases: tuple[str, ...]  # other prefixes users type
  cores_per_chip: int       # what the gcloud suffix counts per chip
  shapes: dict              # chips -> slice shape
  libtpu: str               # libtpu topology prefix
  gke_accelerator: str      # GKE node label cloud.google.com/gke-tpu-accelerator
  single_host_max: int      # slices up to this many chips sit on one VM
  hbm_gib: float            # per chip
  runtime: str              # default TPU VM software version (gcloud --runtime-version)


GENERATIONS = {
    "v4": Generation("v4", (), 2, _SHAPES_3D, "v4", "tpu-v4-podslice", 4, 32.0, "tpu-ubuntu2204-base"),
    "v5p": Generation("v5p", (), 2, _SHAPES_3D, "v5p", "tpu-v5p-slice", 4, 95.0, "v2-alpha-tpuv5"),
    "v5litepod": Generation("v5litepod", ("v5e",), 1, _SHAPES_2D, "v5e", "tpu-v5-lite-podslice", 8, 16.0,
                            "v2-alpha-tpuv5-lite"),
    "v6e": Generation("v6e", (), 1, _SHAPES_2D, "v6e", "tpu-v6e-slice", 8, 32.0, "v2-alpha-tpuv6e"),
}
CHIPS_PER_MULTIHOST_VM = 4


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str            # canonical gcloud accelerator type, e.g. "v5p-64"
  generation: str      # "v4" | "v5p" | "v5litepod" | "v6e"
  chips: int
  hosts: int
  chips_per_host: int
  shape: str           # "2x4x4"
  libtpu: str          # "v5p:2x4x4"
  gke_accelerator: str
  hbm_gib: float
  runtime: str

  @property
  def multi_host(self) -> bool:
    return self.hosts > 1


def parse(name: str) -> Topology:
  """A gcloud TPU type ("v5p-64", "v5litepod-16", "v5e-16", "v6e-8", "v4-32") -> its Topology."""
  m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name.strip().lower())
  if not m:
    known = ", ".join(f"{g}-N" for g in ("v4", "v5p", "v5litepod", "v5e", "v6e"))
    raise ValueError(f"TPU type {name!r}: expected one of {known} (gcloud accelerator type)")
  prefix, n = m.group(1), int(m.group(2))
  gen = next(g for g in GENERATIONS.values() if prefix == g.name or prefix in g.aliases)
  if n % gen.cores_per_chip:
    raise ValueError(f"TPU type {name!r}: {gen.name}-N counts TensorCores ({gen.cores_per_chip} per chip); "
                     f"N must be a multiple of {gen.cores_per_chip}")
  chips = n // gen.cores_per_chip
  if chips not in gen.shapes:
    sizes = ", ".join(f"{gen.name}-{c * gen.cores_per_chip}" for c in sorted(gen.shapes))
    raise ValueError(f"TPU type {name!r} ({chips} chips) is not a standard {gen.name} slice; known: {sizes}")
  per_host = chips if chips <= gen.single_host_max else CHIPS_PER_MULTIHOST_VM
  shape = gen.shapes[chips]
  return Topology(name=f"{gen.name}-{n}", generation=gen.name, chips=chips, hosts=chips // per_host,
                  chips_per_host=per_host, shape=shape, libtpu=f"{gen.libtpu}:{shape}",
                  gke_accelerator=gen.gke_accelerator, hbm_gib=gen.hbm_gib, runtime=gen.runtime)


def is_tpu(name: str) -> bool:
  return re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-\d+", name.strip().lower()) is not None


def table() -> list[Topology]:
  """Every slice of the table (for docs and tests)."""
  return [parse(f"{g.name}-{c * g.cores_per_chip}") for g in GENERATIONS.values() for c in sorted(g.shapes)]
