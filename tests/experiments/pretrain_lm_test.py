"""Tests of experiments/pretrain_lm.py: config checks, data, and one shared
smoke run and resumed copy (`testing.SmokeAndResume`: table, outputs,
resume, skip of finished methods)."""

import json
import os

from absl.testing import absltest
from absl.testing import parameterized
import ml_collections
import numpy as np

from experiments import pretrain_lm
from experiments.configs import pretrain_lm as config_lib
from tests import testing


def _smoke(**changes):
  """The smoke preset with keys (`train__num_steps=2`) changed."""
  return testing.changed(config_lib.get_config("smoke"), **changes)


def _losses(workdir, method):
  with open(os.path.join(workdir, method, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


class ConfigTest(parameterized.TestCase):

  def test_presets(self):
    self.assertEqual(pretrain_lm.validate_config(config_lib.get_config()),
                     list(pretrain_lm.METHODS))
    self.assertEqual(pretrain_lm.validate_config(_smoke()),
                     ["full", "galore", "lora"])
    with self.assertRaisesRegex(ValueError, "Unknown preset 'large'"):
      config_lib.get_config("large")

  def test_shared_keys_follow_unless_a_method_sets_its_own(self):
    config = config_lib.get_config()
    config.optimizer.galore.rank = 8
    config.optimizer.full.learning_rate.peak_value = 1e-3
    config.rank, config.train.num_steps = 16, 1000
    o = config.optimizer.to_dict()
    self.assertEqual(o["galore"]["rank"], 8)
    self.assertEqual(o["fira"]["rank"], 16)
    self.assertEqual(config.adapter.sltrain.rank, 16)
    self.assertEqual(o["full"]["learning_rate"]["decay_steps"], 1000)
    self.assertEqual(o["relora"]["learning_rate"]["total_steps"], 1000)
    self.assertAlmostEqual(o["full"]["learning_rate"]["end_value"], 1e-4)
    self.assertEqual(o["lora"]["learning_rate"]["peak_value"], 3e-3)
    # The pretraining settings kept from the paper scripts.
    self.assertEqual(o["frugal"]["inactive_lr_scale"], 1.0)
    self.assertEqual((o["sst"]["refresh_every"], o["sst"]["rewarm_steps"],
                      o["sst"]["round_length"]), (50, 5, None))

  @parameterized.named_parameters(
      ("unknown_method", dict(methods="full,adam"), ValueError,
       r"config\.methods='full,adam' has unknown or duplicate"),
      ("no_method", dict(methods=""), ValueError,
       r"config\.methods='' has unknown"),
      ("duplicate_method", dict(methods="full,full"), ValueError,
       r"unknown or duplicate methods; expected 'all'"),
      ("zero_steps", dict(train__num_steps=0), ValueError,
       r"config\.train\.num_steps must be a positive integer; found 0"),
      ("unknown_spec", dict(data__spec="imagenet"), ValueError,
       r"config\.data\.spec must be 'auto', .*; found 'imagenet'"),
      ("missing_file", dict(data__spec="file:/nonexistent/c.txt"),
       FileNotFoundError, r"file '/nonexistent/c\.txt' does not exist"),
      ("heads_do_not_divide", dict(model__hidden_size=17), ValueError,
       r"config\.model: hidden_size \(17\) must be divisible by num_heads"),
      ("warmup_as_long_as_run",
       dict(optimizer__galore__learning_rate__warmup_steps=4), ValueError,
       r"config\.optimizer\.galore: .*requires positive decay_steps"),
      ("warmup_longer_than_run",
       dict(optimizer__galore__learning_rate__warmup_steps=5), ValueError,
       r"config\.optimizer\.galore\.learning_rate\.warmup_steps \(5\) must "
       r"be <= config\.train\.num_steps \(4\)"),
      ("misspelt_factory_argument", dict(optimizer__galore__rnak=2),
       ValueError, r"config\.optimizer\.galore: optimizer 'galore_adamw' "
       r"takes no argument 'rnak'"),
      ("unknown_top_level_key", dict(rnak=2), ValueError,
       r"config\.rnak is not a key this binary reads"),
      ("relora_rewarm_longer_than_interval",
       dict(methods="relora",
            optimizer__relora__learning_rate__restart_warmup_steps=3),
       ValueError, r"config\.optimizer\.relora: restart_warmup_steps \(3\) "
       r"must be <= refresh_every \(2\)"),
      ("sst_round_not_a_multiple",
       dict(methods="sst", optimizer__sst__round_length=3), ValueError,
       r"config\.optimizer\.sst: round_length \(3\) must be a multiple"),
      ("zero_peak_lr", dict(optimizer__full__learning_rate__peak_value=0.0),
       ValueError, r"config\.optimizer\.full\.learning_rate\.peak_value must "
       r"be a finite number > 0"),
  )
  def test_bad_config(self, changes, error, pattern):
    with self.assertRaisesRegex(error, pattern):
      pretrain_lm.validate_config(_smoke(**changes))

  def test_relora_without_its_jagged_schedule(self):
    # A config built in code, its schedule replaced by a number.
    values = _smoke(methods="relora").to_dict()
    values["optimizer"]["relora"]["learning_rate"] = 0.1
    with self.assertRaisesRegex(
        ValueError, r"config\.optimizer\.relora\.learning_rate must be a "
        r"dict with schedule='jagged_cosine_schedule' .*; found 0\.1"):
      pretrain_lm.validate_config(ml_collections.ConfigDict(values))

  def test_method_without_an_optimizer_section(self):
    values = _smoke().to_dict()
    del values["optimizer"]["galore"]
    with self.assertRaisesRegex(
        ValueError, r"config\.optimizer has no section for \['galore'\]"):
      pretrain_lm.validate_config(ml_collections.ConfigDict(values))

  def test_train_and_evaluate_checks_first(self):
    workdir = os.path.join(self.create_tempdir().full_path, "never_made")
    with self.assertRaisesRegex(ValueError, "unknown or duplicate"):
      pretrain_lm.train_and_evaluate(_smoke(methods="adam"), workdir)
    self.assertFalse(os.path.exists(workdir))

  def test_override_of_an_unselected_method(self):
    with self.assertRaisesRegex(
        ValueError, r"--config\.adapter\.sltrain\.density=0\.1 has no effect "
        r"in this run: it is read by \['sltrain'\], none of which is in "
        r"methods='full,galore,lora'"):
      pretrain_lm.validate_config(_smoke(),
                                  {"adapter.sltrain.density": 0.1})


class DataTest(absltest.TestCase):

  def test_embedded_corpus_split_and_batches(self):
    config = _smoke(data__spec="lee")
    name, train, val = pretrain_lm.load_data(config)
    self.assertEqual(name, "gensim lee")
    self.assertGreater(len(train), 300_000)
    self.assertIn(b"bushfire", train[:2000].astype(np.uint8).tobytes())
    self.assertLen(val, config.data.eval_batches)
    self.assertEqual(val[0].shape, (4, 16))
    b3 = pretrain_lm.train_batch(train, 3, config)
    self.assertEqual(b3.shape, (4, 16))
    np.testing.assert_array_equal(b3, pretrain_lm.train_batch(train, 3,
                                                              config))
    self.assertFalse(np.array_equal(
        b3, pretrain_lm.train_batch(train, 4, config)))

  def test_corpus_too_short(self):
    path = self.create_tempfile(content="abc" * 10).full_path
    with self.assertRaisesRegex(ValueError, r"is too short: train 27 tokens, "
                                r"validation 3 .*smaller seq_len"):
      pretrain_lm.load_data(_smoke(data__spec=f"file:{path}"))


class SmokeTest(testing.SmokeAndResume):
  """Four methods straight, and a copy interrupted after step 2 of each and
  rerun (ReLoRA restarts right at the interruption; SST resamples every 2
  steps)."""

  module = pretrain_lm
  config_lib = config_lib

  @classmethod
  def config(cls):
    return _smoke(methods="full,galore,relora,sst")

  def test_trains_every_method_and_writes_table_and_plot(self):
    results = {r["method"]: r for r in self.full["results"]}
    self.assertEqual(list(results), ["full", "galore", "relora", "sst"])
    for r in results.values():
      # Trained below the uniform-byte perplexity (256).
      self.assertLess(r["val_ppl"], 256.0, r["method"])
      self.assertGreater(r["compiled_step_memory"]["total_bytes"], 0)
      self.assertEqual(r["resumed_from_step"], 0)
    full, galore, relora = (results[m] for m in ("full", "galore", "relora"))
    self.assertEqual(full["trainable_params"], full["total_params"])
    self.assertEqual(galore["trainable_params"], full["trainable_params"])
    self.assertLess(relora["trainable_params"], full["trainable_params"])
    self.assertLess(galore["optimizer_state_bytes"],
                    full["optimizer_state_bytes"])
    with open(os.path.join(self.straight, "results.md")) as f:
      table = f.read()
    for label in ("Full-Adam", "GaLore", "ReLoRA", "SST"):
      self.assertIn(f"| {label} |", table)
    self.assertGreater(
        os.path.getsize(os.path.join(self.straight, "loss_curves.png")), 1000)
    with open(os.path.join(self.straight, "results.json")) as f:
      self.assertEqual(json.load(f), json.loads(json.dumps(self.full)))

  def test_rerun_resumes_to_the_same_losses(self):
    straight = {r["method"]: r for r in self.full["results"]}
    for r in self.again["results"]:
      method = r["method"]
      self.assertEqual(r["resumed_from_step"], 2)
      losses_a = _losses(self.straight, method)
      losses_b = _losses(self.resumed, method)
      self.assertEqual(sorted(losses_b), [1, 2, 3, 4])
      for step in (3, 4):
        np.testing.assert_allclose(losses_b[step], losses_a[step], rtol=0,
                                   atol=1e-6, err_msg=method)
      np.testing.assert_allclose(r["val_loss"], straight[method]["val_loss"],
                                 atol=1e-6)

  def test_finished_methods_are_skipped(self):
    third = pretrain_lm.train_and_evaluate(self.config(), self.resumed)
    self.assertEqual(third["results"], self.again["results"])


if __name__ == "__main__":
  absltest.main()
