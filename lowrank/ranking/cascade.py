"""Reranking the top-k of a first-stage run with a pairwise scorer.

The second stage of a retrieve-then-rerank cascade; `rerank` is exported
as `lowrank.ranking.rerank`.

`rerank` takes any run dict `run[qid][docid] = score` (BM25, a bi-encoder,
...), keeps each query's top `k` documents in trec_eval's order (score
descending, ties by document id descending) and replaces their scores with
the scorer's. The scorer is any object with a method

    model.score_pairs(tokenizer, queries, docs, **score_kwargs) -> [N] scores

such as `lowrank.ranking.cross_encoder.CrossEncoder`; all pairs of all
queries go to one `score_pairs` call, so length bucketing sees the whole
workload.

Reference: Nogueira & Cho, "Passage Re-ranking with BERT", 2019,
https://arxiv.org/abs/1901.04085
"""

from collections.abc import Mapping, Sequence
import numbers
from typing import Any, NamedTuple

Run = dict[str, dict[str, float]]


def top_k(ranking: Mapping[str, Any], k: int) -> list[str]:
  """Document ids of the `k` best entries, trec_eval's order."""
  scored = sorted(((float(s), d) for d, s in ranking.items()), reverse=True)
  return [d for _, d in scored[:k]]


def select_top_k(
    queries: Mapping[str, str],
    corpus: Mapping[str, str],
    run: Mapping[str, Mapping[str, Any]],
    k: Any,
) -> dict[str, list[str]]:
  """Each run query's top-`k` document ids in trec_eval order, validated.

  The input contract of `rerank` (and of `first.rerank`, `icr.rerank`).

  Args:
    queries: Query id -> text; must cover every query of `run`.
    corpus: Document id -> text; must cover every selected document.
    run: `{query id: {doc id: first-stage score}}`.
    k: Documents kept per query (a positive int).

  Returns:
    `{query id: [doc ids, best first]}` for every query of `run`.

  Raises:
    ValueError: If `k` is not a positive integer or an id is unknown.
  """
  if (isinstance(k, bool) or not isinstance(k, numbers.Integral)
      or k <= 0):
    raise ValueError(f"k must be a positive int; got {k!r}.")
  unknown_q = [q for q in run if q not in queries]
  if unknown_q:
    raise ValueError(
        f"{len(unknown_q)} run queries are not in queries (first: "
        f"{unknown_q[0]!r}).")
  selected = {qid: top_k(run[qid], int(k)) for qid in run}
  unknown_d = sorted({d for ds in selected.values() for d in ds
                      if d not in corpus})
  if unknown_d:
    raise ValueError(
        f"{len(unknown_d)} documents in the top-{k} are not in the corpus "
        f"(first: {unknown_d[0]!r}).")
  return selected


class TopKLists(NamedTuple):
  """The candidate lists of a run's top-`k`, as texts (see `top_k_lists`).

  Attributes:
    run_qids: Every query id of the run, in run order.
    qids: The queries with a non-empty top-`k`.
    queries: Their texts.
    documents: Per query of `qids`, its top-`k` document texts, best first.
    doc_ids: The ids of `documents`.
  """

  run_qids: list[str]
  qids: list[str]
  queries: list[str]
  documents: list[list[str]]
  doc_ids: list[list[str]]

  def to_run(self, scores: Sequence[Any]) -> Run:
    """`{query id: {doc id: float score}}` from per-list scores (queries
    with an empty ranking map to `{}`)."""
    out: Run = {qid: {} for qid in self.run_qids}
    for qid, dids, s in zip(self.qids, self.doc_ids, scores):
      out[qid] = {d: float(v) for d, v in zip(dids, s)}
    return out


def top_k_lists(
    queries: Mapping[str, str],
    corpus: Mapping[str, str],
    run: Mapping[str, Mapping[str, Any]],
    k: Any,
) -> TopKLists:
  """`select_top_k` as candidate lists of texts, for listwise rerankers.

  `first.rerank` and `icr.rerank` score `queries` / `documents` and map
  the scores back with `TopKLists.to_run`. Arguments and errors as
  `select_top_k`.
  """
  selected = select_top_k(queries, corpus, run, k)
  qids = [q for q, ds in selected.items() if ds]
  return TopKLists(
      run_qids=list(run), qids=qids, queries=[queries[q] for q in qids],
      documents=[[corpus[d] for d in selected[q]] for q in qids],
      doc_ids=[selected[q] for q in qids])


def rerank(
    model: Any,
    tokenizer: Any,
    queries: Mapping[str, str],
    corpus: Mapping[str, str],
    run: Mapping[str, Mapping[str, Any]],
    *,
    k: int | float = 100,
    **score_kwargs,
) -> Run:
  """Rescores the top-`k` documents of each query of a first-stage run.

  Args:
    model: A scorer with `score_pairs(tokenizer, queries, docs, **kw)`.
    tokenizer: Passed to `score_pairs`.
    queries: Query id -> text; must cover every query of `run`.
    corpus: Document id -> text; must cover every document that enters a
      top-`k`.
    run: `{query id: {doc id: first-stage score}}`.
    k: How many documents per query to rerank (documents below the top-`k`
      are dropped from the output).
    **score_kwargs: Passed to `score_pairs` (`batch_size`, `max_length`,
      `buckets`, ...).

  Returns:
    `{query id: {doc id: float score}}` with exactly the top-`k` documents
    of each query of `run` (fewer if it has fewer), scored by `model`.
    Queries with an empty ranking map to `{}`.

  Raises:
    ValueError: If `k` is not a positive integer, a query or document id is
      unknown, or `model` has no `score_pairs`.
  """
  if not callable(getattr(model, "score_pairs", None)):
    raise ValueError(
        f"model must have a score_pairs(tokenizer, queries, docs) method; "
        f"got {type(model).__name__}.")
  selected = select_top_k(queries, corpus, run, k)
  qids = [q for q, ds in selected.items() for _ in ds]
  dids = [d for ds in selected.values() for d in ds]
  scores = model.score_pairs(
      tokenizer, [queries[q] for q in qids], [corpus[d] for d in dids],
      **score_kwargs)
  if len(scores) != len(dids):
    raise ValueError(f"score_pairs returned {len(scores)} scores for "
                     f"{len(dids)} pairs.")
  out: Run = {qid: {} for qid in run}
  for qid, did, s in zip(qids, dids, scores):
    out[qid][did] = float(s)
  return out
