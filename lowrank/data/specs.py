"""Datasets named by one string, and one way to take a subset of them.

A data spec names a retrieval dataset the same way in every binary and
notebook:

- `"code_search"`: docstring -> code search over the running Python's
  standard library (`lowrank.data.code_search`, no download);
- `"beir:<directory>"`: a BEIR-format directory (`lowrank.data.beir`).

`load(spec, split)` returns a `beir.Dataset`; `subset` keeps the first
queries (by id) and, optionally, a smaller corpus that keeps every document
judged for a kept query; `positive_pairs` lists `(query, document)` texts
for training.
"""

from __future__ import annotations

import os
import pathlib

from lowrank.data import beir
from lowrank.data import code_search

SPECS = ("code_search", "beir:<directory>")


def _check_limit(name: str, value: object) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"{name} must be an int >= 0 (0: no limit); got "
                     f"{value!r}.")
  return value


def subset(
    dataset: beir.Dataset, *, max_queries: int = 0, max_docs: int = 0
) -> beir.Dataset:
  """The first `max_queries` judged queries (by id) and a corpus subset.

  Args:
    dataset: The dataset (not modified).
    max_queries: Keep the first N judged queries in sorted id order (0: all).
    max_docs: Keep N documents: every document judged for a kept query,
      then the others in sorted id order until N (0: the whole corpus).
      Smaller corpora make metrics optimistic; say so where you report them.

  Returns:
    `dataset` itself when nothing is cut, else a new `Dataset` (same name;
    `train_pairs` dropped, since they may mention cut queries).

  Raises:
    ValueError: On a negative or non-integer limit.
  """
  max_queries = _check_limit("max_queries", max_queries)
  max_docs = _check_limit("max_docs", max_docs)
  qids = sorted(dataset.qrels)
  if max_queries:
    qids = qids[:max_queries]
  corpus = dataset.corpus
  if max_docs and max_docs < len(corpus):
    keep = {d for q in qids for d in dataset.qrels[q] if d in corpus}
    for d in sorted(corpus):
      if len(keep) >= max_docs:
        break
      keep.add(d)
    corpus = {d: t for d, t in corpus.items() if d in keep}
  if len(qids) == len(dataset.qrels) and corpus is dataset.corpus:
    return dataset
  return beir.Dataset(
      name=dataset.name,
      corpus=corpus,
      queries={q: dataset.queries[q] for q in qids if q in dataset.queries},
      qrels={q: dataset.qrels[q] for q in qids},
  )


def check_beir_directory(path: str | os.PathLike[str],
                         splits: tuple[str, ...] | list[str] = ("test",)
                         ) -> None:
  """Raises unless `path` is a BEIR directory holding `splits` (no loading).

  A BEIR directory holds `corpus.jsonl`, `queries.jsonl` and
  `qrels/<split>.tsv` for every split.

  Raises:
    FileNotFoundError: Naming the missing directory or file (and, for a
      split, the splits that exist).
  """
  root = pathlib.Path(path)
  if not root.is_dir():
    where = "" if root.is_absolute() else f" (relative to {os.getcwd()})"
    raise FileNotFoundError(f"directory {str(root)!r} does not exist{where}.")
  for item in ("corpus.jsonl", "queries.jsonl"):
    if not (root / item).is_file():
      raise FileNotFoundError(
          f"{str(root / item)!r} does not exist; a BEIR directory holds "
          f"corpus.jsonl, queries.jsonl and qrels/<split>.tsv.")
  available = beir.available_splits(root)
  if missing := [s for s in splits if s not in available]:
    raise FileNotFoundError(
        f"{str(root / 'qrels')!r} has no {missing[0]}.tsv (available "
        f"splits: {available}); this run needs {list(splits)}.")


def check(spec: str, splits: tuple[str, ...] | list[str] = ("test",)
          ) -> None:
  """Raises unless `spec` names a dataset `load` can read (no loading).

  Raises:
    ValueError: On an unknown spec.
    FileNotFoundError: If a BEIR directory or one of its files is missing.
  """
  if isinstance(spec, str) and spec.startswith("beir:") and spec[5:]:
    check_beir_directory(spec[5:], splits)
  elif spec != "code_search":
    raise ValueError(f"must be one of ['code_search'] or 'beir:<directory>'; "
                     f"found {spec!r} (<directory>: a BEIR-format one).")


def load(spec: str, split: str = "test", *, max_queries: int = 0,
         max_docs: int = 0) -> beir.Dataset:
  """The dataset a data spec names, optionally cut by `subset`.

  Args:
    spec: `"code_search"` or `"beir:<directory>"`.
    split: `"train"` or `"test"` (BEIR: any qrels split of the directory).
    max_queries, max_docs: See `subset`. For `"code_search"`,
      `max_queries` keeps `load_code_search`'s seeded hashed sample of
      queries (its module-ordered ids would keep a few modules only); the
      corpus keeps every document of the split unless `max_docs` is set.

  Returns:
    A `beir.Dataset`. For `"code_search"` train, `train_pairs` holds the
    `(query, code)` pairs.

  Raises:
    ValueError: On an unknown spec or a bad limit.
    FileNotFoundError: If a BEIR directory or its files are missing.
  """
  if not isinstance(spec, str):
    raise TypeError(f"A data spec is a str ({' or '.join(SPECS)}); got "
                    f"{type(spec).__name__}.")
  max_queries = _check_limit("max_queries", max_queries)
  if spec == "code_search":
    # Its own deterministic hashed sample of queries (the published tables
    # use it), not the first ids: the ids are module-ordered.
    dataset = code_search.load_code_search(
        split, max_queries=max_queries or None)
    max_queries = 0
  elif spec.startswith("beir:") and spec[len("beir:"):]:
    dataset = beir.load_beir(spec[len("beir:"):], split)
  else:
    raise ValueError(f"Unknown data spec {spec!r}; expected 'code_search' "
                     f"or 'beir:<directory>' (a BEIR-format directory).")
  if max_queries or max_docs:
    return subset(dataset, max_queries=max_queries, max_docs=max_docs)
  return dataset


def positive_pairs(dataset: beir.Dataset) -> list[tuple[str, str]]:
  """`(query text, document text)` for every judgment with relevance > 0.

  A dataset that carries its own `train_pairs` (code search) returns those;
  otherwise the pairs come from the qrels in sorted (query, document) id
  order, skipping documents missing from the corpus.
  """
  if dataset.train_pairs:
    return list(dataset.train_pairs)
  return [(dataset.queries[q], dataset.corpus[d])
          for q in sorted(dataset.qrels) if q in dataset.queries
          for d, rel in sorted(dataset.qrels[q].items())
          if rel > 0 and d in dataset.corpus]
