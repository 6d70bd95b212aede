"""Device mesh, logical-axis rules and sharded parameter creation.

Mode: classic GSPMD. The mesh has axes ("data", "fsdp", "tensor") with `AxisType.Auto`; parameters
carry logical axis names (`nnx.Param` metadata `out_sharding`, see radfm_jax/models/layers.py) which
`RULES` maps to mesh axes; jitted functions get explicit in/out shardings and XLA propagates the rest.

Rules (weights): embed -> fsdp; heads, kv_heads, mlp, vocab -> tensor; everything else (layers,
head_dim, norm, patch, pos, latents, marker, vis_embed) replicated. Activations: batch -> (data, fsdp).
A dimension not divisible by its mesh axes' size is replicated instead (`spec_for`).
Activations are constrained (`constrain`: batch over (data, fsdp), logits' vocab over tensor) when the
model runs under `with jax.set_mesh(mesh):`; without a mesh context the constraints are no-ops.

  mesh = make_mesh(cfg.mesh)                       # e.g. dict(data=-1, fsdp=1, tensor=1)
  graphdef, state = create_sharded(cfg.model, mesh, seed)   # params born sharded
  model = nnx.merge(graphdef, state)
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("head_dim", None),
    ("norm", None),
    ("patch", None),
    ("pos", None),
    ("pos_embed", None),
    ("latents", None),
    ("marker", None),
    ("vis_embed", None),
    ("length", None),
    ("act_embed", None),
)

data_spec = P(BATCH_AXES)


def make_mesh(cfg_mesh: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """Mesh with axes ("data", "fsdp", "tensor") sized from cfg_mesh; at most one size may be -1."""
  devices = list(jax.devices() if devices is None else devices)
  unknown = set(cfg_mesh.keys()) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"cfg.mesh has unknown axes {sorted(unknown)}; expected {MESH_AXES}")
  sizes = [int(cfg_mesh.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"cfg.mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"cfg.mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"cfg.mesh {dict(zip(MESH_AXES, sizes))}: {len(devices)} devices are not "
                       f"divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"cfg.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"have {len(devices)}")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(names: Sequence[str | None], rules=RULES) -> P:
  """PartitionSpec for a tuple of logical axis names (unknown names and None replicate)."""
  table = dict(rules)
  out, used = [], set()
  for n in names:
    m = table.get(n) if n is not None else None
    axes = () if m is None else ((m,) if isinstance(m, str) else tuple(m))
    if used & set(axes):
      raise ValueError(f"logical axes {tuple(names)} map mesh axes {axes} twice")
    used |= set(axes)
    out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
  return P(*out)


def _fit(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Replicates dims whose size is not divisible by their mesh axes' total size."""
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    size = math.prod(mesh.shape[a] for a in axes)
    out.append(entry if size and dim % size == 0 else None)
  return P(*out)


def spec_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=RULES) -> P:
  return _fit(logical_to_spec(names, rules), shape, mesh)


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules=RULES) -> nnx.State:
  """NamedSharding per leaf of an (abstract or concrete) nnx.State, from its logical axis metadata."""

  def one(x):
    if isinstance(x, nnx.Variable):
      names = x.get_metadata().get("out_sharding") or (None,) * x.ndim
      return x.replace(NamedSharding(mesh, spec_for(names, x.shape, mesh, rules)))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def partition_specs(abstract_state: nnx.State, mesh: Mesh, rules=RULES) -> dict[str, P]:
  """{"path/to/param": PartitionSpec} (golden-spec tests, logging)."""
  flat = nnx.to_flat_state(state_shardings(abstract_state, mesh, rules))
  return {"/".join(map(str, k)): v.get_value().spec for k, v in flat}


def abstract_sharded(make: Callable[[], nnx.Module], mesh: Mesh, rules=RULES) -> nnx.Module:
  """`nnx.eval_shape(make)` whose params are `jax.ShapeDtypeStruct`s carrying their NamedSharding
  (restore targets; no allocation)."""
  graphdef, state = nnx.split(nnx.eval_shape(make))
  shardings = state_shardings(state, mesh, rules)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
  return nnx.merge(graphdef, state)


def create_sharded(model_cls: Callable, cfg_model, mesh: Mesh, seed: int = 0, rules=RULES,
                   ) -> tuple[nnx.GraphDef, nnx.State]:
  """Builds `model_cls(cfg_model, rngs=...)` (a class from `radfm_jax.models`) with every parameter
  created directly in its sharded layout (never whole on one device): eval_shape for the abstract
  state, then jit(init, out_shardings=...)."""

  def make():
    return model_cls(cfg_model, rngs=nnx.Rngs(seed))

  graphdef, abs_state = nnx.split(nnx.eval_shape(make))
  shardings = state_shardings(abs_state, mesh, rules)
  state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
  return graphdef, state


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Activation sharding constraint by logical names, active under `with jax.set_mesh(mesh)` (a mesh
  with our axes); a no-op otherwise (single device, tests without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, spec_for(names, x.shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of a batch-major activation/input array: leading dim over ("data", "fsdp")."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def host_to_global(x: Any, mesh: Mesh) -> jax.Array:
  """This process's rows of a batch-major host array -> one global array sharded over (data, fsdp)
  (every process passes its own rows; the global batch is their concatenation in process order)."""
  x = np.asarray(x)
  return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """A host batch pytree (leading batch dim) -> global arrays (`host_to_global` per leaf)."""
  return jax.tree.map(lambda x: host_to_global(x, mesh), batch)


def inference_mesh(cfg_mesh: Mapping[str, int] | None = None, spec: str = "") -> Mesh:
  """The mesh inference (generate, eval, demo) runs on: `spec` ("data,fsdp,tensor", e.g. a --mesh
  flag) when given, else the checkpoint config's `mesh`, else fsdp over all devices."""
  if spec:
    try:
      sizes = [int(x) for x in spec.split(",")]
    except ValueError as e:
      raise ValueError(f"mesh {spec!r} must be three integers data,fsdp,tensor") from e
    if len(sizes) != 3:
      raise ValueError(f"mesh {spec!r} must be three integers data,fsdp,tensor")
    return make_mesh(dict(zip(MESH_AXES, sizes)))
  return make_mesh(cfg_mesh or dict(data=1, fsdp=-1, tensor=1))
