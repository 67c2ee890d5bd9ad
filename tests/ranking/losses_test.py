"""Tests for lowrank.ranking.losses.

Each loss is checked against an independent, loop-based float64 reference
written from the papers' formulas (below), against optax where an equivalent
exists, and for padding/permutation invariance, excluded lists, weights,
jit/vmap, finite gradients and input validation.
"""

import functools
import inspect
import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank.ranking import losses

# ----------------------------------------------------------------------------
# Loop-based references. Each takes one list (Python floats and a boolean
# mask) and returns the per-list loss, or None when the list is excluded.


def _valid(s, y, m):
  keep = [i for i in range(len(s)) if m[i]]
  return [float(s[i]) for i in keep], [float(y[i]) for i in keep]


def _log_sigmoid(x):
  return -math.log1p(math.exp(-x)) if x > -30 else x - math.log1p(math.exp(x))


def _softplus(x):
  return -_log_sigmoid(-x)


def _log_softmax(v):
  top = max(v)
  lse = top + math.log(sum(math.exp(a - top) for a in v))
  return [a - lse for a in v]


def _gain(y):
  return 2.0**y - 1.0


def _dcg(gains_best_first):
  return sum(g / math.log2(k + 2) for k, g in enumerate(gains_best_first))


def _idcg(y):
  return _dcg(sorted((_gain(v) for v in y), reverse=True))


def _ranks(s):
  order = sorted(range(len(s)), key=lambda i: (-s[i], i))
  r = [0] * len(s)
  for pos, i in enumerate(order):
    r[i] = pos + 1
  return r


def _prefers(y):
  return len(set(y)) > 1


def ref_pointwise_bce(s, y, m):
  s, y = _valid(s, y, m)
  if not s:
    return None
  return sum(-(b * _log_sigmoid(a) + (1 - b) * _log_sigmoid(-a))
             for a, b in zip(s, y)) / len(s)


def ref_rank_net(s, y, m, ndcg_weighted=False):
  s, y = _valid(s, y, m)
  n = len(s)
  pairs = [(i, j) for i in range(n) for j in range(n) if y[i] > y[j]]
  if not pairs:
    return None
  order = sorted(range(n), key=lambda i: (-s[i], i))

  def ndcg(o):
    return _dcg([_gain(y[i]) for i in o]) / _idcg(y)

  total = 0.0
  for i, j in pairs:
    w = 1.0
    if ndcg_weighted:  # |ΔNDCG| by actually swapping i and j.
      swapped = [j if k == i else i if k == j else k for k in order]
      w = abs(ndcg(order) - ndcg(swapped))
    total += w * math.log(1 + math.exp(-(s[i] - s[j])))
  return total / len(pairs)


def ref_list_net(s, y, m):
  s, y = _valid(s, y, m)
  if not _prefers(y):
    return None
  p = [math.exp(a) for a in _log_softmax(y)]
  return -sum(pi * qi for pi, qi in zip(p, _log_softmax(s)))


def ref_list_mle(s, y, m, position_aware=False):
  s, y = _valid(s, y, m)
  if not _prefers(y):
    return None
  n = len(s)
  order = sorted(range(n), key=lambda i: (-y[i], -s[i]))
  alpha = [1.0] * n
  if position_aware:
    raw = [2.0**(n - k) - 1 for k in range(1, n + 1)]
    alpha = [a / sum(raw) for a in raw]
  total = 0.0
  for k in range(n):
    rest = [s[order[l]] for l in range(k, n)]
    total += alpha[k] * (math.log(sum(math.exp(v) for v in rest)) -
                         s[order[k]])
  return total


def ref_lambda_loss(s, y, m, variant="ndcg_loss2pp", mu=10.0):
  s, y = _valid(s, y, m)
  if not _prefers(y):
    return None
  r = _ranks(s)
  g = [_gain(v) / _idcg(y) for v in y]
  total = 0.0
  for i in range(len(s)):
    for j in range(len(s)):
      if y[i] <= y[j]:
        continue
      d = abs(r[i] - r[j])
      delta = abs(1 / math.log2(1 + d) - 1 / math.log2(2 + d))
      rho = abs(1 / math.log2(1 + r[i]) - 1 / math.log2(1 + r[j]))
      w = delta if variant == "ndcg_loss2" else rho + mu * delta
      total -= w * abs(g[i] - g[j]) * _log_sigmoid(s[i] - s[j]) / math.log(2)
  return total


