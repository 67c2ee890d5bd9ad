"""Tests for `lowrank.retrieval.codes` (binary, int8, PQ, JPQ)."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank import assets
from lowrank.data import code_search
from lowrank.models import bert
from lowrank.retrieval import codes
from lowrank.retrieval import search


@functools.lru_cache(maxsize=1)
def _real_embeddings():
  """MiniLM embeddings of 200 code-search queries and 300 documents.

  Documents `0..199` are the queries' positives (query `i` -> document
  `i`); documents `200..299` are other functions of the test split. Short
  truncation (32 tokens: one length bucket for the longer queries and all
  the documents, hence two compiles) and batches of 100 (no padding rows)
  keep this near 10 s of CPU.
  """
  data = code_search.load_code_search("test")
  query_ids = list(data.queries)[:200]
  positives = [next(iter(data.qrels[q])) for q in query_ids]
  taken = set(positives)
  others = [d for d in data.corpus if d not in taken][:100]
  model = bert.load_pretrained(assets.minilm_path())
  tokenizer = bert.load_tokenizer(assets.minilm_path())
  queries = bert.embed_texts(
      model, tokenizer, [data.queries[q] for q in query_ids], max_length=32,
      batch_size=100,
  )
  docs = bert.embed_texts(
      model, tokenizer, [data.corpus[d] for d in positives + others],
      max_length=32, batch_size=100,
  )
  return queries, docs


def _overlap_at_10(indices, reference):
  """Mean fraction of the reference top-10 found in the top-10."""
  return np.mean([
      len(set(a.tolist()) & set(b.tolist())) / 10
      for a, b in zip(np.asarray(indices)[:, :10], np.asarray(reference))
  ])


def _numpy_topk(scores, k, largest=True):
  """Top-k by score (desc, or asc), ties by lower index (stable sort)."""
  key = -scores if largest else scores
  idx = np.argsort(key, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, idx, axis=1), idx


class BinaryTest(parameterized.TestCase):

  @parameterized.parameters(1, 7, 8, 31, 32, 33, 70, 384)
  def test_packing_equals_numpy(self, dim):
    x = np.random.default_rng(dim).normal(size=(5, dim)).astype(np.float32)
    x[0, 0] = 0.0  # Zero is not positive: bit 0.
    packed8 = codes.pack_bits(x)
    np.testing.assert_array_equal(packed8, np.packbits(x > 0, axis=-1))
    self.assertEqual(packed8.dtype, jnp.uint8)
    packed32 = codes.pack_bits(x, jnp.uint32)
    as_bytes = np.packbits(x > 0, axis=-1)
    as_bytes = np.pad(as_bytes, ((0, 0), (0, -as_bytes.shape[1] % 4)))
    np.testing.assert_array_equal(
        packed32, as_bytes.view(">u4").astype(np.uint32)
    )
    for packed in (packed8, packed32):
      np.testing.assert_array_equal(
          codes.unpack_signs(packed, dim), np.where(x > 0, 1.0, -1.0)
      )

  @parameterized.parameters(jnp.uint8, jnp.uint32)
  def test_hamming_equals_numpy_incl_ties(self, dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 45)).astype(np.float32)
    bits = x > 0
    ref = np.sum(bits[:9, None, :] != bits[None, :, :], axis=-1)
    c = codes.pack_bits(x, dtype)
    np.testing.assert_array_equal(codes.hamming_distance(c[:9], c), ref)
    ref_d, ref_i = _numpy_topk(ref, 15, largest=False)
    self.assertTrue(np.any(ref_d[:, 1:] == ref_d[:, :-1]))  # Ties exist.
    for block_size in (None, 16):
      d, i = codes.hamming_search(c[:9], c, 15, block_size=block_size)
      np.testing.assert_array_equal(d, ref_d)
      np.testing.assert_array_equal(i, ref_i)

  def test_binary_search_reranks_hamming_candidates(self):
    rng = np.random.default_rng(1)
    docs = rng.normal(size=(200, 64)).astype(np.float32)
    queries = rng.normal(size=(6, 64)).astype(np.float32)
    bits = codes.pack_bits(docs)
    hamming = np.sum((queries[:, None] > 0) != (docs[None] > 0), axis=-1)
    _, candidates = _numpy_topk(hamming, 30, largest=False)
    for vectors in (docs, jnp.asarray(docs), None):
      scores, indices = codes.binary_search(
          queries, bits, 5, num_candidates=30, doc_vectors=vectors
      )
      rerank_docs = np.where(docs > 0, 1.0, -1.0) if vectors is None else docs
      exact = np.einsum("qd,qcd->qc", queries, rerank_docs[candidates])
      order = np.lexsort((candidates, -exact), axis=1)[:, :5]
      np.testing.assert_array_equal(
          indices, np.take_along_axis(candidates, order, axis=1)
      )
      np.testing.assert_allclose(
          scores, np.take_along_axis(exact, order, axis=1), rtol=1e-5
      )

  def test_binary_rerank_recall_on_real_embeddings(self):
    queries, docs = _real_embeddings()
    _, exact = search.topk(queries, docs, 10)
    _, indices = codes.binary_search(
        queries, codes.pack_bits(docs), 10, num_candidates=100,
        doc_vectors=docs,
    )
    self.assertGreaterEqual(_overlap_at_10(indices, exact), 0.95)
    self.assertEqual(codes.index_nbytes(codes.pack_bits(docs)), 300 * 48)


class Int8Test(parameterized.TestCase):

  @parameterized.parameters(True, False)
  def test_quantisation_error_and_exact_int32_ranking(self, per_dimension):
    rng = np.random.default_rng(2)
    docs = (rng.normal(size=(150, 32)) * rng.uniform(0.1, 3, 32)).astype(
        np.float32
    )
    queries = rng.normal(size=(7, 32)).astype(np.float32)
    index = codes.int8_quantize(docs, per_dimension=per_dimension)
    self.assertEqual(index.codes.dtype, jnp.int8)
    scale = np.asarray(index.scale)
    if not per_dimension:
      self.assertLen(set(scale.tolist()), 1)
    error = np.abs(np.asarray(codes.int8_dequantize(index)) - docs)
    self.assertTrue(np.all(error <= scale[None, :] / 2 + 1e-6))
    # The ranking is that of the int32 dot products, computed here in numpy.
    e, t = codes.int8_quantize_queries(queries, index.scale)
    dots = np.asarray(e, np.int64) @ np.asarray(index.codes, np.int64).T
    ref_dots, ref_idx = _numpy_topk(dots, 12)
    for block_size in (None, 40):
      scores, indices = codes.int8_search(
          queries, index, 12, block_size=block_size
      )
      np.testing.assert_array_equal(indices, ref_idx)
      np.testing.assert_allclose(
          scores, np.asarray(t)[:, None] * ref_dots, rtol=1e-6
      )

  def test_clipping_quantile(self):
    x = np.concatenate([np.linspace(-1, 1, 99), [50.0]])[:, None]
    x = x.astype(np.float32)
    absmax = codes.int8_quantize(x)
    clipped = codes.int8_quantize(x, quantile=0.98)
    self.assertAlmostEqual(float(absmax.scale[0]), 50 / 127, places=6)
    self.assertLess(float(clipped.scale[0]), 1.01 / 127)
    self.assertEqual(int(clipped.codes[-1, 0]), 127)  # The outlier clips.
    with self.assertRaisesRegex(ValueError, "quantile"):
      codes.int8_quantize(x, quantile=0.0)

  def test_int8_recall_on_real_embeddings(self):
    queries, docs = _real_embeddings()
    _, exact = search.topk(queries, docs, 10)
    for per_dimension in (True, False):
      index = codes.int8_quantize(docs, per_dimension=per_dimension)
      _, indices = codes.int8_search(queries, index, 10)
      self.assertGreaterEqual(_overlap_at_10(indices, exact), 0.95)
    self.assertEqual(codes.index_nbytes(index), 300 * 384 + 384 * 4)


class ProductQuantisationTest(parameterized.TestCase):

  def test_kmeans_matches_numpy_lloyd(self):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    key = jax.random.key(7)
    centroids, assign = codes.kmeans(x, key, 6, 10)
    # Same initial draw, then Lloyd's iterations in float64 numpy.
    c = x[np.asarray(jax.random.choice(key, 300, (6,), replace=False))]
    c = c.astype(np.float64)
    for _ in range(10):
      a = np.argmin(((x[:, None] - c[None]) ** 2).sum(-1), axis=1)
      c = np.stack([
          x[a == j].mean(0) if np.any(a == j) else c[j] for j in range(6)
      ])
    np.testing.assert_allclose(centroids, c, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(
        assign, np.argmin(((x[:, None] - c[None]) ** 2).sum(-1), axis=1)
    )

  def test_encode_decode_and_adc(self):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(260, 24)).astype(np.float32)
    queries = rng.normal(size=(5, 24)).astype(np.float32)
    index = codes.train_pq(x, 6, num_centroids=256, num_iters=5)
    self.assertEqual(index.codebooks.shape, (6, 256, 4))
    self.assertEqual(index.codes.dtype, jnp.uint8)
    self.assertEqual(codes.index_nbytes(index), 260 * 6 + 6 * 256 * 4 * 4)
    books = np.asarray(index.codebooks)
    # Encoding picks the nearest centroid of every subspace.
    parts = x.reshape(260, 6, 4)
    dist = ((parts[:, :, None, :] - books[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(index.codes, np.argmin(dist, axis=-1))
    decoded = np.asarray(codes.pq_decode(index.codes, index.codebooks))
    np.testing.assert_array_equal(
        decoded.reshape(260, 6, 4),
        books[np.arange(6)[None, :], np.asarray(index.codes, int)],
    )
    # ADC scores are the dot products with the decoded vectors.
    tables = codes.adc_tables(queries, index.codebooks)
    adc = np.asarray(codes.adc_scores(tables, index.codes))
    np.testing.assert_allclose(adc, queries @ decoded.T, rtol=1e-5, atol=1e-5)
    ref_scores, ref_idx = _numpy_topk(adc, 20)
    for block_size in (None, 64):
      scores, indices = codes.pq_search(
          queries, index, 20, block_size=block_size
      )
      np.testing.assert_array_equal(indices, ref_idx)
      np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)

  def test_reconstruction_error_decreases_with_m_on_real_embeddings(self):
    _, docs = _real_embeddings()
    errors = []
    for m in (4, 12, 48):
      index = codes.train_pq(docs, m, num_centroids=32, num_iters=8)
      decoded = codes.pq_decode(index.codes, index.codebooks)
      errors.append(float(np.mean(np.sum((decoded - docs) ** 2, axis=1))))
    self.assertTrue(np.all(np.diff(errors) < 0), errors)

  def test_errors(self):
    x = np.zeros((10, 6), np.float32)
    with self.assertRaisesRegex(ValueError, "divide"):
      codes.train_pq(x, 4, num_centroids=2)
    with self.assertRaisesRegex(ValueError, "at least num_clusters"):
      codes.train_pq(x, 3, num_centroids=16)
    with self.assertRaisesRegex(ValueError, "subspaces"):
      codes.pq_decode(np.zeros((2, 3), np.uint8), np.zeros((2, 4, 3)))


class JPQTest(parameterized.TestCase):

  def test_loss_matches_numpy(self):
    rng = np.random.default_rng(5)
    books = rng.normal(size=(3, 4, 2)).astype(np.float32)
    q = rng.normal(size=(5, 6)).astype(np.float32)
    pos = rng.integers(0, 4, size=(5, 3))
    neg = rng.integers(0, 4, size=(5, 2, 3))

    def decode(c):
      return np.concatenate([books[m, c[..., m]] for m in range(3)], -1)

    s_pos = np.sum(q * decode(pos), -1)
    s_neg = np.einsum("bd,bnd->bn", q, decode(neg))
    s_batch = q @ decode(pos).T
    logits = 2.0 * np.concatenate(
        [s_pos[:, None], s_neg,
         np.where(np.eye(5, dtype=bool), -np.inf, s_batch)], axis=1)
    softmax = np.mean(
        np.log(np.sum(np.exp(logits), 1)) - logits[:, 0]
    )
    pairwise = np.mean(np.log1p(np.exp(2.0 * (s_neg - s_pos[:, None]))))
    args = (jnp.asarray(q), jnp.asarray(books), pos, neg)
    # Jitted, as in training (one compile per variant, not one per op).
    loss = jax.jit(codes.jpq_loss, static_argnames=("in_batch", "loss"))
    self.assertAlmostEqual(
        float(loss(*args, scale=2.0)), softmax, places=5
    )
    self.assertAlmostEqual(
        float(loss(*args, scale=2.0, loss="pairwise")), pairwise,
        places=5,
    )
    no_batch = np.mean(
        np.log(np.sum(np.exp(logits[:, :3]), 1)) - logits[:, 0]
    )
    self.assertAlmostEqual(
        float(loss(*args, scale=2.0, in_batch=False)), no_batch,
        places=5,
    )
    # Only the centroids the documents use receive a gradient.
    grad = jax.jit(jax.grad(lambda b: codes.jpq_loss(args[0], b, pos, neg)))(
        args[1])
    used = np.zeros((3, 4), bool)
    for c in np.concatenate([pos, neg.reshape(-1, 3)]):
      used[np.arange(3), c] = True
    norms = np.linalg.norm(np.asarray(grad), axis=-1)
    self.assertTrue(np.all(norms[~used] == 0))
    self.assertTrue(np.all(norms[used] > 0))

  def test_straight_through(self):
    rng = np.random.default_rng(6)
    books = jnp.asarray(rng.normal(size=(2, 8, 3)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    x_hat, c = jax.jit(codes.quantize_straight_through)(x, books)
    np.testing.assert_array_equal(x_hat, codes.pq_decode(c, books))
    w = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    gx, gb = jax.jit(jax.grad(
        lambda x, b: jnp.sum(w * codes.quantize_straight_through(x, b)[0]),
        argnums=(0, 1),
    ))(x, books)
    np.testing.assert_allclose(gx, w)  # Identity: straight through.
    self.assertGreater(float(jnp.abs(gb).sum()), 0)

  def test_negatives_skip_the_positive(self):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    index = codes.train_pq(x, 2, num_centroids=8, num_iters=3)
    _, top = codes.pq_search(x[:5], index, 4)
    positives = np.asarray(top)[:, 1]  # Drop the rank-2 document.
    neg = np.asarray(codes.jpq_negatives(x[:5], index, positives, 3))
    np.testing.assert_array_equal(neg, np.asarray(top)[:, [0, 2, 3]])

  def test_joint_training_improves_pq_recall_on_real_data(self):
    queries, docs = _real_embeddings()
    # A coarse PQ (8 subspaces x 16 centroids: 8 bytes a document) loses
    # much of the exact search's quality, which leaves room to recover.
    index = codes.train_pq(docs, 8, num_centroids=16)
    positives = np.arange(200)

    def recall_at_10(query_vectors, codebooks):
      _, top = codes.pq_search(
          query_vectors, codes.PQIndex(codebooks, index.codes), 10
      )
      return np.mean(np.any(np.asarray(top) == positives[:, None], axis=1))

    def encode(params, x):  # Query encoder: MiniLM + a trainable residual.
      return x + x @ params["query"]

    params = {"codebooks": index.codebooks, "query": jnp.zeros((384, 384))}
    tx = optax.multi_transform(
        {"codebooks": optax.adam(3e-4), "query": optax.adam(3e-5)},
        {"codebooks": "codebooks", "query": "query"},
    )
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, pos, neg):
      def loss_fn(p):
        return codes.jpq_loss(
            encode(p, x), p["codebooks"], index.codes[pos], index.codes[neg]
        )

      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss

    before = recall_at_10(queries, index.codebooks)
    rng = np.random.default_rng(0)
    for _ in range(60):
      batch = rng.choice(200, size=32, replace=False)
      x = jnp.asarray(queries[batch])
      # End-to-end negatives: the current index's top documents.
      neg = codes.jpq_negatives(
          encode(params, x),
          codes.PQIndex(params["codebooks"], index.codes),
          batch,
          8,
      )
      params, state, _ = step(params, state, x, batch, neg)
    after = recall_at_10(
        encode(params, jnp.asarray(queries)), params["codebooks"]
    )
    self.assertGreater(after, before + 0.15, (before, after))
    # The codes never changed; only centroids (and the query side) moved.
    self.assertFalse(np.allclose(params["codebooks"], index.codebooks))


if __name__ == "__main__":
  absltest.main()
