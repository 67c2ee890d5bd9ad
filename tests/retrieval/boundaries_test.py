"""Boundary cases of `lowrank.retrieval.metrics` and `.search`.

Each case asserts an error type and a message fragment, or the correct
answer (compared with pytrec_eval where it defines one).
"""

import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytrec_eval

from lowrank import sharding
from lowrank.retrieval import metrics
from lowrank.retrieval import search

P = jax.sharding.PartitionSpec
NAN = math.nan
INF = math.inf

# Our name -> pytrec_eval measure (its output key is our name).
_PYTREC = {
    "ndcg_cut_10": "ndcg_cut.10",
    "ndcg": "ndcg",
    "recall_10": "recall.10",
    "P_5": "P.5",
    "recip_rank": "recip_rank",
    "map": "map",
    "map_cut_10": "map_cut.10",
    "success_1": "success.1",
}


def _pytrec(qrels, run):
  evaluator = pytrec_eval.RelevanceEvaluator(qrels, set(_PYTREC.values()))
  return evaluator.evaluate(run)


def _random_case(seed, num_queries=60, special=None, rate=0.1):
  """Graded qrels and a run; `special` scores replace a `rate` of scores."""
  rng = np.random.default_rng(seed)
  qrels, run = {}, {}
  for q in range(num_queries):
    qid = f"q{q}"
    size = int(rng.choice([1, 2, 5, 30, 200]))
    pool = [f"d{i}" for i in rng.choice(1000, size=size, replace=False)]
    judged = pool[: int(rng.integers(1, size + 1))]
    qrels[qid] = {
        d: int(l) for d, l in zip(judged, rng.choice([0, 1, 2], len(judged)))
    }
    scores = rng.normal(size=size)
    if special is not None:
      mask = rng.random(size) < rate
      scores[mask] = rng.choice(special, size=int(mask.sum()))
    run[qid] = {d: float(s) for d, s in zip(rng.permutation(pool), scores)}
  return qrels, run


