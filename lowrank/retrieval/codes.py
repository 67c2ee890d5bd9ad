"""Compressed document codes: binary, int8 and product quantisation (PQ).

Every index here is a small `NamedTuple` of arrays; `index_nbytes` gives its
size, and each search returns `(scores, indices)` like
`lowrank.retrieval.search.topk` (descending scores, ties by LOWER document
index, optional streaming over `block_size` corpus rows).

**Binary** (`pack_bits`, `hamming_search`, `binary_search`). Dimension `j`
becomes bit `x_j > 0` (as sentence-transformers' `quantize_embeddings`).
Bits are packed most-significant first: uint8 codes equal
`np.packbits(x > 0, axis=-1)`; uint32 words are those bytes read big-endian
(4 bytes a word, zero-padded). Hamming distance is the popcount of the XOR.
`binary_search` takes the `num_candidates` nearest codes and reranks them by
the float inner product, either with the stored float document vectors
(gathered only for the candidates; a host `np.ndarray` or memory map is
gathered on the host) or, without them, with the float query against the
`+-1` document signs (asymmetric rescoring).

**int8** (`int8_quantize`, `int8_search`). Symmetric scalar quantisation
`x ~ scale * c`, `c` in `[-127, 127]`, with one scale per dimension or one
global scale (absmax, or a quantile of `|x|` to clip outliers). At search
time the query is multiplied by the document scales and quantised to int8
with its own absmax scale `t`, so `<q, x> ~ t * <e, c>` where `<e, c>` is an
int8 dot product accumulated in int32; the ranking uses the int32 values.

**Product quantisation** (`kmeans`, `train_pq`, `pq_encode`, `pq_decode`,
`adc_tables`, `adc_scores`, `pq_search`). The `D` dimensions are split into
`M` contiguous subspaces; each gets a k-means codebook of `K <= 256`
centroids (Lloyd iterations with a fixed count, jit-compiled, initialised
from distinct random points; an empty cluster keeps its centroid). A vector
is coded by its nearest centroid per subspace (uint8 `[M]`). Search uses
asymmetric distance computation (ADC): a `[Q, M, K]` table of query-subvector
x centroid inner products, and a document's score is the sum of `M` table
entries, which equals `<q, decode(code)>`.

**JPQ** (`jpq_loss`, `jpq_negatives`, `quantize_straight_through`). Joint
training of the PQ centroids with the query encoder (Zhan et al. 2021): the
document codes are fixed (assigned once, by `pq_encode` with the initial
k-means codebooks); the centroids are trainable parameters and a document
embedding is *reconstructed* from them by an embedding lookup
(`pq_decode`, the "centroid embedding" trick: the gradient reaches exactly
the centroids a document uses); the query encoder is trained against the
reconstructed documents with a ranking loss, and hard negatives come from
searching the current PQ index (end-to-end negative sampling). `jpq_loss` is
softmax cross-entropy over the positive, the hard negatives and (optionally)
the other queries' positives, or JPQ/ADORE's pairwise RankNet loss.
`quantize_straight_through` is for training a *document* encoder through
the quantiser: its value is the reconstruction, its gradient reaches both the
centroids and (straight-through, as if quantisation were the identity) the
input vector.

References:
  - Jegou, Douze, Schmid 2011, "Product Quantization for Nearest Neighbor
    Search", https://doi.org/10.1109/TPAMI.2010.57 (PQ, ADC).
  - Zhan et al. 2021, "Jointly Optimizing Query Encoder and Product
    Quantization to Improve Retrieval Performance" (JPQ),
    https://arxiv.org/abs/2108.00644.
  - Bengio, Leonard, Courville 2013, https://arxiv.org/abs/1308.3432
    (straight-through estimator).
  - Yamada, Asai, Hajishirzi 2021, "Efficient Passage Retrieval with Hashing
    for Open-domain Question Answering" (BPR), https://arxiv.org/abs/2106.00882
    (binary candidates + float rerank).
"""

