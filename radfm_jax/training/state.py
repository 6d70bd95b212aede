"""The training state: a plain dict pytree, created sharded and restorable against the current mesh.

  state = {
    "step":      int32 []            optimizer steps taken (skipped non-finite steps included)
    "params":    nested dict         trainable parameters (pure dict of the model's nnx.Params)
    "frozen":    nested dict         frozen parameters (`optim.freeze`): no gradient, no optimizer state
    "opt_state": optax state         over "params" only
    "guard":     {"consecutive", "total"}  int32 [] counts of skipped non-finite steps
  }

`Layout` holds everything static about it: the model graphdef and abstract nnx.State (to rebuild the
module inside jit from pure dicts), the optimizer, and the shardings of every leaf for the current mesh.
Parameters and optimizer state are created directly in their sharded layout (never whole on one device):
the model by `sharding.create_sharded`, Adam moments by a jit with `out_shardings`.

LoRA (`cfg.lora.rank > 0`, radfm_jax.models.lora): the model is built with its adapters; "params" holds the
adapter factors (+ `lora.train` matches), "frozen" everything else, optionally in `lora.base_dtype`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from flax import traverse_util
from jax.sharding import Mesh

from radfm_jax import checkpoint, models, sharding
from radfm_jax.models import lora
from radfm_jax.training import optim

State = dict[str, Any]
TOWERS = ("vision", "resampler", "fc", "lm")  # top-level parameter groups with FLOPs


def split_params(params: dict, freeze_patterns) -> tuple[dict, dict]:
  """(trainable, frozen) nested dicts; a param is frozen when its path matches `freeze_patterns`."""
  match = optim.matcher(freeze_patterns)
  flat = traverse_util.flatten_dict(params, sep="/")
  train = {k: v for k, v in flat.items() if not match(k)}
  frozen = {k: v for k, v in flat.items() if match(k)}
  if freeze_patterns and not frozen:
    raise ValueError(f"optim.freeze={tuple(freeze_patterns)} matches no parameter; paths look like "
                     f"{sorted(flat)[:5]}")
  if not train:
    raise ValueError(f"optim.freeze={tuple(freeze_patterns)} freezes every parameter")
  return (traverse_util.unflatten_dict(train, sep="/"), traverse_util.unflatten_dict(frozen, sep="/"))


def merge_params(trainable: dict, frozen: dict) -> dict:
  """The full nested param dict from its trainable and frozen parts."""
  flat = traverse_util.flatten_dict(trainable, sep="/")
  flat.update(traverse_util.flatten_dict(frozen, sep="/"))
  return traverse_util.unflatten_dict(flat, sep="/")


def trainable_towers(trainable: dict) -> dict[str, bool]:
  """Tower name -> whether any of its parameters train (for FLOP accounting)."""
  return {t: t in trainable for t in TOWERS}


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static description of the train state for one config and mesh."""
  graphdef: nnx.GraphDef
  abstract_model: nnx.State      # nnx.State of ShapeDtypeStruct (module structure + metadata)
  tx: optax.GradientTransformation
  abstract: State                # the train state as ShapeDtypeStruct with shardings (restore target)
  shardings: State               # NamedSharding per leaf of the train state
  mesh: Mesh
  freeze: tuple[str, ...]

  def model(self, params: dict, frozen: dict) -> nnx.Module:
    """The nnx module built from pure-dict params (works on tracers inside jit)."""
    state = jax.tree.map(lambda x: x, self.abstract_model)  # a fresh State to fill
    nnx.replace_by_pure_dict(state, merge_params(params, frozen))
    return nnx.merge(self.graphdef, state)


