"""Device mesh, logical-axis rules and sharded parameter creation.

Mode: classic GSPMD. The mesh has axes ("data", "fsdp", "tensor") with `AxisType.Auto`; parameters
carry logical axis names (`nnx.Param` metadata `out_sharding`, see radfm_jax/models/layers.py) which
`RULES` maps to mesh axes; jitted functions get explicit in/out shardings and XLA propagates the rest.

Rules (weights): embed -> fsdp; heads, kv_heads, mlp, vocab -> tensor; everything else (layers,
head_dim, norm, patch, pos, latents, marker, vis_embed) replicated. Activations: batch -> (data, fsdp).
A parameter dimension not divisible by its mesh axes' size is an error naming the parameter and the
axis (`state_shardings`); an activation dimension that does not divide is replicated (`constrain`).
`advice` says when a logical axis could be sharded over a larger mesh axis than the rules give it.

Activations are constrained (`constrain`: batch over (data, fsdp), logits' vocab over tensor) only
while a mesh is active: `with activation_mesh(mesh):` (usable inside a traced function, which is how
the train / eval steps and generation enter it) or `with jax.set_mesh(mesh):` (outside jit). Without
one the constraints are no-ops and XLA may keep the whole global batch on every chip.

  mesh = make_mesh(cfg.mesh)                       # e.g. dict(data=-1, fsdp=1, tensor=1)
  mesh = make_mesh(cfg.mesh, devices=topology_devices, num_slices=2)  # multislice: data spans slices
  graphdef, state = create_sharded(cfg.model, mesh, seed)   # params born sharded
  model = nnx.merge(graphdef, state)
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
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


def make_mesh(cfg_mesh: Mapping[str, int], devices: Sequence[Any] | None = None, *,
              num_slices: int | None = None) -> Mesh:
  """Mesh with axes ("data", "fsdp", "tensor") sized from cfg_mesh; at most one size may be -1.

  devices: any device list (default `jax.devices()`): real devices or a TPU topology's compile-only
  devices (radfm_jax.aot). Multislice (num_slices > 1; default: the number of distinct `slice_index`
  values of the devices, 1 when they have none): data parallel over DCN, the data axis spans the
  slices, slice-major (`mesh_utils.create_hybrid_device_mesh`), so only the data-parallel gradient
  reduction crosses slices; data must be a multiple of num_slices.
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_slices is None:
    num_slices = len({getattr(d, "slice_index", None) for d in devices} - {None}) or 1
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
  types = (AxisType.Auto,) * 3
  if num_slices <= 1:
    try:
      return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=types, devices=devices)
    except (ValueError, NotImplementedError):  # e.g. tensor=4 on a 16x16 torus: split a physical axis
      grid = mesh_utils.create_device_mesh(tuple(sizes), devices, allow_split_physical_axes=True)
      return Mesh(grid, MESH_AXES, axis_types=types)
  if sizes[0] % num_slices:
    raise ValueError(f"cfg.mesh {dict(zip(MESH_AXES, sizes))}: with {num_slices} slices the data axis "
                     f"must be a multiple of {num_slices} (data parallel over DCN)")
  ici = (sizes[0] // num_slices, sizes[1], sizes[2])
  grid = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices, allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES, axis_types=types)


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


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def _fit(spec: P, shape: Sequence[int], mesh: Mesh, *, names: Sequence[str | None] = (),
         what: str | None = None) -> P:
  """`spec` for an array of `shape`. A dim not divisible by its mesh axes' total size: replicated for
  activations (what=None); for a parameter (what = its path) a ValueError naming it and the axis."""
  out = []
  names = tuple(names) + (None,) * (len(shape) - len(names))
  for i, (dim, entry) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
    axes = _axes(entry)
    size = math.prod(mesh.shape[a] for a in axes)
    if size and dim % size == 0:
      out.append(entry)
      continue
    if what is not None:
      raise ValueError(
          f"parameter {what}: dim {i} ({names[i]!r} = {dim}) is not divisible by mesh axis "
          f"{'x'.join(axes)} of size {size} (mesh {dict(mesh.shape)}); pick --config.mesh sizes whose "
          f"{'x'.join(axes)} divides {dim} (e.g. {_divisors_hint(dim, size)})")
    out.append(None)
  return P(*out)


