"""trec_eval-exact ranking metrics, computed on the host with numpy.

Inputs are the dicts used by BEIR and pytrec_eval:

- `qrels`: query id -> {document id -> integer relevance label};
- `run`: query id -> {document id -> score}.

Semantics follow trec_eval 9 (as wrapped by `pytrec_eval`), and the tests
check agreement with `pytrec_eval.RelevanceEvaluator` to 1e-9:

- Each query's run is sorted by score descending, ties broken by document id
  DESCENDING (string order), as trec_eval does. So with `{"a": 1, "b": 1}`
  and `a` relevant, `b` ranks first and the reciprocal rank is 0.5 (ranx,
  which keeps insertion order, reports 1.0).
- A document is relevant when it is judged with a label
  `>= relevance_level`; unjudged documents are non-relevant. There is no
  depth limit on the run.
- nDCG uses the label itself as the gain (`gains="linear"`, trec_eval's
  default) or `2**label - 1` (`gains="exp2"`, the Burges et al. variant used
  by some LTR toolkits); labels `<= 0` give gain 0, and gains ignore
  `relevance_level` (as trec_eval). The discount is `log2(rank + 1)` and the
  ideal ranking sorts every judged document of the query by gain.
- A query whose qrels hold no relevant document (all labels below
  `relevance_level`) scores 0 on every metric; trec_eval and pytrec_eval also
  return 0 for it and count it in the average.

Evaluation is vectorised: only the judged documents of a query are ranked
(`1 + #(scores above)`, one numpy comparison per query, no sort of the run),
and the metrics of all queries are computed at once from (query, rank,
label) triples. A query in which a judged document shares its score with
another document is sorted exactly instead (the per-query reference
`_query_metrics`), so ties follow trec_eval's order too. 10k queries x 1000
results take well under a second (see BENCHMARKS.md).

Where we differ from pytrec_eval, on purpose:

- `evaluate` averages over ALL queries in `qrels`; a query missing from the
  run (or with an empty ranking) scores 0. pytrec_eval silently drops such
  queries, and BEIR's `EvaluateRetrieval.evaluate` then averages over the
  remaining ones, which inflates scores. ir_measures averages like we do.
  Queries in the run but not in `qrels` are ignored (as trec_eval).
- `ignore_identical_ids=True` removes run entries whose document id equals
  the query id before scoring (BEIR's option, needed for ArguAna and Quora).

Metric names (trec_eval's output names, `k` a positive integer):

| name | meaning |
| --- | --- |
| `ndcg_cut_<k>` | nDCG of the top `k` |
| `ndcg` | nDCG of the whole ranking |
| `recall_<k>` | relevant documents in the top `k` / relevant documents |
| `P_<k>` | relevant documents in the top `k` / `k` |
| `map` | average precision (trec_eval's AP: divided by all relevant) |
| `map_cut_<k>` | average precision truncated at `k` |
| `recip_rank` | 1 / rank of the first relevant document (no cut) |
| `mrr_cut_<k>` | `recip_rank`, but 0 beyond rank `k` (MS MARCO's MRR@10) |
| `success_<k>` | 1 if a relevant document is in the top `k` |

`ndcg@k`, `mrr@k`, `recall@k`, `p@k`, `map@k` and `success@k` are accepted
as aliases of the cut measures; results are keyed by the name requested.
"""

from collections.abc import Mapping, Sequence
import math
import re
from typing import Literal, SupportsFloat, SupportsInt

import jax
import numpy as np

Qrels = Mapping[str, Mapping[str, SupportsInt]]
Run = Mapping[str, Mapping[str, SupportsFloat]]

DEFAULT_METRICS = ("ndcg_cut_10", "recall_10", "recip_rank", "map")

_CUT_METRICS = ("ndcg_cut", "recall", "P", "map_cut", "mrr_cut", "success")
_PLAIN_METRICS = ("ndcg", "map", "recip_rank")
_CUT_RE = re.compile(r"^(" + "|".join(_CUT_METRICS) + r")_([1-9][0-9]*)$")


