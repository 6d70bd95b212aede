"""LoRA: low-rank adapters on any `layers.Dense` of any tower, chosen by regexes over parameter paths.

  y = x . W  +  (alpha / rank) * ((dropout(x) . A) . B)        A [*in, r], B [r, *out]

A Dense whose kernel path (e.g. `lm/blocks/q/kernel`) matches one of `lora.targets` gets a child module
`lora` (an `Adapter`) holding `A` at `.../q/lora/a` and `B` at `.../q/lora/b` (`nnx.LoRAParam`s, a
subclass of `nnx.Param`, so they live in the same pure-dict parameter tree as everything else). The
adapter is applied inside the Dense's forward (the two thin matmuls, never W + AB materialised), so it
works unchanged in scanned layers (a stacked Dense gets stacked factors with the same leading "layers"
axis, which `lax.scan` slices like the kernel), under remat, in the KV-cache decoder and in every tower.

Sharding: A carries the kernel's logical axes on its input dims and B on its output dims (the rank axis
is replicated), so A of q [L, E, r] is ("layers", "embed", None) -> E over fsdp, and B of q
[L, r, H, k] is ("layers", None, "heads", "head_dim") -> H over tensor.
Init (as Hugging Face PEFT): A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B = 0, so a fresh adapter leaves
the model exactly as it was. Dropout (`lora.dropout`) acts on the adapter's input only, with keys the
train step hands in (`set_dropout_keys`); without keys (eval, generation) there is none.

The `lora` config section (top level of a training config; defaults in `default_config`):
  rank         0 = off
  alpha        scale = alpha / rank (PEFT's `lora_alpha`)
  dropout      on the adapter input, training only
  targets      regexes searched in Dense kernel paths ("lm/blocks/q/kernel", "vision/blocks/qkv/kernel")
  train        regexes of *other* parameters that still train (e.g. "^resampler/", "^fc/"); the rest of
               the model is frozen (plus whatever `optim.freeze` freezes)
  base_dtype   "" (as params) or e.g. "bfloat16": frozen parameters are held in this dtype
  init_adapters  an adapters-only checkpoint to start the adapters (and `train` params) from

Pure-dict helpers: `merge` folds the adapters into the kernels (plain params), `adapter_paths` /
`is_adapter` find them, `freeze_patterns` turns the config into the trainer's freeze regexes.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from flax import traverse_util

from radfm_jax.models import layers

# The LM's attention and MLP projections (Hugging Face PEFT's usual q/k/v/o + gate/up/down), in a RadFM
# (lm/blocks/...) or an LM-only model (blocks/...).
LM_TARGETS = (r"^(lm/)?blocks/(q|k|v|o|gate|up|down)/kernel$",)
ADAPTER_RE = r"(^|/)lora/(a|b)$"
_ADAPTER = re.compile(ADAPTER_RE)


def default_config() -> ml_collections.ConfigDict:
  """The `lora` config section with its defaults (rank 0: LoRA off)."""
  return ml_collections.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0, targets=LM_TARGETS, train=(),
                                        base_dtype="", init_adapters=""))


def section(cfg: Any) -> ml_collections.ConfigDict | None:
  """The `lora` section of a full config when LoRA is on (rank > 0), else None."""
  lcfg = cfg.get("lora") if hasattr(cfg, "get") else None
  if not lcfg or not int(lcfg.get("rank", 0) or 0):
    return None
  if int(lcfg.rank) < 0:
    raise ValueError(f"lora.rank={lcfg.rank} must be >= 0")
  if not 0.0 <= float(lcfg.get("dropout", 0.0)) < 1.0:
    raise ValueError(f"lora.dropout={lcfg.dropout} must be in [0, 1)")
  if not tuple(lcfg.get("targets") or ()):
    raise ValueError("lora.rank > 0 but lora.targets is empty")
  return lcfg


def is_adapter(path: str) -> bool:
  """True for an adapter factor's '/'-joined parameter path (`.../lora/a`, `.../lora/b`)."""
  return bool(_ADAPTER.search(path))


def scale(lcfg: Any) -> float:
  return float(lcfg.alpha) / int(lcfg.rank)


def _matcher(patterns: Iterable[str], what: str) -> Callable[[str], bool]:
  compiled = []
  for p in patterns or ():
    try:
      compiled.append(re.compile(p))
    except re.error as e:
      raise ValueError(f"{what} pattern {p!r} is not a valid regex: {e}") from None
  return lambda path: any(c.search(path) for c in compiled)


