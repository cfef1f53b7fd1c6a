"""Titans (Behrouz et al. 2024, arXiv:2501.00663) layers: the neural memory and its three architectures (MAC, MAG, MAL), with the
Miras (Behrouz et al. 2025, arXiv:2504.13173) memory variants as options. Registered mixers:

* `titans_memory`: the bare neural-memory layer (`attnjax.ops.linear.titans.neural_memory`);
* `titans_mag`: memory as a gate, `o = W_o(RMSNorm(SWA(x)) (.) sigmoid(RMSNorm(M(x))))`;
* `titans_mal`: memory as a layer, `o = SWA(M(x))`;
* `titans_mac`: memory as context (segment-wise; decodes token by token with O(segment_len) state).

Every option of `NeuralMemory` (`memory`, `loss`, `p`, `huber_delta`, `retention`, `q`,
`chunk_size`, ...) passes through the registry options; Moneta / Yaad / Memora are e.g.
`mixer_options=dict(memory="mlp", loss="lp", p=3, retention="lq", q=4, momentum=False)`,
`dict(memory="mlp", loss="huber", momentum=False)`, `dict(memory="mlp", retention="kl",
momentum=False)`.

Persistent memory (all three architectures). The paper prepends `N_p` learned tokens to the
attention's input. We give the attention `N_p` learned keys and values per head instead (the
K/V projections of such tokens, parametrised directly: the same function class for the
attention), visible to every query regardless of window and position. This keeps decoding a
plain KV cache. The neural memory does not read the persistent tokens; its learned initial
weights `M_0` play that data-independent role.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.cab import PatternUndefinedError
from attnjax.nn.layers import RMSNorm, dense
from attnjax.ops.linear import titans as tops
from attnjax.ops.rope import apply_rope
from attnjax.ops.softmax import dot_product_attention
from attnjax.registry import register_mixer


def _l2norm(x):
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)


class _Cached:
  def _state(self):
    if self.state is None:
      raise ValueError(f"{type(self).__name__}: call init_cache(batch_size, max_len) before decode=True")
    return self.state.get_value()


class NeuralMemory(nnx.Module, _Cached):
  """Titans' long-term memory layer: `x [B, T, d_model] -> [B, T, d_model]`.

  Per head (head dim `d = d_model / H`): `q, k = l2norm(silu(x W))`, `v = silu(x W_v)` (Titans
  normalises q and k and uses SiLU), gates from one projection `x W_g + b` `[B, T, 3H]`:
  `theta = max_lr sigmoid(.)`, `log(1 - alpha) = logsigmoid(. + retain_bias)` (starts near
  retaining everything), `log eta = logsigmoid(.)` (`momentum=False` drops it). The memory's
  initial weights `M_0` are learned parameters per head (zeros for the linear memory; for the MLP
  `W1` random, `W2` zeros, so `M_0(x) = x`). The read-out goes through a per-head RMSNorm and
  `W_o`. `memory_heads(x)` returns the raw per-head read-out `[B, T, H, d]` for the
  architectures. Options: `memory` ("linear" or "mlp", `expansion`), `loss`, `p`,
  `huber_delta`, `retention`, `q` (the `MemorySpec`), `chunk_size` (gradient points, see
  `titans.neural_memory`), `form`.

  Decoding keeps the `MemoryState` (weights, momentum, gradient point, position in the chunk):
  prefill with the recurrent form (it continues mid-chunk), then `neural_memory_step`.
  """

  def __init__(self, d_model: int, num_heads: int, *, causal: bool = True, memory: str = "linear",
               loss: str = "l2", p: float = 3.0, huber_delta: float = 1.0, retention: str = "l2",
               q: float = 4.0, expansion: int = 2, chunk_size: int = 16, form: str = "chunked",
               max_lr: float = 0.5, momentum: bool = True, retain_bias: float = 4.0,
               rngs: nnx.Rngs):
    if not causal:
      raise PatternUndefinedError("titans memory: the test-time-trained memory is a causal recurrence "
                                "(causal=True only)")
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
    self.spec = tops.MemorySpec(memory=memory, loss=loss, p=p, huber_delta=huber_delta,
                                retention=retention, q=q)
    self.h, self.d = num_heads, d_model // num_heads
    if not isinstance(chunk_size, int) or chunk_size < 1:
      raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if form not in tops.MEMORY_FORMS:
      raise ValueError(f"form must be one of {tops.MEMORY_FORMS}, got {form!r}")
    self.chunk_size, self.form = chunk_size, form
    self.max_lr, self.momentum, self.retain_bias = max_lr, momentum, retain_bias
    self.q_proj = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
    self.k_proj = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
    self.v_proj = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
    self.g_proj = dense(d_model, 3 * num_heads, axes=("embed", None), rngs=rngs, use_bias=True)
    self.o_proj = dense(d_model, d_model, axes=("heads", "embed"), rngs=rngs)
    self.norm = RMSNorm(self.d, axis_name="head_dim")
    shapes = tops.memory_shapes(self.spec, self.d, self.d, expansion)
    if memory == "linear":
      init = [jnp.zeros((num_heads,) + shapes[0])]
    else:
      w1 = jax.random.normal(rngs.params(), (num_heads,) + shapes[0]) * self.d ** -0.5
      init = [w1, jnp.zeros((num_heads,) + shapes[1])]
    self.init_memory = nnx.List([nnx.Param(w, logical_axes=(None, None, None)) for w in init])
    self.state = nnx.data(None)

  def _memory0(self):
    return tuple(w[...] for w in self.init_memory)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> None:
    del max_len, dtype
    self.state = nnx.Cache(tops.init_memory_state(self._memory0(), batch_size))

  def project(self, x):
    """`x [B, T, d_model]` -> `(q, k, v [B, T, H, d], theta, log_retain, log_momentum [B, T, H])`."""
    b, t, _ = x.shape
    heads = lambda y: y.reshape(b, t, self.h, self.d)
    q = _l2norm(heads(jax.nn.silu(self.q_proj(x))))
    k = _l2norm(heads(jax.nn.silu(self.k_proj(x))))
    v = heads(jax.nn.silu(self.v_proj(x)))
    g = self.g_proj(x).astype(jnp.float32).reshape(b, t, 3, self.h)
    theta = self.max_lr * jax.nn.sigmoid(g[:, :, 0])
    log_retain = jax.nn.log_sigmoid(g[:, :, 1] + self.retain_bias)
    log_mom = jax.nn.log_sigmoid(g[:, :, 2]) if self.momentum else None
    return q, k, v, theta, log_retain, log_mom

  def run(self, x, *, initial_state=None, segment_ids=None, form=None):
    """The memory over `x` from `initial_state` (default: fresh) -> (heads [B, T, H, d], final state)."""
    q, k, v, th, lg, lm = self.project(x)
    return tops.neural_memory(q, k, v, th, log_retain=lg, log_momentum=lm, spec=self.spec,
                              init_memory=self._memory0(), initial_state=initial_state,
                              output_final_state=True, segment_ids=segment_ids,
                              chunk_size=self.chunk_size, form=form or self.form)

  def memory_heads(self, x, *, segment_ids=None, decode=False):
    if not decode:
      return self.run(x, segment_ids=segment_ids)[0]
    state = self._state()
    if x.shape[1] == 1:
      q, k, v, th, lg, lm = self.project(x)
      o, state = tops.neural_memory_step(q[:, 0], k[:, 0], v[:, 0], th[:, 0], state,
                                         log_retain_t=lg[:, 0],
                                         log_momentum_t=None if lm is None else lm[:, 0],
                                         spec=self.spec, chunk_size=self.chunk_size)
      o = o[:, None]
    else:
      # The recurrent form continues a state that may sit mid-chunk.
      o, state = self.run(x, initial_state=state, form="recurrent")
    self.state.set_value(state)
    return o

  def __call__(self, x, *, segment_ids=None, decode=False):
    if x.ndim != 3:
      raise ValueError(f"x must be [B, T, d_model], got shape {x.shape}")
    b, t, _ = x.shape
    o = self.norm(self.memory_heads(x, segment_ids=segment_ids, decode=decode))
    return self.o_proj(o.reshape(b, t, self.h * self.d))


class PersistentSWA(nnx.Module, _Cached):
  """Causal sliding-window softmax attention (RoPE) plus `num_persistent` learned key/value
  pairs per head that every query sees. `heads(x) -> [B, T, H, d]` (before `W_o`),
  `__call__ -> [B, T, d_model]`. Decoding keeps a KV cache of `max_len`."""

  def __init__(self, d_model: int, num_heads: int, *, window: int = 16, num_persistent: int = 4,
               rngs: nnx.Rngs):
    if window < 0 or num_persistent < 0:
      raise ValueError(f"window and num_persistent must be >= 0, got {window}, {num_persistent}")
    self.h, self.d, self.window, self.np = num_heads, d_model // num_heads, window, num_persistent
    self.q_proj = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
    self.k_proj = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
    self.v_proj = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
    self.o_proj = dense(d_model, d_model, axes=("heads", "embed"), rngs=rngs)
    kp, vp = jax.random.split(rngs.params())
    shape = (max(num_persistent, 1), num_heads, self.d)
    self.persistent_k = nnx.Param(jax.random.normal(kp, shape) * 0.02, logical_axes=(None, None, None))
    self.persistent_v = nnx.Param(jax.random.normal(vp, shape) * 0.02, logical_axes=(None, None, None))
    self.cache_k = self.cache_v = self.cache_index = nnx.data(None)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> None:
    shape = (batch_size, max_len, self.h, self.d)
    self.cache_k = nnx.Cache(jnp.zeros(shape, dtype))
    self.cache_v = nnx.Cache(jnp.zeros(shape, dtype))
    self.cache_index = nnx.Cache(jnp.zeros((), jnp.int32))

  def attend(self, q, k, v, mask, q_plain=None):
    """Softmax over `[persistent K/V | k, v]`: `q [B, T, H, d]` (RoPE-rotated), `k, v [B, S, H, d]`,
    `mask [B or 1, 1, T, S]` (True = visible). The persistent keys carry no position, so they are
    scored against the unrotated query `q_plain` (default `q`): their logits do not depend on
    where the query sits (a packed segment at offset 7 scores them as at offset 0)."""
    if not self.np:
      return dot_product_attention(q, k, v, mask=mask)
    q_plain = q if q_plain is None else q_plain
    scale = self.d ** -0.5
    f32 = lambda y: y.astype(jnp.float32)
    lp = jnp.einsum("bthd,phd->bhtp", f32(q_plain), f32(self.persistent_k[...])) * scale
    lx = jnp.einsum("bthd,bshd->bhts", f32(q), f32(k)) * scale
    lx = jnp.where(mask, lx, -jnp.inf)
    logits = jnp.concatenate([lp, lx], -1)
    w = jax.nn.softmax(logits, axis=-1)        # persistent keys are always visible: no empty row
    o = (jnp.einsum("bhtp,phd->bthd", w[..., :self.np], f32(self.persistent_v[...]))
         + jnp.einsum("bhts,bshd->bthd", w[..., self.np:], f32(v)))
    return o.astype(q.dtype)

  def heads(self, x, *, segment_ids=None, decode=False):
    b, t, _ = x.shape
    hd = lambda y: y.reshape(b, t, self.h, self.d)
    q, k, v = hd(self.q_proj(x)), hd(self.k_proj(x)), hd(self.v_proj(x))
    if decode:
      if self.cache_k is None:
        raise ValueError("PersistentSWA: call init_cache(batch_size, max_len) before decode=True")
      start = self.cache_index[...]
      pos = start + jnp.arange(t)
      q0 = q
      q, k = apply_rope(q, pos), apply_rope(k, pos)
      self.cache_k[...] = jax.lax.dynamic_update_slice_in_dim(self.cache_k[...], k.astype(self.cache_k.dtype), start, 1)
      self.cache_v[...] = jax.lax.dynamic_update_slice_in_dim(self.cache_v[...], v.astype(self.cache_v.dtype), start, 1)
      self.cache_index[...] = start + t
      kpos = jnp.arange(self.cache_k.shape[1])
      mask = (kpos[None, :] <= pos[:, None]) & (kpos[None, :] >= pos[:, None] - self.window)
      return self.attend(q, self.cache_k[...].astype(q.dtype), self.cache_v[...].astype(q.dtype),
                         mask[None, None], q0)
    pos = jnp.arange(t)
    q0 = q
    q, k = apply_rope(q, pos), apply_rope(k, pos)
    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= pos[:, None] - self.window)
    mask = mask[None, None]
    if segment_ids is not None:
      mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return self.attend(q, k, v, mask, q0)

  def __call__(self, x, *, segment_ids=None, decode=False):
    b, t, _ = x.shape
    return self.o_proj(self.heads(x, segment_ids=segment_ids, decode=decode).reshape(b, t, -1))


_MEMORY_OPTIONS = ("memory", "loss", "p", "huber_delta", "retention", "q", "expansion", "chunk_size",
                   "form", "max_lr", "momentum", "retain_bias")


def _split_options(name: str, options: dict[str, Any], allowed: tuple[str, ...]):
  mem = {k: options.pop(k) for k in list(options) if k in _MEMORY_OPTIONS}
  other = {k: options.pop(k) for k in list(options) if k in allowed}
  if options:
    raise ValueError(f"mixer {name!r}: unknown options {sorted(options)}")
  return mem, other


class TitansMAG(nnx.Module):
  """Memory as a gate: `o = W_o(RMSNorm(SWA(x)) (.) sigmoid(RMSNorm(M(x))))` per head.

  The paper combines the two branches with "normalisation with learnable vector-valued weights
  followed by a non-linearity"; we read that as RMSNorm (learned scale) on each branch and a
  sigmoid on the memory branch, which gates the attention branch.
  """

  def __init__(self, d_model, num_heads, *, window: int = 16, num_persistent: int = 4,
               rngs: nnx.Rngs, **memory_options):
    self.h, self.d = num_heads, d_model // num_heads
    self.memory = NeuralMemory(d_model, num_heads, rngs=rngs, **memory_options)
    self.attn = PersistentSWA(d_model, num_heads, window=window, num_persistent=num_persistent, rngs=rngs)
    self.attn_norm = RMSNorm(self.d, axis_name="head_dim")
    self.mem_norm = RMSNorm(self.d, axis_name="head_dim")
    self.o_proj = dense(d_model, d_model, axes=("heads", "embed"), rngs=rngs)

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    self.memory.init_cache(batch_size, max_len, dtype)
    self.attn.init_cache(batch_size, max_len, dtype)

  def __call__(self, x, *, segment_ids=None, decode=False):
    b, t, _ = x.shape
    a = self.attn.heads(x, segment_ids=segment_ids, decode=decode)
    m = self.memory.memory_heads(x, segment_ids=segment_ids, decode=decode)
    y = self.attn_norm(a) * jax.nn.sigmoid(self.mem_norm(m).astype(jnp.float32)).astype(a.dtype)
    return self.o_proj(y.reshape(b, t, self.h * self.d))


class TitansMAL(nnx.Module):
  """Memory as a layer: `o = SWA(M(x))` (the memory layer, then sliding-window attention with
  persistent keys/values)."""

  def __init__(self, d_model, num_heads, *, window: int = 16, num_persistent: int = 4,
               rngs: nnx.Rngs, **memory_options):
    self.memory = NeuralMemory(d_model, num_heads, rngs=rngs, **memory_options)
    self.attn = PersistentSWA(d_model, num_heads, window=window, num_persistent=num_persistent, rngs=rngs)

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    self.memory.init_cache(batch_size, max_len, dtype)
    self.attn.init_cache(batch_size, max_len, dtype)

  def __call__(self, x, *, segment_ids=None, decode=False):
    h = self.memory(x, segment_ids=segment_ids, decode=decode)
    return self.attn(h, segment_ids=segment_ids, decode=decode)


class TitansMAC(nnx.Module, _Cached):
  """Memory as context, segment by segment (segments of `segment_len` tokens).

  For segment s with memory state `M_{s-1}`: retrieve `h_i = M*_{s-1}(q_i)` (a read without
  update, `q_i` the memory's query of token i) and project it to tokens `W_h h`; attend from the
  segment's tokens over `[persistent K/V | h tokens | segment tokens]`, causally (query i sees
  `h_j` and `x_j` for j <= i: `h_j` is computed from token j, so seeing j > i would read the
  future); `y = ` the attention output (`W_y`); update the memory with `y` (one pass of the
  memory over the segment from `M_{s-1}`, giving `M_s`) and read it per token; output
  `W_o(RMSNorm(y) (.) sigmoid(RMSNorm(M(y))))` (the MAG gate). `segment_len` must be a multiple
  of the memory's `chunk_size` (default: equal), so each segment starts at a chunk boundary.
  RoPE positions restart at every segment (the attention never looks across one).

  The full forward scans the whole segments (`lax.scan`) and runs the ragged tail after them;
  packed `segment_ids` are not supported (the segment grid is absolute).

  Decoding (`init_cache`, then `decode=True` with any number of tokens) is exact and needs
  O(segment_len) state, independent of `max_len`: the read memory `M_{s-1}` (the accumulator at
  the start of the current segment), the RoPE-rotated keys and the values of the segment's h
  tokens and x tokens so far (`segment_len` slots each; slots past the current position are
  masked, so they need no clearing), the memory state being advanced over the segment's `y`
  (one `neural_memory_step` per token: token i's memory read-out only depends on `y_0..y_i`,
  and the step refreshes the gradient point every `chunk_size` tokens exactly as the chunked
  full forward does) and the position in the segment. When a segment completes, the advanced
  memory becomes the read memory `M_s` and the position returns to 0. A multi-token call
  (prefill) scans these steps over its tokens (`lax.scan`; the token-only projections are
  batched outside it), so it may start and end anywhere in a segment.
  """

  def __init__(self, d_model, num_heads, *, segment_len: int = 16, num_persistent: int = 4,
               rngs: nnx.Rngs, **memory_options):
    memory_options.setdefault("chunk_size", segment_len)
    if segment_len < 1 or segment_len % memory_options["chunk_size"]:
      raise ValueError(f"segment_len={segment_len} must be >= 1 and a multiple of chunk_size="
                       f"{memory_options['chunk_size']}")
    self.h, self.d, self.segment_len = num_heads, d_model // num_heads, segment_len
    self.memory = NeuralMemory(d_model, num_heads, rngs=rngs, **memory_options)
    self.attn = PersistentSWA(d_model, num_heads, window=segment_len, num_persistent=num_persistent,
                              rngs=rngs)
    self.h_proj = dense(d_model, d_model, axes=("heads", "embed"), rngs=rngs)
    self.y_proj = dense(d_model, d_model, axes=("heads", "embed"), rngs=rngs)
    self.attn_norm = RMSNorm(self.d, axis_name="head_dim")
    self.mem_norm = RMSNorm(self.d, axis_name="head_dim")
    self.o_proj = dense(d_model, d_model, axes=("heads", "embed"), rngs=rngs)
    self.state = nnx.data(None)

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    """Decode state for `batch_size` rows. `max_len` is not needed: the state is O(segment_len)."""
    del max_len
    mem = tops.init_memory_state(self.memory._memory0(), batch_size)
    kv = jnp.zeros((batch_size, 2 * self.segment_len, self.h, self.d), dtype)
    # read: M_{s-1}; k, v: [h-token slots | x-token slots] of the current segment; mem: the
    # memory advanced over the segment's y so far; pos: tokens of the current segment so far.
    self.state = nnx.Cache(dict(read=mem.memory, mem=mem, k=kv, v=kv,
                                pos=jnp.zeros((), jnp.int32)))

  def _gate_out(self, y, m):
    """`W_o(RMSNorm(y) (.) sigmoid(RMSNorm(m)))`: `y [B, T, d_model]`, `m [B, T, H, d]`."""
    b, t, _ = y.shape
    out = (self.attn_norm(y.reshape(b, t, self.h, self.d))
           * jax.nn.sigmoid(self.mem_norm(m).astype(jnp.float32)).astype(y.dtype))
    return self.o_proj(out.reshape(b, t, -1))

  def _segment(self, xs, state):
    b, s, _ = xs.shape
    hd = lambda y: y.reshape(b, s, self.h, self.d)
    mq, *_ = self.memory.project(xs)
    h = tops.memory_read(self.memory.spec, state.memory, mq)          # M*_{s-1}(q), no update
    h_tok = self.h_proj(h.reshape(b, s, -1))
    a = self.attn
    pos = jnp.arange(s)
    q0 = hd(a.q_proj(xs))
    q = apply_rope(q0, pos)
    k = jnp.concatenate([apply_rope(hd(a.k_proj(h_tok)), pos), apply_rope(hd(a.k_proj(xs)), pos)], 1)
    v = jnp.concatenate([hd(a.v_proj(h_tok)), hd(a.v_proj(xs))], 1)
    causal = pos[None, :] <= pos[:, None]
    mask = jnp.concatenate([causal, causal], -1)[None, None]
    y = self.y_proj(a.attend(q, k, v, mask, q0).reshape(b, s, -1))
    m, state = self.memory.run(y, initial_state=state)
    return self._gate_out(y, m), state

  def _decode(self, x):
    """`x [B, T, d_model]` continuing the cached state -> `[B, T, d_model]` (see the class docstring)."""
    st = self._state()
    b, t, _ = x.shape
    n, a, mem = self.segment_len, self.attn, self.memory
    if st["k"].shape[0] != b:
      raise ValueError(f"titans_mac: x has batch {b} but the cache was made for {st['k'].shape[0]}")
    hd = lambda y: y.reshape(y.shape[0], y.shape[1], self.h, self.d)
    # Everything that depends on the token alone, for all T tokens at once (RoPE at the position
    # within the segment, which wraps at segment boundaries).
    pos = (st["pos"] + jnp.arange(t)) % n
    mq, *_ = mem.project(x)
    q0 = hd(a.q_proj(x))
    q = apply_rope(q0, pos)
    kx = apply_rope(hd(a.k_proj(x)), pos)
    vx = hd(a.v_proj(x))
    slots = jnp.arange(n)
    cdt = st["k"].dtype

    def step(carry, xs):
      read, mstate, kc, vc, p = carry
      mq_t, q0_t, q_t, kx_t, vx_t = (y[:, None] for y in xs)          # [B, 1, H, d]
      h = tops.memory_read(mem.spec, read, mq_t)                        # M*_{s-1}(q_t)
      h_tok = self.h_proj(h.reshape(b, 1, -1))
      kh_t = apply_rope(hd(a.k_proj(h_tok)), p[None])
      vh_t = hd(a.v_proj(h_tok))
      put = lambda buf, y, at: jax.lax.dynamic_update_slice_in_dim(buf, y.astype(cdt), at, 1)
      kc = put(put(kc, kh_t, p), kx_t, n + p)
      vc = put(put(vc, vh_t, p), vx_t, n + p)
      vis = slots <= p                                                  # this segment's tokens <= t
      mask = jnp.concatenate([vis, vis])[None, None, None]
      y = self.y_proj(a.attend(q_t, kc.astype(q_t.dtype), vc.astype(q_t.dtype), mask, q0_t)
                      .reshape(b, 1, -1))
      yq, yk, yv, th, lg, lm = mem.project(y)
      m, mstate = tops.neural_memory_step(yq[:, 0], yk[:, 0], yv[:, 0], th[:, 0], mstate,
                                          log_retain_t=lg[:, 0],
                                          log_momentum_t=None if lm is None else lm[:, 0],
                                          spec=mem.spec, chunk_size=mem.chunk_size)
      o = self._gate_out(y, m[:, None])[:, 0]
      # Segment complete: M_s (the memory after the segment's last y) becomes the read memory.
      p = p + 1
      done = p == n
      read = tuple(jnp.where(done, w, r) for w, r in zip(mstate.memory, read))
      return (read, mstate, kc, vc, jnp.where(done, 0, p)), o

    carry = (st["read"], st["mem"], st["k"], st["v"], st["pos"])
    tok = lambda y: jnp.moveaxis(y, 1, 0)
    carry, o = jax.lax.scan(step, carry, (tok(mq), tok(q0), tok(q), tok(kx), tok(vx)))
    read, mstate, kc, vc, p = carry
    self.state.set_value(dict(read=read, mem=mstate, k=kc, v=vc, pos=p))
    return jnp.moveaxis(o, 0, 1).astype(x.dtype)

  def __call__(self, x, *, segment_ids=None, decode=False):
    if x.ndim != 3:
      raise ValueError(f"x must be [B, T, d_model], got shape {x.shape}")
    if segment_ids is not None:
      raise NotImplementedError("titans_mac: packed segment_ids are not supported (segments of "
                                "the memory-as-context loop are absolute)")
    if decode:
      return self._decode(x)
    b, t, d = x.shape
    n = self.segment_len
    state = tops.init_memory_state(self.memory._memory0(), b)
    full = t // n
    outs = []
    if full:
      # The whole segments in a scan (one trace however long the sequence), the ragged tail after.
      xs = jnp.moveaxis(x[:, :full * n].reshape(b, full, n, d), 1, 0)
      state, o = jax.lax.scan(lambda st, xs_: self._segment(xs_, st)[::-1], state, xs)
      outs.append(jnp.moveaxis(o, 0, 1).reshape(b, full * n, -1))
    if t % n:
      outs.append(self._segment(x[:, full * n:], state)[0])
    return jnp.concatenate(outs, 1) if len(outs) > 1 else outs[0]


# ----------------------------------------------------------------------------------------------
# Registry entries.


def _causal_only(name, causal):
  if not causal:
    raise PatternUndefinedError(f"{name}: Titans' memory is a causal recurrence (causal=True only)")


@register_mixer("titans_memory", "Titans neural memory (test-time GD with momentum + forget gate; Miras loss/retention options).")
def _build_memory(*, d_model, num_heads, causal, rngs, **options):
  _causal_only("titans_memory", causal)
  mem, _ = _split_options("titans_memory", options, ())
  return NeuralMemory(d_model, num_heads, rngs=rngs, **mem)


@register_mixer("titans_mag", "Titans MAG: sliding-window attention (persistent K/V) gated by the neural memory.")
def _build_mag(*, d_model, num_heads, causal, rngs, **options):
  _causal_only("titans_mag", causal)
  mem, other = _split_options("titans_mag", options, ("window", "num_persistent"))
  return TitansMAG(d_model, num_heads, rngs=rngs, **other, **mem)


@register_mixer("titans_mal", "Titans MAL: neural memory layer, then sliding-window attention (persistent K/V).")
def _build_mal(*, d_model, num_heads, causal, rngs, **options):
  _causal_only("titans_mal", causal)
  mem, other = _split_options("titans_mal", options, ("window", "num_persistent"))
  return TitansMAL(d_model, num_heads, rngs=rngs, **other, **mem)


@register_mixer("titans_mac", "Titans MAC: segment attention over [persistent, retrieved memory, segment], memory updated with the output.")
def _build_mac(*, d_model, num_heads, causal, rngs, **options):
  _causal_only("titans_mac", causal)
  mem, other = _split_options("titans_mac", options, ("segment_len", "num_persistent"))
  return TitansMAC(d_model, num_heads, rngs=rngs, **other, **mem)
