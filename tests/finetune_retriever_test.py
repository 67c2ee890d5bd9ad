"""End-to-end tests of experiments/finetune_retriever.py on the smoke preset."""

import json
import os
import pathlib

from absl.testing import absltest
import numpy as np

from experiments import finetune_retriever
from experiments.configs import finetune_retriever as config_lib

_SHARED = pathlib.Path(
    os.environ.get(
        "LOWRANK_SHARED_DIR",
        pathlib.Path(__file__).resolve().parents[2] / "shared",
    )
)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


class ConfigTest(absltest.TestCase):

  def test_presets_load(self):
    self.assertEqual(config_lib.get_config().method, "lora")
    self.assertEqual(config_lib.get_config("smoke").num_train_steps, 4)
    with self.assertRaisesRegex(ValueError, "Unknown preset"):
      config_lib.get_config("large")

  def test_bad_data_spec(self):
    with self.assertRaisesRegex(ValueError, "Unknown data spec"):
      finetune_retriever.load_data("imagenet")


class TrainAndEvaluateTest(absltest.TestCase):

  def test_smoke_trains_and_rerun_resumes_to_the_same_result(self):
    config = config_lib.get_config("smoke")
    straight = self.create_tempdir().full_path
    full = finetune_retriever.train_and_evaluate(config, straight)
    self.assertEqual(full["resumed_from_step"], 0)
    self.assertGreater(full["trainable_params"], 0)
    self.assertLess(full["trainable_params"], full["total_params"] / 10)
    self.assertGreater(full["compiled_step_memory"]["total_bytes"], 0)
    for key in ("ndcg_cut_10", "recall_10", "recall_100"):
      self.assertBetween(full["final"][key], 0.0, 1.0)
    self.assertTrue(os.path.exists(os.path.join(straight, "results.md")))

    # Interrupted after step 2, then the same command again: it resumes.
    resumed = self.create_tempdir().full_path
    with config.unlocked():
      config.num_train_steps = 2
    finetune_retriever.train_and_evaluate(config, resumed)
    with config.unlocked():
      config.num_train_steps = 4
    again = finetune_retriever.train_and_evaluate(config, resumed)
    self.assertEqual(again["resumed_from_step"], 2)
    self.assertEqual(_losses(resumed)[4], _losses(straight)[4])
    for key, value in full["final"].items():
      np.testing.assert_allclose(again["final"][key], value, atol=1e-6)

  def test_full_fine_tuning_smoke(self):
    config = config_lib.get_config("smoke")
    with config.unlocked():
      config.method = "full"
      config.num_train_steps = 2
      config.optimizer.learning_rate = 2e-5
    out = finetune_retriever.train_and_evaluate(
        config, self.create_tempdir().full_path)
    self.assertEqual(out["trainable_params"], out["total_params"])

  def test_beir_directory(self):
    scifact = _SHARED / "data" / "beir" / "scifact"
    if not scifact.exists():
      self.skipTest(f"{scifact} not present (needs ../shared/data).")
    config = config_lib.get_config("smoke")
    with config.unlocked():
      config.data = f"beir:{scifact}"
      config.num_train_steps = 2
      config.eval_max_queries = 10
      config.doc_max_length = 16
    out = finetune_retriever.train_and_evaluate(
        config, self.create_tempdir().full_path)
    self.assertEqual(out["train_pairs"], 919)
    self.assertEqual(out["test_docs"], 5183)
    self.assertEqual(out["test_queries"], 10)


if __name__ == "__main__":
  absltest.main()
