"""Tests for lowrank.data.specs: one data-spec loader, one subset."""

import json

from absl.testing import absltest
from absl.testing import parameterized

from lowrank.data import beir
from lowrank.data import specs


def _dataset():
  return beir.Dataset(
      name="toy",
      corpus={f"d{i}": f"text {i}" for i in range(6)},
      queries={"q2": "b", "q1": "a", "q3": "c"},
      qrels={"q2": {"d5": 1}, "q1": {"d4": 2, "d0": 0}, "q3": {"d1": 1}})


class SubsetTest(parameterized.TestCase):

  def test_nothing_cut_returns_the_dataset(self):
    d = _dataset()
    self.assertIs(specs.subset(d), d)

  def test_first_queries_by_id_and_their_judged_documents_first(self):
    got = specs.subset(_dataset(), max_queries=2, max_docs=3)
    self.assertEqual(sorted(got.qrels), ["q1", "q2"])
    # Judged d4, d0, d5, then nothing (3 reached already).
    self.assertEqual(sorted(got.corpus), ["d0", "d4", "d5"])

  def test_fills_with_other_documents_in_id_order(self):
    got = specs.subset(_dataset(), max_queries=1, max_docs=4)
    self.assertEqual(sorted(got.corpus), ["d0", "d1", "d2", "d4"])

  @parameterized.parameters(("max_queries", -1), ("max_docs", True))
  def test_bad_limit(self, name, value):
    with self.assertRaisesRegex(ValueError, f"{name} must be an int >= 0"):
      specs.subset(_dataset(), **{name: value})


class LoadTest(parameterized.TestCase):

  def _beir_dir(self):
    root = self.create_tempdir()
    root.create_file("corpus.jsonl", "\n".join(
        json.dumps({"_id": f"d{i}", "title": "", "text": f"doc {i}"})
        for i in range(3)))
    root.create_file("queries.jsonl", "\n".join(
        json.dumps({"_id": f"q{i}", "text": f"query {i}"})
        for i in range(2)))
    root.create_file("qrels/test.tsv",
                     "query-id\tcorpus-id\tscore\nq0\td1\t1\nq1\td2\t0\n")
    return root.full_path

  def test_beir_spec_and_positive_pairs(self):
    d = specs.load("beir:" + self._beir_dir(), "test")
    self.assertEqual(specs.positive_pairs(d), [("query 0", "doc 1")])
    self.assertLen(specs.load("beir:" + self._beir_dir(), "test",
                              max_queries=1).qrels, 1)

  def test_code_search_keeps_its_hashed_sample(self):
    from lowrank.data import code_search  # pylint: disable=g-import-not-at-top
    got = specs.load("code_search", "test", max_queries=5)
    want = code_search.load_code_search("test", max_queries=5)
    self.assertEqual(got.qrels, want.qrels)
    self.assertLen(got.corpus, len(want.corpus))

  @parameterized.parameters("beir:", "code-search", "msmarco")
  def test_unknown_spec(self, spec):
    with self.assertRaisesRegex(ValueError, "Unknown data spec.*code_search"):
      specs.load(spec)

  def test_check_without_loading(self):
    specs.check("code_search")
    specs.check("beir:" + self._beir_dir(), ("test",))
    with self.assertRaisesRegex(FileNotFoundError,
                                r"has no train\.tsv \(available splits: "):
      specs.check("beir:" + self._beir_dir(), ("train", "test"))
    with self.assertRaisesRegex(ValueError, "must be one of"):
      specs.check("msmarco")

  def test_check_names_the_missing_file(self):
    root = self.create_tempdir()
    root.create_file("corpus.jsonl", "")
    with self.assertRaisesRegex(FileNotFoundError,
                                "queries.jsonl' does not exist"):
      specs.check_beir_directory(root.full_path)
    with self.assertRaisesRegex(FileNotFoundError, "directory .* does not"):
      specs.check("beir:/nonexistent/beir/dir")

  def test_missing_directory(self):
    with self.assertRaises(FileNotFoundError):
      specs.load("beir:/nonexistent/beir/dir")


if __name__ == "__main__":
  absltest.main()
