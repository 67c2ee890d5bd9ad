"""Training-pair streams with mined hard negatives, and length bucketing.

Dense retrievers train on `(query, positive, negatives)` tuples; negatives
that a first-stage retriever ranks high ("hard" negatives) help much more
than random ones (DPR, Karpukhin et al. 2020, https://arxiv.org/abs/2004.04906;
ANCE, Xiong et al. 2020, https://arxiv.org/abs/2007.00808, mines them with
the model being trained). This module

- mines ranked candidate negatives with BM25 (`mine_bm25`,
  `lowrank.retrieval.bm25`) or with a dense model (`mine_dense`, given
  embeddings or an `encode` function), always excluding every judged
  positive of the query (relevance >= `min_relevance`) and, by default, a
  document whose id equals the query id;
- picks `num_negatives` per query from those candidates (`select_negatives`:
  the top ones, or a seeded sample from the top `sample_from`), topping up
  short lists with seeded random non-positive documents (counted and logged);
- streams text batches `(queries, positives, negatives[k])` (`batches`), one
  example per judged (query, positive) pair, shuffled by `(seed, epoch)`,
  with no query and no positive document twice in a batch (a repeat would be
  a false in-batch negative);
- groups tokenised inputs by length into a few padded shapes
  (`bucket_batches`, or `bucket_texts` to tokenise first), so a jitted
  encoder compiles once per bucket.

Everything is deterministic given `seed` (and `epoch`): per-query random
choices are seeded by `(seed, epoch, sha1(query id))`, so they do not depend
on dict order or on which other queries are present.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
import dataclasses
import hashlib
from typing import Any

from absl import logging
import numpy as np

from lowrank.retrieval import bm25 as bm25_lib

Qrels = Mapping[str, Mapping[str, int]]


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
  words = [int(seed)]
  for key in keys:
    if isinstance(key, str):
      digest = hashlib.sha1(key.encode("utf-8")).digest()
      words.append(int.from_bytes(digest[:8], "big"))
    else:
      words.append(int(key))
  return np.random.default_rng(np.random.SeedSequence(words))


def positives_from_qrels(
    qrels: Qrels, *, min_relevance: int = 1
) -> dict[str, set[str]]:
  """Query id -> ids of documents judged with relevance >= `min_relevance`."""
  return {
      qid: {did for did, rel in judged.items() if rel >= min_relevance}
      for qid, judged in qrels.items()
  }


def _check_queries(queries: Mapping[str, Any], qrels: Qrels) -> None:
  missing = [qid for qid in queries if qid not in qrels]
  if missing:
    raise ValueError(
        f"{len(missing)} queries have no qrels entry (first: {missing[0]!r}); "
        "mining without judgments could return a positive as a negative."
    )


def mine_bm25(
    queries: Mapping[str, str],
    corpus: Mapping[str, str],
    qrels: Qrels,
    *,
    depth: int = 100,
    min_relevance: int = 1,
    exclude_identical_ids: bool = True,
    index: bm25_lib.BM25 | None = None,
) -> dict[str, list[str]]:
  """BM25-ranked candidate negatives (judged positives removed).

  Args:
    queries: Query id -> text; every query needs a `qrels` entry.
    corpus: Document id -> text (indexed unless `index` is given).
    qrels: Query id -> {document id -> relevance}.
    depth: Candidates to keep per query (fewer when fewer documents share a
      term with the query).
    min_relevance: Judgments at or above this are positives.
    exclude_identical_ids: Also drop a document whose id is the query id.
    index: A prebuilt `bm25.BM25` over `corpus`.

  Returns:
    Query id -> up to `depth` document ids, best first (BM25 ties: lower
    corpus position first).

  Raises:
    ValueError: If `depth < 1` or a query has no qrels entry.
  """
  if depth < 1:
    raise ValueError(f"depth must be >= 1; got {depth}")
  _check_queries(queries, qrels)
  positives = positives_from_qrels(qrels, min_relevance=min_relevance)
  index = bm25_lib.BM25(corpus) if index is None else index
  extra = max((len(positives[q]) for q in queries), default=0) + 1
  return bm25_lib.mine_hard_negatives(
      index,
      queries,
      {q: positives[q] for q in queries},
      k=min(depth + extra, max(index.num_docs, depth)),
      n=depth,
      exclude_identical_ids=exclude_identical_ids,
  )


def _top_indices(scores: np.ndarray, k: int) -> np.ndarray:
  """Indices of the `k` best scores, best first; ties: lower index first."""
  n = scores.shape[0]
  if k < n:
    threshold = np.partition(scores, n - k)[n - k]
    candidates = np.flatnonzero(scores >= threshold)
  else:
    candidates = np.arange(n)
  order = np.lexsort((candidates, -scores[candidates]))
  return candidates[order][:k]


def mine_dense(
    queries: Mapping[str, str],
    corpus: Mapping[str, str],
    qrels: Qrels,
    *,
    encode: Callable[[list[str]], Any] | None = None,
    query_embeddings: Any = None,
    doc_embeddings: Any = None,
    depth: int = 100,
    min_relevance: int = 1,
    exclude_identical_ids: bool = True,
    block_size: int = 256,
) -> dict[str, list[str]]:
  """Model-ranked candidate negatives by inner product (positives removed).

  Give either `encode` (texts -> `[n, d]` array; called on the corpus values
  and the query values, in order), e.g.
  `lambda texts: bert.embed_texts(model, tokenizer, texts)`, or both
  embedding arrays, whose rows follow `queries` and `corpus` order. Normalise
  them first for cosine (`bert.embed_texts` does by default).

  Args:
    queries: Query id -> text; every query needs a `qrels` entry.
    corpus: Document id -> text.
    qrels: Query id -> {document id -> relevance}.
    encode: Texts -> embeddings.
    query_embeddings: `[len(queries), d]`.
    doc_embeddings: `[len(corpus), d]`.
    depth: Candidates to keep per query.
    min_relevance: Judgments at or above this are positives.
    exclude_identical_ids: Also drop a document whose id is the query id.
    block_size: Queries scored per matmul.

  Returns:
    Query id -> `min(depth, available)` document ids, best first (equal
    scores: lower corpus position first).

  Raises:
    ValueError: For missing/extra inputs, mismatched shapes, `depth < 1`, or
      a query without a qrels entry.
  """
  if depth < 1 or block_size < 1:
    raise ValueError(f"Need depth, block_size >= 1; got {depth}, {block_size}")
  _check_queries(queries, qrels)
  if (encode is None) == (query_embeddings is None and doc_embeddings is None):
    raise ValueError("Pass either encode or query_embeddings + doc_embeddings.")
  if encode is not None:
    doc_embeddings = encode(list(corpus.values()))
    query_embeddings = encode(list(queries.values()))
  if query_embeddings is None or doc_embeddings is None:
    raise ValueError("Pass both query_embeddings and doc_embeddings.")
  q = np.asarray(query_embeddings, np.float32)
  d = np.asarray(doc_embeddings, np.float32)
  if q.ndim != 2 or d.ndim != 2 or q.shape[1] != d.shape[1]:
    raise ValueError(
        f"Expected [queries, dim] and [docs, dim] embeddings; got {q.shape} "
        f"and {d.shape}"
    )
  if q.shape[0] != len(queries) or d.shape[0] != len(corpus):
    raise ValueError(
        f"Embedding rows ({q.shape[0]} queries, {d.shape[0]} docs) do not "
        f"match the inputs ({len(queries)} queries, {len(corpus)} docs)"
    )
  positives = positives_from_qrels(qrels, min_relevance=min_relevance)
  doc_ids = list(corpus)
  query_ids = list(queries)
  out = {}
  for start in range(0, len(query_ids), block_size):
    scores = q[start : start + block_size] @ d.T
    for row, qid in zip(scores, query_ids[start : start + block_size]):
      skip = set(positives[qid])
      if exclude_identical_ids:
        skip.add(qid)
      k = min(len(doc_ids), depth + len(skip))
      ranked = (doc_ids[i] for i in _top_indices(row, k))
      out[qid] = [did for did in ranked if did not in skip][:depth]
  return out


def select_negatives(
    candidates: Mapping[str, Sequence[str]],
    qrels: Qrels,
    corpus_ids: Sequence[str],
    num_negatives: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    sample_from: int | None = None,
    min_relevance: int = 1,
    exclude_identical_ids: bool = True,
) -> tuple[dict[str, list[str]], int]:
  """Picks exactly `num_negatives` distinct negatives per query.

  Args:
    candidates: Query id -> ranked candidates (`mine_bm25`/`mine_dense`).
    qrels: Query id -> judgments; candidates that are positives here are
      dropped again (so stale candidate lists are safe).
    corpus_ids: All document ids, for topping up short candidate lists.
    num_negatives: Negatives per query.
    seed: Seed for sampling and topping up.
    epoch: Mixed into the seed so each epoch can draw other negatives.
    sample_from: None takes the best `num_negatives` candidates; an integer
      samples them uniformly (without replacement) from the best
      `sample_from` candidates.
    min_relevance: Judgments at or above this are positives.
    exclude_identical_ids: Never pick a document whose id is the query id.

  Returns:
    `(negatives, topped_up)`: query id -> `num_negatives` ids (candidates in
    rank order, then random documents), and the number of random documents
    that were needed.

  Raises:
    ValueError: If `num_negatives < 1`, `sample_from < num_negatives`, a
      query has no qrels entry, or the corpus has too few non-positive
      documents.
  """
  if num_negatives < 1:
    raise ValueError(f"num_negatives must be >= 1; got {num_negatives}")
  if sample_from is not None and sample_from < num_negatives:
    raise ValueError(
        f"sample_from ({sample_from}) must be >= num_negatives "
        f"({num_negatives})"
    )
  _check_queries(candidates, qrels)
  positives = positives_from_qrels(qrels, min_relevance=min_relevance)
  out = {}
  topped_up = 0
  for qid, ranked in candidates.items():
    skip = set(positives[qid])
    if exclude_identical_ids:
      skip.add(qid)
    pool = list(dict.fromkeys(d for d in ranked if d not in skip))
    rng = _rng(seed, epoch, qid)
    if sample_from is not None and len(pool) > num_negatives:
      pool = pool[:sample_from]
      keep = np.sort(rng.choice(len(pool), num_negatives, replace=False))
      chosen = [pool[i] for i in keep]
    else:
      chosen = pool[:num_negatives]
    if len(chosen) < num_negatives:
      taken = skip | set(chosen)
      rest = [d for d in corpus_ids if d not in taken]
      need = num_negatives - len(chosen)
      if len(rest) < need:
        raise ValueError(
            f"Query {qid!r}: needs {num_negatives} negatives but only "
            f"{len(chosen) + len(rest)} non-positive documents exist"
        )
      chosen += [rest[i] for i in np.sort(rng.choice(len(rest), need, False))]
      topped_up += need
    out[qid] = chosen
  if topped_up:
    logging.info(
        "select_negatives: topped up %d negatives with random documents",
        topped_up,
    )
  return out, topped_up


@dataclasses.dataclass(frozen=True)
class TextBatch:
  """One training batch of texts (and their ids).

  Attributes:
    queries: `[b]` query texts.
    positives: `[b]` positive document texts.
    negatives: `[b][k]` hard negative texts.
    query_ids: `[b]` ids.
    positive_ids: `[b]` ids.
    negative_ids: `[b][k]` ids.
  """

  queries: list[str]
  positives: list[str]
  negatives: list[list[str]]
  query_ids: list[str]
  positive_ids: list[str]
  negative_ids: list[list[str]]


def training_pairs(
    qrels: Qrels, *, queries: Mapping[str, str] | None = None,
    min_relevance: int = 1
) -> list[tuple[str, str]]:
  """`(query id, positive id)` for every positive judgment, qrels order."""
  return [
      (qid, did)
      for qid, judged in qrels.items()
      if queries is None or qid in queries
      for did, rel in judged.items()
      if rel >= min_relevance
  ]


def batches(
    queries: Mapping[str, str],
    corpus: Mapping[str, str],
    qrels: Qrels,
    candidates: Mapping[str, Sequence[str]],
    *,
    batch_size: int,
    num_negatives: int,
    seed: int = 0,
    epoch: int = 0,
    sample_from: int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
    min_relevance: int = 1,
) -> Iterator[TextBatch]:
  """One epoch of `(queries, positives, negatives[k])` text batches.

  Examples are the judged `(query, positive)` pairs of `queries`. They are
  shuffled by `(seed, epoch)`, then packed greedily in that order into
  batches with no repeated query or positive document (an example that
  would repeat one waits for a later batch). Negatives come from
  `select_negatives(candidates, ..., seed=seed, epoch=epoch)`.

  Args:
    queries: Query id -> text (queries to train on).
    corpus: Document id -> text.
    qrels: Query id -> {document id -> relevance}.
    candidates: Query id -> ranked candidate negatives, for every query.
    batch_size: Examples per batch.
    num_negatives: Hard negatives per example.
    seed: Seed for the order and the negatives.
    epoch: Epoch number (changes the order and sampled negatives).
    sample_from: See `select_negatives`.
    shuffle: Shuffle the examples (else qrels order).
    drop_remainder: Drop a final batch smaller than `batch_size`.
    min_relevance: Judgments at or above this are positives.

  Yields:
    `TextBatch`es.

  Raises:
    ValueError: If `batch_size < 1`, or a query lacks candidates or qrels,
      or a positive is missing from the corpus.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1; got {batch_size}")
  missing = [qid for qid in queries if qid not in candidates]
  if missing:
    raise ValueError(
        f"{len(missing)} queries have no candidates (first: {missing[0]!r})"
    )
  _check_queries(queries, qrels)
  negatives, _ = select_negatives(
      {qid: candidates[qid] for qid in queries},
      qrels,
      list(corpus),
      num_negatives,
      seed=seed,
      epoch=epoch,
      sample_from=sample_from,
      min_relevance=min_relevance,
  )
  examples = training_pairs(qrels, queries=queries, min_relevance=min_relevance)
  unknown = [did for _, did in examples if did not in corpus]
  if unknown:
    raise ValueError(f"Positive document {unknown[0]!r} is not in the corpus")
  if shuffle:
    order = _rng(seed, epoch, "order").permutation(len(examples))
    examples = [examples[i] for i in order]
  pending = examples
  dropped = 0
  while pending:
    batch, later, seen_q, seen_d = [], [], set(), set()
    for example in pending:
      qid, did = example
      if len(batch) < batch_size and qid not in seen_q and did not in seen_d:
        batch.append(example)
        seen_q.add(qid)
        seen_d.add(did)
      else:
        later.append(example)
    pending = later
    if len(batch) < batch_size and drop_remainder:
      dropped += len(batch)
      continue
    yield TextBatch(
        queries=[queries[q] for q, _ in batch],
        positives=[corpus[d] for _, d in batch],
        negatives=[[corpus[n] for n in negatives[q]] for q, _ in batch],
        query_ids=[q for q, _ in batch],
        positive_ids=[d for _, d in batch],
        negative_ids=[list(negatives[q]) for q, _ in batch],
    )
  if dropped:
    logging.info("batches: dropped %d examples in short batches", dropped)