def ref_approx_ndcg(s, y, m, temperature=1.0):
  s, y = _valid(s, y, m)
  if not s or _idcg(y) <= 0:
    return None
  dcg = 0.0
  for i in range(len(s)):
    rank = 1 + sum(1 / (1 + math.exp(-(s[j] - s[i]) / temperature))
                   for j in range(len(s)) if j != i)
    dcg += _gain(y[i]) / math.log2(1 + rank)
  return -dcg / _idcg(y)


def ref_softmax_ce(s, y, m):
  s, y = _valid(s, y, m)
  if sum(y) <= 0:
    return None
  return -sum(b / sum(y) * q for b, q in zip(y, _log_softmax(s)))


def ref_margin_mse(s, t, m, anchor_first=False):
  if anchor_first:
    if not m[0]:
      return None
    pairs = [(0, j) for j in range(1, len(s)) if m[j]]
  else:
    idx = [i for i in range(len(s)) if m[i]]
    pairs = [(a, b) for k, a in enumerate(idx) for b in idx[k + 1:]]
  if not pairs:
    return None
  return sum(((s[i] - s[j]) - (t[i] - t[j]))**2 for i, j in pairs) / len(pairs)


def ref_kl_distill(s, t, m, temperature=1.0):
  s, t = _valid(s, t, m)
  if not s:
    return None
  log_p = _log_softmax([a / temperature for a in t])
  log_q = _log_softmax([a / temperature for a in s])
  return sum(math.exp(a) * (a - b) for a, b in zip(log_p, log_q))


def ref_plackett_luce(s, y, m, variant="pl"):
  s, y = _valid(s, y, m)
  if not _prefers(y):
    return None
  n = len(s)
  total = 0.0
  if variant == "pl":
    for i in range(n):
      worse = [j for j in range(n) if y[j] < y[i]]
      if worse:
        total += math.log(math.exp(s[i]) +
                          sum(math.exp(s[j]) for j in worse)) - s[i]
  else:
    r = _ranks(s)
    for i in range(n):
      for j in range(n):
        if y[i] > y[j]:
          delta = (abs(_gain(y[i]) - _gain(y[j])) *
                   abs(1 / math.log2(1 + r[i]) - 1 / math.log2(1 + r[j])))
          total += delta * _softplus(-(s[i] - s[j]))
  return total


def ref_batch(ref, s, y, m=None, w=None, **kw):
  """Weighted mean of `ref` over the lists that are not excluded."""
  s, y = np.asarray(s, np.float64), np.asarray(y, np.float64)
  m = np.ones(s.shape, bool) if m is None else np.asarray(m)
  w = (np.ones(s.shape[:-1]) if w is None else
       np.broadcast_to(np.asarray(w, np.float64), s.shape[:-1]))
  total, count = 0.0, 0
  for idx in np.ndindex(*s.shape[:-1]):
    v = ref(list(s[idx]), list(y[idx]), list(m[idx]), **kw)
    if v is not None:
      total += w[idx] * v
      count += 1
  return total / max(count, 1)


