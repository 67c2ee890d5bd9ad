"""Sparse vectors in CSR form and an inverted index searched from postings.

Learned sparse (SPLADE) and lexical (BM25) retrieval both score a query `q`
against a document `d` by the dot product of two sparse vectors over a
vocabulary of `V` terms, `s(q, d) = sum_t q_t d_t`. With `V = 30522` and a
few hundred non-zeros per document, a dense `[Q, V] x [V, N]` matmul wastes
almost all of its work; an inverted index reads only the posting lists of the
query's terms (Zobel and Moffat 2006, "Inverted files for text search
engines", https://doi.org/10.1145/1132956.1132959).

Everything here is numpy on the host (no scipy):

- `SparseMatrix` is a row-major CSR matrix (`indptr`, `indices`, `values`);
  `from_rows` / `from_dense` build one, `to_dense` undoes it (tests).
- `InvertedIndex` is the same matrix transposed (term-major, one posting
  list of `(doc, value)` per term): `build(docs)` makes it.
- `search(index, query_indices, query_values, k)` gathers the postings of
  the query's terms and sums them per document with one `np.bincount`
  (float64 accumulation), then selects the top `k`.

Scores and ties: only documents that share at least one term with the query
are candidates (a document outside every query posting list would score 0;
it is never returned, as in Lucene). Among equal scores the document with the
LOWER index ranks first and wins a place in the top `k`, the same convention
as `lowrank.retrieval.search.exact_search` (trec_eval re-sorts ties by
document id descending; `lowrank.retrieval.metrics` does the same, so only
ties straddling the `k`-th place can change a metric).
"""

from collections.abc import Sequence
import dataclasses

import jax
import numpy as np

from lowrank.retrieval import metrics


@dataclasses.dataclass(frozen=True)
class SparseMatrix:
  """A CSR matrix of float32 values with int32 column indices.

  Row `i` holds `indices[indptr[i]:indptr[i + 1]]` (strictly increasing)
  and the matching `values`.

  Attributes:
    indptr: int64 `[num_rows + 1]` row offsets, `indptr[0] == 0`.
    indices: int32 `[nnz]` column (term) ids.
    values: float32 `[nnz]` values.
    num_cols: Number of columns (the vocabulary size).
  """

  indptr: np.ndarray
  indices: np.ndarray
  values: np.ndarray
  num_cols: int

  def __post_init__(self):
    indptr = np.asarray(self.indptr)
    if indptr.ndim != 1 or indptr.size < 1 or indptr[0] != 0:
      raise ValueError(
          f"indptr must be 1-D and start at 0; got shape {indptr.shape}"
          f"{'' if indptr.size < 1 else f', first value {indptr[0]}'}."
      )
    if np.any(np.diff(indptr) < 0):
      raise ValueError("indptr must be non-decreasing.")
    nnz = int(indptr[-1])
    if self.indices.shape != (nnz,) or self.values.shape != (nnz,):
      raise ValueError(
          f"indptr ends at {nnz} but indices / values have shapes "
          f"{self.indices.shape} / {self.values.shape}."
      )
    if nnz and (self.indices.min() < 0 or self.indices.max() >= self.num_cols):
      raise ValueError(
          f"column indices must lie in [0, {self.num_cols}); found "
          f"[{self.indices.min()}, {self.indices.max()}]."
      )

  @property
  def num_rows(self) -> int:
    return int(self.indptr.size - 1)

  @property
  def nnz(self) -> int:
    return int(self.indptr[-1])

  def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    """`(indices, values)` of row `i`."""
    start, end = self.indptr[i], self.indptr[i + 1]
    return self.indices[start:end], self.values[start:end]

  def to_dense(self) -> np.ndarray:
    """The float32 `[num_rows, num_cols]` dense matrix (small inputs only)."""
    out = np.zeros((self.num_rows, self.num_cols), np.float32)
    rows = np.repeat(np.arange(self.num_rows), np.diff(self.indptr))
    out[rows, self.indices] = self.values
    return out


