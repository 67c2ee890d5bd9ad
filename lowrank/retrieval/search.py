"""Exact (brute-force) top-k dense retrieval in JAX, sharded or streamed.

`topk(queries, corpus, k, block_size=...)` is the array API: exact
inner-product top-k (use L2-normalised embeddings for cosine).

- Unsharded, `block_size=None`: one `[Q, N]` score matrix and one
  `jax.lax.top_k`.
- Streaming (`block_size=B`): the corpus is scanned in blocks of `B` rows
  (`jax.lax.fori_loop`), keeping a running top-k that is merged with each
  block's scores by one `jax.lax.top_k` over `[Q, k + B]` values. Score
  memory is `O(Q * (B + k))` whatever `N` is; the corpus is never copied or
  padded (the last block is clamped to end at `N` and the rows it re-reads
  are masked out).
- Sharded: when `corpus` is a `jax.Array` whose rows are sharded over mesh
  axes (a `NamedSharding` whose spec names axes for dimension 0), the search
  runs under `jax.shard_map`: every shard computes the top-`min(k, N_local)`
  of its own rows (streamed too, if `block_size` is set), the candidates are
  all-gathered over the row axes (`[Q, shards * k]`, a few KiB per query)
  and merged by one more `top_k`. If the embedding dimension is sharded as
  well, partial scores are summed with `psum` before the local top-k. The
  result is replicated.

`exact_search` is the older chunked API (query chunks x document chunks) with
the same semantics; `search_run` wraps it into a run dict for
`lowrank.retrieval.metrics`.

Ties: among equal scores the document with the LOWER index ranks first (and
wins a place in the top k), in every mode: `jax.lax.top_k` keeps the lower
position first among equal values, running results (lower indices) are
concatenated before each new block, and gathered shard results are in shard
(= row) order. The sharded, streamed and plain modes therefore return
identical indices. trec_eval orders ties by document id descending instead;
`lowrank.retrieval.metrics` re-sorts runs that way, so only ties that
straddle the k-th place can change a metric.

Input checks (`topk`, `exact_search`, `search_run`): 2-D real (float or
integer) arrays with equal embedding dimensions and an integer
`1 <= k <= N`, else ValueError/TypeError before anything is compiled. A NaN
or inf embedding would score NaN/inf against every query and take the top
places (or, as -inf, collide with the mask value of the streamed search),
so results with a non-finite score raise ValueError naming the first
non-finite row of `queries` or of the corpus. The check reads only the
`[Q, k]` output scores (one `jnp.isfinite` reduction and one host sync):
a non-finite query always shows there, and so does every non-finite corpus
row that can change the result (one whose scores are all -inf and stay out
of the top k cannot, and is not reported). Only then are the inputs
scanned, to name the row; if both are finite the scores overflowed float32
and the message says so. The output check costs tens of microseconds;
checking the inputs up front would read the whole corpus again on every
call (on CPU about 20 ms for 100k x 384 float32, as long as the search of
one query). Under `jax.jit` (traced inputs) nothing can be raised and the
check is skipped; `check_finite=False` skips it (and the sync) too.

`streamed_topk` takes any scoring function, so `lowrank.retrieval.codes`
reuses it for Hamming, int8 and product-quantisation search.
"""

from collections.abc import Callable, Sequence
import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int
import numpy as np

from lowrank.retrieval import metrics

P = jax.sharding.PartitionSpec
_AnyArray = jax.Array | np.ndarray


