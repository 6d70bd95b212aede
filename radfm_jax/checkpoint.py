"""Self-describing parameter checkpoints: the params plus the config, so tools need only the path.

Layout of a checkpoint directory:
  CKPT/params/           Orbax (StandardCheckpointer, OCDBT) of the model's `nnx.Param`s as a pure dict
  CKPT/radfm_jax.json    {"format", "model_class", "config" (the full ConfigDict), "tokenizer", "params",
                          "extra"} — written last, so its presence marks a complete checkpoint
  CKPT/tokenizer.model   a copy of the SentencePiece model when the config names one

`model_class` is "radfm" (`radfm_jax.models.radfm.RadFM`) or "llama" (`radfm_jax.models.llama.Llama`,
the LM alone, e.g. imported from Hugging Face). Both are built from `cfg.model`.

LM-only checkpoints: `load_model` returns a `Llama`. To start a RadFM from one (vision tower and
resampler freshly initialised, e.g. MedLLaMA before stage-1 training), build the RadFM and call
`restore_params(CKPT, model.lm)`, which fills the LM in place with the shardings it already has.

Tokenizer: a config field named `tokenizer`, `tokenizer_path` or `tokenizer_model` (at any depth) that
names an existing file is copied into the checkpoint with its sha256; `load_config` points that field at
the copy (the original path is kept under "tokenizer" in radfm_jax.json) after checking that the recorded
name stays inside the checkpoint and that the copy still matches its sha256 (`tokenizer_file`).

LoRA (radfm_jax.models.lora): a config with `lora.rank > 0` builds the model with its adapters, so a
checkpoint holding `.../lora/a|b` restores as is (generation runs with the adapters on). An
*adapters-only* checkpoint (`extra.adapters_only`, written by `python -m radfm_jax.export --adapters_only`
or `convert --from=peft-lora`) holds just the trained parameters: `load_model(BASE, adapters=DIR)` builds
the base checkpoint's model with DIR's adapters, restores BASE, then DIR on top (`restore_subset`).

Restoring is always against an abstract state carrying the *current* mesh's shardings (from
`radfm_jax.sharding`), so each device reads only its shards and a checkpoint written on one mesh
restores onto another. `dtype` casts parameters while restoring (e.g. bfloat16 for inference).
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
from typing import Any, Mapping

import jax
import ml_collections
from absl import logging
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from radfm_jax import models, paths, sharding
from radfm_jax.models import lora

FORMAT = "radfm_jax.params/1"
META_FILE = "radfm_jax.json"
PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_FIELDS = ("tokenizer", "tokenizer_path", "tokenizer_model")


# ----------------------------------------------------------------------------------------------------
# Pure-dict helpers


def flat_to_nested(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
  out: dict[str, Any] = {}
  for path, v in flat.items():
    *head, leaf = path.split("/")
    d = out
    for k in head:
      d = d.setdefault(k, {})
    d[leaf] = v
  return out


def nested_to_flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out: dict[str, Any] = {}
  for k, v in tree.items():
    p = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(nested_to_flat(v, p + "/"))
    else:
      out[p] = v
  return out


def param_dict(model_or_state: Any) -> dict[str, Any]:
  """The params of an nnx.Module / nnx.State / nested or '/'-flat dict, as a nested pure dict."""
  if isinstance(model_or_state, nnx.Module):
    model_or_state = nnx.state(model_or_state, nnx.Param)
  if isinstance(model_or_state, nnx.State):
    return nnx.to_pure_dict(model_or_state)
  if isinstance(model_or_state, Mapping):
    if any("/" in k for k in model_or_state):
      return flat_to_nested(model_or_state)
    return dict(model_or_state)
  raise TypeError(f"expected an nnx.Module, nnx.State or dict of params, got {type(model_or_state).__name__}")


# ----------------------------------------------------------------------------------------------------
# Config


def _full_config(cfg: Any) -> ml_collections.ConfigDict:
  """Accepts a full config (with a `model` section) or a bare model config."""
  cfg = cfg if isinstance(cfg, ml_collections.ConfigDict) else ml_collections.ConfigDict(cfg)
  if "model" not in cfg:
    if "lm" not in cfg:
      raise ValueError("config has neither a `model` section nor model fields (`lm`, `vision`, ...)")
    cfg = ml_collections.ConfigDict({"model": cfg})
  return cfg


def _find_tokenizer(cfg: ml_collections.ConfigDict, prefix: str = "") -> tuple[str, str] | None:
  for k, v in cfg.items():
    if isinstance(v, ml_collections.ConfigDict):
      found = _find_tokenizer(v, f"{prefix}{k}.")
      if found:
        return found
    elif k in TOKENIZER_FIELDS and isinstance(v, str) and v:
      return f"{prefix}{k}", v
  return None


def _set_field(cfg: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *head, leaf = dotted.split(".")
  for k in head:
    cfg = cfg[k]
  cfg[leaf] = value


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with paths.path(path).open("rb") as fh:
    for block in iter(lambda: fh.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def read_meta(ckpt_dir: str) -> dict[str, Any]:
  """radfm_jax.json of a checkpoint, checked: valid JSON, our format, a known model class."""
  path = paths.path(ckpt_dir) / META_FILE
  if not path.exists():
    what = ("an unfinished save or not a radfm_jax params checkpoint" if paths.path(ckpt_dir).is_dir()
            else "no such directory")
    raise FileNotFoundError(f"{ckpt_dir}: no {META_FILE} ({what})")
  try:
    meta = json.loads(path.read_bytes().decode("utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({e}); the checkpoint's metadata is damaged") from None
  if not isinstance(meta, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
  try:
    models.get(meta.get("model_class"))
  except (ValueError, TypeError):
    raise ValueError(f"{path}: unknown model_class {meta.get('model_class')!r} (known: "
                     f"{sorted(models.REGISTRY)})") from None
  if not isinstance(meta.get("config"), dict):
    raise ValueError(f"{path}: no `config` object")
  return meta


def tokenizer_file(ckpt_dir: str, meta: Mapping[str, Any] | None = None) -> str | None:
  """The checkpoint's own tokenizer copy (None when it records none), checked: its name stays inside the
  checkpoint directory and its sha256 matches the one recorded at save."""
  ckpt_dir = paths.absolute(ckpt_dir)
  meta = read_meta(ckpt_dir) if meta is None else meta
  tok = meta.get("tokenizer")
  if not tok:
    return None
  where = os.path.join(ckpt_dir, META_FILE)
  name = tok.get("file") if isinstance(tok, Mapping) else None
  if not isinstance(name, str) or not name:
    raise ValueError(f"{where}: tokenizer entry without a file name: {tok!r}")
  if paths.is_remote(ckpt_dir):  # a URL: no symlinks, normalise the name itself
    norm = posixpath.normpath(name)
    inside = not (posixpath.isabs(norm) or norm == "." or norm == ".." or norm.startswith("../"))
    copy = posixpath.join(ckpt_dir, norm)
  else:
    root = os.path.realpath(ckpt_dir)
    copy = os.path.realpath(os.path.join(root, name))
    inside = not os.path.isabs(name) and os.path.commonpath([root, copy]) == root and copy != root
  if not inside:
    raise ValueError(f"{where}: tokenizer file {name!r} is outside the checkpoint directory; refusing it")
  if not paths.path(copy).is_file():
    raise FileNotFoundError(f"{ckpt_dir}: tokenizer copy {name} is missing")
  got = sha256_file(copy)
  if got != tok.get("sha256"):
    raise ValueError(f"{copy}: sha256 {got[:12]}... does not match the {str(tok.get('sha256'))[:12]}... "
                     f"recorded in {where}: the tokenizer was replaced or damaged")
  return copy


def load_config(ckpt_dir: str) -> ml_collections.ConfigDict:
  """The full config the checkpoint was saved with (tokenizer field pointed at the checkpoint's copy,
  after checking it; see `tokenizer_file`)."""
  ckpt_dir = paths.absolute(ckpt_dir)
  meta = read_meta(ckpt_dir)
  cfg = ml_collections.ConfigDict(meta["config"])
  copy = tokenizer_file(ckpt_dir, meta)
  if copy:
    field = meta["tokenizer"].get("field")
    if not isinstance(field, str) or field.split(".")[-1] not in TOKENIZER_FIELDS:
      raise ValueError(f"{os.path.join(ckpt_dir, META_FILE)}: tokenizer field {field!r} is not one of "
                       f"{TOKENIZER_FIELDS} (at any depth)")
    try:
      _set_field(cfg, field, copy)
    except (KeyError, AttributeError):
      raise ValueError(f"{os.path.join(ckpt_dir, META_FILE)}: tokenizer field {field!r} is not in the "
                       "recorded config") from None
  return cfg


# ----------------------------------------------------------------------------------------------------
# Save


def _save_registry() -> Any:
  """Orbax type handlers for saving. Replica-parallel writing (each replica of a replicated array writes
  a slice) is kept on TPU only: Orbax already disables it on GPU, and on CPU slicing compiles one small
  program per array and shard (a tiny model on 8 fake CPU devices saved in ~20 s with it, 0.2 s without)."""
  th = ocp.type_handlers
  return th.create_type_handler_registry(
      (jax.Array, th.ArrayHandler(use_replica_parallel=jax.default_backend() == "tpu")),
      (np.ndarray, th.NumpyHandler()), (np.number, th.ScalarHandler()), (int, th.ScalarHandler()),
      (float, th.ScalarHandler()))


def save_model(ckpt_dir: str, model_or_state: Any, cfg: Any, *, model_class: str | None = None,
               extra: Mapping[str, Any] | None = None, overwrite: bool = False) -> str:
  """Writes params + config to `ckpt_dir`; returns its absolute path.

  Args:
    ckpt_dir: destination (must not exist unless overwrite).
    model_or_state: an nnx.Module, an nnx.State of params, or a (nested or '/'-flat) dict of arrays.
    cfg: the full config (`cfg.model` builds the model) or a bare model config.
    model_class: "radfm" | "llama"; inferred from a module, else from the tree ("vision" -> radfm).
    extra: JSON-able provenance recorded in radfm_jax.json (e.g. the conversion source).
  """
  ckpt_dir = paths.absolute(ckpt_dir)
  cfg = _full_config(cfg)
  params = param_dict(model_or_state)
  if model_class is None:
    if isinstance(model_or_state, nnx.Module):
      model_class = models.name_of(model_or_state)
    else:
      model_class = "radfm" if "vision" in params else "llama"
  models.get(model_class)  # raises on an unknown class
  if paths.path(ckpt_dir).exists():
    if not overwrite:
      raise FileExistsError(f"{ckpt_dir} exists (pass overwrite=True to replace it)")
    if jax.process_index() == 0:
      paths.path(ckpt_dir).rmtree()
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"radfm_jax.save_model:{ckpt_dir}")
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=_save_registry())) as ckptr:
    ckptr.save(os.path.join(ckpt_dir, PARAMS_DIR), args=ocp.args.PyTreeSave(params))

  flat = nested_to_flat(params)
  meta = {
      "format": FORMAT,
      "model_class": model_class,
      "config": json.loads(cfg.to_json_best_effort()),
      "tokenizer": None,
      "params": {"count": int(sum(int(np.prod(np.shape(x))) for x in flat.values())),
                 "dtypes": sorted({str(x.dtype) for x in flat.values()})},
      "extra": dict(extra or {}),
  }
  if jax.process_index() == 0:
    found = _find_tokenizer(cfg)
    if found and paths.path(found[1]).is_file():
      field, path = found
      paths.path(path).copy(paths.path(ckpt_dir) / TOKENIZER_FILE, overwrite=True)
      meta["tokenizer"] = {"field": field, "source_path": paths.absolute(path),
                           "sha256": sha256_file(path), "file": TOKENIZER_FILE}
    elif found:
      logging.warning("config %s=%s is not a file: the checkpoint records no tokenizer", *found)
    tmp = paths.path(ckpt_dir) / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    tmp.replace(paths.path(ckpt_dir) / META_FILE)
  return ckpt_dir


# ----------------------------------------------------------------------------------------------------
# Load


def abstract_model(cfg: Any, model_class: str = "radfm", mesh: jax.sharding.Mesh | None = None,
                   ) -> nnx.Module:
  """The model with `jax.ShapeDtypeStruct` params (no allocation), carrying `mesh`'s shardings."""
  cfg = _full_config(cfg)
  cls = lora.wrap(models.get(model_class), cfg)  # with adapters when cfg.lora.rank > 0
  if mesh is None:
    return nnx.eval_shape(lambda: cls(cfg.model, rngs=nnx.Rngs(0)))
  return sharding.abstract_sharded(lambda: cls(cfg.model, rngs=nnx.Rngs(0)), mesh)


