"""Context parallelism (sequence sharding) and per-shard `shard_map` wrappers for attention ops.

Three tools, all on `[B, T, H, D]` arrays and a mesh from `attnjax.distributed.sharding.make_mesh`
(axes `data`, `fsdp`, `tensor`, `sequence`):

* `ring_attention` -- softmax attention with T split over the `sequence` axis. Each shard keeps its
  query block and passes key/value blocks around the ring with `jax.lax.ppermute`; after n - 1 hops
  every query block has met every key block. Partial results are merged with the log-sum-exp rule
  `lse = logaddexp(lse_a, lse_b)`, `o = o_a exp(lse_a - lse) + o_b exp(lse_b - lse)` (the
  online-softmax update of FlashAttention / Ring Attention, Liu et al. 2023), so the result equals
  single-device `dot_product_attention`. The per-block op *is* `dot_product_attention(...,
  return_lse=True)`, so GQA, `scale`, `softcap` and the implementation choice (reference / xla /
  pallas) come for free. Causal uses global positions: the diagonal block is causal, blocks from
  earlier shards are fully visible, blocks from later shards are skipped (`lax.cond`, no FLOPs).
  Sinks join the denominator once, as a final merge with `(o = 0, lse = sink_h)`.
  Gradients come from autodiff through the scan of ppermutes (the backward pass sends cotangents
  around the ring in the opposite direction); no custom VJP. Causal load is unbalanced (shard 0
  does one block, shard n - 1 does n); a zig-zag (striped) layout would balance it and is left out.
* `context_parallel_linear_attention` -- the linear-attention engine with T split over `sequence`
  by state passing. The recurrence `S_t = exp(g_t) (.) S_{t-1} + k_t^T v_t` is linear in the
  incoming state, so each shard i runs `linear_attention` on its chunk from a zero state (local
  output `o_loc` and local final state `S_i`, plus its total log decay `G_i = sum_t g_t`), the
  `(S_i, G_i)` of all shards are all-gathered, and each shard folds the states of the shards before
  it, `S_in = fold_{j < i} (S <- exp(G_j) (.) S + S_j)`, starting from the global `initial_state`.
  The exact output is then `o = o_loc + scale * (q (.) exp(cumsum_t g)) S_in` (the contribution of
  the incoming state, decayed to each position; every cumsum is a sum of gates <= 0 from the
  chunk start, so nothing overflows). With `normalize=True` the key sum `z` rides along as an extra
  all-ones value column (as the engine itself does) and the division happens after the correction.
  Communication: one all-gather of n `[B, H, Dk, Dv]` states, independent of T.
* `shard_heads` -- wraps any attention function `fn(q, k, v, **kw)` so it runs per shard with batch
  split over `("data", "fsdp")` and query and key/value heads over `tensor` (Megatron-style head
  parallelism: heads never talk to each other, so no collective is needed). A Pallas kernel (e.g.
  `functools.partial(dot_product_attention, implementation="pallas")` or
  `pallas_kernels.flash.api.flash_attention`) drops in as `fn` unchanged: inside `shard_map` it sees
  ordinary local arrays, which is what a `pallas_call` needs (GSPMD cannot partition a custom call).

Scale-out. These functions take and return global arrays: call them inside or outside `jax.jit`;
`shard_map` moves the inputs to the layout it needs. Example (8 devices, 2-way data parallel,
4-way sequence parallel)::

  from attnjax.distributed import sharding, context_parallel as cp
  mesh = sharding.make_mesh({"data": 2, "sequence": 4})
  o = jax.jit(lambda q, k, v: cp.ring_attention(q, k, v, mesh=mesh, causal=True))(q, k, v)
  o, s = cp.context_parallel_linear_attention(q, k, v, mesh=mesh, log_decay=g,
                                              output_final_state=True)
  attn = cp.shard_heads(functools.partial(dot_product_attention, causal=True),
                        sharding.make_mesh({"data": 2, "tensor": 4}))
  o = attn(q, k, v)

T must be divisible by the `sequence` axis size, B by `data * fsdp` and the head counts (Hq and
Hk) by `tensor`; each violation raises `ValueError` naming the argument.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from attnjax.distributed.sharding import BATCH_AXES, axis_size, present_axes
from attnjax.ops.linear.engine import NORMALIZE_EPS, linear_attention
from attnjax.ops.softmax import DEFAULT_BLOCK_SIZE, DEFAULT_QUERY_BLOCK_SIZE, dot_product_attention

__all__ = ["ring_attention", "context_parallel_linear_attention", "shard_heads", "merge_partials"]


# ----------------------------------------------------------------------------------------------
# Shared checks.


def _axes_spec(axes: tuple[str, ...]):
  """A PartitionSpec entry for `axes`: None, one name, or a tuple of names."""
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def _resolve_axes(mesh, batch_axes, head_axis, seq_axis):
  """Mesh axes actually present (absent names are dropped, so custom meshes work too)."""
  b_axes = present_axes(mesh, batch_axes)
  h_axes = present_axes(mesh, (head_axis,) if head_axis else ())
  s_axes = present_axes(mesh, (seq_axis,) if seq_axis else ())
  return b_axes, h_axes, s_axes


def _check_divisible(name: str, what: str, size: int, axes: tuple[str, ...], mesh) -> None:
  n = axis_size(mesh, axes)
  if size % n:
    raise ValueError(f"{name}: {what}={size} must be divisible by the mesh axes {axes} "
                     f"(size {n}) that it is sharded over")


def _check_qkv4(q, k, v):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, T, H, D]; got {q.shape}, {k.shape}, {v.shape}")
  if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3]:
    raise ValueError(f"q [B, T, Hq, D], k [B, T, Hk, D], v [B, T, Hk, Dv] must share B and T (and "
                     f"k, v share Hk); got {q.shape}, {k.shape}, {v.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"q heads Hq={q.shape[2]} must be a multiple of k/v heads Hk={k.shape[2]}")


# ----------------------------------------------------------------------------------------------
# Ring attention (softmax engine).


def merge_partials(o1, lse1, o2, lse2):
  """Merges two softmax partials over disjoint key sets into the softmax over their union.

  `o [B, T, H, Dv]` float32 (each normalised over its own keys), `lse [B, H, T]` float32 (-inf
  where a row saw no key). Returns `(o, lse)`; rows empty in both stay `o = 0, lse = -inf` with
  zero (never NaN) gradients.
  """
  m = jnp.maximum(lse1, lse2)
  # The shift cancels mathematically; stop_gradient keeps the isfinite/where logic out of autodiff.
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  total = jnp.exp(lse1 - m) + jnp.exp(lse2 - m)
  has = total > 0
  # Double where: log's derivative at 0 would turn a zero cotangent into NaN.
  lse = jnp.where(has, m + jnp.log(jnp.where(has, total, 1.0)), -jnp.inf)
  lse_safe = jnp.where(has, lse, 0.0)
  to_bthd = lambda w: jnp.transpose(w, (0, 2, 1))[..., None]
  w1 = to_bthd(jnp.exp(lse1 - lse_safe))
  w2 = to_bthd(jnp.exp(lse2 - lse_safe))
  return o1 * w1 + o2 * w2, lse


def ring_attention(q, k, v, *, mesh, axis_name: str = "sequence", causal: bool = False,
                   scale: float | None = None, softcap: float | None = None, sinks=None,
                   batch_axes: Sequence[str] = BATCH_AXES, head_axis: str | None = "tensor",
                   implementation: str | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                   query_block_size: int = DEFAULT_QUERY_BLOCK_SIZE):
  """Softmax attention with the sequence split over `axis_name` (ring of K/V blocks).

  `q [B, T, Hq, D], k [B, T, Hk, D], v [B, T, Hk, Dv] -> o [B, T, Hq, Dv]` (q's dtype), equal to
  `dot_product_attention(q, k, v, causal=causal, scale=scale, softcap=softcap, sinks=sinks)` on one
  device. T is split over `axis_name` (must divide it), B over `batch_axes`, Hq and Hk over
  `head_axis` (None: heads replicated). `sinks [Hq]` (optional) are added once to the global
  denominator. `implementation`, `block_size`, `query_block_size` go to the per-block
  `dot_product_attention`. Self-attention only (same T for q and k); no mask / bias / segment ids /
  window / ALiBi, whose positions would need the global offset of each block.
  """
  _check_qkv4(q, k, v)
  b, t, hq, d = q.shape
  hk = k.shape[2]
  b_axes, h_axes, s_axes = _resolve_axes(mesh, batch_axes, head_axis, axis_name)
  _check_divisible("q", "T", t, s_axes, mesh)
  _check_divisible("q", "B", b, b_axes, mesh)
  _check_divisible("q", "Hq", hq, h_axes, mesh)
  _check_divisible("k", "Hk", hk, h_axes, mesh)
  if sinks is not None and tuple(sinks.shape) != (hq,):
    raise ValueError(f"sinks must be [Hq]={[hq]}, got {list(sinks.shape)}")
  n = axis_size(mesh, s_axes)
  scale = d ** -0.5 if scale is None else float(scale)
  attend = functools.partial(dot_product_attention, scale=scale, softcap=softcap, return_lse=True,
                             implementation=implementation, block_size=block_size,
                             query_block_size=query_block_size)
  ring = [(j, (j + 1) % n) for j in range(n)]

  def local(q, k, v, sinks):
    out_dtype = q.dtype
    o, lse = attend(q, k, v, causal=causal)     # the diagonal block: same global positions
    o = o.astype(jnp.float32)
    if n > 1:
      me = jax.lax.axis_index(s_axes[0])

      def hop(carry, step):
        k_c, v_c, o, lse = carry
        # After `step` hops this shard holds the K/V block of shard (me - step) mod n.
        k_c = jax.lax.ppermute(k_c, s_axes[0], ring)
        v_c = jax.lax.ppermute(v_c, s_axes[0], ring)

        def visible():
          ob, lb = attend(q, k_c, v_c, causal=False)
          return ob.astype(jnp.float32), lb

        def hidden():
          return jnp.zeros_like(o), jnp.full_like(lse, -jnp.inf)

        if causal:
          # The block comes from an earlier shard (fully visible) iff step <= me, else from a
          # later one (fully hidden by the causal rule).
          ob, lb = jax.lax.cond(step <= me, visible, hidden)
        else:
          ob, lb = visible()
        o, lse = merge_partials(o, lse, ob, lb)
        return (k_c, v_c, o, lse), None

      (_, _, o, lse), _ = jax.lax.scan(hop, (k, v, o, lse), jnp.arange(1, n))
    if sinks is not None:
      sink_lse = jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, None], lse.shape)
      o, lse = merge_partials(o, lse, jnp.zeros_like(o), sink_lse)
    return o.astype(out_dtype)

  spec = P(_axes_spec(b_axes), _axes_spec(s_axes), _axes_spec(h_axes), None)
  sink_spec = P(_axes_spec(h_axes))
  fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, sink_spec), out_specs=spec)
  return fn(q, k, v, sinks)


# ----------------------------------------------------------------------------------------------
# State passing (linear-attention engine).


def _local_log_decay(log_decay, b, t, h):
  """Local gate `[B, T, H, Dg]` float32 (Dg in {1, Dk}) from `[H]`, `[B, T, H]` or `[B, T, H, Dk]`."""
  g = log_decay.astype(jnp.float32)
  if g.ndim == 1:
    return jnp.broadcast_to(g[None, None, :, None], (b, t, h, 1))
  if g.ndim == 3:
    return g[..., None]
  return g


def _varying_like(x, ref):
  """`x` cast to vary over the same manual mesh axes as `ref` (inside `shard_map`)."""
  axes = tuple(sorted(_varying_axes(ref) - _varying_axes(x)))
  return jax.lax.pcast(x, axes, to="varying") if axes else x


def _varying_axes(x) -> frozenset:
  aval = jax.typeof(x)
  # jax >= 0.11 keeps the varying axes in `aval.mat.varying`; older versions in `aval.vma`.
  mat = getattr(aval, "mat", None)
  return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def context_parallel_linear_attention(q, k, v, *, mesh, axis_name: str = "sequence", log_decay=None,
                                      scale: float | None = None, normalize: bool = False,
                                      causal: bool = True, initial_state=None,
                                      output_final_state: bool = False, form: str = "chunked",
                                      chunk_size: int = 64, batch_axes: Sequence[str] = BATCH_AXES,
                                      head_axis: str | None = "tensor"):
  """`linear_attention` with T split over `axis_name`, by passing states between shards.

  Same arguments and result as `attnjax.ops.linear.engine.linear_attention` (`q, k [B, T, H, Dk]`,
  `v [B, T, H, Dv]`, `log_decay` None / `[H]` / `[B, T, H]` / `[B, T, H, Dk]` in log space,
  `normalize`, `initial_state`, returns `(o [B, T, H, Dv], final_state or None)`), minus
  `segment_ids` and cross attention. `causal=False` (no decay) sums the shards' states with one
  `psum`. The final state is the state after the last token of the whole sequence (replicated over
  `axis_name`). T must be divisible by the `axis_name` size, B by `batch_axes`, H by `head_axis`.
  `form` / `chunk_size` choose the engine's local form. The log-space gate is not range-checked
  here (it is traced inside `shard_map`); pass gates <= 0.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, T, H, D]; got {q.shape}, {k.shape}, {v.shape}")
  b, t, h, dk = q.shape
  if tuple(k.shape) != (b, t, h, dk) or tuple(v.shape[:3]) != (b, t, h):
    raise ValueError(f"k must be [B, T, H, Dk]={[b, t, h, dk]} and v [B, T, H, Dv]; got "
                     f"{list(k.shape)}, {list(v.shape)}")
  dv = v.shape[-1]
  if not causal and log_decay is not None:
    raise ValueError("log_decay is only defined for causal=True")
  if log_decay is not None:
    shapes = {1: (h,), 3: (b, t, h), 4: (b, t, h, dk)}
    if log_decay.ndim not in shapes or tuple(log_decay.shape) != shapes[log_decay.ndim]:
      raise ValueError(f"log_decay must have shape [H]={[h]}, [B, T, H]={[b, t, h]} or "
                       f"[B, T, H, Dk]={[b, t, h, dk]}; got {list(log_decay.shape)}")
  b_axes, h_axes, s_axes = _resolve_axes(mesh, batch_axes, head_axis, axis_name)
  _check_divisible("q", "T", t, s_axes, mesh)
  _check_divisible("q", "B", b, b_axes, mesh)
  _check_divisible("q", "H", h, h_axes, mesh)
  if normalize:
    if initial_state is not None and not (isinstance(initial_state, (tuple, list))
                                          and len(initial_state) == 2):
      raise ValueError("initial_state must be a tuple (S [B, H, Dk, Dv], z [B, H, Dk]) when "
                       "normalize=True")
    s0, z0 = initial_state if initial_state is not None else (None, None)
  else:
    if isinstance(initial_state, (tuple, list)):
      raise ValueError("initial_state must be one array S [B, H, Dk, Dv] when normalize=False")
    s0, z0 = initial_state, None
  if s0 is not None and tuple(s0.shape) != (b, h, dk, dv):
    raise ValueError(f"initial_state S must be [B, H, Dk, Dv]={[b, h, dk, dv]}, got {list(s0.shape)}")
  if z0 is not None and tuple(z0.shape) != (b, h, dk):
    raise ValueError(f"initial_state z must be [B, H, Dk]={[b, h, dk]}, got {list(z0.shape)}")
  scale = dk ** -0.5 if scale is None else float(scale)
  seq = s_axes[0] if s_axes else None
  out_dtype = q.dtype

  def local(q, k, v, g, s0, z0):
    lb, lt = q.shape[:2]
    f32 = lambda x: x.astype(jnp.float32)
    qf, kf, vf = f32(q), f32(k), f32(v)
    if normalize:
      # The key sum z is the state of an all-ones value column (the engine's own trick); carrying
      # it through the fold keeps numerator and denominator exact before the division.
      vf = jnp.concatenate([vf, jnp.ones_like(vf[..., :1])], axis=-1)
      if s0 is not None:
        s0 = jnp.concatenate([f32(s0), f32(z0)[..., None]], axis=-1)
    elif s0 is not None:
      s0 = f32(s0)
    if not causal:
      s_tot = jnp.einsum("bthd,bthe->bhde", kf, vf)
      if seq is not None:
        s_tot = jax.lax.psum(s_tot, seq)
      if s0 is not None:
        s_tot = s_tot + s0
      o = scale * jnp.einsum("bthd,bhde->bthe", qf, s_tot)
      s_fin = s_tot
    else:
      # An explicit zero state that is typed as varying like q: the engine's scans carry the
      # state, and under shard_map a carry must keep one manual-axis type across iterations.
      zero = _varying_like(jnp.zeros((lb, q.shape[2], dk, vf.shape[-1]), jnp.float32), qf)
      o, s_loc = linear_attention(qf, kf, vf, log_decay=g, scale=scale, causal=True,
                                  initial_state=zero, output_final_state=True, form=form,
                                  chunk_size=chunk_size)
      gl = (jnp.zeros((lb, lt, q.shape[2], 1), jnp.float32) if g is None
            else _local_log_decay(g, lb, lt, q.shape[2]))
      cum = jnp.cumsum(gl, axis=1)                       # decay from the chunk start to t, <= 0
      tot = cum[:, -1]                                   # [B, H, Dg]: the whole chunk's decay
      if seq is not None:
        states = jax.lax.all_gather(s_loc, seq)          # [n, B, H, Dk, Dv']
        decays = jax.lax.all_gather(tot, seq)            # [n, B, H, Dg]
      else:
        states, decays = s_loc[None], tot[None]
      start = _varying_like(jnp.zeros_like(s_loc) if s0 is None else s0, states)

      def fold(s, x):
        s_j, g_j = x
        return jnp.exp(g_j)[..., None] * s + s_j, s    # emits the state *entering* shard j

      _, s_enter = jax.lax.scan(fold, start, (states, decays))
      s_in = s_enter[jax.lax.axis_index(seq)] if seq is not None else s_enter[0]
      o = o + scale * jnp.einsum("bthd,bhde->bthe", qf * jnp.exp(cum), s_in)
      # The state after this shard's last token, stacked over shards (a leading axis of 1 here):
      # all_gather results count as varying under shard_map, so a replicated final state could not
      # be declared; the caller takes the last shard's entry.
      s_fin = (jnp.exp(tot)[..., None] * s_in + s_loc)[None]
    if normalize:
      o = o[..., :dv] / (o[..., dv:] + NORMALIZE_EPS)
      state = (s_fin[..., :dv], s_fin[..., dv])
    else:
      state = s_fin
    return o.astype(out_dtype), state

  bs, hs, ss = _axes_spec(b_axes), _axes_spec(h_axes), _axes_spec(s_axes)
  qkv_spec = P(bs, ss, hs, None)
  g_spec = None
  if log_decay is not None:
    g_spec = {1: P(hs), 3: P(bs, ss, hs), 4: P(bs, ss, hs, None)}[log_decay.ndim]
  s_spec, z_spec = P(bs, hs, None, None), P(bs, hs, None)
  if causal:   # per-shard states stacked on a leading axis split over `seq`
    out_s, out_z = P(ss, bs, hs, None, None), P(ss, bs, hs, None)
  else:        # the psum-ed state is replicated over `seq`
    out_s, out_z = s_spec, z_spec
  fn = jax.shard_map(local, mesh=mesh,
                     in_specs=(qkv_spec, qkv_spec, qkv_spec, g_spec, s_spec, z_spec),
                     out_specs=(qkv_spec, (out_s, out_z) if normalize else out_s))
  o, state = fn(q, k, v, log_decay, s0, z0)
  if not output_final_state:
    return o, None
  return o, (jax.tree.map(lambda x: x[-1], state) if causal else state)