def _divisors_hint(dim: int, size: int) -> str:
  good = [d for d in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if dim % d == 0]
  lower = [d for d in good if d < size]
  return f"{lower[-1] if lower else 1}" + (f" or {[d for d in good if d > size][0]}"
                                           if any(d > size for d in good) else "")


def spec_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=RULES,
             what: str | None = None) -> P:
  """PartitionSpec of an array with logical `names` on `mesh`; `what` (a parameter path) makes a
  non-divisible dimension an error instead of replicating it."""
  return _fit(logical_to_spec(names, rules), shape, mesh, names=names, what=what)


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules=RULES) -> nnx.State:
  """NamedSharding per leaf of an (abstract or concrete) nnx.State, from its logical axis metadata.
  Raises ValueError naming the parameter and mesh axis when a sharded dimension does not divide."""

  def one(path, x):
    if isinstance(x, nnx.Variable):
      names = x.get_metadata().get("out_sharding") or (None,) * x.ndim
      return x.replace(NamedSharding(mesh, spec_for(names, x.shape, mesh, rules, what=_path(path))))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, abstract_state,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


def advice(abstract_state: nnx.State, mesh: Mesh, rules=RULES, min_bytes: int = 2**28) -> list[str]:
  """Where a logical axis could use a larger mesh axis: for each logical name of the parameters whose
  mesh axes are smaller than another mesh axis that shards none of those parameters yet and divides
  every dimension carrying that name, a sentence with the parameter bytes it would shard further (e.g.
  `embed` on fsdp=1 while data=8; not `heads` on tensor=1 while fsdp=8 already shards those weights).
  Names carrying less than `min_bytes` of parameters are left out."""
  table = dict(rules)
  dims: dict[str, list[int]] = {}
  nbytes: dict[str, int] = {}
  in_use: dict[str, set[str]] = {}   # mesh axes already sharding the parameters that carry a name
  for _, v in nnx.to_flat_state(abstract_state):
    if not isinstance(v, nnx.Variable):
      continue
    names = v.get_metadata().get("out_sharding") or ()
    size = int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
    axes_used = {a for n in names if n is not None for a in _axes(table.get(n))}
    for n, d in zip(names, v.shape):
      if n is not None and table.get(n) is not None:
        dims.setdefault(n, []).append(int(d))
        nbytes[n] = nbytes.get(n, 0) + size
        in_use.setdefault(n, set()).update(axes_used)
  out = []
  for n, ds in sorted(dims.items()):
    axes = _axes(table[n])
    cur = math.prod(mesh.shape[a] for a in axes)
    better = [(mesh.shape[a], a) for a in MESH_AXES if a not in in_use[n] and mesh.shape[a] > cur
              and all(d % mesh.shape[a] == 0 for d in ds)]
    if better and nbytes[n] >= min_bytes:
      size, axis = max(better)
      out.append(f"logical axis {n!r} is sharded over {'x'.join(axes)} (size {cur}) but mesh axis "
                 f"{axis!r} (size {size}), which shards none of these parameters, divides every {n!r} "
                 f"dimension: moving devices from {axis} to {'x'.join(axes)} (--config.mesh.{axes[0]}={size} "
                 f"--config.mesh.{axis}={cur}) would shard {nbytes[n] / 2**30:.2f} GiB of parameters "
                 f"{size // cur}x further")
  return out


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


_ACTIVE = threading.local()


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None) -> Iterator[None]:
  """Turns the activation constraints (`constrain`) on for code traced inside, on `mesh`. Unlike
  `jax.set_mesh` it may be entered inside a traced function: the train / eval steps and generation
  enter it themselves, so they are never traced without their mesh. `None`: no change."""
  prev = getattr(_ACTIVE, "mesh", None)
  _ACTIVE.mesh = prev if mesh is None else mesh
  try:
    yield
  finally:
    _ACTIVE.mesh = prev


def active_mesh() -> Mesh | jax.sharding.AbstractMesh | None:
  """The mesh the constraints use: `activation_mesh`'s, else `jax.set_mesh`'s, else None."""
  mesh = getattr(_ACTIVE, "mesh", None)
  if mesh is not None:
    return mesh
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return None
  return mesh


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Activation sharding constraint by logical names, active under `activation_mesh(mesh)` or
  `jax.set_mesh(mesh)` (a mesh with our axes); a no-op otherwise (single device, tests without a mesh)."""
  mesh = active_mesh()
  if mesh is None:
    return x
  spec = spec_for(names, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec)


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
