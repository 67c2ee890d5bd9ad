"""Exact (brute-force) top-k dense retrieval in JAX.

`exact_search` scores queries against a document matrix by inner product
(use L2-normalised embeddings for cosine) without materialising the full
`[Q, N]` score matrix: queries go through in chunks of `query_chunk`, and for
each query chunk the documents are scanned in chunks of `doc_chunk`, keeping a
running top-k that is merged with each chunk's scores by one `jax.lax.top_k`
over `[query_chunk, k + doc_chunk]` values. Peak memory for scores is
`O(query_chunk * (doc_chunk + k))`; the document matrix is never copied or
padded (the last document chunk is clamped to end at `N` and the documents it
re-reads are masked with `-inf`).

Ties: among equal scores the document with the LOWER index ranks first (and
wins a place in the top k). trec_eval orders ties by document id descending
instead; `lowrank.retrieval.metrics` re-sorts runs that way, so only ties that
straddle the k-th place can change a metric.
"""

from collections.abc import Sequence
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int
import numpy as np

from lowrank.retrieval import metrics


@functools.partial(
    jax.jit, static_argnames=("k", "query_chunk", "doc_chunk", "precision")
)
def exact_search(
    queries: Float[Array, "q d"],
    docs: Float[Array, "n d"],
    k: int,
    *,
    query_chunk: int = 512,
    doc_chunk: int = 8192,
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
) -> tuple[Float[Array, "q k"], Int[Array, "q k"]]:
  """Top-`k` documents by inner product for every query.

  Compiles once per (shapes, `k`, chunk sizes); the loop bodies have fixed
  shapes `[query_chunk, D]` x `[doc_chunk, D]`.

  Args:
    queries: `[Q, D]` query embeddings.
    docs: `[N, D]` document embeddings.
    k: Number of results per query (static), `1 <= k <= N`. It may exceed
      `doc_chunk`.
    query_chunk: Queries per step (static); clipped to `Q`. The query matrix
      is zero-padded to a multiple of it.
    doc_chunk: Documents per step (static); clipped to `N`.
    precision: Matmul precision (static). HIGHEST gives float32 scores that
      match numpy's; lower settings allow TF32/bf16 passes on accelerators.

  Returns:
    `(scores, indices)`, both `[Q, k]`: float32 scores in descending order,
    and int32 row indices into `docs` (ties: lower index first).

  Raises:
    ValueError: If `k` is not in `[1, N]` or a chunk size is not positive.
  """
  num_queries, dim = queries.shape
  num_docs = docs.shape[0]
  if not 1 <= k <= num_docs:
    raise ValueError(f"Need 1 <= k <= N = {num_docs}; got k = {k}")
  if query_chunk < 1 or doc_chunk < 1:
    raise ValueError(f"Chunk sizes must be positive: {query_chunk, doc_chunk}")
  # Static: all of this is decided from shapes.
  query_chunk = min(query_chunk, num_queries)
  doc_chunk = min(doc_chunk, num_docs)
  num_query_chunks = -(-num_queries // query_chunk)
  num_doc_chunks = -(-num_docs // doc_chunk)
  padded = jnp.pad(
      queries, ((0, num_query_chunks * query_chunk - num_queries), (0, 0))
  )
  query_chunks = padded.reshape(num_query_chunks, query_chunk, dim)

  def search_query_chunk(q):
    def merge_doc_chunk(i, carry):
      best_scores, best_indices = carry
      nominal_start = i * doc_chunk
      # The last chunk is clamped to end at N (no padded copy of `docs`);
      # the documents it shares with the previous chunk are masked out.
      start = jnp.minimum(nominal_start, num_docs - doc_chunk)
      chunk = jax.lax.dynamic_slice_in_dim(docs, start, doc_chunk, axis=0)
      scores = jnp.einsum(
          "qd,nd->qn",
          q,
          chunk,
          precision=precision,
          preferred_element_type=jnp.float32,
      )
      indices = start + jnp.arange(doc_chunk, dtype=jnp.int32)
      scores = jnp.where((indices >= nominal_start)[None, :], scores, -jnp.inf)
      # Running results come first, so lax.top_k (which puts the lower
      # position first among equal values) keeps ties in index order.
      all_scores = jnp.concatenate([best_scores, scores], axis=1)
      all_indices = jnp.concatenate(
          [best_indices, jnp.broadcast_to(indices, scores.shape)], axis=1
      )
      top_scores, positions = jax.lax.top_k(all_scores, k)
      return top_scores, jnp.take_along_axis(all_indices, positions, axis=1)

    init = (
        jnp.full((query_chunk, k), -jnp.inf, jnp.float32),
        jnp.full((query_chunk, k), -1, jnp.int32),
    )
    return jax.lax.fori_loop(0, num_doc_chunks, merge_doc_chunk, init)

  scores, indices = jax.lax.map(search_query_chunk, query_chunks)
  return (
      scores.reshape(-1, k)[:num_queries],
      indices.reshape(-1, k)[:num_queries],
  )


def search_run(
    query_ids: Sequence[str],
    query_embeddings: jax.typing.ArrayLike,
    doc_ids: Sequence[str],
    doc_embeddings: jax.typing.ArrayLike,
    k: int,
    *,
    query_chunk: int = 512,
    doc_chunk: int = 8192,
) -> dict[str, dict[str, float]]:
  """Runs `exact_search` and returns a run dict for `metrics.evaluate`.

  Args:
    query_ids: `Q` ids, one per row of `query_embeddings`.
    query_embeddings: `[Q, D]`.
    doc_ids: `N` ids, one per row of `doc_embeddings`.
    doc_embeddings: `[N, D]`.
    k: Results per query; clipped to `N` (so `k=100` works on an 82-document
      corpus).
    query_chunk: See `exact_search`.
    doc_chunk: See `exact_search`.

  Returns:
    `{query id: {doc id: score}}` with `min(k, N)` documents per query.

  Raises:
    ValueError: If the id lists and embedding rows disagree.
  """
  query_embeddings = jnp.asarray(query_embeddings)
  doc_embeddings = jnp.asarray(doc_embeddings)
  if len(query_ids) != query_embeddings.shape[0]:
    raise ValueError(
        f"{len(query_ids)} query ids for {query_embeddings.shape[0]} rows"
    )
  if len(doc_ids) != doc_embeddings.shape[0]:
    raise ValueError(
        f"{len(doc_ids)} doc ids for {doc_embeddings.shape[0]} rows"
    )
  scores, indices = exact_search(
      query_embeddings,
      doc_embeddings,
      min(k, len(doc_ids)),
      query_chunk=query_chunk,
      doc_chunk=doc_chunk,
  )
  return metrics.run_from_scores(
      query_ids, doc_ids, np.asarray(scores), np.asarray(indices)
  )
