"""LoLCATs (Zhang et al. 2024, arXiv:2410.10254): linearise a trained softmax `DecoderLM` in two cheap stages.

1. **Attention transfer.** Each softmax layer becomes a `LinearizedAttention` that keeps the
   layer's q/k/v/o projections (copied, frozen; RoPE, QK-norm and GQA as in the teacher) and adds
   learnable Hedgehog feature maps `phi(x) = [softmax(x W), softmax(-x W)]` (one `[H, d, f]` map
   for queries and one for keys, identity-initialised, no bias: the LoLCATs config
   `untied_head_einsum`, `tie_qk_kernels=false`). Only the feature maps train, to match the
   softmax layer's outputs by MSE, each layer fed the teacher's own input to that layer (so layers
   train independently, as in the authors' `distill_attention_xent_mse` with `mse_factor` only).
2. **LoRA.** Low-rank adapters `W + (alpha / r) A B` (`A` Gaussian, `B` zero, so training starts
   at the transferred model) on the q/k/v/o projections of the linearised layers; only `A, B`
   train, with the next-token loss (LoLCATs: r = 8, alpha = 16, q/k/v/o).

`linearize_decoder` runs both. The student attention is `attention="linear"` (normalised linear
attention on the feature maps, `attnjax.ops.linear.engine`) or `attention="window"` (the LoLCATs
hybrid: sliding-window softmax over the last `window` keys plus linear attention over the older
ones with a shared normaliser and a learned per-head window factor `sigmoid(w)`, 0.1 at init;
`attnjax.ops.linear.hybrid.window_linear_attention`). Softmax layers with a window, a custom
attention function or an output gate, and other mixers, are copied unchanged.

Trainable subsets are marked by variable type (`FeatureMapParam`, `LoraParam`, both
`nnx.Param` subclasses), so `nnx.split(model, FeatureMapParam, ...)` isolates what a stage trains.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from attnjax.models.decoder import DecoderLM
from attnjax.nn.attention import MultiHeadAttention
from attnjax.ops.linear import feature_maps as fm
from attnjax.ops.linear.engine import init_state, linear_attention, linear_attention_step
from attnjax.ops.rope import apply_rope
from attnjax.ops.softmax import dot_product_attention

ATTENTIONS = ("linear", "window")


class FeatureMapParam(nnx.Param):
  """Parameters trained by attention transfer (Hedgehog maps, window factors)."""


class LoraParam(nnx.Param):
  """Parameters trained by the LoRA stage."""


class LoRALinear(nnx.Module):
  """`y = x W (+ b) + (alpha / r) x A B` around a frozen `nnx.Linear` (`A [in, r]`, `B [r, out]` = 0)."""

  def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
    if rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    self.base = base
    d_in, d_out = base.kernel.shape
    self.lora_a = LoraParam(jax.random.normal(rngs.params(), (d_in, rank)) * d_in ** -0.5)
    self.lora_b = LoraParam(jnp.zeros((rank, d_out)))
    self.scaling = alpha / rank

  def __call__(self, x):
    return self.base(x) + self.scaling * ((x @ self.lora_a[...].astype(x.dtype)) @ self.lora_b[...].astype(x.dtype))


def convertible(mixer) -> bool:
  """Whether `mixer` is a plain softmax `MultiHeadAttention` that LoLCATs converts."""
  return (type(mixer) is MultiHeadAttention and mixer.attn_fn is dot_product_attention
          and mixer.window is None and mixer.gate_proj is None and mixer.causal
          and not mixer.attn_options)


class LinearizedAttention(nnx.Module):
  """The LoLCATs student of one softmax `MultiHeadAttention` (see the module docstring).

  `__call__(x [B, T, d_model], *, segment_ids, decode) -> [B, T, d_model]`; `scores(x)` returns
  the rotated `(q, k, v, phi_q, phi_k)` per head. Decoding: `init_cache`, then prefill + steps.
  """

  def __init__(self, teacher: MultiHeadAttention, *, attention: str = "linear", window: int = 64,
               feature_dim: int | None = None, window_factor_init: float = -2.197, rngs: nnx.Rngs):
    if not convertible(teacher):
      raise ValueError("LinearizedAttention converts a causal softmax MultiHeadAttention without "
                       "window, custom attn_fn, attn_options or output gate")
    if attention not in ATTENTIONS:
      raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    if attention == "window" and window < 1:
      raise ValueError(f"window must be >= 1, got {window}")
    self.h, self.hk, self.d = teacher.num_heads, teacher.num_kv_heads, teacher.head_dim
    self.rope, self.rope_base = teacher.rope, teacher.rope_base
    self.attention, self.window = attention, window
    # Copies: the student owns its projections (frozen by the training stages' filters).
    self.q_proj, self.k_proj = nnx.clone(teacher.q_proj), nnx.clone(teacher.k_proj)
    self.v_proj, self.o_proj = nnx.clone(teacher.v_proj), nnx.clone(teacher.o_proj)
    self.q_norm = nnx.clone(teacher.q_norm) if teacher.q_norm is not None else None
    self.k_norm = nnx.clone(teacher.k_norm) if teacher.k_norm is not None else None
    f = self.d if feature_dim is None else feature_dim
    eye = jnp.eye(self.d, f)
    self.phi_q = FeatureMapParam(jnp.broadcast_to(eye, (self.h, self.d, f)))
    self.phi_k = FeatureMapParam(jnp.broadcast_to(eye, (self.h, self.d, f)))
    self.feature_dim = 2 * f
    self.window_logit = FeatureMapParam(jnp.full((self.h,), window_factor_init))
    self.state = self.index = nnx.data(None)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> None:
    del max_len, dtype
    self.index = nnx.Cache(jnp.zeros((), jnp.int32))
    if self.attention == "linear":
      self.state = nnx.Cache(init_state(batch_size, self.h, self.feature_dim, self.d, normalize=True))
    else:
      from attnjax.ops.linear.hybrid import window_linear_init_cache
      self.state = nnx.Cache(window_linear_init_cache(batch_size, self.window, self.h, self.d,
                                                      self.feature_dim, self.d))

  def scores(self, x, positions):
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.h, self.d)
    k = self.k_proj(x).reshape(b, t, self.hk, self.d)
    v = self.v_proj(x).reshape(b, t, self.hk, self.d)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.rope:
      q, k = apply_rope(q, positions, base=self.rope_base), apply_rope(k, positions, base=self.rope_base)
    if self.hk != self.h:   # GQA: each query head reads its group's key/value head
      k, v = jnp.repeat(k, self.h // self.hk, axis=2), jnp.repeat(v, self.h // self.hk, axis=2)
    return q, k, v, fm.hedgehog(q, self.phi_q[...]), fm.hedgehog(k, self.phi_k[...])

  def __call__(self, x, *, segment_ids=None, decode=False):
    if x.ndim != 3:
      raise ValueError(f"x must be [B, T, d_model], got shape {x.shape}")
    b, t, _ = x.shape
    start = 0
    if decode:
      if self.state is None:
        raise ValueError("LinearizedAttention: call init_cache(batch_size, max_len) before decode=True")
      start = self.index[...]
      self.index[...] = start + t
    q, k, v, pq, pk = self.scores(x, start + jnp.arange(t))
    if self.attention == "linear":
      o = self._linear(pq, pk, v, segment_ids, decode)
    else:
      o = self._window(q, k, v, pq, pk, segment_ids, decode)
    return self.o_proj(o.reshape(b, t, self.h * self.d))

  def _linear(self, pq, pk, v, segment_ids, decode):
    if not decode:
      return linear_attention(pq, pk, v, normalize=True, segment_ids=segment_ids)[0]
    state = self.state.get_value()
    if pq.shape[1] == 1:
      o, state = linear_attention_step(pq[:, 0], pk[:, 0], v[:, 0], state, normalize=True)
      o = o[:, None]
    else:
      o, state = linear_attention(pq, pk, v, normalize=True, initial_state=state, output_final_state=True)
    self.state.set_value(state)
    return o

  def _window(self, q, k, v, pq, pk, segment_ids, decode):
    from attnjax.ops.linear.hybrid import window_linear_attention, window_linear_step
    wf = jax.nn.sigmoid(self.window_logit[...])
    if not decode:
      return window_linear_attention(q, k, v, pq, pk, window=self.window, window_factor=wf,
                                     segment_ids=segment_ids)
    mv = lambda y: jnp.moveaxis(y, 1, 0)

    def step(cache, xs):
      o, cache = window_linear_step(*xs, cache, window_factor=wf)
      return cache, o

    cache, o = jax.lax.scan(step, self.state.get_value(), tuple(map(mv, (q, k, v, pq, pk))))
    self.state.set_value(cache)
    return mv(o)


# ----------------------------------------------------------------------------------------------
# Conversion and the two training stages.


def linearized_layers(lm: DecoderLM) -> list[int]:
  """Indices of the blocks whose mixer is a `LinearizedAttention`."""
  return [i for i, blk in enumerate(lm.blocks) if isinstance(blk.mixer, LinearizedAttention)]


def convert_decoder(trained_lm: DecoderLM, *, attention: str = "linear", window: int = 64,
                    feature_dim: int | None = None, rngs: nnx.Rngs | None = None) -> DecoderLM:
  """A copy of `trained_lm` whose softmax layers are `LinearizedAttention` students (untrained maps)."""
  if not isinstance(trained_lm, DecoderLM):
    raise ValueError(f"trained_lm must be a DecoderLM, got {type(trained_lm).__name__}")
  if trained_lm.depth is not None:
    raise ValueError("convert_decoder: AttnRes models (attn_res) are not supported")
  rngs = rngs or nnx.Rngs(0)
  student = nnx.clone(trained_lm)
  converted = 0
  for blk, tblk in zip(student.blocks, trained_lm.blocks):
    if convertible(tblk.mixer):
      blk.mixer = LinearizedAttention(tblk.mixer, attention=attention, window=window,
                                      feature_dim=feature_dim, rngs=rngs)
      converted += 1
  if not converted:
    raise ValueError("convert_decoder: the model has no plain softmax attention layer to linearise")
  return student


def _block_inputs(lm: DecoderLM, tokens, segment_ids=None):
  """Per block: the mixer input `conv(norm1(x))` and the mixer output, running `lm` as is."""
  x = lm.embed(tokens)
  if lm.pos is not None:
    x = x + lm.pos[...][: tokens.shape[1]][None]
  ins, outs = [], []
  for blk in lm.blocks:
    h = blk.norm1(x)
    if blk.conv is not None:
      h = blk.conv(h, segment_ids=segment_ids)
    y = blk.mixer(h, segment_ids=segment_ids)
    ins.append(h)
    outs.append(y)
    x = x + y
    if blk.mlp is not None:
      x = x + blk.ffn(x)
  return ins, outs


def transfer_loss(student: DecoderLM, teacher: DecoderLM, tokens, segment_ids=None):
  """Attention-transfer loss: mean over the linearised layers of `MSE(student(h), teacher(h))`,
  `h` the teacher's input to that layer (teacher side gradient-stopped)."""
  layers = linearized_layers(student)
  ins, outs = _block_inputs(teacher, tokens, segment_ids)
  total = 0.0
  for i in layers:
    h, y = jax.lax.stop_gradient(ins[i]), jax.lax.stop_gradient(outs[i])
    total = total + jnp.mean((student.blocks[i].mixer(h, segment_ids=segment_ids) - y) ** 2)
  return total / len(layers)


