"""Helpers for the training tests: a tiny trainable config and synthetic RadFM batches."""
from __future__ import annotations

import ml_collections
import numpy as np

from configs import common_train
from configs import tiny


def tiny_train_config(**overrides) -> ml_collections.ConfigDict:
  """configs/tiny.py plus training keys: a few steps, no warmup surprises."""
  c = tiny.get_config()
  common_train.add_train_config(c, total_steps=8, log_every=1, checkpoint_every=4,
                                optim_overrides=dict(lr=3e-3, warmup_steps=2))
  if "data" not in c:
    c.data = ml_collections.ConfigDict(dict(batch_size=8, batch_size_3d=8))
  for k, v in overrides.items():
    c[k] = v
  return c


def synthetic_batch(cfg, batch: int, *, seed: int = 0, seq_len: int = 48, slots: int = 2,
                    hw: int = 64, depth: int = 8) -> dict[str, np.ndarray]:
  """A batch shaped like the pipeline's: one image block per used slot, answer tokens after it.

  Row layout: bos, question text, one `<image>` + tokens_per_image ids + `</image>` block per used slot,
  question text, answer text (loss), eos (loss), padding.
  """
  rng = np.random.default_rng(seed)
  v, tpi = cfg.model.vocab_size, cfg.model.tokens_per_image
  inputs = np.zeros((batch, seq_len), np.int32)
  loss_mask = np.zeros((batch, seq_len), bool)
  segment_ids = np.zeros((batch, seq_len), np.int32)
  image_mask = np.zeros((batch, slots), bool)
  for b in range(batch):
    used = int(rng.integers(1, slots + 1))
    image_mask[b, :used] = True
    row = [1] + list(rng.integers(3, v, 3))
    for s in range(used):
      row += [v] + [v + 2 + s * tpi + j for j in range(tpi)] + [v + 1]
    row += list(rng.integers(3, v, 2))
    q_len = len(row)
    row += list(rng.integers(3, v, int(rng.integers(2, 6)))) + [2]
    row = row[:seq_len]
    inputs[b, :len(row)] = row
    loss_mask[b, q_len - 1:len(row) - 1] = True  # predicts answer + eos
    segment_ids[b, :len(row)] = 1
  targets = np.zeros_like(inputs)
  targets[:, :-1] = inputs[:, 1:]
  positions = np.where(segment_ids > 0, np.arange(seq_len)[None], 0).astype(np.int32)
  images = rng.random((batch, slots, hw, hw, depth, 3), np.float32)
  return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask, "positions": positions,
          "segment_ids": segment_ids, "images": images, "image_mask": image_mask}