def param_metadata(ckpt_dir: str) -> dict[str, Any]:
  """{'a/b/kernel': orbax ArrayMetadata (.shape, .dtype)} of a checkpoint's params (reads no data)."""
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.metadata(os.path.join(ckpt_dir, PARAMS_DIR)).item_metadata.tree
  return nested_to_flat(tree)


def read_params(ckpt_dir: str, paths: list[str]) -> dict[str, np.ndarray]:
  """Some params of a checkpoint as host numpy arrays (partial restore: only these are read)."""
  meta = param_metadata(ckpt_dir)
  missing = [p for p in paths if p not in meta]
  if missing:
    raise KeyError(f"{ckpt_dir}: no parameter(s) {missing}")
  item = flat_to_nested({p: np.zeros((), np.float32) for p in paths})
  args = flat_to_nested({p: ocp.RestoreArgs(restore_type=np.ndarray) for p in paths})
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    out = ckptr.restore(os.path.join(ckpt_dir, PARAMS_DIR),
                        args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
  return nested_to_flat(out)


def _restore_into(ckpt_dir: str, abstract_state: nnx.State) -> nnx.State:
  """Restores the checkpoint's params against `abstract_state` (ShapeDtypeStruct with shardings)."""
  target = nnx.to_pure_dict(abstract_state)
  saved = param_metadata(ckpt_dir)
  want = nested_to_flat(target)
  missing, unexpected = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
  if missing or unexpected:
    raise ValueError(f"{ckpt_dir}: checkpoint params do not match the model: missing {missing[:10]}, "
                     f"unexpected {unexpected[:10]}")
  bad = [f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(want[k].shape)}"
         for k in want if tuple(saved[k].shape) != tuple(want[k].shape)]
  if bad:
    raise ValueError(f"{ckpt_dir}: shape mismatch: {bad[:10]}")
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(os.path.join(ckpt_dir, PARAMS_DIR), target)
  nnx.replace_by_pure_dict(abstract_state, restored)
  return abstract_state