_ALIASES = {"ndcg": "ndcg_cut", "mrr": "mrr_cut", "recall": "recall",
            "p": "P", "map": "map_cut", "success": "success"}
_ALIAS_RE = re.compile(r"^(ndcg|mrr|recall|p|map|success)@([1-9][0-9]*)$",
                       re.IGNORECASE)


def _parse_metric(name: str) -> tuple[str, int | None]:
  """`"ndcg_cut_10"` -> `("ndcg_cut", 10)`; `"map"` -> `("map", None)`.

  Also accepts the `<measure>@<k>` spellings (`ndcg@10`, `mrr@10`,
  `recall@100`, `p@5`, `map@100`, `success@1`), case-insensitively.
  """
  alias = _ALIAS_RE.match(name)
  if alias is not None:
    return _ALIASES[alias.group(1).lower()], int(alias.group(2))
  if name in _PLAIN_METRICS:
    return name, None
  match = _CUT_RE.match(name)
  if match is None:
    raise ValueError(
        f"Unknown metric {name!r}; supported: "
        f"{', '.join(_PLAIN_METRICS)}, "
        f"{', '.join(m + '_<k>' for m in _CUT_METRICS)}"
    )
  return match.group(1), int(match.group(2))


def _sorted_run(ranking: Mapping[str, SupportsFloat]) -> list[str]:
  """Document ids by (score desc, docid desc): trec_eval's order."""
  scored = [(float(s), d) for d, s in ranking.items()]
  scored.sort(reverse=True)
  return [d for _, d in scored]


def _gain(labels: np.ndarray, gains: str) -> np.ndarray:
  labels = np.maximum(labels, 0.0)
  return labels if gains == "linear" else np.exp2(labels) - 1.0


def _dcg(gain: np.ndarray) -> float:
  return float(np.sum(gain / np.log2(np.arange(2, gain.size + 2))))


def _query_metrics(
    judged: Mapping[str, SupportsInt],
    ranking: Mapping[str, SupportsFloat],
    parsed: Sequence[tuple[str, str, int | None]],
    *,
    gains: str,
    relevance_level: int,
) -> dict[str, float]:
  """All requested metrics for one query."""
  ranked = _sorted_run(ranking)
  judged_labels = np.array([int(v) for v in judged.values()], np.float64)
  num_rel = int(np.sum(judged_labels >= relevance_level))
  # Unjudged documents are never relevant, even with relevance_level <= 0
  # (trec_eval gives them a label below every judged one).
  labels = np.array([int(judged.get(d, 0)) for d in ranked], np.float64)
  is_rel = np.array([d in judged for d in ranked], bool) & (
      labels >= relevance_level
  )
  rel_ranks = np.flatnonzero(is_rel) + 1  # 1-based ranks of relevant docs.
  ideal = np.sort(_gain(judged_labels, gains))[::-1]
  ideal = ideal[ideal > 0]

  out = {}
  for name, kind, k in parsed:
    if num_rel == 0 and kind != "ndcg" and kind != "ndcg_cut":
      out[name] = 0.0
      continue
    if kind in ("ndcg", "ndcg_cut"):
      cut = len(ranked) if k is None else k
      ideal_cut = ideal.size if k is None else k
      idcg = _dcg(ideal[:ideal_cut])
      value = _dcg(_gain(labels[:cut], gains)) / idcg if idcg > 0 else 0.0
    elif kind == "recall":
      value = np.sum(rel_ranks <= k) / num_rel
    elif kind == "P":
      value = np.sum(rel_ranks <= k) / k
    elif kind in ("map", "map_cut"):
      ranks = rel_ranks if k is None else rel_ranks[rel_ranks <= k]
      precisions = np.arange(1, ranks.size + 1) / ranks
      value = np.sum(precisions) / num_rel
    elif kind in ("recip_rank", "mrr_cut"):
      first = rel_ranks[0] if rel_ranks.size else math.inf
      value = 1.0 / first if k is None or first <= k else 0.0
    elif kind == "success":
      value = float(rel_ranks.size > 0 and rel_ranks[0] <= k)
    else:  # Unreachable: names are validated by _parse_metric.
      raise AssertionError(kind)
    out[name] = float(value)
  return out


