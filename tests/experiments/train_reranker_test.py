"""End-to-end tests of experiments/train_reranker.py on the smoke preset."""

import json
import os
import pathlib
import shutil

from absl.testing import absltest
import numpy as np

from experiments import train_reranker
from experiments.configs import train_reranker as config_lib
from lowrank import metric_writers
from lowrank.ranking import fusion
from lowrank.retrieval import metrics

_SHARED = pathlib.Path(
    os.environ.get(
        "LOWRANK_SHARED_DIR",
        pathlib.Path(__file__).resolve().parents[3] / "shared",
    )
)


def _rows(workdir):
  return metric_writers.read_csv(os.path.join(workdir, "metrics.csv"))


def _losses(workdir):
  return {r["step"]: r["loss"] for r in _rows(workdir) if "loss" in r}


def _load(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return json.load(f)


class ConfigTest(absltest.TestCase):

  def test_presets_load(self):
    self.assertEqual(config_lib.get_config().method, "lora")
    self.assertEqual(config_lib.get_config().data, "code_search")
    self.assertEqual(config_lib.get_config("smoke").num_train_steps, 4)
    scifact = config_lib.get_config("scifact")
    self.assertEqual((scifact.max_length, scifact.rerank_k), (256, 30))
    self.assertTrue(scifact.data.startswith("beir:"))
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
        "first_stage_depth": (4, "first_stage_depth"),
        "dev_fraction": (0.0, "dev_fraction"),
        "fusion_normalization": ("softmax", "fusion_normalization"),
        "grad_clip_norm": (-1.0, "grad_clip_norm"),
        "dev_every_steps": (0, "dev_every_steps"),
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


class DataTest(absltest.TestCase):

  def test_dev_split_is_held_out_and_negatives_are_unjudged(self):
    config = config_lib.get_config("smoke")
    train, _ = train_reranker.load_data(config.data)
    train_ids, dev_ids = train_reranker.split_queries(train, config)
    self.assertLen(dev_ids, round(0.1 * config.max_train_queries))
    self.assertLen(train_ids, config.max_train_queries - len(dev_ids))
    self.assertEmpty(set(train_ids) & set(dev_ids))
    self.assertEqual((train_ids, dev_ids),
                     train_reranker.split_queries(train, config))
    with config.unlocked():
      config.seed = 1
    self.assertNotEqual(dev_ids,
                        train_reranker.split_queries(train, config)[1])
    index = train_reranker.FirstStage(config, "unused").bm25(train.corpus)
    groups = train_reranker.training_groups(train, train_ids, config, index)
    self.assertNotEmpty(groups)
    for qid, pos, pool in groups:
      self.assertIn(qid, train_ids)
      self.assertTrue(all(train.qrels[qid][d] > 0 for d in pos))
      self.assertEmpty(set(pool) & set(train.qrels[qid]))
      self.assertBetween(len(pool), config.group_size - 1,
                         config.negatives_pool)


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
      self.assertBetween(full["fused"][key], 0.0, 1.0)
    # Reranking and fusion only reorder the top-k: recall@k is unchanged.
    for part in ("after", "fused", "random_order"):
      self.assertAlmostEqual(full["before"]["recall_5"], full[part]["recall_5"])
    self.assertEqual(full["rerank_pairs"], 12 * 5)
    for name in ("results.md", "results.json", "metrics.csv",
                 "first_stage_bm25_top10.json", "reranked_run.json",
                 "dev_first_stage_bm25_top10.json", "dev_reranked_run.json",
                 "fused_run.json"):
      self.assertTrue(os.path.exists(os.path.join(straight, name)), name)
    self.assertEqual(sorted(_losses(straight)), [2, 4])
    dev_rows = [r for r in _rows(straight) if "dev_loss" in r]
    self.assertEqual([r["step"] for r in dev_rows], [0, 4])
    self.assertEqual(full["dev_queries"], 6)
    self.assertIn(full["fusion_alpha"], fusion.DEFAULT_GRID)

    # The saved fused run is the dev-chosen fusion of the saved runs, and the
    # reported numbers are its metrics.
    reranked = _load(straight, "reranked_run.json")
    first = _load(straight, "first_stage_bm25_top10.json")
    self.assertEqual(sorted(reranked), sorted(first))
    for q, docs in reranked.items():
      self.assertLen(docs, 5)
      self.assertEqual(set(docs), set(sorted(
          first[q], key=lambda d: (first[q][d], d), reverse=True)[:5]))
    alpha = full["fusion_alpha"]
    fused = fusion.fuse(
        [reranked, {q: {d: first[q][d] for d in ds}
                    for q, ds in reranked.items()}],
        [alpha, 1 - alpha], normalization="zscore")
    saved = _load(straight, "fused_run.json")
    self.assertEqual(sorted(saved), sorted(fused))
    for q, docs in fused.items():  # Equal up to summation order.
      self.assertEqual(sorted(saved[q]), sorted(docs))
      for d, score in docs.items():
        self.assertAlmostEqual(saved[q][d], score, places=9)
    test = train_reranker.load_data(config.data, eval_max_queries=12)[1]
    recomputed = metrics.evaluate(test.qrels, saved, tuple(full["fused"]))
    for key, value in full["fused"].items():
      self.assertAlmostEqual(recomputed[key], value, places=9)

    # Killed after step 3 (the last checkpoint is step 2's; its outputs not
    # written yet), then the same command again: it resumes from step 2.
    resumed = os.path.join(self.create_tempdir().full_path, "workdir")
    shutil.copytree(straight, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    for name in ("results.json", "reranked_run.json", "fused_run.json"):
      os.remove(os.path.join(resumed, name))
    again = train_reranker.train_and_evaluate(config, resumed)
    self.assertEqual(again["resumed_from_step"], 2)
    self.assertEqual(sorted(_losses(resumed)), [2, 4])
    self.assertEqual(_losses(resumed)[4], _losses(straight)[4])
    for part in ("after", "fused"):
      for key, value in full[part].items():
        np.testing.assert_allclose(again[part][key], value, atol=1e-6)
    self.assertEqual(again["fusion_alpha"], full["fusion_alpha"])
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
      config.first_stage_depth = 3
    out = train_reranker.train_and_evaluate(
        config, self.create_tempdir().full_path)
    self.assertEqual(out["test_docs"], 5183)
    self.assertEqual(out["test_queries"], 4)
    self.assertEqual(out["rerank_pairs"], 12)
    self.assertEqual(out["dev_queries"], 1)


if __name__ == "__main__":
  absltest.main()
