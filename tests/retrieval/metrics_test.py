"""Tests for `lowrank.retrieval.metrics`, against pytrec_eval (trec_eval)."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytrec_eval

from lowrank.retrieval import metrics

# Our name -> pytrec_eval measure.
_PYTREC_MEASURES = {
    "ndcg_cut_10": "ndcg_cut.10",
    "ndcg_cut_100": "ndcg_cut.100",
    "ndcg": "ndcg",
    "recall_10": "recall.10",
    "recall_100": "recall.100",
    "P_10": "P.10",
    "recip_rank": "recip_rank",
    "map": "map",
    "map_cut_10": "map_cut.10",
    "success_10": "success.10",
}


def _random_case(seed: int, num_queries: int = 400):
  """Graded qrels and an UNTIED run (distinct scores in every query)."""
  rng = np.random.default_rng(seed)
  qrels, run = {}, {}
  for q in range(num_queries):
    qid = f"q{q}"
    pool = [f"d{i}" for i in rng.choice(5000, size=300, replace=False)]
    num_judged = int(rng.integers(1, 40))
    # Labels -1..3; some queries end up with no relevant document at all.
    labels = rng.choice([-1, 0, 0, 1, 2, 3], size=num_judged)
    if q % 10 == 0:
      labels = np.zeros_like(labels)
    qrels[qid] = {d: int(l) for d, l in zip(pool[:num_judged], labels)}
    # The run mixes judged and unjudged documents and misses some relevant.
    retrieved = rng.permutation(pool[: int(rng.integers(1, 300))])
    scores = rng.choice(10**6, size=len(retrieved), replace=False) / 7.0
    run[qid] = {d: float(s) for d, s in zip(retrieved, scores)}
  return qrels, run


class EvaluateTest(parameterized.TestCase):

  @parameterized.parameters(1, 2)
  def test_matches_pytrec_eval_on_untied_runs(self, relevance_level):
    qrels, run = _random_case(seed=relevance_level)
    names = list(_PYTREC_MEASURES)
    evaluator = pytrec_eval.RelevanceEvaluator(
        qrels,
        set(_PYTREC_MEASURES.values()),
        relevance_level=relevance_level,
    )
    expected = evaluator.evaluate(run)
    self.assertLen(expected, len(qrels))  # Every query is in the run.
    ours = metrics.evaluate_per_query(
        qrels, run, names, relevance_level=relevance_level
    )
    self.assertEqual(list(ours), list(qrels))
    for qid, values in ours.items():
      for name in names:
        self.assertAlmostEqual(
            values[name], expected[qid][name], delta=1e-9, msg=(qid, name)
        )
    means = metrics.evaluate(qrels, run, names, relevance_level=relevance_level)
    for name in names:
      self.assertAlmostEqual(
          means[name],
          np.mean([v[name] for v in expected.values()]),
          delta=1e-9,
          msg=name,
      )

  def test_tie_broken_by_docid_descending(self):
    qrels = {"q": {"a": 1}}
    run = {"q": {"a": 1.0, "b": 1.0}}
    expected = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(
        run
    )
    self.assertEqual(expected["q"]["recip_rank"], 0.5)
    self.assertEqual(
        metrics.evaluate(qrels, run, ["recip_rank"]), {"recip_rank": 0.5}
    )
    # String order, not numeric order: "9" > "10", so "9" ranks first.
    qrels, run = {"q": {"10": 1}}, {"q": {"9": 2.0, "10": 2.0}}
    expected = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(
        run
    )
    self.assertEqual(expected["q"]["recip_rank"], 0.5)
    self.assertEqual(
        metrics.evaluate(qrels, run, ["recip_rank"]), {"recip_rank": 0.5}
    )

  def test_missing_query_counts_zero(self):
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    run = {"q1": {"a": 3.0, "x": 2.0}, "q3": {"b": 1.0}}
    ours = metrics.evaluate(qrels, run, ["recip_rank", "ndcg_cut_10"])
    self.assertEqual(ours, {"recip_rank": 0.5, "ndcg_cut_10": 0.5})
    # pytrec_eval drops q2 (absent from the run); averaging its output would
    # give 1.0.
    pytrec = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run)
    self.assertEqual(set(pytrec), {"q1"})
    self.assertEqual(
        metrics.evaluate_per_query(qrels, run, ["recip_rank"])["q2"],
        {"recip_rank": 0.0},
    )

  def test_query_without_relevant_documents_counts_zero(self):
    qrels = {"q1": {"a": 1}, "q2": {"b": 0}}
    run = {"q1": {"a": 1.0}, "q2": {"b": 1.0}}
    names = ["ndcg_cut_10", "recall_10", "recip_rank", "map", "P_10"]
    pytrec = pytrec_eval.RelevanceEvaluator(
        qrels, {_PYTREC_MEASURES[n] for n in names}
    ).evaluate(run)
    self.assertEqual(set(pytrec), {"q1", "q2"})  # trec_eval keeps it too.
    per_query = metrics.evaluate_per_query(qrels, run, names)
    for name in names:
      self.assertEqual(per_query["q2"][name], 0.0)
      self.assertEqual(pytrec["q2"][name], 0.0)
    self.assertEqual(metrics.evaluate(qrels, run, ["map"]), {"map": 0.5})

  def test_ignore_identical_ids(self):
    qrels = {"q1": {"d1": 1}}
    run = {"q1": {"q1": 5.0, "d1": 1.0}}
    self.assertEqual(
        metrics.evaluate(qrels, run, ["recip_rank"]), {"recip_rank": 0.5}
    )
    self.assertEqual(
        metrics.evaluate(qrels, run, ["recip_rank"], ignore_identical_ids=True),
        {"recip_rank": 1.0},
    )

  def test_gains(self):
    qrels = {"q": {"a": 1, "b": 3, "c": 0}}
    run = {"q": {"a": 2.0, "b": 1.0, "c": 0.5}}
    log3 = math.log2(3)
    linear = metrics.evaluate(qrels, run, ["ndcg_cut_10"])["ndcg_cut_10"]
    self.assertAlmostEqual(linear, (1 + 3 / log3) / (3 + 1 / log3), delta=1e-12)
    exp2 = metrics.evaluate(qrels, run, ["ndcg_cut_10"], gains="exp2")
    self.assertAlmostEqual(
        exp2["ndcg_cut_10"], (1 + 7 / log3) / (7 + 1 / log3), delta=1e-12
    )

  def test_cut_metrics_by_hand(self):
    qrels = {"q": {"r1": 1, "r2": 1, "r3": 1}}
    run = {"q": {f"n{i}": 100.0 - i for i in range(20)}}
    run["q"].update({"r1": 97.5, "r2": 91.5})  # Ranks 4 and 11.
    values = metrics.evaluate(
        qrels,
        run,
        [
            "mrr_cut_3",
            "mrr_cut_10",
            "recip_rank",
            "success_3",
            "success_5",
            "P_10",
            "recall_10",
            "recall_100",
            "map",
            "map_cut_10",
        ],
    )
    self.assertEqual(values["mrr_cut_3"], 0.0)
    self.assertEqual(values["mrr_cut_10"], 0.25)
    self.assertEqual(values["recip_rank"], 0.25)
    self.assertEqual(values["success_3"], 0.0)
    self.assertEqual(values["success_5"], 1.0)
    self.assertAlmostEqual(values["P_10"], 0.1)
    self.assertAlmostEqual(values["recall_10"], 1 / 3)
    self.assertAlmostEqual(values["recall_100"], 2 / 3)
    self.assertAlmostEqual(values["map"], (1 / 4 + 2 / 11) / 3)
    self.assertAlmostEqual(values["map_cut_10"], (1 / 4) / 3)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "Unknown metric 'ndcg#10'"):
      metrics.evaluate({"q": {"a": 1}}, {}, ["ndcg#10"])

  def test_at_k_aliases(self):
    qrels = {"q": {"a": 1, "b": 2}, "r": {"c": 1}}
    run = {"q": {"a": 0.3, "x": 0.9, "b": 0.1}, "r": {"y": 1.0, "c": 0.5}}
    got = metrics.evaluate(
        qrels, run, ("ndcg@10", "MRR@10", "recall@100", "P@2", "map@100"))
    want = metrics.evaluate(
        qrels, run,
        ("ndcg_cut_10", "mrr_cut_10", "recall_100", "P_2", "map_cut_100"))
    self.assertEqual(list(got.values()), list(want.values()))
    self.assertIn("ndcg@10", got)
    with self.assertRaisesRegex(ValueError, "Unknown metric"):
      metrics.evaluate({"q": {"a": 1}}, {}, ["recall_0"])
    with self.assertRaisesRegex(ValueError, "no queries"):
      metrics.evaluate({}, {}, ["map"])


class RunFromScoresTest(absltest.TestCase):

  def test_full_matrix(self):
    run = metrics.run_from_scores(
        ["q1", "q2"], ["a", "b", "c"], np.array([[1, 2, 3], [3, 2, 1.5]])
    )
    self.assertEqual(
        run,
        {
            "q1": {"a": 1.0, "b": 2.0, "c": 3.0},
            "q2": {"a": 3.0, "b": 2.0, "c": 1.5},
        },
    )

  def test_top_k_scores_and_indices(self):
    run = metrics.run_from_scores(
        ["q1", "q2"],
        ["a", "b", "c"],
        np.array([[0.5, 0.25], [1.0, -np.inf]], np.float32),
        np.array([[2, 0], [1, -1]]),
    )
    self.assertEqual(run, {"q1": {"c": 0.5, "a": 0.25}, "q2": {"b": 1.0}})

  def test_indices_only_keep_rank_order(self):
    # Ids chosen so that trec_eval's docid tie-break would reverse them.
    run = metrics.run_from_scores(
        ["q"], ["a", "b", "c"], indices=np.array([[0, 1, 2]])
    )
    per_query = metrics.evaluate_per_query({"q": {"a": 1}}, run, ["recip_rank"])
    self.assertEqual(per_query["q"]["recip_rank"], 1.0)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "Pass scores"):
      metrics.run_from_scores(["q"], ["a"])
    with self.assertRaisesRegex(ValueError, r"\[Q, N\]"):
      metrics.run_from_scores(["q"], ["a", "b"], np.zeros((1, 3)))
    with self.assertRaisesRegex(ValueError, "twice"):
      metrics.run_from_scores(["q"], ["a", "b"], indices=np.array([[0, 0]]))


if __name__ == "__main__":
  absltest.main()