import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Integer, Shaped
import numpy as np

from lowrank.retrieval import search

_AnyArray = jax.Array | np.ndarray


def index_nbytes(index: Any) -> int:
  """Bytes held by an index: the sum of `nbytes` over its array leaves."""
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(index)))


def _check_block_size(block_size: int | None) -> None:
  if block_size is not None and block_size < 1:
    raise ValueError(f"block_size must be positive or None; got {block_size}")


def _check_k(k: int, num_docs: int) -> None:
  if not 1 <= k <= num_docs:
    raise ValueError(f"Need 1 <= k <= N = {num_docs}; got k = {k}")


def _topk_by_score_then_index(
    scores: jax.Array, indices: jax.Array, k: int
) -> tuple[jax.Array, jax.Array]:
  """Top-`k` of candidate rows by score desc, then document index asc."""
  # `+ 0.0` turns -0.0 into +0.0: sort compares floats in total order.
  neg, idx = jax.lax.sort((-scores + 0.0, indices), dimension=1, num_keys=2)
  return -neg[:, :k], idx[:, :k]


# ----------------------------------------------------------------------------
# Binary codes.


def _word_bits(dtype) -> int:
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype(jnp.uint8), jnp.dtype(jnp.uint32)):
    raise ValueError(f"Bit codes are uint8 or uint32; got {dtype}")
  return 8 * dtype.itemsize