def _lowest(dtype) -> jax.Array:
  """The score used for masked entries: -inf, or the integer minimum."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.array(-jnp.inf, dtype)
  return jnp.array(jnp.iinfo(dtype).min, dtype)


def _as_array(x: Any) -> jax.Array | np.ndarray:
  return x if isinstance(x, (jax.Array, np.ndarray)) else np.asarray(x)


def _as_int(value: Any, name: str) -> int:
  """`value` as an int (numpy integers too); TypeError for bool/float."""
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be an integer; got {value!r}")
  try:
    return operator.index(value)
  except TypeError:
    raise TypeError(
        f"{name} must be an integer; got {value!r} "
        f"({type(value).__name__}). Pass e.g. int({value!r})."
    ) from None


def _check_2d(x: jax.Array | np.ndarray, name: str) -> None:
  if x.ndim != 2:
    hint = " (one vector v: pass v[None, :])" if x.ndim == 1 else ""
    raise ValueError(
        f"{name} must be a 2-D [rows, dim] array; got shape "
        f"{tuple(x.shape)}{hint}"
    )


def _check_search_args(
    queries: jax.Array | np.ndarray,
    corpus: jax.Array | np.ndarray,
    k: Any,
    corpus_name: str,
) -> int:
  """Ranks, dtypes, dimensions and `k` of a search; returns `k` as int."""
  for name, x in (("queries", queries), (corpus_name, corpus)):
    _check_2d(x, name)
    dtype = jnp.dtype(x.dtype)
    if dtype == jnp.bool_ or not (
        jnp.issubdtype(dtype, jnp.floating)
        or jnp.issubdtype(dtype, jnp.integer)
    ):
      raise TypeError(
          f"{name} must hold real floats or integers; got dtype {dtype}. "
          "Convert it, e.g. x.astype(np.float32) (for complex data, decide "
          "what the inner product should mean first)."
      )
  if queries.shape[1] != corpus.shape[1]:
    raise ValueError(
        f"queries have dimension {queries.shape[1]} but {corpus_name} rows "
        f"have {corpus.shape[1]}; embed both with the same model (or cut "
        "both to the same Matryoshka prefix)."
    )
  k = _as_int(k, "k")
  num_docs = corpus.shape[0]
  if not 1 <= k <= num_docs:
    if num_docs == 0:
      way_out = f"{corpus_name} is empty: there is nothing to search."
    elif k < 1:
      way_out = "Ask for at least one result."
    else:
      way_out = "Ask for at most N results (search_run clips k to N)."
    raise ValueError(
        f"Need 1 <= k <= N = {num_docs} ({corpus_name} rows); got k = {k}. "
        f"{way_out}"
    )
  return k


def _nonfinite_rows(x: jax.Array | np.ndarray) -> np.ndarray:
  """Indices of the rows of `x` holding a NaN or an inf."""
  if not jnp.issubdtype(jnp.dtype(x.dtype), jnp.floating):
    return np.zeros(0, np.int64)
  return np.flatnonzero(~np.asarray(jnp.isfinite(x).all(axis=1)))


def _check_finite(
    scores: jax.Array,
    queries: jax.Array | np.ndarray,
    corpus: jax.Array | np.ndarray,
    corpus_name: str,
) -> None:
  """ValueError if the top-k scores are not all finite (see module doc)."""
  if isinstance(scores, jax.core.Tracer):
    return  # Under jit: nothing can be raised (documented).
  if bool(jnp.isfinite(scores).all()):
    return
  problems = []
  for name, x in (("queries", queries), (corpus_name, corpus)):
    rows = _nonfinite_rows(x)
    if rows.size:
      first = int(rows[0])
      row = np.asarray(jnp.asarray(x[first]))  # As the search read it.
      bad = row[~np.isfinite(row)]
      value = bad[0] if bad.size else "a value beyond float32's range"
      problems.append(
          f"{name} row {first} is not finite (it holds {value}; "
          f"non-finite rows of {name}: {rows.size} of {x.shape[0]})"
      )
  if not problems:
    raise ValueError(
        "The search produced non-finite scores although queries and "
        f"{corpus_name} are finite: their inner products overflow float32. "
        "Scale the embeddings down, e.g. L2-normalise them."
    )
  raise ValueError(
      "; ".join(problems)
      + ". A NaN or inf embedding scores NaN or inf against the other side "
      "and would take (or corrupt) the top places. Remove or repair those "
      "rows before searching (e.g. keep x[np.isfinite(x).all(axis=1)] and "
      "the matching ids), or pass check_finite=False to skip this check."
  )


def streamed_topk(
    score_fn: Callable[[jax.Array, jax.Array], jax.Array],
    queries: jax.Array,
    docs: jax.Array,
    k: int,
    block_size: int | None,
    offset: jax.typing.ArrayLike = 0,
) -> tuple[jax.Array, jax.Array]:
  """Top-`k` of `score_fn(queries, docs)` over rows of `docs`, by blocks.

  Traced helper (call it inside `jit`). `score_fn(queries, rows)` returns
  `[Q, len(rows)]` scores (any float or integer dtype). With
  `block_size=None` (or `>= N`) all rows are scored at once; otherwise the
  rows go through in blocks of `block_size` with a running top-k.

  Args:
    score_fn: Scoring function of `(queries, doc rows)`.
    queries: Anything `score_fn` accepts as its first argument.
    docs: `[N, ...]`; blocks are slices along axis 0.
    k: Results per query (static), `1 <= k <= N`.
    block_size: Rows per block (static), or None.
    offset: Added to the returned indices (the shard's first row).

  Returns:
    `(scores, indices)`, `[Q, k]`, scores descending, ties by lower index;
    indices int32.
  """
  num_docs = docs.shape[0]
  if block_size is None or block_size >= num_docs:
    scores = score_fn(queries, docs)
    top, positions = jax.lax.top_k(scores, k)
    return top, positions.astype(jnp.int32) + offset
  num_blocks = -(-num_docs // block_size)
  # Static: shape and dtype of one block's scores.
  block_scores = jax.eval_shape(
      score_fn,
      queries,
      jax.ShapeDtypeStruct((block_size,) + docs.shape[1:], docs.dtype),
  )
  lowest = _lowest(block_scores.dtype)

  def merge_block(i, carry):
    best_scores, best_indices = carry
    nominal_start = i * block_size
    # The last block is clamped to end at N (no padded copy of `docs`); the
    # rows it shares with the previous block are masked out.
    start = jnp.minimum(nominal_start, num_docs - block_size)
    block = jax.lax.dynamic_slice_in_dim(docs, start, block_size, axis=0)
    scores = score_fn(queries, block)
    local = start + jnp.arange(block_size, dtype=jnp.int32)
    scores = jnp.where((local >= nominal_start)[None, :], scores, lowest)
    # Running results come first, so lax.top_k (which puts the lower
    # position first among equal values) keeps ties in index order.
    all_scores = jnp.concatenate([best_scores, scores], axis=1)
    all_indices = jnp.concatenate(
        [best_indices, jnp.broadcast_to(local + offset, scores.shape)],
        axis=1,
    )
    top, positions = jax.lax.top_k(all_scores, k)
    return top, jnp.take_along_axis(all_indices, positions, axis=1)

  num_queries = block_scores.shape[0]
  init = (
      jnp.full((num_queries, k), lowest, block_scores.dtype),
      jnp.full((num_queries, k), -1, jnp.int32),
  )
  return jax.lax.fori_loop(0, num_blocks, merge_block, init)


def _inner_product(precision):
  def score(q, rows):
    return jnp.einsum(
        "qd,nd->qn",
        q,
        rows,
        precision=precision,
        preferred_element_type=jnp.float32,
    )

  return score


@functools.partial(
    jax.jit, static_argnames=("k", "block_size", "precision")
)
def _topk_single(queries, corpus, k, block_size, precision):
  return streamed_topk(
      _inner_product(precision), queries, corpus, k, block_size
  )


@functools.partial(
    jax.jit,
    static_argnames=(
        "k", "block_size", "precision", "mesh", "row_axes", "col_axes"
    ),
)
def _topk_sharded(
    queries, corpus, k, block_size, precision, mesh, row_axes, col_axes
):
  """shard_map search: local top-k per row shard, all-gather, merge."""
  num_shards = int(np.prod([mesh.shape[a] for a in row_axes]))
  local_rows = corpus.shape[0] // num_shards
  local_k = min(k, local_rows)
  row_spec = row_axes if row_axes else None
  col_spec = col_axes if col_axes else None

  def local_search(q, rows):
    score_fn = _inner_product(precision)
    if col_axes:
      # The embedding dimension is split too: sum the partial scores.
      partial_fn = score_fn
      score_fn = lambda q, r: jax.lax.psum(partial_fn(q, r), col_axes)
    offset = jax.lax.axis_index(row_axes) * local_rows if row_axes else 0
    scores, indices = streamed_topk(
        score_fn, q, rows, local_k, block_size, offset
    )
    if not row_axes:
      return scores, indices
    # Shard order is row order, so lax.top_k's position tie-break on the
    # gathered candidates keeps the lower global index first.
    scores = jax.lax.all_gather(scores, row_axes, axis=1, tiled=True)
    indices = jax.lax.all_gather(indices, row_axes, axis=1, tiled=True)
    top, positions = jax.lax.top_k(scores, k)
    return top, jnp.take_along_axis(indices, positions, axis=1)

  return jax.shard_map(
      local_search,
      mesh=mesh,
      in_specs=(P(None, col_spec), P(row_spec, col_spec)),
      out_specs=(P(), P()),
      check_vma=False,
  )(queries, corpus)


def _sharded_axes(
    corpus: _AnyArray,
) -> tuple[jax.sharding.Mesh, tuple[str, ...], tuple[str, ...]] | None:
  """The mesh and the axes sharding `corpus`'s rows / columns, if any."""
  sharding = getattr(corpus, "sharding", None)
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return None
  spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))

  def axes(entry):
    if entry is None:
      return ()
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    return tuple(a for a in names if sharding.mesh.shape[a] > 1)

  row_axes, col_axes = axes(spec[0]), axes(spec[1])
  if not row_axes and not col_axes:
    return None
  return sharding.mesh, row_axes, col_axes


