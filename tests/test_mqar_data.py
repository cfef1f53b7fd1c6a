import numpy as np
import pytest

from attnjax.data import mqar


@pytest.mark.parametrize("seed,vocab,seq,kv,rand", [(0, 512, 64, 8, False), (3, 128, 34, 8, True),
                                                    (7, 8192, 256, 16, False)])
def test_each_query_key_appears_exactly_once_before_its_query(seed, vocab, seq, kv, rand):
  b = mqar.multiquery_ar(vocab_size=vocab, num_examples=50, seq_len=seq, num_kv_pairs=kv, seed=seed,
                         random_non_queries=rand)
  assert b.inputs.shape == (50, seq) and b.query_positions.shape == (50, kv) == b.targets.shape
  half = vocab // 2
  for x, qp, tgt in zip(b.inputs, b.query_positions, b.targets):
    keys, values = x[0:2 * kv:2], x[1:2 * kv:2]
    assert np.all((keys >= 1) & (keys < half)) and len(set(keys)) == kv
    assert np.all((values >= half) & (values < vocab))
    assert len(set(qp)) == kv and np.all(qp >= 2 * kv) and np.all(qp < seq) and np.all(qp % 2 == 0)
    for p, t in zip(qp, tgt):
      key = x[p]
      assert key in keys and x[np.flatnonzero(keys == key)[0] * 2 + 1] == t
      before = np.flatnonzero(x[:p] == key)
      if not rand:
        assert len(before) == 1, "queried key must occur exactly once before its query"
        assert x[before[0] + 1] == t, "target is the value paired with the key"
  if rand:
    # Zoology (`_mqar`: inputs[inputs == 0] = randint(vocab_size)): fillers uniform over the whole
    # vocabulary, keys' half included; a zero filler survives only when 0 is drawn.
    filler = np.ones(b.inputs.shape, bool)
    filler[:, :2 * kv] = False
    np.put_along_axis(filler, b.query_positions, False, axis=1)
    tok = b.inputs[filler]
    assert (tok < half).mean() > 0.35 and (tok >= half).mean() > 0.35
    assert ((tok >= 1) & (tok < half)).any()


def test_split_by_seed_and_determinism():
  kw = dict(vocab_size=512, num_examples=20, seq_len=64, num_kv_pairs=8)
  a = mqar.multiquery_ar(seed=1, **kw)
  b = mqar.multiquery_ar(seed=1, **kw)
  c = mqar.multiquery_ar(seed=2, **kw)
  np.testing.assert_array_equal(a.inputs, b.inputs)
  assert not np.array_equal(a.inputs, c.inputs)


def test_first_query_gap_follows_zoology_power_law():
  b = mqar.multiquery_ar(vocab_size=512, num_examples=4000, seq_len=256, num_kv_pairs=4, seed=0)
  first_gap = (b.query_positions[:, 0] - 8) // 2  # the first draw has the law p exactly
  i = np.arange(1, (256 - 8) // 2 + 1)
  p = 0.01 * i ** (0.01 - 1)
  p /= p.sum()
  freq = np.bincount(first_gap, minlength=len(p)) / len(first_gap)
  assert abs(freq[0] - p[0]) < 4 * np.sqrt(p[0] * (1 - p[0]) / len(first_gap))
  assert abs(freq[:10].sum() - p[:10].sum()) < 0.05


@pytest.mark.parametrize("kwargs,match", [
    (dict(seq_len=63), "even"), (dict(vocab_size=60), "vocab_size"), (dict(num_kv_pairs=17), "num_kv_pairs")])
def test_bad_arguments(kwargs, match):
  kw = dict(vocab_size=512, num_examples=4, seq_len=64, num_kv_pairs=8, seed=0) | kwargs
  with pytest.raises(ValueError, match=match):
    mqar.multiquery_ar(**kw)


def test_loader_resumes_exactly():
  data = mqar.multiquery_ar(vocab_size=128, num_examples=10, seq_len=16, num_kv_pairs=2, seed=0)
  a = mqar.MQARLoader(data, 4, seed=0)
  seen = [next(a).inputs for _ in range(5)]
  b = mqar.MQARLoader(data, 4, seed=0)
  for _ in range(2):
    next(b)
  state = b.state()
  c = mqar.MQARLoader(data, 4, seed=0)
  c.restore(state)
  for i in range(2, 5):
    np.testing.assert_array_equal(next(c).inputs, seen[i])


@pytest.mark.parametrize("vocab,seq,k", [(16, 64, 8), (5, 9, 4), (3, 6, 3)])
def test_selective_copy_targets_are_the_non_noise_tokens_in_order(vocab, seq, k):
  """Oracle from the task's definition (Gu & Dao 2023, arXiv:2312.00752, appendix E.1): scanning the
  sequence, the targets are the non-noise tokens before the markers, in order, and the last `k`
  positions are the markers at which they are asked for."""
  from attnjax.data import selective_copy as sc
  b = sc.selective_copy(vocab_size=vocab, num_examples=200, seq_len=seq, num_tokens=k, seed=1)
  assert b.inputs.shape == (200, seq) and b.targets.shape == (200, k) == b.query_positions.shape
  marker = vocab - 1
  for x, qp, tgt in zip(b.inputs, b.query_positions, b.targets):
    body = x[:seq - k]
    np.testing.assert_array_equal(tgt, [t for t in body if t != 0])
    assert np.all(x[seq - k:] == marker) and not np.any(body == marker)
    np.testing.assert_array_equal(qp, np.arange(seq - k, seq))
    assert np.all((tgt >= 1) & (tgt <= vocab - 2))
  # Selective, not plain copying: where the data tokens sit varies between examples.
  layouts = {tuple(np.flatnonzero(x[:seq - k])) for x in b.inputs}
  assert len(layouts) > 1 or seq == 2 * k
  again = sc.selective_copy(vocab_size=vocab, num_examples=200, seq_len=seq, num_tokens=k, seed=1)
  np.testing.assert_array_equal(again.inputs, b.inputs)
  with pytest.raises(ValueError, match="seq_len must be >= 2 \\* num_tokens"):
    sc.selective_copy(vocab_size=vocab, num_examples=2, seq_len=2 * k - 1, num_tokens=k, seed=0)