def _fast_per_query(
    qrels: Qrels,
    run: Run,
    parsed: Sequence[tuple[str, str, int | None]],
    *,
    ignore_identical_ids: bool,
    gains: str,
    relevance_level: int,
) -> list[list[float]]:
  """Vectorised `_query_metrics` for every query in `qrels`.

  Only the judged documents matter: a judged document's rank in trec_eval's
  order is `1 + #(scores > its score)` when no other document has exactly
  its score, which one numpy comparison per query gives without sorting the
  run. Queries where a judged retrieved document shares its score with
  another document (or has a NaN score) go through `_query_metrics` (the
  reference) instead. The metrics are then computed for all queries at once
  from the (query, rank, label) triples, summing in rank order as trec_eval
  does.

  Returns:
    One row of values (in `parsed` order) per query, in `qrels` order.
  """
  qids = list(qrels)
  num_queries = len(qids)
  num_rel = np.zeros(num_queries)
  judged_q, judged_labels = [], []  # Every judged document.
  hit_q, hit_rank, hit_label = [], [], []  # Judged documents in the run.
  fallback = {}
  for i, qid in enumerate(qids):
    judged = qrels[qid]
    labels = [int(v) for v in judged.values()]
    judged_q.extend([i] * len(labels))
    judged_labels.extend(labels)
    num_rel[i] = sum(label >= relevance_level for label in labels)
    ranking = run.get(qid) or {}
    skip_self = ignore_identical_ids and qid in ranking
    hits = [
        (d, label)
        for d, label in zip(judged, labels)
        if d in ranking and not (skip_self and d == qid)
    ]
    if not hits:
      continue
    scores = np.fromiter(ranking.values(), np.float64, len(ranking))
    hit_scores = np.array([float(ranking[d]) for d, _ in hits])
    greater = (scores[None, :] > hit_scores[:, None]).sum(axis=1)
    equal = (scores[None, :] == hit_scores[:, None]).sum(axis=1)
    if skip_self:
      self_score = float(ranking[qid])
      greater -= self_score > hit_scores
      equal -= self_score == hit_scores
    if (equal != 1).any():  # A tie (or NaN): sort this query exactly.
      if skip_self:
        ranking = {d: s for d, s in ranking.items() if d != qid}
      values = _query_metrics(
          judged,
          ranking,
          parsed,
          gains=gains,
          relevance_level=relevance_level,
      )
      fallback[i] = [values[name] for name, _, _ in parsed]
      continue
    hit_q.extend([i] * len(hits))
    hit_rank.append(greater + 1)
    hit_label.extend(label for _, label in hits)

  # Ideal gains: every judged document, by query then gain descending.
  judged_q = np.array(judged_q, np.int64)
  ideal_gain = _gain(np.array(judged_labels, np.float64), gains)
  order = np.lexsort((-ideal_gain, judged_q))
  judged_q, ideal_gain = judged_q[order], ideal_gain[order]
  ideal_rank = _rank_in_group(judged_q) + 1
  ideal_term = ideal_gain / np.log2(ideal_rank + 1.0)

  # Retrieved judged documents, by query then rank.
  hit_q = np.array(hit_q, np.int64)
  hit_rank = (
      np.concatenate(hit_rank) if hit_rank else np.zeros(0, np.int64)
  )
  hit_label = np.array(hit_label, np.float64)
  order = np.lexsort((hit_rank, hit_q))
  hit_q, hit_rank, hit_label = hit_q[order], hit_rank[order], hit_label[order]
  dcg_term = _gain(hit_label, gains) / np.log2(hit_rank + 1.0)
  is_rel = hit_label >= relevance_level
  rel_q, rel_rank = hit_q[is_rel], hit_rank[is_rel]
  # i-th relevant retrieved document of its query (1-based), for AP.
  precision = (_rank_in_group(rel_q) + 1) / rel_rank
  first_rel = np.full(num_queries, np.inf)
  np.minimum.at(first_rel, rel_q, rel_rank)

  def per_query_sum(q, weights, where=None):
    if where is not None:
      q, weights = q[where], weights[where]
    return np.bincount(q, weights=weights, minlength=num_queries)

  safe_rel = np.maximum(num_rel, 1.0)
  columns = []
  for _, kind, k in parsed:
    if kind in ("ndcg", "ndcg_cut"):
      dcg = per_query_sum(
          hit_q, dcg_term, None if k is None else hit_rank <= k
      )
      idcg = per_query_sum(
          judged_q, ideal_term, None if k is None else ideal_rank <= k
      )
      value = np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), 0.0)
      columns.append(value)
      continue
    if kind in ("recall", "P"):
      count = per_query_sum(rel_q, np.ones(rel_q.size), rel_rank <= k)
      value = count / safe_rel if kind == "recall" else count / k
    elif kind in ("map", "map_cut"):
      value = (
          per_query_sum(rel_q, precision, None if k is None else rel_rank <= k)
          / safe_rel
      )
    elif kind in ("recip_rank", "mrr_cut"):
      value = 1.0 / first_rel
      if k is not None:
        value = np.where(first_rel <= k, value, 0.0)
    elif kind == "success":
      value = (first_rel <= k).astype(np.float64)
    else:  # Unreachable: names are validated by _parse_metric.
      raise AssertionError(kind)
    columns.append(np.where(num_rel > 0, value, 0.0))
  rows = np.stack(columns, axis=1).tolist() if columns else [[]] * num_queries
  for i, values in fallback.items():
    rows[i] = values
  return rows


