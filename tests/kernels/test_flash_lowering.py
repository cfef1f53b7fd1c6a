"""Every flash kernel configuration cross-lowers for an H100 (Triton backend) on CPU.

Interpret mode ignores the GPU's constraints (power-of-two tiles, out-of-bound slices, dtype rules);
lowering forward + VJP (forward, dQ and dK/dV kernels) with `interpret=False` under an abstract H100
makes those errors fail here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import lower_for_h100
from attnjax.ops import layout as layouts
from pallas_kernels.flash import api

CONFIGS = {
    # name: (dtype, Tq, Tk, H, Hkv, D, kwargs); None block sizes = the GPU defaults of blocks.py
    "dense_bf16_d128_defaults": (jnp.bfloat16, 300, 300, 4, 4, 128, dict()),
    "causal_gqa_bf16_d64": (jnp.bfloat16, 200, 260, 4, 2, 64, dict(causal=True)),
    "window_fp16_d256": (jnp.float16, 130, 130, 2, 1, 256, dict(window=(40, 0))),
    "all_mods_f32_d24": (jnp.float32, 100, 100, 2, 1, 24,
                         dict(causal=True, softcap=20.0, alibi_slopes=jnp.ones(2), sinks=True,
                              segments=True, block_q=32, block_k=16)),
    "sigmoid_bf16_d80": (jnp.bfloat16, 96, 96, 2, 2, 80, dict(score_mode="sigmoid", window=(16, 16))),
    "bias_factors_bf16": (jnp.bfloat16, 64, 64, 2, 2, 62, dict(rank=2)),
    "random_layout_bf16": (jnp.bfloat16, 150, 150, 2, 1, 64, dict(layout=True)),
}


def _build(name):
  dtype, tq, tk, h, hk, d, kw = CONFIGS[name]
  kw = dict(kw)
  spec = lambda *s: jax.ShapeDtypeStruct(s, dtype)
  args = [spec(1, tq, h, d), spec(1, tk, hk, d), spec(1, tk, hk, d)]
  if kw.pop("sinks", False):
    args.append(jax.ShapeDtypeStruct((h,), jnp.float32))
  if kw.pop("segments", False):
    kw["q_segment_ids"] = jnp.zeros((1, tq), jnp.int32)
    kw["kv_segment_ids"] = jnp.zeros((1, tk), jnp.int32)
  rank = kw.pop("rank", 0)
  if rank:
    args += [spec(1, tq, h, rank), spec(1, tk, hk, rank)]
  if kw.pop("layout", False):
    kind = np.random.default_rng(0).choice(3, size=(1, h, -(-tq // 64), -(-tk // 64)))
    kw["layout"] = layouts.from_block_mask(kind > 0, kind == 1, block_q=64, block_k=64, tq=tq,
                                           tk=tk, mask_rule=lambda qi, ki: (qi ^ ki) % 5 != 0)
  return args, kw, (1, tq, h, d), dtype


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_and_vjp_lower_for_h100(name):
  args, kw, out_shape, dtype = _build(name)

  def fwd_bwd(*args):
    q, k, v, *rest = args
    extra = dict(kw)
    if "sinks" in CONFIGS[name][6]:
      extra["sinks"] = rest.pop(0)
    if rest:
      extra["bias_factors"] = tuple(rest)
    f = lambda *a: api.flash_attention(*a, interpret=False, **extra)
    o, vjp = jax.vjp(f, q, k, v)
    return o, vjp(jnp.ones(out_shape, dtype))

  text = lower_for_h100(fwd_bwd, *args).as_text()
  # Forward, dQ and dK/dV are each one Triton custom call.
  assert text.count("__gpu$xla.gpu.triton") == 3, text.count("__gpu$xla.gpu.triton")


def test_lowering_rejects_non_power_of_two_tiles():
  """Guards the test above: a constraint violation must surface as a lowering error."""
  from pallas_kernels.flash import forward as fwd_lib
  q = jax.ShapeDtypeStruct((1, 48, 1, 24), jnp.bfloat16)
  layout = layouts.band_layout(48, 48, 16, 16)
  cfg = fwd_lib.KernelConfig(batch=1, heads=1, kv_heads=1, tq=48, tk=48, tq_pad=48, tk_pad=48,
                             head_dim_pad=24, block_q=16, block_k=16, layout_batch=1,
                             layout_heads=1, scale=1.0)
  arrays = (layout.kv_counts, layout.kv_indices, layout.kv_partial)
  with pytest.raises(ValueError, match="power of 2"):
    lower_for_h100(lambda q, k, v: fwd_lib.flash_forward(cfg, arrays, q, k, v), q, q, q)