def from_rows(
    rows: Sequence[tuple[np.ndarray, np.ndarray]], num_cols: int
) -> SparseMatrix:
  """Stacks `(indices, values)` rows into a `SparseMatrix`.

  Each row's entries are sorted by index; zeros are kept (drop them first
  if they should not be stored).

  Args:
    rows: One `(indices, values)` pair of equal-length 1-D arrays per row.
    num_cols: Number of columns.

  Returns:
    The CSR matrix.

  Raises:
    ValueError: If a row's arrays differ in length, a row repeats an index,
      or an index is outside `[0, num_cols)`.
  """
  if num_cols < 1:
    raise ValueError(f"num_cols must be positive; got {num_cols}.")
  all_indices, all_values, lengths = [], [], []
  for i, (idx, val) in enumerate(rows):
    idx = np.asarray(idx, np.int64).reshape(-1)
    val = np.asarray(val, np.float32).reshape(-1)
    if idx.shape != val.shape:
      raise ValueError(
          f"row {i}: {idx.size} indices but {val.size} values."
      )
    order = np.argsort(idx, kind="stable")
    idx, val = idx[order], val[order]
    if idx.size > 1 and np.any(idx[1:] == idx[:-1]):
      raise ValueError(f"row {i} repeats a column index.")
    all_indices.append(idx)
    all_values.append(val)
    lengths.append(idx.size)
  indptr = np.zeros(len(lengths) + 1, np.int64)
  np.cumsum(lengths, out=indptr[1:])
  indices = (
      np.concatenate(all_indices) if all_indices else np.zeros(0, np.int64)
  )
  if indices.size and (indices.min() < 0 or indices.max() >= num_cols):
    raise ValueError(
        f"column indices must lie in [0, {num_cols}); found "
        f"[{indices.min()}, {indices.max()}]."
    )
  values = (
      np.concatenate(all_values) if all_values else np.zeros(0, np.float32)
  )
  return SparseMatrix(indptr, indices.astype(np.int32), values, int(num_cols))


def from_dense(
    dense: jax.typing.ArrayLike | Sequence[Sequence[float]],
    *,
    threshold: float | int = 0.0,
) -> SparseMatrix:
  """CSR of the entries of a `[rows, cols]` matrix with `|x| > threshold`."""
  dense = np.asarray(dense, np.float32)
  if dense.ndim != 2:
    raise ValueError(f"dense must be 2-D; got shape {dense.shape}.")
  rows, cols = np.nonzero(np.abs(dense) > threshold)
  indptr = np.zeros(dense.shape[0] + 1, np.int64)
  np.cumsum(np.bincount(rows, minlength=dense.shape[0]), out=indptr[1:])
  return SparseMatrix(
      indptr, cols.astype(np.int32), dense[rows, cols], dense.shape[1]
  )


@dataclasses.dataclass(frozen=True)
class InvertedIndex:
  """Term-major postings of a document-term matrix (its CSC form).

  The posting list of term `t` is `doc_ids[term_ptr[t]:term_ptr[t + 1]]`
  (increasing document indices) with the matching `values`.

  Attributes:
    term_ptr: int64 `[vocab_size + 1]` offsets into the postings.
    doc_ids: int32 `[nnz]` document indices.
    values: float32 `[nnz]` document-side term weights.
    num_docs: Number of documents `N`.
  """

  term_ptr: np.ndarray
  doc_ids: np.ndarray
  values: np.ndarray
  num_docs: int

  @property
  def vocab_size(self) -> int:
    return int(self.term_ptr.size - 1)

  @property
  def nnz(self) -> int:
    return int(self.term_ptr[-1])

  def document_frequency(self) -> np.ndarray:
    """int64 `[vocab_size]`: the length of every posting list."""
    return np.diff(self.term_ptr)


def build(docs: SparseMatrix) -> InvertedIndex:
  """Inverts a CSR document-term matrix into posting lists.

  Stored zeros are dropped. Each posting list is ordered by document index
  (a stable sort by term of the row-major entries).

  Args:
    docs: `[N, V]` document vectors.

  Returns:
    The `InvertedIndex`.
  """
  keep = docs.values != 0
  doc_of_entry = np.repeat(
      np.arange(docs.num_rows, dtype=np.int32), np.diff(docs.indptr)
  )[keep]
  terms = docs.indices[keep]
  values = docs.values[keep]
  order = np.argsort(terms, kind="stable")
  term_ptr = np.zeros(docs.num_cols + 1, np.int64)
  np.cumsum(np.bincount(terms, minlength=docs.num_cols), out=term_ptr[1:])
  return InvertedIndex(
      term_ptr=term_ptr,
      doc_ids=doc_of_entry[order],
      values=values[order].astype(np.float32),
      num_docs=docs.num_rows,
  )