def make_layout(cfg: ml_collections.ConfigDict, mesh: Mesh) -> Layout:
  """Abstract train state + shardings for `cfg` on `mesh`; allocates nothing."""
  model_cls = lora.wrap(models.get(models.DEFAULT), cfg)  # + adapters when cfg.lora.rank > 0
  abstract_module = nnx.eval_shape(lambda: model_cls(cfg.model, rngs=nnx.Rngs(0)))
  graphdef, abs_model = nnx.split(abstract_module)
  non_params = [p for p, v in nnx.to_flat_state(abs_model) if not isinstance(v, nnx.Param)]
  if non_params:
    raise ValueError(f"the model holds non-parameter state the trainer does not handle: {non_params[:5]}")
  abs_params = nnx.to_pure_dict(abs_model)
  param_sh = nnx.to_pure_dict(sharding.state_shardings(abs_model, mesh))
  freeze = lora.freeze_patterns(cfg)  # optim.freeze (+ all but the adapters with LoRA on)
  abs_train, abs_frozen = split_params(abs_params, freeze)
  if lora.base_dtype(cfg) is not None:
    abs_frozen = lora.cast_floating(abs_frozen, lora.base_dtype(cfg))
  sh_train, sh_frozen = split_params(param_sh, freeze)
  tx = optim.make(cfg.optim, cfg.total_steps)
  abs_opt = jax.eval_shape(tx.init, abs_train)
  rep = sharding.replicated(mesh)
  sh_opt = optax.tree_map_params(tx, lambda _, s: s, abs_opt, sh_train, transform_non_params=lambda _: rep)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  abstract = {"step": scalar, "params": abs_train, "frozen": abs_frozen, "opt_state": abs_opt,
              "guard": {"consecutive": scalar, "total": scalar}}
  shardings = {"step": rep, "params": sh_train, "frozen": sh_frozen, "opt_state": sh_opt,
               "guard": {"consecutive": rep, "total": rep}}
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return Layout(graphdef=graphdef, abstract_model=abs_model, tx=tx, abstract=abstract,
                shardings=shardings, mesh=mesh, freeze=freeze)


def init_state(cfg: ml_collections.ConfigDict, layout: Layout) -> State:
  """A fresh sharded train state: parameters from `cfg.init_from` (a params checkpoint: full RadFM or
  LM only) or random init with `cfg.seed`; zero optimizer state."""
  graphdef, model_state = sharding.create_sharded(lora.wrap(models.get(models.DEFAULT), cfg), cfg.model,
                                                  layout.mesh, cfg.seed)
  init_from = cfg.init_from
  if init_from:
    model_state = _load_init(init_from, graphdef, model_state)
  if lora.section(cfg) is not None and cfg.lora.get("init_adapters"):
    logging.info("Adapters (and lora.train params) from %s", cfg.lora.init_adapters)
    model = nnx.merge(graphdef, model_state)
    checkpoint.restore_subset(cfg.lora.init_adapters, model)
    model_state = nnx.state(model)
  params = nnx.to_pure_dict(model_state)
  train, frozen = split_params(params, layout.freeze)
  if lora.base_dtype(cfg) is not None:  # frozen base weights held in e.g. bfloat16
    frozen = jax.jit(lambda t: lora.cast_floating(t, lora.base_dtype(cfg)),
                     out_shardings=layout.shardings["frozen"], donate_argnums=0)(frozen)
  opt_state = jax.jit(layout.tx.init, out_shardings=layout.shardings["opt_state"])(train)
  zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(layout.mesh))
  return {"step": zero(), "params": train, "frozen": frozen, "opt_state": opt_state,
          "guard": {"consecutive": zero(), "total": zero()}}


def _load_init(path: str, graphdef: nnx.GraphDef, model_state: nnx.State) -> nnx.State:
  """Model state with parameters from a params-only checkpoint (`radfm_jax.checkpoint` format)."""
  meta = checkpoint.read_meta(path)
  model = nnx.merge(graphdef, model_state)
  if meta["model_class"] == "llama":
    logging.info("Initialising the language model from %s (vision + resampler: random init)", path)
    checkpoint.restore_params(path, model.lm)
  else:
    logging.info("Initialising all parameters from %s", path)
    checkpoint.restore_params(path, model)
  return nnx.state(model)
