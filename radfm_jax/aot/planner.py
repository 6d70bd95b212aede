"""The plan of one config on one topology, and the search over mesh / microbatches / remat.

  topo, mesh = planner.setup("v5p-128", cfg)
  result = planner.plan(cfg, topo, mesh)           # {"fits", "topology", "mesh", "programs": [...], ...}
  found = planner.search(cfg, topo, devices)       # settings that fit with >= 10% headroom, best first

The JSON contract (plan.json; launchers rely on it): {"fits": bool, "topology": {"name", "chips",
"hosts", "chips_per_host", ...}, "programs": [{"name", "fits", "per_chip_bytes", "hbm_bytes", ...}]}.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from radfm_jax import models
from radfm_jax import sharding
from radfm_jax.aot import plan as plan_lib
from radfm_jax.aot import programs as programs_lib
from radfm_jax.aot import topology as topology_lib
from radfm_jax.training import data as train_data
from radfm_jax.training import metrics
from radfm_jax.training import state as train_state
from radfm_jax.training import step as train

HEADROOM = 0.10
REMATS = ("none", "dots", "full")
_MEM_RANK = {"none": 2, "dots": 1, "full": 0}   # activation memory, most first


def setup(name: str, cfg: ml_collections.ConfigDict, num_slices: int = 1
          ) -> tuple[topology_lib.Topology, list[Any]]:
  topo = topology_lib.parse(name, num_slices)
  devs = topology_lib.devices(topo)
  return topology_lib.with_devices(topo, devs), devs


def state_bytes_per_chip(layout: train_state.Layout) -> int:
  """Bytes of the train state on the most loaded chip (no compile: from the shardings)."""
  total = 0
  for a in jax.tree.leaves(layout.abstract):
    shape = a.sharding.shard_shape(a.shape)
    total += int(np.prod(shape)) * np.dtype(a.dtype).itemsize
  return total


def plan(cfg: ml_collections.ConfigDict, topo: topology_lib.Topology, devices: Sequence[Any], *,
         kinds: Sequence[str] = programs_lib.KINDS, all_buckets: bool = False, flops: bool = False,
         max_new_tokens: int = 64, buckets=None, compile: bool = True) -> dict[str, Any]:
  """Compiles every program of `cfg` for the topology (the largest bucket of each batch size, all
  buckets, or `buckets`); the plan dict (see the module docstring). compile=False: shapes, state bytes
  and analytic times only (seconds instead of minutes; `fits` is None unless the state alone overflows)."""
  mesh = sharding.make_mesh(cfg.mesh, devices=devices, num_slices=topo.num_slices)
  notes = []
  if "data" not in cfg:
    raise ValueError("the config has no data section (batch sizes, image grids, text lengths): nothing to "
                     "plan; use a training config (e.g. configs/medmd_pretrain.py:13b)")
  if "optim" not in cfg or "total_steps" not in cfg:
    kinds = tuple(k for k in kinds if k == "generate")
    notes.append("model-only config (no optimizer / schedule): generation only; plan a stage config "
                 "(configs/medmd_pretrain.py:SIZE) for training")
    if not kinds:
      raise ValueError(notes[-1])
    layout = None
  else:
    train.check_config(cfg, mesh)
    layout = train_state.make_layout(cfg, mesh)
  remat = str(cfg.model.get("remat", "none"))
  state_b = state_bytes_per_chip(layout) if layout else None
  abstract_model = layout.abstract_model if layout else nnx.state(
      nnx.eval_shape(lambda: models.get(models.DEFAULT)(cfg.model, rngs=nnx.Rngs(0))))
  result: dict[str, Any] = {
      "topology": topo.as_json(), "mesh": dict(mesh.shape), "microbatches": int(cfg.get("microbatches", 1)),
      "remat": remat, "state_bytes_per_chip": state_b, "notes": notes,
      "advice": sharding.advice(abstract_model, mesh), "programs": []}
  progs = programs_lib.build(cfg, mesh, kinds=kinds, all_buckets=all_buckets, max_new_tokens=max_new_tokens,
                             layout=layout, buckets=buckets)
  for p in progs:
    if topo.hbm_bytes and p.kind == "train" and state_b and state_b > topo.hbm_bytes:
      r = {"name": p.name, "kind": p.kind, "fits": False, "per_chip_bytes": state_b,
           "hbm_bytes": topo.hbm_bytes, "headroom": round(1 - state_b / topo.hbm_bytes, 4),
           "compile_seconds": 0.0,
           "error": f"not compiled: the train state alone needs {state_b / 2**30:.1f} GiB per chip"}
    elif not compile:
      r = {"name": p.name, "kind": p.kind, "bucket": dataclasses.asdict(p.bucket), "fits": None,
           "per_chip_bytes": None, "hbm_bytes": topo.hbm_bytes, "headroom": None, "compile_seconds": 0.0,
           "error": "not compiled"}
    else:
      r = plan_lib.compile_program(p, topo.hbm_bytes, cfg=cfg)
    xf = plan_lib.xla_flops(cfg, mesh, p) if flops and p.kind != "generate" and r.get("fits") else None
    r.update(plan_lib.timing(p, topo, xf, remat))
    result["programs"].append(r)
  fits = [r.get("fits") for r in result["programs"]]
  result["fits"] = False if False in fits else None if None in fits else True
  result["compile_seconds"] = round(sum(r.get("compile_seconds", 0.0) for r in result["programs"]), 1)
  return result


def epoch_days(cfg: ml_collections.ConfigDict, topo: topology_lib.Topology, samples: float,
               fraction_3d: float) -> float | None:
  """Days for `samples` training samples at 40% MFU (analytic FLOPs, no compile). One sample is one
  row (the stage configs do not pack); `fraction_3d` of them come in 3D batches (batch_size_3d rows of
  the deepest grid), the rest in 2D batches (batch_size rows); every batch is taken at its group's
  largest slots and length, so this is an upper bound (shorter texts and fewer images run faster)."""
  if not topo.peak_tflops or "optim" not in cfg:
    return None
  towers = train_state.trainable_towers(train_state.split_params(
      nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: models.get(models.DEFAULT)(cfg.model, rngs=nnx.Rngs(0))))),
      tuple(cfg.optim.freeze or ()))[0])
  total = 0.0
  for b in train_data.buckets(cfg, largest_only=True):
    frac = fraction_3d if b.group else 1.0 - fraction_3d
    flops = metrics.train_flops(cfg.model, batch=b.rows, seq_len=b.length, image_shape=(b.slots, *b.grid),
                                trainable=towers)
    total += samples * frac / b.rows * flops / (plan_lib.MFU_TARGET * topo.peak_tflops * 1e12 * topo.chips)
  return total / 86400.0


# ----------------------------------------------------------------------------------------------------
# Search.
# ----------------------------------------------------------------------------------------------------
def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def with_overrides(cfg: ml_collections.ConfigDict, setting: dict[str, Any]) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(cfg.to_dict())
  c.mesh = ml_collections.ConfigDict(dict(data=setting["data"], fsdp=setting["fsdp"], tensor=setting["tensor"]))
  c.microbatches = setting["microbatches"]
  c.model.remat = setting["remat"]
  return c


def overrides(setting: dict[str, Any]) -> str:
  return (f"--config.mesh.data={setting['data']} --config.mesh.fsdp={setting['fsdp']} "
          f"--config.mesh.tensor={setting['tensor']} --config.microbatches={setting['microbatches']} "
          f"--config.model.remat={setting['remat']}")


def candidates(cfg: ml_collections.ConfigDict, chips: int, *, remats: Sequence[str] = REMATS,
               tensors: Sequence[int] = (1, 2, 4, 8), max_microbatches: int = 64) -> list[dict[str, Any]]:
  """Every (data, fsdp, tensor, microbatches, remat) the config's batch sizes allow on `chips`,
  best predicted first: least recompute (remat), fewest microbatches, least tensor parallelism, most
  data parallelism (the cheapest communication when the state fits)."""
  sizes = [int(cfg.data.batch_size), int(cfg.data.get("batch_size_3d") or cfg.data.batch_size)]
  out = []
  for tensor in tensors:
    if chips % tensor:
      continue
    for fsdp in _divisors(chips // tensor):
      data = chips // tensor // fsdp
      shards = data * fsdp
      m = 1
      while m <= max_microbatches:
        if all(b % m == 0 and (b // m) % shards == 0 for b in sizes):
          for remat in remats:
            out.append(dict(data=data, fsdp=fsdp, tensor=tensor, microbatches=m, remat=remat))
        m *= 2
  return sorted(out, key=lambda s: (plan_lib.REMAT_FACTOR[s["remat"]], s["microbatches"], s["tensor"],
                                    -s["data"]))


def _dominated(s: dict[str, Any], failures: list[dict[str, Any]]) -> bool:
  """True when a setting needing no less memory already ran out: same mesh, no more microbatches,
  a remat policy saving no more."""
  return any(all(s[k] == f[k] for k in ("data", "fsdp", "tensor")) and s["microbatches"] <= f["microbatches"]
             and _MEM_RANK[s["remat"]] >= _MEM_RANK[f["remat"]] for f in failures)


def search(cfg: ml_collections.ConfigDict, topo: topology_lib.Topology, devices: Sequence[Any], *,
           max_compiles: int = 12, want: int = 3, remats: Sequence[str] = REMATS,
           tensors: Sequence[int] = (1, 2, 4, 8), buckets=None, log=print) -> dict[str, Any]:
  """Settings that fit with >= 10% headroom (train programs at the largest buckets, or `buckets`), best
  predicted step time first, within `max_compiles` compiles; stops after `want` fits."""
  tried, fits, failures = [], [], []
  compiles = 0
  for s in candidates(cfg, topo.chips, remats=remats, tensors=tensors):
    if len(fits) >= want or compiles >= max_compiles:
      break
    if _dominated(s, failures):
      continue
    c = with_overrides(cfg, s)
    try:
      mesh = sharding.make_mesh(c.mesh, devices=devices, num_slices=topo.num_slices)
      layout = train_state.make_layout(c, mesh)
    except ValueError as e:  # e.g. a parameter dimension the tensor axis does not divide
      tried.append({**s, "fits": False, "error": str(e)})
      continue
    state_b = state_bytes_per_chip(layout)
    if topo.hbm_bytes and state_b > (1 - HEADROOM) * topo.hbm_bytes:
      tried.append({**s, "fits": False, "error": f"state alone {state_b / 2**30:.1f} GiB per chip"})
      failures.append(s)
      continue
    compiles += 1
    log(f"search: compiling {overrides(s)}")
    res = plan(c, topo, devices, kinds=("train",), buckets=buckets)
    worst = max((r.get("per_chip_bytes") or 0) for r in res["programs"])
    step = sum(r.get("step_s_at_peak", 0.0) for r in res["programs"])
    ok = res["fits"] and topo.hbm_bytes and worst <= (1 - HEADROOM) * topo.hbm_bytes
    row = {**s, "fits": bool(ok), "per_chip_bytes": worst, "step_s_at_peak": step,
           "step_s_at_40_mfu": sum(r.get("step_s_at_40_mfu", 0.0) for r in res["programs"]),
           "headroom": None if not topo.hbm_bytes else round(1 - worst / topo.hbm_bytes, 4),
           "compile_seconds": res["compile_seconds"], "overrides": overrides(s)}
    tried.append(row)
    if ok:
      fits.append(row)
    else:
      failures.append(s)
  fits.sort(key=lambda r: (r["step_s_at_peak"], r["microbatches"], r["per_chip_bytes"]))
  return {"topology": topo.as_json(), "fits": fits, "tried": tried, "compiles": compiles,
          "headroom_required": HEADROOM}
