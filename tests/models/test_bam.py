"""BAM (Branch-Attend-Mix; Zhang et al., 2024, arXiv 2408.08274) against an independent oracle.

Oracle: a float64 NumPy transcription of the paper's layer, token by token: the parallel block
`y = x + sum_e softmax(W_a h)_e Attn_e(h) + sum_{e in topk(W_f h)} softmax_topk(W_f h)_e FFN_e(h)`,
`h = RMSNorm(x)`, causal softmax attention with rotate-half RoPE, SwiGLU experts; and the Switch
balance loss `E sum_e f_e P_e` (Fedus et al., 2022, arXiv 2101.03961, eq. 4). Upcycling is checked
against its definition (experts copied, the rest averaged) and through an orbax checkpoint.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnjax.distributed import checkpoint as ckpt
from attnjax.models.bam import BAMLM, ParallelDecoderLM, upcycle, upcycle_from_checkpoints
from experiments.trainer import sum_aux_losses

V, D, H, L, R = 23, 8, 2, 2, 1.5


def _np(p):
  return np.asarray(p[...], np.float64)


def _rms(x, s):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * s


def _rope(x, t):
  d = x.shape[-1]
  ang = t * 10000.0 ** (-np.arange(0, d, 2) / d)
  a, b = x[..., :d // 2], x[..., d // 2:]
  return np.concatenate([a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)], -1)


def _softmax(z):
  z = np.exp(z - z.max())
  return z / z.sum()


def _attn(h, wq, wk, wv, wo):
  T, hd = len(h), D // H
  q = [_rope((h[t] @ wq).reshape(H, hd), t) for t in range(T)]
  k = [_rope((h[t] @ wk).reshape(H, hd), t) for t in range(T)]
  v = [(h[t] @ wv).reshape(H, hd) for t in range(T)]
  out = []
  for t in range(T):
    heads = []
    for hh in range(H):
      p = _softmax(np.array([q[t][hh] @ k[j][hh] for j in range(t + 1)]) / np.sqrt(hd))
      heads.append(sum(p[j] * v[j][hh] for j in range(t + 1)))
    out.append(np.concatenate(heads) @ wo)
  return np.stack(out)


def _ffn(h, g, u, d):
  a = h @ g
  return (a / (1 + np.exp(-a)) * (h @ u)) @ d


def oracle(bam: BAMLM, tokens, top_k):
  """Logits [B, T, V] and the summed Switch losses (times aux_weight) of every layer."""
  emb, outs = _np(bam.embed.embedding), []
  router_logits = [[] for _ in bam.blocks]  # per layer, every token of the batch
  for b in range(tokens.shape[0]):
    x = emb[tokens[b]]
    for layer, blk in enumerate(bam.blocks):
      a, f = blk.attn, blk.moe
      E = len(a.q_proj)
      h = _rms(x, _np(blk.norm.scale))
      kv = lambda e: 0 if len(a.k_proj) == 1 else e  # noqa: E731
      att = [_attn(h, _np(a.q_proj[e].kernel), _np(a.k_proj[kv(e)].kernel), _np(a.v_proj[kv(e)].kernel),
                   _np(a.o_proj[e].kernel)) for e in range(E)]
      pa = [_softmax(h[t] @ _np(a.router.kernel)) for t in range(len(h))]
      moa = np.stack([sum(pa[t][e] * att[e][t] for e in range(E)) for t in range(len(h))])
      moe = []
      for t in range(len(h)):
        lg = h[t] @ _np(f.router.kernel)
        router_logits[layer].append(lg)
        idx = np.argsort(-lg, kind="stable")[:top_k]
        g = _softmax(lg[idx])
        ex = f.experts
        moe.append(sum(gj * _ffn(h[t], *(_np(getattr(ex[int(j)], n).kernel) for n in ("gate", "up", "down")))
                       for gj, j in zip(g, idx)))
      x = x + moa + np.stack(moe)
    outs.append(_rms(x, _np(bam.final_norm.scale)) @ emb.T)
  aux = sum(blk.moe.aux_weight * balance_oracle(np.stack(lg), top_k)
            for blk, lg in zip(bam.blocks, router_logits))
  return np.stack(outs), aux


def balance_oracle(logits, top_k):
  """Switch loss of router logits [N, E]: E * sum_e f_e P_e with f_e = assignments / (N k)."""
  n, e = logits.shape
  probs = np.stack([_softmax(l) for l in logits])
  counts = np.zeros(e)
  for l in logits:
    counts[np.argsort(-l, kind="stable")[:top_k]] += 1
  return e * np.sum(counts / (n * top_k) * probs.mean(0))


def _dense(seed, num_layers=L):
  m = ParallelDecoderLM(vocab_size=V, d_model=D, num_layers=num_layers, num_heads=H, mlp_ratio=R,
                        rngs=nnx.Rngs(seed))
  key = jax.random.key(seed + 100)
  for path, var in nnx.iter_graph(m):  # norm scales away from 1
    if isinstance(var, nnx.Param) and path[-1] == "scale":
      key, sub = jax.random.split(key)
      var[...] = 1.0 + 0.3 * jax.random.normal(sub, var.shape)
  return m


def _randomize_routers(bam, seed):
  key = jax.random.key(seed)
  for path, var in nnx.iter_graph(bam):
    if isinstance(var, nnx.Param) and "router" in path:
      key, sub = jax.random.split(key)
      var[...] = 2.0 * jax.random.normal(sub, var.shape)


_TOKENS = np.random.default_rng(0).integers(0, V, (2, 6)).astype(np.int32)
_call = jax.jit(lambda m, t: m(t))


def test_mixture_of_distinct_experts_matches_the_oracle_and_sows_the_switch_loss():
  bam = upcycle([_dense(1), _dense(2), _dense(3)], top_k=2, aux_weight=0.5, rngs=nnx.Rngs(9))
  _randomize_routers(bam, 4)
  out, inter = jax.jit(lambda m, t: nnx.capture(m, nnx.Intermediate)(t))(bam, _TOKENS)
  want, want_aux = oracle(bam, _TOKENS, 2)
  np.testing.assert_allclose(np.asarray(out), want, atol=2e-4, rtol=2e-4)
  # What the trainer adds to the loss: the per-layer Switch losses.
  np.testing.assert_allclose(float(sum_aux_losses(inter)), want_aux, rtol=1e-5)


@pytest.mark.parametrize("shared_kv", [False, True])
def test_identical_experts_equal_the_dense_model_for_any_router(shared_kv):
  dense = _dense(5, num_layers=1)
  want = np.asarray(_call(dense, _TOKENS))
  one = upcycle([dense], top_k=1, shared_kv=shared_kv, rngs=nnx.Rngs(0))
  _randomize_routers(one, 1)
  np.testing.assert_allclose(np.asarray(_call(one, _TOKENS)), want, atol=1e-5, rtol=1e-5)
  three = upcycle([dense] * 3, top_k=2, shared_kv=shared_kv, rngs=nnx.Rngs(0))
  _randomize_routers(three, 2)
  np.testing.assert_allclose(np.asarray(_call(three, _TOKENS)), want, atol=1e-5, rtol=1e-5)


def test_dense_parallel_model_matches_the_oracle_with_one_expert():
  dense = _dense(6)
  one = upcycle([dense], top_k=1, rngs=nnx.Rngs(0))  # E = 1: softmax weights are exactly 1
  np.testing.assert_allclose(np.asarray(_call(dense, _TOKENS)), oracle(one, _TOKENS, 1)[0], atol=2e-4,
                             rtol=2e-4)


def test_upcycle_averages_the_non_expert_parameters_and_reads_orbax_checkpoints(tmp_path):
  a, b = _dense(7), _dense(8)
  bam = upcycle([a, b], shared_kv=True, rngs=nnx.Rngs(0))
  mean = lambda x, y: (np.asarray(x[...]) + np.asarray(y[...])) / 2  # noqa: E731
  np.testing.assert_allclose(np.asarray(bam.embed.embedding[...]), mean(a.embed.embedding, b.embed.embedding), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(bam.blocks[1].norm.scale[...]),
                             mean(a.blocks[1].norm.scale, b.blocks[1].norm.scale), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(bam.blocks[0].attn.k_proj[0].kernel[...]),
                             mean(a.blocks[0].attn.k_proj.kernel, b.blocks[0].attn.k_proj.kernel), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(bam.blocks[1].moe.experts[1].down.kernel[...]),
                                np.asarray(b.blocks[1].mlp.down.kernel[...]))
  # Written as the trainer writes checkpoints, then upcycled from the directories.
  dirs = []
  for name, m in (("a", a), ("b", b)):
    mngr = ckpt.open_manager(str(tmp_path / name), async_save=False)
    params = nnx.state(m, nnx.Param)
    ckpt.save(mngr, 3, params, optax.adam(1e-3).init(params), {"step": 3})
    ckpt.wait(mngr)
    mngr.close()
    dirs.append(str(tmp_path / name))
  got = upcycle_from_checkpoints(dirs, vocab_size=V, d_model=D, num_layers=L, num_heads=H,
                                 mlp_ratio=R, shared_kv=True, rngs=nnx.Rngs(0))
  for (p, x), (_, y) in zip(nnx.to_flat_state(nnx.state(got, nnx.Param)),
                            nnx.to_flat_state(nnx.state(bam, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(x[...]), np.asarray(y[...]), err_msg=str(p))
  with pytest.raises(ckpt.CheckpointMismatch, match=r"mlp.*has shape \((8, 12|12, 8)\) but the model config gives"):
    upcycle_from_checkpoints(dirs, vocab_size=V, d_model=D, num_layers=L, num_heads=H, mlp_ratio=2.0,
                             rngs=nnx.Rngs(0))  # other sizes than the checkpoints
  # Copies with noise differ from the seed, and from each other.
  noisy = upcycle_from_checkpoints(dirs[:1], copies=2, vocab_size=V, d_model=D, num_layers=L,
                                   num_heads=H, mlp_ratio=R, noise=0.1, rngs=nnx.Rngs(0))
  e0, e1 = (np.asarray(noisy.blocks[0].moe.experts[i].up.kernel[...]) for i in (0, 1))
  assert 0 < np.abs(e0 - np.asarray(a.blocks[0].mlp.up.kernel[...])).max() and np.abs(e0 - e1).max() > 0


def test_bad_top_k_is_named():
  with pytest.raises(ValueError, match=r"top_k must be in \[1, num_experts=2\], got 3"):
    BAMLM(vocab_size=V, d_model=D, num_layers=1, num_heads=H, num_experts=2, top_k=3, rngs=nnx.Rngs(0))
