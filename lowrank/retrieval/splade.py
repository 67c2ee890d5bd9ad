"""SPLADE learned sparse representations, regularisers and losses.

SPLADE (Formal et al. 2021, https://arxiv.org/abs/2107.05720; SPLADE++,
https://arxiv.org/abs/2205.04733) maps a text to a vocabulary-sized vector of
non-negative term weights with a BERT masked-LM head:

    w_j = max_i log(1 + relu(logits_ij))      (SPLADE v2 / ++ "max" pooling)

over the valid (non-padding) tokens `i` (SPLADE v1 summed instead; pass
`max_pool=False`). Query and document vectors are compared by a dot product,
so retrieval runs on an inverted index (`lowrank.retrieval.sparse_index`).

Regularisers (naver/splade `losses/regularization.py`), on a batch `w [B, V]`:

- `flops(w) = sum_j (mean_i |w_ij|)^2` (Paria et al. 2020,
  https://arxiv.org/abs/2004.05665): penalises terms that are active in many
  rows, i.e. long posting lists;
- `l1(w) = mean_i sum_j |w_ij|`; `l0(w)` (number of non-zeros, monitoring);
- `idf_flops(w, idf) = sum_j (mean_i |w_ij| / idf_j)^2`, the IDF-aware FLOPS
  of Geng et al. 2024, "Towards Competitive Search Relevance For
  Inference-Free Learned Sparse Retrievers" (https://arxiv.org/abs/2411.04403).
  There the IDF enters the matching function: a query is a bag of tokens
  weighted by `idf`, `s(q, d) = sum_t idf_t 1[t in q] u_dt`, and FLOPS is
  applied to the document encoder's output `u`. Written in terms of the
  score-side weights `w_dt = idf_t u_dt` (what the dot product sees), that
  penalty is `idf_flops(w, idf)`: a term's penalty per unit of score scales
  as `1 / idf_t^2`, so frequent (low-IDF) terms are pruned first and rare,
  informative terms are spared. `idf_flops(idf * u, idf) == flops(u)`.

The regulariser weights grow quadratically from 0 (naver/splade's
`RegWeightScheduler`): `lambda_t = lambda * min(1, t / T)^2`, with separate
`lambda_q` and `lambda_d` (SPLADE++ EnsembleDistil: 0.5 / 0.4, `T = 50000`).

Inference-free mode (SPLADE-doc, OpenSearch's doc-v2 models): documents go
through the model, queries do not; `lookup_query` turns query token ids into
a vector of per-token weights (IDF from `token_idf`, or a learned table)
with no transformer at all.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import functools
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Shaped
import numpy as np

from lowrank.models import bert
from lowrank.models import encoding
from lowrank.retrieval import losses
from lowrank.retrieval import sparse_index

_AnyArray = jax.Array | np.ndarray


# ----------------------------------------------------------------------------
# Encoding.


def encode(
    model: bert.BertModel,
    batch: Mapping[str, Any],
    *,
    max_pool: bool = True,
    token_chunk: int | None = None,
) -> Float[Array, "b v"]:
  """SPLADE term weights `[B, V]` of a tokenized batch; jittable.

  `w_bj = max_i mask_bi * log(1 + relu(mlm_logits_bij))` (or the sum over
  `i` when `max_pool=False`). Padding tokens contribute 0; since the weights
  are non-negative, masking by multiplication is exact for the max.

  Args:
    model: A `BertModel` with an MLM head (`config.add_mlm_head`).
    batch: `{"input_ids", "attention_mask"[, "token_type_ids"]}`, `[B, L]`.
    max_pool: Max over tokens (SPLADE v2/++); `False` sums (SPLADE v1).
    token_chunk: Compute the `[B, chunk, V]` MLM logits this many positions
      at a time (a static Python loop), so peak memory is `B * chunk * V`
      floats instead of `B * L * V`. `None`: all positions at once.

  Returns:
    Float32 `[B, V]` non-negative term weights.

  Raises:
    ValueError: If the model has no MLM head or `token_chunk < 1`.
  """
  if token_chunk is not None and token_chunk < 1:
    raise ValueError(f"token_chunk must be >= 1; got {token_chunk}.")
  mask = jnp.asarray(batch["attention_mask"]) != 0
  hidden = model(
      batch["input_ids"],
      attention_mask=batch["attention_mask"],
      token_type_ids=batch.get("token_type_ids"),
  )
  length = hidden.shape[1]
  chunk = length if token_chunk is None else min(token_chunk, length)
  out = None
  for start in range(0, length, chunk):  # Static: decided from shapes.
    logits = model.mlm_logits(hidden[:, start:start + chunk])
    weights = jnp.log1p(jax.nn.relu(logits.astype(jnp.float32)))
    weights = jnp.where(mask[:, start:start + chunk, None], weights, 0.0)
    if max_pool:
      part = jnp.max(weights, axis=1)
      out = part if out is None else jnp.maximum(out, part)
    else:
      part = jnp.sum(weights, axis=1)
      out = part if out is None else out + part
  return out


_encode_step = encoding.SplitJit(encode, ("max_pool", "token_chunk"))


def encode_trace_count() -> int:
  """How many times `embed_texts`'s jitted step has been traced."""
  return _encode_step.traces


