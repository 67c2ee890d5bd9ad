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
- Scores are compared as float32, because trec_eval stores them in a C
  `float`: two float64 scores that round to the same float32 are a tie
  (broken by document id), and finite scores beyond float32's range are
  +-inf. +-inf scores are valid and rank first / last.
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
  return 0 for it and count it in the average. A query whose qrels are an
  empty dict (no judged document at all) is left out of the results and of
  the average, as pytrec_eval does (trec_eval's qrels file cannot even
  express it).
- A query with an empty ranking (`run[qid] == {}`) scores 0, as in
  pytrec_eval.

Evaluation is vectorised: only the judged documents of a query are ranked
(`1 + #(scores above)`, one numpy comparison per query, no sort of the run),
and the metrics of all queries are computed at once from (query, rank,
label) triples. A query in which a judged document shares its score with
another document is sorted exactly instead (the per-query reference
`_query_metrics`), so ties follow trec_eval's order too. 10k queries x 1000
results take well under a second (see BENCHMARKS.md).

Where we differ from pytrec_eval, on purpose:

- `evaluate` averages over ALL queries in `qrels`; a query missing from the
  run scores 0 (and `evaluate_per_query` returns it, with zeros).
  pytrec_eval silently drops such queries from its per-query output, and
  BEIR's `EvaluateRetrieval.evaluate` then averages over the remaining
  ones, which inflates scores. ir_measures averages like we do. To get
  pytrec_eval's per-query dict, keep the queries that are in the run:
  `{q: v for q, v in per_query.items() if q in run}`. Queries in the run
  but not in `qrels` are ignored (as trec_eval).
