"""experiments/demo.py (the main job) on the smoke preset."""

import os

from absl.testing import absltest

from experiments import demo
from experiments import finetune_retriever
from experiments.configs import finetune_retriever as config_lib


class DemoTest(absltest.TestCase):

  def test_lora_and_galore_table_and_plot(self):
    config = config_lib.get_config("smoke")
    with config.unlocked():
      config.num_train_steps = 2
      config.eval_max_queries = 20
      config.optimizer.galore.rank = 8
    workdir = self.create_tempdir().full_path
    results = demo.run_demo(config, workdir)
    self.assertEqual([(r["method"], r["optimizer"]) for r in results],
                     [("lora", "adamw"), ("full", "galore")])
    lora, galore = results
    self.assertEqual(lora["zero_shot"], galore["zero_shot"])
    self.assertEqual(galore["trainable_params"], galore["total_params"])
    self.assertLess(lora["trainable_params"], galore["trainable_params"])
    self.assertLess(lora["optimizer_state_bytes"],
                    galore["optimizer_state_bytes"])
    with open(os.path.join(workdir, "results.md")) as f:
      table = f.read()
    self.assertIn("| zero-shot |", table)
    self.assertIn("| full + galore (2 steps) |", table)
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
      config.optimizer.name = "lamb"
    with self.assertRaisesRegex(ValueError, "Unknown optimizer 'lamb'"):
      finetune_retriever.make_optimizer(config)

  def test_galore_state_smaller_than_adamw(self):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from lowrank import optim  # pylint: disable=g-import-not-at-top
    config = config_lib.get_config("smoke")
    params = {"['encoder']": {"w": jnp.zeros((384, 1536))},
              "emb": jnp.zeros((100, 384))}
    sizes = {}
    for name in ("adamw", "galore", "adamw8bit"):
      with config.unlocked():
        config.optimizer.name = name
      tx = finetune_retriever.make_optimizer(config)
      sizes[name] = optim.estimate_bytes(params, tx)
    self.assertLess(sizes["galore"], 0.5 * sizes["adamw"])
    self.assertLess(sizes["adamw8bit"], 0.5 * sizes["adamw"])
    del jax


if __name__ == "__main__":
  absltest.main()