def _rank_in_group(groups: np.ndarray) -> np.ndarray:
  """0-based position of each element within its run of equal `groups`."""
  if groups.size == 0:
    return np.zeros(0, np.int64)
  starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
  lengths = np.diff(np.r_[starts, groups.size])
  return np.arange(groups.size) - np.repeat(starts, lengths)


def evaluate_per_query(
    qrels: Qrels,
    run: Run,
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    ignore_identical_ids: bool = False,
    gains: Literal["linear", "exp2"] = "linear",
    relevance_level: int = 1,
) -> dict[str, dict[str, float]]:
  """Per-query trec_eval metrics for every query in `qrels`.

  See the module docstring for the exact semantics and metric names.

  Args:
    qrels: Query id -> {document id -> integer relevance label}.
    run: Query id -> {document id -> score}; higher is better.
    metrics: trec_eval metric names, e.g. `("ndcg_cut_10", "recall_100")`.
    ignore_identical_ids: Drop run entries whose document id equals the query
      id (BEIR's `ignore_identical_ids`).
    gains: nDCG gain, `"linear"` (label, trec_eval) or `"exp2"`
      (`2**label - 1`).
    relevance_level: Minimum label counted as relevant (trec_eval `-l`).

  Returns:
    `{query id: {metric name: value}}` for every query in `qrels` (in
    `qrels` order); queries missing from `run` get 0 on every metric.

  Raises:
    ValueError: For an unknown metric name or `gains` value.
  """
  if gains not in ("linear", "exp2"):
    raise ValueError(f"gains must be 'linear' or 'exp2'; got {gains!r}")
  parsed = [(name, *_parse_metric(name)) for name in metrics]
  rows = _fast_per_query(
      qrels,
      run,
      parsed,
      ignore_identical_ids=ignore_identical_ids,
      gains=gains,
      relevance_level=relevance_level,
  )
  names = [name for name, _, _ in parsed]
  return {qid: dict(zip(names, row)) for qid, row in zip(qrels, rows)}


