"""The package surface: what is documented and imported is what exists.

* `lowrank`'s docstring names every subpackage and top-level module.
* Importing only a subpackage makes every one of its submodules reachable
  as an attribute (`lowrank.retrieval.metrics` after
  `import lowrank.retrieval`), and every name in its `__all__` resolves.
  Each check runs in a fresh interpreter, so no other test's imports help.
* Nothing cites a file that is not in the repository.
"""

import ast
import importlib
import io
import json
import pathlib
import re
import subprocess
import sys
import tokenize

from absl.testing import absltest
from absl.testing import parameterized

import lowrank

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_PACKAGE = _ROOT / "lowrank"
_SUBPACKAGES = sorted(
    p.name for p in _PACKAGE.iterdir() if (p / "__init__.py").is_file()
)
_MODULES = sorted(
    p.stem for p in _PACKAGE.glob("*.py") if not p.stem.startswith("_")
)
# Subpackages that import nothing heavy: their submodules load on first use.
_LAZY = ("data", "models", "retrieval")
# (subpackage, submodule) pairs whose attribute is not the submodule (a
# function named like its module). None: `lowrank.ranking.rerank` is the
# function, defined in `lowrank.ranking.cascade`.
_SHADOWED = frozenset()

_PROBE = r"""
import importlib, json, pathlib, sys, types
package = importlib.import_module(sys.argv[1])
report = {"jax_imported": "jax" in sys.modules, "all": None,
          "unreachable": [], "unresolved": []}
folder = pathlib.Path(package.__file__).parent
for path in sorted(folder.glob("*.py")):
  if path.stem == "__init__":
    continue
  value = getattr(package, path.stem, None)
  if not isinstance(value, types.ModuleType):
    report["unreachable"].append([path.stem, type(value).__name__])
names = getattr(package, "__all__", None)
report["all"] = None if names is None else list(names)
for name in names or ():
  try:
    getattr(package, name)
  except AttributeError as e:
    report["unresolved"].append([name, str(e)])
report["dir_has_all"] = set(names or ()) <= set(dir(package))
print(json.dumps(report))
"""


