"""End-to-end tests of experiments/train_reranker.py on the smoke preset.

One smoke run and one interrupted, resumed copy of it (`testing.
SmokeAndResume`) are shared by `SmokeTest`'s methods. The cross-encoder is
all-MiniLM-L6-v2 cut to its first 2 layers (`testing.truncated_minilm`,
through `model.path`: the binary's loading, tokenizer and checkpoint format,
a third of the compile time).
"""

import json
import os
import pathlib

from absl.testing import absltest
import numpy as np

from experiments import train_reranker
from experiments.configs import train_reranker as config_lib
from lowrank import metric_writers
from lowrank.data import specs
from lowrank.ranking import fusion
from lowrank.retrieval import metrics
from tests import testing

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
    config = config_lib.get_config()
    self.assertEqual(config.adapter.method, "lora")
    self.assertEqual(config.data.spec, "code_search")
    self.assertEqual(config_lib.get_config("smoke").train.num_steps, 4)
    scifact = config_lib.get_config("scifact")
    self.assertEqual((scifact.model.max_length, scifact.eval.rerank_k),
                     (256, 30))
    self.assertTrue(scifact.data.spec.startswith("beir:"))
    with self.assertRaisesRegex(ValueError, "Unknown preset"):
      config_lib.get_config("large")

  def test_schedule_follows_num_steps(self):
    config = config_lib.get_config("smoke")
    config.train.num_steps = 9
    self.assertEqual(config.optimizer.learning_rate.decay_steps, 9)

  def test_bad_config_values(self):
    cases = [
        ("eval.first_stage", "splade", "first_stage"),
        ("adapter.method", "lorax", "method must be"),
        ("train.loss", "hinge", "Unknown loss"),
        ("eval.rerank_k", 0, "rerank_k must be a positive integer"),
        ("train.group_size", 1, "group_size must be in"),
        ("data.negatives_pool", 2, "group_size must be in"),
        ("eval.first_stage_depth", 4, "rerank_k"),
        ("data.dev_fraction", 0.0, "dev_fraction"),
        ("eval.fusion_normalization", "softmax", "fusion_normalization"),
        ("train.grad_clip_norm", -1.0, "grad_clip_norm"),
        ("train.eval_every", -1, "eval_every"),
        ("optimizer.name", "adamx", "optimizer name must be"),
        ("optimizer.rank", 4, "takes no argument 'rank'"),
        ("mesh.data", 3, "divisible by the data x fsdp"),
    ]
    for key, value, message in cases:
      config = testing.changed(config_lib.get_config("smoke"), **{key: value})
      with self.subTest(key), self.assertRaisesRegex(ValueError, message):
        train_reranker.train_and_evaluate(
            config, self.create_tempdir().full_path)


class SmokeTest(testing.SmokeAndResume):
  """The smoke run, and a copy killed after step 3 (the last checkpoint is
  step 2's; the outputs not written yet) and rerun: it resumes from 2."""

  module = train_reranker
  config_lib = config_lib

  @classmethod
  def config(cls):
    return testing.changed(config_lib.get_config("smoke"),
                           model__path=testing.truncated_minilm(2))

  def test_outputs_and_metrics(self):
    full = self.full
    self.assertEqual(full["resumed_from_step"], 0)
    self.assertGreater(full["trainable_params"], 0)
    self.assertLess(full["trainable_params"], full["total_params"] / 10)
    for part in ("before", "after", "fused"):
      for key in ("ndcg_cut_10", "recall_10"):
        self.assertBetween(full[part][key], 0.0, 1.0)
    # Reranking and fusion only reorder the top-k: recall@k is unchanged.
    for part in ("after", "fused", "random_order"):
      self.assertAlmostEqual(full["before"]["recall_5"], full[part]["recall_5"])
    self.assertEqual(full["rerank_pairs"], 12 * 5)
    for name in ("results.md", "results.json", "metrics.csv",
                 "first_stage_bm25_top10.json", "reranked_run.json",
                 "dev_first_stage_bm25_top10.json", "dev_reranked_run.json",
                 "fused_run.json"):
      self.assertTrue(os.path.exists(os.path.join(self.straight, name)), name)
    self.assertEqual(sorted(_losses(self.straight)), [2, 4])
    self.assertEqual([r["step"] for r in _rows(self.straight)
                      if "dev_loss" in r], [4])
    self.assertEqual(full["dev_queries"], 6)
    self.assertIn(full["fusion_alpha"], fusion.DEFAULT_GRID)

  def test_fused_run_is_the_dev_chosen_fusion(self):
    full, straight = self.full, self.straight
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
    test = specs.load("code_search", "test", max_queries=12)
    recomputed = metrics.evaluate(test.qrels, saved, tuple(full["fused"]))
    for key, value in full["fused"].items():
      self.assertAlmostEqual(recomputed[key], value, places=9)

  def test_rerun_resumes_to_the_same_result(self):
    self.assertEqual(self.again["resumed_from_step"], 2)
    self.assertEqual(sorted(_losses(self.resumed)), [2, 4])
    self.assertEqual(_losses(self.resumed)[4], _losses(self.straight)[4])
    for part in ("after", "fused"):
      for key, value in self.full[part].items():
        np.testing.assert_allclose(self.again[part][key], value, atol=1e-6)
    self.assertEqual(self.again["fusion_alpha"], self.full["fusion_alpha"])
    self.assertEqual(_load(self.resumed, "results.json")["resumed_from_step"],
                     2)


class BeirDirectoryTest(absltest.TestCase):

  def test_beir_directory(self):
    scifact = _SHARED / "data" / "beir" / "scifact"
    if not scifact.exists():
      self.skipTest(f"{scifact} not present (needs ../shared/data).")
    config = config_lib.get_config("smoke")
    with config.unlocked():
      config.data.update(spec=f"beir:{scifact}", max_train_queries=8,
                         eval_max_queries=4)
      config.train.num_steps = 1
      config.optimizer.learning_rate.warmup_steps = 0
      config.model.update(max_length=32, path=testing.truncated_minilm(2))
      config.eval.update(rerank_k=3, first_stage_depth=3)
    with testing.one_jit_train_step():
      out = train_reranker.train_and_evaluate(
          config, self.create_tempdir().full_path)
    self.assertEqual(out["test_docs"], 5183)
    self.assertEqual(out["test_queries"], 4)
    self.assertEqual(out["rerank_pairs"], 12)
    self.assertEqual(out["dev_queries"], 1)


if __name__ == "__main__":
  absltest.main()
