"""End-to-end tests of experiments/train_reranker.py on the smoke preset."""

import json
import os
import pathlib

from absl.testing import absltest
import numpy as np

from experiments import train_reranker
from experiments.configs import train_reranker as config_lib
from lowrank import metric_writers

_SHARED = pathlib.Path(
    os.environ.get(
        "LOWRANK_SHARED_DIR",
        pathlib.Path(__file__).resolve().parents[2] / "shared",
    )
)


def _losses(workdir):
  return {r["step"]: r["loss"] for r in
          metric_writers.read_csv(os.path.join(workdir, "metrics.csv"))}


class ConfigTest(absltest.TestCase):

  def test_presets_load(self):
    self.assertEqual(config_lib.get_config().method, "lora")
    self.assertEqual(config_lib.get_config().data, "code_search")
    self.assertEqual(config_lib.get_config("smoke").num_train_steps, 4)
    with self.assertRaisesRegex(ValueError, "Unknown preset"):
      config_lib.get_config("large")

  def test_bad_data_spec(self):
    with self.assertRaisesRegex(ValueError, "Unknown data spec"):
      train_reranker.load_data("imagenet")

  def test_bad_config_values(self):
    cases = {
        "first_stage": ("splade", "first_stage"),
        "method": ("lorax", "method must be"),
        "loss": ("hinge", "Unknown loss"),
        "rerank_k": (0, "rerank_k must be positive"),
        "group_size": (1, "group_size"),
        "negatives_pool": (2, "negatives_pool"),
    }
    for field, (value, message) in cases.items():
      config = config_lib.get_config("smoke")
      with config.unlocked():
        config[field] = value
      with self.assertRaisesRegex(ValueError, message):
        train_reranker.train_and_evaluate(
            config, self.create_tempdir().full_path)
    config = config_lib.get_config("smoke")
    with config.unlocked():
      config.optimizer.name = "sgd"
    with self.assertRaisesRegex(ValueError, "optimizer.name"):
      train_reranker.make_optimizer(config)


class TrainAndEvaluateTest(absltest.TestCase):

  def test_smoke_trains_and_rerun_resumes_to_the_same_result(self):
    config = config_lib.get_config("smoke")
    straight = self.create_tempdir().full_path
    full = train_reranker.train_and_evaluate(config, straight)
    self.assertEqual(full["resumed_from_step"], 0)
    self.assertGreater(full["trainable_params"], 0)
    self.assertLess(full["trainable_params"], full["total_params"] / 10)
    for part in ("before", "after"):
      for key in ("ndcg_cut_10", "recall_10"):
        self.assertBetween(full[part][key], 0.0, 1.0)
    # Reranking only reorders the top-k: recall within k is unchanged.
    self.assertAlmostEqual(full["before"]["recall_10"],
                           full["after"]["recall_10"])
    self.assertEqual(full["rerank_pairs"], 12 * 5)
    for name in ("results.md", "results.json", "metrics.csv",
                 "first_stage_bm25.json", "reranked_run.json"):
      self.assertTrue(os.path.exists(os.path.join(straight, name)), name)
    self.assertEqual(sorted(_losses(straight)), [2, 4])

    # Interrupted after step 2, then the same command again: it resumes.
    resumed = self.create_tempdir().full_path
    with config.unlocked():
      config.num_train_steps = 2
    train_reranker.train_and_evaluate(config, resumed)
    with config.unlocked():
      config.num_train_steps = 4
    again = train_reranker.train_and_evaluate(config, resumed)
    self.assertEqual(again["resumed_from_step"], 2)
    self.assertEqual(_losses(resumed)[4], _losses(straight)[4])
    for key, value in full["after"].items():
      np.testing.assert_allclose(again["after"][key], value, atol=1e-6)
    with open(os.path.join(resumed, "results.json")) as f:
      self.assertEqual(json.load(f)["resumed_from_step"], 2)

  def test_beir_directory(self):
    scifact = _SHARED / "data" / "beir" / "scifact"
    if not scifact.exists():
      self.skipTest(f"{scifact} not present (needs ../shared/data).")
    config = config_lib.get_config("smoke")
    with config.unlocked():
      config.data = f"beir:{scifact}"
      config.num_train_steps = 1
      config.max_length = 32
      config.max_train_queries = 8
      config.eval_max_queries = 4
      config.rerank_k = 3
    out = train_reranker.train_and_evaluate(
        config, self.create_tempdir().full_path)
    self.assertEqual(out["test_docs"], 5183)
    self.assertEqual(out["test_queries"], 4)
    self.assertEqual(out["rerank_pairs"], 12)


if __name__ == "__main__":
  absltest.main()