# name, function, options, reference, kind of labels.
CASES = [
    ("pointwise_bce", losses.pointwise_bce, {}, ref_pointwise_bce, "prob"),
    ("rank_net", losses.rank_net, {}, ref_rank_net, "grade"),
    ("rank_net_ndcg", losses.rank_net, {"ndcg_weighted": True}, ref_rank_net,
     "grade"),
    ("list_net", losses.list_net, {}, ref_list_net, "grade"),
    ("list_mle", losses.list_mle, {}, ref_list_mle, "grade"),
    ("list_mle_position_aware", losses.list_mle, {"position_aware": True},
     ref_list_mle, "grade"),
    ("lambda_loss2", losses.lambda_loss, {"variant": "ndcg_loss2"},
     ref_lambda_loss, "grade"),
    ("lambda_loss2pp_mu3", losses.lambda_loss,
     {"variant": "ndcg_loss2pp", "mu": 3.0}, ref_lambda_loss, "grade"),
    ("approx_ndcg_t05", losses.approx_ndcg, {"temperature": 0.5},
     ref_approx_ndcg, "grade"),
    ("softmax_ce", losses.softmax_ce, {}, ref_softmax_ce, "grade"),
    ("margin_mse", losses.margin_mse, {}, ref_margin_mse, "teacher"),
    ("margin_mse_anchor", losses.margin_mse, {"anchor_first": True},
     ref_margin_mse, "teacher"),
    ("kl_distill_t2", losses.kl_distill, {"temperature": 2.0}, ref_kl_distill,
     "teacher"),
    ("plackett_luce", losses.plackett_luce, {}, ref_plackett_luce, "grade"),
    ("plackett_luce_lipo", losses.plackett_luce, {"variant": "lipo_lambda"},
     ref_plackett_luce, "grade"),
]
BY_NAME = {c[0]: c for c in CASES}
NAMED = [dict(testcase_name=c[0], name=c[0]) for c in CASES]
# margin_mse(anchor_first=True) singles out item 0 by design.
SYMMETRIC = [n for n in NAMED if n["name"] != "margin_mse_anchor"]
# Losses that leave out a list whose valid labels are all 0.
EXCLUDES_ZERO_LABELS = {
    "rank_net", "list_net", "list_mle", "lambda_loss", "approx_ndcg",
    "softmax_ce", "plackett_luce"
}
SHAPE = (4, 6)


def _loss(name):
  _, fn, kw, _, _ = BY_NAME[name]
  return functools.partial(fn, **kw)


@functools.lru_cache(maxsize=None)
def _value_and_grad(name):
  """Jitted (value, d/d scores) of a case; compiled once per input shape."""
  f = _loss(name)
  return jax.jit(jax.value_and_grad(
      lambda s, y, m, w: f(s, y, where=m, weights=w)))


def _jit(fn):
  """`jax.jit` with the loss's string and bool options static."""
  static = ("variant", "position_aware", "anchor_first", "ndcg_weighted")
  params = inspect.signature(fn).parameters
  return jax.jit(fn, static_argnames=[n for n in static if n in params])


def _run(name, s, y, m, w=None):
  w = np.ones(np.shape(s)[:-1]) if w is None else w
  v, g = _value_and_grad(name)(jnp.asarray(s, jnp.float32),
                               jnp.asarray(y, jnp.float32), jnp.asarray(m),
                               jnp.asarray(w, jnp.float32))
  return float(v), np.asarray(g)


def _ref(name, s, y, m, w=None):
  _, _, kw, ref, _ = BY_NAME[name]
  return ref_batch(ref, s, y, m, w, **kw)


# Hand-made lists (two per label kind), padded to SHAPE below.
HAND_SCORES = [[2.0, 1.0, 3.0, 0.5], [0.1, -0.4, 0.3, 1.2]]
HAND_MASK = [[True, True, True, False], [True, True, True, True]]
HAND_LABELS = {
    "grade": [[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, 3.0]],
    "prob": [[1.0, 0.0, 0.7, 0.2], [0.0, 1.0, 0.0, 0.9]],
    "teacher": [[4.0, -1.0, 2.5, 0.0], [0.5, 1.5, -2.0, 3.0]],
}


def _labels(kind, rng, shape):
  if kind == "prob":
    return rng.uniform(0.0, 1.0, shape)
  if kind == "teacher":
    return rng.normal(0.0, 2.0, shape)
  return rng.integers(0, 4, shape).astype(np.float64)


