"""Contrastive losses for bi-encoders (pure functions).

Scores are `[num_queries, num_docs]`; labels follow optax's ranking
convention, so the in-batch softmax loss is
`optax.losses.ranking_softmax_loss(scores, jnp.eye(B))` up to the mean.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def in_batch_softmax(
    q: Float[Array, "b d"],
    d: Float[Array, "n d"],
    scale: float | int | jax.Array = 20.0,
    *,
    symmetric: bool = False,
) -> Float[Array, ""]:
  """InfoNCE with in-batch negatives (MultipleNegativesRankingLoss).

  Query `i`'s positive is document `i`; every other document in the batch
  (and any extra hard negatives appended after the first `b`) is a negative.

  Args:
    q: Query embeddings `[b, d]` (L2-normalised for cosine similarity).
    d: Document embeddings `[n, d]`, `n >= b`; rows `0..b-1` are positives.
    scale: Logit scale (1 / temperature).
    symmetric: Also add the document-to-query term over the first `b` docs.

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
  logp = jax.nn.log_softmax(scores, axis=-1)
  loss = -jnp.mean(logp[labels, labels])
  if symmetric:
    logp_t = jax.nn.log_softmax(scores[:, :b].T, axis=-1)
    loss = 0.5 * (loss - jnp.mean(logp_t[labels, labels]))
  return loss
