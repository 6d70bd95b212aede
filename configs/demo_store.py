"""The data section for the demo phantom store (radfm_jax.data.demo), built on first use.

`demo_data_config(vocab_size)` points at data_cache/demo-n{n}-s{seed}/ in the repository: the store and
a tokenizer with `vocab_size` text ids. radfm_jax.training.data builds both when missing (process 0,
under a file lock), so configs using it need no setup. Images are small and every batch has one shape
(one compilation): 2D images 64x64 repeated to depth 8, 3D volumes 64x64x8, one image slot, text padded
to 128 tokens (the longest demo sample with its image block is ~100).
"""
import os

import ml_collections

from configs import common_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_root(n: int = 240, seed: int = 0) -> str:
  return os.path.join(REPO, "data_cache", f"demo-n{n}-s{seed}")


def demo_data_config(vocab_size: int, *, n: int = 240, seed: int = 0, **overrides
                     ) -> ml_collections.ConfigDict:
  root = demo_root(n, seed)
  d = common_data.data_config(
      store=os.path.join(root, "store"), tokenizer=os.path.join(root, f"tok{vocab_size}.model"),
      image_hw_2d=(64, 64), depth_2d=8, image_hw_3d=(64, 64), depth_buckets=(8,), max_len=128,
      len_buckets=(128,), slot_buckets=(1,), batch_size=8, batch_size_3d=8, workers=0)
  d.demo = ml_collections.ConfigDict(dict(out=root, n=n, seed=seed))
  for k, v in overrides.items():
    d[k] = v
  return d
