"""TPU slice names as users type them for gcloud -> libtpu topology strings, chip facts, devices.

  topo = parse("v5p-128")            # gcloud name: v4 / v5p count TensorCores (2 per chip), v5e / v6e chips
  topo.libtpu, topo.chips            # "v5p:4x4x4", 64
  devs = devices(topo)               # compile-only TPU devices (libtpu, on a CPU-only machine)
  topo = with_devices(topo, devs)    # + hosts and chips per host from the devices' process indices

Accepted: v4-N, v5p-N, v5e-N / v5litepod-N, v6e-N (N as in `gcloud compute tpus tpu-vm create
--accelerator-type`), or a libtpu string (v5p:2x2x4, v6e:4x4); `num_slices` > 1 for multislice.
"local" plans for the devices of this machine (e.g. on a GPU host). GPU names (h100-8, ...) cannot be
compiled ahead of time without a GPU: the error says so.
HBM per chip (GiB, nominal): v4 32, v5e 16, v5p 95, v6e 32. Peak: metrics.PEAK_TFLOPS.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Sequence

import jax

from radfm_jax.training import metrics


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str        # libtpu prefix: v4 | v5p | v5e | v6e
  device_kind: str       # what jax reports
  hbm_gib: float
  cores_in_name: int     # gcloud's N counts TensorCores (2 per chip) or chips (1)
  dims: int              # torus dimensions of the topology string

  @property
  def hbm_bytes(self) -> int:
    return int(self.hbm_gib * 2**30)

  @property
  def peak_tflops(self) -> float:
    return float(metrics.peak_tflops(self.device_kind) or 0.0)


CHIPS = {
    "v4": Chip("v4", "TPU v4", 32.0, 2, 3),
    "v5p": Chip("v5p", "TPU v5", 95.0, 2, 3),
    "v5e": Chip("v5e", "TPU v5 lite", 16.0, 1, 2),
    "v6e": Chip("v6e", "TPU v6 lite", 32.0, 1, 2),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}
GPUS = ("h100", "h200", "a100", "b200", "gb200", "l4")


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str                       # as given (v5p-128)
  chip: Chip | None               # None for "local"
  chips: int                      # all slices together
  libtpu: str                     # libtpu topology string of one slice (v5p:4x4x4); "" for local
  num_slices: int = 1
  hosts: int | None = None        # from the devices (with_devices)
  chips_per_host: int | None = None
  hbm_bytes: int | None = None
  peak_tflops: float | None = None
  device_kind: str | None = None

  def as_json(self) -> dict[str, Any]:
    return {"name": self.name, "libtpu": self.libtpu, "num_slices": self.num_slices, "chips": self.chips,
            "hosts": self.hosts, "chips_per_host": self.chips_per_host, "device_kind": self.device_kind,
            "hbm_bytes": self.hbm_bytes, "peak_tflops": self.peak_tflops}


def _torus(chips: int, dims: int) -> tuple[int, ...]:
  """The standard slice shape of `chips` chips: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ... (3D) or
  1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16 (2D)."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f"{chips} chips: only power-of-two slices are mapped by name; pass the libtpu "
                     "topology string instead (e.g. v5p:2x2x3)")
  if dims == 2:
    a = 1 << (int(math.log2(chips)) // 2)
    return (a, chips // a)
  if chips < 4:
    return (chips, 1, 1) if chips > 1 else (1, 1, 1)
  shape = [1, 2, 2]
  while math.prod(shape) < chips:
    shape[0] *= 2
    shape.sort()
  return (2, 2, 1) if chips == 4 else tuple(shape)


def parse(name: str, num_slices: int = 1) -> Topology:
  """Topology for a gcloud accelerator name (v5p-128), a libtpu string (v5p:4x4x4) or "local"."""
  raw = name.strip().lower()
  if num_slices < 1:
    raise ValueError(f"--num_slices={num_slices} must be >= 1")
  if raw == "local":
    return Topology(name=name, chip=None, chips=0, libtpu="", num_slices=num_slices)
  if any(raw.startswith(g) for g in GPUS):
    raise ValueError(f"topology {name!r} is a GPU: GPU programs cannot be compiled ahead of time without a "
                     "GPU here (XLA's GPU compiler needs the device). Run the planner on the GPU host with "
                     "--topology=local")
  m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", raw)
  if m:
    gen = ALIASES.get(m.group(1), m.group(1))
    if gen not in CHIPS:
      raise ValueError(f"topology {name!r}: unknown TPU generation {m.group(1)!r}; expected one of "
                       f"{sorted(CHIPS)}")
    shape = tuple(int(x) for x in m.group(2).split("x"))
    return Topology(name=name, chip=CHIPS[gen], chips=math.prod(shape) * num_slices,
                    libtpu=f"{gen}:{m.group(2)}", num_slices=num_slices)
  m = re.fullmatch(r"([a-z0-9]+?)(?:pod)?-(\d+)", raw)
  if not m:
    raise ValueError(f"topology {name!r}: expected a gcloud name like v5p-128, v6e-64, v5litepod-16, "
                     "v4-32, a libtpu string like v5p:4x4x4, or 'local'")
  gen = ALIASES.get(m.group(1), m.group(1))
  if gen not in CHIPS:
    raise ValueError(f"topology {name!r}: unknown TPU generation {m.group(1)!r}; expected v4, v5p, "
                     "v5e (v5litepod), v6e")
  chip, n = CHIPS[gen], int(m.group(2))
  if n % chip.cores_in_name:
    raise ValueError(f"topology {name!r}: {gen}-N counts TensorCores ({chip.cores_in_name} per chip); "
                     f"N must be a multiple of {chip.cores_in_name}")
  chips = n // chip.cores_in_name
  shape = _torus(chips, chip.dims)
  return Topology(name=name, chip=chip, chips=chips * num_slices,
                  libtpu=f"{gen}:{'x'.join(map(str, shape))}", num_slices=num_slices)


def devices(topo: Topology) -> list[Any]:
  """The devices to build the mesh on: libtpu's compile-only devices for a TPU topology (works on a
  CPU-only machine with JAX_PLATFORMS=cpu), or this machine's devices for "local"."""
  if topo.chip is None:
    return list(jax.devices())
  # Compile-only: no chip is touched, so several planner processes (and tests) may hold libtpu.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # libtpu-only: the library loads without libtpu installed
  kw: dict[str, Any] = {"num_slices": topo.num_slices} if topo.num_slices > 1 else {}
  shape = [int(x) for x in topo.libtpu.split(":")[1].split("x")]
  if topo.chip.dims == 2 and math.prod(shape) <= 8:  # v5e / v6e slices of <= 8 chips are one host
    kw["chips_per_host_bounds"] = shape + [1]
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.libtpu, **kw)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(f"libtpu could not describe topology {topo.libtpu!r} ({topo.name}): {e}. Is "
                       "jax[tpu] (libtpu) installed? Another process holding libtpu needs "
                       "ALLOW_MULTIPLE_LIBTPU_LOAD=1") from e
  return list(desc.devices)


def with_devices(topo: Topology, devs: Sequence[Any]) -> Topology:
  """`topo` completed from its devices: chips, hosts, chips per host, device kind, HBM and peak."""
  hosts = len({d.process_index for d in devs})
  kind = devs[0].device_kind
  hbm = topo.chip.hbm_bytes if topo.chip else _local_hbm(devs[0])
  peak = metrics.peak_tflops(kind)
  return dataclasses.replace(topo, chips=len(devs), hosts=hosts, chips_per_host=len(devs) // hosts,
                             device_kind=kind, hbm_bytes=hbm, peak_tflops=peak)


def _local_hbm(dev) -> int | None:
  try:
    return int(dev.memory_stats()["bytes_limit"])
  except Exception:  # pylint: disable=broad-except  (CPU devices have no memory stats)
    return None
