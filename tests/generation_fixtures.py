"""Tiny RadFM checkpoints that carry a tiny tokenizer, for generation tests (eval model mode, the CLI)."""
from __future__ import annotations

import pathlib
from typing import Iterable

from flax import nnx

from configs import tiny
from configs.common_data import data_config
from radfm_jax import checkpoint
from radfm_jax.data import tokenizer as tokenizer_lib
from radfm_jax.models.radfm import RadFM


def tiny_checkpoint(root: pathlib.Path, corpus: str | Iterable[str], *, store: str = "", seed: int = 0) -> str:
  """Trains a SentencePiece model on `corpus` (a store root or texts) with the tiny vocabulary, saves a
  random tiny RadFM with it (64x64 2D/3D grids, depth bucket 8) to root/ckpt and returns that path."""
  cfg = tiny.get_config()
  tok_path = tokenizer_lib.train_tokenizer(corpus, str(root / "tok"), cfg.model.vocab_size)
  cfg.data = data_config(store=store, tokenizer=tok_path, image_hw_2d=(64, 64), image_hw_3d=(64, 64),
                         depth_buckets=(8,), max_len=cfg.model.lm.max_len, len_buckets=(64, 128),
                         slot_buckets=(1, 2))
  ckpt = str(root / "ckpt")
  checkpoint.save_model(ckpt, RadFM(cfg.model, rngs=nnx.Rngs(seed)), cfg)
  return ckpt