def topk(
    queries: jax.typing.ArrayLike,
    corpus: jax.typing.ArrayLike,
    k: Any,
    *,
    block_size: Any = None,
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
    check_finite: bool = True,
) -> tuple[Float[Array, "q k"], Int[Array, "q k"]]:
  """Exact inner-product top-`k` of `corpus` rows for every query.

  Compiles once per (shapes, `k`, `block_size`, sharding). If `corpus` is
  a `jax.Array` sharded by rows (and/or columns) over a mesh, the search
  runs per shard under `jax.shard_map` and the shard results are merged
  (see the module docstring); the outputs are then replicated over the mesh.
  Otherwise it runs as one jitted computation on the arrays' device.

  Args:
    queries: `[Q, D]` query embeddings (replicated when `corpus` is
      sharded); real floats or integers.
    corpus: `[N, D]` document embeddings, possibly sharded.
    k: Results per query (static), an integer `1 <= k <= N`. `k`,
      `block_size` and the arrays are checked here, with clear errors, not
      by annotations.
    block_size: Corpus rows per streaming step (per shard when sharded);
      None scores all (local) rows at once. With a block size, score memory
      is `O(Q * (block_size + k))`, so `N` can be much larger than one
      `[Q, N]` buffer.
    precision: Matmul precision. HIGHEST gives float32 scores that match
      numpy's; lower settings allow TF32/bf16 passes on accelerators.
    check_finite: Raise if a returned score is NaN or inf (see the module
      docstring; one reduction over the `[Q, k]` scores and a host sync).
      Skipped under `jax.jit`.

  Returns:
    `(scores, indices)`, both `[Q, k]`: float32 scores in descending order
    and int32 row indices into `corpus`; ties: lower index first.

  Raises:
    ValueError: On inputs that are not 2-D, a dimension mismatch, `k`
      outside `[1, N]`, a non-positive `block_size`, or (with
      `check_finite`) a NaN/inf query or corpus row that reaches the top k,
      or scores that overflow float32.
    TypeError: If `k` or `block_size` is not an integer, or an input is not
      real (complex, bool, object).
  """
  queries, corpus = _as_array(queries), _as_array(corpus)
  k = _check_search_args(queries, corpus, k, "corpus")
  if block_size is not None:
    block_size = _as_int(block_size, "block_size")
    if block_size < 1:
      raise ValueError(
          f"block_size must be positive or None; got {block_size}"
      )
  sharded = _sharded_axes(corpus)
  if sharded is None:
    scores, indices = _topk_single(queries, corpus, k, block_size, precision)
  else:
    mesh, row_axes, col_axes = sharded
    queries = jax.device_put(
        queries, jax.sharding.NamedSharding(mesh, P(None, col_axes or None))
    )
    scores, indices = _topk_sharded(
        queries, corpus, k, block_size, precision, mesh, row_axes, col_axes
    )
  if check_finite:
    _check_finite(scores, queries, corpus, "corpus")
  return scores, indices


