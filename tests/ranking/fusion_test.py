"""Tests of lowrank/ranking/fusion.py (per-query normalisation, fuse, tune)."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from lowrank.ranking import fusion
from lowrank.retrieval import metrics


class NormalizeTest(parameterized.TestCase):

  def test_minmax(self):
    out = fusion.normalize({"a": 3.0, "b": 1.0, "c": 2.0}, "minmax")
    self.assertEqual(out, {"a": 1.0, "b": 0.0, "c": 0.5})

  def test_zscore_has_zero_mean_and_unit_std(self):
    scores = {"a": 3.0, "b": -1.0, "c": 2.5, "d": 7.0}
    out = fusion.normalize(scores, "zscore")
    x = np.array(list(out.values()))
    self.assertAlmostEqual(x.mean(), 0.0, places=12)
    self.assertAlmostEqual(x.std(), 1.0, places=12)
    self.assertAlmostEqual(out["d"], (7.0 - 2.875) / np.std([3, -1, 2.5, 7]))

  def test_none_keeps_scores(self):
    self.assertEqual(fusion.normalize({"a": 3, "b": -2.5}, "none"),
                     {"a": 3.0, "b": -2.5})

  @parameterized.parameters("minmax", "zscore")
  def test_constant_scores_give_zero(self, normalization):
    self.assertEqual(fusion.normalize({"a": 4.0, "b": 4.0}, normalization),
                     {"a": 0.0, "b": 0.0})
    self.assertEqual(fusion.normalize({}, normalization), {})

  def test_bad_inputs(self):
    with self.assertRaisesRegex(ValueError, "normalization must be one of"):
      fusion.normalize({"a": 1.0}, "rank")
    with self.assertRaisesRegex(ValueError, "finite.*'b'"):
      fusion.normalize({"a": 1.0, "b": math.nan}, "minmax")


class FuseTest(parameterized.TestCase):

  def test_two_runs_by_hand(self):
    first = {"q": {"a": 2.0, "b": 0.0, "c": 1.0}}
    second = {"q": {"a": 0.0, "b": 10.0, "c": 5.0}}
    out = fusion.fuse([first, second], [0.25, 0.75], normalization="minmax")
    self.assertEqual(list(out), ["q"])
    self.assertAlmostEqual(out["q"]["a"], 0.25)
    self.assertAlmostEqual(out["q"]["b"], 0.75)
    self.assertAlmostEqual(out["q"]["c"], 0.5)

  def test_raw_weighted_sum_without_normalization(self):
    first = {"q": {"a": 2.0, "b": -1.0}}
    second = {"q": {"a": 3.0, "b": 4.0}}
    out = fusion.fuse((first, second), (2, 1), normalization="none")
    self.assertEqual(out, {"q": {"a": 7.0, "b": 2.0}})

  @parameterized.parameters("minmax", "zscore")
  def test_invariant_to_affine_rescaling_per_query(self, normalization):
    rng = np.random.default_rng(0)
    a = {f"q{i}": {f"d{j}": float(rng.normal()) for j in range(6)}
         for i in range(3)}
    b = {q: {d: float(rng.normal()) for d in r} for q, r in a.items()}
    scaled = {q: {d: (i + 2.0) * s - 7.0 * i for d, s in r.items()}
              for i, (q, r) in enumerate(a.items())}
    want = fusion.fuse([a, b], [0.3, 0.7], normalization=normalization)
    got = fusion.fuse([scaled, b], [0.3, 0.7], normalization=normalization)
    for q in want:
      for d in want[q]:
        self.assertAlmostEqual(got[q][d], want[q][d], places=9)

  def test_weight_one_keeps_the_order_of_that_run(self):
    first = {"q": {"a": 0.1, "b": 0.9, "c": 0.5}}
    second = {"q": {"a": 9.0, "b": 1.0, "c": 3.0}}
    out = fusion.fuse([first, second], [1.0, 0.0], normalization="zscore")
    self.assertEqual(sorted(out["q"], key=out["q"].get), ["a", "c", "b"])

  def test_missing_documents_and_queries(self):
    first = {"q1": {"a": 1.0, "b": 3.0}, "q2": {"x": 1.0}}
    second = {"q1": {"a": 2.0, "c": 4.0}, "q3": {"y": 5.0, "z": 1.0}}
    out = fusion.fuse([first, second], [0.5, 0.5], normalization="minmax")
    self.assertEqual(list(out), ["q1", "q2", "q3"])
    # q1: first -> a 0, b 1 (c missing: floor 0); second -> a 0, c 1 (b: 0).
    self.assertEqual(out["q1"], {"a": 0.0, "b": 0.5, "c": 0.5})
    self.assertEqual(out["q2"], {"x": 0.0})
    self.assertEqual(out["q3"], {"y": 0.5, "z": 0.0})

  def test_bad_arguments(self):
    run = {"q": {"a": 1.0}}
    cases = [
        (([], []), "non-empty sequence"),
        ((run, [1.0]), "non-empty sequence"),
        (([{"q": 1.0}], [1.0]), r"runs\[0\]"),
        (([run, run], [1.0]), "one weight per run"),
        (([run, run], [1.0, -0.5]), "finite and >= 0"),
        (([run, run], [1.0, math.inf]), "finite and >= 0"),
        (([run, run], [0.0, 0.0]), "At least one weight"),
        (([run], "1"), "sequence of numbers"),
        (([{"q": {"a": math.inf}}], [1.0]), "finite"),
    ]
    for args, message in cases:
      with self.assertRaisesRegex(ValueError, message):
        fusion.fuse(*args)
    with self.assertRaisesRegex(ValueError, "normalization"):
      fusion.fuse([run], [1.0], normalization="softmax")


class TuneWeightTest(absltest.TestCase):
  # q1 needs weight < 1/1.4 on `first`, q2 needs > 0.4/1.4: only 0.5 of the
  # grid ranks both relevant documents first.
  FIRST = {"q1": {"x": 0.6, "y": 1.0, "z": 0.0},
           "q2": {"u": 1.0, "v": 0.0, "w": 0.5}}
  SECOND = {"q1": {"x": 1.0, "y": 0.0, "z": 0.5},
            "q2": {"u": 0.6, "v": 1.0, "w": 0.0}}
  QRELS = {"q1": {"x": 1}, "q2": {"u": 1}}

  def test_picks_the_only_weight_that_ranks_both_first(self):
    best, scores = fusion.tune_weight(
        self.QRELS, self.FIRST, self.SECOND, grid=(0.0, 0.5, 1.0),
        normalization="minmax")
    self.assertEqual(best, 0.5)
    self.assertEqual(scores[0.5], 1.0)
    second_rank = (1.0 + 1.0 / math.log2(3)) / 2
    self.assertAlmostEqual(scores[0.0], second_rank)
    self.assertAlmostEqual(scores[1.0], second_rank)
    fused = fusion.fuse((self.FIRST, self.SECOND), (0.5, 0.5))
    self.assertEqual(
        scores[0.5],
        metrics.evaluate(self.QRELS, fused, ("ndcg_cut_10",))["ndcg_cut_10"])

  def test_other_metric_and_default_grid(self):
    best, scores = fusion.tune_weight(self.QRELS, self.FIRST, self.SECOND,
                                      metric="recip_rank")
    self.assertEqual(list(scores), list(fusion.DEFAULT_GRID))
    self.assertEqual(scores[best], 1.0)
    self.assertGreater(best, 0.4 / 1.4)
    self.assertLess(best, 1 / 1.4)

  def test_ties_go_to_the_earliest_grid_value(self):
    best, scores = fusion.tune_weight(self.QRELS, self.FIRST, self.FIRST,
                                      grid=(0.7, 0.2, 0.9))
    self.assertEqual(best, 0.7)
    self.assertLen(set(scores.values()), 1)

  def test_bad_grid(self):
    for grid, message in [((), "non-empty"), ((0.5, 1.5), "in \\[0, 1\\]"),
                          ((math.nan,), "in \\[0, 1\\]"), ("0.5", "grid")]:
      with self.assertRaisesRegex(ValueError, message):
        fusion.tune_weight(self.QRELS, self.FIRST, self.SECOND, grid=grid)
    with self.assertRaisesRegex(ValueError, "metric|Unknown"):
      fusion.tune_weight(self.QRELS, self.FIRST, self.SECOND,
                         metric="ndcg_at")


if __name__ == "__main__":
  absltest.main()