- `ignore_identical_ids=True` removes run entries whose document id equals
  the query id before scoring (BEIR's option, needed for ArguAna and Quora).

Input checks (bad input raises instead of giving a silent 0):

- NaN scores raise ValueError by default (`nan_policy="raise"`). trec_eval
  has no rank for them: its comparator (`sim > sim`, `sim < sim`, then
  docno) treats NaN as tied with every score, which is not an order, so
  the position of a NaN document (and of its neighbours) depends on the
  run's insertion order and on the C library's sort. With pytrec_eval
  0.5.11, a NaN document among 1000 moved between ranks 16 and 988 when the
  same run was inserted in 30 different orders. `nan_policy="omit"` drops
  NaN entries (as if not retrieved) and `nan_policy="last"` ranks them
  below every other document (as a score of -inf); both equal pytrec_eval
  on the run so edited.
- Query ids and document ids may be `str` (what pytrec_eval requires) or
  another type (e.g. `int`), but the run must use the same type as the
  qrels, and neither may mix types: `1` never matches `"1"`, so a mismatch
  would score every query 0. TypeError otherwise; convert with `str()`.
  Non-`str` document ids break ties in the order of their `str()` (so the
  result equals that of the `str()`-converted dicts). Document id types
  are checked on every judged document and on the first and last document
  of each ranking (checking every run entry would double the evaluation
  time).
- An empty run (`{}`), or one that shares no query id with `qrels`,
  raises ValueError (every query would score 0).
- Relevance labels must be integers: `int`, numpy integers, `bool`, or a
  float with an integral value (`1.0`, accepted although pytrec_eval
  refuses floats). Other floats (`1.5`, NaN) raise ValueError; strings and
  other types raise TypeError.
- Scores must be numbers (int, float, numpy scalars); None or a string
  that is not a number raises TypeError (a numeric string is read as its
  value, as numpy reads it).
- A NaN score is checked in every query of `qrels` that the run ranks;
  queries of the run that are not in `qrels` are not read at all.

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
`metrics` may be one name (`"ndcg@10"`) or a sequence of names.
"""

from collections.abc import Hashable, Iterable, Mapping, Sequence
import itertools
import math
import numbers
import re
from typing import Any, Literal

import jax
import numpy as np

# {query id: {doc id: label}} and {query id: {doc id: score}}. Ids are `str`
# (pytrec_eval's type) or any one other hashable type, used consistently;
# labels are integers and scores numbers. `evaluate` checks all of this
# itself, with clear errors (see the module docstring), hence the loose
# annotations.
Qrels = Mapping[Hashable, Any]
Run = Mapping[Hashable, Any]

DEFAULT_METRICS = ("ndcg_cut_10", "recall_10", "recip_rank", "map")
NAN_POLICIES = ("raise", "omit", "last")

_CUT_METRICS = ("ndcg_cut", "recall", "P", "map_cut", "mrr_cut", "success")
_PLAIN_METRICS = ("ndcg", "map", "recip_rank")
_CUT_RE = re.compile(r"^(" + "|".join(_CUT_METRICS) + r")_([1-9][0-9]*)$")


_ALIASES = {"ndcg": "ndcg_cut", "mrr": "mrr_cut", "recall": "recall",
            "p": "P", "map": "map_cut", "success": "success"}
_ALIAS_RE = re.compile(r"^(ndcg|mrr|recall|p|map|success)@([1-9][0-9]*)$",
                       re.IGNORECASE)
_KNOWN_METRICS = (
    ", ".join(_PLAIN_METRICS)
    + ", "
    + ", ".join(m + "_<k>" for m in _CUT_METRICS)
    + ", and the aliases "
    + ", ".join(a + "@<k>" for a in _ALIASES)
)


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
    hint = ""
    spelled = name.replace(".", "_")  # pytrec_eval's "ndcg_cut.10".
    if spelled != name and (
        spelled in _PLAIN_METRICS or _CUT_RE.match(spelled)
    ):
      hint = f" (trec_eval's {name!r} is spelled {spelled!r} here)"
    raise ValueError(
        f"Unknown metric {name!r}{hint}; known metrics (k a positive "
        f"integer): {_KNOWN_METRICS}"
    )
  return match.group(1), int(match.group(2))


def _metric_names(metrics: Any) -> list[str]:
  """`metrics` as a list of names; one plain string is one metric."""
  if isinstance(metrics, str):
    return [metrics]
  if not isinstance(metrics, Iterable):
    raise TypeError(
        "metrics must be a metric name or a sequence of names, e.g. "
        f"('ndcg@10', 'recall@100'); got {type(metrics).__name__}"
    )
  names = list(metrics)
  for name in names:
    if not isinstance(name, str):
      raise TypeError(
          f"metric names must be strings; got {name!r} "
          f"({type(name).__name__}) in {names!r}"
      )
  return names


def _id_kind(x: Any) -> str:
  """The id type that decides dict matching: "str", "int" or the type name.

  `np.str_` ids match `str` keys and numpy integers match `int` keys (equal
  values, equal hashes), so they count as the same kind.
  """
  if isinstance(x, str):
    return "str"
  if isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)):
    return "int"
  return type(x).__name__


def _kinds(ids: Iterable[Any]) -> dict[str, Any]:
  """{kind: first id of that kind}, in order of first appearance."""
  ids = list(ids)
  if set(map(type, ids)) == {str}:  # The common case, at C speed.
    return {"str": ids[0]}
  out = {}
  for x in ids:
    out.setdefault(_id_kind(x), x)
  return out


def _check_one_kind(kinds: dict[str, Any], what: str) -> str | None:
  if len(kinds) > 1:
    examples = ", ".join(f"{x!r} ({k})" for k, x in kinds.items())
    raise TypeError(
        f"{what} mix types: {examples}. A dict key of one type never "
        "matches a key of another (1 != '1'), so use one type throughout, "
        "e.g. convert every id with str()."
    )
  return next(iter(kinds), None)


def _check_inputs(qrels: Qrels, run: Run, qids: Sequence[Hashable]) -> None:
  """Structure, id types and emptiness of `qrels` and `run` (see module)."""
  if not isinstance(run, Mapping):
    raise TypeError(
        "run must be a {query id: {doc id: score}} mapping; got "
        f"{type(run).__name__}"
    )
  if not run:
    raise ValueError(
        "run holds no queries, so every query in qrels would score 0. Pass "
        "the rankings to evaluate (a query with an empty ranking, "
        "run[qid] = {}, is accepted and scores 0)."
    )
  all_dicts = set(map(type, run.values())) == {dict}
  if not all_dicts:
    for qid, ranking in run.items():
      if not isinstance(ranking, Mapping):
        raise TypeError(
            f"run[{qid!r}] must be a {{doc id: score}} mapping; got "
            f"{type(ranking).__name__}"
        )
  q_kind = _check_one_kind(_kinds(qrels), "qrels query ids")
  run_q_kind = _check_one_kind(_kinds(run), "run query ids")
  if run_q_kind != q_kind:
    raise TypeError(
        f"run query ids are {run_q_kind} (e.g. {next(iter(run))!r}) but "
        f"qrels query ids are {q_kind} (e.g. {next(iter(qrels))!r}): no run "
        "query would match a qrels query and every query would score 0. "
        "Use the same id type in both, e.g. convert both with str()."
    )
  d_kind = _check_one_kind(
      _kinds(itertools.chain.from_iterable(qrels[qid] for qid in qids)),
      "qrels document ids",
  )
  # The first and last document of every ranking (a full scan of the run
  # would cost as much as the evaluation).
  rankings = [ranking for ranking in run.values() if ranking]
  firsts = map(next, map(iter, rankings))
  lasts = map(next, map(reversed, rankings)) if all_dicts else ()
  run_d_kinds = _kinds(itertools.chain(firsts, lasts))
  run_d_kind = _check_one_kind(run_d_kinds, "run document ids")
  if run_d_kind is not None and d_kind is not None and run_d_kind != d_kind:
    raise TypeError(
        f"run document ids are {run_d_kind} (e.g. "
        f"{run_d_kinds[run_d_kind]!r}) but qrels document ids are {d_kind}: "
        "no retrieved document would match a judged one and every query "
        "would score 0. Use the same id type in both, e.g. convert both "
        "with str()."
    )
  if qids and not any(qid in run for qid in qids):
    raise ValueError(
        f"run and qrels share no query id (run has e.g. "
        f"{next(iter(run))!r}, qrels e.g. {qids[0]!r}), so every query "
        "would score 0. Check that both use the same query id spelling."
    )


def _as_label(qid: Hashable, doc: Hashable, value: Any) -> int:
  """One relevance label as an int; see the module docstring."""
  if isinstance(value, (int, np.integer, np.bool_)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    if math.isfinite(value) and float(value).is_integer():
      return int(value)
    raise ValueError(
        f"qrels[{qid!r}][{doc!r}] = {value!r} is not a whole number; "
        "relevance labels are integers (trec_eval reads them as integers). "
        "Map the grades to integers first, e.g. int(round(x))."
    )
  raise TypeError(
      f"qrels[{qid!r}][{doc!r}] = {value!r} is a {type(value).__name__}; "
      "relevance labels must be integers. Convert them with int() (e.g. "
      "labels read from a text file)."
  )


def _labels(qid: Hashable, judged: Mapping[Hashable, Any]) -> list[int]:
  """A query's labels as ints, in `judged` order (validated)."""
  labels = list(judged.values())
  if set(map(type, labels)) <= {int}:  # Plain ints (not bool): as they are.
    return labels
  return [_as_label(qid, d, v) for d, v in judged.items()]


def _bad_score(
    qid: Hashable, ranking: Mapping[Hashable, Any], docs: Iterable[Hashable]
) -> None:
  """Raises TypeError for the first of `docs` whose score is not a number."""
  for d in docs:
    value = ranking[d]
    if isinstance(value, (numbers.Real, np.number)) and not isinstance(
        value, np.complexfloating
    ):
      continue
    try:  # Numeric strings are read as their value (as numpy does).
      float(value)
      if isinstance(value, str) and not math.isnan(float(value)):
        continue
    except (TypeError, ValueError):
      pass
    raise TypeError(
        f"run[{qid!r}][{d!r}] = {value!r} is a {type(value).__name__}, not a "
        "number; scores must be ints or floats."
    )


def _scores(qid: Hashable, ranking: Mapping[Hashable, Any]) -> np.ndarray:
  """A ranking's scores as float32 (trec_eval's `float sim`), in order.

  Call it under `np.errstate(over="ignore")`: scores beyond float32's range
  become +-inf, as in trec_eval.
  """
  try:
    return np.fromiter(ranking.values(), np.float32, len(ranking))
  except (TypeError, ValueError):
    _bad_score(qid, ranking, ranking)
    raise


def _without_nan(
    qid: Hashable,
    ranking: Mapping[Hashable, Any],
    scores: np.ndarray,
    nan_policy: str,
    skip_self: bool,
) -> tuple[Mapping[Hashable, Any], np.ndarray]:
  """`ranking` and its scores with NaN scores handled per `nan_policy`."""
  docs = list(ranking)
  bad = [docs[j] for j in np.flatnonzero(np.isnan(scores))]
  _bad_score(qid, ranking, bad)  # None, "nan": not numbers at all.
  if skip_self:  # The query's own entry is dropped before ranking anyway.
    bad = [d for d in bad if d != qid]
  if not bad:
    return ranking, scores
  if nan_policy == "raise":
    raise ValueError(
        f"run[{qid!r}][{bad[0]!r}] is NaN ({len(bad)} NaN score(s) in this "
        "query). trec_eval and pytrec_eval have no rank for a NaN score "
        "(their sort puts it at a position that depends on the run's "
        "insertion order), so it is rejected. Fix the scores, drop or "
        "replace those entries (e.g. with -inf to rank them last), or pass "
        "nan_policy='omit' (drop them) or nan_policy='last' (rank them "
        "below every other document)."
    )
  bad = set(bad)
  if nan_policy == "omit":
    ranking = {d: s for d, s in ranking.items() if d not in bad}
  else:  # "last"
    ranking = {d: -math.inf if d in bad else s for d, s in ranking.items()}
  return ranking, _scores(qid, ranking)


def _tie_key(doc: Hashable) -> str:
  """trec_eval compares document ids as strings; `str()` of other types."""
  return doc if isinstance(doc, str) else str(doc)


def _sorted_run(ranking: Mapping[Hashable, Any]) -> list[Hashable]:
  """Document ids by (float32 score desc, docid desc): trec_eval's order."""
  docs = list(ranking)
  with np.errstate(over="ignore"):
    scores = np.fromiter(ranking.values(), np.float32, len(docs)).tolist()
  keys = [(s, _tie_key(d)) for s, d in zip(scores, docs)]
  order = sorted(range(len(docs)), key=keys.__getitem__, reverse=True)
  return [docs[i] for i in order]


def _gain(labels: np.ndarray, gains: str) -> np.ndarray:
  labels = np.maximum(labels, 0.0)
  return labels if gains == "linear" else np.exp2(labels) - 1.0


def _dcg(gain: np.ndarray) -> float:
  return float(np.sum(gain / np.log2(np.arange(2, gain.size + 2))))


def _query_metrics(
    judged: Mapping[Hashable, int],
    ranking: Mapping[Hashable, Any],
    parsed: Sequence[tuple[str, str, int | None]],
    *,
    gains: str,
    relevance_level: int,
) -> dict[str, float]:
  """All requested metrics for one query (the reference; no NaN scores)."""
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
    qids: Sequence[Hashable],
    parsed: Sequence[tuple[str, str, int | None]],
    *,
    ignore_identical_ids: bool,
    gains: str,
    relevance_level: int,
    nan_policy: str,
) -> list[list[float]]:
  """Vectorised `_query_metrics` for the queries `qids` of `qrels`.

  Only the judged documents matter: a judged document's rank in trec_eval's
  order is `1 + #(scores > its score)` when no other document has exactly
  its score, which one numpy comparison per query gives without sorting the
  run. Queries where a judged retrieved document shares its score with
  another document go through `_query_metrics` (the reference) instead.
  The metrics are then computed for all queries at once from the (query,
  rank, label) triples, summing in rank order as trec_eval does. NaN scores
  are handled first, per `nan_policy`; labels and scores are validated on
  the way. Call it under `np.errstate(over="ignore", invalid="ignore")`
  (see `_scores`).

  Returns:
    One row of values (in `parsed` order) per query, in `qids` order.
  """
  num_queries = len(qids)
  num_rel = np.zeros(num_queries)
  judged_q, judged_labels = [], []  # Every judged document.
  hit_q, hit_rank, hit_label = [], [], []  # Judged documents in the run.
  fallback = {}
  for i, qid in enumerate(qids):
    judged = qrels[qid]
    labels = _labels(qid, judged)
    judged_q.extend([i] * len(labels))
    judged_labels.extend(labels)
    num_rel[i] = sum(label >= relevance_level for label in labels)
    ranking = run.get(qid) or {}
    if not ranking:
      continue
    scores = _scores(qid, ranking)
    skip_self = ignore_identical_ids and qid in ranking
    # One reduction; a NaN sum without a NaN score (inf - inf) is harmless.
    if math.isnan(np.add.reduce(scores)):
      ranking, scores = _without_nan(
          qid, ranking, scores, nan_policy, skip_self
      )
      skip_self = ignore_identical_ids and qid in ranking
    hits = [
        (d, label)
        for d, label in zip(judged, labels)
        if d in ranking and not (skip_self and d == qid)
    ]
    if not hits:
      continue
    hit_scores = np.array([ranking[d] for d, _ in hits], np.float32)
    greater = (scores[None, :] > hit_scores[:, None]).sum(axis=1)
    equal = (scores[None, :] == hit_scores[:, None]).sum(axis=1)
    if skip_self:
      self_score = np.float32(ranking[qid])
      greater -= self_score > hit_scores
      equal -= self_score == hit_scores
    if (equal != 1).any():  # A tie: sort this query exactly.
      if skip_self:
        ranking = {d: s for d, s in ranking.items() if d != qid}
      values = _query_metrics(
          dict(zip(judged, labels)),
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


def _check_options(gains: str, nan_policy: str) -> None:
  if gains not in ("linear", "exp2"):
    raise ValueError(f"gains must be 'linear' or 'exp2'; got {gains!r}")
  if nan_policy not in NAN_POLICIES:
    raise ValueError(
        f"nan_policy must be one of {NAN_POLICIES}; got {nan_policy!r}"
    )


def _judged_qids(qrels: Qrels) -> list[Hashable]:
  """The queries of `qrels` with at least one judged document."""
  if not isinstance(qrels, Mapping):
    raise TypeError(
        "qrels must be a {query id: {doc id: label}} mapping; got "
        f"{type(qrels).__name__}"
    )
  qids = []
  for qid, judged in qrels.items():
    if not isinstance(judged, Mapping):
      raise TypeError(
          f"qrels[{qid!r}] must be a {{doc id: label}} mapping; got "
          f"{type(judged).__name__}"
      )
    if judged:
      qids.append(qid)
  return qids


def evaluate_per_query(
    qrels: Qrels,
    run: Run,
    metrics: Any = DEFAULT_METRICS,
    *,
    ignore_identical_ids: bool = False,
    gains: Literal["linear", "exp2"] = "linear",
    relevance_level: int = 1,
    nan_policy: str = "raise",
) -> dict[Hashable, dict[str, float]]:
  """Per-query trec_eval metrics for every judged query in `qrels`.

  See the module docstring for the exact semantics, the input checks and
  the metric names. Unlike pytrec_eval, which leaves out the queries that
  are missing from the run, every query of `qrels` with at least one judged
  document is returned (a missing one with zeros); a query whose qrels are
  an empty dict is left out, as in pytrec_eval.

  Args:
    qrels: Query id -> {document id -> integer relevance label}.
    run: Query id -> {document id -> score}; higher is better.
    metrics: A trec_eval metric name (`"ndcg@10"`) or a sequence of names,
      e.g. `("ndcg_cut_10", "recall_100")` (checked here: TypeError for
      anything else).
    ignore_identical_ids: Drop run entries whose document id equals the query
      id (BEIR's `ignore_identical_ids`).
    gains: nDCG gain, `"linear"` (label, trec_eval) or `"exp2"`
      (`2**label - 1`).
    relevance_level: Minimum label counted as relevant (trec_eval `-l`).
    nan_policy: What a NaN score of an evaluated query does: `"raise"`
      (ValueError), `"omit"` (the entry is dropped, as if not retrieved) or
      `"last"` (ranked below every other document, like -inf).

  Returns:
    `{query id: {metric name: value}}` for every judged query in `qrels`
    (in `qrels` order); queries missing from `run`, or with an empty
    ranking, get 0 on every metric.

  Raises:
    ValueError: For an unknown metric name, `gains` or `nan_policy`; an
      empty run or one sharing no query id with `qrels`; a NaN score (with
      `nan_policy="raise"`); a fractional or NaN relevance label.
    TypeError: For ids whose type differs between `qrels` and `run` (or
      mixed types within either), non-integer labels, non-numeric scores,
      or inputs that are not mappings.
  """
  _check_options(gains, nan_policy)
  names = _metric_names(metrics)
  parsed = [(name, *_parse_metric(name)) for name in names]
  qids = _judged_qids(qrels)
  if not qids:  # Nothing to evaluate (`evaluate` raises instead).
    return {}
  _check_inputs(qrels, run, qids)
  # float32 scores are +-inf beyond float32's range; inf - inf in the NaN
  # test (a sum) is harmless.
  with np.errstate(over="ignore", invalid="ignore"):
    rows = _fast_per_query(
        qrels,
        run,
        qids,
        parsed,
        ignore_identical_ids=ignore_identical_ids,
        gains=gains,
        relevance_level=relevance_level,
        nan_policy=nan_policy,
    )
  return {qid: dict(zip(names, row)) for qid, row in zip(qids, rows)}


def evaluate(
    qrels: Qrels,
    run: Run,
    metrics: Any = DEFAULT_METRICS,
    *,
    ignore_identical_ids: bool = False,
    gains: Literal["linear", "exp2"] = "linear",
    relevance_level: int = 1,
    nan_policy: str = "raise",
) -> dict[str, float]:
  """trec_eval metrics averaged over ALL judged queries in `qrels`.

  A query missing from `run` counts as 0. This differs from
  `pytrec_eval` (and from BEIR, which averages what pytrec_eval returns),
  which drop such queries; see the module docstring. A query whose qrels
  are an empty dict is not counted (as in pytrec_eval). The arguments are
  `evaluate_per_query`'s.

  Returns:
    `{metric name: mean over the judged qrels queries}`.

  Raises:
    ValueError: If `qrels` holds no judged query, and as
      `evaluate_per_query`.
    TypeError: As `evaluate_per_query`.
  """
  _check_options(gains, nan_policy)
  names = _metric_names(metrics)
  per_query = evaluate_per_query(
      qrels,
      run,
      names,
      ignore_identical_ids=ignore_identical_ids,
      gains=gains,
      relevance_level=relevance_level,
      nan_policy=nan_policy,
  )
  if not per_query:
    raise ValueError(
        "qrels holds no queries with judged documents (it is empty, or "
        "every query maps to an empty dict); there is nothing to average."
    )
  return {
      name: float(np.mean([values[name] for values in per_query.values()]))
      for name in names
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
