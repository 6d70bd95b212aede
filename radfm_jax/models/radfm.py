"""RadFM: 3D ViT -> Perceiver resampler (per image) -> Linear -> spliced into the LLaMA embedding.

Token ids (V = cfg.vocab_size): ids < V are text; V = `<image>`, V+1 = `</image>`; V+2+K = `<imageK>`
with K = slot * tokens_per_image + j (slot < cfg.max_images). Rows for V, V+1 come from the learned
`image_marker_embed` [2, hidden]; rows for `<imageK>` are gathered from the projected resampler
outputs of image slot K // tokens_per_image. Logits cover the text vocabulary only.

Images are channels-last [B, S, H, W, D, C] in [0, 1] (float, or uint16/uint8 holding round(x * max),
the input pipeline's compact transport, scaled on device) with `image_mask [B, S]` marking used slots
(unused slots are computed but their tokens are zeroed; referencing them is an error when checked).
C = cfg.vision.channels, or C = 1 (gray, as the input pipeline sends it): replicated on device.

Parameter tree (vision and resampler: see vit3d.py / perceiver.py; LM: see llama.py):
  vision/...                                   VisionTransformer3D
  resampler/...                                PerceiverResampler
  fc/kernel [vision.dim, lm.hidden]            ("vis_embed", "embed");  fc/bias [lm.hidden] ("embed",)
  image_marker_embed [2, lm.hidden]            ("marker", "embed")   (RadFM figure_token_weight)
  lm/...                                       Llama (embed_tokens = RadFM embedding_layer.weight)

Checks: shapes (patch divisibility, grid vs position tables, image slots vs cfg.max_images, sequence
length vs cfg.lm.max_len) raise ValueError at trace time; id *values* are checked by `check_token_ids`
(host side), which `RadFM.__call__` runs automatically whenever its inputs are concrete arrays.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from radfm_jax.models import layers
from radfm_jax.models.llama import Llama
from radfm_jax.models.perceiver import PerceiverResampler
from radfm_jax.models.vit3d import VisionTransformer3D


def image_token_id(cfg, slot: int, j: int) -> int:
  """Id of `<imageK>` for token j of image slot `slot`."""
  return cfg.vocab_size + 2 + slot * cfg.tokens_per_image + j


def total_vocab(cfg) -> int:
  """Number of valid ids: text + 2 markers + max_images * tokens_per_image image ids."""
  return cfg.vocab_size + 2 + cfg.max_images * cfg.tokens_per_image


def check_token_ids(cfg, inputs: Any, image_mask: Any = None, name: str = "inputs") -> None:
  """Host-side value check of token ids: raises ValueError naming the offending id and where it is."""
  ids = np.asarray(inputs)
  if ids.ndim != 2:
    raise ValueError(f"{name} must be [B, T] token ids, got shape {ids.shape}")
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"{name} must be integer token ids, got dtype {ids.dtype}")
  hi = total_vocab(cfg)
  bad = np.argwhere((ids < 0) | (ids >= hi))
  if bad.size:
    b, t = bad[0]
    raise ValueError(f"{name}[{b}, {t}] = {ids[b, t]} is out of range [0, {hi}) (text vocab "
                     f"{cfg.vocab_size}, 2 markers, {cfg.max_images} image slots x {cfg.tokens_per_image})")
  slot = (ids - cfg.vocab_size - 2) // cfg.tokens_per_image
  is_img = ids >= cfg.vocab_size + 2
  n_slots = 0 if image_mask is None else np.asarray(image_mask).shape[1]
  used = np.zeros((ids.shape[0], max(n_slots, 1)), bool)
  if image_mask is not None:
    used[:, :n_slots] = np.asarray(image_mask, bool)
  for b, t in np.argwhere(is_img):
    s = slot[b, t]
    if s >= n_slots or not used[b, s]:
      raise ValueError(f"{name}[{b}, {t}] = {ids[b, t]} is an image token of slot {s}, but "
                       f"{'no images were given' if image_mask is None else f'image_mask[{b}] = {used[b, :n_slots].tolist()}'}")


def _concrete(*xs) -> bool:
  return all(x is None or not isinstance(x, jax.core.Tracer) for x in xs)


class RadFM(nnx.Module):
  """`model(inputs [B, T], images [B, S, H, W, D, C] | None, image_mask [B, S] | None, *, positions,
  segment_ids, dropout_key) -> logits [B, T, vocab_size] float32`. `dropout_key` (training only)
  turns on the vision tower's dropout; without it the model is deterministic."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    cfg = layers.frozen(cfg)
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.vision = VisionTransformer3D(cfg, rngs=rngs)
    self.resampler = PerceiverResampler(cfg, rngs=rngs)
    self.fc = layers.Dense(cfg.vision.dim, cfg.lm.hidden, axes=("vis_embed", "embed"), use_bias=True, **kw)
    self.image_marker_embed = layers.param(rngs, nnx.initializers.normal(0.02), (2, cfg.lm.hidden),
                                           ("marker", "embed"), cfg.param_dtype)
    self.lm = Llama(cfg, rngs=rngs)
    self.cfg = cfg
    self.dtype = layers.dtype_of(cfg.dtype)

  # -- images -----------------------------------------------------------------------------------------
  def encode_images(self, images: jax.Array, image_mask: jax.Array | None = None, *,
                    dropout_key: jax.Array | None = None) -> jax.Array:
    """images [B, S, H, W, D, C] -> image token embeddings [B, S, tokens_per_image, hidden].

    C is cfg.vision.channels, or 1 (the host's gray images): replicated to cfg.vision.channels here, on
    device, which gives exactly the patches of a host-side replica. Any other C is an error.
    """
    cfg = self.cfg
    if images.ndim != 6:
      raise ValueError(f"images must be [B, S, H, W, D, C] (2D images as depth-{cfg.vision.patch_d} "
                       f"volumes), got shape {images.shape}")
    if jnp.issubdtype(images.dtype, jnp.integer):  # the pipeline's uint16/uint8 transport: round(x * max)
      images = images.astype(jnp.float32) * (1.0 / jnp.iinfo(images.dtype).max)
    if images.shape[-1] == 1 and cfg.vision.channels != 1:
      images = jnp.broadcast_to(images, images.shape[:-1] + (cfg.vision.channels,))
    b, s = images.shape[:2]
    if s > cfg.max_images:
      raise ValueError(f"images have {s} slots; cfg.max_images={cfg.max_images}")
    if image_mask is not None and image_mask.shape != (b, s):
      raise ValueError(f"image_mask must be [B, S] = {(b, s)}, got {image_mask.shape}")
    self.vision.grid(images.shape)  # shape checks before any compute
    tokens = self.vision(images.reshape((b * s,) + images.shape[2:]), dropout_key)  # key: train only
    lat = self.resampler(tokens)
    emb = self.fc(lat).reshape(b, s, cfg.tokens_per_image, cfg.lm.hidden)
    if image_mask is not None:
      emb = jnp.where(image_mask[:, :, None, None], emb, jnp.zeros((), emb.dtype))
    return emb

  # -- embedding splice ---------------------------------------------------------------------------------
  def embed(self, inputs: jax.Array, image_embeds: jax.Array | None = None) -> jax.Array:
    """ids [B, T] (+ image_embeds [B, S, tokens_per_image, hidden]) -> [B, T, hidden] by gathers."""
    cfg = self.cfg
    v = cfg.vocab_size
    x = self.lm.embed(inputs)
    # Two marker rows by selects, not a gather: gathering from the [2, hidden] table (hidden over fsdp)
    # made XLA replicate the [B, T, hidden] result ("involuntary full rematerialization").
    rows = self.image_marker_embed[...].astype(self.dtype)
    x = jnp.where((inputs == v)[..., None], rows[0], x)
    x = jnp.where((inputs == v + 1)[..., None], rows[1], x)
    if image_embeds is not None:
      b, s, n, h = image_embeds.shape
      flat = image_embeds.reshape(b, s * n, h).astype(self.dtype)
      k = jnp.clip(inputs - (v + 2), 0, s * n - 1)
      img = jnp.take_along_axis(flat, k[..., None], axis=1)
      x = jnp.where((inputs >= v + 2)[..., None], img, x)
    return x

  def __call__(self, inputs: jax.Array, images: jax.Array | None = None,
               image_mask: jax.Array | None = None, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, dropout_key: jax.Array | None = None,
               head: bool = True) -> jax.Array:
    """Logits [B, T, vocab_size] float32; `head=False`: the LM's last hidden states [B, T, hidden]
    (feed them to `models.loss` with `self.lm`, which never builds the full logits)."""
    cfg = self.cfg
    if inputs.ndim != 2:
      raise ValueError(f"inputs must be [B, T] token ids, got shape {inputs.shape}")
    if inputs.shape[1] > cfg.lm.max_len:
      raise ValueError(f"sequence length {inputs.shape[1]} exceeds cfg.lm.max_len={cfg.lm.max_len}")
    for name, a in (("positions", positions), ("segment_ids", segment_ids)):
      if a is not None and a.shape != inputs.shape:
        raise ValueError(f"{name} must have the shape of inputs {inputs.shape}, got {a.shape}")
    if images is not None and image_mask is None:
      image_mask = jnp.ones(images.shape[:2], bool)
    if _concrete(inputs, image_mask):
      check_token_ids(cfg, inputs, image_mask)
    image_embeds = (None if images is None
                    else self.encode_images(images, image_mask, dropout_key=dropout_key))
    return self.lm(embeds=self.embed(inputs, image_embeds), positions=positions, segment_ids=segment_ids,
                   head=head)


def loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, dict]:
  """Mean next-token cross-entropy over positions where `loss_mask` and `targets < V` (V = logits'
  last dim: image ids and markers are never predicted). `targets` are already shifted.

  Returns (loss, {"loss", "accuracy", "tokens"}); with no counted token the loss is 0.
  """
  v = logits.shape[-1]
  valid = loss_mask.astype(bool) & (targets >= 0) & (targets < v)
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, jnp.clip(targets, 0, v - 1)[..., None], axis=-1)[..., 0]
  nll = jnp.where(valid, lse - tgt, 0.0)
  n = valid.sum()
  denom = jnp.maximum(n, 1).astype(jnp.float32)
  total = nll.sum() / denom
  acc = jnp.where(valid, logits.argmax(-1) == targets, False).sum() / denom
  return total, {"loss": total, "accuracy": acc, "tokens": n}
