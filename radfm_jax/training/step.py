"""The train and eval steps, built once and shared by the trainer (`training.loop`), the demo and the
AOT planner (`radfm_jax.aot`): the same functions trace the programs a run executes.

  make_train_step(layout, cfg)   one optimizer step (gradient accumulation, non-finite guard)
  jit_step(step, layout, batch)  jit with explicit shardings, donated state
  make_eval_step(layout, cfg)    validation sums (answer-token NLL, closed-question exact match)
  to_global(host_batch, mesh)    this process's rows -> global arrays sharded over (data, fsdp)

  abstract_batch(cfg, mesh, bucket)  a data bucket's global batch as ShapeDtypeStructs (AOT lowering)
  check_config(cfg, mesh)        the config can run on the mesh (keys, batch sizes vs shards)

Every program here is traced under its mesh: `_hidden` enters `sharding.activation_mesh(layout.mesh)`
itself, so the models' activation sharding constraints (`sharding.constrain`) are active wherever the
step is traced (loop, demo, planner, tests); tests/test_sharding.py fails if that is ever lost.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from radfm_jax import sharding
from radfm_jax.data import pipeline
from radfm_jax.models import loss as loss_lib
from radfm_jax.training import data as train_data
from radfm_jax.training import config as config_lib
from radfm_jax.models import lora
from radfm_jax.training import optim
from radfm_jax.training import state as train_state

Batch = Mapping[str, Any]
EVAL_KEYS = ("example_mask", "closed", "image_dependent")  # host labels of validation rows
DEVICE_KEYS = tuple(pipeline.DEVICE_KEYS) + EVAL_KEYS


class NonFiniteError(RuntimeError):
  """K consecutive steps had a non-finite loss, gradient or update (new parameters / optimizer state)."""


# ====================================================================================================
# Update step.
# ====================================================================================================
def _valid_tokens(batch: Batch, vocab: int) -> jax.Array:
  t = batch["targets"]
  return batch["loss_mask"].astype(bool) & (t >= 0) & (t < vocab)


def dropout_key(seed: int, step: jax.Array | int, microbatch: jax.Array | int = 0) -> jax.Array:
  """The dropout key of one microbatch of one optimizer step: a pure function of (config seed, step,
  microbatch), so a run resumed from a checkpoint draws exactly the masks of an uninterrupted one."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), microbatch)


def _hidden(layout: train_state.Layout, params, frozen, batch: Batch,
            key: jax.Array | None = None) -> tuple[jax.Array, Any]:
  """(LM hidden states [B, T, E], the LM) for the chunked loss (models/loss.py: the [B, T, V] logits
  never exist whole); dropout (cfg.model.vision.dropout/emb_dropout, lora.dropout) only when a key is
  given (training).
  Traced under the layout's mesh (`sharding.activation_mesh`): the activation constraints are on in
  every program that calls it (train step, eval step, demo scoring), wherever it is traced."""
  model = layout.model(params, frozen)
  if key is not None:
    lora.set_dropout_keys(model, jax.random.fold_in(key, 1))
  with sharding.activation_mesh(layout.mesh):
    hidden = model(batch["inputs"], batch.get("images"), batch.get("image_mask"),
                   positions=batch.get("positions"), segment_ids=batch.get("segment_ids"), dropout_key=key,
                   head=False)
  return hidden, getattr(model, "lm", model)