def evaluate(
    qrels: Qrels,
    run: Run,
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    ignore_identical_ids: bool = False,
    gains: Literal["linear", "exp2"] = "linear",
    relevance_level: int = 1,
) -> dict[str, float]:
  """trec_eval metrics averaged over ALL queries in `qrels`.

  A query missing from `run` counts as 0. This differs from
  `pytrec_eval` (and from BEIR, which averages what pytrec_eval returns),
  which drop such queries; see the module docstring.

  Args:
    qrels: Query id -> {document id -> integer relevance label}.
    run: Query id -> {document id -> score}; higher is better.
    metrics: trec_eval metric names, e.g. `("ndcg_cut_10", "recall_100")`.
    ignore_identical_ids: Drop run entries whose document id equals the query
      id (BEIR's `ignore_identical_ids`).
    gains: nDCG gain, `"linear"` (label, trec_eval) or `"exp2"`
      (`2**label - 1`).
    relevance_level: Minimum label counted as relevant (trec_eval `-l`).

  Returns:
    `{metric name: mean over qrels queries}`.

  Raises:
    ValueError: If `qrels` is empty, or for an unknown metric or `gains`.
  """
  if not qrels:
    raise ValueError("qrels holds no queries")
  per_query = evaluate_per_query(
      qrels,
      run,
      metrics,
      ignore_identical_ids=ignore_identical_ids,
      gains=gains,
      relevance_level=relevance_level,
  )
  return {
      name: float(np.mean([values[name] for values in per_query.values()]))
      for name in metrics
  }


def run_from_scores(
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    scores: jax.typing.ArrayLike | None = None,
    indices: jax.typing.ArrayLike | None = None,
) -> dict[str, dict[str, float]]:
  """Builds a run dict from a score matrix and/or top-k document indices.

  - `scores` only: `[Q, N]` scores of every document, columns aligned with
    `doc_ids` (every document enters the run).
  - `scores` and `indices`: `[Q, k]` top-k scores and the `doc_ids` indices
    they belong to (the output of `lowrank.retrieval.search.exact_search`).
  - `indices` only: `[Q, k]` ranked indices, best first; scores `k, k-1, ...`
    are made up so that trec_eval's sort keeps this order exactly.

  Entries with a negative index or a score of `-inf` (padding) are left out.
  Scores become Python floats (float32 values are represented exactly).

  Args:
    query_ids: `Q` query ids, one per row.
    doc_ids: `N` document ids.
    scores: `[Q, N]` or `[Q, k]` scores, or None.
    indices: `[Q, k]` integer indices into `doc_ids`, or None.

  Returns:
    `{query id: {document id: score}}`.

  Raises:
    ValueError: If neither array is given, shapes disagree, or an index row
      names the same document twice.
  """
  if scores is None and indices is None:
    raise ValueError("Pass scores, indices, or both")
  num_queries = len(query_ids)
  if indices is None:
    scores = np.asarray(scores, np.float64)
    if scores.shape != (num_queries, len(doc_ids)):
      raise ValueError(
          "scores without indices must be [Q, N] = "
          f"{(num_queries, len(doc_ids))}; got {scores.shape}"
      )
    indices = np.broadcast_to(np.arange(len(doc_ids)), scores.shape)
  else:
    indices = np.asarray(indices)
    if indices.ndim != 2 or indices.shape[0] != num_queries:
      raise ValueError(
          f"indices must be [Q={num_queries}, k]; got {indices.shape}"
      )
    if scores is None:
      k = indices.shape[1]
      scores = np.broadcast_to(
          np.arange(k, 0, -1, dtype=np.float64), indices.shape
      )
    scores = np.asarray(scores, np.float64)
    if scores.shape != indices.shape:
      raise ValueError(
          f"scores {scores.shape} and indices {indices.shape} differ"
      )
  run = {}
  for qid, row_idx, row_scores in zip(
      query_ids, indices.tolist(), scores.tolist()
  ):
    ranking = {}
    for i, s in zip(row_idx, row_scores):
      if i < 0 or s == -math.inf:
        continue
      doc = doc_ids[i]
      if doc in ranking:
        raise ValueError(f"Query {qid!r}: document {doc!r} appears twice")
      ranking[doc] = s
    run[qid] = ranking
  return run