def embed_texts(
    model: bert.BertModel,
    tokenizer: bert.Tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    max_pool: bool = True,
    threshold: float | int = 0.0,
    top_k: int | None = None,
    token_chunk: int | None = 64,
) -> sparse_index.SparseMatrix:
  """Embeds texts as sparse SPLADE vectors (CSR), jitted and bucketed.

  As `bert.embed_texts`: texts are tokenized once, sorted by length, batched
  (the last batch padded with empty rows) and padded to the smallest of
  `bert.LENGTH_BUCKETS` that fits, so there is one compilation per bucket.
  Each `[batch, V]` result is sparsified on the host with `to_sparse`, so
  the dense `[N, V]` matrix never exists.

  Args:
    model: SPLADE model (BertModel with an MLM head).
    tokenizer: Its tokenizer.
    texts: The texts.
    batch_size: Rows per forward call.
    max_length: Truncation length (default `tokenizer.max_length`, capped at
      `max_position_embeddings`).
    max_pool: See `encode`.
    threshold: Keep weights `> threshold`.
    top_k: Keep at most this many terms per text (default all).
    token_chunk: See `encode`.

  Returns:
    `[len(texts), V]` `SparseMatrix` in the order of `texts`.

  Raises:
    ValueError: On a non-positive `batch_size`.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive; got {batch_size}.")
  texts = list([texts] if isinstance(texts, str) else texts)
  vocab = model.config.vocab_size
  max_length = tokenizer.max_length if max_length is None else max_length
  max_length = min(max_length, model.config.max_position_embeddings)
  rows: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(texts)
  if texts:
    graphdef, state = nnx.split(nnx.view(model, deterministic=True))
    for idx, batch in encoding.bucketed_batches(
        tokenizer, texts, batch_size=batch_size, max_length=max_length):
      weights = _encode_step(graphdef, state, batch=batch, max_pool=max_pool,
                             token_chunk=token_chunk)
      sparse = to_sparse(
          np.asarray(weights[: len(idx)]), threshold=threshold, top_k=top_k
      )
      for i, row in zip(idx, sparse):
        rows[i] = row
  return sparse_index.from_rows(rows, vocab)


def to_sparse(
    weights: Float[_AnyArray, "*b v"],
    *,
    threshold: float | int = 0.0,
    top_k: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per-row non-zero terms of `[B, V]` (or `[V]`) weights, on the host.

  Args:
    weights: Term weights.
    threshold: Keep entries with `weight > threshold`.
    top_k: Keep at most the `top_k` largest entries per row.

  Returns:
    One `(indices int32, values float32)` pair per row, ordered by weight
    descending (ties: lower term id first). A `[V]` input gives one row.

  Raises:
    ValueError: If `top_k < 1`.
  """
  if top_k is not None and top_k < 1:
    raise ValueError(f"top_k must be >= 1; got {top_k}.")
  w = np.asarray(weights, np.float32)
  w = w.reshape(-1, w.shape[-1])
  out = []
  for row in w:
    idx = np.flatnonzero(row > threshold)
    vals = row[idx]
    order = np.lexsort((idx, -vals))
    if top_k is not None:
      order = order[:top_k]
    out.append((idx[order].astype(np.int32), vals[order]))
  return out


def top_terms(
    tokenizer: bert.Tokenizer,
    weights: Float[_AnyArray, "*b v"],
    k: int = 10,
) -> list[list[tuple[str, float]]]:
  """The `k` highest-weighted `(token, weight)` pairs of every row."""
  return [
      [(tokenizer.id_to_token(int(i)), float(v)) for i, v in zip(idx, vals)]
      for idx, vals in to_sparse(weights, top_k=k)
  ]


# ----------------------------------------------------------------------------
# Inference-free queries.