def _probe(package: str) -> dict:
  """Imports only `package` in a fresh interpreter; returns what it saw."""
  result = subprocess.run(
      [sys.executable, "-c", _PROBE, package],
      capture_output=True, text=True, cwd=_ROOT, timeout=300, check=False,
  )
  if result.returncode:
    raise AssertionError(f"import {package} failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


class PackageDocstringTest(absltest.TestCase):

  def test_names_every_subpackage_and_module(self):
    self.assertNotEmpty(_SUBPACKAGES)
    for name in (*_SUBPACKAGES, *_MODULES):
      with self.subTest(name=name):
        self.assertRegex(lowrank.__doc__, rf"\blowrank\.{name}\b")
        self.assertIn(name, lowrank.__all__)

  def test_top_level_import_is_light(self):
    report = _probe("lowrank")
    self.assertFalse(report["jax_imported"])
    self.assertEqual(report["unreachable"], [])
    self.assertEqual(report["unresolved"], [])

  def test_unknown_attribute_error_lists_what_exists(self):
    with self.assertRaisesRegex(
        AttributeError, r"'lowrank.retrieval' has no attribute 'BiEncodr'.*"
        r"BiEncoder"):
      lowrank.retrieval.BiEncodr  # pylint: disable=pointless-statement

  def test_subpackage_list_is_complete(self):
    self.assertEqual(
        set(_SUBPACKAGES),
        {"adapters", "data", "models", "optim", "ranking", "retrieval",
         "spectral"},
        "a subpackage was added or removed: update this test and the "
        "lowrank docstring",
    )


class SubpackageSurfaceTest(parameterized.TestCase):

  @parameterized.parameters(*_SUBPACKAGES)
  def test_submodules_reachable_and_all_resolves(self, name):
    report = _probe(f"lowrank.{name}")
    unreachable = [
        sub for sub, _ in report["unreachable"] if (name, sub) not in _SHADOWED
    ]
    self.assertEqual(unreachable, [],
                     f"lowrank.{name}.<submodule> is not a module")
    self.assertIsNotNone(report["all"], f"lowrank.{name} has no __all__")
    self.assertEqual(report["unresolved"], [])
    self.assertTrue(report["dir_has_all"])
    submodules = {
        p.stem for p in (_PACKAGE / name).glob("*.py")
        if not p.stem.startswith("_")
    }
    self.assertEmpty(submodules - set(report["all"]),
                     f"submodules missing from lowrank.{name}.__all__")
    if name in _LAZY:
      self.assertFalse(report["jax_imported"],
                       f"import lowrank.{name} imported jax")

  def test_retrieval_exports(self):
    # pylint: disable-next=g-import-not-at-top
    from lowrank.retrieval import BiEncoder, biencoder
    self.assertIs(BiEncoder, biencoder.BiEncoder)
    self.assertTrue(callable(lowrank.retrieval.metrics.evaluate))

  def test_rerank_is_the_cascade_function(self):
    module = importlib.import_module("lowrank.ranking.cascade")
    self.assertIs(lowrank.ranking.rerank, module.rerank)
    with self.assertRaises(ModuleNotFoundError):
      importlib.import_module("lowrank.ranking.rerank")


# References to repository files: a path ending in one of these extensions.
_REFERENCE = re.compile(
    r"(?<![\w./-])((?:\.\.?/)*[\w-][\w.-]*(?:/[\w.-]+)*\.(?:md|py|json|ipynb))"
    r"(?![\w-])"
)
# Names that are not this repository's files: files a program writes or
# reads at a user's path, and files of other projects, cited by their repo.
_NOT_REPO_FILES = {
    "1_Pooling/config.json",          # sentence-transformers model folders
    "configs/llama_130m.json",        # jiaweizzhao/GaLore
    "configs/llama_60m.json",         # jiaweizzhao/GaLore
    "losses/regularization.py",       # naver/splade
    "utils/initialization_utils.py",  # the LoRA-XS authors' code
    "peft_pretraining/training_utils.py",  # Guitaricet/relora
    "frugal/adamw.py",                     # philip-zmushko/FRUGAL
    "frugal/galore_projector.py",          # philip-zmushko/FRUGAL
    "frugal/proj_optimizer_templates.py",  # philip-zmushko/FRUGAL
    "fira_adamw.py",                       # xichen-fy/Fira
    "q_galore_torch/q_galore_projector.py",  # VITA-Group/Q-GaLore
    "path/tokenizer.json",            # a checkpoint directory's file
    "workdir/results.md",             # a run's output
    "results.md",                     # a run's output
    "path.py",                        # a user's config file
    "_test.py",                       # pytest's file pattern
}


# Documents about other projects' code: docs/fidelity.md cites the authors'
# repositories file by file (each at a named commit), and lowrank's files
# relative to their package, so its references are not this checkout's.
_ABOUT_OTHER_CODE = {"docs/fidelity.md"}


def _doc_files() -> list[pathlib.Path]:
  listed = subprocess.run(
      ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
      capture_output=True, text=True, cwd=_ROOT, check=True,
  ).stdout.split()
  return [_ROOT / f for f in listed
          if f.endswith((".py", ".md", ".ipynb")) and (_ROOT / f).is_file()
          and f not in _ABOUT_OTHER_CODE]


def _prose(path: pathlib.Path) -> str:
  """The documentation in a file: markdown, notebook markdown cells, or a
  Python file's docstrings and comments (not its code and test inputs)."""
  text = path.read_text(errors="replace")
  if path.suffix == ".md":
    return text
  if path.suffix == ".ipynb":
    cells = json.loads(text).get("cells", [])
    return "\n".join("".join(c.get("source", [])) for c in cells
                     if c.get("cell_type") == "markdown")
  parts = []
  tree = ast.parse(text)
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                         ast.AsyncFunctionDef)):
      parts.append(ast.get_docstring(node, clean=False) or "")
  lines = io.StringIO(text).readline
  parts.extend(tok.string for tok in tokenize.generate_tokens(lines)
               if tok.type == tokenize.COMMENT)
  return "\n".join(parts)


