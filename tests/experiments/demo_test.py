"""experiments/demo.py (the main job) on the smoke preset."""

import os

from absl.testing import absltest

from experiments import demo
from experiments.configs import finetune_retriever as config_lib


class DemoTest(absltest.TestCase):

  def test_lora_and_galore_table_and_plot(self):
    config = config_lib.get_config("smoke")
    with config.unlocked():
      config.train.num_steps = 2
      config.data.eval_max_queries = 20
      # Cheaper, same code paths: queries and documents of one length (one
      # eval compile per model), 32 documents (20 judged + 12 others).
      config.data.doc_max_length = config.data.query_max_length
      config.data.eval_max_docs = 32
      config.demo.galore.rank = 8
      # GaLore on the first layer's 6 matrices (square and not), not all 36:
      # every projected matrix adds its own randomized SVD to the step, and
      # the step is compiled twice (the update, and the fused step for its
      # memory).
      config.demo.galore.project = r"\['encoder'\]\['layer'\]\[0\]"
      # One device: tests/experiments/finetune_retriever_test.py runs it on
      # all eight; here the update would run replicated eight times.
      config.mesh.data = 1
    workdir = self.create_tempdir().full_path
    results = demo.run_demo(config, workdir)
    self.assertEqual([(r["method"], r["optimizer"]) for r in results],
                     [("lora", "adamw"), ("full", "galore_adamw")])
    lora, galore = results
    self.assertEqual(lora["zero_shot"], galore["zero_shot"])
    self.assertEqual(galore["trainable_params"], galore["total_params"])
    self.assertLess(lora["trainable_params"], galore["trainable_params"])
    self.assertLess(lora["optimizer_state_bytes"],
                    galore["optimizer_state_bytes"])
    with open(os.path.join(workdir, "results.md")) as f:
      table = f.read()
    self.assertIn("| zero-shot |", table)
    self.assertIn("| full + galore_adamw (2 steps) |", table)
    self.assertIn("optimizer state", table)
    with open(os.path.join(workdir, "demo.png"), "rb") as f:
      self.assertEqual(f.read(4), b"\x89PNG")
    # Rerunning reuses the finished runs.
    again = demo.run_demo(config, workdir)
    self.assertEqual([r["final"] for r in again], [r["final"] for r in results])

  def test_bad_names(self):
    config = config_lib.get_config("smoke")
    with config.unlocked():
      config.demo.runs = "lora,sgd"
    with self.assertRaisesRegex(ValueError, "Unknown demo run 'sgd'"):
      demo.run_demo(config, self.create_tempdir().full_path)
    with config.unlocked():
      config.demo.runs = "lora"
      config.optimizer.name = "adamx"
    with self.assertRaisesRegex(ValueError, "optimizer name must be one of "
                                ".*got 'adamx'"):
      demo.validate_config(config)

  def test_galore_state_smaller_than_adamw(self):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from lowrank import optim  # pylint: disable=g-import-not-at-top
    from lowrank import train  # pylint: disable=g-import-not-at-top
    params = {"['encoder']": {"w": jnp.zeros((384, 1536))},
              "emb": jnp.zeros((100, 384))}
    sizes = {}
    for run in ("lora", "galore"):
      c = demo.run_config(config_lib.get_config("smoke"), run)
      sizes[c.optimizer.name] = optim.estimate_bytes(
          params, train.optimizer_from_config(c.optimizer))
    sizes["adamw8bit"] = optim.estimate_bytes(params, optim.adamw8bit(1e-3))
    self.assertEqual(sorted(sizes), ["adamw", "adamw8bit", "galore_adamw"])
    sizes["galore"] = sizes["galore_adamw"]
    self.assertLess(sizes["galore"], 0.5 * sizes["adamw"])
    self.assertLess(sizes["adamw8bit"], 0.5 * sizes["adamw"])
    del jax


if __name__ == "__main__":
  absltest.main()
