"""The README's quickstart runs as written (with a tiny real batch)."""

import os
import pathlib
import re

from absl.testing import absltest

_README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


class ReadmeTest(absltest.TestCase):

  def test_exactly_two_setup_commands(self):
    text = _README.read_text()
    self.assertIn("make demo", text)
    self.assertIn("make test", text)

  def test_quickstart_runs(self):
    text = _README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    self.assertLen(blocks, 1)
    code = blocks[0]
    self.assertLessEqual(len(code.strip().splitlines()), 30)
    # Run it, then take one real train step on a tiny batch with it.
    env = {}
    # The quickstart writes `out/adapter`: keep it out of the checkout.
    cwd = os.getcwd()
    os.chdir(self.create_tempdir().full_path)
    self.addCleanup(os.chdir, cwd)
    exec(compile("import jax.numpy as jnp\n" + code, "README", "exec"), env)  # pylint: disable=exec-used
    tok = env["tokenizer"]
    batch = {
        "query": tok(["add two numbers", "read a file"], pad_to=8),
        "doc": tok(["def add(a, b): return a + b",
                    "def read(p): return open(p).read()"], pad_to=16),
    }
    env["adapters"].unmerge(env["model"])
    loss_before = float(env["loss_fn"](env["model"], batch))
    for _ in range(3):
      env["train_step"](env["model"], env["optimizer"], batch)
    self.assertLess(float(env["loss_fn"](env["model"], batch)), loss_before)
    self.assertEqual(env["emb"].shape, (1, 384))


if __name__ == "__main__":
  absltest.main()
