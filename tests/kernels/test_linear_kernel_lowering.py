"""Every configuration of the chunked linear-attention kernels lowers for an H100 (no GPU needed).

Interpret mode checks none of Triton's constraints (power-of-two tiles, dot sizes >= 16,
out-of-bound slices); cross-lowering the forward and the full backward (all three pallas_calls)
through `pallas_kernels.common.lower_for_h100` does.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.common import lower_for_h100
from pallas_kernels.linear import BlockSizes, chunked_linear_attention

B, T, H = 2, 200, 2
SDS = jax.ShapeDtypeStruct


def _lower_value_and_grad(kind, dtype, dk, dv, segments, initial_state, normalize=False,
                          causal=True, block_sizes=None, t=T):
  gate_shape = {"none": None, "head": (H,), "scalar": (B, t, H), "vector": (B, t, H, dk)}[kind]
  args = [SDS((B, t, H, dk), dtype), SDS((B, t, H, dk), dtype), SDS((B, t, H, dv), dtype),
          None if gate_shape is None else SDS(gate_shape, jnp.float32),
          SDS((B, H, dk, dv), jnp.float32) if initial_state else None,
          SDS((B, t), jnp.int32) if segments else None]

  def loss(q, k, v, g, h0, seg):
    if normalize and h0 is not None:
      h0 = (h0, h0[..., 0])
    o, s = chunked_linear_attention(q, k, v, log_decay=g, initial_state=h0, segment_ids=seg,
                                    output_final_state=True, normalize=normalize,
                                    causal=causal, interpret=False, block_sizes=block_sizes)
    s = s[0] if normalize else s
    return o.astype(jnp.float32).sum() + s.sum()

  argnums = tuple(i for i, a in enumerate(args[:5]) if a is not None)
  lowered = lower_for_h100(jax.grad(loss, argnums), *args)
  text = lowered.as_text()
  # forward, dq and dk/dv kernels (non-causal runs two passes: twice as many).
  assert text.count("linear_attention_fwd") >= 1
  assert text.count("linear_attention_bwd_dq") >= 1
  assert text.count("linear_attention_bwd_dkv") >= 1


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("segments", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("kind", ["none", "head", "scalar", "vector"])
def test_lowers_for_h100(kind, segments, dtype):
  _lower_value_and_grad(kind, jnp.dtype(dtype), 100, 60, segments, initial_state=True)


@pytest.mark.parametrize("kind", ["scalar", "vector"])
def test_lowers_for_h100_paper_shape_defaults(kind):
  """D = 128 with the default tiles (chunk 64, sub-chunk 16, value block 64), no initial state."""
  _lower_value_and_grad(kind, jnp.bfloat16, 128, 128, False, initial_state=False)


def test_lowers_for_h100_small_tiles_and_tiny_head_dim():
  _lower_value_and_grad("vector", jnp.bfloat16, 8, 12, True, initial_state=True,
                        block_sizes=BlockSizes(chunk=16, sub_chunk=16, block_v=16))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non_causal"])
def test_lowers_for_h100_normalized(causal):
  _lower_value_and_grad("none" if not causal else "vector", jnp.bfloat16, 64, 64, True,
                        initial_state=True, normalize=True, causal=causal)


@pytest.mark.parametrize("kind", ["scalar", "vector"])
def test_lowers_for_h100_padded_length_not_power_of_two(kind):
  """T = 300 pads to 320 rows: the whole-sequence blocks are then not powers of two, which Triton
  accepts only because every load inside the kernels is a power-of-two slice."""
  _lower_value_and_grad(kind, jnp.bfloat16, 64, 64, True, initial_state=True, t=300)