# ----------------------------------------------------------------------------
# Length bucketing.

DEFAULT_BOUNDARIES = (32, 64, 128, 256, 512)


def bucket_batches(
    encoded: Sequence[Any],
    *,
    batch_size: int,
    boundaries: Sequence[int] = DEFAULT_BOUNDARIES,
    pad_id: int = 0,
    seed: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = False,
    pad_batch: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
  """Batches of tokenised inputs padded to one of a few lengths.

  Each input goes to the smallest boundary >= its length; batches are made
  within a bucket (inputs shuffled within their bucket, then the batch order
  shuffled, both by `seed`), so there are at most `len(boundaries)` padded
  lengths (times 2 batch sizes without `pad_batch`).

  Args:
    encoded: Per input, a token id list, or `(ids, type_ids)` as returned
      by `bert.Tokenizer.tokenize_unpadded`.
    batch_size: Rows per batch.
    boundaries: Increasing padded lengths.
    pad_id: Padding token id.
    seed: Shuffling seed.
    shuffle: Shuffle (else inputs keep their order within buckets, and
      buckets come shortest first).
    drop_remainder: Drop each bucket's last short batch.
    pad_batch: Pad a short batch to `batch_size` rows (mask 0, index -1) so
      shapes stay fixed.

  Yields:
    `{"input_ids", "attention_mask", "token_type_ids", "index"}`: int32
    `[b, L]` arrays and the `[b]` positions of the rows in `encoded` (-1 for
    padding rows).

  Raises:
    ValueError: For bad `batch_size`/`boundaries`, or an input longer than
      the largest boundary (the message gives its position; truncate first)
      or empty.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1; got {batch_size}")
  bounds = [int(b) for b in boundaries]
  if not bounds or any(b < 1 for b in bounds) or bounds != sorted(set(bounds)):
    raise ValueError(
        f"boundaries must be increasing positive lengths; got {boundaries}"
    )
  items = []
  for i, item in enumerate(encoded):
    if (
        isinstance(item, tuple)
        and len(item) == 2
        and not isinstance(item[0], (int, np.integer))
    ):
      ids, types = list(item[0]), list(item[1])
    else:
      ids, types = list(item), [0] * len(item)
    if not ids:
      raise ValueError(f"encoded[{i}] is empty")
    if len(types) != len(ids):
      raise ValueError(
          f"encoded[{i}]: {len(ids)} ids but {len(types)} type ids"
      )
    if len(ids) > bounds[-1]:
      raise ValueError(
          f"encoded[{i}] has {len(ids)} tokens, more than the largest "
          f"boundary {bounds[-1]}; truncate it first"
      )
    items.append((ids, types))
  buckets: dict[int, list[int]] = {b: [] for b in bounds}
  for i, (ids, _) in enumerate(items):
    buckets[next(b for b in bounds if b >= len(ids))].append(i)
  rng = _rng(seed, "buckets")
  plan = []
  for length, members in buckets.items():
    if shuffle:
      members = [members[j] for j in rng.permutation(len(members))]
    for start in range(0, len(members), batch_size):
      chunk = members[start : start + batch_size]
      if len(chunk) < batch_size and drop_remainder:
        continue
      plan.append((length, chunk))
  if shuffle:
    plan = [plan[j] for j in rng.permutation(len(plan))]
  for length, chunk in plan:
    rows = batch_size if pad_batch else len(chunk)
    ids = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    types = np.zeros((rows, length), np.int32)
    index = np.full((rows,), -1, np.int32)
    for r, i in enumerate(chunk):
      tok, typ = items[i]
      ids[r, : len(tok)] = tok
      mask[r, : len(tok)] = 1
      types[r, : len(tok)] = typ
      index[r] = i
    yield {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": types,
        "index": index,
    }


def bucket_texts(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int,
    boundaries: Sequence[int] = DEFAULT_BOUNDARIES,
    **kwargs,
) -> Iterator[dict[str, np.ndarray]]:
  """Tokenises `texts` (truncated at the largest boundary) and buckets them.

  Args:
    tokenizer: A `lowrank.models.bert.Tokenizer` (anything with
      `tokenize_unpadded(texts, max_length=)` and `pad_token_id`).
    texts: The texts.
    batch_size: Rows per batch.
    boundaries: Increasing padded lengths.
    **kwargs: `seed`, `shuffle`, `drop_remainder`, `pad_batch` (see
      `bucket_batches`).

  Returns:
    The `bucket_batches` iterator; `index` refers to positions in `texts`.
  """
  encoded = tokenizer.tokenize_unpadded(list(texts),
                                       max_length=max(boundaries))
  return bucket_batches(
      encoded,
      batch_size=batch_size,
      boundaries=boundaries,
      pad_id=tokenizer.pad_token_id,
      **kwargs,
  )