def lookup_query(
    input_ids: Int[_AnyArray, "b l"],
    attention_mask: Shaped[_AnyArray, "b l"],
    token_weights: Float[_AnyArray, " v"],
    *,
    special_ids: Sequence[int] = (),
) -> Float[Array, "b v"]:
  """Inference-free query vectors: a table lookup, no transformer.

  `q_bj = relu(token_weights_j)` if token `j` occurs (unmasked) in query
  `b`, else 0; repeated tokens count once (OpenSearch's inference-free
  encoder). `token_weights` may be fixed IDF values (`token_idf`) or a
  learned parameter (gradients flow into it).

  Args:
    input_ids: `[B, L]` token ids.
    attention_mask: `[B, L]`, nonzero for real tokens.
    token_weights: `[V]` per-token weights.
    special_ids: Token ids that never get a weight ([CLS], [SEP], ...).

  Returns:
    Float32 `[B, V]` query vectors.
  """
  ids = jnp.asarray(input_ids)
  weights = jax.nn.relu(jnp.asarray(token_weights, jnp.float32))
  if special_ids:
    weights = weights.at[jnp.asarray(list(special_ids))].set(0.0)
  valid = jnp.asarray(attention_mask) != 0
  per_token = jnp.where(valid, weights[ids], 0.0)
  rows = jnp.broadcast_to(jnp.arange(ids.shape[0])[:, None], ids.shape)
  out = jnp.zeros((ids.shape[0], weights.shape[0]), jnp.float32)
  return out.at[rows, ids].max(per_token)


def token_idf(
    tokenizer: bert.Tokenizer,
    texts: Sequence[str],
    *,
    max_length: int | None = None,
) -> np.ndarray:
  """Per-token IDF over a corpus, for `lookup_query`.

  `idf_t = log(1 + (N - df_t + 0.5) / (df_t + 0.5))` (the BM25 / Lucene
  IDF, non-negative), with `df_t` the number of texts containing token `t`
  after tokenization (special tokens included; pass them to
  `lookup_query(special_ids=...)` to drop them).

  Args:
    tokenizer: The tokenizer.
    texts: The corpus.
    max_length: Truncation length (default the tokenizer's).

  Returns:
    Float32 `[vocab_size]` IDF values.

  Raises:
    ValueError: If `texts` is empty.
  """
  texts = list(texts)
  if not texts:
    raise ValueError("token_idf needs at least one text.")
  df = np.zeros(tokenizer.vocab_size, np.int64)
  for ids, _ in tokenizer.tokenize_unpadded(texts, max_length=max_length):
    df[np.unique(np.asarray(ids, np.int64))] += 1
  n = len(texts)
  return np.log1p((n - df + 0.5) / (df + 0.5)).astype(np.float32)


# ----------------------------------------------------------------------------
# Regularisers and their schedule.


def flops(weights: Float[Array, "b v"]) -> Float[Array, ""]:
  """FLOPS regulariser `sum_j (mean_i |w_ij|)^2`."""
  return jnp.sum(jnp.mean(jnp.abs(weights), axis=0) ** 2)


def idf_flops(
    weights: Float[Array, "b v"],
    idf: Float[_AnyArray, " v"],
    *,
    eps: float | int = 1e-6,
) -> Float[Array, ""]:
  """IDF-aware FLOPS `sum_j (mean_i |w_ij| / idf_j)^2` (Geng et al. 2024).

  See the module docstring: `weights` are score-side weights (`idf_j`
  times the encoder output), and `idf_flops(idf * u, idf) == flops(u)`.

  Args:
    weights: `[B, V]` term weights.
    idf: `[V]` positive IDF values.
    eps: Lower bound on `idf` (avoids division by zero).

  Returns:
    The scalar penalty.
  """
  idf = jnp.maximum(jnp.asarray(idf, jnp.float32), eps)
  return jnp.sum((jnp.mean(jnp.abs(weights), axis=0) / idf) ** 2)


def l1(weights: Float[Array, "b v"]) -> Float[Array, ""]:
  """L1 regulariser `mean_i sum_j |w_ij|`."""
  return jnp.mean(jnp.sum(jnp.abs(weights), axis=-1))


def l0(weights: Float[Array, "b v"]) -> Float[Array, ""]:
  """Mean number of non-zero terms per row (monitoring, not differentiable)."""
  return jnp.mean(jnp.sum(weights != 0, axis=-1).astype(jnp.float32))


def reg_weight(
    step: jax.typing.ArrayLike,
    lam: jax.typing.ArrayLike,
    warmup_steps: int,
) -> jax.Array:
  """Quadratic warm-up `lam * min(1, step / warmup_steps)^2`; jittable.

  Args:
    step: The training step (1-based as naver/splade counts; may be traced).
    lam: The final weight.
    warmup_steps: `T`; `0` means `lam` from the start.

  Returns:
    The float32 weight at `step`.
  """
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0; got {warmup_steps}.")
  lam = jnp.asarray(lam, jnp.float32)
  if warmup_steps == 0:
    return lam
  frac = jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)
  return lam * frac**2


