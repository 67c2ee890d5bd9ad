"""Tests for `lowrank.retrieval.splade` and `lowrank.retrieval.sparse_index`."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from lowrank import assets
from lowrank import sharding
from lowrank.models import bert
from lowrank.retrieval import sparse_index
from lowrank.retrieval import splade

QUERY = "what causes aging fast"
# From an independent fp32 numpy forward over the same weights: 17
# non-zeros; fast 2.26, aging 2.24, causes 2.16, cause 1.95, speed 1.58,
# old 1.24, age 1.20, elderly 1.14.
EXPECTED_TOP8 = {
    "fast": 2.26, "aging": 2.24, "causes": 2.16, "cause": 1.95,
    "speed": 1.58, "old": 1.24, "age": 1.20, "elderly": 1.14,
}
DOCS = (
    "Aging is caused by damage to cells and DNA accumulating over time; some "
    "people age faster than others.",
    "Old age and elderly people: why do we grow old so quickly?",
    "Photosynthesis converts light into chemical energy in plants.",
    "The stock market closed higher on Friday.",
)


def _one_device_mesh():
  return sharding.make_mesh(devices=jax.devices()[:1])


def _numpy_flops(w):
  return np.sum(np.mean(np.abs(w), axis=0) ** 2)


class SpladeTinyTest(parameterized.TestCase):
  """The offline SPLADE-tiny checkpoint reproduces its reference outputs."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    with sharding.use_mesh(_one_device_mesh()):
      cls.model = bert.load_pretrained(assets.splade_tiny_path())
    cls.tokenizer = bert.load_tokenizer(assets.splade_tiny_path())

  def setUp(self):
    super().setUp()
    self.enter_context(sharding.use_mesh(_one_device_mesh()))

  def test_expansion_terms(self):
    w = splade.encode(self.model, self.tokenizer([QUERY]))
    self.assertEqual(w.shape, (1, 30522))
    self.assertEqual(int((np.asarray(w) > 0).sum()), 17)
    top = dict(splade.top_terms(self.tokenizer, w, 8)[0])
    self.assertEqual(set(top), set(EXPECTED_TOP8))
    for term, value in EXPECTED_TOP8.items():
      self.assertAlmostEqual(top[term], value, delta=0.01, msg=term)

  def test_query_document_score_ordering(self):
    q = splade.embed_texts(self.model, self.tokenizer, [QUERY])
    d = splade.embed_texts(self.model, self.tokenizer, list(DOCS),
                            batch_size=4)
    scores = (q.to_dense() @ d.to_dense().T)[0]
    # Relevant > related (expansion terms only) > off-topic; the stock
    # market document shares no term with the query at all.
    self.assertGreater(scores[0], 15.0)
    self.assertGreater(scores[1], 5.0)
    self.assertLess(scores[1], scores[0])
    self.assertLess(scores[2], 0.5)
    self.assertEqual(scores[3], 0.0)
    # The inverted index gives the same order from postings alone.
    ids, top_scores = sparse_index.search(
        sparse_index.build(d), *q.row(0), k=4
    )
    np.testing.assert_array_equal(ids, [0, 1, 2])
    np.testing.assert_allclose(top_scores, scores[:3], rtol=1e-5)

  def test_embed_texts_matches_encode_and_chunking(self):
    texts = [QUERY, *DOCS, "a " * 150 + "aging"]
    sparse = splade.embed_texts(self.model, self.tokenizer, texts,
                                 batch_size=3, token_chunk=16)
    encode = nnx.jit(splade.encode, static_argnames=("token_chunk",))
    # One batch padded far beyond the longest text, chunked differently:
    # padding and chunking must not change the weights.
    batch = self.tokenizer(texts, pad_to=192)
    full = np.asarray(encode(self.model, batch))
    chunked = np.asarray(encode(self.model, batch, token_chunk=48))
    np.testing.assert_allclose(chunked, full, atol=1e-5)
    np.testing.assert_allclose(sparse.to_dense(), full, atol=1e-5)
    self.assertEqual(sparse.nnz, int((full > 0).sum()))

  def test_sum_pooling_is_at_least_max(self):
    batch = self.tokenizer([QUERY])
    w_max = np.asarray(splade.encode(self.model, batch))
    w_sum = np.asarray(splade.encode(self.model, batch, max_pool=False))
    self.assertTrue(np.all(w_sum >= w_max - 1e-6))
    self.assertGreater(w_sum.sum(), w_max.sum())


