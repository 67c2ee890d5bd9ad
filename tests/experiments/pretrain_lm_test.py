"""End-to-end tests of experiments/pretrain_lm.py on the smoke preset."""

import json
import os

from absl.testing import absltest
import numpy as np

from experiments import pretrain_lm
from experiments.configs import pretrain_lm as config_lib


def _losses(workdir, method):
  with open(os.path.join(workdir, method, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


class ConfigTest(absltest.TestCase):

  def test_presets_load(self):
    self.assertEqual(config_lib.get_config().methods, "all")
    self.assertEqual(config_lib.get_config("smoke").num_train_steps, 4)
    self.assertEqual(tuple(config_lib.ALL_METHODS), pretrain_lm.METHODS)
    with self.assertRaisesRegex(ValueError, "Unknown preset"):
      config_lib.get_config("large")

  def test_default_config_is_valid(self):
    methods = pretrain_lm.validate_config(config_lib.get_config())
    self.assertEqual(methods, list(pretrain_lm.METHODS))

  def test_bad_configs(self):
    config = config_lib.get_config("smoke")
    for methods, msg in (("full,adam", "Unknown method"),
                         ("", "Unknown method"),
                         ("full,full", "Duplicate")):
      with config.unlocked():
        config.methods = methods
      with self.assertRaisesRegex(ValueError, msg):
        pretrain_lm.validate_config(config)
      with self.assertRaisesRegex(ValueError, msg):
        pretrain_lm.train_and_evaluate(config,
                                       self.create_tempdir().full_path)
    config = config_lib.get_config("smoke")
    with config.unlocked():
      config.rank = config.model.hidden_size
    with self.assertRaisesRegex(ValueError, "rank"):
      pretrain_lm.validate_config(config)
    config = config_lib.get_config("smoke")
    with config.unlocked():
      config.warmup_steps = config.num_train_steps
    with self.assertRaisesRegex(ValueError, "warmup_steps"):
      pretrain_lm.validate_config(config)
    config = config_lib.get_config("smoke")
    with config.unlocked():
      config.num_train_steps = 0
    with self.assertRaisesRegex(ValueError, "num_train_steps"):
      pretrain_lm.validate_config(config)

  def test_bad_data_spec(self):
    with self.assertRaisesRegex(ValueError, "Unknown data spec"):
      pretrain_lm.load_corpus("imagenet")
    with self.assertRaisesRegex(ValueError, "not found"):
      pretrain_lm.load_corpus("file:/nonexistent/corpus.txt")
    with self.assertRaisesRegex(ValueError, "too short"):
      pretrain_lm.split_tokens(b"abc" * 10, 0.1, 32)


class DataTest(absltest.TestCase):

  def test_embedded_corpus_split_and_batches(self):
    name, data = pretrain_lm.load_corpus("lee")
    self.assertEqual(name, "gensim lee")
    self.assertGreater(len(data), 300_000)
    self.assertIn(b"bushfire", data[:2000])
    train, val = pretrain_lm.split_tokens(data, 0.1, 32)
    self.assertEqual(len(train) + len(val), len(data))
    self.assertAlmostEqual(len(val) / len(data), 0.1, places=3)
    self.assertEqual(train.max() < 256, True)
    config = config_lib.get_config("smoke")
    b1 = pretrain_lm.train_batch(train, 3, config)
    self.assertEqual(b1.shape, (config.batch_size, config.seq_len))
    np.testing.assert_array_equal(b1, pretrain_lm.train_batch(train, 3,
                                                              config))
    self.assertFalse(np.array_equal(
        b1, pretrain_lm.train_batch(train, 4, config)))
    vb = pretrain_lm.val_batches(val, config)
    self.assertLen(vb, config.eval_batches)
    self.assertEqual(vb[0].shape, (config.batch_size, config.seq_len))


class TrainAndEvaluateTest(absltest.TestCase):

  def test_smoke_trains_methods_and_writes_table_and_plots(self):
    config = config_lib.get_config("smoke")
    workdir = self.create_tempdir().full_path
    out = pretrain_lm.train_and_evaluate(config, workdir)
    results = {r["method"]: r for r in out["results"]}
    self.assertEqual(sorted(results), ["full", "galore", "lora"])
    for r in results.values():
      self.assertTrue(np.isfinite(r["val_ppl"]))
      # Trained below the uniform-byte perplexity (256).
      self.assertLess(r["val_ppl"], 256.0)
      self.assertGreater(r["compiled_step_memory"]["total_bytes"], 0)
      self.assertTrue(os.path.exists(
          os.path.join(workdir, r["method"], "metrics.csv")))
    full, galore, lora = (results[m] for m in ("full", "galore", "lora"))
    self.assertEqual(full["trainable_params"], full["total_params"])
    self.assertEqual(galore["trainable_params"], full["trainable_params"])
    self.assertLess(lora["trainable_params"], full["trainable_params"])
    self.assertLess(galore["optimizer_state_bytes"],
                    full["optimizer_state_bytes"])
    with open(os.path.join(workdir, "results.md")) as f:
      table = f.read()
    for label in ("Full-Adam", "GaLore", "LoRA"):
      self.assertIn(f"| {label} |", table)
    for png in ("loss_curves.png", "ppl_vs_memory.png"):
      self.assertGreater(os.path.getsize(os.path.join(workdir, png)), 1000)
    with open(os.path.join(workdir, "results.json")) as f:
      self.assertLen(json.load(f)["results"], 3)

  def test_rerun_resumes_to_the_same_losses(self):
    config = config_lib.get_config("smoke")
    with config.unlocked():
      # ReLoRA restarts right at the interruption (step 2); SST resamples
      # every step and re-SVDs every 2.
      config.methods = "relora,sst"
    straight = self.create_tempdir().full_path
    full = pretrain_lm.train_and_evaluate(config, straight)

    resumed = self.create_tempdir().full_path
    with config.unlocked():
      config.num_train_steps = 2
    pretrain_lm.train_and_evaluate(config, resumed)
    with config.unlocked():
      config.num_train_steps = 4
    again = pretrain_lm.train_and_evaluate(config, resumed)
    for a, b in zip(full["results"], again["results"]):
      self.assertEqual(b["resumed_from_step"], 2)
      method = a["method"]
      losses_a, losses_b = _losses(straight, method), _losses(resumed, method)
      self.assertEqual(sorted(losses_b), [1, 2, 3, 4])
      for step in (3, 4):
        np.testing.assert_allclose(losses_b[step], losses_a[step],
                                   rtol=0, atol=1e-6, err_msg=method)
      np.testing.assert_allclose(b["val_loss"], a["val_loss"], atol=1e-6)

    # A finished method is skipped on the next rerun.
    third = pretrain_lm.train_and_evaluate(config, resumed)
    for b, c in zip(again["results"], third["results"]):
      self.assertEqual(c, b)


if __name__ == "__main__":
  absltest.main()
