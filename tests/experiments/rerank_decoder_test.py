"""End-to-end tests of experiments/rerank_decoder.py on the smoke preset.

One smoke run and one interrupted, resumed copy of it (`testing.
SmokeAndResume`) are shared by `SmokeTest`'s methods.
"""

import json
import os

from absl.testing import absltest

from experiments import rerank_decoder
from experiments.configs import rerank_decoder as config_lib
from lowrank import metric_writers
from lowrank.data import specs
from lowrank.ranking import first
from tests import testing


def _losses(workdir, phase):
  return {r["step"]: r["loss"] for r in metric_writers.read_csv(
      os.path.join(workdir, phase, "metrics.csv"))}


class ConfigTest(absltest.TestCase):

  def test_presets_and_bad_values(self):
    self.assertEqual(config_lib.get_config().eval.window, 10)
    smoke = config_lib.get_config("smoke")
    self.assertEqual(smoke.first.train.num_steps, 4)
    self.assertEqual(smoke.first.optimizer.learning_rate.decay_steps, 4)
    with self.assertRaisesRegex(ValueError, "Unknown preset"):
      config_lib.get_config("large")
    cases = [("eval.stride", 0, "stride must be a positive integer"),
             ("first.ltr_loss", "hinge", "ltr_loss must be one of"),
             ("first.window", 1, "first.window must be a number in"),
             ("eval.window", 27, "eval.window must be a number in"),
             ("eval.rerank_k", 0, "rerank_k must be a positive integer"),
             ("eval.rerankers", "first,prp", "Unknown rerankers"),
             ("adapter.method", "lorax", "adapter.method must be")]
    for key, value, message in cases:
      config = testing.changed(config_lib.get_config("smoke"), **{key: value})
      with self.subTest(key), self.assertRaisesRegex(ValueError, message):
        rerank_decoder.train_and_evaluate(config,
                                          self.create_tempdir().full_path)


class SmokeTest(testing.SmokeAndResume):
  """The smoke run, and a copy interrupted after step 2 of both phases
  (pretraining and FIRST) and rerun."""

  module = rerank_decoder
  config_lib = config_lib

  def test_rankings_and_outputs(self):
    rows = self.full["metrics"]
    self.assertEqual(set(rows), {
        "bm25", "shuffled", "oracle", "windows_random", "first",
        "first_shuffled", "icr_pretrained", "icr_pretrained_uncalibrated",
        "icr_first", "icr_first_uncalibrated"})
    for name, vals in rows.items():
      self.assertBetween(vals["ndcg_cut_10"], 0.0, 1.0)
      # Reranking only reorders BM25's top-k: the judged documents found
      # (recall@10, with k <= 10) do not change.
      self.assertAlmostEqual(vals["recall_10"], rows["bm25"]["recall_10"],
                             msg=name)
    self.assertGreaterEqual(rows["oracle"]["ndcg_cut_10"],
                            max(v["ndcg_cut_10"] for v in rows.values()))
    self.assertEqual(self.full["test_queries"], 6)
    self.assertEqual(self.full["train_lists"], 32)
    for name in ("results.md", "results.json", "first_stage_bm25.json",
                 "reranked_first.json", "reranked_icr_pretrained.json",
                 "pretrain/metrics.csv", "first/metrics.csv"):
      self.assertTrue(os.path.exists(os.path.join(self.straight, name)), name)
    self.assertEqual(sorted(_losses(self.straight, "first")), [2, 4])

  def test_saved_decoder_reloads_and_reranks_the_same(self):
    # As benchmarks/rerank_bench.py does.
    with open(os.path.join(self.straight, "reranked_first.json")) as f:
      reranked = json.load(f)
    with open(os.path.join(self.straight, "first_stage_bm25.json")) as f:
      bm25_run = json.load(f)
    for qid, ranking in bm25_run.items():
      self.assertEqual(set(reranked[qid]), set(ranking))
    model, step = rerank_decoder.load_trained(self.config(), self.straight)
    self.assertEqual(step, 4)
    test = specs.load("code_search", "test", max_queries=6)
    fmt, _ = rerank_decoder.prompt_formats(self.config())
    e = self.config().eval
    again = first.rerank(model, rerank_decoder.TOKENIZER, test.queries,
                         test.corpus, bm25_run, k=e.rerank_k, window=e.window,
                         stride=e.stride, prompt_format=fmt)
    self.assertEqual(again, reranked)
    with self.assertRaisesRegex(FileNotFoundError, "No first checkpoint"):
      rerank_decoder.load_trained(self.config(),
                                  self.create_tempdir().full_path)

  def test_rerun_resumes_to_the_same_result(self):
    # The pretraining phase's checkpoints are steps 1 and 2.
    self.assertEqual(self.again["pretrain"]["resumed_from_step"], 1)
    self.assertEqual(self.again["first"]["resumed_from_step"], 2)
    self.assertAlmostEqual(_losses(self.resumed, "first")[4],
                           _losses(self.straight, "first")[4], places=5)
    for name, vals in self.full["metrics"].items():
      for key, value in vals.items():
        self.assertAlmostEqual(self.again["metrics"][name][key], value,
                               places=6, msg=f"{name} {key}")


if __name__ == "__main__":
  absltest.main()