class SparseHelpersTest(absltest.TestCase):

  def test_to_sparse_threshold_top_k_and_order(self):
    w = np.array([[0.0, 2.0, 0.5, 2.0, 0.1], [0.0, 0.0, 0.0, 0.0, 0.0]])
    (idx, val), (idx2, val2) = splade.to_sparse(w, threshold=0.2)
    np.testing.assert_array_equal(idx, [1, 3, 2])  # Ties: lower id first.
    np.testing.assert_allclose(val, [2.0, 2.0, 0.5])
    self.assertEqual(idx2.size, 0)
    self.assertEqual(val2.size, 0)
    (idx, _), _ = splade.to_sparse(w, top_k=1)
    np.testing.assert_array_equal(idx, [1])
    with self.assertRaisesRegex(ValueError, "top_k"):
      splade.to_sparse(w, top_k=0)

  def test_from_rows_and_dense_round_trip(self):
    rng = np.random.default_rng(0)
    dense = rng.random((6, 9)) * (rng.random((6, 9)) < 0.4)
    m = sparse_index.from_dense(dense)
    np.testing.assert_allclose(m.to_dense(), dense, rtol=1e-6)
    rows = [m.row(i) for i in range(m.num_rows)]
    shuffled = [(i[::-1], v[::-1]) for i, v in rows]
    m2 = sparse_index.from_rows(shuffled, 9)
    np.testing.assert_array_equal(m2.indices, m.indices)
    np.testing.assert_array_equal(m2.indptr, m.indptr)
    with self.assertRaisesRegex(ValueError, "repeats"):
      sparse_index.from_rows([(np.array([1, 1]), np.array([1.0, 2.0]))], 3)
    with self.assertRaisesRegex(ValueError, r"\[0, 3\)"):
      sparse_index.from_rows([(np.array([3]), np.array([1.0]))], 3)
    with self.assertRaisesRegex(ValueError, "2 indices but 1 values"):
      sparse_index.from_rows([(np.array([0, 1]), np.array([1.0]))], 3)

  def test_expected_flops(self):
    q = sparse_index.from_dense(np.array([[1.0, 0, 2.0], [0, 0, 1.0]]))
    d = sparse_index.from_dense(
        np.array([[1.0, 1.0, 0], [0, 0, 3.0], [1.0, 0, 1.0]]))
    # P(q_j) = [.5, 0, 1], P(d_j) = [2/3, 1/3, 2/3].
    self.assertAlmostEqual(splade.expected_flops(q, d), 0.5 * 2 / 3 + 2 / 3)


class SparseIndexTest(parameterized.TestCase):

  @parameterized.parameters(1, 5, 40, 200)
  def test_search_equals_dense_brute_force(self, k):
    rng = np.random.default_rng(k)
    n, v = 120, 50
    docs = rng.random((n, v)) * (rng.random((n, v)) < 0.15)
    docs[7] = 0.0  # An empty document.
    index = sparse_index.build(sparse_index.from_dense(docs))
    self.assertEqual(index.nnz, int((docs != 0).sum()))
    for _ in range(10):
      q = rng.random(v) * (rng.random(v) < 0.2)
      q_idx = np.flatnonzero(q)
      ids, scores = sparse_index.search(index, q_idx, q[q_idx], k)
      dense = docs.astype(np.float32).astype(np.float64) @ q
      matched = np.flatnonzero((docs[:, q_idx] != 0).any(axis=1))
      order = matched[np.lexsort((matched, -dense[matched]))][:k]
      np.testing.assert_array_equal(ids, order)
      np.testing.assert_allclose(scores, dense[order], rtol=1e-12)

  def test_ties_lower_index_first_and_straddling_k(self):
    # Docs 1..5 tie at 1.0; doc 0 scores 2; doc 6 shares no term.
    docs = np.zeros((7, 3))
    docs[0, 0] = 2.0
    docs[1:6, 1] = 1.0
    docs[6, 2] = 5.0
    index = sparse_index.build(sparse_index.from_dense(docs))
    ids, scores = sparse_index.search(index, [0, 1], [1.0, 1.0], 3)
    np.testing.assert_array_equal(ids, [0, 1, 2])
    np.testing.assert_array_equal(scores, [2.0, 1.0, 1.0])
    ids, _ = sparse_index.search(index, [0, 1], [1.0, 1.0], 100)
    np.testing.assert_array_equal(ids, [0, 1, 2, 3, 4, 5])  # Not doc 6.
    ids, _ = sparse_index.search(index, [], [], 3)
    self.assertEqual(ids.size, 0)

  def test_search_run_and_validation(self):
    docs = sparse_index.from_dense([[1.0, 0.0], [0.5, 2.0]])
    index = sparse_index.build(docs)
    queries = sparse_index.from_dense([[1.0, 0.0], [0.0, 0.0]])
    run = sparse_index.search_run(index, ["q1", "q2"], queries, ["a", "b"], 5)
    self.assertEqual(run, {"q1": {"a": 1.0, "b": 0.5}, "q2": {}})
    with self.assertRaisesRegex(ValueError, "k must be"):
      sparse_index.search(index, [0], [1.0], 0)
    with self.assertRaisesRegex(ValueError, r"\[0, 2\)"):
      sparse_index.search(index, [2], [1.0], 1)
    with self.assertRaisesRegex(ValueError, "1 doc ids"):
      sparse_index.search_run(index, ["q1", "q2"], queries, ["a"], 5)


class RegularizerTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.w = (rng.random((6, 11)) * (rng.random((6, 11)) < 0.5)).astype(
        np.float32)
    self.idf = (rng.random(11) * 3 + 0.2).astype(np.float32)

  def test_flops_l1_l0_match_numpy(self):
    w = jnp.asarray(self.w)
    np.testing.assert_allclose(splade.flops(w), _numpy_flops(self.w),
                               rtol=1e-6)
    # Direct double loop: sum_j (1/N sum_i |w_ij|)^2.
    direct = sum(
        (sum(abs(float(self.w[i, j])) for i in range(6)) / 6) ** 2
        for j in range(11)
    )
    self.assertAlmostEqual(float(splade.flops(w)), direct, places=5)
    np.testing.assert_allclose(
        splade.l1(w), np.abs(self.w).sum(axis=1).mean(), rtol=1e-6)
    np.testing.assert_allclose(
        splade.l0(w), (self.w != 0).sum(axis=1).mean(), rtol=1e-6)

  def test_idf_flops(self):
    w, idf = jnp.asarray(self.w), jnp.asarray(self.idf)
    expected = np.sum((np.mean(np.abs(self.w), axis=0) / self.idf) ** 2)
    np.testing.assert_allclose(splade.idf_flops(w, idf), expected, rtol=1e-5)
    # Score-side weights idf * u are penalised exactly like FLOPS(u).
    np.testing.assert_allclose(
        splade.idf_flops(idf[None, :] * w, idf), splade.flops(w), rtol=1e-5)
    # Per unit of weight, a low-IDF term is penalised more.
    w1 = jnp.ones((2, 2))
    grad = jax.grad(splade.idf_flops)(w1, jnp.array([0.5, 4.0]))
    self.assertGreater(float(grad[0, 0]), 10 * float(grad[0, 1]))

  def test_reg_weight_quadratic_warmup(self):
    lam, t = 0.4, 100
    for step, expected in ((0, 0.0), (10, 0.004), (50, 0.1), (100, 0.4),
                           (1000, 0.4)):
      self.assertAlmostEqual(float(splade.reg_weight(step, lam, t)), expected,
                             places=6)
    jitted = jax.jit(lambda s: splade.reg_weight(s, lam, t))
    self.assertAlmostEqual(float(jitted(jnp.int32(25))), 0.025, places=6)
    self.assertAlmostEqual(float(splade.reg_weight(3, lam, 0)), 0.4, places=6)
    scheduler = splade.RegWeightScheduler(
        lambda_q=0.5, lambda_d=0.4, warmup_steps_q=10, warmup_steps_d=20)
    lq, ld = scheduler(10)
    self.assertAlmostEqual(float(lq), 0.5, places=6)
    self.assertAlmostEqual(float(ld), 0.1, places=6)

  def test_splade_loss_matches_numpy(self):
    rng = np.random.default_rng(1)
    q = rng.random((3, 11)).astype(np.float32)
    d = rng.random((5, 11)).astype(np.float32)  # 2 extra hard negatives.
    loss, aux = splade.splade_loss(jnp.asarray(q), jnp.asarray(d),
                                   lambda_q=0.3, lambda_d=0.2)
    s = (q @ d.T).astype(np.float64)
    m = s.max(axis=1, keepdims=True)
    logp = s - m - np.log(np.exp(s - m).sum(axis=1, keepdims=True))
    rank = -np.mean(logp[np.arange(3), np.arange(3)])
    expected = rank + 0.3 * _numpy_flops(q) + 0.2 * _numpy_flops(d)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(aux["rank_loss"], rank, rtol=1e-5)
    np.testing.assert_allclose(aux["d_l0"], 11.0)
    loss_l1, _ = splade.splade_loss(jnp.asarray(q), jnp.asarray(d),
                                    lambda_d=1.0, regularizer="l1")
    np.testing.assert_allclose(
        loss_l1, rank + np.abs(d).sum(1).mean(), rtol=1e-5)
    with self.assertRaisesRegex(ValueError, "needs idf"):
      splade.splade_loss(jnp.asarray(q), jnp.asarray(d),
                         regularizer="idf_flops")
    with self.assertRaisesRegex(ValueError, "Unknown regularizer"):
      splade.splade_loss(jnp.asarray(q), jnp.asarray(d), regularizer="l2")


