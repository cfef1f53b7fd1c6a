"""Every registered mixer, through the registry, in one contract test per mixer: it builds in the
self patterns it declares (`attnjax.registry.mixer_patterns`), has finite gradients, ignores the
future when causal (cut inside a chunk), keeps packed sequences apart, and (where it can decode) decodes like its full
forward. Then the CAB contract over all four patterns: every pattern a mixer does not declare
raises exactly `PatternUndefinedError` naming the mixer and the pattern, and every cross pattern it
declares gives finite `[B, T, d_model]` outputs that read the context, bottom-right aligned causal
for `causal_cross` (query i sees context keys j <= i + S - T, and no later query).

All calls go through `nnx.jit` with one sequence shape `[2, T, D_MODEL]`, so each mixer compiles
its forward once and reuses it: "the same tokens alone" are read off a causal forward whose first
tokens are those tokens (a causal output at i depends on tokens <= i only, which the causality
check verifies first). Compiles, not arithmetic, are what this CPU spends its time on here."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import PatternUndefinedError, build_mixer, list_mixers, mixer_patterns
from attnjax import registry
from attnjax.cab import PATTERNS, pattern_name

D_MODEL, HEADS, T = 32, 2, 12
ALL = sorted(list_mixers())
# Options a mixer cannot be built without (a token MLP over a fixed number of positions).
OPTIONS = {"ninformer": {"seq_len": T}}
@nnx.jit
def _FWD(m, x, seg=None):
  """The forward's output; state a training forward changes (k-means centroids, running
  statistics) is put back, so every call sees the same module (as the trainer's eval step)."""
  before = nnx.state(m)
  y = m(x, segment_ids=seg)
  nnx.update(m, before)
  return y


_FWD_SEG = _FWD
_STEP = nnx.jit(lambda m, x: m(x, decode=True))


class _QKFromX(nnx.Module):
  """For mixers whose queries/keys read the backbone's token embeddings (`qk_input=`, e.g.
  StaticEmbQK): the contract runs them with `qk_input = x`, a per-token input like the real one."""

  def __init__(self, m):
    self.m = m

  def init_cache(self, *args, **kwargs):
    return self.m.init_cache(*args, **kwargs)

  def __call__(self, x, *, segment_ids=None, decode=False):
    return self.m(x, qk_input=x, segment_ids=segment_ids, decode=decode)


def _build(name, causal):
  if pattern_name(causal=causal, cross=False) not in mixer_patterns(name):
    return None                # undeclared: test_undefined_patterns_raise checks that it raises
  m = build_mixer(name, d_model=D_MODEL, num_heads=HEADS, causal=causal, rngs=nnx.Rngs(0),
                  **OPTIONS.get(name, {}))
  return _QKFromX(m) if getattr(m, "needs_qk_input", False) else m


def _check_grads_finite(name, m, x, causal):
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)

  def loss(p, r):   # fresh Variables for r here: a training forward may update buffers in it
    y = nnx.merge(graphdef, p, jax.tree.map(lambda a: a, r))(x)
    return jnp.sum(y ** 2), y

  (val, y), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, rest)
  where = f"{name} (causal={causal})"
  assert y.shape == x.shape, f"{where}: output shape {y.shape} != {x.shape}"
  assert np.isfinite(float(val)), where
  assert all(np.isfinite(np.asarray(l)).all() for l in jax.tree.leaves(g)), f"{where}: non-finite grads"