def make_train_step(layout: train_state.Layout, cfg: ml_collections.ConfigDict) -> Callable:
  """`step(state, batch) -> (state, metrics)`: one optimizer step on the global batch, with gradient
  accumulation over `cfg.microbatches` (lax.scan) and the non-finite guard. Not jitted (see `jit_step`).

  Non-finite guard: when the loss, the gradient norm, or any updated parameter or optimizer-state value
  is NaN or infinite, the step keeps the old parameters and optimizer state (the step counter advances)
  and counts as non-finite (metrics `nonfinite`, `nonfinite_update` for a finite gradient whose update
  is not, e.g. optim.lr overflowing); such a state is never counted as fine, hence never saved.

  The loss is the mean over all answer tokens of the global batch, so any microbatch split gives the
  same gradient (up to float summation order). Dropout masks come from `dropout_key(cfg.seed, step,
  microbatch)`: no RNG lives in the state, and a resumed run reproduces every loss.
  """
  vocab, n_micro = cfg.model.vocab_size, int(cfg.microbatches)
  seed = int(cfg.seed)
  lr_schedule = optim.schedule(cfg.optim, cfg.total_steps)

  def loss_sum(params, frozen, mb, key):
    hidden, lm = _hidden(layout, params, frozen, mb, key)
    loss, aux = loss_lib.lm_loss(lm, hidden, mb["targets"], mb["loss_mask"])
    n = aux["tokens"].astype(jnp.float32)
    return loss * n, {"correct": aux["accuracy"] * n}

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

  def step(state, batch):
    params, frozen = state["params"], state["frozen"]
    n_tok = _valid_tokens(batch, vocab).sum().astype(jnp.float32)
    if n_micro == 1:
      (lsum, aux), grads = grad_fn(params, frozen, batch, dropout_key(seed, state["step"]))
    else:
      b = batch["inputs"].shape[0]
      micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((b // n_micro, n_micro) + x.shape[1:]), 0, 1),
                           dict(batch))
      micro = jax.lax.with_sharding_constraint(
          micro, jax.tree.map(lambda x: sharding.NamedSharding(
              layout.mesh, sharding.P(None, sharding.BATCH_AXES)), micro))

      def body(carry, inp):
        mb, i = inp
        (l, a), g = grad_fn(params, frozen, mb, dropout_key(seed, state["step"], i))
        return jax.tree.map(jnp.add, carry, (l, a, g)), None

      zeros = (jnp.zeros((), jnp.float32), {"correct": jnp.zeros((), jnp.float32)},
               jax.tree.map(jnp.zeros_like, params))
      (lsum, aux, grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(n_micro)))
    denom = jnp.maximum(n_tok, 1.0)
    loss = lsum / denom
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.tree.norm(grads)
    grads_ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(_):
      updates, opt_state = layout.tx.update(grads, state["opt_state"], params)
      return optax.apply_updates(params, updates), opt_state

    old = (params, state["opt_state"])
    cand = jax.lax.cond(grads_ok, apply, lambda _: old, None)
    ok = grads_ok & _all_finite(cand)
    new_params, new_opt = jax.tree.map(lambda n, o: jnp.where(ok, n, o), cand, old)
    guard = state["guard"]
    new_state = {
        "step": state["step"] + 1, "params": new_params, "frozen": frozen, "opt_state": new_opt,
        "guard": {"consecutive": jnp.where(ok, 0, guard["consecutive"] + 1),
                  "total": guard["total"] + (~ok).astype(jnp.int32)}}
    text = (batch["inputs"] < vocab) & (batch["inputs"] > 0)
    out = {"loss": loss, "token_accuracy": aux["correct"] / denom, "grad_norm": grad_norm,
           "param_norm": optax.tree.norm(new_params), "learning_rate": lr_schedule(state["step"]),
           "loss_tokens": n_tok, "text_tokens": text.sum(), "nonfinite": (~ok).astype(jnp.int32),
           "nonfinite_update": (grads_ok & ~ok).astype(jnp.int32),
           "nonfinite_consecutive": new_state["guard"]["consecutive"],
           "nonfinite_total": new_state["guard"]["total"]}
    if "image_mask" in batch:
      out["images"] = batch["image_mask"].sum()
    return new_state, out

  return step


