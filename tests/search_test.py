"""Tests for `lowrank.retrieval.search`."""

from absl.testing import absltest
from absl.testing import parameterized
import jax.numpy as jnp
import numpy as np

from lowrank.retrieval import metrics
from lowrank.retrieval import search

_CASES = (
    # name, Q, N, D, k, query_chunk, doc_chunk
    ("n_not_divisible", 7, 100, 16, 5, 3, 32),
    ("k_above_chunk", 10, 33, 8, 20, 4, 7),
    ("k_equals_n", 5, 50, 4, 50, 5, 64),
    ("one_chunk_each", 6, 40, 8, 3, 512, 8192),
    ("k_above_every_chunk", 9, 70, 8, 45, 2, 16),
    ("single", 1, 1, 4, 1, 1, 1),
    ("bigger", 64, 1000, 32, 100, 16, 128),
)


def _brute_force(queries, docs, k):
  """numpy top-k; ties: lower index first (a stable sort of -score)."""
  scores = queries.astype(np.float64) @ docs.T.astype(np.float64)
  indices = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, indices, axis=1), indices


class ExactSearchTest(parameterized.TestCase):

  @parameterized.named_parameters(*_CASES)
  def test_matches_brute_force_with_ties(self, q, n, d, k, qc, dc):
    # Small integers: every score is exact in float32, and ties are common,
    # so the documented tie order (lower index first) is checked too.
    rng = np.random.default_rng(q * n + k)
    queries = rng.integers(-2, 3, size=(q, d)).astype(np.float32)
    docs = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
    scores, indices = search.exact_search(
        queries, docs, k, query_chunk=qc, doc_chunk=dc
    )
    self.assertEqual(scores.shape, (q, k))
    self.assertEqual(indices.shape, (q, k))
    self.assertEqual(scores.dtype, jnp.float32)
    self.assertEqual(indices.dtype, jnp.int32)
    ref_scores, ref_indices = _brute_force(queries, docs, k)
    np.testing.assert_array_equal(np.asarray(scores), ref_scores)
    np.testing.assert_array_equal(np.asarray(indices), ref_indices)

  @parameterized.named_parameters(*_CASES)
  def test_matches_brute_force_random(self, q, n, d, k, qc, dc):
    rng = np.random.default_rng(q + n + k)
    queries = rng.normal(size=(q, d)).astype(np.float32)
    docs = rng.normal(size=(n, d)).astype(np.float32)
    scores, indices = search.exact_search(
        queries, docs, k, query_chunk=qc, doc_chunk=dc
    )
    ref_scores, ref_indices = _brute_force(queries, docs, k)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    # Compare indices where the float32 rounding cannot reorder neighbours.
    full = np.sort(queries.astype(np.float64) @ docs.T.astype(np.float64))
    full = full[:, ::-1]
    gap_before = np.diff(full, axis=1, prepend=np.inf)[:, :k]
    gap_after = -np.diff(full, axis=1, append=-np.inf)[:, :k]
    untied = (np.abs(gap_before) > 1e-4) & (np.abs(gap_after) > 1e-4)
    self.assertGreater(untied.mean(), 0.9)
    np.testing.assert_array_equal(
        np.asarray(indices)[untied], ref_indices[untied]
    )

  def test_compiles_once_per_shape(self):
    rng = np.random.default_rng(0)
    docs = rng.normal(size=(50, 8)).astype(np.float32)
    before = search.exact_search._cache_size()
    for _ in range(3):
      queries = rng.normal(size=(6, 8)).astype(np.float32)
      search.exact_search(queries, docs, 7, query_chunk=4, doc_chunk=16)
    self.assertEqual(search.exact_search._cache_size(), before + 1)

  def test_bfloat16_inputs_give_float32_scores(self):
    queries = jnp.ones((3, 8), jnp.bfloat16)
    docs = jnp.arange(40, dtype=jnp.bfloat16).reshape(5, 8)
    scores, indices = search.exact_search(queries, docs, 2, doc_chunk=2)
    self.assertEqual(scores.dtype, jnp.float32)
    np.testing.assert_array_equal(indices, [[4, 3]] * 3)

  def test_k_out_of_range(self):
    docs = np.zeros((4, 2), np.float32)
    with self.assertRaisesRegex(ValueError, "k <= N"):
      search.exact_search(docs, docs, 5)
    with self.assertRaisesRegex(ValueError, "k <= N"):
      search.exact_search(docs, docs, 0)


class SearchRunTest(absltest.TestCase):

  def test_self_retrieval_is_perfect_and_k_is_clipped(self):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(30, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    doc_ids = [f"d{i}" for i in range(30)]
    query_ids = [f"q{i}" for i in range(30)]
    run = search.search_run(query_ids, emb, doc_ids, emb, k=100, doc_chunk=8)
    self.assertEqual(list(run), query_ids)
    self.assertTrue(all(len(r) == 30 for r in run.values()))
    qrels = {q: {d: 1} for q, d in zip(query_ids, doc_ids)}
    values = metrics.evaluate(qrels, run, ["recip_rank", "ndcg_cut_10"])
    self.assertEqual(values, {"recip_rank": 1.0, "ndcg_cut_10": 1.0})

  def test_id_count_mismatch(self):
    emb = np.zeros((3, 2), np.float32)
    with self.assertRaisesRegex(ValueError, "query ids"):
      search.search_run(["a"], emb, ["x", "y", "z"], emb, k=1)


if __name__ == "__main__":
  absltest.main()