@pytest.mark.parametrize("name", ALL)
def test_mixer_contract(name):
  ks = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(ks[0], (2, T, D_MODEL))
  non_causal, m = _build(name, False), _build(name, True)
  assert non_causal is not None or m is not None, f"{name} builds in no pattern"
  if non_causal is not None:
    _check_grads_finite(name, non_causal, x, False)
  if m is None:
    return
  _check_grads_finite(name, m, x, True)

  # Causal: changing tokens 9.. leaves outputs 0..8 unchanged. 9 is inside a block or chunk of
  # every default size (2, 3, 4, 8), so a chunk-routed mixer that reads its own chunk's later keys
  # (e.g. a chunk mean over the whole chunk) fails here; a cut at a chunk boundary cannot see that.
  full = _FWD(m, x)
  x2 = x.at[:, 9:].set(jax.random.normal(ks[1], (2, T - 9, D_MODEL)))
  np.testing.assert_allclose(full[:, :9], _FWD(m, x2)[:, :9], atol=1e-4, err_msg=f"{name}: causal")

  # Packed sequences [a (7 tokens) | b (5 tokens)] equal a and b alone.
  seg = jnp.array([[0] * 7 + [1] * 5] * 2)
  try:
    packed = _FWD_SEG(m, x, seg)
  except NotImplementedError:
    packed = None                      # the mixer does not take segment_ids (it says so)
  if packed is not None:
    b_alone = _FWD(m, jnp.concatenate([x[:, 7:], x[:, :7]], 1))[:, :5]
    np.testing.assert_allclose(packed[:, :7], full[:, :7], atol=1e-4, rtol=1e-3,
                               err_msg=f"{name}: first packed segment")
    np.testing.assert_allclose(packed[:, 7:], b_alone, atol=1e-4, rtol=1e-3,
                               err_msg=f"{name}: second packed segment")

  # Decoding: a 6-token prefill, then one token at a time, equals the full forward.
  try:
    m.init_cache(2, 16)
    outs = [_STEP(m, x[:, :6])] + [_STEP(m, x[:, t:t + 1]) for t in range(6, T)]
  except NotImplementedError:
    return                             # the mixer does not decode (it says so)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-4, rtol=2e-3,
                             err_msg=f"{name}: decode")


# ---------------------------------------------------------------------------------------------
# The CAB contract: four patterns per mixer, each defined (and right) or PatternUndefinedError.

# Context lengths: longer than T for non-causal cross; shorter for causal cross, so that query 0
# sees no key (its output must be finite and context-free) and bottom-right and top-left alignment
# differ. J: the context token perturbed, inside a chunk of 4 and of 8 (the chunked mixers'
# defaults) and not in the first chunk, so queries in J's chunk that must not see J can choose
# among earlier chunks; P: the query token perturbed.
S, S_CAUSAL, J, P = 14, 11, 10, 5
# 2D grid mixers can define cross attention only against a context on the query grid (S == T).
SAME_GRID_CROSS = {"swin", "swin_rmt", "halo", "bra", "na2d", "freeswim"}
# Known deviations, marked strict xfail so that a fix turns them into failures (remove the entry
# then). None today.
KNOWN: dict[tuple[str, str], str] = {}
CROSS = [pytest.param(n, p, marks=[pytest.mark.xfail(strict=True, reason=KNOWN[n, p])]
                      if (n, p) in KNOWN else [])
         for n in ALL for p in ("cross", "causal_cross") if p in (mixer_patterns(n) or ())]
_FWD_CTX = nnx.jit(lambda m, x, c: m(x, context=c))


def test_every_mixer_declares_its_patterns_and_the_table_is_current():
  table = registry.pattern_table()
  assert [r["mixer"] for r in table] == ALL
  assert not [r["mixer"] for r in table if r["self"] is None], "mixers without a pattern declaration"
  # (A declaration whose name matches no registration is not an error: a misspelt name leaves the
  # real mixer undeclared, which the line above catches.)
  md = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "cab_patterns.md"
  assert md.read_text().endswith(registry.pattern_table_markdown()), \
      "benchmarks/cab_patterns.md is stale: regenerate it (see its first lines)"


@pytest.mark.parametrize("name", ALL)
def test_undefined_patterns_raise(name):
  """Building in a causal flag with no defined pattern, or calling in an undefined pattern,
  raises exactly PatternUndefinedError (not a ValueError / TypeError from inside the maths)."""
  x = jnp.ones((1, T, D_MODEL))
  ctx = jnp.ones((1, S_CAUSAL, D_MODEL))
  defined = mixer_patterns(name)
  for pattern in (p for p in PATTERNS if p not in defined):
    causal, cross = pattern.startswith("causal"), pattern.endswith("cross")
    with pytest.raises(Exception) as err:
      # Abstract parameters: the refusal must come before any arithmetic (and builds cost ~0).
      m = nnx.eval_shape(lambda: build_mixer(name, d_model=D_MODEL, num_heads=HEADS, causal=causal,
                                             rngs=nnx.Rngs(0), **OPTIONS.get(name, {})))
      m(x, context=ctx) if cross else m(x)
    assert type(err.value) is PatternUndefinedError, (name, pattern, err.value)
    msg = str(err.value)
    assert msg.startswith(f"{name}:") and repr(pattern) in msg, msg


