"""One attention function for the LM, the 3D ViT and the resampler, fused where the backend allows.

  out = attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg, dtype="bfloat16")

q [B, T, N, D]; k, v [B, S, K, D] with N a multiple of K (grouped-query attention); scale D**-0.5;
softmax in float32; returns [B, T, N, D] in `dtype`. Query i attends key j iff
  (not causal or j <= q_offset + i)  and  (no segment ids or q_segment_ids[i] == kv_segment_ids[j]).
`q_offset` (a traced scalar) places the queries at cache slots q_offset.. (decoding over a fixed-size
KV cache: never-written slots carry segment id 0 and lie in the future, so they are masked either way).
A fully masked row gives a uniform softmax (finite), never NaN.

Backends (`implementation`, "auto" picks by the platform of the mesh in context, else the default one):
- "xla":    `jax.nn.dot_product_attention(implementation="xla")` (CPU; fallback everywhere). The mask is
            built inside the traced function from the segment ids ([B, 1, T, S] booleans fused by XLA into
            the score select); no [B, T, T] mask is passed between layers or saved for the backward pass.
- "cudnn":  `jax.nn.dot_product_attention(implementation="cudnn")` (GPU flash attention, bf16/fp16): causal
            in the kernel; segment ids go in as the boolean mask (cuDNN turns it into a bias). Shapes or
            dtypes cuDNN rejects fall back to "xla" at trace time.
- "splash": Pallas splash attention on TPU (`make_splash_mha`, causal `MultiHeadMask`, `SegmentIds`:
            the mask is computed per block inside the kernel, fully masked blocks are skipped), under
            `shard_map` over the batch ("data", "fsdp") and head ("tensor") mesh axes of the mesh in
            context. Used when T and S are multiples of 128, there is no q_offset, and D is a multiple
            of 64; otherwise (decode steps, the resampler's 32 queries) "xla".
`interpret=True` runs the Pallas kernel in interpret mode (any platform; tests compare it on CPU).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

from radfm_jax import sharding

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"
SPLASH_BLOCK = 512  # largest splash tile tried; shrunk to divide T and S (multiples of 128)


def _mesh():
  """The mesh in context: `sharding.activation_mesh`'s (what the train / eval steps and generation enter
  while tracing) or `jax.set_mesh`'s; None without one."""
  mesh = sharding.active_mesh()
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def platform() -> str:
  """Platform the current trace compiles for: the context mesh's devices (AOT for TPU from a CPU box
  traces under a TPU mesh), else the default backend."""
  mesh = _mesh()
  if mesh is not None:
    if isinstance(mesh, jax.sharding.Mesh):  # concrete devices (an AbstractMesh raises on .devices)
      return mesh.devices.flat[0].platform
    dev = getattr(mesh, "abstract_device", None)
    if dev is not None and getattr(dev, "platform", None):
      return dev.platform
  return jax.default_backend()


def _splash_fits(t: int, s: int, d: int, q_offset) -> bool:
  return q_offset is None and t % 128 == 0 and s % 128 == 0 and d % 64 == 0


