"""End-to-end tests of experiments/rerank_decoder.py on the smoke preset."""

import json
import os

from absl.testing import absltest
import numpy as np

from experiments import rerank_decoder
from experiments.configs import rerank_decoder as config_lib
from lowrank import metric_writers
from lowrank.data import code_search
from lowrank.ranking import first


def _losses(workdir, phase):
  return {r["step"]: r["loss"] for r in metric_writers.read_csv(
      os.path.join(workdir, phase, "metrics.csv"))}


class ConfigTest(absltest.TestCase):

  def test_presets_and_bad_values(self):
    self.assertEqual(config_lib.get_config().window, 10)
    self.assertEqual(config_lib.get_config("smoke").first.num_train_steps, 4)
    with self.assertRaisesRegex(ValueError, "Unknown preset"):
      config_lib.get_config("large")
    cases = [(("stride",), 0, "stride must be in"),
             (("first", "ltr_loss"), "hinge", "Unknown LTR loss"),
             (("first", "window"), 1, "first.window"),
             (("window",), 27, "config.window"),
             (("rerank_k",), 0, "rerank_k must be positive"),
             (("rerankers",), "first,prp", "Unknown rerankers")]
    for path, value, message in cases:
      config = config_lib.get_config("smoke")
      with config.unlocked():
        target = config
        for key in path[:-1]:
          target = target[key]
        target[path[-1]] = value
      with self.assertRaisesRegex(ValueError, message):
        rerank_decoder.train_and_evaluate(config,
                                          self.create_tempdir().full_path)

  def test_training_lists_hold_the_positive(self):
    config = config_lib.get_config("smoke")
    train = code_search.load_code_search("train")
    lists = rerank_decoder.training_lists(train, config)
    self.assertLen(lists, 32)
    for qid, docs, labels in lists:
      self.assertLen(docs, config.first.window)
      self.assertLen(set(docs), config.first.window)
      self.assertEqual(sum(labels), 1.0)
      self.assertIn(docs[labels.index(1.0)], train.qrels[qid])
    batch = rerank_decoder.first_batch(lists, train, config, 3)
    self.assertEqual(batch["ids"].shape[0], config.first.batch_size)
    self.assertEqual(batch["ids"].shape[1] % 64, 0)
    self.assertTrue(np.all(batch["where"]))


class TrainAndEvaluateTest(absltest.TestCase):

  def test_smoke_runs_and_rerun_resumes_to_the_same_result(self):
    config = config_lib.get_config("smoke")
    straight = self.create_tempdir().full_path
    full = rerank_decoder.train_and_evaluate(config, straight)
    rows = full["metrics"]
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
    self.assertEqual(full["test_queries"], 6)
    for name in ("results.md", "results.json", "first_stage_bm25.json",
                 "reranked_first.json", "reranked_icr_pretrained.json",
                 "pretrain/metrics.csv", "first/metrics.csv"):
      self.assertTrue(os.path.exists(os.path.join(straight, name)), name)
    with open(os.path.join(straight, "reranked_first.json")) as f:
      reranked = json.load(f)
    with open(os.path.join(straight, "first_stage_bm25.json")) as f:
      bm25_run = json.load(f)
    for qid, ranking in bm25_run.items():
      self.assertEqual(set(reranked[qid]), set(ranking))
    self.assertEqual(sorted(_losses(straight, "first")), [2, 4])
    # The saved FIRST decoder reloads (as benchmarks/rerank_bench.py does)
    # and reranks to the same run.
    model, step = rerank_decoder.load_trained(config, straight)
    self.assertEqual(step, 4)
    test = code_search.load_code_search("test", max_queries=6)
    fmt, _ = rerank_decoder.prompt_formats(config)
    again = first.rerank(model, rerank_decoder.TOKENIZER, test.queries,
                         test.corpus, bm25_run, k=config.rerank_k,
                         window=config.window, stride=config.stride,
                         prompt_format=fmt)
    self.assertEqual(again, reranked)
    with self.assertRaises(FileNotFoundError):
      rerank_decoder.load_trained(config, self.create_tempdir().full_path)

    # Interrupted after FIRST step 2, then the same command: it resumes
    # (pretraining is finished and not rerun) to the same numbers.
    resumed = self.create_tempdir().full_path
    with config.unlocked():
      config.first.num_train_steps = 2
    rerank_decoder.train_and_evaluate(config, resumed)
    with config.unlocked():
      config.first.num_train_steps = 4
    again = rerank_decoder.train_and_evaluate(config, resumed)
    self.assertEqual(again["pretrain"]["resumed_from_step"], 2)
    self.assertEqual(again["first"]["resumed_from_step"], 2)
    self.assertAlmostEqual(_losses(resumed, "first")[4],
                           _losses(straight, "first")[4], places=5)
    for name, vals in full["metrics"].items():
      for key, value in vals.items():
        self.assertAlmostEqual(again["metrics"][name][key], value, places=6,
                               msg=f"{name} {key}")


if __name__ == "__main__":
  absltest.main()
