"""The train and eval steps, built once and shared by the trainer (`training.loop`), the demo and the
AOT planner (`radfm_jax.aot`): the same functions trace the programs a run executes.

  make_train_step(layout, cfg)   one optimizer step (gradient accumulation, non-finite guard)
  jit_step(step, layout, batch)  jit with explicit shardings, donated state
  make_eval_step(layout, cfg)    validation sums (answer-token NLL, closed-question exact match)
  to_global(host_batch, mesh)    this process's rows -> global arrays sharded over (data, fsdp)

Every program here must be traced under `jax.set_mesh(layout.mesh)`, so that the activation sharding
constraints of the models (`sharding.constrain`) are active.
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
from radfm_jax.models import lora, radfm
from radfm_jax.training import optim
from radfm_jax.training import state as train_state

Batch = Mapping[str, Any]
EVAL_KEYS = ("example_mask", "closed", "image_dependent")  # host labels of validation rows
DEVICE_KEYS = tuple(pipeline.DEVICE_KEYS) + EVAL_KEYS


class NonFiniteError(RuntimeError):
  """K consecutive steps had a non-finite loss or gradient."""


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


def _forward(layout: train_state.Layout, params, frozen, batch: Batch,
             key: jax.Array | None = None) -> jax.Array:
  """Logits; dropout (cfg.model.vision.dropout/emb_dropout, lora.dropout) only when a key is given
  (training)."""
  model = layout.model(params, frozen)
  if key is not None:
    lora.set_dropout_keys(model, jax.random.fold_in(key, 1))
  return model(batch["inputs"], batch.get("images"), batch.get("image_mask"),
               positions=batch.get("positions"), segment_ids=batch.get("segment_ids"), dropout_key=key)


def make_train_step(layout: train_state.Layout, cfg: ml_collections.ConfigDict) -> Callable:
  """`step(state, batch) -> (state, metrics)`: one optimizer step on the global batch, with gradient
  accumulation over `cfg.microbatches` (lax.scan) and the non-finite guard. Not jitted (see `jit_step`).

  The loss is the mean over all answer tokens of the global batch, so any microbatch split gives the
  same gradient (up to float summation order). Dropout masks come from `dropout_key(cfg.seed, step,
  microbatch)`: no RNG lives in the state, and a resumed run reproduces every loss.
  """
  vocab, n_micro = cfg.model.vocab_size, int(cfg.get("microbatches", 1))
  seed = int(cfg.get("seed", 0))
  lr_schedule = optim.schedule(cfg.optim, cfg.total_steps)

  def loss_sum(params, frozen, mb, key):
    logits = _forward(layout, params, frozen, mb, key)
    loss, aux = radfm.loss(logits, mb["targets"], mb["loss_mask"])
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
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(_):
      updates, opt_state = layout.tx.update(grads, state["opt_state"], params)
      return optax.apply_updates(params, updates), opt_state

    new_params, new_opt = jax.lax.cond(ok, apply, lambda _: (params, state["opt_state"]), None)
    guard = state["guard"]
    new_state = {
        "step": state["step"] + 1, "params": new_params, "frozen": frozen, "opt_state": new_opt,
        "guard": {"consecutive": jnp.where(ok, 0, guard["consecutive"] + 1),
                  "total": guard["total"] + (~ok).astype(jnp.int32)}}
    text = (batch["inputs"] < vocab) & (batch["inputs"] > 0)
    out = {"loss": loss, "token_accuracy": aux["correct"] / denom, "grad_norm": grad_norm,
           "param_norm": optax.tree.norm(new_params), "learning_rate": lr_schedule(state["step"]),
           "loss_tokens": n_tok, "text_tokens": text.sum(), "nonfinite": (~ok).astype(jnp.int32),
           "nonfinite_consecutive": new_state["guard"]["consecutive"],
           "nonfinite_total": new_state["guard"]["total"]}
    if "image_mask" in batch:
      out["images"] = batch["image_mask"].sum()
    return new_state, out

  return step


def batch_shardings(batch: Batch, mesh) -> dict:
  return {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def jit_step(step: Callable, layout: train_state.Layout, batch: Batch) -> Callable:
  """jit with explicit shardings: state in its layout (donated), batch over (data, fsdp), metrics
  replicated."""
  return jax.jit(step, in_shardings=(layout.shardings, batch_shardings(batch, layout.mesh)),
                 out_shardings=(layout.shardings, sharding.replicated(layout.mesh)), donate_argnums=(0,))


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
  logits = _forward(layout, state["params"], state["frozen"], batch).astype(jnp.float32)
  valid = _valid_tokens(batch, vocab)
  tgt = jnp.clip(batch["targets"], 0, vocab - 1)
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tgt[..., None], -1)[..., 0]
  return {"nll": jnp.where(valid, nll, 0.0).sum(-1), "tokens": valid.sum(-1),
          "exact": ~(valid & (logits.argmax(-1) != tgt)).any(-1) & valid.any(-1)}


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