def next_token_loss(lm: DecoderLM, tokens, segment_ids=None):
  """Mean cross-entropy of predicting `tokens[:, 1:]` from `tokens[:, :-1]`."""
  logits = lm(tokens[:, :-1], segment_ids=None if segment_ids is None else segment_ids[:, :-1])
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:]))


def _train(model, param_type, loss_fn: Callable, batches: Iterable, steps: int, learning_rate: float):
  """Trains only the variables of `param_type` in `model` (in place) with Adam; returns losses."""
  graphdef, trainable, rest = nnx.split(model, param_type, ...)
  opt = optax.adam(learning_rate)
  opt_state = opt.init(trainable)

  @jax.jit
  def step(trainable, opt_state, rest, batch):
    def loss(p):
      return loss_fn(nnx.merge(graphdef, p, rest), batch)
    val, g = jax.value_and_grad(loss)(trainable)
    updates, opt_state = opt.update(g, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, val

  losses = []
  it = iter(batches)
  for _ in range(steps):
    trainable, opt_state, val = step(trainable, opt_state, rest, next(it))
    losses.append(float(val))
  nnx.update(model, trainable)
  return losses


def attention_transfer(student: DecoderLM, teacher: DecoderLM, batches: Iterable, *, steps: int,
                       learning_rate: float = 1e-2) -> list[float]:
  """Stage 1: trains the student's `FeatureMapParam`s (only) on `transfer_loss`; batches are
  `[B, T]` token arrays. Returns the loss per step (LoLCATs: AdamW lr 1e-2)."""
  return _train(student, FeatureMapParam, lambda m, tok: transfer_loss(m, teacher, tok), batches,
                steps, learning_rate)


def add_lora(student: DecoderLM, *, rank: int = 8, alpha: float = 16.0, rngs: nnx.Rngs | None = None):
  """Wraps q/k/v/o of every linearised layer in `LoRALinear` (in place); returns `student`."""
  rngs = rngs or nnx.Rngs(1)
  for i in linearized_layers(student):
    mixer = student.blocks[i].mixer
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      base = getattr(mixer, name)
      if not isinstance(base, LoRALinear):
        setattr(mixer, name, LoRALinear(base, rank, alpha, rngs=rngs))
  return student


def lora_finetune(student: DecoderLM, batches: Iterable, *, steps: int,
                  learning_rate: float = 1e-3) -> list[float]:
  """Stage 2: trains only the `LoraParam`s with the next-token loss; returns the loss per step."""
  return _train(student, LoraParam, next_token_loss, batches, steps, learning_rate)


def linearize_decoder(trained_lm: DecoderLM, batches: Iterable, *, attention: str = "linear",
                      window: int = 64, feature_dim: int | None = None, transfer_steps: int = 100,
                      transfer_lr: float = 1e-2, lora_rank: int = 8, lora_alpha: float = 16.0,
                      lora_steps: int = 100, lora_lr: float = 1e-3, rngs: nnx.Rngs | None = None):
  """Converts a trained softmax `DecoderLM` into a linearised one (LoLCATs, both stages).

  `batches`: an iterable of `[B, T]` int token arrays (used by both stages, in order). Returns
  `(student, {"transfer": losses, "lora": losses})`; `trained_lm` is left unchanged.
  """
  rngs = rngs or nnx.Rngs(0)
  batches = iter(batches)
  student = convert_decoder(trained_lm, attention=attention, window=window, feature_dim=feature_dim,
                            rngs=rngs)
  hist = {"transfer": attention_transfer(student, trained_lm, batches, steps=transfer_steps,
                                         learning_rate=transfer_lr)}
  add_lora(student, rank=lora_rank, alpha=lora_alpha, rngs=rngs)
  hist["lora"] = lora_finetune(student, batches, steps=lora_steps, learning_rate=lora_lr)
  return student, hist
