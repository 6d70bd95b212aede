"""Training metrics: analytic model FLOPs, the hardware peak behind MFU, and the metric writers.

FLOPs (MaxText convention, design.md section 3): a matmul [m, k] x [k, n] costs 2*m*n*k. Matmuls with
trainable weights count 3x per training step (forward + two backward matmuls), frozen ones 1x;
attention score/value products count like the weights of their tower. Decoder attention is
causal-halved; ViT and perceiver attention are full. Embedding lookups cost 0; the unembedding counts.
Everything the model computes is counted, including unused (masked) image slots, since they are
computed. Norms, softmax, activations and the optimizer update are not counted.

Peak: on TPU/GPU a per-chip bf16 dense table; on CPU a matmul probe in the compute dtype measured at
start-up (bf16 inputs accumulate in float32, as the model does). MFU = model FLOP/s / peak.

Writers: CLU writers (TensorBoard + logs) on process 0 and `metrics.jsonl` in the workdir, one JSON
object per logged step, that scripts read without TensorFlow.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from radfm_jax import paths

# Dense bf16 peak per chip, TFLOP/s; matched in order as lower-case substrings of `device.device_kind`
# (v5p reports "TPU v5", v5e "TPU v5 lite", v6e "TPU v6 lite": "v5 lite" must come before "tpu v5").
PEAK_TFLOPS = (
    ("v6 lite", 918.0), ("v6e", 918.0), ("v5 lite", 197.0), ("v5e", 197.0), ("v5p", 459.0),
    ("tpu v5", 459.0), ("v4", 275.0), ("h200", 989.0), ("h100", 989.0), ("a100", 312.0),
)


def peak_tflops(device_kind: str) -> float | None:
  """Dense bf16 TFLOP/s of one chip of `device_kind` (e.g. "TPU v5", "NVIDIA H100 80GB HBM3"), or None."""
  kind = device_kind.lower()
  return next((t for key, t in PEAK_TFLOPS if key in kind), None)


# ----------------------------------------------------------------------------------------------------
# Analytic FLOPs.
# ----------------------------------------------------------------------------------------------------
def _mm(m: int, k: int, n: int) -> float:
  return 2.0 * m * k * n


def forward_flops(cfg, *, batch: int, seq_len: int, image_shape: tuple[int, int, int, int] | None,
                  causal_halved: bool = True) -> dict[str, float]:
  """Forward matmul FLOPs per tower for one batch.

  cfg: the model config; image_shape: (S, H, W, D) of the batch's images or None (text only).
  Returns {"vision", "resampler", "fc", "lm"} in FLOPs (the embedding lookups cost nothing).
  """
  out = {"vision": 0.0, "resampler": 0.0, "fc": 0.0, "lm": 0.0}
  if image_shape is not None:
    s, h, w, d = image_shape
    v, r = cfg.vision, cfg.resampler
    n_img = batch * s
    n = (h // v.patch_hw) * (w // v.patch_hw) * (d // v.patch_d)
    patch_dim = v.patch_hw * v.patch_hw * v.patch_d * v.channels
    inner = v.heads * v.head_dim
    per_layer = (3 * _mm(n, v.dim, inner) + 2 * _mm(n, n, inner) + _mm(n, inner, v.dim)
                 + 2 * _mm(n, v.dim, v.mlp_dim))
    out["vision"] = n_img * (_mm(n, patch_dim, v.dim) + v.depth * per_layer)
    lat, dim = cfg.tokens_per_image, v.dim
    rin = r.heads * r.head_dim
    kv = n + lat
    per_layer = (_mm(lat, dim, rin) + 2 * _mm(kv, dim, rin) + 2 * _mm(lat, kv, rin)
                 + _mm(lat, rin, dim) + 2 * _mm(lat, dim, dim * r.ff_mult))
    out["resampler"] = n_img * r.depth * per_layer
    out["fc"] = n_img * _mm(lat, dim, cfg.lm.hidden)
  c = cfg.lm
  t, e = seq_len, c.hidden
  attn = 2 * _mm(t, t, c.heads * c.head_dim) * (0.5 if causal_halved else 1.0)
  per_layer = (_mm(t, e, c.heads * c.head_dim) + 2 * _mm(t, e, c.kv_heads * c.head_dim)
               + _mm(t, c.heads * c.head_dim, e) + 3 * _mm(t, e, c.mlp) + attn)
  out["lm"] = batch * (c.layers * per_layer + _mm(t, e, cfg.vocab_size))
  return out


def train_flops(cfg, *, batch: int, seq_len: int, image_shape, trainable: Mapping[str, bool],
                causal_halved: bool = True) -> float:
  """Model FLOPs of one training step: 3x forward for towers with trainable weights, 1x for frozen.

  trainable: tower name ("vision", "resampler", "fc", "lm") -> whether any of its weights train.
  """
  fwd = forward_flops(cfg, batch=batch, seq_len=seq_len, image_shape=image_shape,
                      causal_halved=causal_halved)
  return sum(f * (3.0 if trainable.get(k, True) else 1.0) for k, f in fwd.items())


# ----------------------------------------------------------------------------------------------------
# Peak FLOP/s.
# ----------------------------------------------------------------------------------------------------
def cpu_matmul_probe(dtype: str = "float32", n: int = 1024, seconds: float = 0.5) -> float:
  """Measured FLOP/s of a jitted n x n matmul on the first CPU device (the host's compute)."""
  dt = jnp.dtype(dtype)
  dev = jax.local_devices(backend="cpu")[0]
  a = jax.device_put(jnp.ones((n, n), dt), dev)
  f = jax.jit(lambda x, y: jax.lax.dot(x, y, preferred_element_type=jnp.float32))
  f(a, a).block_until_ready()  # compile
  reps, t0 = 0, time.perf_counter()
  while True:
    f(a, a).block_until_ready()
    reps += 1
    dt_s = time.perf_counter() - t0
    if dt_s >= seconds and reps >= 3:
      return reps * 2.0 * n ** 3 / dt_s


def peak_flops(dtype: str = "bfloat16") -> tuple[float, str]:
  """(peak FLOP/s of all devices of the run, a description of where it came from)."""
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    per_host = cpu_matmul_probe(dtype)
    return per_host * jax.process_count(), (f"CPU matmul probe ({dtype}): {per_host / 1e9:.0f} GFLOP/s "
                                            f"per host x {jax.process_count()}")
  tflops = peak_tflops(dev.device_kind)
  if tflops:
    return tflops * 1e12 * jax.device_count(), f"{dev.device_kind}: {tflops} TFLOP/s x {jax.device_count()}"
  logging.warning("No peak FLOP/s known for device kind %r; MFU will be reported as 0.", dev.device_kind)
  return 0.0, f"unknown device kind {dev.device_kind!r}"


# ----------------------------------------------------------------------------------------------------
# Writers.
# ----------------------------------------------------------------------------------------------------
class MetricsWriter:
  """CLU writer (TensorBoard + log lines) and `metrics.jsonl` in `workdir` (process 0 writes files).

  `start_step`: on resume, records of `metrics.jsonl` after this step (written by the interrupted run
  after its last checkpoint) are dropped so the file holds each step once.
  `workdir` may be a URL (gs://...): object stores cannot append, so there the whole file is rewritten
  on each write (a few hundred bytes per logged step). `tensorboard_dir` (default: the workdir) takes
  the TensorBoard events elsewhere.
  """

  def __init__(self, workdir: str, *, start_step: int = 0, tensorboard_dir: str | None = None):
    from clu import metric_writers  # imports TensorFlow: keep it out of module import.
    self.primary = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(tensorboard_dir or workdir,
                                                       just_logging=not self.primary, asynchronous=False)
    self.path = paths.path(workdir) / "metrics.jsonl"
    self._lines: list[str] | None = None   # remote: the file's lines, rewritten on each write
    if self.primary:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      kept = [json.dumps(r) + "\n" for r in read_jsonl(self.path) if r.get("step", 0) <= start_step]
      self.path.write_text("".join(kept))
      if paths.is_remote(self.path):
        self._lines = kept

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    self.writer.write_scalars(step, scalars)
    if self.primary:
      line = json.dumps({"step": int(step), **scalars}) + "\n"
      if self._lines is None:
        with self.path.open("a") as f:
          f.write(line)
      else:
        self._lines.append(line)
        self.path.write_text("".join(self._lines))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self.writer.write_hparams(dict(hparams))

  def flush(self) -> None:
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """Records of a metrics.jsonl, local or remote (missing file: [])."""
  path = paths.path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tree_norm(tree) -> jax.Array:
  """Global L2 norm of a pytree of arrays (float32)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
