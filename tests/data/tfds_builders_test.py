"""Tests for `lowrank.data.tfds_builders` (array_record, no TensorFlow)."""

import pathlib
import sys

from absl.testing import absltest
import numpy as np
import pytest

from lowrank.data import beir
from lowrank.data import code_search
from lowrank.data import tfds_builders

from tests import testing

_CORPUS = [
    '{"_id": "d1", "title": "Title one", "text": "text one"}',
    '{"_id": "d2", "text": "text two"}',
    '{"_id": "d3", "title": "", "text": "three"}',
]
_QUERIES = [
    '{"_id": "q1", "text": "query one"}',
    '{"_id": "q2", "text": "query two"}',
    '{"_id": "q3", "text": "query three"}',
]
_TEST = ["query-id\tcorpus-id\tscore", "q2\td2\t1", "q1\td1\t2", "q1\td3\t0"]
_TRAIN = ["query-id\tcorpus-id\tscore", "q3\td3\t1"]


def _text(value):
  return value.decode("utf-8")


class BeirBuilderTest(absltest.TestCase):

  def _write(self, name="toy", test=None):
    root = pathlib.Path(self.create_tempdir().full_path) / name
    (root / "qrels").mkdir(parents=True)
    files = {
        "corpus.jsonl": _CORPUS,
        "queries.jsonl": _QUERIES,
        "qrels/test.tsv": _TEST if test is None else test,
        "qrels/train.tsv": _TRAIN,
    }
    for path, lines in files.items():
      (root / path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root

  def test_matches_load_beir_without_tensorflow(self):
    root = self._write()
    data_dir = self.create_tempdir().full_path
    for split in ("test", "train"):
      got = tfds_builders.load(
          "beir", split, data_dir=data_dir, manual_dir=root
      )
      self.assertEqual(got, beir.load_beir(root, split))
      self.assertEqual(list(got.qrels), list(beir.load_beir(root, split).qrels))
    self.assertNotIn("tensorflow", sys.modules)

  def test_data_sources_keep_raw_fields_and_order(self):
    root = self._write()
    data_dir = self.create_tempdir().full_path
    corpus = tfds_builders.data_sources(
        "beir", "corpus", data_dir=data_dir, manual_dir=root
    )
    self.assertEqual(list(corpus), ["corpus"])
    rows = [corpus["corpus"][i] for i in range(len(corpus["corpus"]))]
    self.assertEqual([_text(r["_id"]) for r in rows], ["d1", "d2", "d3"])
    self.assertEqual(_text(rows[0]["title"]), "Title one")
    self.assertEqual(_text(rows[0]["text"]), "text one")
    qrels = tfds_builders.data_sources(
        "beir", "qrels", data_dir=data_dir, manual_dir=root
    )
    self.assertEqual(sorted(qrels), ["test", "train"])
    self.assertEqual(
        [
            (_text(r["query_id"]), _text(r["corpus_id"]), int(r["score"]))
            for r in (qrels["test"][i] for i in range(len(qrels["test"])))
        ],
        [("q2", "d2", 1), ("q1", "d1", 2), ("q1", "d3", 0)],
    )
    # Prepared files can be read without the source directory.
    again = tfds_builders.data_sources("beir", "qrels", data_dir=data_dir)
    self.assertLen(again["test"], 3)
    with self.assertRaisesRegex(ValueError, "not prepared.*needs manual_dir"):
      tfds_builders.data_sources("beir", "queries", data_dir=data_dir)
    queries = tfds_builders.data_sources(
        "beir", "queries", data_dir=data_dir, manual_dir=root
    )
    self.assertEqual(
        [_text(queries["test"][i]["_id"]) for i in range(2)], ["q2", "q1"]
    )

  def test_problem_lines_raise_or_are_counted(self):
    root = self._write(test=_TEST + ["q1\td9\t1", "q1\tonly-two"])
    data_dir = self.create_tempdir().full_path
    with self.assertRaisesRegex(ValueError, r"test\.tsv:5: unknown document"):
      tfds_builders.load("beir", data_dir=data_dir, manual_dir=root)
    got = tfds_builders.load(
        "beir", data_dir=data_dir, manual_dir=root, on_error="count"
    )
    self.assertLen(got.problems, 2)
    self.assertIn("test.tsv:5: unknown document id 'd9'", got.problems[0])
    self.assertIn("test.tsv:6: expected 3 tab-separated", got.problems[1])
    self.assertEqual(got.qrels, {"q2": {"d2": 1}, "q1": {"d1": 2, "d3": 0}})
    # Files prepared with on_error="count" are not reused for "raise".
    with self.assertRaisesRegex(ValueError, "another source"):
      tfds_builders.load("beir", data_dir=data_dir, manual_dir=root)

  def test_changed_source_is_not_served_stale(self):
    root = self._write()
    data_dir = self.create_tempdir().full_path
    tfds_builders.load("beir", data_dir=data_dir, manual_dir=root)
    (root / "qrels" / "test.tsv").write_text(
        "\n".join(_TEST[:2]) + "\n", encoding="utf-8"
    )
    with self.assertRaisesRegex(ValueError, "another source.*overwrite=True"):
      tfds_builders.load("beir", data_dir=data_dir, manual_dir=root)
    got = tfds_builders.load(
        "beir", data_dir=data_dir, manual_dir=root, overwrite=True
    )
    self.assertEqual(got.qrels, {"q2": {"d2": 1}})
    self.assertEqual(got, beir.load_beir(root))

  def test_errors(self):
    data_dir = self.create_tempdir().full_path
    with self.assertRaisesRegex(ValueError, "Unknown dataset"):
      tfds_builders.load("msmarco", data_dir=data_dir)
    with self.assertRaisesRegex(ValueError, "needs manual_dir"):
      tfds_builders.load("beir", data_dir=data_dir)
    with self.assertRaisesRegex(ValueError, "Unknown config"):
      tfds_builders.builder("beir", "documents", data_dir=data_dir)
    with self.assertRaisesRegex(ValueError, "No split 'dev'"):
      tfds_builders.load(
          "beir", "dev", data_dir=data_dir, manual_dir=self._write()
      )


class EmbeddedBuildersTest(absltest.TestCase):

  def test_code_search_matches_loader(self):
    data_dir = self.create_tempdir().full_path
    got = tfds_builders.load("code_search", "train", data_dir=data_dir)
    want = code_search.load_code_search("train")
    self.assertEqual(got, want)
    self.assertEqual(list(got.corpus), list(want.corpus))
    self.assertNotEmpty(got.train_pairs)

  def test_lee(self):
    try:
      folder = tfds_builders.gensim_test_data_dir()
    except FileNotFoundError as e:
      self.skipTest(str(e))
    data_dir = self.create_tempdir().full_path
    lee = tfds_builders.load("lee", data_dir=data_dir)
    self.assertLen(lee.documents, 50)
    self.assertLen(lee.background, 300)
    self.assertStartsWith(
        lee.documents["0"], "The national executive of the strife-torn"
    )
    raw = np.loadtxt(folder / "similarities0-1.txt")
    np.testing.assert_allclose(lee.similarity, raw + np.triu(raw, 1).T)
    np.testing.assert_array_equal(lee.similarity, lee.similarity.T)
    np.testing.assert_array_equal(np.diag(lee.similarity), 1.0)
    pairs = tfds_builders.data_sources("lee", "similarity", data_dir=data_dir)
    self.assertLen(pairs["test"], 50 * 49 // 2)
    self.assertNotIn("tensorflow", sys.modules)
    self.assertNotIn("gensim", sys.modules)

  def test_lee_similarity_validation(self):
    path = pathlib.Path(self.create_tempdir().full_path) / "sim.txt"
    path.write_text("1\t0.5\n0.2\t1\n")
    with self.assertRaisesRegex(
        ValueError, r"sim\.txt:2: .*below the diagonal"
    ):
      tfds_builders.read_lee_similarity(path, 2)
    path.write_text("1\t0.5\n0\t1\t0\n")
    with self.assertRaisesRegex(ValueError, r"sim\.txt:2: expected 2 values"):
      tfds_builders.read_lee_similarity(path, 2)
    path.write_text("1\t1.5\n0\t1\n")
    with self.assertRaisesRegex(ValueError, r"sim\.txt:1: .*not in \[0, 1\]"):
      tfds_builders.read_lee_similarity(path, 2)
    path.write_text("1\t0.5\n0\t1\n")
    np.testing.assert_array_equal(
        tfds_builders.read_lee_similarity(path, 2), [[1, 0.5], [0.5, 1]]
    )


@pytest.mark.shared_data
class SharedBeirTest(absltest.TestCase):

  def test_scifact_through_tfds(self):
    directory = testing.beir_dir(self, "scifact")
    data_dir = self.create_tempdir().full_path
    got = tfds_builders.load("beir", data_dir=data_dir, manual_dir=directory)
    self.assertEqual(got, beir.load_beir(directory))
    self.assertLen(got.corpus, 5183)
    self.assertTrue(
        (pathlib.Path(data_dir) / "scifact" / "beir_directory").is_dir()
    )


if __name__ == "__main__":
  absltest.main()