class MetricsBoundaryTest(parameterized.TestCase):

  def assert_matches_pytrec(self, qrels, ours_run, pytrec_run, **kwargs):
    expected = _pytrec(qrels, pytrec_run)
    ours = metrics.evaluate_per_query(qrels, ours_run, list(_PYTREC), **kwargs)
    self.assertEqual(set(ours), set(expected))
    for qid, values in expected.items():
      for name in _PYTREC:
        self.assertAlmostEqual(
            ours[qid][name], values[name], delta=1e-9, msg=(qid, name)
        )

  # --- NaN scores -----------------------------------------------------------

  def test_nan_score_of_a_relevant_document_raises(self):
    # Before: reciprocal rank 1.0 (the NaN document came out first).
    run = {"q": {"a": NAN, "b": 1.0, "c": 2.0}}
    with self.assertRaisesRegex(
        ValueError, r"run\['q'\]\['a'\] is NaN.*nan_policy='omit'"
    ):
      metrics.evaluate({"q": {"a": 1}}, run, ["recip_rank"])

  def test_nan_score_of_an_unjudged_document_raises_too(self):
    # A NaN anywhere in the ranking moves the other documents in trec_eval.
    run = {"q": {"a": 1.0, "x": NAN}, "r": {"b": 1.0}}
    with self.assertRaisesRegex(ValueError, r"\['q'\]\['x'\] is NaN"):
      metrics.evaluate_per_query({"q": {"a": 1}, "r": {"b": 1}}, run)

  def test_nan_in_a_query_outside_qrels_is_not_read(self):
    run = {"q": {"a": 1.0}, "other": {"a": NAN}}
    self.assertEqual(
        metrics.evaluate({"q": {"a": 1}}, run, ["recip_rank"]),
        {"recip_rank": 1.0},
    )

  @parameterized.parameters(0, 1, 2)
  def test_nan_policy_omit_equals_pytrec_eval_without_them(self, seed):
    qrels, run = _random_case(seed, special=[NAN], rate=0.2)
    self.assertTrue(any(math.isnan(s) for r in run.values() for s in
                        r.values()))
    dropped = {
        q: {d: s for d, s in r.items() if not math.isnan(s)}
        for q, r in run.items()
    }
    self.assert_matches_pytrec(qrels, run, dropped, nan_policy="omit")

  @parameterized.parameters(0, 1, 2)
  def test_nan_policy_last_equals_pytrec_eval_with_minus_inf(self, seed):
    qrels, run = _random_case(seed + 10, special=[NAN], rate=0.2)
    replaced = {
        q: {d: -INF if math.isnan(s) else s for d, s in r.items()}
        for q, r in run.items()
    }
    self.assert_matches_pytrec(qrels, run, replaced, nan_policy="last")

  def test_unknown_nan_policy(self):
    with self.assertRaisesRegex(ValueError, "nan_policy must be one of"):
      metrics.evaluate({"q": {"a": 1}}, {"q": {"a": 1.0}}, nan_policy="drop")

  # --- Infinite and float64 scores -------------------------------------------

  @parameterized.parameters(0, 1)
  def test_infinite_scores_match_pytrec_eval(self, seed):
    qrels, run = _random_case(seed + 20, special=[INF, -INF, 1e39], rate=0.3)
    self.assert_matches_pytrec(qrels, run, run)

  def test_scores_are_compared_as_float32_like_trec_eval(self):
    # trec_eval keeps scores in a C float: 1 + 1e-12 ties with 1, and the
    # tie goes to the larger document id.
    qrels = {"q": {"b": 1}, "r": {"b": 1}}
    run = {
        "q": {"b": 1.0, "a": 1.0 + 1e-12},  # A float32 tie: b first.
        "r": {"b": 1.0, "a": 1.0 + 2e-7},  # Distinct in float32: a first.
    }
    self.assert_matches_pytrec(qrels, run, run)
    per_query = metrics.evaluate_per_query(qrels, run, "recip_rank")
    self.assertEqual(per_query["q"]["recip_rank"], 1.0)
    self.assertEqual(per_query["r"]["recip_rank"], 0.5)

  def test_none_score_raises_type_error(self):
    with self.assertRaisesRegex(TypeError, r"\['q'\]\['a'\] = None.*number"):
      metrics.evaluate({"q": {"a": 1}}, {"q": {"a": None, "b": 2.0}})
    with self.assertRaisesRegex(TypeError, "'high' is a str, not a number"):
      metrics.evaluate({"q": {"a": 1}}, {"q": {"a": "high"}})

  # --- Id types -------------------------------------------------------------

  def test_int_query_ids_against_str_qrels(self):
    # Before: a silent 0.0.
    with self.assertRaisesRegex(
        TypeError, r"run query ids are int.*qrels query ids are str.*str\(\)"
    ):
      metrics.evaluate({"1": {"a": 1}}, {1: {"a": 1.0}}, ["recip_rank"])

  def test_int_doc_ids_against_str_qrels(self):
    with self.assertRaisesRegex(
        TypeError, r"run document ids are int.*qrels document ids are str"
    ):
      metrics.evaluate({"1": {"7": 1}}, {"1": {7: 1.0}}, ["recip_rank"])

  def test_mixed_query_id_types_in_one_run(self):
    with self.assertRaisesRegex(TypeError, r"run query ids mix types.*'1'.*2"):
      metrics.evaluate({"1": {"a": 1}}, {"1": {"a": 1.0}, 2: {"a": 1.0}})

  def test_mixed_doc_id_types_in_one_ranking(self):
    with self.assertRaisesRegex(TypeError, "run document ids mix types"):
      metrics.evaluate({"1": {"a": 1}}, {"1": {"a": 1.0, 3: 0.5}})

  def test_mixed_id_types_in_qrels(self):
    with self.assertRaisesRegex(TypeError, "qrels document ids mix types"):
      metrics.evaluate({"1": {"a": 1, 2: 1}}, {"1": {"a": 1.0}})

  def test_consistent_int_ids_equal_their_str_conversion(self):
    # Ties between int ids follow str order ("9" > "10"), as the str()
    # converted dicts in pytrec_eval.
    qrels = {1: {10: 1, 3: 2}, 2: {9: 1}}
    run = {1: {9: 1.0, 10: 1.0, 3: 0.5}, 2: {9: 2.0, 10: 2.0}}
    as_str = lambda x: {str(q): {str(d): v for d, v in r.items()}
                        for q, r in x.items()}
    ours = metrics.evaluate_per_query(qrels, run, list(_PYTREC))
    expected = _pytrec(as_str(qrels), as_str(run))
    for qid in qrels:
      for name in _PYTREC:
        self.assertAlmostEqual(
            ours[qid][name], expected[str(qid)][name], delta=1e-12
        )
    self.assertEqual(ours[1]["recip_rank"], 0.5)  # "9" ranks above "10".

  # --- Empty runs and queries -----------------------------------------------

  def test_empty_run_raises(self):
    with self.assertRaisesRegex(ValueError, "run holds no queries"):
      metrics.evaluate({"q": {"a": 1}}, {}, ["map"])

  def test_run_sharing_no_query_id_raises(self):
    with self.assertRaisesRegex(ValueError, "share no query id.*'Q1'.*'q1'"):
      metrics.evaluate({"q1": {"a": 1}}, {"Q1": {"a": 1.0}}, ["map"])

  def test_empty_ranking_scores_zero_like_pytrec_eval(self):
    qrels = {"q": {"a": 1}, "r": {"b": 1}}
    run = {"q": {}, "r": {"b": 1.0}}
    self.assert_matches_pytrec(qrels, run, run)
    self.assertEqual(metrics.evaluate(qrels, run, "map"), {"map": 0.5})

  def test_query_without_judgments_is_left_out_like_pytrec_eval(self):
    qrels = {"q": {"a": 1}, "empty": {}}
    run = {"q": {"a": 1.0}, "empty": {"a": 1.0}}
    self.assert_matches_pytrec(qrels, run, run)  # Keys equal too.
    self.assertEqual(metrics.evaluate(qrels, run, "map"), {"map": 1.0})
    with self.assertRaisesRegex(ValueError, "no queries with judged"):
      metrics.evaluate({"empty": {}}, run, "map")

  def test_missing_query_counts_zero_and_pytrec_eval_drops_it(self):
    # Documented difference: pytrec_eval leaves "r" out of its output.
    qrels = {"q": {"a": 1}, "r": {"b": 1}}
    run = {"q": {"a": 1.0}}
    self.assertEqual(set(_pytrec(qrels, run)), {"q"})
    per_query = metrics.evaluate_per_query(qrels, run, "recip_rank")
    self.assertEqual(per_query["r"], {"recip_rank": 0.0})
    self.assertEqual(metrics.evaluate(qrels, run, "recip_rank"),
                     {"recip_rank": 0.5})

  def test_run_that_is_not_a_mapping_of_mappings(self):
    with self.assertRaisesRegex(TypeError, r"run\['q'\] must be a"):
      metrics.evaluate({"q": {"a": 1}}, {"q": ["a"]})

  # --- Metric names ---------------------------------------------------------

  def test_single_metric_as_plain_string(self):
    qrels, run = {"q": {"a": 1}}, {"q": {"b": 2.0, "a": 1.0}}
    # Before: "Unknown metric 'n'".
    self.assertEqual(metrics.evaluate(qrels, run, "ndcg@10"),
                     metrics.evaluate(qrels, run, ["ndcg@10"]))
    self.assertEqual(metrics.evaluate(qrels, run, "recip_rank"),
                     {"recip_rank": 0.5})

  def test_unknown_metric_lists_the_known_names(self):
    with self.assertRaisesRegex(
        ValueError, r"Unknown metric 'ndcg_cut\.10' \(trec_eval's "
        r"'ndcg_cut\.10' is spelled 'ndcg_cut_10' here\).*recip_rank.*"
        r"success_<k>.*ndcg@<k>"
    ):
      metrics.evaluate({"q": {"a": 1}}, {"q": {"a": 1.0}}, "ndcg_cut.10")

  def test_metric_names_must_be_strings(self):
    with self.assertRaisesRegex(TypeError, "metric names must be strings"):
      metrics.evaluate({"q": {"a": 1}}, {"q": {"a": 1.0}}, ["map", 10])

  # --- Relevance labels ------------------------------------------------------

  def test_integral_float_labels_equal_int_labels(self):
    run = {"q": {"a": 2.0, "b": 1.0, "c": 0.5}}
    floats = {"q": {"a": 1.0, "b": 2.0, "c": np.float32(0.0)}}
    ints = {"q": {"a": 1, "b": 2, "c": 0}}
    self.assertEqual(metrics.evaluate(floats, run, list(_PYTREC)),
                     metrics.evaluate(ints, run, list(_PYTREC)))

  @parameterized.named_parameters(
      ("fraction", 1.5, ValueError, "1.5 is not a whole number"),
      ("nan", NAN, ValueError, "nan is not a whole number"),
      ("string", "1", TypeError, "'1' is a str; relevance labels must be"),
      ("none", None, TypeError, "None is a NoneType"),
  )
  def test_bad_label(self, label, error, fragment):
    with self.assertRaisesRegex(error, r"qrels\['q'\]\['a'\] = " + fragment):
      metrics.evaluate({"q": {"a": label}}, {"q": {"a": 1.0}})


