"""A real, embedded retrieval task: Python docstring summary -> function code.

Built from the standard library of the running interpreter
(`sysconfig.get_paths()["stdlib"]`), so it needs no download and is
deterministic for a given Python version. In the spirit of CodeSearchNet:

- every top-level function and every method of a top-level class that has a
  docstring gives one (query, document) pair;
- the query is the docstring's summary (its first paragraph, collapsed to one
  line);
- the document is the function's source (`def` line onwards, decorators not
  included, dedented) with the docstring statement removed;
- the split is by MODULE, so no test query has a sibling function in train.

Pairs are dropped when the summary has fewer than `min_summary_words` words
or is boilerplate ("Return self.", "Implement iter(self).", ...), when the
code is longer than `max_code_chars` or has fewer than 2 non-blank lines
once the docstring is gone, or when the stripped code does not re-parse as a
docstring-free function. Then, walking the files in sorted path order, only
the first pair of each summary (case-insensitive) and of each code text is
kept, so no two queries share a summary and no two documents are identical
(that also keeps a test query's exact text out of train).

Sizes with the defaults (`test_fraction=0.2`, `min_summary_words=4`,
`max_code_chars=2000`), measured on CPython 3.11.7 (573 stdlib files parsed,
13,925 functions and methods, 5,962 with a docstring):

| split | modules with pairs | queries = documents = qrels |
| --- | ---: | ---: |
| train | 255 | 3,806 |
| test | 64 | 1,100 |

Other Python versions give other (but equally deterministic) sizes. The
first call takes about 2 seconds (parsing); results are cached per argument
tuple.

Ids: a document id is `"<module>:<qualname>"` (e.g. `"json.decoder:
JSONDecoder.decode"`); its query id is the same with a `"q:"` prefix. They
differ on purpose, so that `ignore_identical_ids=True` (a common BEIR
default) cannot remove the one relevant document.
"""

import ast
from collections.abc import Iterator
import dataclasses
import functools
import hashlib
import os
import pathlib
import re
import sysconfig
import tokenize

from absl import logging

from lowrank.data import beir

SKIP_DIRS = frozenset({
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "__pycache__",
    "turtledemo",
    "ensurepip",
    "pydoc_data",
})
QUERY_PREFIX = "q:"

# Whole summaries (casefolded) that say nothing specific about the code. Most
# are under `min_summary_words` anyway; these catch the longer ones.
_BOILERPLATE = re.compile(
    r"^(?:"
    r"returns? (?:self|repr\(self\)|str\(self\)|hash\(self\))"
    r"|implement \w+\(self(?:, \w+)?\)"
    r"|initiali[sz]e self(?:\. +see help\(type\(self\)\) for accurate "
    r"signature)?"
    r"|create and return a new object(?:\. +see help\(type\(self\)\) for "
    r"accurate signature)?"
    r"|helper for pickle"
    r"|(?:this is an? )?(?:abstract|dummy|placeholder) method"
    r"(?: *-? *to be (?:overwritten|overridden) (?:by|in) (?:a )?"
    r"(?:child|sub) ?class(?:es)?)?"
    r"|(?:this method is )?not (?:yet )?implemented(?: yet)?"
    r"|\**deprecated\**"
    r"|internal (?:function|method|helper)"
    r"|for internal use(?: only)?"
    r")[.!]?$"
)


@dataclasses.dataclass(frozen=True)
class _Pair:
  module: str
  qualname: str
  summary: str
  code: str