class TrainingTest(absltest.TestCase):
  """Gradients reach the encoder; the inference-free query side."""

  def setUp(self):
    super().setUp()
    self.enter_context(sharding.use_mesh(_one_device_mesh()))

  def test_gradient_flows_through_encode(self):
    config = bert.BertConfig(vocab_size=64, hidden_size=16,
                             num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, add_mlm_head=True,
                             add_pooling_layer=False)
    model = bert.BertModel(config, rngs=nnx.Rngs(0))
    model.eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 64, (4, 6)).astype(np.int32)
    mask = np.ones((4, 6), np.int32)
    mask[1, 4:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
      m = nnx.merge(graphdef, params, rest)
      w = splade.encode(m, batch, token_chunk=4)
      loss, _ = splade.splade_loss(w[:2], w[2:], lambda_q=0.1, lambda_d=0.1)
      return loss

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    self.assertTrue(np.isfinite(float(loss)))
    flat = {
        jax.tree_util.keystr(path): np.asarray(g)
        for path, g in jax.tree_util.tree_leaves_with_path(grads)
    }
    for value in flat.values():
      self.assertTrue(np.all(np.isfinite(value)))
    for name in ("'predictions']['bias'", "'word_embeddings']['embedding'",
                 "'query']['kernel'", "'transform']['dense']['kernel'"):
      key = next(k for k in flat if name in k)
      self.assertGreater(float(np.abs(flat[key]).max()), 0.0, key)

  def test_lookup_query(self):
    ids = np.array([[101, 7, 9, 7, 102, 0], [101, 3, 102, 0, 0, 0]])
    mask = (ids != 0).astype(np.int32)
    weights = np.linspace(-1.0, 2.0, 128).astype(np.float32)
    q = np.asarray(splade.lookup_query(ids, mask, weights,
                                       special_ids=(0, 101, 102)))
    expected = np.zeros((2, 128), np.float32)
    for b, row in enumerate(ids):
      for t in row:
        if t not in (0, 101, 102):
          expected[b, t] = max(weights[t], 0.0)  # Repeats count once.
    np.testing.assert_allclose(q, expected)
    # A learned table gets gradients only for the (positive) tokens used.
    grad = jax.grad(
        lambda w: splade.lookup_query(ids, mask, w).sum())(jnp.asarray(weights))
    grad = np.asarray(grad)
    self.assertEqual(grad[101], 2.0)  # [CLS] not special here; 2 queries.
    self.assertEqual(grad[3], 0.0)  # relu'd negative weight.
    self.assertEqual(grad[50], 0.0)  # Unused token.

  def test_token_idf(self):
    tokenizer = bert.Tokenizer.from_pretrained(assets.splade_tiny_path())
    texts = ["aging fast", "aging slowly", "market"]
    idf = splade.token_idf(tokenizer, texts)
    aging = tokenizer.token_to_id("aging")
    market = tokenizer.token_to_id("market")
    unseen = tokenizer.token_to_id("planet")
    np.testing.assert_allclose(idf[aging], np.log1p(1.5 / 2.5), rtol=1e-6)
    np.testing.assert_allclose(idf[market], np.log1p(2.5 / 1.5), rtol=1e-6)
    np.testing.assert_allclose(idf[unseen], np.log1p(3.5 / 0.5), rtol=1e-6)
    self.assertEqual(idf.shape, (tokenizer.vocab_size,))


if __name__ == "__main__":
  absltest.main()