@dataclasses.dataclass(frozen=True)
class RegWeightScheduler:
  """Separate quadratic warm-ups for the query and document regularisers.

  Attributes:
    lambda_q: Final query regulariser weight (SPLADE++ ED: 0.5).
    lambda_d: Final document regulariser weight (SPLADE++ ED: 0.4).
    warmup_steps_q: `T` for the query weight (SPLADE++: 50000).
    warmup_steps_d: `T` for the document weight (SPLADE++: 50000).
  """

  lambda_q: float | int = 0.5
  lambda_d: float | int = 0.4
  warmup_steps_q: int = 50_000
  warmup_steps_d: int = 50_000

  def __call__(
      self, step: jax.typing.ArrayLike
  ) -> tuple[jax.Array, jax.Array]:
    """`(lambda_q(step), lambda_d(step))`."""
    return (
        reg_weight(step, self.lambda_q, self.warmup_steps_q),
        reg_weight(step, self.lambda_d, self.warmup_steps_d),
    )


# ----------------------------------------------------------------------------
# Loss.

REGULARIZERS = ("flops", "idf_flops", "l1")


def splade_loss(
    q_w: Float[Array, "b v"],
    d_w: Float[Array, "n v"],
    *,
    lambda_q: jax.typing.ArrayLike = 0.0,
    lambda_d: jax.typing.ArrayLike = 0.0,
    regularizer: str = "flops",
    idf: Float[_AnyArray, " v"] | None = None,
    scale: jax.typing.ArrayLike = 1.0,
) -> tuple[Float[Array, ""], dict[str, jax.Array]]:
  """In-batch softmax on sparse dot products plus q / d regularisers.

  `loss = CE(softmax_j(scale * q_i . d_j), j = i) + lambda_q R(q_w) +
  lambda_d R(d_w)`, where rows `b..n-1` of `d_w` are extra (hard) negatives
  shared by all queries and `R` is applied to all `n` document rows. SPLADE
  scores are raw dot products (`scale=1`). For the inference-free mode, pass
  `lookup_query` vectors as `q_w` and `lambda_q=0`.

  Args:
    q_w: `[b, V]` query weights.
    d_w: `[n, V]` document weights, `n >= b`; row `i < b` is query `i`'s
      positive.
    lambda_q: Query regulariser weight (e.g. from `RegWeightScheduler`).
    lambda_d: Document regulariser weight.
    regularizer: `"flops"`, `"idf_flops"` (needs `idf`) or `"l1"`.
    idf: `[V]` IDF values for `"idf_flops"`.
    scale: Logit scale.

  Returns:
    `(loss, aux)`, `aux` holding `rank_loss`, `q_reg`, `d_reg` (unweighted
    regulariser values) and `q_l0`, `d_l0` (mean non-zeros per row).

  Raises:
    ValueError: On an unknown regulariser, `"idf_flops"` without `idf`, or
      fewer documents than queries.
  """
  if regularizer == "flops":
    reg = flops
  elif regularizer == "l1":
    reg = l1
  elif regularizer == "idf_flops":
    if idf is None:
      raise ValueError("regularizer='idf_flops' needs idf.")
    reg = functools.partial(idf_flops, idf=idf)
  else:
    raise ValueError(
        f"Unknown regularizer {regularizer!r}; expected one of "
        f"{REGULARIZERS}."
    )
  rank_loss = losses.in_batch_softmax(q_w, d_w, scale)
  q_reg, d_reg = reg(q_w), reg(d_w)
  loss = rank_loss + lambda_q * q_reg + lambda_d * d_reg
  aux = {
      "rank_loss": rank_loss,
      "q_reg": q_reg,
      "d_reg": d_reg,
      "q_l0": l0(q_w),
      "d_l0": l0(d_w),
  }
  return loss, aux


def expected_flops(
    queries: sparse_index.SparseMatrix, docs: sparse_index.SparseMatrix
) -> float:
  """Average number of multiply-adds per query-document pair.

  `sum_j P(q_j != 0) P(d_j != 0)` over the given queries and documents, the
  efficiency measure SPLADE reports (Formal et al. 2021).

  Raises:
    ValueError: If the vocabularies differ or either matrix has no rows.
  """
  if queries.num_cols != docs.num_cols:
    raise ValueError(
        f"vocabularies differ: {queries.num_cols} vs {docs.num_cols}."
    )
  if not queries.num_rows or not docs.num_rows:
    raise ValueError("expected_flops needs at least one query and document.")

  def active(m):
    nonzero = m.indices[m.values != 0]
    return np.bincount(nonzero, minlength=m.num_cols) / m.num_rows

  return float(math.fsum(active(queries) * active(docs)))
