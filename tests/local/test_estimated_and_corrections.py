"""HyperAttention, SEA, Rectified SpaAttn, Recycled Attention, HyLRA and Flux Attention against
their dense definitions and defining properties (values, and gradients where differentiable).
float32; T = 21 or 23 (not a multiple of any block / chunk size)."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.softmax import dot_product_attention
from attnjax.ops.sparse import corrections as C
from attnjax.ops.sparse import dynamic as D
from attnjax.ops.sparse import estimated as E


def _qkv(t=21, h=4, hk=2, d=8, seed=0, b=1):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, t, h, d)), jax.random.normal(ks[1], (b, t, hk, d)),
          jax.random.normal(ks[2], (b, t, hk, d)))


@functools.partial(jax.jit, static_argnames="causal")
def _full(q, k, v, causal=False):
  return dot_product_attention(q, k, v, causal=causal, implementation="reference")


# Jitted entry points (Python options static): eager op-by-op dispatch dominates on this CPU.
_HYPER_STATIC = ("block_size", "sample_size", "causal", "min_seq_len", "return_lse")
_hyper = jax.jit(E.hyper_attention, static_argnames=_HYPER_STATIC)
_hyper_counts = jax.jit(E.hyper_attention_counts, static_argnames=_HYPER_STATIC[:-1])
_sea = jax.jit(E.sea_attention, static_argnames=("chunk_size", "top_k", "causal"))
_rectified = jax.jit(C.rectified_spaattn, static_argnames=(
    "block", "top_k", "ipar", "gapr", "implementation", "return_row_mass"))
_masked = jax.jit(lambda q, k, v, mask: dot_product_attention(q, k, v, mask=mask,
                                                              implementation="reference"))


def _values_and_grads_match(fast, ref, args, atol=2e-5):
  """One jitted value-and-grad per path (two compiles: this CPU is slow and shared)."""
  w = jax.random.normal(jax.random.key(7), jax.eval_shape(fast, *args).shape)

  def vg(fn):
    def loss(*a):
      o = fn(*a)
      return jnp.sum(w * o), o
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

  ((_, o), g), ((_, o_ref), g_ref) = vg(fast)(*args), vg(ref)(*args)
  np.testing.assert_allclose(o, o_ref, atol=atol)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-4)


PROJ = jax.random.normal(jax.random.key(11), (8, 3))


def _hyper_counts_oracle(q, k, proj, *, block_size, sample_size, key, causal, min_seq_len,
                         query_blocks="rank"):
  """Numpy transcription of insuhan/hyper-attn `models/attention/hyper_attn.py` (`forward`,
  `forward_no_causal_mask`) and `angular_lsh.py` (`AngularLSH.hash`), written as the weight
  `C [B, H, Tq, Tk]` of key j in query i's estimate (the output is softmax(s + log C) over C > 0,
  which is what the lse merges compute). Shares nothing with the implementation but the jax RNG
  protocol for the sampled columns (split(key, 3) per recursion level: top, diagonal, lower-left;
  `randint(key, [B, Hk, m], 0, Tk)` in the sorted key order). One deliberate deviation from the
  authors' padding: the short last key block has no zero-padded keys. `query_blocks="bucket"`
  (not the authors'): query i sees the sorted key block where its own bucket would be inserted."""
  q, k = np.asarray(q), np.asarray(k)
  r = proj.shape[1]
  perm = np.array([0, 1])                                   # _unit_hamming_distance_array
  for n in range(2, r + 1):
    perm = np.concatenate([perm, perm[::-1] + 2 ** (n - 1)])
  lsh = lambda x: perm[((x @ np.asarray(proj)) > 0).astype(int) @ (2 ** np.arange(r))]
  g = q.shape[2] // k.shape[2]

  def no_causal(qs, ks, kk):
    b, nq, h, _ = qs.shape
    nk = ks.shape[1]
    if min_seq_len > nq:                                    # exact attention
      return np.ones((b, h, nq, nk))
    n_blocks = -(-nk // block_size)
    qbs = -(-(-(-nq // block_size) * block_size) // n_blocks)
    samp = None
    if sample_size > 0 and kk is not None and nq > qbs and nk > block_size:
      samp = np.asarray(jax.random.randint(kk, (b, ks.shape[2], sample_size), 0, nk))
    c = np.zeros((b, h, nq, nk))
    for bi in range(b):
      for hi in range(h):
        qi = np.argsort(lsh(qs[bi, :, hi]), kind="stable")
        ki = np.argsort(lsh(ks[bi, :, hi // g]), kind="stable")
        k_sorted = lsh(ks[bi, :, hi // g])[ki]
        for p in range(nq):
          blk = p // qbs
          if query_blocks == "bucket":
            qi = np.arange(nq)
            ins = np.searchsorted(k_sorted, lsh(qs[bi, p:p + 1, hi])[0], side="left")
            blk = min(ins // block_size, n_blocks - 1)
          c[bi, hi, qi[p], ki[blk * block_size:(blk + 1) * block_size]] += 1
          if samp is not None:
            for s in samp[bi, hi // g]:
              if s // block_size != blk:
                c[bi, hi, qi[p], ki[s]] += nk / sample_size
    return c

  def forward(qs, ks, kk, causal):
    n = ks.shape[1]
    if not causal:
      return no_causal(qs, ks, kk)
    if n <= min_seq_len:
      return np.broadcast_to(np.tril(np.ones((n, n))), (qs.shape[0], qs.shape[2], n, n))
    if n % 2:                                                # pad with an all-zero row
      qs, ks = (np.concatenate([a, np.zeros_like(a[:, :1])], 1) for a in (qs, ks))
    m = qs.shape[1] // 2
    kks = (None,) * 3 if kk is None else jax.random.split(kk, 3)
    c = np.zeros((qs.shape[0], qs.shape[2], 2 * m, 2 * m))
    c[..., :m, :m] = forward(qs[:, :m], ks[:, :m], kks[0], True)
    c[..., m:, m:] = forward(qs[:, m:], ks[:, m:], kks[1], True)
    c[..., m:, :m] = no_causal(qs[:, m:], ks[:, :m], kks[2])
    return c[..., :n, :n]

  return forward(q, k, key, causal)


@pytest.mark.parametrize("causal,t,block,qb", [(False, 9, 4, "rank"), (True, 13, 2, "rank"),
                                                (True, 13, 2, "bucket")])
def test_hyper_attention_matches_authors_code(causal, t, block, qb):
  """Causal T=13, min_seq_len=6: padded to 14 -> halves of 7 (> 6: recurse, padded to 8 -> 4 + 4),
  whose lower-left 4 x 4 blocks fall back to exact attention (4 < min_seq_len) as the authors'
  code does; the 7 x 7 lower-left block is estimated."""
  q, k, v = _qkv(t)
  kw = dict(block_size=block, sample_size=3, key=jax.random.key(3), causal=causal, min_seq_len=6,
            query_blocks=qb)
  c = _hyper_counts_oracle(q, k, PROJ, **kw)
  mask, bias = jnp.asarray(c > 0), jnp.asarray(np.log(np.where(c > 0, c, 1.0)), jnp.float32)
  fast = lambda q, k, v: E.hyper_attention(q, k, v, PROJ, **kw)
  ref = lambda q, k, v: dot_product_attention(q, k, v, mask=mask, bias=bias,
                                              implementation="reference")
  if qb == "rank":
    _values_and_grads_match(fast, ref, (q, k, v))
  else:                                             # same recursion: values suffice
    np.testing.assert_allclose(jax.jit(fast)(q, k, v), jax.jit(ref)(q, k, v), atol=2e-5)
  if causal:
    assert not np.triu(c[0, 0], 1).any()            # recursion never reads the future
    assert (c[0, :, 11:13, 7:11] == 1).all()        # a lower-left 4 x 4 quarter is exact
    # Routing: the authors' rank partition lets a later token move an earlier query's block;
    # "bucket" does not (cut at 10, inside a block).
    q2, k2 = (a.at[:, 10:].set(jax.random.normal(jax.random.key(8), a[:, 10:].shape)) for a in (q, k))
    c2 = _hyper_counts_oracle(q2, k2, PROJ, **kw)
    assert (np.array_equal(c[..., :10, :], c2[..., :10, :])) == (qb == "bucket")


def test_hyper_attention_oracles():
  q, k, v = _qkv(13)
  for causal in (False, True):   # one block covering the sequence: exact attention
    o = _hyper(q, k, v, PROJ, block_size=32, sample_size=5, key=jax.random.key(0),
               causal=causal, min_seq_len=2)
    np.testing.assert_allclose(o, _full(q, k, v, causal), atol=2e-5)
  # The sampled residual is unbiased: E[exp(lse)] equals the full normaliser.
  _, lse_full = jax.jit(lambda q, k, v: dot_product_attention(
      q, k, v, return_lse=True, implementation="reference"))(q, k, v)
  est = jax.jit(jax.vmap(lambda key: jnp.exp(E.hyper_attention(
      q, k, v, PROJ, block_size=4, sample_size=6, key=key, min_seq_len=2, return_lse=True)[1])))(
          jax.random.split(jax.random.key(5), 400))
  np.testing.assert_allclose(est.mean(0), jnp.exp(lse_full), rtol=0.12)
  with pytest.raises(ValueError, match="block_size"):
    E.hyper_attention(q, k, v, PROJ, block_size=0)
  with pytest.raises(ValueError, match="proj"):
    E.angular_lsh_hash(q, PROJ[:4])


@pytest.mark.parametrize("causal", [False, True])
def test_sea_equals_dense_definition_and_oracles(causal):
  q, k, v = _qkv(23)
  proj = jax.random.normal(jax.random.key(2), (8, 64))
  kw = dict(chunk_size=4, top_k=2, causal=causal)
  fast = lambda q, k, v: E.sea_attention(q, k, v, proj, **kw)
  # Definition, built independently: estimate -> top-k chunks -> token mask (-> causal).
  est = np.asarray(jax.jit(E.sea_estimate, static_argnames="chunk_size")(
      q, k, proj, chunk_size=4))                                         # [B, H, T, 6]
  mask = np.zeros((1, 4, 23, 23), bool)
  for h in range(4):
    for i in range(23):
      score = est[0, h, i].copy()
      if causal:
        score[i // 4 + 1:] = -np.inf
        score[i // 4] = np.inf
      for c in np.argsort(-score, kind="stable")[:2]:
        if score[c] > -np.inf:
          mask[0, h, i, c * 4:(c + 1) * 4] = True
  if causal:
    mask &= np.tril(np.ones((23, 23), bool))
  ref = lambda q, k, v: dot_product_attention(q, k, v, mask=jnp.asarray(mask),
                                              implementation="reference")
  _values_and_grads_match(fast, ref, (q, k, v))
  sel = jax.jit(E.sea_selection, static_argnames=("chunk_size", "top_k", "tk", "causal"))(
      jnp.asarray(est), chunk_size=4, top_k=2, tk=23, causal=False)
  assert (np.asarray(sel).sum(-1) == 2).all()                            # exactly k per row
  np.testing.assert_allclose(_sea(q, k, v, proj, chunk_size=4, top_k=6, causal=causal),
                             _full(q, k, v, causal), atol=2e-5)          # k = all chunks: exact


def test_sea_estimate_tracks_true_compressed_attention_and_distillation():
  q, k, _ = _qkv(24, h=2, hk=2, seed=4)
  proj = jax.random.normal(jax.random.key(9), (8, 1024))
  est = np.asarray(E.sea_estimate(q, k, proj, chunk_size=4))
  p = np.asarray(jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * 8 ** -0.5, -1))
  true = p.reshape(1, 2, 24, 6, 4).sum(-1)
  assert np.corrcoef(est.ravel(), true.ravel())[0, 1] > 0.6   # a wrong estimator gives ~0
  loss = float(E.sea_distillation_loss(q, k, proj, chunk_size=4))
  bad = float(E.sea_distillation_loss(q, k, proj * 0.01, chunk_size=4))   # near-uniform estimate
  assert 0 <= loss < bad
  with pytest.raises(ValueError, match="top_k"):
    E.sea_attention(q, k, k, proj, chunk_size=4, top_k=0)


def test_rectified_spaattn_oracles_and_definition():
  q, k, v = _qkv(23)
  kw = dict(block=4, top_k=2)
  fast = lambda q, k, v: C.rectified_spaattn(q, k, v, **kw)
  ref = lambda q, k, v: C.rectified_spaattn(q, k, v, **kw, implementation="reference")
  _values_and_grads_match(fast, ref, (q, k, v))
  # Every block critical: exact attention.
  np.testing.assert_allclose(_rectified(q, k, v, block=4, top_k=6), _full(q, k, v),
                             atol=2e-5)
  # Block-constant keys and values: pooled estimates are exact, so any selection is exact.
  rep = lambda a: jnp.repeat(a[:, ::4], 4, axis=1)[:, :23]
  kc, vc = rep(k), rep(v)
  o, mass = _rectified(q, kc, vc, block=4, top_k=1, return_row_mass=True)
  np.testing.assert_allclose(o, _full(q, kc, vc), atol=2e-5)
  np.testing.assert_allclose(mass, 1.0, atol=1e-5)
  # Random values: the row mass is in (0, 1]; plain sparse attention is recovered with no correction.
  _, mass = _rectified(q, k, v, block=4, top_k=2, return_row_mass=True)
  assert bool(jnp.all((mass > 0) & (mass <= 1 + 1e-6)))
  plain = _rectified(q, k, v, block=4, top_k=2, ipar=False, gapr=False)
  crit = jax.jit(C.pooled_block_selection, static_argnames=("block", "top_k"))(q, k, block=4,
                                                                               top_k=2)
  tok = np.repeat(np.repeat(np.asarray(crit), 4, 2), 4, 3)[:, :, :23, :23]
  np.testing.assert_allclose(plain, _masked(q, k, v, jnp.asarray(tok)), atol=2e-5)
  with pytest.raises(ValueError, match="implementation"):
    C.rectified_spaattn(q, k, v, block=4, top_k=2, implementation="pallas")


def test_recycled_decode_definition_and_oracles():
  q, k, v = _qkv(21)
  qd = q[:, 13:]                                    # 8 decode steps after a 13-token prompt
  full = _full(qd, k, v, causal=True)
  recycled = jax.jit(C.recycled_decode, static_argnames=("prompt_len", "stride", "top_k"))
  o1, _ = recycled(qd, k, v, prompt_len=13, stride=1, top_k=3)
  np.testing.assert_allclose(o1, full, atol=2e-5)   # S = 1: every step full
  oall, _ = recycled(qd, k, v, prompt_len=13, stride=3, top_k=21)
  np.testing.assert_allclose(oall, full, atol=2e-5)  # K = context: full
  o, is_full = recycled(qd, k, v, prompt_len=13, stride=3, top_k=4)
  assert list(np.asarray(is_full)) == [True, False, False, True, False, False, True, False]
  @functools.partial(jax.jit, static_argnames=("pos", "last"))
  def step_ref(q, k, v, pos, last):
    if pos == last:                                 # full step
      return _full(q[:, pos:pos + 1], k[:, :pos + 1], v[:, :pos + 1])
    # recycled: recorded top-4 + keys after `last`
    idx = D.topk_key_indices(q[:, last:last + 1], k[:, :last + 1], 4)
    return D.attend_to_indices(q[:, pos:pos + 1], k[:, :pos + 1], v[:, :pos + 1], idx,
                               recent_from=last + 1)

  for n in range(8):                                # step by step, through the gather path
    ref = step_ref(q, k, v, pos=13 + n, last=13 + 3 * (n // 3))
    np.testing.assert_allclose(o[:, n:n + 1], ref, atol=2e-5, err_msg=f"step {n}")
  with pytest.raises(ValueError, match="prompt_len"):
    C.recycled_decode(qd, k, v, prompt_len=12, stride=2, top_k=2)


def test_hylra_policy_dp_and_layers():
  rng = np.random.default_rng(0)
  score = rng.uniform(size=(6, 6))
  for nf in (1, 2, 3):
    pol = C.hylra_policy(score, nf)
    assert pol[0] and pol.sum() == nf
    best = max(C.hylra_policy_score(score, (1,) + rest) for rest in
               itertools.product((0, 1), repeat=5) if sum(rest) == nf - 1)
    assert np.isclose(C.hylra_policy_score(score, pol), best)
  q, k, v = _qkv(21)
  hylra = jax.jit(C.hylra_layer, static_argnames=("full", "top_k"))
  o, idx = hylra(q, k, v, full=True, top_k=5)
  np.testing.assert_allclose(o, _full(q, k, v, True), atol=2e-5)
  o2, _ = hylra(q, k, v, full=False, top_k=5, indices=idx)
  mask = jax.jit(D.indices_mask, static_argnums=(1, 2, 3), static_argnames="causal")(
      idx, 21, 21, 4, causal=True)
  np.testing.assert_allclose(o2, _masked(q, k, v, mask), atol=2e-5)
  # A reuse layer hands back the very indices it was given (object identity needs the eager call).
  assert C.hylra_layer(q, k, v, full=False, top_k=5, indices=idx)[1] is idx
  _, every = hylra(q, k, v, full=True, top_k=21)
  np.testing.assert_allclose(hylra(q, k, v, full=False, top_k=21, indices=every)[0],
                             _full(q, k, v, True), atol=2e-5)
  with pytest.raises(ValueError, match="indices"):
    C.hylra_layer(q, k, v, full=False, top_k=5)


def test_flux_gate_and_forced_routes():
  q, k, v = _qkv(21)
  sparse = lambda q, k, v, causal, scale: dot_product_attention(q, k, v, causal=causal, scale=scale,
                                                                window=(3, 0))
  ones, zeros = jnp.ones((1,)), jnp.zeros((1,))
  np.testing.assert_array_equal(C.flux_attention(q, k, v, ones, sparse_fn=sparse),
                                dot_product_attention(q, k, v, causal=True))
  np.testing.assert_allclose(C.flux_attention(q, k, v, zeros, sparse_fn=sparse),
                             sparse(q, k, v, True, None), atol=1e-6)
  logits = jnp.array([3.0, -3.0, 0.2])
  hard = C.flux_gate(logits, hard=True)
  np.testing.assert_array_equal(hard, [1.0, 0.0, 1.0])
  g = jax.grad(lambda l: C.flux_gate(l, hard=True).sum())(logits)
  np.testing.assert_allclose(g, jax.nn.sigmoid(logits) * (1 - jax.nn.sigmoid(logits)), rtol=1e-5)
  noisy = C.flux_gate(jnp.zeros((4000,)), key=jax.random.key(0))
  assert abs(float(noisy.mean()) - 0.5) < 0.03 and float(noisy.std()) > 0.2
  ctx = C.pooled_context(k, causal=True)
  np.testing.assert_allclose(ctx[:, -1], k.reshape(1, 21, -1).mean(1), atol=1e-6)
  with pytest.raises(ValueError, match="gate"):
    C.flux_attention(q, k, v, jnp.ones((2,)), sparse_fn=sparse)


def _sea_kl_oracle(q, k, proj, chunk, causal):
  """SEA's distillation target, numpy: KL(teacher || student) per query row, averaged; the teacher
  is exact (causal) softmax attention summed over each key chunk, the student the FAVOR+ estimate
  `phi(q) . sum_{j in c} phi(k_j)` (phi(x) = exp(w^T x' - |x'|^2 / 2), x' = x D^-1/4) normalised
  over the chunks holding a visible key."""
  q, k, proj = (np.asarray(a, np.float64) for a in (q, k, proj))
  b, t, h, d = q.shape
  g = h // k.shape[2]
  nc = -(-t // chunk)
  kl = []
  phi = lambda x: np.exp((x * d ** -0.25) @ proj - 0.5 * ((x * d ** -0.25) ** 2).sum(-1)[:, None])
  for bi in range(b):
    for hi in range(h):
      qh, kh = q[bi, :, hi], k[bi, :, hi // g]
      s = qh @ kh.T / np.sqrt(d)
      if causal:
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      fq, fk = phi(qh), phi(kh)
      for i in range(t):
        teacher = np.array([p[i, c * chunk:(c + 1) * chunk].sum() for c in range(nc)])
        est = np.array([fq[i] @ fk[c * chunk:(c + 1) * chunk].sum(0) for c in range(nc)])
        if causal:
          est[np.arange(nc) * chunk > i] = 0
        est /= est.sum()
        m = teacher > 0
        kl.append((teacher[m] * np.log(teacher[m] / est[m])).sum())
  return np.mean(kl)


def test_sea_mixer_trains_its_estimator_by_distillation():
  from flax import nnx
  from attnjax.nn.sparse import SEAAttnFn
  q, k, v = _qkv(10, h=2, hk=1, d=4)
  fn = SEAAttnFn(4, 16, 3, 2, nnx.Rngs(0), distill_weight=0.5)
  gd, params, rest = nnx.split(fn, nnx.Param, ...)

  @jax.jit
  def aux_and_grad(params):
    def loss(params):
      m = nnx.merge(gd, params, rest)
      o, inter = nnx.capture(lambda m: m(q, k, v, causal=True), nnx.Intermediate)(m)
      aux = sum(jnp.sum(l) for p, l in jax.tree_util.tree_leaves_with_path(inter)
                if "aux_loss" in str(p))
      return aux, o
    return jax.value_and_grad(loss, has_aux=True)(params)

  (aux, _), grads = aux_and_grad(params)
  np.testing.assert_allclose(float(aux), 0.5 * _sea_kl_oracle(q, k, params["proj"][...], 3, True),
                             rtol=1e-4)
  # The estimator learns from it: a few gradient steps on proj lower the distillation loss.
  p = params
  for _ in range(5):
    (_, _), g = aux_and_grad(p)
    p = jax.tree.map(lambda a, b: a - 2.0 * b, p, g)
  assert float(aux_and_grad(p)[0][0]) < 0.95 * float(aux)
  fn.eval()                                     # eval mode: nothing is sown
  gd, params, rest = nnx.split(fn, nnx.Param, ...)
  inter = jax.jit(lambda p: nnx.capture(lambda m: m(q, k, v, causal=True), nnx.Intermediate)(
      nnx.merge(gd, p, rest))[1])(params)
  assert not jax.tree.leaves(inter)