def load_model(ckpt_dir: str, mesh: jax.sharding.Mesh | None = None, dtype: Any = None, *,
               model_class: str | None = None, adapters: str | None = None
               ) -> tuple[nnx.Module, ml_collections.ConfigDict]:
  """(model, cfg) from a checkpoint.

  Params are restored straight onto `mesh` by the sharding rules (each device reads its shards; default
  device when mesh is None) and cast to `dtype` when given (cfg.model.param_dtype is updated to match).
  `model_class="radfm"` on an LM-only ("llama") checkpoint builds a RadFM whose LM is the checkpoint's
  and whose vision tower, resampler, fc and image markers are freshly initialised (seed cfg.seed).
  `adapters`: an adapters-only checkpoint trained on this base: the model gets its LoRA config and
  parameters on top of the base's.
  """
  ckpt_dir = paths.absolute(ckpt_dir)
  meta = read_meta(ckpt_dir)
  if meta.get("extra", {}).get("adapters_only"):
    raise ValueError(f"{ckpt_dir} holds adapters only; load it on top of its base checkpoint "
                     f"(load_model(BASE, adapters=DIR), `generate --checkpoint=BASE --adapters=DIR`)")
  cfg = load_config(ckpt_dir)
  if adapters:
    return _load_with_adapters(ckpt_dir, cfg, adapters, mesh, dtype, model_class)
  if dtype is not None:
    cfg.model.param_dtype = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
  saved_class = meta["model_class"]
  model_class = model_class or saved_class
  if model_class != saved_class:
    if (saved_class, model_class) != ("llama", "radfm"):
      raise ValueError(f"{ckpt_dir} holds a {saved_class!r} model; cannot load it as {model_class!r}")
    return _radfm_from_lm(ckpt_dir, cfg, mesh), cfg
  model = abstract_model(cfg, model_class, mesh)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"{type(model).__name__} holds non-parameter state {rest}; params-only checkpoints "
                     "cannot restore it")
  params = _restore_into(ckpt_dir, params)
  return nnx.merge(graphdef, params, rest), cfg


