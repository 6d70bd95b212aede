"""The Pallas splash kernel compiles ahead of time for a TPU topology (v5p:2x2x1) from this CPU box
(libtpu), forward + backward with causal + segment-id masking and GQA under shard_map, and its
per-chip temporaries are a fraction of the XLA (materialised scores) path's."""
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other AOT tests may hold libtpu's lock

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from radfm_jax import sharding  # noqa: E402
from radfm_jax.models import attention as attn_lib  # noqa: E402

B, T, N, K, D = 4, 512, 4, 2, 128


def _compile(impl):
  topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=2), devices=topo.devices)
  bs = NamedSharding(mesh, P(("data", "fsdp")))
  sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt, sharding=bs)

  def loss(q, k, v, seg):
    o = attn_lib.attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg, implementation=impl)
    return (o.astype(jnp.float32) ** 2).sum()

  with jax.set_mesh(mesh):
    assert attn_lib.platform() == "tpu" and attn_lib.resolve("auto", T, T, D) == "splash"
    lowered = jax.jit(jax.grad(loss, (0, 1, 2))).lower(sd(B, T, N, D), sd(B, T, K, D), sd(B, T, K, D),
                                                        sd(B, T, dt=jnp.int32))
  return lowered.as_text(), lowered.compile().memory_analysis()


def test_splash_compiles_for_tpu_and_needs_less_memory():
  hlo, splash = _compile("splash")
  assert "tpu_custom_call" in hlo  # the Pallas (Mosaic) kernel, not an XLA fallback
  _, xla = _compile("xla")
  assert splash.temp_size_in_bytes < xla.temp_size_in_bytes / 2, (splash, xla)
