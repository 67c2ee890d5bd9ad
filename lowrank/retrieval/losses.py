"""Contrastive losses for bi-encoders (pure functions).

Scores are `[num_queries, num_docs]`; labels follow optax's ranking
convention, so the in-batch softmax loss is
`optax.losses.ranking_softmax_loss(scores, jnp.eye(B))` up to the mean.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def _masked_self_scores(x: jax.Array, scale) -> jax.Array:
  """`scale · x xᵀ` with the diagonal (an item against itself) at -inf."""
  s = (x @ x.T).astype(jnp.float32) * scale
  n = x.shape[0]
  return jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, s)


def in_batch_softmax(
    q: Float[Array, "b d"],
    d: Float[Array, "n d"],
    scale: float | int | jax.Array = 20.0,
    *,
    symmetric: bool = False,
    same_side: bool = False,
) -> Float[Array, ""]:
  """InfoNCE with in-batch negatives (MultipleNegativesRankingLoss).

  Query `i`'s positive is document `i`; every other document in the batch
  (and any extra hard negatives appended after the first `b`) is a negative.

  With `same_side`, the other *queries* of the batch are negatives of query
  `i` as well (and, with `symmetric`, the other documents are negatives of
  document `i`): the "improved contrastive loss" of GTE (Li et al. 2023,
  https://arxiv.org/abs/2308.03281), written per direction. For query `i`
  with `s = scale · cosine`:

      -log  e^{s(q_i,d_i)} / (Σ_j e^{s(q_i,d_j)} + Σ_{j≠i} e^{s(q_i,q_j)})

  and the document direction (`symmetric`) is, over the first `b` documents
  as anchors and all `n` documents as same-side negatives,

      -log  e^{s(d_i,q_i)} / (Σ_j e^{s(d_i,q_j)} + Σ_{j≠i} e^{s(d_i,d_j)}).

  With `symmetric` the result is the mean of the two directions.

  Args:
    q: Query embeddings `[b, d]` (L2-normalised for cosine similarity).
    d: Document embeddings `[n, d]`, `n >= b`; rows `0..b-1` are positives.
    scale: Logit scale (1 / temperature); may be a traced scalar (e.g. a
      learned `BiEncoder` scale).
    symmetric: Also add the document-to-query term over the first `b` docs.
    same_side: Add same-side negatives (query–query, document–document).

  Returns:
    The mean cross-entropy, a scalar.

  Raises:
    ValueError: If there are fewer documents than queries.
  """
  b = q.shape[0]
  if d.shape[0] < b:
    raise ValueError(f"Need at least {b} documents; got {d.shape[0]}.")
  scores = (q @ d.T).astype(jnp.float32) * scale
  labels = jnp.arange(b)
  logits = scores
  if same_side:
    logits = jnp.concatenate([scores, _masked_self_scores(q, scale)], axis=1)
  logp = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.mean(logp[labels, labels])
  if symmetric:
    logits_t = scores[:, :b].T
    if same_side:
      logits_t = jnp.concatenate(
          [logits_t, _masked_self_scores(d, scale)[:b]], axis=1
      )
    logp_t = jax.nn.log_softmax(logits_t, axis=-1)
    loss = 0.5 * (loss - jnp.mean(logp_t[labels, labels]))
  return loss


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  x32 = x.astype(jnp.float32)
  return x32 / jnp.maximum(jnp.linalg.norm(x32, axis=-1, keepdims=True), eps)


def matryoshka(
    loss_fn,
    q: Float[Array, "b dim"],
    d: Float[Array, "n dim"],
    dims,
    weights=None,
    *,
    normalize: bool = True,
) -> Float[Array, ""]:
  """Matryoshka representation loss: `Σ_m w_m · loss_fn(q[:, :m], d[:, :m])`.

  Each prefix of the embeddings is truncated and (by default) L2-renormalised
  before `loss_fn`, so after training any prefix size in `dims` is a usable
  embedding (Kusupati et al. 2022, https://arxiv.org/abs/2205.13147).

  Args:
    loss_fn: `(q, d) -> scalar`, e.g. `functools.partial(in_batch_softmax,
      scale=20.0)`.
    q: Query embeddings `[b, dim]` (unnormalised is fine).
    d: Document embeddings `[n, dim]`.
    dims: Prefix sizes, each in `[1, dim]` (e.g. `(384, 256, 128, 64, 32)`).
    weights: One weight per prefix (default all 1).
    normalize: Renormalise each truncated prefix.

  Returns:
    The weighted sum of the per-prefix losses.

  Raises:
    ValueError: On an empty `dims`, a prefix size out of range, or a weight
      count that differs from `len(dims)`.
  """
  dims = tuple(int(m) for m in dims)
  full = q.shape[-1]
  if not dims or any(not 1 <= m <= full for m in dims):
    raise ValueError(f"dims must be non-empty sizes in [1, {full}]; got {dims}.")
  weights = (1.0,) * len(dims) if weights is None else tuple(weights)
  if len(weights) != len(dims):
    raise ValueError(
        f"Got {len(weights)} weights for {len(dims)} dims {dims}."
    )
  total = jnp.zeros((), jnp.float32)
  for m, w in zip(dims, weights):
    qm, dm = q[:, :m], d[:, :m]
    if normalize:
      qm, dm = l2_normalize(qm), l2_normalize(dm)
    total = total + w * loss_fn(qm, dm)
  return total


def gathered_in_batch_softmax(
    q: Float[Array, "b dim"],
    d: Float[Array, "n dim"],
    scale: float | int | jax.Array = 20.0,
    *,
    axis_name: str | tuple[str, ...],
) -> Float[Array, ""]:
  """In-batch softmax with negatives gathered from every device.

  For use inside `jax.shard_map` where each device holds a shard of the
  batch: documents are all-gathered over `axis_name`, so every query sees the
  global batch as negatives, and query `i` on shard `k` has its positive at
  global index `k·b + i`. The result is the mean over the local queries;
  averaging it over `axis_name` (`jax.lax.pmean`) gives the global loss,
  equal to `in_batch_softmax` on the unsharded batch (tested).

  Under plain `jax.jit` with sharded global arrays none of this is needed:
  `in_batch_softmax` on the global batch already uses all documents and XLA
  inserts the gather.

  Args:
    q: Local queries `[b, dim]`.
    d: Local documents `[b, dim]` (positives; hard negatives are not
      supported here: append them locally after the gather if needed).
    scale: Logit scale.
    axis_name: Mesh axis (or axes) the batch is sharded over.

  Returns:
    The local mean cross-entropy.
  """
  b = q.shape[0]
  if d.shape[0] != b:
    raise ValueError(
        f"Expected one positive document per query ({b}); got {d.shape[0]}."
    )
  d_all = jax.lax.all_gather(d, axis_name, tiled=True)
  scores = (q @ d_all.T).astype(jnp.float32) * scale
  offset = jax.lax.axis_index(axis_name) * b
  labels = offset + jnp.arange(b)
  logp = jax.nn.log_softmax(scores, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def grad_cache(
    encode_fn,
    loss_fn,
    params,
    queries,
    documents,
    *,
    chunk_size: int,
    has_aux: bool = False,
):
  """Loss and parameter gradients of a contrastive loss, computed in chunks.

  GradCache (Gao et al. 2021, https://arxiv.org/abs/2101.06983): the
  contrastive loss couples every example of the batch, so its activations
  normally have to fit at once. Instead:

  1. embed all queries and documents chunk by chunk without keeping
     activations;
  2. compute the loss and its gradient with respect to the embeddings only;
  3. re-run each chunk's encoder under `jax.vjp` and pull the cached
     embedding gradient back into the parameters, accumulating.

  Steps 1 and 3 run under `jax.lax.scan`, so peak activation memory is one
  chunk's (plus the `[B, dim]` embeddings), at the cost of one extra forward
  pass. The gradients equal those of the uncached loss (tested) as long as
  the encoder is deterministic (no dropout, or the same dropout key for both
  passes).

  Args:
    encode_fn: `(params, batch_chunk) -> embeddings [chunk, dim]`.
    loss_fn: `(q_emb [B, dim], d_emb [N, dim]) -> scalar` (or
      `(scalar, aux)` with `has_aux`).
    params: Differentiated pytree.
    queries: Pytree of arrays with leading dim `B` (e.g. token ids, mask).
    documents: Pytree of arrays with leading dim `N`.
    chunk_size: Examples per chunk; must divide `B` and `N`.
    has_aux: Whether `loss_fn` returns `(loss, aux)`.

  Returns:
    `(loss, grads)` or `((loss, aux), grads)` with `has_aux`, like
    `jax.value_and_grad`.

  Raises:
    ValueError: If `chunk_size` does not divide the batch sizes.
  """

  def chunks(tree):
    n = jax.tree.leaves(tree)[0].shape[0]
    if chunk_size <= 0 or n % chunk_size:
      raise ValueError(
          f"chunk_size {chunk_size} must be positive and divide the batch "
          f"size {n}."
      )
    return jax.tree.map(
        lambda x: x.reshape((n // chunk_size, chunk_size) + x.shape[1:]), tree
    ), n

  def embed_all(batch):
    cb, n = chunks(batch)
    _, reps = jax.lax.scan(
        lambda c, x: (c, jax.lax.stop_gradient(encode_fn(params, x))),
        None, cb,
    )
    return reps.reshape((n,) + reps.shape[2:]), cb

  q_reps, q_chunks = embed_all(queries)
  d_reps, d_chunks = embed_all(documents)
  out, (g_q, g_d) = jax.value_and_grad(loss_fn, argnums=(0, 1),
                                       has_aux=has_aux)(q_reps, d_reps)

  def pull_back(batch_chunks, g):
    n_chunks = jax.tree.leaves(batch_chunks)[0].shape[0]
    g = g.reshape((n_chunks, chunk_size) + g.shape[1:])

    def body(acc, xs):
      x, gx = xs
      _, vjp = jax.vjp(lambda p: encode_fn(p, x), params)
      (gp,) = vjp(gx)
      return jax.tree.map(jnp.add, acc, gp), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    acc, _ = jax.lax.scan(body, zeros, (batch_chunks, g))
    return acc

  grads = jax.tree.map(
      jnp.add, pull_back(q_chunks, g_q), pull_back(d_chunks, g_d)
  )
  return out, grads