def _int_docs(seed=0, n=16, d=4):
  rng = np.random.default_rng(seed)
  return rng.integers(-2, 3, size=(n, d)).astype(np.float32)


class SearchBoundaryTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("whole", None), ("streamed", 3), ("one_block", 64)
  )
  def test_nan_corpus_row_raises(self, block_size):
    docs = _int_docs()
    docs[5, 1] = NAN  # Before: document 5 was every query's top-1.
    with self.assertRaisesRegex(
        ValueError,
        r"corpus row 5 is not finite \(it holds nan; non-finite rows of "
        r"corpus: 1 of 16\)",
    ):
      search.topk(docs[:3] + 0.5, docs, 4, block_size=block_size)

  def test_nan_corpus_row_raises_when_sharded(self):
    docs = _int_docs(n=64)
    docs[37, 0] = NAN
    mesh = sharding.make_mesh([(a, 8 if a == "data" else 1)
                               for a in sharding.MESH_AXES])
    sharded = jax.device_put(docs, jax.NamedSharding(mesh, P("data", None)))
    with self.assertRaisesRegex(ValueError, "corpus row 37 is not finite"):
      search.topk(np.ones((2, 4), np.float32), sharded, 5, block_size=2)

  def test_infinite_query_row_raises(self):
    queries = np.ones((3, 4), np.float32)
    queries[2, 3] = -INF
    with self.assertRaisesRegex(ValueError, "queries row 2 is not finite"):
      search.topk(queries, _int_docs(), 2)
    with self.assertRaisesRegex(ValueError, "queries row 2 is not finite"):
      search.exact_search(queries, _int_docs(), 2, query_chunk=2)

  def test_minus_inf_corpus_row_in_the_top_k_raises(self):
    # Before: the streamed search returned index -1 (the mask's) for it.
    docs = np.eye(4, dtype=np.float32)
    docs[2, 0] = -INF
    with self.assertRaisesRegex(ValueError, "corpus row 2 is not finite"):
      search.topk(np.ones((2, 4), np.float32), docs, 4, block_size=2)
    # Out of the top k it cannot change the result: exact answer, no error.
    _, indices = search.topk(np.ones((2, 4), np.float32), docs, 2,
                             block_size=2)
    np.testing.assert_array_equal(indices, [[0, 1], [0, 1]])

  def test_search_run_names_the_document_row(self):
    docs = _int_docs()
    docs[9] = INF
    with self.assertRaisesRegex(ValueError, "docs row 9 is not finite"):
      search.search_run(["q"], np.ones((1, 4)), [f"d{i}" for i in range(16)],
                        docs, k=3)

  def test_overflowing_scores_raise(self):
    big = np.full((2, 4), 1e20, np.float32)
    with self.assertRaisesRegex(ValueError, "overflow float32.*L2-normalise"):
      search.topk(big, big, 1)

  def test_check_finite_false_skips_the_check(self):
    docs = _int_docs()
    docs[5] = NAN
    scores, indices = search.topk(np.ones((1, 4)), docs, 1,
                                  check_finite=False)
    self.assertTrue(np.isnan(scores[0, 0]))
    self.assertEqual(int(indices[0, 0]), 5)

  def test_under_jit_the_check_is_skipped(self):
    # Documented: traced inputs cannot raise.
    docs = _int_docs()
    docs[5] = NAN
    fn = jax.jit(lambda q, d: search.topk(q, d, 1)[1])
    self.assertEqual(int(fn(jnp.ones((1, 4)), docs)[0, 0]), 5)

  @parameterized.named_parameters(
      ("topk", search.topk), ("exact_search", search.exact_search)
  )
  def test_one_dimensional_input(self, fn):
    with self.assertRaisesRegex(ValueError, r"2-D.*shape \(4,\).*v\[None, :\]"):
      fn(np.ones(4, np.float32), _int_docs(), 1)

  @parameterized.named_parameters(
      ("topk", search.topk), ("exact_search", search.exact_search)
  )
  def test_dimension_mismatch(self, fn):
    with self.assertRaisesRegex(ValueError, "queries have dimension 3 but"):
      fn(np.ones((2, 3), np.float32), _int_docs(), 1)

  @parameterized.named_parameters(
      ("k_above_n", 17, ValueError, r"1 <= k <= N = 16.*at most N"),
      ("k_zero", 0, ValueError, r"got k = 0\. Ask for at least one"),
      ("k_float", 2.0, TypeError, "k must be an integer; got 2.0"),
      ("k_bool", True, TypeError, "k must be an integer; got True"),
  )
  def test_bad_k(self, k, error, fragment):
    for fn in (search.topk, search.exact_search):
      with self.assertRaisesRegex(error, fragment):
        fn(np.ones((2, 4), np.float32), _int_docs(), k)

  def test_empty_corpus(self):
    with self.assertRaisesRegex(ValueError, "corpus is empty"):
      search.topk(np.ones((2, 4), np.float32), np.zeros((0, 4)), 1)

  def test_complex_input(self):
    with self.assertRaisesRegex(TypeError, "real floats or integers.*complex"):
      search.topk(np.ones((2, 4), np.complex64), _int_docs(), 1)

  def test_bad_block_size(self):
    with self.assertRaisesRegex(TypeError, "block_size must be an integer"):
      search.topk(np.ones((2, 4), np.float32), _int_docs(), 1, block_size=2.5)
    with self.assertRaisesRegex(ValueError, "block_size must be positive"):
      search.topk(np.ones((2, 4), np.float32), _int_docs(), 1, block_size=0)

  def test_integer_inputs_equal_float_inputs(self):
    docs = _int_docs()
    queries = docs[:3] + 1
    got = search.topk(queries.astype(np.int8), docs.astype(np.int8), 5)
    want = search.topk(queries, docs, 5)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


if __name__ == "__main__":
  absltest.main()