def _all_finite(tree) -> jax.Array:
  """True when every float leaf of `tree` holds only finite values."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def batch_shardings(batch: Batch, mesh) -> dict:
  return {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def jit_step(step: Callable, layout: train_state.Layout, batch: Batch) -> Callable:
  """jit with explicit shardings: state in its layout (donated), batch over (data, fsdp), metrics
  replicated."""
  return jax.jit(step, in_shardings=(layout.shardings, batch_shardings(batch, layout.mesh)),
                 out_shardings=(layout.shardings, sharding.replicated(layout.mesh)), donate_argnums=(0,))


def abstract_batch(cfg: ml_collections.ConfigDict, mesh, bucket: train_data.Bucket, *,
                   eval_labels: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
  """The global device batch of one data bucket as ShapeDtypeStructs sharded like `to_global`'s
  (what `jit_step(...).lower` / the eval step take; radfm_jax.aot compiles these)."""
  b, t, s = bucket.rows, bucket.length, bucket.slots
  shapes = {k: ((b, t), np.int32) for k in ("inputs", "targets", "loss_mask", "positions", "segment_ids")}
  shapes["images"] = ((b, s, *bucket.grid, int(cfg.data.get("image_channels", 1))), np.float32)
  shapes["image_mask"] = ((b, s), np.bool_)
  if eval_labels:
    shapes.update({k: ((b,), np.bool_) for k in EVAL_KEYS})
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in shapes.items()}


def check_config(cfg: ml_collections.ConfigDict, mesh) -> None:
  """Raises ValueError naming every bad key when the config cannot run on `mesh` (`training.config`:
  missing / unknown / out-of-range keys, batch sizes not divisible into microbatches and batch shards)."""
  config_lib.validate(cfg, dict(mesh.shape))


def to_global(host_batch: Batch, mesh) -> dict:
  """This process's numpy batch -> global jax arrays sharded over (data, fsdp). Only the model inputs
  and eval labels go to the devices; host-only fields (e.g. record_index) stay behind."""
  return {k: sharding.host_to_global(v, mesh) for k, v in host_batch.items() if k in DEVICE_KEYS}


# ====================================================================================================
# Evals.
# ====================================================================================================
def example_scores(layout: train_state.Layout, cfg: ml_collections.ConfigDict, state, batch: Batch
                   ) -> dict[str, jax.Array]:
  """Per row: answer-token NLL sum and count, and `exact`: every answer token is the argmax, i.e. greedy
  decoding reproduces the answer (closed-question accuracy without generation)."""
  vocab = cfg.model.vocab_size
  hidden, lm = _hidden(layout, state["params"], state["frozen"], batch)
  valid = _valid_tokens(batch, vocab)
  nll, correct = loss_lib.token_scores(lm, hidden, batch["targets"], valid)
  return {"nll": nll.sum(-1), "tokens": valid.sum(-1), "exact": ~(valid & ~correct).any(-1) & valid.any(-1)}


def make_eval_step(layout: train_state.Layout, cfg: ml_collections.ConfigDict) -> Callable:
  """`eval_step(state, batch) -> sums` over the global batch of `example_scores`: NLL and answer tokens,
  closed-question exact matches overall and on image-dependent questions. Rows with example_mask False
  (padding) count nowhere. Sums (not per-row arrays) keep it correct with several processes."""

  def eval_step(state, batch):
    s = example_scores(layout, cfg, state, batch)
    real = batch["example_mask"]
    closed = real & batch["closed"]
    closed_img = closed & batch["image_dependent"]
    return {"nll": jnp.where(real, s["nll"], 0.0).sum(), "tokens": jnp.where(real, s["tokens"], 0).sum(),
            "closed_correct": (s["exact"] & closed).sum(), "closed": closed.sum(),
            "closed_image_correct": (s["exact"] & closed_img).sum(), "closed_image": closed_img.sum()}

  return eval_step


def jit_eval_step(layout: train_state.Layout, cfg: ml_collections.ConfigDict) -> Callable:
  """The jitted eval step the run uses: state in its layout, batch as given, sums replicated."""
  return jax.jit(make_eval_step(layout, cfg), out_shardings=sharding.replicated(layout.mesh))


def evaluate(eval_fn: Callable, state, batches: Iterator[Batch], mesh) -> dict[str, float]:
  """Validation loss (mean NLL per answer token) and closed-question accuracy, overall and on
  image-dependent questions, over `batches` (from `TrainData.eval_batches`)."""
  total: dict[str, float] = {}
  for host_batch in batches:
    out = jax.device_get(eval_fn(state, to_global(host_batch, mesh)))
    for k, v in out.items():
      total[k] = total.get(k, 0.0) + float(v)
  res = {"loss": total.get("nll", 0.0) / max(total.get("tokens", 0.0), 1.0),
         "answer_tokens": total.get("tokens", 0.0)}
  for name in ("closed", "closed_image"):
    if total.get(name):
      res[f"{name}_accuracy"] = total[f"{name}_correct"] / total[name]
      res[f"{name}_count"] = total[name]
  return res
