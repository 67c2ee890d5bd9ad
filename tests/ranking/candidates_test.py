"""Tests of lowrank.ranking.candidates (cached first-stage runs)."""

import json
import os

from absl.testing import absltest

from lowrank.ranking import candidates
from lowrank.retrieval import bm25 as bm25_lib

CORPUS = {"d1": "parse a url string", "d2": "open a file for reading",
          "d3": "sort a list of numbers", "d4": "read a url from a file"}
QUERIES = {"q1": "url parsing", "q2": "read file"}


class FirstStageTest(absltest.TestCase):

  def test_bm25_run_clips_depth_and_reuses_the_index(self):
    stage = candidates.FirstStage("bm25", depth=10)
    run = stage.run(QUERIES, CORPUS)
    self.assertEqual(run, bm25_lib.BM25(CORPUS).search_run(QUERIES, 4))
    self.assertIs(stage.index(CORPUS), stage.index(dict(CORPUS)))
    self.assertIsNot(stage.index(CORPUS), stage.index({"d1": "x"}))

  def test_cache_is_read_back_only_for_the_same_queries(self):
    path = os.path.join(self.create_tempdir().full_path, "run.json")
    stage = candidates.FirstStage("bm25", depth=2)
    run = stage.run(QUERIES, CORPUS, path=path)
    self.assertTrue(all(len(docs) == 2 for docs in run.values()))
    with open(path) as f:
      self.assertEqual(json.load(f), run)
    marked = {q: {"d3": 1.0} for q in QUERIES}  # Shows the file is read.
    with open(path, "w") as f:
      json.dump(marked, f)
    self.assertEqual(stage.run(QUERIES, CORPUS, path=path), marked)
    fewer = stage.run({"q1": QUERIES["q1"]}, CORPUS, path=path)
    self.assertEqual(fewer, {"q1": run["q1"]})  # Other queries: retrieved.

  def test_unknown_name(self):
    with self.assertRaisesRegex(ValueError, r"Unknown first stage 'splade'; "
                                r"expected one of \('bm25', 'minilm'\)"):
      candidates.FirstStage("splade")

  def test_depth_zero(self):
    with self.assertRaisesRegex(ValueError, "depth must be a positive int"):
      candidates.FirstStage("bm25", depth=0)

  def test_unknown_index_kind(self):
    with self.assertRaisesRegex(ValueError, "Unknown index kind 'dense'"):
      candidates.FirstStage().index(CORPUS, "dense")


if __name__ == "__main__":
  absltest.main()