@functools.partial(
    jax.jit, static_argnames=("k", "query_chunk", "doc_chunk", "precision")
)
def _exact_search(queries, docs, k, query_chunk, doc_chunk, precision):
  """`exact_search` after its checks (jitted)."""
  num_queries, dim = queries.shape
  if num_queries == 0:  # Nothing to search (no chunk of size 0 exists).
    return jnp.zeros((0, k), jnp.float32), jnp.zeros((0, k), jnp.int32)
  # Static: all of this is decided from shapes.
  query_chunk = min(query_chunk, num_queries)
  num_query_chunks = -(-num_queries // query_chunk)
  padded = jnp.pad(
      queries, ((0, num_query_chunks * query_chunk - num_queries), (0, 0))
  )
  query_chunks = padded.reshape(num_query_chunks, query_chunk, dim)
  score_fn = _inner_product(precision)
  scores, indices = jax.lax.map(
      lambda q: streamed_topk(score_fn, q, docs, k, doc_chunk), query_chunks
  )
  return (
      scores.reshape(-1, k)[:num_queries],
      indices.reshape(-1, k)[:num_queries],
  )


def exact_search(
    queries: jax.typing.ArrayLike,
    docs: jax.typing.ArrayLike,
    k: Any,
    *,
    query_chunk: Any = 512,
    doc_chunk: Any = 8192,
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
    check_finite: bool = True,
) -> tuple[Float[Array, "q k"], Int[Array, "q k"]]:
  """Top-`k` documents by inner product for every query, in chunks.

  Compiles once per (shapes, `k`, chunk sizes); the loop bodies have fixed
  shapes `[query_chunk, D]` x `[doc_chunk, D]`. Same results and checks as
  `topk` (which does not chunk the queries but also runs sharded).

  Args:
    queries: `[Q, D]` query embeddings; real floats or integers.
    docs: `[N, D]` document embeddings.
    k: Number of results per query (static), an integer `1 <= k <= N`. It
      may exceed `doc_chunk`.
    query_chunk: Queries per step (static); clipped to `Q`. The query matrix
      is zero-padded to a multiple of it.
    doc_chunk: Documents per step (static); clipped to `N`.
    precision: Matmul precision (static). HIGHEST gives float32 scores that
      match numpy's; lower settings allow TF32/bf16 passes on accelerators.
    check_finite: Raise if a returned score is NaN or inf (as `topk`).

  Returns:
    `(scores, indices)`, both `[Q, k]`: float32 scores in descending order,
    and int32 row indices into `docs` (ties: lower index first).

  Raises:
    ValueError: If the inputs are not 2-D or their dimensions differ, `k`
      is not in `[1, N]`, a chunk size is not positive, or (with
      `check_finite`) on a NaN/inf query or document row (see `topk`).
    TypeError: If `k` or a chunk size is not an integer, or an input is not
      real.
  """
  queries, docs = _as_array(queries), _as_array(docs)
  k = _check_search_args(queries, docs, k, "docs")
  query_chunk = _as_int(query_chunk, "query_chunk")
  doc_chunk = _as_int(doc_chunk, "doc_chunk")
  if query_chunk < 1 or doc_chunk < 1:
    raise ValueError(
        f"Chunk sizes must be positive: query_chunk={query_chunk}, "
        f"doc_chunk={doc_chunk}"
    )
  scores, indices = _exact_search(
      queries,
      docs,
      k=k,
      query_chunk=query_chunk,
      doc_chunk=doc_chunk,
      precision=precision,
  )
  if check_finite:
    _check_finite(scores, queries, docs, "docs")
  return scores, indices


def search_run(
    query_ids: Sequence[Any],
    query_embeddings: jax.typing.ArrayLike,
    doc_ids: Sequence[Any],
    doc_embeddings: jax.typing.ArrayLike,
    k: Any,
    *,
    query_chunk: Any = 512,
    doc_chunk: Any = 8192,
    check_finite: bool = True,
) -> dict[Any, dict[Any, float]]:
  """Runs `exact_search` and returns a run dict for `metrics.evaluate`.

  Args:
    query_ids: `Q` ids, one per row of `query_embeddings`.
    query_embeddings: `[Q, D]`.
    doc_ids: `N` ids, one per row of `doc_embeddings`.
    doc_embeddings: `[N, D]`.
    k: Results per query, a positive integer; clipped to `N` (so `k=100`
      works on an 82-document corpus).
    query_chunk: See `exact_search`.
    doc_chunk: See `exact_search`.
    check_finite: See `exact_search`.

  Returns:
    `{query id: {doc id: score}}` with `min(k, N)` documents per query.

  Raises:
    ValueError: If the id lists and embedding rows disagree, `k < 1`, the
      corpus is empty, and as `exact_search`.
    TypeError: As `exact_search`.
  """
  query_embeddings = _as_array(query_embeddings)
  doc_embeddings = _as_array(doc_embeddings)
  _check_2d(query_embeddings, "query_embeddings")
  _check_2d(doc_embeddings, "doc_embeddings")
  if len(query_ids) != query_embeddings.shape[0]:
    raise ValueError(
        f"{len(query_ids)} query ids for {query_embeddings.shape[0]} rows"
    )
  if len(doc_ids) != doc_embeddings.shape[0]:
    raise ValueError(
        f"{len(doc_ids)} doc ids for {doc_embeddings.shape[0]} rows"
    )
  k = _as_int(k, "k")
  if k < 1:
    raise ValueError(f"k must be a positive integer; got {k}")
  scores, indices = exact_search(
      query_embeddings,
      doc_embeddings,
      min(k, len(doc_ids)),
      query_chunk=query_chunk,
      doc_chunk=doc_chunk,
      check_finite=check_finite,
  )
  return metrics.run_from_scores(
      query_ids, doc_ids, np.asarray(scores), np.asarray(indices)
  )