def _top_k(
    candidates: np.ndarray, scores: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
  """Top `k` of `(candidates, scores)`: score desc, then doc index asc."""
  if candidates.size > k:
    # Exact under ties: everything above the k-th score, then the k-th
    # score's documents in index order until k are taken.
    kth = -np.partition(-scores, k - 1)[k - 1]
    above = scores > kth
    tied = np.flatnonzero(scores == kth)
    tied = tied[np.argsort(candidates[tied], kind="stable")]
    chosen = np.concatenate(
        [np.flatnonzero(above), tied[: k - int(above.sum())]]
    )
    candidates, scores = candidates[chosen], scores[chosen]
  order = np.lexsort((candidates, -scores))
  return candidates[order], scores[order]


def search(
    index: InvertedIndex,
    query_indices: jax.typing.ArrayLike | Sequence[int],
    query_values: jax.typing.ArrayLike | Sequence[float],
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
  """Top-`k` documents for one sparse query, computed from postings only.

  Args:
    index: The inverted index.
    query_indices: `[m]` term ids (repeats are summed).
    query_values: `[m]` query term weights.
    k: Number of results, `k >= 1`.

  Returns:
    `(doc_indices, scores)`: int32 and float64 arrays of length
    `min(k, number of documents matching any query term)`, best first (ties:
    lower document index first). Documents sharing no term with the query
    are never returned.

  Raises:
    ValueError: If `k < 1`, the arrays differ in shape, or a term id is
      outside the vocabulary.
  """
  if k < 1:
    raise ValueError(f"k must be >= 1; got {k}.")
  q_idx = np.asarray(query_indices, np.int64).reshape(-1)
  q_val = np.asarray(query_values, np.float64).reshape(-1)
  if q_idx.shape != q_val.shape:
    raise ValueError(
        f"query_indices {q_idx.shape} and query_values {q_val.shape} differ."
    )
  if q_idx.size and (q_idx.min() < 0 or q_idx.max() >= index.vocab_size):
    raise ValueError(
        f"query term ids must lie in [0, {index.vocab_size}); found "
        f"[{q_idx.min()}, {q_idx.max()}]."
    )
  keep = q_val != 0
  q_idx, q_val = q_idx[keep], q_val[keep]
  starts, ends = index.term_ptr[q_idx], index.term_ptr[q_idx + 1]
  lengths = ends - starts
  total = int(lengths.sum())
  if total == 0:
    return np.zeros(0, np.int32), np.zeros(0, np.float64)
  # Positions of every posting of every query term, without a Python loop:
  # arange(total) shifted per term from its output offset to its start.
  offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
  positions = np.arange(total, dtype=np.int64) + offsets
  docs = index.doc_ids[positions]
  contrib = index.values[positions].astype(np.float64) * np.repeat(
      q_val, lengths
  )
  acc = np.bincount(docs, weights=contrib, minlength=index.num_docs)
  matched = np.zeros(index.num_docs, bool)
  matched[docs] = True
  candidates = np.flatnonzero(matched)
  doc_idx, scores = _top_k(candidates, acc[candidates], k)
  return doc_idx.astype(np.int32), scores


def search_batch(
    index: InvertedIndex, queries: SparseMatrix, k: int
) -> tuple[np.ndarray, np.ndarray]:
  """`search` for every row of `queries`, padded to `[Q, k]`.

  Args:
    index: The inverted index.
    queries: `[Q, V]` sparse queries.
    k: Results per query.

  Returns:
    `(scores, indices)`: float64 `[Q, k]` scores (`-inf` padding) and int32
    `[Q, k]` document indices (`-1` padding), the layout of
    `lowrank.retrieval.search.exact_search`.

  Raises:
    ValueError: If the query vocabulary differs from the index's.
  """
  if queries.num_cols != index.vocab_size:
    raise ValueError(
        f"queries have {queries.num_cols} columns but the index has a "
        f"vocabulary of {index.vocab_size}."
    )
  scores = np.full((queries.num_rows, k), -np.inf)
  indices = np.full((queries.num_rows, k), -1, np.int32)
  for i in range(queries.num_rows):
    doc_idx, doc_scores = search(index, *queries.row(i), k)
    scores[i, : doc_idx.size] = doc_scores
    indices[i, : doc_idx.size] = doc_idx
  return scores, indices


def search_run(
    index: InvertedIndex,
    query_ids: Sequence[str],
    queries: SparseMatrix,
    doc_ids: Sequence[str],
    k: int,
) -> dict[str, dict[str, float]]:
  """Searches every query and returns a run dict for `metrics.evaluate`.

  Args:
    index: The inverted index over `doc_ids` (row `i` is `doc_ids[i]`).
    query_ids: `Q` ids, one per row of `queries`.
    queries: `[Q, V]` sparse queries.
    doc_ids: `N` document ids.
    k: Results per query.

  Returns:
    `{query id: {doc id: score}}`; a query that matches no document gets an
    empty ranking.

  Raises:
    ValueError: If the id lists disagree with the matrix shapes.
  """
  if len(query_ids) != queries.num_rows:
    raise ValueError(
        f"{len(query_ids)} query ids for {queries.num_rows} query rows."
    )
  if len(doc_ids) != index.num_docs:
    raise ValueError(
        f"{len(doc_ids)} doc ids for an index of {index.num_docs} documents."
    )
  scores, indices = search_batch(index, queries, k)
  return metrics.run_from_scores(query_ids, doc_ids, scores, indices)
