"""Dynamic routers (MoBA, BiFormer BRA), the registered mixers and the two vision backbones."""

import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from attnjax import build_mixer
from attnjax.ops import layout as L
from attnjax.ops.softmax import dot_product_attention
from attnjax.ops.sparse import routing as R


def _qkv(key, shape, h, hk, d):
  ks = jax.random.split(key, 3)
  return (jax.random.normal(ks[0], shape + (h, d)), jax.random.normal(ks[1], shape + (hk, d)),
          jax.random.normal(ks[2], shape + (hk, d)))


def _moba_dense_definition(q, k, chunk, top_k):
  """Numpy MoBA: gate = q . mean(K_chunk); own chunk forced, future chunks excluded; causal."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b, t, h, d = q.shape
  g = h // k.shape[2]
  nc = -(-t // chunk)
  mask = np.zeros((b, h, t, t), bool)
  for bi in range(b):
    for hi in range(h):
      means = np.stack([k[bi, c * chunk:(c + 1) * chunk, hi // g].mean(0) for c in range(nc)])
      for i in range(t):
        score = means @ q[bi, i, hi]
        own = i // chunk
        score[own] = np.inf
        score[own + 1:] = -np.inf
        chosen = [c for c in np.argsort(-score, kind="stable")[:top_k] if score[c] > -np.inf]
        for c in chosen:
          mask[bi, hi, i, c * chunk:(c + 1) * chunk] = True
        mask[bi, hi, i, i + 1:] = False
  return mask


@functools.partial(jax.jit, static_argnames=("impl", "block_q"))
def _moba_out_and_grads(q, k, v, impl, block_q):
  """MoBA output and the gradient of `sum(sin(o))` w.r.t. (q, k, v), in one compiled call."""
  def f(q, k, v):
    o = R.moba_attention(q, k, v, chunk_size=5, top_k=2, block_q=block_q, implementation=impl)
    return jnp.sum(jnp.sin(o)), o
  (_, o), g = jax.value_and_grad(f, (0, 1, 2), has_aux=True)(q, k, v)
  return o, g


@pytest.mark.parametrize("block_q", [1, 4])
def test_moba_matches_numpy_definition_values_and_grads(block_q):
  q, k, v = _qkv(jax.random.PRNGKey(0), (1, 23), 4, 2, 8)
  lay = jax.jit(lambda q, k: R.moba_layout(q, k, chunk_size=5, top_k=2, block_q=block_q))(q, k)
  L.check_layout(lay)
  np.testing.assert_array_equal(np.asarray(L.dense_mask(lay)),
                                _moba_dense_definition(q, k, 5, 2))
  o, g = _moba_out_and_grads(q, k, v, "xla", block_q)
  o_ref, g_ref = _moba_out_and_grads(q, k, v, "reference", block_q)
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=2e-5)
  for a, r in zip(g, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-4)


def test_moba_all_chunks_is_full_attention_and_under_jit():
  q, k, v = _qkv(jax.random.PRNGKey(1), (1, 17), 2, 2, 8)

  @functools.partial(jax.jit, static_argnames="causal")
  def moba_and_full(q, k, v, causal):
    return (R.moba_attention(q, k, v, chunk_size=4, top_k=5, causal=causal),
            dot_product_attention(q, k, v, causal=causal, implementation="reference"))

  for causal in (True, False):
    o, o_full = moba_and_full(q, k, v, causal)
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_full), atol=2e-5)
  with pytest.raises(ValueError, match="chunk_size"):
    R.moba_layout(q, k, chunk_size=0, top_k=1)


def test_bra_routing_shared_by_region_and_full_topk():
  q, k, v = _qkv(jax.random.PRNGKey(2), (2, 8, 8), 2, 2, 8)
  bra = jax.jit(R.bra_attention, static_argnames=("regions", "top_k", "implementation"))
  o = bra(q, k, v, regions=4, top_k=3)
  o_ref = bra(q, k, v, regions=4, top_k=3, implementation="reference")
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=2e-5)
  # Definition check: region-mean affinity top-k, computed independently in numpy.
  qn, kn = np.asarray(q), np.asarray(k)
  qr = qn.reshape(2, 4, 2, 4, 2, -1).mean((2, 4)).reshape(2, 16, -1)
  kr = kn.reshape(2, 4, 2, 4, 2, -1).mean((2, 4)).reshape(2, 16, -1)
  top = np.sort(np.argsort(-np.einsum("brc,bsc->brs", qr, kr), -1)[..., :3], -1)
  routing = jax.jit(R.bra_routing, static_argnames=("regions", "top_k"))
  np.testing.assert_array_equal(np.asarray(routing(q, k, regions=4, top_k=3)), top)
  o_all = bra(q, k, v, regions=4, top_k=16)
  o_full = jax.jit(dot_product_attention, static_argnames="implementation")(
      q.reshape(2, 64, 2, 8), k.reshape(2, 64, 2, 8), v.reshape(2, 64, 2, 8),
      implementation="reference")
  np.testing.assert_allclose(np.asarray(o_all).reshape(2, 64, 2, 8), np.asarray(o_full), atol=2e-5)
  with pytest.raises(ValueError, match="regions"):
    R.bra_attention(q, k, v, regions=3, top_k=1)


MIXERS = ["na1d", "neighborhood", "sliding_window_sparse", "moba", "power_attention",
          "s2_attention"]


@pytest.mark.parametrize("name", MIXERS)
def test_registered_mixers_run_and_respect_causality(name):
  m = build_mixer(name, d_model=16, num_heads=2, causal=True, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 13, 16))
  x2 = x.at[:, 9:].set(1.0)
  fwd = nnx.jit(lambda m, x: m(x))  # x and x2 share one compile
  y = fwd(m, x)
  assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()
  np.testing.assert_allclose(np.asarray(fwd(m, x2)[:, :9]), np.asarray(y[:, :9]), atol=1e-5)


def test_na1d_mixer_decodes_like_full_forward_with_dilation():
  m = build_mixer("na1d", d_model=16, num_heads=2, causal=True, rngs=nnx.Rngs(0), kernel_size=3,
                  dilation=2)
  x = jax.random.normal(jax.random.key(1), (1, 11, 16))
  full = nnx.jit(lambda m, x: m(x))(m, x)
  m.init_cache(1, 16)
  decode = nnx.jit(lambda m, x: m(x, decode=True))  # the one-token steps share one compile
  outs = [decode(m, x[:, :6])] + [decode(m, x[:, t:t + 1]) for t in range(6, 11)]
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=1e-4)


def _train(model, steps, images, labels):
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, y):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  return [float(step(model, opt, images, labels)) for _ in range(steps)]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["nat", "biformer"])
def test_vision_backbones_train_a_few_steps(which):
  images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  labels = jnp.array([0, 1, 2, 1])
  if which == "nat":
    from attnjax.models.nat import NAT
    model = NAT(image_size=16, patch_size=2, num_classes=3, dims=(16, 32), depths=(2, 1),
                heads=(2, 2), kernel_size=3, dilations=(1, 2), rngs=nnx.Rngs(0))
  else:
    from attnjax.models.biformer import BiFormer
    model = BiFormer(image_size=16, patch_size=2, num_classes=3, dims=(16, 32), depths=(2, 1),
                     heads=(2, 2), regions=(4, 2), top_ks=(3, 4), rngs=nnx.Rngs(0))
  losses = _train(model, 6, images, labels)
  assert all(np.isfinite(losses))
  assert losses[-1] < losses[0]


# (name, defined patterns) over (non-causal self, causal self, non-causal cross, causal cross).
_CAB = {"na1d": "SSxx", "sliding_window_sparse": "SSxx", "power_attention": "xSxx",
        "s2_attention": "xSxx", "sink_local_sparse": "xSxx", "strided_sparse": "xSxx",
        "landmark": "xSxx", "radial": "Sxxx", "flux_attention": "SSxx", "hyper_attention": "SSCx",
        "moba": "SSCC", "vmoba": "SSCC", "sea": "SSCC"}


def test_cab_patterns_work_or_raise_pattern_undefined():
  """Each sparse mixer, in the four CAB patterns: an undefined one raises `PatternUndefinedError`
  naming the pattern, never another error; the chunk routers' causal cross call (bottom-right
  aligned) keeps context keys after a query's aligned position from reaching it. (The defined
  self patterns are checked by tests/test_all_mixers.py.)"""
  from attnjax.ops.operators._common import PatternUndefinedError
  x = jax.random.normal(jax.random.key(0), (1, 7, 16))
  ctx = jax.random.normal(jax.random.key(1), (1, 11, 16))
  for name, spec in _CAB.items():
    for (causal, cross), flag in zip(((False, False), (True, False), (False, True), (True, True)),
                                     spec):
      if flag != "x":
        continue
      with pytest.raises(PatternUndefinedError, match="undefined") as err:
        m = build_mixer(name, d_model=16, num_heads=2, causal=causal, rngs=nnx.Rngs(0))
        m(x, context=ctx) if cross else m(x)
      msg = str(err.value)
      assert msg.startswith(name.split("_")[0]) and ("cross" in msg or "causal" in msg), msg
  fwd = nnx.jit(lambda m, x, c: m(x, context=c))
  for name in ("vmoba", "sea"):   # query i sees context keys <= i + 11 - 7
    m = build_mixer(name, d_model=16, num_heads=2, causal=True, rngs=nnx.Rngs(0), chunk_size=3)
    y = fwd(m, x, ctx)
    np.testing.assert_allclose(fwd(m, x, ctx.at[:, 9:].set(3.0))[:, :5], y[:, :5], atol=1e-5,
                               err_msg=name)


def _radial_mask_oracle(video_token_num, num_frame, block_size, decay_factor, model_type):
  """Numpy transcription of mit-han-lab/radial-attention `radial_attn/attn_mask.py`:
  `gen_log_mask_shrinked` with `get_window_width`, `get_diagonal_split_mask` (its hard-coded
  threshold 128, "equal to block-size", is `block_size`) and `shrinkMaskStrict`; s = the token
  count rounded up to whole blocks (no text tokens)."""
  def shrink(mask, bs):
    bn = mask.shape[0] // bs
    m = mask[:bn * bs, :bn * bs].reshape(bn, bs, bn, bs)
    col = m.sum(1) / bs
    frac = (col > 1 / 3).sum(-1) / ((col > 0).sum(-1) + 1e-9)
    return frac > 0.6

  def window_width(i, j, tpf):
    dist = abs(i - j)
    if model_type == "wan":
      if dist < 1:
        return tpf
      if dist == 1:
        return tpf // 2
    elif dist <= 1:
      return tpf
    decay = 2 ** tpf.bit_length() / 2 ** dist.bit_length() * decay_factor
    return decay if decay >= block_size else block_size

  def split_mask(i, j, tpf):
    dist = abs(i - j)
    decay = 2 ** tpf.bit_length() / 2 ** dist.bit_length()
    if decay >= block_size:
      return np.ones((tpf, tpf), bool)
    return np.full((tpf, tpf), dist % int(block_size / decay) == 0)

  s = -(-video_token_num // block_size) * block_size
  final = np.zeros((s // block_size, s // block_size), bool)
  tpf = video_token_num // num_frame
  border = video_token_num // block_size
  cols, rows = np.arange(tpf)[None, :], np.arange(tpf)[:, None]
  final[border:] = True
  final[:, border:] = True
  for i in range(num_frame):
    for j in range(num_frame):
      if j == 0:
        local = np.ones((tpf, tpf), bool)
      else:
        local = (np.abs(cols - rows) <= window_width(i, j, tpf)) & split_mask(i, j, tpf)
      rr, rc = (i * tpf) % block_size, (j * tpf) % block_size
      n_r = rr + ((tpf - 1) // block_size + 1) * block_size
      n_c = rc + ((tpf - 1) // block_size + 1) * block_size
      padded = np.zeros((n_r, n_c), bool)
      padded[rr:rr + tpf, rc:rc + tpf] = local
      bm = shrink(padded, block_size)
      r0, c0 = (i * tpf) // block_size, (j * tpf) // block_size
      tile = final[r0:r0 + bm.shape[0], c0:c0 + bm.shape[1]]
      tile |= bm[:tile.shape[0], :tile.shape[1]]
  return final


@pytest.mark.parametrize("frames,tpf,block,decay,model", [
    (12, 6, 4, 1.0, "hunyuan"), (6, 16, 4, 0.5, "wan"), (5, 5, 4, 1.0, "hunyuan")])
def test_radial_layout_is_the_authors_mask(frames, tpf, block, decay, model):
  from attnjax.ops.sparse import patterns as P
  t = frames * tpf
  want = _radial_mask_oracle(t, frames, block, decay, model)
  lay = P.radial_layout(frames, tpf, block, decay_factor=decay, model_type=model)
  L.check_layout(lay)
  dense = np.kron(want, np.ones((block, block), bool))[:t, :t]
  np.testing.assert_array_equal(np.asarray(L.dense_mask(lay))[0, 0], dense)
  # Only key frame 0 is a sink: query frame 0 does not see every far frame.
  if frames > 6:
    assert dense[:, :tpf].all() and not dense[:tpf].all()


def test_landmark_tokens_inserted_and_decoding_retrieves_blocks():
  """Data: epfml/landmark-attention `data/utils.py` `apply_add_mem_tokens` (transcribed below)
  appends the landmark id after every token whose index % freq == freq - 1. Decoding: a prefill
  then one-token steps equal the full forward with top-1 block retrieval, and a decode query's
  weights vanish on every earlier block except the one whose landmark scores highest."""
  from attnjax.data import landmark as LD
  from attnjax.ops.sparse import dynamic as D
  toks = np.arange(1, 12)

  def add_mem_tokens(tokens, freq, mem_id):
    out = []
    for t_idx, t in enumerate(tokens):
      out.append(t)
      if t_idx % freq == freq - 1:
        out.append(mem_id)
    return np.array(out)

  got = LD.insert_landmarks(np.stack([toks, toks + 20]), 4, 99)
  np.testing.assert_array_equal(got[0], add_mem_tokens(toks, 4, 99))
  np.testing.assert_array_equal(got[1], add_mem_tokens(toks + 20, 4, 99))
  np.testing.assert_array_equal(LD.landmark_slots(got.shape[1], 4), got[0] == 99)
  np.testing.assert_array_equal(LD.landmark_slots(13, 4), D.landmark_positions(13, 4)[0])
  np.testing.assert_array_equal(LD.remove_landmarks(got, 4)[0], toks)

  m = build_mixer("landmark", d_model=16, num_heads=2, causal=True, rngs=nnx.Rngs(0), block=4,
                  top_k=1)
  x = jax.random.normal(jax.random.key(3), (1, 14, 16))
  full = nnx.jit(lambda m, x: m(x))(m, x)
  m.init_cache(1, 16)
  step = nnx.jit(lambda m, x: m(x, decode=True))
  outs = [step(m, x[:, :6])] + [step(m, x[:, t:t + 1]) for t in range(6, 14)]
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=1e-4)
  # Op level, one decode query at position 13 against a 16-slot cache: blocks 0-3 and 5-8 have
  # landmarks 4 and 9; only the better-scoring one's tokens keep weight (top_k=1).
  q, k = jax.random.normal(jax.random.key(4), (2, 1, 16, 2, 8))
  mask = (jnp.arange(16) <= 13)[None, None, None, :]
  w = np.asarray(jax.jit(D.landmark_weights, static_argnums=2, static_argnames="top_k")(
      q[:, 13:14], k, 4, top_k=1, q_pos=jnp.array([13]), key_mask=mask))[0, :, 0]
  s = np.einsum("hd,khd->hk", np.asarray(q[0, 13]), np.asarray(k[0])) * 8 ** -0.5
  for hh in range(2):
    keep, drop = (0, 5) if s[hh, 4] > s[hh, 9] else (5, 0)
    assert (w[hh, drop:drop + 4] == 0).all() and (w[hh, keep:keep + 4] > 0).all()
    assert w[hh, 14:].sum() == 0 and abs(w[hh].sum() - 1) < 1e-5
