"""Tests of lowrank.ranking.training_data on a small synthetic dataset."""

from absl.testing import absltest
import numpy as np

from lowrank.data import beir
from lowrank.ranking import decoder_text
from lowrank.ranking import first
from lowrank.ranking import training_data
from lowrank.retrieval import bm25 as bm25_lib

_WORDS = ("apple banana cherry grape lemon mango olive peach plum pear "
          "kiwi lime melon berry fig date").split()


def _dataset(num_queries=10, num_docs=40):
  corpus = {f"d{i:02d}": " ".join(_WORDS[j % len(_WORDS)]
                                  for j in range(i, i + 4))
            for i in range(num_docs)}
  queries = {f"q{i:02d}": corpus[f"d{3 * i:02d}"] for i in range(num_queries)}
  qrels = {f"q{i:02d}": {f"d{3 * i:02d}": 1, f"d{3 * i + 1:02d}": 0}
           for i in range(num_queries)}
  qrels["q09"] = {"d05": 0}  # No positive: never a training query.
  return beir.Dataset(name="toy", corpus=corpus, queries=queries,
                      qrels=qrels)


class SplitTest(absltest.TestCase):

  def test_dev_is_held_out_seeded_and_positive_only(self):
    qrels = _dataset().qrels
    train, dev = training_data.split_queries(qrels, dev_fraction=0.25,
                                             seed=0)
    self.assertLen(dev, 2)
    self.assertLen(train, 7)
    self.assertEmpty(set(train) & set(dev))
    self.assertNotIn("q09", train + dev)
    self.assertEqual((train, dev), training_data.split_queries(
        qrels, dev_fraction=0.25, seed=0))
    sampled = training_data.split_queries(qrels, dev_fraction=0.25, seed=0,
                                          max_queries=4)
    self.assertLen(sampled[0] + sampled[1], 4)

  def test_bad_dev_fraction(self):
    with self.assertRaisesRegex(ValueError, r"dev_fraction must be in \(0, "
                                r"1\).*got 1\.0"):
      training_data.split_queries(_dataset().qrels, dev_fraction=1.0, seed=0)

  def test_too_few_queries(self):
    with self.assertRaisesRegex(ValueError, "Need at least 2 queries with a "
                                "positive.*got 1"):
      training_data.split_queries({"q": {"d": 1}}, dev_fraction=0.5, seed=0)

  def test_fewer_examples_than_a_batch(self):
    with self.assertRaisesRegex(ValueError, "3 training examples are fewer "
                                "than one batch of 4"):
      training_data.step_indices(3, 4, 1, [0])

  def test_step_indices_cover_an_epoch(self):
    seen = np.concatenate([training_data.step_indices(10, 3, s, [0])[0]
                           for s in (1, 2, 3)])
    self.assertLen(set(seen.tolist()), 9)
    self.assertEqual(training_data.step_indices(10, 3, 4, [0])[1], 1)


class GroupsAndListsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.data = _dataset()
    self.index = bm25_lib.BM25(self.data.corpus)
    self.qids = [f"q{i:02d}" for i in range(10)]

  def test_negative_pools_exclude_judged_documents(self):
    groups = training_data.negative_groups(
        self.data, self.qids, self.index, depth=10, pool=5, min_negatives=3)
    self.assertNotIn("q09", [g[0] for g in groups])
    for qid, pos, pool in groups:
      self.assertEqual(pos, [d for d, r in self.data.qrels[qid].items()
                             if r > 0])
      self.assertEmpty(set(pool) & set(self.data.qrels[qid]))
      self.assertBetween(len(pool), 3, 5)

  def test_candidate_lists_hold_the_positive(self):
    lists = training_data.candidate_lists(self.data, self.qids, self.index,
                                          window=4, seed=0)
    self.assertLen(lists, 9)
    for qid, docs, labels in lists:
      self.assertLen(set(docs), 4)
      self.assertEqual(sum(labels), 1.0)
      self.assertEqual(self.data.qrels[qid][docs[labels.index(1.0)]], 1)

  def test_first_batch_is_a_function_of_the_step(self):
    lists = training_data.candidate_lists(self.data, self.qids, self.index,
                                          window=4, seed=0)
    tok = decoder_text.ByteTokenizer()
    kw = dict(batch_size=2, window=4, seed=0, shuffle=True,
              prompt_format=first.PromptFormat(max_doc_tokens=16))
    batch = training_data.first_batch(lists, self.data, tok, 3, **kw)
    again = training_data.first_batch(lists, self.data, tok, 3, **kw)
    self.assertEqual(batch["ids"].shape[0], 2)
    self.assertEqual(batch["ids"].shape[1] % 64, 0)
    self.assertTrue(np.all(batch["where"]))
    for key in batch:
      np.testing.assert_array_equal(batch[key], again[key])
    # The target ranks the judged document first wherever it is shown.
    np.testing.assert_array_equal(batch["ranks"][batch["labels"] == 1], 1)


class ReferenceOrdersTest(absltest.TestCase):

  def test_random_and_oracle_orders(self):
    run = {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
    shuffled = training_data.random_order(run, 0)
    self.assertEqual(sorted(shuffled["q"].values()), [0.0, 1.0, 2.0])
    self.assertEqual(shuffled, training_data.random_order(run, 0))
    oracle = training_data.oracle_order(run, {"q": {"c": 1}})
    self.assertEqual(max(oracle["q"], key=oracle["q"].get), "c")
    self.assertGreater(oracle["q"]["a"], oracle["q"]["b"])

  def test_byte_windows_are_step_deterministic(self):
    batch = training_data.byte_windows("abcdefghij" * 3, 4, 5, seed=0)
    self.assertEqual(batch(3).shape, (5, 4))
    np.testing.assert_array_equal(batch(3), batch(3))
    row = bytes(batch(3)[0].astype(np.uint8)).decode()
    self.assertIn(row, "abcdefghij" * 3)

  def test_byte_windows_of_a_short_text(self):
    with self.assertRaisesRegex(ValueError, r"The text has 3 bytes; windows "
                                r"of seq_len=4 need more"):
      training_data.byte_windows("abc", 4, 2, seed=0)

  def test_random_window_order(self):
    run = {"q": {d: float(5 - i) for i, d in enumerate("abcde")}, "e": {}}
    out = training_data.random_window_order(run, 4, 3, 2, 0)
    self.assertEqual(out["e"], {})
    self.assertEqual(set(out["q"]), set("abcd"))  # The top 4 only.
    self.assertEqual(out, training_data.random_window_order(run, 4, 3, 2, 0))
    rng = np.random.default_rng(0)
    orders = first.sliding_window_orders(
        [4], 3, 2, lambda jobs: rng.normal(size=(len(jobs), 3)))
    self.assertEqual(sorted(out["q"], key=out["q"].get, reverse=True),
                     [list("abcd")[i] for i in orders[0]])
    with self.assertRaisesRegex(ValueError, "stride"):
      training_data.random_window_order(run, 4, 3, 0, 0)


if __name__ == "__main__":
  absltest.main()