# A paragraph that compares with another project's code (the methods'
# "Differences from the official code", paper presets' sources) cites that
# project's files: `run_glue.py:552`, `galore_torch/adamw.py`. There only
# paths under one of this repository's top-level entries are checked.
_ABOUT_OTHER_PROJECT = re.compile(
    r"official|[\w.-]+/[\w.-]+@[0-9a-f]{7,40}|authors' code|galore-torch|"
    r"bitsandbytes|PEFT", re.IGNORECASE)


def _missing_references(
    text: str, citing: pathlib.Path, basenames: set[str]
) -> list[str]:
  """The file references in `text` (from file `citing`) that do not exist."""
  tops = {p.name for p in _ROOT.iterdir()}
  missing = []
  for paragraph in re.split(r"\n\s*\n", text):
    about_other = _ABOUT_OTHER_PROJECT.search(paragraph) is not None
    missing.extend(
        ref for ref in _missing_in_paragraph(paragraph, citing, basenames)
        if not about_other or ref.split("/")[0] in tops)
  return missing


def _missing_in_paragraph(
    text: str, citing: pathlib.Path, basenames: set[str]
) -> list[str]:
  missing = []
  for match in _REFERENCE.finditer(text):
    ref = match.group(1)
    if ref in _NOT_REPO_FILES:
      continue
    if "/" in ref:  # relative to the repository root or to the citing file
      ok = any(
          c.exists() and c.resolve().is_relative_to(_ROOT)
          for c in (_ROOT / ref, citing.parent / ref)
      )
    elif ref.endswith(".json"):
      ok = True  # file-format names (config.json, tokenizer.json, ...)
    elif ref.endswith(".md"):
      ok = (_ROOT / ref).is_file() or (citing.parent / ref).is_file()
    else:  # a .py / .ipynb by its name: some file of the repository
      ok = ref in basenames
    if not ok:
      missing.append(ref)
  return missing


class FileReferencesTest(absltest.TestCase):

  def test_every_cited_file_exists(self):
    files = _doc_files()
    self.assertGreater(len(files), 100)
    basenames = {f.name for f in files}
    missing = [
        f"{f.relative_to(_ROOT)}: {ref}"
        for f in files
        for ref in _missing_references(_prose(f), f, basenames)
    ]
    self.assertEqual(missing, [], "cited files that are not in the repo")

  def test_outside_and_absent_files_are_caught(self):
    citing = _ROOT / "lowrank" / "example.py"
    text = ("Algorithms: REFERENCE.md section 3; style: "
            "`../shared/docs/STYLE.md`; see docs/api.md, colab/nope.ipynb "
            "and missing_module.py; fine: README.md, lowrank/sharding.py, "
            "tests/conftest.py, config.json.")
    self.assertEqual(
        _missing_references(text, citing, {"sharding.py", "conftest.py"}),
        ["REFERENCE.md", "../shared/docs/STYLE.md", "docs/api.md",
         "colab/nope.ipynb", "missing_module.py"],
    )

  def test_other_projects_files_in_a_comparison_paragraph(self):
    citing = _ROOT / "lowrank" / "example.py"
    text = ("Differences from the official code (owner/repo@0123456789ab, "
            "`run_glue.py:552`, `src/trainer.py`); see lowrank/nope.py.\n\n"
            "Our own: run_glue.py and src/trainer.py.")
    self.assertEqual(_missing_references(text, citing, set()),
                     ["lowrank/nope.py", "run_glue.py", "src/trainer.py"])


if __name__ == "__main__":
  absltest.main()
