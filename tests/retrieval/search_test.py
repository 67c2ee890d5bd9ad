"""Tests for `lowrank.retrieval.search`."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from lowrank import sharding
from lowrank.retrieval import metrics
from lowrank.retrieval import search

P = jax.sharding.PartitionSpec

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
    jitted = search._exact_search  # pylint: disable=protected-access
    before = jitted._cache_size()
    for _ in range(3):
      queries = rng.normal(size=(6, 8)).astype(np.float32)
      search.exact_search(queries, docs, 7, query_chunk=4, doc_chunk=16)
    self.assertEqual(jitted._cache_size(), before + 1)

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


def _int_data(seed, q, n, d):
  """Small integers: scores are exact in float32 and ties are common."""
  rng = np.random.default_rng(seed)
  queries = rng.integers(-2, 3, size=(q, d)).astype(np.float32)
  docs = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
  return queries, docs


class TopkTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # name, Q, N, D, k, block_size
      ("whole", 7, 100, 16, 5, None),
      ("blocks_not_dividing_n", 7, 100, 16, 5, 32),
      ("k_above_block", 10, 33, 8, 20, 7),
      ("k_equals_n", 5, 50, 4, 50, 16),
      ("block_of_one", 3, 9, 4, 4, 1),
      ("block_above_n", 4, 20, 4, 3, 64),
  )
  def test_matches_numpy_argsort_with_ties(self, q, n, d, k, block_size):
    queries, docs = _int_data(q * n + k, q, n, d)
    scores, indices = search.topk(queries, docs, k, block_size=block_size)
    self.assertEqual(scores.dtype, jnp.float32)
    self.assertEqual(indices.dtype, jnp.int32)
    ref_scores, ref_indices = _brute_force(queries, docs, k)
    ties = np.mean(ref_scores[:, 1:] == ref_scores[:, :-1]) if k > 1 else 1
    self.assertGreater(ties, 0.0)  # The tie order is really exercised.
    np.testing.assert_array_equal(np.asarray(scores), ref_scores)
    np.testing.assert_array_equal(np.asarray(indices), ref_indices)

  def test_streaming_equals_whole_on_float_data(self):
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(9, 24)).astype(np.float32)
    docs = rng.normal(size=(301, 24)).astype(np.float32)
    whole = search.topk(queries, docs, 40)
    for block_size in (1, 16, 50, 300):
      streamed = search.topk(queries, docs, 40, block_size=block_size)
      np.testing.assert_allclose(streamed[0], whole[0], rtol=1e-6)
      np.testing.assert_array_equal(streamed[1], whole[1])
    same = search.exact_search(queries, docs, 40, query_chunk=4, doc_chunk=64)
    np.testing.assert_array_equal(same[1], whole[1])

  @parameterized.named_parameters(
      # name, mesh axes, corpus spec, block_size
      ("rows_8", {"data": 8}, P("data", None), None),
      ("rows_8_streamed", {"data": 8}, P("data", None), 3),
      ("rows_2x4", {"data": 2, "fsdp": 4}, P(("data", "fsdp"), None), 5),
      ("rows_4_cols_2", {"data": 4, "tensor": 2}, P("data", "tensor"), None),
      ("cols_8", {"tensor": 8}, P(None, "tensor"), 7),
  )
  def test_sharded_equals_unsharded(self, axes, spec, block_size):
    # k = 20 exceeds the 8 rows of each of 8 shards: the merge must take
    # whole shards.
    queries, docs = _int_data(3, 6, 64, 16)
    ref = search.topk(queries, docs, 20)
    full_axes = [(a, axes.get(a, 1)) for a in sharding.MESH_AXES]
    mesh = sharding.make_mesh(full_axes)
    sharded_docs = jax.device_put(docs, jax.NamedSharding(mesh, spec))
    self.assertLen(sharded_docs.sharding.device_set, 8)
    scores, indices = search.topk(
        queries, sharded_docs, 20, block_size=block_size
    )
    self.assertTrue(scores.sharding.is_fully_replicated)
    np.testing.assert_array_equal(np.asarray(scores), np.asarray(ref[0]))
    np.testing.assert_array_equal(np.asarray(indices), np.asarray(ref[1]))
    np.testing.assert_array_equal(
        np.asarray(indices), _brute_force(queries, docs, 20)[1]
    )

  def test_streamed_memory_is_bounded_by_block_size(self):
    num_queries, dim, k, block = 8, 16, 10, 256

    def temp_bytes(num_docs, block_size):
      compiled = search._topk_single.lower(  # pylint: disable=protected-access
          jax.ShapeDtypeStruct((num_queries, dim), jnp.float32),
          jax.ShapeDtypeStruct((num_docs, dim), jnp.float32),
          k,
          block_size,
          jax.lax.Precision.HIGHEST,
      ).compile()
      return compiled.memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(4096, block), temp_bytes(65536, block)
    whole = temp_bytes(65536, None)
    # The streamed buffers do not grow with N (16x more documents) ...
    self.assertLessEqual(large, small * 1.1)
    # ... are of the order of one block of scores plus the running top-k ...
    self.assertLess(large, 8 * num_queries * (block + k) * 4)
    # ... while the unstreamed version holds the [Q, N] score matrix.
    self.assertGreaterEqual(whole, num_queries * 65536 * 4)

  def test_errors(self):
    docs = np.zeros((4, 2), np.float32)
    with self.assertRaisesRegex(ValueError, "k <= N"):
      search.topk(docs, docs, 5)
    with self.assertRaisesRegex(ValueError, "block_size"):
      search.topk(docs, docs, 1, block_size=0)
    with self.assertRaisesRegex(ValueError, "dimension 3"):
      search.topk(np.zeros((1, 3), np.float32), docs, 1)


def _tied_case(seed, num_queries=300):
  """Runs with many exact score ties, self hits and a missing query."""
  rng = np.random.default_rng(seed)
  qrels, run = {}, {}
  for q in range(num_queries):
    qid = f"q{q}"
    pool = [f"d{i}" for i in rng.choice(400, size=60, replace=False)]
    pool.append(qid)  # The query id can be a document id too.
    rng.shuffle(pool)
    judged = pool[: int(rng.integers(1, 12))]
    qrels[qid] = {d: int(l) for d, l in zip(
        judged, rng.choice([-1, 0, 1, 2, 3], size=len(judged)))}
    if q % 17 == 3:
      continue  # Missing from the run.
    retrieved = pool[: int(rng.integers(1, len(pool)))]
    # Coarse scores: about half the queries have ties.
    levels = 8 if q % 2 else 10**6
    run[qid] = {
        d: float(s) for d, s in zip(
            retrieved, rng.integers(0, levels, len(retrieved)) / 4)
    }
  return qrels, run


class VectorisedMetricsTest(parameterized.TestCase):
  """`metrics.evaluate_per_query` (vectorised) vs the per-query reference."""

  @parameterized.product(
      ignore_identical_ids=(False, True),
      gains=("linear", "exp2"),
      relevance_level=(1, 2),
  )
  def test_equals_reference_incl_ties(
      self, ignore_identical_ids, gains, relevance_level
  ):
    qrels, run = _tied_case(relevance_level)
    names = [
        "ndcg_cut_10", "ndcg", "recall_5", "P_10", "map", "map_cut_5",
        "recip_rank", "mrr_cut_3", "success_1",
    ]
    # pylint: disable-next=protected-access
    parsed = [(n, *metrics._parse_metric(n)) for n in names]
    ours = metrics.evaluate_per_query(
        qrels, run, names, ignore_identical_ids=ignore_identical_ids,
        gains=gains, relevance_level=relevance_level,
    )
    self.assertEqual(list(ours), list(qrels))
    for qid, judged in qrels.items():
      ranking = run.get(qid, {})
      if ignore_identical_ids:
        ranking = {d: s for d, s in ranking.items() if d != qid}
      expected = metrics._query_metrics(  # pylint: disable=protected-access
          judged, ranking, parsed, gains=gains,
          relevance_level=relevance_level,
      )
      for name in names:
        self.assertAlmostEqual(
            ours[qid][name], expected[name], delta=1e-12, msg=(qid, name)
        )


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
