"""One validation pass over a training config, before anything heavy starts.

  validate(cfg)          -> raises ConfigError listing every missing, unknown or invalid key at once
  validate(cfg, mesh)    ... plus the batch sizes against the mesh's batch shards and cfg.microbatches

The defaults live in configs/common_train.py (top-level keys, `optim`) and configs/common_data.py
(`data`); this module holds only what a value must be (type and range) for each key they define, so the
library never imports configs/. tests/test_torture_train.py checks that both name exactly the same keys.
Sections owned elsewhere are checked only for presence: `model` (radfm_jax.models).
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Callable, Mapping

import ml_collections


class ConfigError(ValueError):
  """A training config with missing, unknown or invalid keys (every problem listed, one per line)."""


Check = Callable[[Any], str | None]  # value -> None when fine, else what was expected


# -------------------------------------------------------------------------------------- value checks
def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(lo: int | None = None) -> Check:
  def check(v):
    if not _is_int(v):
      return f"an integer{'' if lo is None else f' >= {lo}'}"
    if lo is not None and v < lo:
      return f"an integer >= {lo}"
    return None
  return check


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, optional: bool = False) -> Check:
  """A finite number in [lo, hi] (open ends where asked); None allowed when optional."""
  lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
  hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
  want = "a finite number" + (f" {lo_s}" if lo_s else "") + (" and" if lo_s and hi_s else "") + (
      f" {hi_s}" if hi_s else "") + (" (or None)" if optional else "")

  def check(v):
    if v is None and optional:
      return None
    if not _is_num(v) or not math.isfinite(v):
      return want
    if lo is not None and (v < lo or (lo_open and v == lo)):
      return want
    if hi is not None and (v > hi or (hi_open and v == hi)):
      return want
    return None
  return check


def boolean(v) -> str | None:
  return None if isinstance(v, bool) else "true or false"


def string(v) -> str | None:
  return None if isinstance(v, str) else "a string"


def one_of(*choices: str) -> Check:
  return lambda v: None if v in choices else f"one of {list(choices)}"


def strings(v) -> str | None:
  ok = isinstance(v, (tuple, list)) and all(isinstance(s, str) for s in v)
  return None if ok else "a tuple of strings"


def ints(n: int | None = None, lo: int = 1, optional: bool = False) -> Check:
  """A tuple of integers >= lo (exactly n of them when n is given)."""
  want = f"a tuple of {n or 'one or more'} integers >= {lo}" + (" (or None)" if optional else "")

  def check(v):
    if v is None and optional:
      return None
    if not isinstance(v, (tuple, list)) or not v or (n is not None and len(v) != n):
      return want
    return None if all(_is_int(x) and x >= lo for x in v) else want
  return check


def anything(v) -> str | None:
  del v
  return None


def _intensity(v) -> str | None:
  ok = isinstance(v, str) and (v in ("radfm", "minmax") or v.startswith("window:"))
  return None if ok else "radfm | minmax | window:NAME | window:CENTER,WIDTH"


def _crop_scale(v) -> str | None:
  want = "a pair (lo, hi) with 0 < lo <= hi <= 1"
  if not isinstance(v, (tuple, list)) or len(v) != 2 or not all(_is_num(x) for x in v):
    return want
  return None if 0 < v[0] <= v[1] <= 1 else want


def _mesh_axis(v) -> str | None:
  return None if _is_int(v) and (v == -1 or v >= 1) else "an integer >= 1, or -1 (all remaining devices)"


# ---------------------------------------------------------------------------------------------- schema
# Every key the common configs define, with what its value must be. Sections (ConfigDicts) nest.
TRAIN: dict[str, Any] = {
    "seed": integer(),
    "total_steps": integer(1),
    "log_every": integer(1),
    "checkpoint_every": integer(1),
    "keep_checkpoints": integer(1),
    "checkpoint_fallback": boolean,
    "eval_every": integer(0),
    "eval_batches": integer(0),
    "microbatches": integer(1),
    "nonfinite_limit": integer(1),
    "init_from": string,
    "init_required": boolean,
    "profile_steps": integer(0),
    "profile_first": integer(0),
    "tensorboard_dir": string,
    "compilation_cache": string,
}
OPTIM: dict[str, Any] = {
    "lr": number(0, lo_open=True),
    "warmup_steps": integer(0),
    "end_lr_ratio": number(0),
    "b1": number(0, 1, hi_open=True),
    "b2": number(0, 1, hi_open=True),
    "eps": number(0, lo_open=True),
    "weight_decay": number(0),
    "clip_norm": number(0, optional=True),
    "freeze": strings,
    "no_decay": strings,
}
DATA: dict[str, Any] = {
    "store": string,
    "mix": anything,            # checked by radfm_jax.data.pipeline.mixture, naming the entry
    "tasks": lambda v: None if v is None else strings(v),
    "train_split": string,
    "eval_split": string,
    "tokenizer": string,
    "upstream_image_position": boolean,
    "batch_size": integer(1),
    "batch_size_3d": integer(1),
    "max_len": integer(1),
    "len_buckets": ints(optional=True),
    "slot_buckets": ints(optional=True),
    "pack": boolean,
    "pack_max_samples": integer(1),
    "image_hw_2d": ints(2),
    "depth_2d": integer(1),
    "image_hw_3d": ints(2),
    "depth_buckets": ints(),
    "intensity": _intensity,
    "interpolation_2d": string,
    "interpolation_3d": string,
    "crop_scale": _crop_scale,
    "crop_3d": boolean,
    "image_channels": one_of(1, 3),
    "workers": integer(0),
    "worker_buffer": integer(1),
    "read_threads": integer(1),
    "prefetch": integer(0),
    "on_corrupt": one_of("skip", "fail"),
    "image_dtype": one_of("float32", "uint16", "uint8"),
    "demo": anything,           # optional: the demo store to build on first use (configs/demo_store.py)
}
OPTIONAL = {"data.demo"}   # keys some configs add and others leave out
MESH = {"data": _mesh_axis, "fsdp": _mesh_axis, "tensor": _mesh_axis}
LORA: dict[str, Any] = {
    "rank": integer(0),
    "alpha": number(0, lo_open=True),
    "dropout": number(0, 1, hi_open=True),
    "targets": strings,
    "train": strings,
    "base_dtype": string,
    "init_adapters": string,
}
SCHEMA: dict[str, Any] = {**TRAIN, "optim": OPTIM, "data": DATA, "mesh": MESH, "lora": LORA, "model": anything}


def schema_keys(schema: Mapping[str, Any] = SCHEMA, prefix: str = "") -> set[str]:
  """Dotted names of every key in `schema` (sections included as their leaves)."""
  out = set()
  for k, v in schema.items():
    if isinstance(v, Mapping):
      out |= schema_keys(v, f"{prefix}{k}.")
    else:
      out.add(prefix + k)
  return out


def _walk(cfg: Mapping[str, Any], schema: Mapping[str, Any], prefix: str, errors: list[str]) -> None:
  for key in cfg.keys():
    if key not in schema:
      close = difflib.get_close_matches(key, list(schema), n=1)
      hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
      errors.append(f"{prefix}{key}: unknown key{hint}")
  for key, rule in schema.items():
    name = prefix + key
    if key not in cfg:
      if name not in OPTIONAL:
        errors.append(f"{name}: missing (defaults: configs/common_train.py, configs/common_data.py)")
      continue
    value = cfg[key]
    if isinstance(rule, Mapping):
      if not isinstance(value, (Mapping, ml_collections.ConfigDict)):
        errors.append(f"{name}: expected a section, got {value!r}")
      else:
        _walk(value, rule, name + ".", errors)
      continue
    if rule is anything:
      continue
    want = rule(value)
    if want:
      errors.append(f"{name}={value!r}: expected {want}")


def problems(cfg: ml_collections.ConfigDict, mesh_shape: Mapping[str, int] | None = None) -> list[str]:
  """Every problem with `cfg`, one line each (empty when it is fine)."""
  errors: list[str] = []
  _walk(cfg, SCHEMA, "", errors)
  if not errors and sum(v == -1 for v in cfg.mesh.values()) > 1:
    errors.append(f"mesh={dict(cfg.mesh)}: at most one axis may be -1")
  if not errors and mesh_shape is not None:
    shards = int(mesh_shape["data"]) * int(mesh_shape["fsdp"])
    n = cfg.microbatches
    for name in ("batch_size", "batch_size_3d"):
      b = cfg.data[name]
      if b % n or (b // n) % shards:
        errors.append(f"data.{name}={b}: must split into microbatches={n} microbatches whose size is a "
                      f"multiple of the {shards} batch shards of mesh {dict(mesh_shape)}")
  return errors


def validate(cfg: ml_collections.ConfigDict, mesh_shape: Mapping[str, int] | None = None) -> None:
  """Raises ConfigError naming every missing, unknown or invalid key of a training config."""
  errors = problems(cfg, mesh_shape)
  if errors:
    raise ConfigError(f"invalid config ({len(errors)} problem{'s' * (len(errors) > 1)}):\n  "
                      + "\n  ".join(errors))
