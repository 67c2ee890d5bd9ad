"""README.md tells the truth: its code runs as written, its names exist.

* Every ```python block runs exactly as written, in order, in one namespace.
  The quickstart trains (its loss goes down), compiles its step once, and
  saves an adapter whose LoRA `B` factors are non-zero.
* Every backticked name in the "What is here" and adapter tables, and every
  backticked `lowrank.*` name anywhere, resolves by import / getattr.
"""

import importlib
import inspect
import os
import pathlib
import re

from absl.testing import absltest
import numpy as np
from safetensors import numpy as safetensors_numpy

import lowrank

from tests import jax_compiles

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_README = _ROOT / "README.md"

# Backticked tokens in the tables that are not lowrank Python names.
_EXTERNAL = {  # name -> the module that defines it
    "CheckpointManager": "orbax.checkpoint",
    "Einsum": "flax.nnx",
    "Embed": "flax.nnx",
    "Linear": "flax.nnx",
    "LinearGeneral": "flax.nnx",
    "MultiHeadAttention": "flax.nnx",
}
_NOT_PYTHON = {
    "A", "B",     # the LoRA factors in prose
    "smoke",      # the config preset every experiment config defines
    "use_dora",   # a field of PEFT's adapter_config.json
}
_NUMBER_WORDS = {
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16,
}
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", flags=re.ASCII)


def _python_blocks(text: str) -> list[str]:
  return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _section(text: str, title: str) -> str:
  """From the heading `title` to the next heading of any level."""
  start = text.index(f"\n{title}\n")
  end = text.find("\n#", start + 1)
  return text[start:] if end < 0 else text[start:end]


def _table_rows(section: str) -> list[list[str]]:
  """Body rows of the markdown tables in `section`, as lists of cells."""
  rows = []
  for line in section.splitlines():
    if not line.startswith("|") or re.match(r"\|[-: |]+\|$", line):
      continue
    rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
  return [r for r in rows if r[0] not in ("module", "`method=`")]


def _resolve(obj, dotted: str):
  for part in dotted.split("."):
    obj = getattr(obj, part)
  return obj


def _parameter_names(module) -> set[str]:
  """Parameter names of the public callables a module exports."""
  names = set()
  for name in getattr(module, "__all__", dir(module)):
    member = getattr(module, name, None)
    if callable(member) and not name.startswith("_"):
      try:
        names.update(inspect.signature(member).parameters)
      except (TypeError, ValueError):
        pass
  return names


class ReadmeTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.text = _README.read_text()

  def test_exactly_two_setup_commands(self):
    self.assertIn("make demo", self.text)
    self.assertIn("make test", self.text)

  def test_python_blocks_run_as_written(self):
    blocks = _python_blocks(self.text)
    self.assertNotEmpty(blocks)
    quickstart = blocks[0]
    code_lines = [line for line in quickstart.splitlines() if line.strip()]
    self.assertLessEqual(len(code_lines), 35, "keep the quickstart short")
    # The quickstart writes `out/adapter`: run it in a fresh directory.
    cwd = os.getcwd()
    os.chdir(self.create_tempdir().full_path)
    self.addCleanup(os.chdir, cwd)
    env = {"__name__": "__readme__"}
    with jax_compiles.count_compiles("train_step") as compiles:
      for i, code in enumerate(blocks):
        code = compile(code, f"README.md python block {i}", "exec")
        exec(code, env)  # pylint: disable=exec-used

    # It trained: the loss of the real batch went down.
    losses = env["losses"]
    self.assertGreaterEqual(len(losses), 3)
    self.assertTrue(np.all(np.isfinite(losses)), losses)
    self.assertLess(losses[-1], 0.8 * losses[0], losses)
    # Step 1 compiled; the later steps reused it.
    self.assertEqual(compiles.count, 1)
    self.assertEqual(int(env["optimizer"].step[...]), len(losses))
    # The saved adapter holds the trained factors: every B is non-zero.
    tensors = safetensors_numpy.load_file(
        "out/adapter/adapter_model.safetensors")
    b_factors = {k: v for k, v in tensors.items() if "lora_B" in k}
    self.assertLen(b_factors, 12)  # query and value in each of 6 layers
    for name, value in b_factors.items():
      with self.subTest(name=name):
        self.assertGreater(float(np.abs(value).max()), 0.0)
    self.assertEqual(env["emb"].shape, (1, 384))

  def test_table_names_resolve(self):
    checked = 0
    for section in ("## What is here", "### Adapter methods"):
      for row in _table_rows(_section(self.text, section)):
        owner = re.fullmatch(r"`([^`]+)`", row[0]).group(1)
        if section == "### Adapter methods":
          module = lowrank.adapters
          with self.subTest(method=owner):
            self.assertIn(owner, lowrank.adapters.METHODS)
        elif owner.startswith("lowrank."):
          module = _resolve(lowrank, owner.removeprefix("lowrank."))
        else:
          module = None  # experiments/ or benchmarks/
        cells = row[1:]
        if section == "### Adapter methods":
          cells = cells[1:]  # the trainable-parameter counts are maths
        tokens = re.findall(r"`([^`]+)`", " | ".join(cells))
        for token in tokens:
          with self.subTest(row=owner, token=token):
            checked += self._check_token(module, owner, token)
    self.assertGreater(checked, 60)

  def _check_token(self, module, owner: str, token: str) -> int:
    """Asserts that one backticked table token names something real."""
    name, _, value = token.partition("=")
    name = re.sub(r"\(.*\)$", "", name)  # `rerank(model, ...)` -> rerank
    if (not _IDENTIFIER.fullmatch(name) or name in _NOT_PYTHON
        or name.endswith((".md", ".py", ".json"))):
      return 0  # maths, files, flags and metric names
    if module is None:  # experiments/: each name is one of its binaries
      self.assertTrue((_ROOT / owner / f"{name}.py").is_file(), owner + name)
      return 1
    if "=" in token:  # a keyword argument (and, for `init=`, its value)
      self.assertIn(name, _parameter_names(module))
      if name == "init" and value:
        self.assertIn(value.strip('"'), lowrank.adapters.INITIALIZERS)
      return 1
    if name in _EXTERNAL:
      _resolve(importlib.import_module(_EXTERNAL[name]), name)
      return 1
    inits = {*lowrank.adapters.INITIALIZERS, *lowrank.adapters.lora.INITS}
    if module is lowrank.adapters and (
        name in inits or name == "pissa_niter_k"
        and any(i.startswith("pissa_niter_") for i in inits)):
      return 1
    for base in (module, lowrank):
      try:
        _resolve(base, name)
        return 1
      except AttributeError:
        pass
    self.assertIn(name, _parameter_names(module),
                  f"`{token}` in the {owner} row is neither an attribute "
                  f"of {module.__name__} nor of lowrank, nor a parameter")
    return 1

  def test_every_lowrank_name_resolves(self):
    names = set(re.findall(r"`(lowrank(?:\.[A-Za-z_]\w*)+)", self.text))
    self.assertNotEmpty(names)
    for name in sorted(names):
      with self.subTest(name=name):
        _resolve(lowrank, name.removeprefix("lowrank."))

  def test_adapter_table_lists_every_method(self):
    rows = _table_rows(_section(self.text, "### Adapter methods"))
    listed = {re.fullmatch(r"`([^`]+)`", r[0]).group(1) for r in rows}
    self.assertEqual(listed, set(lowrank.adapters.METHODS))
    counts = re.findall(r"(\w+) adapter methods", self.text)
    for word in counts:
      self.assertEqual(_NUMBER_WORDS.get(word.lower()),
                       len(lowrank.adapters.METHODS), word)

  def test_status_is_not_stale(self):
    status = re.search(r"\nStatus: (.*?)\n\n", self.text, flags=re.S)
    self.assertIsNotNone(status)
    self.assertNotRegex(status.group(1), r"being built|to do|coming soon")


if __name__ == "__main__":
  absltest.main()