# ----------------------------------------------------------------------------------------------
# Per-shard wrapper on batch and heads.


def shard_heads(attn_fn: Callable[..., Any], mesh, *, batch_axes: Sequence[str] = BATCH_AXES,
                head_axis: str = "tensor", out_specs=None, check_vma: bool = False
                ) -> Callable[..., Any]:
  """Wraps `attn_fn(q, k, v, **kwargs)` to run per shard: batch over `batch_axes`, heads over `head_axis`.

  The returned `fn(q, k, v, **kwargs)` takes global `q [B, Tq, Hq, D], k [B, Tk, Hk, D],
  v [B, Tk, Hk, Dv]` and calls `attn_fn` under `jax.shard_map` on the local blocks
  `[B / (data * fsdp), T, H / tensor, D]`. Query head h reads key/value head `h // (Hq // Hk)`,
  which stays on the same shard when both head counts are split into equal contiguous blocks, so
  GQA/MQA needs no communication. `kwargs` are forwarded unchanged to every shard: pass static
  options (causal, scale, implementation, ...) or arrays that are not split over batch or heads.
  `out_specs` (a `PartitionSpec` pytree prefix of the output) defaults to the q layout
  `P(batch_axes, None, head_axis, None)` for every output leaf; give it for other outputs (e.g.
  `(qkv, P(batch, head, None))` for `return_lse=True`). Raises ValueError when B is not divisible
  by the batch axes or Hq / Hk by the head axis. Any function of local arrays works, so a Pallas
  kernel (which GSPMD cannot partition) is dropped in as `attn_fn` unchanged.

  `check_vma` is passed to `jax.shard_map`. It defaults to False: `attn_fn` runs no collectives
  (heads and batch rows are independent), so there is nothing for the check to protect, while
  ops that start a `lax.scan` from a fresh zero state (the linear-attention engine) would fail it
  (their carry turns from unvarying to varying over the manual axes).
  """
  b_axes, h_axes, _ = _resolve_axes(mesh, batch_axes, head_axis, None)
  spec = P(_axes_spec(b_axes), None, _axes_spec(h_axes), None)

  def wrapped(q, k, v, **kwargs):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
      raise ValueError(f"q, k, v must be [B, T, H, D]; got {q.shape}, {k.shape}, {v.shape}")
    _check_divisible("q", "B", q.shape[0], b_axes, mesh)
    _check_divisible("q", "Hq (query heads)", q.shape[2], h_axes, mesh)
    _check_divisible("k", "Hk (key/value heads)", k.shape[2], h_axes, mesh)
    _check_divisible("v", "Hk (key/value heads)", v.shape[2], h_axes, mesh)
    fn = jax.shard_map(lambda q, k, v: attn_fn(q, k, v, **kwargs), mesh=mesh,
                       in_specs=(spec, spec, spec), out_specs=spec if out_specs is None else out_specs,
                       check_vma=check_vma)
    return fn(q, k, v)

  return wrapped