@functools.partial(jax.jit, static_argnames=("dtype",))
def pack_bits(
    x: Shaped[_AnyArray, "*b d"], dtype: Any = jnp.uint8
) -> Integer[Array, "*b w"]:
  """Packs the sign bits `x > 0` of the last axis into uint8/uint32 words.

  Args:
    x: `[..., D]` float (or bool/int) vectors.
    dtype: `jnp.uint8` (equals `np.packbits(x > 0, axis=-1)`) or
      `jnp.uint32` (those bytes read big-endian, 4 to a word).

  Returns:
    `[..., ceil(D / bits)]` words; the padding bits of the last word are 0.

  Raises:
    ValueError: For another dtype.
  """
  bits_per_word = _word_bits(dtype)
  dim = x.shape[-1]
  num_words = -(-dim // bits_per_word)
  bits = (jnp.asarray(x) > 0).astype(dtype)
  pad = [(0, 0)] * (bits.ndim - 1) + [(0, num_words * bits_per_word - dim)]
  bits = jnp.pad(bits, pad).reshape(
      *bits.shape[:-1], num_words, bits_per_word
  )
  shifts = jnp.arange(bits_per_word - 1, -1, -1, dtype=dtype)
  shifts = shifts.reshape((1,) * (bits.ndim - 1) + (bits_per_word,))
  # Distinct bit positions: the sum is the bitwise OR.
  return jnp.sum(bits << shifts, axis=-1, dtype=dtype)


@functools.partial(jax.jit, static_argnames=("dim",))
def unpack_signs(
    codes: Integer[_AnyArray, "*b w"], dim: int
) -> Float[Array, "*b dd"]:
  """Inverse of `pack_bits` up to the sign: `+1` for a set bit, else `-1`.

  Args:
    codes: uint8 or uint32 words from `pack_bits`.
    dim: The original dimension `D`.

  Returns:
    `[..., D]` float32 vectors of `+-1`.
  """
  bits_per_word = _word_bits(codes.dtype)
  shifts = jnp.arange(bits_per_word - 1, -1, -1, dtype=codes.dtype)
  shifts = shifts.reshape((1,) * codes.ndim + (bits_per_word,))
  bits = (codes[..., None] >> shifts) & 1
  bits = bits.reshape(*codes.shape[:-1], -1)[..., :dim]
  return 2.0 * bits.astype(jnp.float32) - 1.0


def _check_codes(what: str, a: jax.Array, b: jax.Array) -> None:
  if a.dtype != b.dtype or a.shape[1] != b.shape[1]:
    raise ValueError(
        f"{what} must share dtype and width; got {a.dtype}{a.shape} and "
        f"{b.dtype}{b.shape}"
    )


def _hamming(a: jax.Array, b: jax.Array) -> jax.Array:
  """`[Q, W] x [N, W] -> [Q, N]` int32 Hamming distances."""
  xor = jnp.bitwise_xor(a[:, None, :], b[None, :, :])
  return jnp.sum(jax.lax.population_count(xor), axis=-1, dtype=jnp.int32)


@jax.jit
def hamming_distance(
    a: Integer[_AnyArray, "q w"], b: Integer[_AnyArray, "n w"]
) -> Int[Array, "q n"]:
  """All-pairs Hamming distances between packed codes (popcount of XOR)."""
  _check_codes("Codes", a, b)
  return _hamming(a, b)


@functools.partial(jax.jit, static_argnames=("k", "block_size"))
def hamming_search(
    query_codes: Integer[_AnyArray, "q w"],
    doc_codes: Integer[_AnyArray, "n w"],
    k: int,
    *,
    block_size: int | None = None,
) -> tuple[Int[Array, "q k"], Int[Array, "q k"]]:
  """The `k` documents with the smallest Hamming distance to each query.

  Args:
    query_codes: `[Q, W]` packed query bits.
    doc_codes: `[N, W]` packed document bits (same dtype).
    k: Results per query (static), `1 <= k <= N`.
    block_size: Documents per streaming step (static), or None.

  Returns:
    `(distances, indices)`, `[Q, k]` int32, distances ascending, ties by
    lower index.

  Raises:
    ValueError: On mismatched codes, `k` or `block_size`.
  """
  _check_codes("Query and document codes", query_codes, doc_codes)
  _check_k(k, doc_codes.shape[0])
  _check_block_size(block_size)
  neg, indices = search.streamed_topk(
      lambda q, d: -_hamming(q, d), query_codes, doc_codes, k, block_size
  )
  return -neg, indices


def binary_search(
    queries: Float[_AnyArray, "q d"],
    doc_codes: Integer[_AnyArray, "n w"],
    k: int,
    *,
    num_candidates: int | None = None,
    doc_vectors: Float[_AnyArray, "n d"] | None = None,
    block_size: int | None = None,
) -> tuple[Float[Array, "q k"], Int[Array, "q k"]]:
  """Hamming candidates, then a float rerank.

  Args:
    queries: `[Q, D]` float queries; their sign bits are packed like the
      documents'.
    doc_codes: `[N, W]` packed document bits (`pack_bits`).
    k: Results per query, `1 <= k <= num_candidates`.
    num_candidates: Hamming candidates per query (default `min(N, 10 k)`).
    doc_vectors: Optional `[N, D]` float documents for the rerank; a numpy
      array (or memory map) is gathered on the host, only for the
      candidates. Without it the rerank scores `<q, signs(doc)>`.
    block_size: Streaming block for the Hamming stage.

  Returns:
    `(scores, indices)`, `[Q, k]`: rerank scores descending (ties by lower
    index) and int32 document indices.

  Raises:
    ValueError: On shape mismatches or out-of-range `k` / candidates.
  """
  num_docs, width = doc_codes.shape
  dim = queries.shape[1]
  if width != -(-dim // (8 * jnp.dtype(doc_codes.dtype).itemsize)):
    raise ValueError(
        f"{width} {doc_codes.dtype} words cannot hold the sign bits of "
        f"{dim}-d queries"
    )
  if num_candidates is None:
    num_candidates = min(num_docs, 10 * k)
  _check_k(num_candidates, num_docs)
  if not 1 <= k <= num_candidates:
    raise ValueError(
        f"Need 1 <= k <= num_candidates = {num_candidates}; got k = {k}"
    )
  if doc_vectors is not None and doc_vectors.shape != (num_docs, dim):
    raise ValueError(
        f"doc_vectors must be [N, D] = {(num_docs, dim)}; got "
        f"{doc_vectors.shape}"
    )
  query_codes = pack_bits(queries, doc_codes.dtype)
  _, candidates = hamming_search(
      query_codes, doc_codes, num_candidates, block_size=block_size
  )
  if doc_vectors is None:
    vectors = unpack_signs(jnp.asarray(doc_codes)[candidates], dim)
  elif isinstance(doc_vectors, np.ndarray):
    vectors = doc_vectors[np.asarray(candidates)]  # Host gather.
  else:
    vectors = doc_vectors[candidates]
  return _rerank(queries, vectors, candidates, k)


@functools.partial(jax.jit, static_argnames=("k",))
def _rerank(queries, vectors, candidates, k):
  scores = jnp.einsum(
      "qd,qcd->qc",
      queries,
      vectors,
      precision=jax.lax.Precision.HIGHEST,
      preferred_element_type=jnp.float32,
  )
  return _topk_by_score_then_index(scores, candidates, k)


# ----------------------------------------------------------------------------
# int8 scalar quantisation.


class Int8Index(NamedTuple):
  """Scalar-quantised documents: `x ~ scale * codes`.

  Attributes:
    codes: `[N, D]` int8 in `[-127, 127]`.
    scale: `[D]` float32 per-dimension scales (all equal for a global
      scale).
  """

  codes: jax.Array
  scale: jax.Array


def int8_quantize(
    x: Float[_AnyArray, "n d"],
    *,
    per_dimension: bool = True,
    quantile: float | int = 1.0,
) -> Int8Index:
  """Symmetric int8 quantisation of document vectors.

  Args:
    x: `[N, D]` float vectors.
    per_dimension: One scale per dimension (default) or one for all.
    quantile: The scale maps this quantile of `|x|` (per dimension or
      global) to 127; `1.0` is absmax, smaller values clip outliers.

  Returns:
    An `Int8Index`.

  Raises:
    ValueError: If `quantile` is not in `(0, 1]`.
  """
  if not 0.0 < quantile <= 1.0:
    raise ValueError(f"quantile must be in (0, 1]; got {quantile}")
  return _int8_quantize(jnp.asarray(x), per_dimension, float(quantile))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _int8_quantize(x, per_dimension, quantile):
  x = x.astype(jnp.float32)
  axis = 0 if per_dimension else None
  magnitude = jnp.abs(x)
  if quantile == 1.0:
    limit = jnp.max(magnitude, axis=axis)
  else:
    limit = jnp.quantile(magnitude, quantile, axis=axis)
  limit = jnp.broadcast_to(limit, x.shape[1:])
  scale = jnp.where(limit > 0, limit / 127.0, 1.0)
  codes = jnp.clip(jnp.round(x / scale[None, :]), -127, 127).astype(jnp.int8)
  return Int8Index(codes=codes, scale=scale)


@jax.jit
def int8_dequantize(index: Int8Index) -> Float[Array, "n d"]:
  """`scale * codes` as float32 `[N, D]`."""
  return index.codes.astype(jnp.float32) * index.scale[None, :]


@jax.jit
def int8_quantize_queries(
    queries: Float[_AnyArray, "q d"], scale: Float[_AnyArray, "d"]
) -> tuple[Shaped[Array, "q d"], Float[Array, "q"]]:
  """Queries for `int8_search`: `q * scale ~ t * e`, `e` int8 per row.

  Args:
    queries: `[Q, D]` float queries.
    scale: The documents' `[D]` scales.

  Returns:
    `(e, t)`: int8 `[Q, D]` codes and float32 `[Q]` scales, so that
    `<q, scale * c> ~ t * <e, c>` for document codes `c`.
  """
  y = queries.astype(jnp.float32) * scale[None, :]
  limit = jnp.max(jnp.abs(y), axis=1)
  t = jnp.where(limit > 0, limit / 127.0, 1.0)
  e = jnp.clip(jnp.round(y / t[:, None]), -127, 127).astype(jnp.int8)
  return e, t


def _int8_dot(e: jax.Array, c: jax.Array) -> jax.Array:
  return jax.lax.dot_general(
      e, c, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32
  )


@functools.partial(jax.jit, static_argnames=("k", "block_size"))
def int8_search(
    queries: Float[_AnyArray, "q d"],
    index: Int8Index,
    k: int,
    *,
    block_size: int | None = None,
) -> tuple[Float[Array, "q k"], Int[Array, "q k"]]:
  """Top-`k` by int8 x int8 dot products accumulated in int32.

  Args:
    queries: `[Q, D]` float queries.
    index: From `int8_quantize`.
    k: Results per query (static), `1 <= k <= N`.
    block_size: Documents per streaming step (static), or None.

  Returns:
    `(scores, indices)`, `[Q, k]`: approximate inner products `t * <e, c>`
    (descending; the ranking and its ties, lower index first, are those of
    the int32 dot products) and int32 indices.

  Raises:
    ValueError: On mismatched dimensions, `k` or `block_size`.
  """
  if queries.shape[1] != index.codes.shape[1]:
    raise ValueError(
        f"queries are {queries.shape[1]}-d, the index {index.codes.shape[1]}-d"
    )
  _check_k(k, index.codes.shape[0])
  _check_block_size(block_size)
  e, t = int8_quantize_queries(queries, index.scale)
  dots, indices = search.streamed_topk(
      _int8_dot, e, index.codes, k, block_size
  )
  return t[:, None] * dots.astype(jnp.float32), indices


# ----------------------------------------------------------------------------
# Product quantisation.


class PQIndex(NamedTuple):
  """Product-quantised documents.

  Attributes:
    codebooks: `[M, K, D / M]` float32 centroids per subspace.
    codes: `[N, M]` centroid ids (uint8 when `K <= 256`).
  """

  codebooks: jax.Array
  codes: jax.Array


@functools.partial(jax.jit, static_argnames=("num_clusters", "num_iters"))
def kmeans(
    x: Float[_AnyArray, "n d"],
    key: jax.Array,
    num_clusters: int,
    num_iters: int = 25,
) -> tuple[Float[Array, "c d"], Int[Array, "n"]]:
  """Lloyd's k-means with a fixed iteration count (jit-compiled).

  Centroids start at `num_clusters` distinct points drawn with `key`;
  an empty cluster keeps its previous centroid; assignment ties go to the
  lower centroid index.

  Args:
    x: `[N, D]` points, `N >= num_clusters`.
    key: PRNG key for the initial draw.
    num_clusters: `K` (static).
    num_iters: Update steps (static).

  Returns:
    `(centroids [K, D], assignments [N])` (int32, for the final centroids).

  Raises:
    ValueError: If `N < num_clusters` or either count is not positive.
  """
  num_points = x.shape[0]
  if num_clusters < 1 or num_iters < 0:
    raise ValueError(
        f"Need num_clusters >= 1 and num_iters >= 0; got {num_clusters}, "
        f"{num_iters}"
    )
  if num_points < num_clusters:
    raise ValueError(
        f"k-means needs at least num_clusters = {num_clusters} points; got "
        f"{num_points}"
    )
  x = jnp.asarray(x, jnp.float32)
  init = jax.random.choice(key, num_points, (num_clusters,), replace=False)
  centroids = x[init]

  def step(_, c):
    assign = _nearest(x, c)
    sums = jax.ops.segment_sum(x, assign, num_segments=num_clusters)
    counts = jax.ops.segment_sum(
        jnp.ones((num_points,), jnp.float32), assign,
        num_segments=num_clusters,
    )
    return jnp.where(
        (counts > 0)[:, None], sums / jnp.maximum(counts, 1.0)[:, None], c
    )

  centroids = jax.lax.fori_loop(0, num_iters, step, centroids)
  return centroids, _nearest(x, centroids)


def _nearest(x: jax.Array, centroids: jax.Array) -> jax.Array:
  """Index of the nearest centroid (squared L2) per row; ties: lower."""
  cross = jnp.einsum(
      "nd,kd->nk", x, centroids, precision=jax.lax.Precision.HIGHEST
  )
  dist = jnp.sum(centroids**2, axis=1)[None, :] - 2.0 * cross
  return jnp.argmin(dist, axis=1).astype(jnp.int32)


def _split(x: jax.Array, num_subspaces: int) -> jax.Array:
  """`[N, D] -> [M, N, D / M]`."""
  n, d = x.shape
  return jnp.transpose(x.reshape(n, num_subspaces, d // num_subspaces),
                       (1, 0, 2))


def _code_dtype(num_centroids: int):
  return jnp.uint8 if num_centroids <= 256 else jnp.int32


def train_pq(
    x: Float[_AnyArray, "n d"],
    num_subspaces: int,
    *,
    num_centroids: int = 256,
    num_iters: int = 25,
    key: jax.Array | None = None,
) -> PQIndex:
  """Trains PQ codebooks by k-means per subspace and encodes `x`.

  Args:
    x: `[N, D]` training vectors (usually the corpus itself),
      `N >= num_centroids`.
    num_subspaces: `M`; must divide `D`.
    num_centroids: `K` centroids per subspace (`<= 256` gives uint8 codes).
    num_iters: k-means iterations.
    key: PRNG key (default `jax.random.key(0)`).

  Returns:
    A `PQIndex` with the codebooks and the codes of `x`.

  Raises:
    ValueError: If `M` does not divide `D`, or `N < num_centroids`.
  """
  x = jnp.asarray(x, jnp.float32)
  dim = x.shape[1]
  if num_subspaces < 1 or dim % num_subspaces:
    raise ValueError(
        f"num_subspaces must divide the dimension {dim}; got {num_subspaces}"
    )
  key = jax.random.key(0) if key is None else key
  keys = jax.random.split(key, num_subspaces)
  codebooks, _ = jax.vmap(
      lambda xs, k: kmeans(xs, k, num_centroids, num_iters)
  )(_split(x, num_subspaces), keys)
  return PQIndex(codebooks=codebooks, codes=pq_encode(x, codebooks))


def _check_pq_dim(what: str, dim: int, codebooks: jax.Array) -> None:
  num_subspaces, _, sub_dim = codebooks.shape
  if dim != num_subspaces * sub_dim:
    raise ValueError(
        f"{what} are {dim}-d; codebooks {codebooks.shape} are "
        f"{num_subspaces * sub_dim}-d"
    )


@jax.jit
def pq_encode(
    x: Float[_AnyArray, "n d"], codebooks: Float[_AnyArray, "m k s"]
) -> Integer[Array, "n m"]:
  """Nearest centroid per subspace: `[N, M]` codes (uint8 when K <= 256)."""
  num_subspaces, num_centroids, _ = codebooks.shape
  _check_pq_dim("Vectors", x.shape[1], codebooks)
  parts = _split(jnp.asarray(x, jnp.float32), num_subspaces)
  codes = jax.vmap(_nearest)(parts, codebooks)  # [M, N]
  return codes.T.astype(_code_dtype(num_centroids))


@jax.jit
def pq_decode(
    codes: Integer[_AnyArray, "n _m"], codebooks: Float[_AnyArray, "m k s"]
) -> Float[Array, "n d"]:
  """Reconstruction `[N, M * D/M]`: concatenated centroids (differentiable in
  `codebooks`: the lookup's gradient reaches the centroids used)."""
  num_subspaces = codebooks.shape[0]
  if codes.shape[-1] != num_subspaces:
    raise ValueError(
        f"codes have {codes.shape[-1]} subspaces, codebooks {num_subspaces}"
    )
  parts = codebooks[
      jnp.arange(num_subspaces)[None, :], codes.astype(jnp.int32)
  ]  # [N, M, D/M]
  return parts.reshape(codes.shape[0], -1)


@jax.jit
def adc_tables(
    queries: Float[_AnyArray, "q d"], codebooks: Float[_AnyArray, "m k s"]
) -> Float[Array, "q m k"]:
  """ADC lookup tables: `<query subvector m, centroid (m, j)>`."""
  num_subspaces, _, sub_dim = codebooks.shape
  _check_pq_dim("queries", queries.shape[1], codebooks)
  parts = queries.reshape(queries.shape[0], num_subspaces, sub_dim)
  return jnp.einsum(
      "qms,mks->qmk",
      parts.astype(jnp.float32),
      codebooks,
      precision=jax.lax.Precision.HIGHEST,
  )


def _adc(tables: jax.Array, codes: jax.Array) -> jax.Array:
  """`[Q, M, K] x [N, M] -> [Q, N]`: sum over m of tables[q, m, codes]."""
  num_queries, num_subspaces, num_centroids = tables.shape
  flat = tables.reshape(num_queries, num_subspaces * num_centroids)
  positions = codes.astype(jnp.int32) + (
      num_centroids * jnp.arange(num_subspaces, dtype=jnp.int32)
  )[None, :]

  def add(m, acc):
    return acc + jnp.take(flat, positions[:, m], axis=1)

  return jax.lax.fori_loop(
      0, num_subspaces, add,
      jnp.zeros((num_queries, codes.shape[0]), jnp.float32),
  )


@jax.jit
def adc_scores(
    tables: Float[_AnyArray, "q m k"], codes: Integer[_AnyArray, "n m"]
) -> Float[Array, "q n"]:
  """Asymmetric scores `<q, decode(code)>` from the lookup tables."""
  if codes.shape[1] != tables.shape[1]:
    raise ValueError(
        f"codes have {codes.shape[1]} subspaces, tables {tables.shape[1]}"
    )
  return _adc(jnp.asarray(tables), jnp.asarray(codes))


@functools.partial(jax.jit, static_argnames=("k", "block_size"))
def pq_search(
    queries: Float[_AnyArray, "q d"],
    index: PQIndex,
    k: int,
    *,
    block_size: int | None = None,
) -> tuple[Float[Array, "q k"], Int[Array, "q k"]]:
  """Top-`k` by ADC inner products.

  Args:
    queries: `[Q, D]` float queries.
    index: From `train_pq` (or codebooks + `pq_encode`).
    k: Results per query (static), `1 <= k <= N`.
    block_size: Documents per streaming step (static), or None.

  Returns:
    `(scores, indices)`, `[Q, k]`: ADC scores descending (ties by lower
    index), int32 indices.

  Raises:
    ValueError: On mismatched shapes, `k` or `block_size`.
  """
  _check_k(k, index.codes.shape[0])
  _check_block_size(block_size)
  tables = adc_tables(queries, index.codebooks)
  return search.streamed_topk(
      _adc, tables, index.codes, k, block_size
  )


# ----------------------------------------------------------------------------
# JPQ: joint training of centroids and query encoder.


def quantize_straight_through(
    x: Float[_AnyArray, "n d"], codebooks: Float[_AnyArray, "m k s"]
) -> tuple[Float[Array, "n d"], Integer[Array, "n m"]]:
  """PQ reconstruction with a straight-through gradient to `x`.

  Args:
    x: `[N, D]` vectors (e.g. a document encoder's output).
    codebooks: `[M, K, D/M]` centroids.

  Returns:
    `(x_hat, codes)`: `x_hat` equals `pq_decode(pq_encode(x))`; its
    gradient flows to the used centroids and, unchanged, to `x`.
  """
  codes = pq_encode(jax.lax.stop_gradient(x), jax.lax.stop_gradient(codebooks))
  decoded = pq_decode(codes, codebooks)
  return decoded + (x - jax.lax.stop_gradient(x)), codes


def jpq_loss(
    query_embeddings: Float[Array, "b d"],
    codebooks: Float[Array, "m k s"],
    positive_codes: Integer[_AnyArray, "b m"],
    negative_codes: Integer[_AnyArray, "b n m"] | None = None,
    *,
    scale: jax.typing.ArrayLike = 20.0,
    in_batch: bool = True,
    loss: Literal["softmax", "pairwise"] = "softmax",
) -> Float[Array, ""]:
  """Ranking loss of queries against PQ-reconstructed documents.

  Documents enter only through their fixed codes; their embeddings are
  `pq_decode(codes, codebooks)`, so the gradient reaches the centroids
  (and the query encoder through `query_embeddings`).

  Args:
    query_embeddings: `[B, D]` queries (from the trainable encoder).
    codebooks: `[M, K, D/M]` trainable centroids.
    positive_codes: `[B, M]` codes of each query's positive document.
    negative_codes: Optional `[B, N, M]` codes of hard negatives (e.g. from
      `jpq_negatives`).
    scale: Multiplies the scores (inverse temperature).
    in_batch: Also use the other queries' positives as negatives
      (softmax only).
    loss: `"softmax"`: cross-entropy of the positive against all
      negatives; `"pairwise"`: mean over (positive, hard negative) pairs of
      `softplus(scale * (s_neg - s_pos))` (RankNet, as JPQ/ADORE).

  Returns:
    The scalar loss, averaged over the batch.

  Raises:
    ValueError: On an unknown `loss`, or `"pairwise"` without negatives.
  """
  if loss not in ("softmax", "pairwise"):
    raise ValueError(f"loss must be 'softmax' or 'pairwise'; got {loss!r}")
  if loss == "pairwise" and negative_codes is None:
    raise ValueError("The pairwise loss needs negative_codes")
  batch = query_embeddings.shape[0]
  positives = pq_decode(positive_codes, codebooks)  # [B, D]
  q = query_embeddings.astype(jnp.float32)
  pos = jnp.sum(q * positives, axis=1)  # [B]
  columns = [pos[:, None]]
  if negative_codes is not None:
    num_neg = negative_codes.shape[1]
    negatives = pq_decode(
        negative_codes.reshape(batch * num_neg, -1), codebooks
    ).reshape(batch, num_neg, -1)
    neg = jnp.einsum("bd,bnd->bn", q, negatives)
    if loss == "pairwise":
      return jnp.mean(jax.nn.softplus(scale * (neg - pos[:, None])))
    columns.append(neg)
  if in_batch:
    cross = q @ positives.T  # [B, B]; the diagonal is `pos`.
    off = ~jnp.eye(batch, dtype=bool)
    columns.append(jnp.where(off, cross, -jnp.inf))
  logits = scale * jnp.concatenate(columns, axis=1)
  return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[:, 0])


def jpq_negatives(
    query_embeddings: Float[_AnyArray, "b d"],
    index: PQIndex,
    positives: Int[_AnyArray, "b"],
    num_negatives: int,
    *,
    block_size: int | None = None,
) -> Int[Array, "b nn"]:
  """Hard negatives from the current PQ index (end-to-end sampling).

  Args:
    query_embeddings: `[B, D]` queries from the current encoder.
    index: The PQ index with the current codebooks.
    positives: `[B]` each query's positive document index (left out).
    num_negatives: Negatives per query (`< N`).
    block_size: Streaming block for the search.

  Returns:
    `[B, num_negatives]` int32 document indices: the top-ranked documents
    other than the positive, in rank order.

  Raises:
    ValueError: If `num_negatives` is not in `[1, N)`.
  """
  num_docs = index.codes.shape[0]
  if not 1 <= num_negatives < num_docs:
    raise ValueError(
        f"Need 1 <= num_negatives < N = {num_docs}; got {num_negatives}"
    )
  _, top = pq_search(
      query_embeddings, index, num_negatives + 1, block_size=block_size
  )
  is_positive = top == jnp.asarray(positives)[:, None]
  order = jnp.argsort(is_positive, axis=1, stable=True)
  return jnp.take_along_axis(top, order, axis=1)[:, :num_negatives]