def _load_with_adapters(ckpt_dir: str, cfg: ml_collections.ConfigDict, adapters: str,
                        mesh: jax.sharding.Mesh | None, dtype: Any, model_class: str | None
                        ) -> tuple[nnx.Module, ml_collections.ConfigDict]:
  adapters = os.path.abspath(adapters)
  ad_meta = read_meta(adapters)
  if not ad_meta.get("extra", {}).get("adapters_only"):
    raise ValueError(f"--adapters={adapters} is not an adapters-only checkpoint (no extra.adapters_only)")
  ad_cfg = ml_collections.ConfigDict(ad_meta["config"])
  if lora.section(ad_cfg) is None:
    raise ValueError(f"{adapters}: its config has no lora section with rank > 0")
  base_cfg = ml_collections.ConfigDict(cfg.to_dict())
  base_cfg.lora = ad_cfg.lora
  base_cfg.lora.init_adapters = ""
  if dtype is not None:
    base_cfg.model.param_dtype = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
  cls_name = model_class or ad_meta["model_class"]
  if mesh is None:
    model = lora.wrap(models.get(cls_name), base_cfg)(base_cfg.model, rngs=nnx.Rngs(0))
  else:
    model = nnx.merge(*sharding.create_sharded(lora.wrap(models.get(cls_name), base_cfg), base_cfg.model, mesh))
  base_meta = read_meta(ckpt_dir)
  if (base_meta["model_class"], cls_name) == ("llama", "radfm"):
    restore_params(ckpt_dir, model.lm)
  else:
    restore_params(ckpt_dir, model)
  restore_subset(adapters, model)
  return model, base_cfg


