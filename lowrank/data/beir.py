"""Loads BEIR-format retrieval datasets with line-level validation.

A BEIR directory holds

- `corpus.jsonl`: one JSON object per line, `{"_id", "text"}` plus an
  optional `"title"` (other keys such as `"metadata"` are ignored);
- `queries.jsonl`: `{"_id", "text"}` per line, for every split;
- `qrels/<split>.tsv`: a header `query-id<TAB>corpus-id<TAB>score`, then one
  integer judgment per line.

Unlike `beir.datasets.data_loader.GenericDataLoader`, which skips the first
qrels line unconditionally and keeps whatever it can parse, `load_beir`
checks every line. A bad line raises an error naming the file and its 1-based
line number, or, with `on_error="count"`, is skipped and reported in
`Dataset.problems` (and in a logged summary); nothing is dropped silently.
"""

from collections.abc import Container, Iterator, Sequence
import dataclasses
import json
import os
import pathlib
from typing import Literal

from absl import logging

QRELS_HEADER = ("query-id", "corpus-id", "score")


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A retrieval dataset held in memory (ids are strings).

  The dataclass is frozen but its dicts are ordinary dicts; loaders may cache
  and share instances, so treat them as read-only.

  Attributes:
    corpus: Document id -> text (`title + " " + text` when a title exists,
      stripped), in file order.
    queries: Query id -> text, only for queries judged in the loaded split,
      in order of first appearance in the qrels.
    qrels: Query id -> {document id -> integer relevance}. Judgments with
      relevance 0 (or below) are kept: trec_eval treats them as judged
      non-relevant.
    name: A short name for logs and result tables.
    problems: One `"<file>:<line>: <what>"` entry per skipped input line
      (only non-empty with `on_error="count"`).
    train_pairs: `(query, document)` training pairs, for datasets that have
      them (e.g. `lowrank.data.code_search`); empty otherwise.
  """

  corpus: dict[str, str]
  queries: dict[str, str]
  qrels: dict[str, dict[str, int]]
  name: str
  problems: list[str] = dataclasses.field(default_factory=list)
  train_pairs: list[tuple[str, str]] = dataclasses.field(default_factory=list)


class _Reporter:
  """Raises on a bad input line, or records it, depending on `on_error`."""

  def __init__(self, on_error: str):
    if on_error not in ("raise", "count"):
      raise ValueError(f"on_error must be 'raise' or 'count'; got {on_error!r}")
    self.on_error = on_error
    self.problems: list[str] = []

  def __call__(self, path: pathlib.Path, lineno: int, message: str) -> None:
    problem = f"{path}:{lineno}: {message}"
    if self.on_error == "raise":
      raise ValueError(problem)
    self.problems.append(problem)


def _lines(path: pathlib.Path) -> Iterator[tuple[int, bytes]]:
  """Yields `(1-based line number, line without its end)`; skips blank lines."""
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file")
  with path.open("rb") as f:
    for lineno, raw in enumerate(f, start=1):
      raw = raw.rstrip(b"\r\n")
      if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM.
        raw = raw[3:]
      if raw.strip():
        yield lineno, raw


def _decode(raw: bytes, path, lineno, report) -> str | None:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    report(path, lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})")
    return None


def join_title(title: str, text: str) -> str:
  """`title + " " + text`, stripped (just `text` stripped without a title)."""
  return f"{title} {text}".strip() if title else text.strip()


def _read_jsonl(
    path: pathlib.Path, report: _Reporter, *, kind: str, keep_empty: bool
) -> dict[str, tuple[str, str]]:
  """Reads `corpus.jsonl` (`kind="document"`) or `queries.jsonl`.

  Returns:
    Id -> `(title, text)` as in the file (`""` for a missing title), in file
    order; only valid lines.
  """
  records: dict[str, tuple[str, str]] = {}
  first_line: dict[str, int] = {}
  for lineno, raw in _lines(path):
    line = _decode(raw, path, lineno, report)
    if line is None:
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      report(path, lineno, f"malformed JSON ({e.msg}, column {e.colno})")
      continue
    if not isinstance(obj, dict):
      report(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
      continue
    doc_id = obj.get("_id")
    # Some exporters write integer ids; ids are strings everywhere else.
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
      doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not doc_id.strip():
      report(path, lineno, f"missing or invalid '_id' (got {doc_id!r})")
      continue
    text, title = obj.get("text"), obj.get("title")
    if not isinstance(text, str):
      report(path, lineno, f"{kind} {doc_id!r}: missing or non-string 'text'")
      continue
    if title is not None and not isinstance(title, str):
      report(path, lineno, f"{kind} {doc_id!r}: non-string 'title'")
      continue
    if doc_id in first_line:
      report(
          path,
          lineno,
          f"duplicate {kind} id {doc_id!r} (first on line "
          f"{first_line[doc_id]})",
      )
      continue
    first_line[doc_id] = lineno
    title = title or ""
    if not join_title(title, text) and not keep_empty:
      report(path, lineno, f"{kind} {doc_id!r} has an empty text")
      continue
    records[doc_id] = (title, text)
  return records


def _read_qrels(
    path: pathlib.Path,
    report: _Reporter,
    queries: Container[str],
    corpus: Container[str],
) -> dict[str, dict[str, int]]:
  """Reads `qrels/<split>.tsv`, checking every id against queries/corpus."""
  qrels: dict[str, dict[str, int]] = {}
  first_line: dict[tuple[str, str], int] = {}
  for lineno, raw in _lines(path):
    line = _decode(raw, path, lineno, report)
    if line is None:
      continue
    fields = [f.strip() for f in line.split("\t")]
    if lineno == 1 and tuple(fields) == QRELS_HEADER:
      continue
    if len(fields) != 3:
      report(
          path,
          lineno,
          "expected 3 tab-separated fields (query-id, corpus-id, score), "
          f"got {len(fields)}: {line!r}",
      )
      continue
    qid, did, score = fields
    try:
      rel = int(score)
    except ValueError:
      what = "header or " if lineno == 1 else ""
      report(path, lineno, f"{what}non-integer score {score!r}")
      continue
    if qid not in queries:
      report(path, lineno, f"unknown query id {qid!r}")
      continue
    if did not in corpus:
      report(path, lineno, f"unknown document id {did!r}")
      continue
    if (qid, did) in first_line:
      report(
          path,
          lineno,
          f"duplicate judgment ({qid!r}, {did!r}) (first on line "
          f"{first_line[qid, did]})",
      )
      continue
    first_line[qid, did] = lineno
    qrels.setdefault(qid, {})[did] = rel
  return qrels


def available_splits(directory: str | os.PathLike[str]) -> list[str]:
  """Returns the sorted split names that have a `qrels/<split>.tsv` file."""
  qrels_dir = pathlib.Path(directory) / "qrels"
  if not qrels_dir.is_dir():
    return []
  return sorted(p.stem for p in qrels_dir.glob("*.tsv") if p.is_file())


@dataclasses.dataclass(frozen=True)
class RawBeir:
  """The validated content of a BEIR directory, before any joining.

  Attributes:
    documents: Document id -> `(title, text)` exactly as in `corpus.jsonl`
      (`""` for a missing title), in file order.
    queries: Query id -> text for every query of `queries.jsonl` (not only
      judged ones), in file order.
    qrels: Split -> query id -> {document id -> integer relevance}, for the
      splits read.
    problems: As `Dataset.problems`.
  """

  documents: dict[str, tuple[str, str]]
  queries: dict[str, str]
  qrels: dict[str, dict[str, dict[str, int]]]
  problems: list[str] = dataclasses.field(default_factory=list)


def read_directory(
    directory: str | os.PathLike[str],
    splits: Sequence[str] | None = None,
    *,
    on_error: Literal["raise", "count"] = "raise",
    keep_empty_documents: bool = False,
) -> RawBeir:
  """Reads and validates a BEIR directory, keeping titles apart from texts.

  The checks are those of `load_beir`, applied to every split read.

  Args:
    directory: Directory holding `corpus.jsonl`, `queries.jsonl`, `qrels/`.
    splits: The qrels splits to read; all of `available_splits` by default.
    on_error: As in `load_beir`.
    keep_empty_documents: As in `load_beir`.

  Returns:
    A `RawBeir`.

  Raises:
    FileNotFoundError: If the directory, a data file or a requested split is
      missing (the message lists the available splits), or if `splits` is
      None and there is no `qrels/*.tsv` at all.
    ValueError: With `on_error="raise"`, for the first problem line (the
      message starts with `"<file>:<line number>: "`); for a bad `on_error`.
  """
  report = _Reporter(on_error)
  root = pathlib.Path(directory)
  if not root.is_dir():
    raise FileNotFoundError(f"{root}: no such dataset directory")
  available = available_splits(root)
  if splits is None:
    if not available:
      raise FileNotFoundError(f"{root / 'qrels'}: no qrels/<split>.tsv files")
    splits = available
  for split in splits:
    if split not in available:
      raise FileNotFoundError(
          f"{root / 'qrels' / f'{split}.tsv'}: no qrels file for split "
          f"{split!r}; available splits: {available}"
      )
  documents = _read_jsonl(
      root / "corpus.jsonl",
      report,
      kind="document",
      keep_empty=keep_empty_documents,
  )
  queries = {
      qid: join_title(title, text)
      for qid, (title, text) in _read_jsonl(
          root / "queries.jsonl", report, kind="query", keep_empty=False
      ).items()
  }
  qrels = {
      split: _read_qrels(
          root / "qrels" / f"{split}.tsv", report, queries, documents
      )
      for split in splits
  }
  if report.problems:
    logging.warning(
        "load_beir(%s, splits=%s): skipped %d problem line(s); "
        "first: %s",
        root,
        list(splits),
        len(report.problems),
        "; ".join(report.problems[:5]),
    )
  return RawBeir(documents, queries, qrels, report.problems)


def load_beir(
    directory: str | os.PathLike[str],
    split: str = "test",
    *,
    on_error: Literal["raise", "count"] = "raise",
    keep_empty_documents: bool = False,
) -> Dataset:
  """Loads one split of a BEIR-format dataset directory.

  Every line of `corpus.jsonl` and `queries.jsonl` is validated (not only the
  lines the split uses), then every line of `qrels/<split>.tsv`. A problem
  line is one that

  - is not valid UTF-8 or not a JSON object (`*.jsonl`);
  - lacks a string `_id` (integer ids are accepted and converted) or a string
    `text`, or has a non-string `title`;
  - repeats an id seen on an earlier line (the first one is kept);
  - has an empty text (a document is empty when title and text both are;
    see `keep_empty_documents`);
  - does not have exactly 3 tab-separated fields, or has a non-integer score
    (`qrels`; a first line equal to the BEIR header is skipped);
  - names a query or document that is not loaded, or repeats a
    (query, document) judgment.

  The collections in `../shared/data/beir` (SciFact, ADI, CISI) load with no
  problem line; Cranfield has two empty documents, one of them judged, so it
  needs `keep_empty_documents=True` (or `on_error="count"`, which drops
  them and their judgment and says so).

  Args:
    directory: Directory holding `corpus.jsonl`, `queries.jsonl`, `qrels/`.
    split: Name of the qrels file to load, `qrels/<split>.tsv`.
    on_error: `"raise"` raises `ValueError` at the first problem line;
      `"count"` skips problem lines, lists them in `Dataset.problems` and logs
      a summary. Missing files raise in both modes.
    keep_empty_documents: Keep documents whose title and text are both empty
      (as `""`) instead of treating them as problems. Cranfield has two such
      documents (471 and 995), and 995 is judged relevant to query 125.

  Returns:
    A `Dataset` whose `queries` are the queries judged in `split` and whose
    `corpus` is the whole corpus; `name` is the directory's base name.

  Raises:
    FileNotFoundError: If the directory, `corpus.jsonl`, `queries.jsonl` or
      `qrels/<split>.tsv` is missing; the message lists the available splits.
    ValueError: With `on_error="raise"`, for the first problem line; the
      message starts with `"<file>:<line number>: "`. Also if `on_error` is
      neither `"raise"` nor `"count"`.
  """
  root = pathlib.Path(directory)
  raw = read_directory(
      root,
      [split],
      on_error=on_error,
      keep_empty_documents=keep_empty_documents,
  )
  corpus = {did: join_title(*tt) for did, tt in raw.documents.items()}
  qrels = raw.qrels[split]
  queries = {qid: raw.queries[qid] for qid in qrels}
  logging.info(
      "load_beir(%s, split=%r): %d documents, %d judged queries, %d judgments",
      root,
      split,
      len(corpus),
      len(queries),
      sum(len(v) for v in qrels.values()),
  )
  return Dataset(
      corpus=corpus,
      queries=queries,
      qrels=qrels,
      name=root.name,
      problems=raw.problems,
  )


def load(
    directory: str | os.PathLike[str],
    split: str = "test",
    **kwargs,
) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
  """`load_beir` as plain dicts: `(corpus, queries, qrels)`.

  Args:
    directory: A BEIR-format directory.
    split: The qrels split.
    **kwargs: `on_error`, `keep_empty_documents` (see `load_beir`).

  Returns:
    `corpus[doc_id] = text`, `queries[query_id] = text` (judged queries),
    `qrels[query_id][doc_id] = relevance` (pytrec_eval's layout).
  """
  dataset = load_beir(directory, split, **kwargs)
  return dataset.corpus, dataset.queries, dataset.qrels