def _stdlib_files(root: pathlib.Path) -> Iterator[tuple[str, pathlib.Path]]:
  """Yields `(module name, path)` for importable stdlib `.py` files, sorted."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Prune in place: skipped trees (site-packages!) are never walked.
    dirnames[:] = [
        d for d in dirnames if d not in SKIP_DIRS and d.isidentifier()
    ]
    rel = pathlib.Path(dirpath).relative_to(root).parts
    for name in filenames:
      stem, ext = os.path.splitext(name)
      if ext != ".py" or not stem.isidentifier():
        continue
      parts = rel if stem == "__init__" else (*rel, stem)
      if parts:
        found.append((".".join(parts), pathlib.Path(dirpath, name)))
  found.sort(key=lambda mp: mp[1].relative_to(root).as_posix())
  yield from found


def _read_source(path: pathlib.Path) -> str | None:
  """Decoded source with `\\n` line ends (as `ast` counts lines), or None."""
  try:
    data = path.read_bytes()
    encoding, _ = tokenize.detect_encoding(iter(data.splitlines(True)).__next__)
    text = data.decode(encoding)
  except (OSError, SyntaxError, UnicodeDecodeError, LookupError):
    return None
  return text.replace("\r\n", "\n").replace("\r", "\n")


def _summary(docstring: str) -> str:
  """First paragraph of a (cleaned) docstring on one line."""
  first_paragraph = re.split(r"\n\s*\n", docstring.strip(), maxsplit=1)[0]
  return " ".join(first_paragraph.split())


def _code_without_docstring(
    lines: list[bytes], node: ast.FunctionDef | ast.AsyncFunctionDef
) -> str:
  """The function's source, docstring statement removed, dedented.

  `ast` positions are 1-based lines and 0-based UTF-8 byte columns, hence
  the byte lines.
  """
  first = node.lineno  # The `def` line: decorators are not included.
  seg = list(lines[first - 1 : node.end_lineno])
  seg[-1] = seg[-1][: node.end_col_offset]
  doc = node.body[0]
  start, end = doc.lineno - first, doc.end_lineno - first
  before = seg[start][: doc.col_offset]
  after = seg[end][doc.end_col_offset :].strip()
  if after.startswith(b";"):  # `"""Doc."""; x = 1`
    after = after[1:].strip()
  if not after and not before.strip():
    replacement = []  # The usual case: the docstring has lines of its own.
  elif not before.strip():
    replacement = [before + after]
  else:  # `def f(): """Doc."""` or a docstring after `:` on the `def` line.
    replacement = [before.rstrip() + (b" " + after if after else b"")]
  seg[start : end + 1] = replacement

  indent = seg[0][: node.col_offset]
  if indent.strip():  # Something else precedes `def` on its line.
    indent = b" " * node.col_offset
  out = [seg[0][node.col_offset :]]
  for line in seg[1:]:
    if line.startswith(indent):
      line = line[len(indent) :]
    else:  # Continuation lines and string contents may be indented less.
      line = line[: len(indent)].lstrip() + line[len(indent) :]
    out.append(line.rstrip())
  return b"\n".join(out).decode("utf-8").strip("\n")


def _is_clean_function(code: str) -> bool:
  """Whether `code` parses as one function without a docstring."""
  try:
    tree = ast.parse(code)
  except (SyntaxError, ValueError):
    return False
  return (
      len(tree.body) == 1
      and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef))
      and ast.get_docstring(tree.body[0], clean=False) is None
  )


def _functions(
    tree: ast.Module,
) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
  """Top-level functions and methods of top-level classes, in source order."""
  function_types = (ast.FunctionDef, ast.AsyncFunctionDef)
  for node in tree.body:
    if isinstance(node, function_types):
      yield node.name, node
    elif isinstance(node, ast.ClassDef):
      for child in node.body:
        if isinstance(child, function_types):
          yield f"{node.name}.{child.name}", child


@functools.lru_cache(maxsize=8)
def _extract_pairs(
    stdlib: str, min_summary_words: int, max_code_chars: int
) -> tuple[tuple[_Pair, ...], int]:
  """All kept pairs of the whole stdlib, and the number of files read."""
  pairs = []
  seen_ids, seen_summaries, seen_code = set(), set(), set()
  num_files = 0
  for module, path in _stdlib_files(pathlib.Path(stdlib)):
    source = _read_source(path)
    if source is None:
      continue
    try:
      tree = ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError):
      continue
    num_files += 1
    lines = [line.encode("utf-8") for line in source.split("\n")]
    for qualname, node in _functions(tree):
      docstring = ast.get_docstring(node, clean=True)
      if docstring is None:
        continue
      summary = _summary(docstring)
      key = summary.casefold()
      if (
          len(summary.split()) < min_summary_words
          or _BOILERPLATE.fullmatch(key)
          or key in seen_summaries
          or f"{module}:{qualname}" in seen_ids  # E.g. property setters.
      ):
        continue
      code = _code_without_docstring(lines, node)
      if (
          len(code) > max_code_chars
          or sum(1 for line in code.split("\n") if line.strip()) < 2
          or code in seen_code
          or not _is_clean_function(code)
      ):
        continue
      seen_ids.add(f"{module}:{qualname}")
      seen_summaries.add(key)
      seen_code.add(code)
      pairs.append(_Pair(module, qualname, summary, code))
  return tuple(pairs), num_files


def is_test_module(module: str, test_fraction: float = 0.2) -> bool:
  """The split rule: sha1 of the module name, mod 1000, below the fraction."""
  digest = hashlib.sha1(module.encode("utf-8")).hexdigest()
  return int(digest, 16) % 1000 < test_fraction * 1000


@functools.lru_cache(maxsize=16)
def load_code_search(
    split: str = "test",
    *,
    max_queries: int | None = None,
    test_fraction: float = 0.2,
    min_summary_words: int = 4,
    max_code_chars: int = 2000,
    seed: int = 0,
) -> beir.Dataset:
  """Docstring-summary -> code retrieval over the running Python's stdlib.

  See the module docstring for how pairs are built and the split sizes.
  Every document is relevant (label 1) to its own query only. The result is
  cached and shared between calls with the same arguments: do not mutate it.

  Args:
    split: `"train"` or `"test"`; the split is by module (`is_test_module`).
    max_queries: Keep at most this many queries, chosen deterministically by
      hashing `(seed, query id)`, in their original order. The corpus keeps
      ALL documents of the split, so the others remain as distractors.
    test_fraction: Fraction of the 1000 sha1 buckets of module names that go
      to test.
    min_summary_words: Drop summaries with fewer whitespace-separated words.
    max_code_chars: Drop functions whose stripped code is longer.
    seed: Changes which queries `max_queries` keeps; nothing else.

  Returns:
    A `beir.Dataset` named `"code_search"` with `corpus`, `queries` and
    `qrels` for `split`. For `split="train"`, `train_pairs` holds the
    `(query, code)` pairs of the kept queries (empty for `"test"`).

  Raises:
    ValueError: For an unknown split or out-of-range arguments.
  """
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
  if not 0.0 <= test_fraction <= 1.0:
    raise ValueError(f"test_fraction must be in [0, 1]; got {test_fraction}")
  if max_queries is not None and max_queries < 1:
    raise ValueError(f"max_queries must be positive; got {max_queries}")
  stdlib = sysconfig.get_paths()["stdlib"]
  all_pairs, num_files = _extract_pairs(
      stdlib, min_summary_words, max_code_chars
  )
  want_test = split == "test"
  pairs = [
      p
      for p in all_pairs
      if is_test_module(p.module, test_fraction) == want_test
  ]
  corpus = {f"{p.module}:{p.qualname}": p.code for p in pairs}
  if max_queries is not None and max_queries < len(pairs):

    def rank(p: _Pair) -> str:
      key = f"{seed}:{QUERY_PREFIX}{p.module}:{p.qualname}".encode("utf-8")
      return hashlib.sha1(key).hexdigest()

    keep = {id(p) for p in sorted(pairs, key=rank)[:max_queries]}
    pairs = [p for p in pairs if id(p) in keep]
  queries = {f"{QUERY_PREFIX}{p.module}:{p.qualname}": p.summary for p in pairs}
  qrels = {
      f"{QUERY_PREFIX}{p.module}:{p.qualname}": {f"{p.module}:{p.qualname}": 1}
      for p in pairs
  }
  train_pairs = [] if want_test else [(p.summary, p.code) for p in pairs]
  logging.info(
      "load_code_search(%r): %d queries, %d documents from %s (%d files read)",
      split,
      len(queries),
      len(corpus),
      stdlib,
      num_files,
  )
  return beir.Dataset(
      corpus=corpus,
      queries=queries,
      qrels=qrels,
      name="code_search",
      train_pairs=train_pairs,
  )
