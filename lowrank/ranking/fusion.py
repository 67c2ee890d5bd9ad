"""Score fusion of runs: per-query normalisation plus weighted interpolation.

A reranker's scores and the first stage's scores carry complementary
evidence (a cross-encoder reads a truncated passage closely; BM25 counts
exact term matches over the whole document). Interpolating them, as Birch
(Yang et al., 2019) and the monoBERT/duoBERT pipelines do, is a cheap and
standard way to keep both:

    fused(q, d) = sum_i w_i * norm_i(q, d),

where `norm_i(q, .)` is run `i`'s scores of query `q` normalised over that
query's documents ("minmax": to [0, 1]; "zscore": to zero mean and unit
population standard deviation; "none": raw). Normalising per query puts
BM25 scores and logits on comparable scales without a global calibration.

Runs are the dicts of `lowrank.retrieval.metrics`: `run[qid][docid] =
score`. `fuse` is a pure function over them; `tune_weight` picks the
interpolation weight of two runs on a grid by a `metrics.evaluate` metric,
to be called on held-out (dev) queries, never on test.

A document missing from one run's ranking of a query gets that run's lowest
normalised score for the query (0 for "minmax": CombSUM's convention); a
query missing from a run (or empty in it) gets 0 from that run for every
document, which does not change that query's order.

References:
  Yang et al., "Simple Applications of BERT for Ad Hoc Document Retrieval"
    (Birch), 2019, https://arxiv.org/abs/1903.10972
  Nogueira et al., "Multi-Stage Document Ranking with BERT", 2019,
    https://arxiv.org/abs/1910.14424
  Fox & Shaw, "Combination of Multiple Searches" (CombSUM), TREC-2, 1994.
"""

from collections.abc import Mapping, Sequence
import math
from typing import Any, SupportsFloat

import numpy as np

from lowrank.retrieval import metrics as metrics_lib

Run = dict[str, dict[str, float]]
NORMALIZATIONS = ("minmax", "zscore", "none")
# Interpolation weights 0.0, 0.05, ..., 1.0.
DEFAULT_GRID = tuple(round(i / 20, 2) for i in range(21))


def _check_normalization(normalization: str) -> None:
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}; got "
                     f"{normalization!r}.")


def normalize(
    ranking: Mapping[str, SupportsFloat], normalization: str = "minmax"
) -> dict[str, float]:
  """One query's scores normalised over its documents.

  Args:
    ranking: Document id -> score.
    normalization: `"minmax"` (`(s - min) / (max - min)`), `"zscore"`
      (`(s - mean) / std`, population std) or `"none"`. When all scores are
      equal, `"minmax"` and `"zscore"` give 0 for every document.

  Returns:
    Document id -> normalised float score (same keys).

  Raises:
    ValueError: On an unknown normalization or a non-finite score.
  """
  _check_normalization(normalization)
  docs = list(ranking)
  x = np.asarray([float(ranking[d]) for d in docs], np.float64)
  if not np.all(np.isfinite(x)):
    bad = docs[int(np.argmin(np.isfinite(x)))]
    raise ValueError(f"Scores must be finite; document {bad!r} has "
                     f"{ranking[bad]!r}.")
  if x.size and normalization == "minmax":
    span = x.max() - x.min()
    x = (x - x.min()) / span if span > 0 else np.zeros_like(x)
  elif x.size and normalization == "zscore":
    std = x.std()
    x = (x - x.mean()) / std if std > 0 else np.zeros_like(x)
  return {d: float(v) for d, v in zip(docs, x)}


def _check_weights(weights: Any, n: int) -> list[float]:
  if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
    raise ValueError(f"weights must be a sequence of numbers; got "
                     f"{type(weights).__name__}.")
  if len(weights) != n:
    raise ValueError(f"Need one weight per run: {n} runs, {len(weights)} "
                     "weights.")
  out = [float(w) for w in weights]
  if any(not math.isfinite(w) or w < 0 for w in out):
    raise ValueError(f"weights must be finite and >= 0; got {out}.")
  if sum(out) <= 0:
    raise ValueError(f"At least one weight must be positive; got {out}.")
  return out


