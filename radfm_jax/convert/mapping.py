"""The conversion engine: key tables (`Layout`) between a torch state dict and our flat parameters.

A `Rule` ties one torch tensor (per layer) to one or more of our parameters:
  - `theirs`: the torch key; `{i}` stands for the layer index;
  - `ours`: our parameter path(s), '/'-joined. Several paths split the torch tensor along its first
    (row / output) axis in the listed order (fused q|k|v, k|v). A path without `{i}` in a layered rule
    is a scanned parameter whose leading axis is the layer; a path with `{i}` is one parameter per layer;
  - `linear`: the torch tensor is a `Linear` weight `[out, in]`; ours is the transpose, reshaped to our
    parameter's shape, whose first `in_axes` axes form the input dimension (e.g. `[d, heads, head_dim]`
    has in_axes=1, an output projection `[heads, head_dim, d]` has in_axes=2).
Expected torch shapes come from our abstract parameters (so from the model config): a mismatch is an
error naming the torch key with expected and actual shapes.

A `Layout` is the list of rules plus the torch keys dropped on purpose (regexes) and aliases (a torch key
that must hold the same tensor as another one). `import_params` converts tensor by tensor, putting each
parameter straight onto its sharding; `export_params` yields torch-layout tensors one at a time.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np

from radfm_jax.convert.sources import Source

Path = str  # '/'-joined path into our parameter tree


@dataclasses.dataclass(frozen=True)
class Rule:
  theirs: str
  ours: tuple[Path, ...]
  linear: bool = False
  in_axes: int = 1

  def __post_init__(self):
    if isinstance(self.ours, str):
      object.__setattr__(self, "ours", (self.ours,))

  @property
  def layered(self) -> bool:
    return "{i}" in self.theirs


@dataclasses.dataclass
class Layout:
  rules: list[Rule]
  dropped: list[str] = dataclasses.field(default_factory=list)        # regexes (full match)
  aliases: dict[str, str] = dataclasses.field(default_factory=dict)   # torch key -> equal torch key

  def is_dropped(self, key: str) -> bool:
    return any(re.fullmatch(p, key) for p in self.dropped)


@dataclasses.dataclass
class Report:
  """What an import did with each torch key."""
  consumed: list[str]
  dropped: list[str]
  aliases: list[str]

  def summary(self) -> str:
    groups: dict[str, int] = {}
    for k in self.dropped:
      head = ".".join(k.split(".")[:2])
      groups[head] = groups.get(head, 0) + 1
    dropped = ", ".join(f"{g}.* ({n})" for g, n in sorted(groups.items()))
    return (f"consumed {len(self.consumed)} tensors, checked {len(self.aliases)} duplicate(s) "
            f"{self.aliases}, dropped {len(self.dropped)}: {dropped or 'none'}")


# ----------------------------------------------------------------------------------------------------
# Shapes


def _num_layers(rule: Rule, shapes: Mapping[Path, tuple[int, ...]]) -> int:
  """Layer count of a layered rule, from the stacked leading axis or the per-layer paths present."""
  p = rule.ours[0]
  if "{i}" not in p:
    _require(p, shapes)
    return shapes[p][0]
  n = 0
  while p.format(i=n) in shapes:
    n += 1
  if n == 0:
    raise KeyError(f"our model has no parameter {p.format(i=0)!r} (rule for {rule.theirs!r})")
  return n


def _require(path: Path, shapes: Mapping[Path, Any]) -> None:
  if path not in shapes:
    near = [k for k in shapes if k.split("/")[-1] == path.split("/")[-1]][:6]
    raise KeyError(f"our model has no parameter {path!r}; parameters with the same leaf name: {near}")


def _layer_shape(rule: Rule, path: Path, shapes: Mapping[Path, tuple[int, ...]], i: int | None
                 ) -> tuple[int, ...]:
  if i is not None and "{i}" in path:
    path = path.format(i=i)
    _require(path, shapes)
    return tuple(shapes[path])
  _require(path, shapes)
  s = tuple(shapes[path])
  return s[1:] if (rule.layered and i is not None) else s


def _part_torch_shape(rule: Rule, s: tuple[int, ...]) -> tuple[int, ...]:
  if rule.linear:
    return (math.prod(s[rule.in_axes:]), math.prod(s[:rule.in_axes]))
  return s


def torch_shape(rule: Rule, shapes: Mapping[Path, tuple[int, ...]], i: int | None = None
                ) -> tuple[int, ...]:
  """The torch tensor shape this rule expects (for layer `i` of a layered rule)."""
  parts = [_part_torch_shape(rule, _layer_shape(rule, p, shapes, i)) for p in rule.ours]
  if len(parts) == 1:
    return parts[0]
  rest = {p[1:] for p in parts}
  if len(rest) != 1:
    raise ValueError(f"rule {rule.theirs}: parts {rule.ours} disagree on trailing shape {parts}")
  return (sum(p[0] for p in parts),) + parts[0][1:]


def expected_keys(layout: Layout, abstract: Mapping[Path, Any]) -> dict[str, tuple[int, ...]]:
  """{torch key: expected shape} for every rule (layers expanded) and alias, from our abstract params:
  a dry run that reads no tensor (e.g. to check a 53 GB file's keys and shapes in seconds)."""
  shapes = {p: tuple(a.shape) for p, a in abstract.items()}
  out: dict[str, tuple[int, ...]] = {}
  for rule in layout.rules:
    if rule.layered:
      for i in range(_num_layers(rule, shapes)):
        out[rule.theirs.format(i=i)] = torch_shape(rule, shapes, i)
    else:
      out[rule.theirs] = torch_shape(rule, shapes)
  for key, same in layout.aliases.items():
    out[key] = out[same]
  return out


def check_source(source: Source, layout: Layout, abstract: Mapping[Path, Any]) -> list[str]:
  """Problems (missing keys, wrong shapes, unknown keys) of `source` against the layout, without
  reading tensor data; [] when the source converts cleanly."""
  want = expected_keys(layout, abstract)
  have = set(source.keys())
  problems = [f"missing key {k!r} (expected shape {list(s)})" for k, s in want.items() if k not in have]
  problems += [f"key {k!r} has shape {list(source.shape(k))}, expected {list(s)}"
               for k, s in want.items() if k in have and tuple(source.shape(k)) != s]
  problems += [f"key {k!r} is neither converted nor known to be unused"
               for k in sorted(have - set(want)) if not layout.is_dropped(k)]
  return problems


def _split_rows(rule: Rule, t: np.ndarray, shapes, i) -> list[np.ndarray]:
  sizes = [_part_torch_shape(rule, _layer_shape(rule, p, shapes, i))[0] for p in rule.ours]
  return np.split(t, np.cumsum(sizes)[:-1], axis=0)


def _to_ours(rule: Rule, part: np.ndarray, our_shape: tuple[int, ...]) -> np.ndarray:
  return (part.T if rule.linear else part).reshape(our_shape)


def _to_theirs(rule: Rule, ours: np.ndarray) -> np.ndarray:
  if rule.linear:
    s = ours.shape
    return ours.reshape(math.prod(s[:rule.in_axes]), math.prod(s[rule.in_axes:])).T
  return ours


# ----------------------------------------------------------------------------------------------------
# Import


def put(buf: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
  """Places a host array on its sharding (each device gets only its shard; works multi-process)."""
  if sharding is None:
    return jax.device_put(buf)
  return jax.make_array_from_callback(buf.shape, sharding, lambda idx: buf[idx])


def import_params(source: Source, layout: Layout, abstract: Mapping[Path, Any],
                  dtype: Any = None, on_param: Callable[[Path, jax.Array], None] | None = None,
                  ) -> tuple[dict[Path, jax.Array], Report]:
  """Converts `source` into our parameters.

  Args:
    source: the torch-layout tensors (lazy).
    layout: the key table.
    abstract: our parameters as `jax.ShapeDtypeStruct`s (with `.sharding`, or None for default placement).
    dtype: target dtype (default: each abstract parameter's dtype).
    on_param: called with each finished parameter (e.g. to log progress).
  Returns:
    ({path: array}, report).
  Raises:
    ValueError before converting anything, listing every missing key, every shape that disagrees with
    the config (key, expected and actual shape) and every key that is neither converted nor declared
    dropped; or when an alias differs from its original.
  """
  problems = check_source(source, layout, abstract)  # fail fast, before hours of conversion
  if problems:
    raise ValueError(f"{source.name}: {len(problems)} problem(s) against the model config:\n  "
                     + "\n  ".join(problems[:50]) + ("\n  ..." if len(problems) > 50 else ""))
  aliases = []
  for key, same in layout.aliases.items():
    a, b = source.get(key), source.get(same)
    if not np.array_equal(a, b):
      raise ValueError(f"{source.name}: {key!r} must equal {same!r} (they are one tensor upstream); "
                       f"max abs difference {np.max(np.abs(a.astype(np.float32) - b.astype(np.float32)))}")
    aliases.append(key)
    del a, b
  source.consumed.difference_update(layout.aliases.values())  # consumed for real by their rules

  shapes = {p: tuple(a.shape) for p, a in abstract.items()}
  out: dict[Path, jax.Array] = {}
  for rule in layout.rules:
    bufs: dict[Path, np.ndarray] = {}

    def target_dtype(p: Path) -> Any:
      return np.dtype(dtype) if dtype is not None else np.dtype(abstract[p].dtype)

    if rule.layered:
      n = _num_layers(rule, shapes)
      layer_ids: Sequence[int | None] = range(n)
    else:
      layer_ids = [None]
    for i in layer_ids:
      key = rule.theirs.format(i=i) if i is not None else rule.theirs
      t = source.get(key, torch_shape(rule, shapes, i))
      for p, part in zip(rule.ours, _split_rows(rule, t, shapes, i)):
        if "{i}" in p:  # one parameter per layer
          pi = p.format(i=i)
          bufs[pi] = _to_ours(rule, part, shapes[pi]).astype(target_dtype(pi))
          continue
        arr = _to_ours(rule, part, _layer_shape(rule, p, shapes, i))
        if i is None:
          bufs[p] = arr.astype(target_dtype(p))
        else:
          if p not in bufs:
            bufs[p] = np.empty(shapes[p], target_dtype(p))
          bufs[p][i] = arr
      del t
    for p, buf in bufs.items():
      if p in out:
        raise ValueError(f"our parameter {p!r} is written by two rules (second: {rule.theirs})")
      out[p] = put(buf, getattr(abstract[p], "sharding", None))
      if on_param is not None:
        on_param(p, out[p])
    del bufs

  missing = sorted(set(abstract) - set(out))
  if missing:
    raise ValueError(f"no conversion rule fills our parameters {missing} (converter table incomplete)")

  leftover = source.unconsumed()
  dropped = [k for k in leftover if layout.is_dropped(k)]
  unknown = [k for k in leftover if not layout.is_dropped(k)]
  if unknown:
    raise ValueError(f"{source.name}: {len(unknown)} key(s) neither converted nor known to be unused: "
                     f"{unknown[:20]}{' ...' if len(unknown) > 20 else ''}")
  consumed = sorted(source.consumed - set(aliases))
  return out, Report(consumed=consumed, dropped=dropped, aliases=aliases)


# ----------------------------------------------------------------------------------------------------
# Export


def to_host(x: Any) -> np.ndarray:
  """A (possibly sharded, possibly multi-process) array gathered to a host numpy array."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def export_params(params: Mapping[Path, Any], layout: Layout, dtype: Any = None,
                  shapes: Mapping[Path, tuple[int, ...]] | None = None) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (torch key, tensor) in torch layout, one at a time, fetching one parameter at a time.

  `params` may be lazy (then pass `shapes`, so that nothing is read up front). Aliases are yielded
  after their original. Raises KeyError when `params` lacks a parameter a rule needs and ValueError
  when a parameter is left unexported.
  """
  if shapes is None:
    shapes = {p: tuple(np.shape(a)) for p, a in params.items()}
  cache: dict[Path, np.ndarray] = {}
  used: set[Path] = set()
  emitted: dict[str, np.ndarray] = {}
  wanted = set(layout.aliases.values())

  def fetch(p: Path) -> np.ndarray:
    if p not in cache:
      _require(p, shapes)
      cache[p] = to_host(params[p])
    return cache[p]

  for rule in layout.rules:
    n = _num_layers(rule, shapes) if rule.layered else None
    for i in (range(n) if n is not None else [None]):
      parts = []
      for p in rule.ours:
        if i is not None and "{i}" in p:
          arr = fetch(p.format(i=i))
          used.add(p.format(i=i))
        else:
          arr = fetch(p)[i] if i is not None else fetch(p)
          used.add(p)
        parts.append(_to_theirs(rule, arr))
      t = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
      t = np.ascontiguousarray(t if dtype is None else t.astype(dtype))
      key = rule.theirs.format(i=i) if i is not None else rule.theirs
      if key in wanted:
        emitted[key] = t
      yield key, t
    cache.clear()
  for key, same in layout.aliases.items():
    yield key, emitted[same]
  unused = sorted(set(params) - used)
  if unused:
    raise ValueError(f"export has no rule for our parameters {unused} (converter table incomplete)")
