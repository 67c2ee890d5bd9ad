"""Tests for `lowrank.data.code_search`."""

import ast
import re

from absl.testing import absltest

from lowrank.data import code_search


def _module(item_id: str) -> str:
  return item_id.removeprefix(code_search.QUERY_PREFIX).split(":")[0]


class LoadCodeSearchTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.train = code_search.load_code_search("train")
    cls.test = code_search.load_code_search("test")

  def test_deterministic(self):
    self.assertIs(code_search.load_code_search("test"), self.test)  # Cached.
    code_search._extract_pairs.cache_clear()
    code_search.load_code_search.cache_clear()
    again = code_search.load_code_search("test")
    self.assertIsNot(again, self.test)
    self.assertEqual(again, self.test)
    self.assertEqual(list(again.queries), list(self.test.queries))

  def test_sizes(self):
    # CPython 3.11.7 gives 3,806 train and 1,100 test pairs (module
    # docstring); other versions differ, so only check the order of size.
    self.assertGreater(len(self.test.queries), 500)
    self.assertGreater(len(self.train.queries), 2 * len(self.test.queries))
    for dataset in (self.train, self.test):
      self.assertLen(dataset.corpus, len(dataset.queries))
      self.assertLen(dataset.qrels, len(dataset.queries))
      self.assertEqual(dataset.name, "code_search")
      self.assertEmpty(dataset.problems)

  def test_split_by_module(self):
    train_modules = {_module(q) for q in self.train.queries}
    test_modules = {_module(q) for q in self.test.queries}
    self.assertGreater(len(test_modules), 20)
    self.assertEmpty(train_modules & test_modules)
    for module in test_modules:
      self.assertTrue(code_search.is_test_module(module, 0.2))
    for module in train_modules:
      self.assertFalse(code_search.is_test_module(module, 0.2))
    self.assertEmpty(set(self.train.corpus) & set(self.test.corpus))

  def test_qrels(self):
    for dataset in (self.train, self.test):
      for qid, judged in dataset.qrels.items():
        ((doc_id, label),) = judged.items()
        self.assertEqual(label, 1)
        self.assertIn(doc_id, dataset.corpus)
        self.assertEqual(qid, code_search.QUERY_PREFIX + doc_id)
        self.assertNotEqual(qid, doc_id)  # Safe with ignore_identical_ids.

  def test_documents_are_functions_without_docstrings(self):
    for dataset in (self.train, self.test):
      for doc_id, code in dataset.corpus.items():
        tree = ast.parse(code)
        self.assertLen(tree.body, 1)
        function = tree.body[0]
        self.assertIsInstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        self.assertEqual(function.name, doc_id.split(":")[-1].split(".")[-1])
        self.assertIsNone(ast.get_docstring(function, clean=False), doc_id)
        self.assertTrue(code.startswith(("def ", "async def ")), doc_id)
        self.assertLessEqual(len(code), 2000)
        self.assertGreaterEqual(
            sum(1 for line in code.split("\n") if line.strip()), 2
        )

  def test_queries_are_unique_summaries(self):
    summaries = [
        s.casefold()
        for d in (self.train, self.test)
        for s in d.queries.values()
    ]
    self.assertLen(set(summaries), len(summaries))
    for summary in summaries:
      self.assertGreaterEqual(len(summary.split()), 4)
      self.assertNotIn("\n", summary)
      self.assertIsNone(re.fullmatch(r"returns? self\.?", summary))
    codes = list(self.train.corpus.values()) + list(self.test.corpus.values())
    self.assertLen(set(codes), len(codes))

  def test_known_pair(self):
    # json.decoder is a test module for test_fraction=0.2.
    self.assertTrue(code_search.is_test_module("json.decoder"))
    qid = "q:json.decoder:JSONDecoder.raw_decode"
    self.assertStartsWith(
        self.test.queries[qid], "Decode a JSON document from ``s``"
    )
    code = self.test.corpus["json.decoder:JSONDecoder.raw_decode"]
    self.assertStartsWith(code, "def raw_decode(self, s, idx=0):\n    try:")

  def test_train_pairs(self):
    self.assertEmpty(self.test.train_pairs)
    self.assertLen(self.train.train_pairs, len(self.train.queries))
    for (query, code), qid in zip(self.train.train_pairs, self.train.queries):
      self.assertEqual(query, self.train.queries[qid])
      self.assertEqual(code, self.train.corpus[qid.removeprefix("q:")])

  def test_max_queries_keeps_all_documents(self):
    small = code_search.load_code_search("test", max_queries=50)
    self.assertLen(small.queries, 50)
    self.assertEqual(small.corpus, self.test.corpus)
    self.assertContainsSubset(set(small.queries), set(self.test.queries))
    self.assertEqual(  # Original order is kept.
        list(small.queries),
        [q for q in self.test.queries if q in small.queries],
    )
    self.assertEqual(set(small.qrels), set(small.queries))
    other = code_search.load_code_search("test", max_queries=50, seed=1)
    self.assertNotEqual(set(other.queries), set(small.queries))
    train = code_search.load_code_search("train", max_queries=10)
    self.assertLen(train.train_pairs, 10)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "split"):
      code_search.load_code_search("dev")
    with self.assertRaisesRegex(ValueError, "max_queries"):
      code_search.load_code_search("test", max_queries=0)


if __name__ == "__main__":
  absltest.main()