def _batch(name, seed):
  """A [4, 6] batch: rows 0-1 the hand-made lists, rows 2-3 random.

  Scores are distinct; padded entries hold junk; every list has >= 3 valid
  items and, for graded labels, two different grades.
  """
  kind = BY_NAME[name][4]
  rng = np.random.default_rng(seed)
  s = rng.normal(0.0, 1.5, SHAPE)
  y = _labels(kind, rng, SHAPE)
  m = rng.uniform(size=SHAPE) < 0.75
  m[:, :3] = True
  if kind == "grade":
    y[:, 0], y[:, 1] = 3.0, 0.0
  s[:2, :4], y[:2, :4] = HAND_SCORES, HAND_LABELS[kind]
  m[:2] = False
  m[:2, :4] = HAND_MASK
  s[~m] = rng.normal(0.0, 50.0, np.sum(~m))
  return s, y, m


class ReferenceTest(parameterized.TestCase):

  @parameterized.named_parameters(*NAMED)
  def test_matches_loop_reference(self, name):
    for seed in range(3):
      s, y, m = _batch(name, seed)
      v, g = _run(name, s, y, m)
      np.testing.assert_allclose(v, _ref(name, s, y, m), rtol=2e-5, atol=1e-6)
      np.testing.assert_array_equal(g[~m], 0.0)
      self.assertTrue(np.all(np.isfinite(g)))
    # Per-list weights (a weight of 0 still counts the list in the mean).
    w = np.array([0.5, 2.0, 0.0, 1.5])
    v, _ = _run(name, s, y, m, w)
    np.testing.assert_allclose(v, _ref(name, s, y, m, w), rtol=2e-5,
                               atol=1e-6)

  @parameterized.named_parameters(*NAMED)
  def test_weights_broadcast_over_batch_axes(self, name):
    s, y, m = _batch(name, 5)
    w = np.array([0.5, 2.0])
    got = jax.jit(_loss(name))(jnp.asarray(s.reshape(2, 2, 6), jnp.float32),
            jnp.asarray(y.reshape(2, 2, 6), jnp.float32),
            where=jnp.asarray(m.reshape(2, 2, 6)), weights=jnp.asarray(w))
    want = _ref(name, s.reshape(2, 2, 6), y.reshape(2, 2, 6),
                m.reshape(2, 2, 6), w)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


class PublishedValuesTest(absltest.TestCase):
  """Numbers printed in optax's and TF-Ranking's documentation."""

  def test_optax_docstring_softmax(self):
    s = jnp.array([2.0, 1.0, 3.0])
    y = jnp.array([1.0, 0.0, 0.0])
    np.testing.assert_allclose(_jit(losses.softmax_ce)(s, y), 1.408, atol=5e-4)
    s = jnp.array([[2.0, 1.0, 0.0], [1.0, 0.5, 1.5]])
    y = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    m = jnp.array([[True, True, False], [True, True, True]])
    np.testing.assert_allclose(_jit(losses.softmax_ce)(s, y, where=m), 0.497,
                               atol=5e-4)

  def test_tf_ranking_approx_ndcg_and_list_mle(self):
    # tfr.keras.losses.ApproxNDCGLoss (temperature 0.1) and ListMLELoss.
    s = jnp.array([[0.6, 0.8, 0.0], [0.5, 0.8, 0.4]])
    y = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    m = jnp.array([[True, True, False], [True, True, True]])
    np.testing.assert_allclose(
        _jit(losses.approx_ndcg)(s, y, where=m, temperature=0.1), -0.80536866,
        rtol=1e-5)
    np.testing.assert_allclose(
        _jit(losses.approx_ndcg)(s[:1], y[:1], where=m[:1], temperature=0.1),
        -0.655107, rtol=1e-5)
    np.testing.assert_allclose(_jit(losses.list_mle)(s[:1], y[:1], where=m[:1]),
                               0.7981389, rtol=1e-5)


class OptaxParityTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(7)
    self.s = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
    self.m = jnp.asarray(rng.uniform(size=SHAPE) < 0.7).at[:, :2].set(True)
    self.rng = rng

  def test_softmax_ce_one_hot_and_in_batch(self):
    y = jax.nn.one_hot(jnp.array([0, 1, 1, 0]), SHAPE[1])
    np.testing.assert_allclose(
        _jit(losses.softmax_ce)(self.s, y, where=self.m),
        optax.losses.ranking_softmax_loss(self.s, y, where=self.m), rtol=1e-6)
    sq = self.s[:, :4]
    np.testing.assert_allclose(
        _jit(losses.softmax_ce)(sq, jnp.eye(4)),
        optax.losses.ranking_softmax_loss(sq, jnp.eye(4)), rtol=1e-6)

  def test_softmax_ce_graded_is_optax_with_normalised_labels(self):
    y = jnp.asarray(self.rng.integers(0, 3, SHAPE), jnp.float32).at[:, 0].set(2)
    y_valid = jnp.where(self.m, y, 0.0)
    y_norm = y_valid / jnp.sum(y_valid, axis=-1, keepdims=True)
    np.testing.assert_allclose(
        _jit(losses.softmax_ce)(self.s, y, where=self.m),
        optax.losses.ranking_softmax_loss(self.s, y_norm, where=self.m),
        rtol=1e-6)

  def test_list_net_is_optax_softmax_with_softmax_labels(self):
    y = jnp.asarray(self.rng.normal(size=SHAPE), jnp.float32)
    target = jax.nn.softmax(jnp.where(self.m, y, -jnp.inf), axis=-1)
    np.testing.assert_allclose(
        _jit(losses.list_net)(self.s, y, where=self.m),
        optax.losses.ranking_softmax_loss(self.s, target, where=self.m),
        rtol=1e-6)

  def test_kl_distill_is_optax_kl_divergence(self):
    t = jnp.asarray(self.rng.normal(size=SHAPE), jnp.float32)
    want = optax.losses.kl_divergence(jax.nn.log_softmax(self.s / 2.0),
                                      jax.nn.softmax(t / 2.0)).mean()
    np.testing.assert_allclose(
        _jit(losses.kl_distill)(self.s, t, temperature=2.0), want, rtol=1e-5)

  def test_pointwise_bce_is_optax_sigmoid_bce(self):
    y = jnp.asarray(self.rng.uniform(size=SHAPE), jnp.float32)
    want = optax.losses.sigmoid_binary_cross_entropy(self.s, y).mean()
    np.testing.assert_allclose(_jit(losses.pointwise_bce)(self.s, y), want,
                               rtol=1e-6)


class RelationsTest(absltest.TestCase):

  def test_plackett_luce_is_list_mle_for_distinct_labels(self):
    rng = np.random.default_rng(5)
    s = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
    y = jnp.asarray(np.stack([rng.permutation(6) for _ in range(4)]),
                    jnp.float32)
    np.testing.assert_allclose(_jit(losses.plackett_luce)(s, y),
                               _jit(losses.list_mle)(s, y), rtol=1e-6)

  def test_plackett_luce_binary_is_multi_positive_softmax(self):
    s = jnp.array([1.0, -0.5, 2.0, 0.3, 0.0])
    y = jnp.array([1.0, 0.0, 1.0, 0.0, 0.0])
    negatives = jnp.exp(s[1]) + jnp.exp(s[3]) + jnp.exp(s[4])
    want = sum(jnp.log(jnp.exp(s[i]) + negatives) - s[i] for i in (0, 2))
    np.testing.assert_allclose(_jit(losses.plackett_luce)(s, y), want,
                               rtol=1e-6)

  def test_margin_mse_triple(self):
    s, t = jnp.array([2.0, 0.5]), jnp.array([5.0, 1.0])
    want = ((2.0 - 0.5) - (5.0 - 1.0))**2
    for anchor in (False, True):
      np.testing.assert_allclose(
          _jit(losses.margin_mse)(s, t, anchor_first=anchor), want, rtol=1e-6)


