"""The optimizer: AdamW with linear warmup + cosine decay, global-norm clipping, a weight-decay mask, and
freezing of parameter groups, all chosen by the `optim` section of a training config.

Parameters are addressed by their "/"-joined path in the model's pure-dict parameter tree, e.g.
`lm/blocks/attn/q/kernel`. Config patterns are Python regexes searched (`re.search`) in that path:

  optim.freeze    parameters matching any pattern get no gradient and no optimizer state
                  (e.g. ("^lm/",) trains vision + resampler with the language model frozen)
  optim.no_decay  parameters matching any pattern get no weight decay (norms, biases, embeddings)

    lr, warmup_steps, end_lr_ratio   schedule: 0 -> lr over warmup, cosine to lr * end_lr_ratio at total_steps
    b1, b2, eps, weight_decay        AdamW
    clip_norm                        global gradient-norm clipping (0 or None: off)

Defaults: configs/common_train.py (`optim_config`); ranges: radfm_jax.training.config.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import jax
import ml_collections
import optax

PyTree = Any

def path_str(path: Iterable[Any]) -> str:
  """'a/b/0/kernel' for a jax key path or a tuple of keys."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        k = getattr(k, attr)
        break
    parts.append(str(k))
  return "/".join(parts)


def matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
  """A predicate on path strings: True when any regex in `patterns` is found in the path."""
  compiled = []
  for p in patterns or ():
    try:
      compiled.append(re.compile(p))
    except re.error as e:
      raise ValueError(f"optim pattern {p!r} is not a valid regex: {e}") from None
  return lambda path: any(c.search(path) for c in compiled)


def path_mask(tree: PyTree, patterns: Iterable[str]) -> PyTree:
  """A tree of bools like `tree`: True where the leaf's path matches one of `patterns`."""
  match = matcher(patterns)
  return jax.tree_util.tree_map_with_path(lambda p, _: match(path_str(p)), tree)


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to `lr * end_lr_ratio` at `total_steps`."""
  warmup = min(int(cfg.warmup_steps), max(int(total_steps) - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
      decay_steps=max(int(total_steps), warmup + 1), end_value=cfg.lr * cfg.end_lr_ratio)


def make(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW(schedule) with decay only where `cfg.no_decay` does not match.

  Apply it to the trainable parameters only (see `train_state.split_trainable`).
  """
  no_decay = matcher(cfg.no_decay)
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda p, _: not no_decay(path_str(p)), params)
  parts = []
  if cfg.clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