# ----------------------------------------------------------------------------------------------------
# The adapter module


class LoraRng(nnx.Variable):
  """Per-call dropout keys of an adapter (a leading "layers" axis in stacked blocks). Transient: set by
  the train step on the module it builds inside jit, never part of the parameter tree."""


class Adapter(nnx.Module):
  """Low-rank update of one Dense: `adapter(x) -> (alpha/rank) * (dropout(x) . a) . b` in float32.

  a [*stack, *in_features, rank], b [*stack, rank, *out_features]; `stack` is the Dense's leading
  stacked-layer dims (empty outside scanned blocks)."""

  def __init__(self, dense: layers.Dense, *, rank: int, alpha: float, dropout: float, rngs: nnx.Rngs):
    kernel = dense.kernel
    in_f, out_f = dense.in_features, dense.out_features
    n_stack = kernel.ndim - len(in_f) - len(out_f)
    stack = tuple(kernel.shape[:n_stack])
    axes = tuple(kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim)
    s_axes, in_axes, out_axes = axes[:n_stack], axes[n_stack:n_stack + len(in_f)], axes[n_stack + len(in_f):]
    dtype = kernel.dtype
    bound = 1.0 / math.sqrt(math.prod(in_f))  # PEFT: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))
    a = jax.random.uniform(rngs.params(), stack + in_f + (rank,), dtype, -bound, bound)
    self.a = nnx.LoRAParam(a, out_sharding=s_axes + in_axes + (None,), eager_sharding=False)
    self.b = nnx.LoRAParam(jnp.zeros(stack + (rank,) + out_f, dtype),
                           out_sharding=s_axes + (None,) + out_axes, eager_sharding=False)
    self.n_in, self.stack = len(in_f), stack
    self.scale, self.dropout = float(alpha) / rank, float(dropout)
    self.dtype = dense.dtype
    self.rng = None  # LoraRng while a training forward runs

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.rng is not None and self.dropout > 0.0:
      keep = jax.random.bernoulli(self.rng[...], 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros((), x.dtype)).astype(x.dtype)
    n = self.n_in
    h = jax.lax.dot_general(x.astype(self.dtype), self.a[...].astype(self.dtype),
                            ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())),
                            preferred_element_type=jnp.float32)
    y = jax.lax.dot_general(h.astype(self.dtype), self.b[...].astype(self.dtype),
                            (((h.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return y * self.scale


def dense_paths(model: nnx.Module) -> dict[str, layers.Dense]:
  """{'lm/blocks/q/kernel': the Dense} for every Dense in the model (paths of their kernels)."""
  return {"/".join(map(str, p)) + "/kernel": node for p, node in nnx.iter_graph(model)
          if isinstance(node, layers.Dense)}


def add_adapters(model: nnx.Module, lcfg: Any, rngs: nnx.Rngs) -> list[str]:
  """Attaches an `Adapter` to every Dense whose kernel path matches `lcfg.targets`; returns those kernel
  paths. Raises when nothing matches (naming the Dense paths there are)."""
  match = _matcher(lcfg.targets, "lora.targets")
  found = dense_paths(model)
  chosen = sorted(p for p in found if match(p))
  if not chosen:
    raise ValueError(f"lora.targets={tuple(lcfg.targets)} match no Dense kernel; they look like "
                     f"{sorted(found)[:8]}")
  for p in chosen:
    dense = found[p]
    if dense.lora is not None:
      raise ValueError(f"{p} already has an adapter")
    dense.lora = nnx.data(Adapter(dense, rank=int(lcfg.rank), alpha=float(lcfg.alpha),
                                  dropout=float(lcfg.get("dropout", 0.0)), rngs=rngs))
  return chosen


def wrap(model_cls: Callable, cfg: Any) -> Callable:
  """`model_cls` itself when LoRA is off, else a constructor with the same signature
  (`make(cfg_model, *, rngs)`) that builds the model and then its adapters. The base parameters are
  drawn first from the same stream, so they equal the model built without LoRA with the same seed."""
  lcfg = section(cfg)
  if lcfg is None:
    return model_cls

  def make(cfg_model, *, rngs: nnx.Rngs):
    model = model_cls(cfg_model, rngs=rngs)
    add_adapters(model, lcfg, rngs)
    return model

  return make


def adapters(model: nnx.Module) -> list[Adapter]:
  return [node for _, node in nnx.iter_graph(model) if isinstance(node, Adapter)]


def set_dropout_keys(model: nnx.Module, key: jax.Array) -> None:
  """Gives every adapter with dropout its own keys from `key` (one per stacked layer). Call on the
  module a training forward builds (inside jit); modules without dropout adapters are left alone."""
  for i, ad in enumerate(adapters(model)):
    if ad.dropout > 0.0:
      k = jax.random.fold_in(key, i)
      ad.rng = nnx.data(LoraRng(jax.random.split(k, ad.stack) if ad.stack else k))


# ----------------------------------------------------------------------------------------------------
# Pure-dict parameter trees


def freeze_patterns(cfg: Any) -> tuple[str, ...]:
  """The trainer's freeze regexes: `optim.freeze`, plus with LoRA on one regex freezing every parameter
  that is neither an adapter factor nor matched by `lora.train`."""
  freeze = tuple(cfg.optim.get("freeze") or ()) if "optim" in cfg else ()
  lcfg = section(cfg)
  if lcfg is None:
    return freeze
  keep = [ADAPTER_RE] + [p for p in (lcfg.get("train") or ())]
  _matcher(keep, "lora.train")  # validates the regexes
  return freeze + ("^(?!.*(?:" + "|".join(f"(?:{p})" for p in keep) + "))",)


def base_dtype(cfg: Any) -> jnp.dtype | None:
  lcfg = section(cfg)
  return jnp.dtype(lcfg.base_dtype) if lcfg is not None and lcfg.get("base_dtype") else None


def cast_floating(tree: Any, dtype: Any) -> Any:
  """Floating leaves of `tree` (arrays or ShapeDtypeStructs, shardings kept) cast to `dtype`."""

  def one(x):
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)

  return jax.tree.map(one, tree)


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b/c': x} -> {'a': {'b': {'c': x}}} (flax's traverse_util, as checkpoint.flat_to_nested)."""
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def adapter_paths(params: Mapping[str, Any]) -> list[str]:
  """Kernel paths ('lm/blocks/q/kernel') that have adapters in a nested param dict."""
  return sorted(p[:-len("lora/a")] + "kernel" for p in _flat(params) if p.endswith("lora/a"))


def delta(a: jax.Array, b: jax.Array, kernel_ndim: int, scale_: float) -> jax.Array:
  """scale * A . B shaped like the kernel: a [*S, *in, r], b [*S, r, *out] -> [*S, *in, *out] (float32)."""
  n_stack = a.ndim + b.ndim - 2 - kernel_ndim
  if n_stack < 0 or a.shape[:n_stack] != b.shape[:n_stack] or a.shape[-1] != b.shape[n_stack]:
    raise ValueError(f"adapter shapes {a.shape} x {b.shape} do not fit a rank-{kernel_ndim} kernel")
  s = a.shape[:n_stack]
  in_s, out_s, r = a.shape[n_stack:-1], b.shape[n_stack + 1:], a.shape[-1]
  a2 = jnp.reshape(a, s + (math.prod(in_s), r)).astype(jnp.float32)
  b2 = jnp.reshape(b, s + (r, math.prod(out_s))).astype(jnp.float32)
  return jnp.reshape(jnp.matmul(a2, b2) * scale_, s + in_s + out_s)


def merge(params: Mapping[str, Any], lcfg: Any, dtype: Any = None) -> dict[str, Any]:
  """Plain params: every adapted kernel becomes W + (alpha/rank) A.B (computed in float32, cast to
  `dtype` or the kernel's dtype) and the adapter factors are dropped."""
  flat = _flat(params)
  out = {k: v for k, v in flat.items() if not is_adapter(k)}
  for kpath in adapter_paths(params):
    base = kpath[:-len("kernel")]
    w = flat[kpath]
    d = delta(flat[base + "lora/a"], flat[base + "lora/b"], w.ndim, scale(lcfg))
    out[kpath] = (w.astype(jnp.float32) + d).astype(dtype or w.dtype)
  return _nest(out)


def split_adapters(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(adapter factors, everything else) of a nested param dict."""
  flat = _flat(params)
  return (_nest({k: v for k, v in flat.items() if is_adapter(k)}),
          _nest({k: v for k, v in flat.items() if not is_adapter(k)}))