def fuse(
    runs: Any,
    weights: Any,
    *,
    normalization: str = "minmax",
) -> Run:
  """Weighted sum of per-query normalised scores of several runs.

  `runs` and `weights` are checked here (ValueError), not by annotations.

  Args:
    runs: A sequence of runs `{query id: {doc id: score}}`; higher is
      better in each.
    weights: A sequence of one weight `>= 0` per run (at least one
      positive); e.g.
      `(alpha, 1 - alpha)` to interpolate two runs.
    normalization: Per-query normalisation of each run before the sum, one
      of `NORMALIZATIONS` (see `normalize`).

  Returns:
    `{query id: {doc id: fused score}}` over the union of the runs' queries
    (in order of first appearance) and, per query, the union of their
    documents. See the module docstring for missing documents and queries.

  Raises:
    ValueError: If `runs` is empty or not a sequence of mappings, the
      weights do not match or are negative/non-finite/all zero, the
      normalization is unknown or a score is not finite.
  """
  _check_normalization(normalization)
  if isinstance(runs, Mapping) or not isinstance(runs, Sequence) or not runs:
    raise ValueError("runs must be a non-empty sequence of run dicts "
                     "({query id: {doc id: score}}).")
  for i, run in enumerate(runs):
    if not isinstance(run, Mapping) or not all(
        isinstance(r, Mapping) for r in run.values()):
      raise ValueError(f"runs[{i}] must map query ids to {{doc id: score}} "
                       f"dicts; got {type(run).__name__}.")
  weights = _check_weights(weights, len(runs))
  qids = list(dict.fromkeys(q for run in runs for q in run))
  out: Run = {}
  for qid in qids:
    parts = [normalize(run.get(qid, {}), normalization) for run in runs]
    docs = list(dict.fromkeys(d for part in parts for d in part))
    fused = dict.fromkeys(docs, 0.0)
    for w, part in zip(weights, parts):
      if not part or w == 0:
        continue
      floor = min(part.values())
      for d in docs:
        fused[d] += w * part.get(d, floor)
    out[qid] = fused
  return out


def tune_weight(
    qrels: metrics_lib.Qrels,
    first: Mapping[str, Mapping[str, SupportsFloat]],
    second: Mapping[str, Mapping[str, SupportsFloat]],
    *,
    grid: Any = DEFAULT_GRID,
    normalization: str = "minmax",
    metric: str = "ndcg_cut_10",
) -> tuple[float, dict[float, float]]:
  """The weight `a` of `fuse((first, second), (a, 1 - a))` best on `qrels`.

  Call it with held-out (dev) queries' qrels and runs; the chosen weight is
  then applied to the test runs.

  Args:
    qrels: Relevance judgments of the tuning queries (`metrics.evaluate`
      averages over all of them).
    first: The run weighted by `a` (e.g. the reranker's).
    second: The run weighted by `1 - a` (e.g. the first stage's).
    grid: A sequence of candidate weights in `[0, 1]` (`a = 1` is `first`
      alone, `a = 0` `second` alone, up to normalisation, which keeps each
      run's order).
    normalization: See `fuse`.
    metric: A `lowrank.retrieval.metrics` metric name; higher is better.

  Returns:
    `(best weight, {weight: metric})`; ties go to the earliest grid value.

  Raises:
    ValueError: On an empty grid, a weight outside `[0, 1]` or a
      non-finite one, an unknown metric, empty `qrels`, or any error of
      `fuse`.
  """
  if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence):
    raise ValueError(f"grid must be a sequence of weights in [0, 1]; got "
                     f"{type(grid).__name__}.")
  values = [float(a) for a in grid]
  if not values or any(not 0.0 <= a <= 1.0 for a in values):
    raise ValueError(f"grid must be a non-empty sequence of weights in "
                     f"[0, 1]; got {values}.")
  scores: dict[float, float] = {}
  for a in values:
    fused = fuse((first, second), (a, 1.0 - a), normalization=normalization)
    scores[a] = metrics_lib.evaluate(qrels, fused, (metric,))[metric]
  best = max(scores.values())
  return next(a for a in values if scores[a] == best), scores
