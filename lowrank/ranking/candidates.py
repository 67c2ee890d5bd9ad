"""First-stage candidates for reranking: BM25 or zero-shot MiniLM runs.

`FirstStage(name, depth)` retrieves the top `depth` documents of queries
from a corpus with BM25 (`lowrank.retrieval.bm25`) or the bundled
all-MiniLM-L6-v2 bi-encoder used zero-shot (`lowrank.assets.minilm_path`;
exact inner-product search over normalised mean-pooled embeddings). The
index of a corpus is built once per `FirstStage`; with a `path`, a run is
cached as JSON and read back while it holds the same queries, so a resumed
experiment does not retrieve again.
"""

from collections.abc import Mapping
import json
import numbers
import os
from typing import Any

from lowrank import assets
from lowrank import metric_writers
from lowrank.models import bert
from lowrank.retrieval import bm25 as bm25_lib
from lowrank.retrieval import search

NAMES = ("bm25", "minilm")
Run = dict[str, dict[str, float]]


class FirstStage:
  """Cached first-stage runs of one retriever (indexes built per corpus).

  Attributes:
    name: "bm25" or "minilm".
    depth: Documents retrieved per query (clipped to the corpus size).
  """

  def __init__(self, name: str = "bm25", depth: int = 100):
    if name not in NAMES:
      raise ValueError(f"Unknown first stage {name!r}; expected one of "
                       f"{NAMES}.")
    if (isinstance(depth, bool) or not isinstance(depth, numbers.Integral)
        or depth < 1):
      raise ValueError(f"depth must be a positive int (documents per "
                       f"query); got {depth!r}.")
    self.name, self.depth = name, int(depth)
    self._indexes: dict[Any, Any] = {}

  def index(self, corpus: Mapping[str, str], kind: str | None = None) -> Any:
    """The `kind` (default: this stage's) index of `corpus`, built once.

    A `bm25.BM25` for "bm25"; `(model, tokenizer, doc ids, embeddings)` for
    "minilm".
    """
    kind = kind or self.name
    if kind not in NAMES:
      raise ValueError(f"Unknown index kind {kind!r}; expected one of "
                       f"{NAMES}.")
    key = (kind, len(corpus), hash(frozenset(corpus.items())))
    if key not in self._indexes:
      if kind == "bm25":
        self._indexes[key] = bm25_lib.BM25(corpus)
      else:
        path = assets.minilm_path()
        model, tok = bert.load_pretrained(path), bert.load_tokenizer(path)
        ids = sorted(corpus)
        self._indexes[key] = (model, tok, ids, bert.embed_texts(
            model, tok, [corpus[i] for i in ids]))
    return self._indexes[key]

  def run(self, queries: Mapping[str, str], corpus: Mapping[str, str], *,
          path: str | None = None) -> Run:
    """The top-`depth` run of `queries` over `corpus`.

    Args:
      queries: Query id -> text, the queries to retrieve for.
      corpus: Document id -> text.
      path: A JSON cache: read when it exists and holds exactly the ids of
        `queries`, else written (atomically) after retrieval.

    Returns:
      `{query id: {doc id: score}}`, `min(depth, len(corpus))` documents per
      query.
    """
    if path and os.path.exists(path):
      with open(path) as f:
        cached = json.load(f)
      if sorted(cached) == sorted(queries):
        return cached
    k = min(self.depth, len(corpus))
    if self.name == "bm25":
      run = self.index(corpus).search_run(dict(queries), k)
    else:
      model, tok, ids, docs = self.index(corpus)
      qids = list(queries)
      q = bert.embed_texts(model, tok, [queries[i] for i in qids])
      run = search.search_run(qids, q, ids, docs, k)
    if path:
      metric_writers.write_json(path, run)
    return run