@pytest.mark.parametrize("name,pattern", CROSS)
def test_cross_pattern(name, pattern):
  causal = pattern == "causal_cross"
  s = S_CAUSAL if causal else T if name in SAME_GRID_CROSS else S
  ks = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(ks[0], (2, T, D_MODEL))
  ctx = jax.random.normal(ks[1], (2, s, D_MODEL))
  m = build_mixer(name, d_model=D_MODEL, num_heads=HEADS, causal=causal, rngs=nnx.Rngs(0),
                  **OPTIONS.get(name, {}))
  # One call (one compile) on four stacked batches: as given; context token J moved; query token P
  # moved; a different context altogether.
  xs = jnp.concatenate([x, x, x.at[:, P].add(3.0), x])
  cs = jnp.concatenate([ctx, ctx.at[:, J].add(3.0), ctx, jax.random.normal(ks[2], ctx.shape)])
  y, y_ctx, y_x, y_new = jnp.split(_FWD_CTX(m, xs, cs), 4)
  assert y.shape == x.shape and np.all(np.isfinite(y)), (name, pattern, y.shape)

  def change(y2):                                   # per query: max |change| over batch, channels
    return np.abs(np.asarray(y2 - y)).max(axis=(0, 2))

  d_ctx = change(y_ctx)
  if not causal:
    assert d_ctx.max() > 1e-4, f"{name} {pattern}: the output does not read the context"
    return
  sees = np.arange(T) + s - T >= J                  # bottom-right aligned causal cross
  assert d_ctx[~sees].max() < 1e-5, f"{name} {pattern}: context key {J} reaches earlier queries"
  first = J - (s - T)                               # the first query that sees key J
  assert d_ctx[first] > 1e-4, f"{name} {pattern}: context key {J} does not reach query {first}"
  assert change(y_x)[:P].max() < 1e-5, f"{name} {pattern}: query {P} changes earlier outputs"
  blind = T - s                                     # queries 0 .. T-S-1 see no context key
  assert change(y_new)[:blind].max() < 1e-5, f"{name} {pattern}: queries with no key read the context"


def test_patterns_declared_at_registration(monkeypatch):
  """`register_mixer(..., patterns=)`: the build-time and call-time checks apply per instance, so
  one class serves mixers with different patterns, and a module built directly is not checked."""
  for table in ("_MIXERS", "_DOCS", "_PATTERNS"):
    monkeypatch.setattr(registry, table, dict(getattr(registry, table)))

  class Tiny(nnx.Module):
    def __init__(self, causal):
      self.causal = causal

    def __call__(self, x, *, context=None):
      return x if context is None else x + context.mean(axis=1, keepdims=True)

  for name, patterns in (("tiny_causal", ("causal_self",)), ("tiny_all", PATTERNS)):
    registry.register_mixer(name, "test", patterns=patterns)(
        lambda *, d_model, num_heads, causal, rngs: Tiny(causal))
  x, ctx = jnp.ones((1, 3, 4)), jnp.ones((1, 5, 4))
  with pytest.raises(PatternUndefinedError, match=r"tiny_causal: the non-causal pattern .*'self'"):
    build_mixer("tiny_causal", d_model=4, num_heads=1, causal=False, rngs=nnx.Rngs(0))
  m = build_mixer("tiny_causal", d_model=4, num_heads=1, causal=True, rngs=nnx.Rngs(0))
  assert m(x).shape == x.shape
  with pytest.raises(PatternUndefinedError, match="tiny_causal: the 'causal_cross' pattern"):
    m(x, context=ctx)
  both = build_mixer("tiny_all", d_model=4, num_heads=1, causal=True, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(both(x, context=ctx), 2.0)
  np.testing.assert_allclose(Tiny(True)(x, context=ctx), 2.0)       # not built by the registry
  with pytest.raises(ValueError, match="unknown CAB pattern"):
    registry.register_mixer("tiny_bad", patterns=("causal",))