class InvarianceTest(parameterized.TestCase):

  @parameterized.named_parameters(*NAMED)
  def test_padding_invariance_and_zero_grads(self, name):
    s, y, m = _batch(name, 11)
    pad_s = np.array([1e30, -np.inf, np.nan, 7.0])
    pad_y = np.array([np.nan, 100.0, -5.0, 1.0])
    s2 = np.concatenate([s, np.broadcast_to(pad_s, (4, 4))], axis=-1)
    y2 = np.concatenate([y, np.broadcast_to(pad_y, (4, 4))], axis=-1)
    m2 = np.concatenate([m, np.zeros((4, 4), bool)], axis=-1)
    v1, g1 = _run(name, s, y, m)
    v2, g2 = _run(name, s2, y2, m2)
    np.testing.assert_allclose(v2, v1, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g2[:, :6], g1, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(g2[:, 6:], 0.0)
    np.testing.assert_array_equal(g1[~m], 0.0)

  @parameterized.named_parameters(*SYMMETRIC)
  def test_permutation_invariance(self, name):
    s, y, m = _batch(name, 12)
    perm = np.random.default_rng(0).permutation(6)
    v1, g1 = _run(name, s, y, m)
    v2, g2 = _run(name, s[:, perm], y[:, perm], m[:, perm])
    np.testing.assert_allclose(v2, v1, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g2, g1[:, perm], rtol=1e-5, atol=1e-7)

  @parameterized.named_parameters(*NAMED)
  def test_excluded_lists(self, name):
    s, y, m = _batch(name, 13)
    m[1] = False  # No valid item.
    y[2], m[2] = 0.0, True  # All labels 0.
    v, g = _run(name, s, y, m)
    self.assertTrue(np.all(np.isfinite(g)))
    np.testing.assert_array_equal(g[1], 0.0)
    np.testing.assert_allclose(v, _ref(name, s, y, m), rtol=2e-5, atol=1e-6)
    without = m.copy()
    without[2] = False
    v_without, _ = _run(name, s, y, without)
    if BY_NAME[name][1].__name__ in EXCLUDES_ZERO_LABELS:
      np.testing.assert_array_equal(g[2], 0.0)
      np.testing.assert_allclose(v, v_without, rtol=1e-6)
    else:  # An all-zero-label list is a legitimate list here.
      self.assertTrue(np.any(g[2] != 0.0))
      self.assertNotAlmostEqual(v, v_without)
    # Nothing valid at all: 0 with zero gradients.
    v, g = _run(name, s, y, np.zeros(SHAPE, bool))
    self.assertEqual(v, 0.0)
    np.testing.assert_array_equal(g, 0.0)


class TransformsTest(parameterized.TestCase):

  @parameterized.named_parameters(*NAMED)
  def test_eager_jit_vmap_and_finite_grads(self, name):
    f = _loss(name)
    s, y, m = _batch(name, 21)
    s, y = jnp.asarray(s, jnp.float32), jnp.asarray(y, jnp.float32)
    v, _ = _run(name, s, y, np.ones(SHAPE, bool))
    # Eager on one list, against the jitted batch code.
    v0, _ = _run(name, s[:1], y[:1], np.ones((1, 6), bool))
    np.testing.assert_allclose(f(s[0], y[0]), v0, rtol=1e-6)
    # vmap over lists: the mean of per-list losses (all lists valid here).
    np.testing.assert_allclose(jnp.mean(jax.jit(jax.vmap(f))(s, y)), v,
                               rtol=1e-5)
    # Extreme but finite scores keep the loss and gradients finite.
    v, g = _run(name, s * 1e4, y, m)
    self.assertTrue(np.isfinite(v))
    self.assertTrue(np.all(np.isfinite(g)))

  @parameterized.named_parameters(*NAMED)
  def test_descent_recovers_label_order(self, name):
    kind = BY_NAME[name][4]
    labels = {
        "prob": [0.55, 0.1, 0.8, 0.3, 0.95, 0.7],
        "grade": [2.0, 0.0, 3.0, 1.0, 4.0, 5.0],
        "teacher": [1.5, -2.0, 3.0, 0.2, 4.0, 2.2],
    }[kind]
    y = jnp.asarray(labels)
    s0 = 0.1 * jax.random.normal(jax.random.key(0), (6,))
    opt = optax.adam(0.2)
    loss = functools.partial(_loss(name), labels=y)

    @jax.jit
    def train(s):
      def step(carry, _):
        s, state = carry
        updates, state = opt.update(jax.grad(loss)(s), state)
        return (optax.apply_updates(s, updates), state), None
      (s, _), _ = jax.lax.scan(step, (s, opt.init(s)), length=1000)
      return s

    s = train(s0)
    self.assertLess(float(loss(s)), float(loss(s0)))
    np.testing.assert_array_equal(np.argsort(-np.asarray(s)),
                                  np.argsort(-np.asarray(y)))


class DtypeTest(absltest.TestCase):

  def test_bfloat16_scores_compute_in_float32(self):
    s = jnp.array([[2.0, 1.0, 3.0, 0.5]])
    y = jnp.array([[1.0, 0.0, 2.0, 0.0]])
    for fn in (losses.list_mle, losses.lambda_loss, losses.softmax_ce):
      v16 = _jit(fn)(s.astype(jnp.bfloat16), y)
      self.assertEqual(v16.dtype, jnp.float32)
      np.testing.assert_allclose(v16, _jit(fn)(s, y), rtol=1e-6)


class ValidationTest(absltest.TestCase):

  def test_errors(self):
    s = jnp.zeros((2, 4))
    with self.assertRaisesRegex(ValueError, "labels must have the shape"):
      losses.rank_net(s, jnp.zeros((2, 3)))
    with self.assertRaisesRegex(ValueError, "where must have the shape"):
      losses.list_net(s, s, where=jnp.ones((2, 3), bool))
    with self.assertRaisesRegex(ValueError, "boolean mask"):
      losses.list_mle(s, s, where=jnp.ones((2, 4), jnp.float32))
    with self.assertRaisesRegex(ValueError, "weights are per list"):
      losses.softmax_ce(s, s, weights=jnp.ones((4,)))
    with self.assertRaisesRegex(ValueError, "floating point"):
      losses.approx_ndcg(jnp.zeros((2, 4), jnp.int32), s)
    with self.assertRaisesRegex(ValueError, "scalar"):
      losses.kl_distill(jnp.float32(1.0), jnp.float32(1.0))
    with self.assertRaisesRegex(ValueError, "variant must be one of"):
      losses.lambda_loss(s, s, variant="ndcg_loss1")
    with self.assertRaisesRegex(ValueError, "variant must be one of"):
      losses.plackett_luce(s, s, variant="dpo")
    with self.assertRaisesRegex(ValueError, "temperature must be > 0"):
      losses.approx_ndcg(s, s, temperature=0.0)
    with self.assertRaisesRegex(ValueError, "temperature must be > 0"):
      losses.kl_distill(s, s, temperature=-1.0)


class RegistryTest(absltest.TestCase):
  """`losses.LOSSES` / `losses.get`: the one registry of ranking losses."""

  def test_every_public_loss_is_registered_under_its_name(self):
    public = {n for n in losses.__all__ if n not in ("LOSSES", "get")}
    self.assertEqual(set(losses.LOSSES), public)
    for name, fn in losses.LOSSES.items():
      self.assertIs(losses.get(name), fn)
      self.assertEqual(fn.__name__, name)

  def test_unknown_name_lists_the_options(self):
    with self.assertRaisesRegex(
        ValueError, r"Unknown loss 'hinge'; options: \('softmax_ce', "
        r"'rank_net'\)"):
      losses.get("hinge", ("softmax_ce", "rank_net"))

  def test_known_loss_outside_the_callers_options(self):
    with self.assertRaisesRegex(ValueError, "Unknown loss 'margin_mse'"):
      losses.get("margin_mse", ("softmax_ce",))

  def test_options_that_are_not_losses(self):
    with self.assertRaisesRegex(
        ValueError, r"options \['hinge'\] are not losses of "
        "lowrank.ranking.losses.LOSSES"):
      losses.get("softmax_ce", ("softmax_ce", "hinge"))


if __name__ == "__main__":
  absltest.main()