def resolve(implementation: str, t: int, s: int, d: int, q_offset=None) -> str:
  """The backend `attention` uses for these shapes ("auto" -> by platform; "splash" needs tiles)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
  if implementation == "auto":
    implementation = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "cudnn"}.get(platform(), "xla")
  if implementation == "splash" and not _splash_fits(t, s, d, q_offset):
    return "xla"
  return implementation


def local_mask(t: int, s: int, *, causal: bool, q_segment_ids=None, kv_segment_ids=None,
               q_offset=None) -> jax.Array | None:
  """[B|1, 1, T, S] boolean mask (True = attend) built from ids inside the trace, or None (no mask)."""
  mask = None
  if causal and q_offset is not None:
    mask = (jnp.arange(s)[None, :] <= (q_offset + jnp.arange(t))[:, None])[None, None]
  if q_segment_ids is not None:
    seg = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
    mask = seg if mask is None else mask & seg
  return mask


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
              q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
              q_offset: jax.Array | int | None = None, dtype=None, implementation: str = "auto",
              interpret: bool = False) -> jax.Array:
  """Scaled dot-product attention (see the module docstring for shapes, masking and backends)."""
  b, t, n, d = q.shape
  bk, s, kh, dk = k.shape
  if v.shape != k.shape or bk != b or dk != d:
    raise ValueError(f"attention shapes: q {q.shape} [B, T, N, D], k {k.shape} and v {v.shape} [B, S, K, D]")
  if n % kh:
    raise ValueError(f"{n} query heads are not a multiple of {kh} key/value heads")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
  if q_segment_ids is not None and (q_segment_ids.shape != (b, t) or kv_segment_ids.shape != (b, s)):
    raise ValueError(f"segment ids: q {q_segment_ids.shape} must be {(b, t)}, kv {kv_segment_ids.shape} "
                     f"must be {(b, s)}")
  if q_offset is not None and not causal:
    raise ValueError("q_offset places causal queries in a cache; it needs causal=True")
  if causal and q_offset is None and t != s:
    raise ValueError(f"causal self-attention needs T == S (got {t}, {s}); pass q_offset for a cache")
  dtype = jnp.dtype(dtype or q.dtype)
  q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
  impl = resolve(implementation, t, s, d, q_offset)
  if impl == "splash":
    return _splash(q, k, v, causal, q_segment_ids, kv_segment_ids, interpret).astype(dtype)
  mask = local_mask(t, s, causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                    q_offset=q_offset)
  kw = dict(mask=mask, is_causal=causal and q_offset is None)
  if impl == "cudnn":
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kw).astype(dtype)
    except Exception:  # noqa: BLE001  cuDNN rejects some shapes/dtypes (e.g. fp32): the XLA path serves
      pass
  return jax.nn.dot_product_attention(q, k, v, implementation="xla", **kw).astype(dtype)


# ----------------------------------------------------------------------------------------------------
# TPU: Pallas splash attention under shard_map.
# ----------------------------------------------------------------------------------------------------
def _block(n: int) -> int:
  return math.gcd(n, SPLASH_BLOCK)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, t: int, s: int, causal: bool, interpret: bool):
  one = sm.CausalMask((t, s)) if causal else sm.FullMask((t, s))
  bq, bkv = _block(t), _block(s)
  blocks = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                         block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), head_shards=1, q_seq_shards=1,
                            block_sizes=blocks, interpret=interpret)


def _splash(q, k, v, causal, q_seg, kv_seg, interpret):
  b, t, n, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
  qh, kh_, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, heads, len, D]
  if q_seg is None:
    q_seg, kv_seg = jnp.ones((b, t), jnp.int32), jnp.ones((b, s), jnp.int32)
  q_seg, kv_seg = q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)

  mesh = _mesh()
  names = () if mesh is None else mesh.axis_names
  batch = tuple(a for a in BATCH_AXES if a in names)
  nb = math.prod(mesh.shape[a] for a in batch) if batch else 1
  batch = batch if batch and b % nb == 0 else ()
  head = HEAD_AXIS if HEAD_AXIS in names and n % mesh.shape[HEAD_AXIS] == 0 and kh % mesh.shape[HEAD_AXIS] == 0 else None
  n_local = n // (mesh.shape[head] if head else 1)
  kernel = _splash_kernel(n_local, t, s, causal, interpret)

  def local(qh, kh_, vh, q_seg, kv_seg):
    one = lambda q1, k1, v1, qs, ks: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=qs, kv=ks))
    return jax.vmap(one)(qh, kh_, vh, q_seg, kv_seg)

  if mesh is None:
    out = local(qh, kh_, vh, q_seg, kv_seg)
  else:
    bspec = batch if batch else None
    act, ids = P(bspec, head, None, None), P(bspec, None)
    out = jax.shard_map(local, mesh=mesh, in_specs=(act, act, act, ids, ids), out_specs=act,
                        check_vma=False)(qh, kh_, vh, q_seg, kv_seg)
  return out.transpose(0, 2, 1, 3)