def _radfm_from_lm(ckpt_dir: str, cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None
                   ) -> nnx.Module:
  missing = [k for k in ("vision", "resampler", "max_images", "tokens_per_image") if k not in cfg.model]
  if missing or not cfg.model.max_images:
    raise ValueError(f"{ckpt_dir}: LM-only checkpoint whose config has no RadFM image sections "
                     f"({missing or 'max_images=0'}); convert it with --config=<a RadFM config> to load "
                     "it as a RadFM")
  seed = int(cfg.get("seed", 0))
  if mesh is None:
    model = lora.wrap(models.get("radfm"), cfg)(cfg.model, rngs=nnx.Rngs(seed))
  else:
    model = nnx.merge(*sharding.create_sharded(lora.wrap(models.get("radfm"), cfg), cfg.model, mesh, seed))
  restore_params(ckpt_dir, model.lm)
  return model


def restore_params(ckpt_dir: str, module: nnx.Module) -> nnx.Module:
  """Overwrites `module`'s params in place with the checkpoint's, keeping each param's sharding and
  dtype (e.g. an LM-only checkpoint into `radfm_model.lm`). Returns the module. A checkpoint without
  LoRA adapters restores into a module with adapters: they keep their values (a base for LoRA)."""
  ckpt_dir = os.path.abspath(ckpt_dir)
  has_adapters = any(lora.is_adapter(p) for p in param_metadata(ckpt_dir))
  state = nnx.state(module, nnx.Param if has_adapters else nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state)
  nnx.update(module, _restore_into(paths.absolute(ckpt_dir), abstract))
  return module


def restore_subset(ckpt_dir: str, module: nnx.Module) -> nnx.Module:
  """Overwrites the params of `module` that the checkpoint holds (e.g. an adapters-only checkpoint:
  adapters + any other trained params), keeping shardings and dtypes; the rest stay. Every saved param
  must exist in the module with the same shape."""
  ckpt_dir = os.path.abspath(ckpt_dir)
  saved = param_metadata(ckpt_dir)
  state = nnx.state(module, nnx.Param)
  flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}
  missing = sorted(set(saved) - set(flat))
  if missing:
    raise ValueError(f"{ckpt_dir}: parameters {missing[:10]} do not exist in the model (different LoRA "
                     f"targets or model config?)")
  bad = [f"{k}: checkpoint {tuple(m.shape)} vs model {tuple(flat[k].shape)}" for k, m in saved.items()
         if tuple(m.shape) != tuple(flat[k].shape)]
  if bad:
    raise ValueError(f"{ckpt_dir}: shape mismatch: {bad[:10]}")
  target = flat_to_nested({k: jax.ShapeDtypeStruct(flat[k].shape, flat[k].get_value().dtype,
                                                   sharding=getattr(flat[k].get_value(), "sharding", None))
                           for k in saved})
  with ocp.StandardCheckpointer() as ckptr:
    restored = nested_to_flat(ckptr.restore(os.path.join(ckpt_dir, PARAMS_DIR), target))
  for k, v in restored.items():
    flat[k].set_value(v)
  nnx.update(module, state)
  return module
