"""Learning-to-rank losses as pure JAX functions.

Every loss has optax's ranking signature

    loss(scores, labels, *, where=None, weights=None, **options) -> scalar

* `scores`: float `[..., list_size]`, the model's score of each item; the
  leading axes index the lists (e.g. `[num_queries, num_candidates]`).
* `labels`: `[..., list_size]`, the same shape: relevance grades (>= 0) for
  the ranking losses, teacher scores for `margin_mse` and `kl_distill`,
  target probabilities in [0, 1] for `pointwise_bce`.
* `where`: optional boolean `[..., list_size]` mask of valid items; padding
  is False. Padded items are replaced by score 0 and label 0 before any
  arithmetic, so they may hold any value (even NaN or inf), contribute
  nothing to the loss, and get gradients of exactly 0.
* `weights`: optional per-list weights, broadcastable to `scores.shape[:-1]`.

Reduction (as optax's and rax's `reduce_fn=jnp.mean`): each list `l` gets a
loss `L_l`; the result is `sum_l valid_l * w_l * L_l / max(sum_l valid_l, 1)`.
Weights scale a list's contribution; they do not renormalise the mean.

Lists without a training signal contribute 0 and are left out of the mean
(`valid_l = False`) instead of producing NaN: a list with no valid item
(every loss); with no relevant item, i.e. no valid label > 0 (`softmax_ce`,
`approx_ndcg`); with no two valid items of different labels (`rank_net`,
`list_net`, `list_mle`, `lambda_loss`, `plackett_luce`); with fewer than two
valid items (`margin_mse`). If no list is valid the loss is 0 with zero
gradients. All losses are jit/vmap/grad friendly; rank-dependent weights
(|ΔNDCG|, LambdaLoss, LiPO-λ) use ranks by the current scores, which carry no
gradient, with ties broken by position in the list.

Gains and discounts follow NDCG: `G(y) = 2**y - 1`, `D(r) = log2(1 + r)` for
1-based rank `r`, and `IDCG` is the DCG of the label-sorted list.

References:
  RankNet: Burges et al. 2005, https://doi.org/10.1145/1102351.1102363
  LambdaRank |ΔNDCG|: Burges 2010, https://www.microsoft.com/en-us/research/
    publication/from-ranknet-to-lambdarank-to-lambdamart-an-overview/
  ListNet: Cao et al. 2007, https://doi.org/10.1145/1273496.1273513
  ListMLE: Xia et al. 2008, https://doi.org/10.1145/1390156.1390306
  Position-aware ListMLE: Lan et al., "Position-Aware ListMLE: A Sequential
    Learning Process for Ranking", UAI 2014.
  LambdaLoss: Wang et al. 2018, https://marc.najork.org/papers/cikm2018.pdf
  ApproxNDCG: Qin et al. 2010, https://doi.org/10.1007/s10791-009-9124-x
  Margin-MSE: Hofstätter et al. 2020, https://arxiv.org/abs/2010.02666
  Distillation: Hinton et al. 2015, https://arxiv.org/abs/1503.02531
  LiPO: Liu et al. 2024, https://arxiv.org/abs/2402.01878
"""

from collections.abc import Callable, Mapping, Sequence
import math
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float
import numpy as np

__all__ = [
    "LOSSES",
    "approx_ndcg",
    "first_rank_net",
    "get",
    "kl_distill",
    "lambda_loss",
    "list_mle",
    "list_net",
    "margin_mse",
    "plackett_luce",
    "pointwise_bce",
    "rank_net",
    "softmax_ce",
]

_LN2 = math.log(2.0)


class _Lists(NamedTuple):
  """Validated, sanitised inputs: padded items hold score 0 and label 0."""
  scores: jax.Array  # [..., L] float
  labels: jax.Array  # [..., L] float
  mask: jax.Array  # [..., L] bool
  weights: jax.Array | None  # [...] float


def _prepare(
    name: str,
    scores: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    where: jax.typing.ArrayLike | None,
    weights: jax.typing.ArrayLike | None,
    labels_name: str = "labels",
) -> _Lists:
  """Checks shapes and dtypes and replaces padded items by zeros."""
  scores = jnp.asarray(scores)
  labels = jnp.asarray(labels)
  if scores.ndim < 1:
    raise ValueError(
        f"{name}: scores must have shape [..., list_size]; got a scalar.")
  if not jnp.issubdtype(scores.dtype, jnp.floating):
    raise ValueError(
        f"{name}: scores must be floating point; got dtype {scores.dtype}.")
  if labels.shape != scores.shape:
    raise ValueError(
        f"{name}: {labels_name} must have the shape of scores "
        f"{scores.shape}; got {labels.shape}.")
  dtype = jnp.promote_types(scores.dtype, jnp.float32)
  if where is None:
    mask = jnp.ones(scores.shape, dtype=bool)
  else:
    mask = jnp.asarray(where)
    if mask.shape != scores.shape:
      raise ValueError(
          f"{name}: where must have the shape of scores {scores.shape}; got "
          f"{mask.shape}.")
    if mask.dtype != jnp.bool_:
      raise ValueError(
          f"{name}: where must be a boolean mask; got dtype {mask.dtype} "
          "(use where.astype(bool)).")
  batch_shape = scores.shape[:-1]
  w = None
  if weights is not None:
    w = jnp.asarray(weights)
    try:
      ok = np.broadcast_shapes(w.shape, batch_shape) == batch_shape
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(
          f"{name}: weights are per list and must broadcast to the batch "
          f"shape {batch_shape} (scores.shape[:-1]); got {w.shape}.")
    w = jnp.broadcast_to(w.astype(dtype), batch_shape)
  s = jnp.where(mask, scores.astype(dtype), 0.0)
  y = jnp.where(mask, labels.astype(dtype), 0.0)
  return _Lists(s, y, mask, w)


def _reduce(
    per_list: jax.Array, valid: jax.Array, weights: jax.Array | None
) -> jax.Array:
  """Weighted mean of the per-list losses over the valid lists."""
  if weights is not None:
    per_list = per_list * weights
  total = jnp.sum(jnp.where(valid, per_list, 0.0))
  count = jnp.sum(valid).astype(total.dtype)
  return total / jnp.maximum(count, 1.0)


def _masked_mean(
    term: jax.Array, mask: jax.Array, axis: int | tuple[int, ...] = -1
) -> tuple[jax.Array, jax.Array]:
  """`(mean of term over mask along axis, count)`; 0 where the count is 0."""
  n = jnp.sum(mask, axis=axis)
  total = jnp.sum(jnp.where(mask, term, 0.0), axis=axis)
  return total / jnp.maximum(n, 1).astype(term.dtype), n


def _check_positive(name: str, arg: str, value: object) -> None:
  if isinstance(value, (int, float)) and not value > 0:
    raise ValueError(f"{name}: {arg} must be > 0; got {value}.")


def _check_choice(name: str, arg: str, value: str, choices: tuple[str, ...]):
  if value not in choices:
    raise ValueError(f"{name}: {arg} must be one of {choices}; got {value!r}.")


def _log_softmax(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Log-softmax over the valid items; 0 at padded items.

  A list with no valid item is computed as if all items were valid (its
  result is discarded by the caller), so nothing is ever -inf - -inf.
  """
  rows = mask | ~jnp.any(mask, axis=-1, keepdims=True)
  lse = jax.nn.logsumexp(jnp.where(rows, x, -jnp.inf), axis=-1, keepdims=True)
  return jnp.where(mask, x - lse, 0.0)


def _pair_mask(mask: jax.Array) -> jax.Array:
  """`[..., i, j]`: both items valid."""
  return mask[..., :, None] & mask[..., None, :]


def _diff(x: jax.Array) -> jax.Array:
  """`[..., i, j] = x_i - x_j`."""
  return x[..., :, None] - x[..., None, :]


def _eye(shape: tuple[int, ...]) -> jax.Array:
  """Boolean identity over the last two axes of `shape`."""
  nd = len(shape)
  return (jax.lax.broadcasted_iota(jnp.int32, shape, nd - 2) ==
          jax.lax.broadcasted_iota(jnp.int32, shape, nd - 1))


def _has_preference(labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Whether a list has two valid items with different labels."""
  hi = jnp.max(jnp.where(mask, labels, -jnp.inf), axis=-1)
  lo = jnp.min(jnp.where(mask, labels, jnp.inf), axis=-1)
  return jnp.any(mask, axis=-1) & (hi > lo)


def _gains(labels: jax.Array) -> jax.Array:
  return jnp.expm1(labels * _LN2)  # 2**y - 1


def _ideal_dcg(gains: jax.Array, mask: jax.Array) -> jax.Array:
  """DCG of the valid items sorted by gain (descending)."""
  g = -jnp.sort(-jnp.where(mask, gains, -jnp.inf), axis=-1)
  positions = 1.0 + jax.lax.broadcasted_iota(jnp.int32, g.shape,
                                             g.ndim - 1).astype(g.dtype)
  discount = 1.0 / jnp.log2(1.0 + positions)
  finite = jnp.isfinite(g)
  return jnp.sum(jnp.where(finite, jnp.where(finite, g, 0.0) * discount, 0.0),
                 axis=-1)


def _safe_positive(x: jax.Array) -> jax.Array:
  return jnp.where(x > 0, x, 1.0)


def _ranks(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """1-based ranks by descending score (no gradient); padding ranks last.

  Ties are broken by position in the list.
  """
  key = jax.lax.stop_gradient(jnp.where(mask, -scores, jnp.inf))
  order = jnp.argsort(key, axis=-1, stable=True)
  return (jnp.argsort(order, axis=-1) + 1).astype(scores.dtype)


def _lambda_rank_weights(lists: _Lists) -> jax.Array:
  """`[..., i, j] = |G_i - G_j| * |1/D(r_i) - 1/D(r_j)|` (unnormalised)."""
  g = _gains(lists.labels)
  inv_d = 1.0 / jnp.log2(1.0 + _ranks(lists.scores, lists.mask))
  return jnp.abs(_diff(g)) * jnp.abs(_diff(inv_d))


def pointwise_bce(
    scores: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
) -> Float[Array, ""]:
  """Pointwise sigmoid binary cross-entropy (monoBERT-style).

  Per list: the mean over valid items of
  `-y log sigmoid(s) - (1 - y) log(1 - sigmoid(s)) = softplus(s) - y s`.

  Args:
    scores: Logits `[..., list_size]`.
    labels: Targets in [0, 1] (binarise graded relevance first, e.g.
      `labels > 0`), same shape.
    where: Optional boolean mask of valid items, same shape.
    weights: Optional per-list weights broadcastable to `scores.shape[:-1]`.

  Returns:
    The mean over lists with at least one valid item (a scalar).

  Raises:
    ValueError: If shapes or dtypes are inconsistent.
  """
  x = _prepare("pointwise_bce", scores, labels, where, weights)
  per_item = jax.nn.softplus(x.scores) - x.labels * x.scores
  per_list, n = _masked_mean(per_item, x.mask)
  return _reduce(per_list, n > 0, x.weights)


def rank_net(
    scores: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    ndcg_weighted: bool = False,
) -> Float[Array, ""]:
  """RankNet pairwise logistic loss, optionally |ΔNDCG|-weighted.

  Over the set `P` of valid ordered pairs with `y_i > y_j`, per list:
  `(1/|P|) sum_P w_ij log(1 + exp(-(s_i - s_j)))`, with `w_ij = 1`, or with
  `ndcg_weighted` the LambdaRank weight `w_ij = |ΔNDCG_ij| =
  |G_i - G_j| |1/D(r_i) - 1/D(r_j)| / IDCG`, the NDCG change from swapping
  `i` and `j` in the ranking by the current scores (ranks `r`, no gradient).

  Args:
    scores: Scores `[..., list_size]`.
    labels: Relevance grades (>= 0), same shape.
    where: Optional boolean mask of valid items, same shape.
    weights: Optional per-list weights broadcastable to `scores.shape[:-1]`.
    ndcg_weighted: Weight each pair by |ΔNDCG| (LambdaRank).

  Returns:
    The mean over lists having at least one pair of different labels.

  Raises:
    ValueError: If shapes or dtypes are inconsistent.
  """
  x = _prepare("rank_net", scores, labels, where, weights)
  pairs = _pair_mask(x.mask) & (_diff(x.labels) > 0)
  term = jax.nn.softplus(-_diff(x.scores))
  if ndcg_weighted:
    idcg = _ideal_dcg(_gains(x.labels), x.mask)
    term = term * _lambda_rank_weights(x) / _safe_positive(idcg)[..., None,
                                                                  None]
  per_list, n = _masked_mean(term, pairs, axis=(-2, -1))
  return _reduce(per_list, n > 0, x.weights)


def list_net(
    scores: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
) -> Float[Array, ""]:
  """ListNet top-one cross-entropy.

  Per list: `-sum_i softmax(y)_i log softmax(s)_i`, both softmaxes over the
  valid items. Equals `optax.losses.ranking_softmax_loss(s, softmax(y))`.

  Args:
    scores: Scores `[..., list_size]`.
    labels: Relevance grades, same shape.
    where: Optional boolean mask of valid items, same shape.
    weights: Optional per-list weights broadcastable to `scores.shape[:-1]`.

  Returns:
    The mean over lists having at least one pair of different labels (with
    equal labels the target is uniform and carries no ranking signal).

  Raises:
    ValueError: If shapes or dtypes are inconsistent.
  """
  x = _prepare("list_net", scores, labels, where, weights)
  target = jnp.where(x.mask, jnp.exp(_log_softmax(x.labels, x.mask)), 0.0)
  per_list = -jnp.sum(target * _log_softmax(x.scores, x.mask), axis=-1)
  return _reduce(per_list, _has_preference(x.labels, x.mask), x.weights)


def list_mle(
    scores: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    position_aware: bool = False,
) -> Float[Array, ""]:
  """ListMLE: Plackett-Luce negative log-likelihood of the label order.

  Let `pi` order the `n` valid items by label (descending), ties among
  labels ordered by the current scores (descending, no gradient), so the
  loss does not depend on where items sit in the list. Per list:
  `sum_{k=1..n} a_k [log sum_{l>=k} exp(s_pi(l)) - s_pi(k)]`, with `a_k = 1`
  or, with `position_aware` (Lan et al.), TF-Ranking's weights
  `2**(n - k) - 1` normalised to sum to 1 over the list (as
  sentence-transformers' PListMLELoss does), computed without overflow.

  Args:
    scores: Scores `[..., list_size]`.
    labels: Relevance grades, same shape.
    where: Optional boolean mask of valid items, same shape.
    weights: Optional per-list weights broadcastable to `scores.shape[:-1]`.
    position_aware: Use the position-aware (PListMLE) weights.

  Returns:
    The mean over lists having at least one pair of different labels.

  Raises:
    ValueError: If shapes or dtypes are inconsistent.
  """
  x = _prepare("list_mle", scores, labels, where, weights)
  s_key = jax.lax.stop_gradient(x.scores)
  # lexsort: the last key is the primary one. Padding goes first, so every
  # valid item's suffix below holds only valid items.
  perm = jnp.lexsort((-s_key, -x.labels, x.mask), axis=-1)
  s = jnp.take_along_axis(x.scores, perm, axis=-1)
  m = jnp.take_along_axis(x.mask, perm, axis=-1)
  suffix_lse = jax.lax.cumlogsumexp(s, axis=s.ndim - 1, reverse=True)
  term = suffix_lse - s
  if position_aware:
    n = jnp.sum(m, axis=-1, keepdims=True).astype(s.dtype)
    idx = jax.lax.broadcasted_iota(jnp.int32, s.shape, s.ndim - 1)
    # 1-based position among the valid items (clamped at padding, which
    # precedes them, so 2**-k stays finite there).
    k = jnp.maximum(idx.astype(s.dtype) - (s.shape[-1] - n) + 1.0, 1.0)
    # (2^(n-k) - 1) / sum_k (2^(n-k) - 1), numerator and denominator / 2^n.
    num = jnp.exp2(-k) - jnp.exp2(-n)
    den = 1.0 - (n + 1.0) * jnp.exp2(-n)
    term = term * num / jnp.where(n > 1, den, 1.0)
  per_list = jnp.sum(jnp.where(m, term, 0.0), axis=-1)
  return _reduce(per_list, _has_preference(x.labels, x.mask), x.weights)


def lambda_loss(
    scores: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    variant: str = "ndcg_loss2pp",
    mu: jax.typing.ArrayLike = 10.0,
) -> Float[Array, ""]:
  """LambdaLoss with the NDCG-Loss2 or NDCG-Loss2++ weights (Wang et al.).

  With ranks `r` by the current scores (no gradient), normalised gains
  `g_i = G(y_i) / IDCG`, `D(r) = log2(1 + r)`,
  `delta_ij = |1/D(|r_i - r_j|) - 1/D(|r_i - r_j| + 1)|` and
  `rho_ij = |1/D(r_i) - 1/D(r_j)|`, per list:
  `-sum_{valid i,j: y_i > y_j} w_ij |g_i - g_j| log2 sigmoid(s_i - s_j)`,
  where `w_ij = delta_ij` (NDCG-Loss2) or `rho_ij + mu delta_ij`
  (NDCG-Loss2++). A sum over pairs, as in the paper (and allRank); no top-k
  cutoff.

  Args:
    scores: Scores `[..., list_size]`.
    labels: Relevance grades (>= 0), same shape.
    where: Optional boolean mask of valid items, same shape.
    weights: Optional per-list weights broadcastable to `scores.shape[:-1]`.
    variant: "ndcg_loss2" or "ndcg_loss2pp".
    mu: Weight of the NDCG-Loss2 term in NDCG-Loss2++.

  Returns:
    The mean over lists having at least one pair of different labels.

  Raises:
    ValueError: If shapes or dtypes are inconsistent, or `variant` is unknown.
  """
  _check_choice("lambda_loss", "variant", variant,
                ("ndcg_loss2", "ndcg_loss2pp"))
  x = _prepare("lambda_loss", scores, labels, where, weights)
  pairs = _pair_mask(x.mask) & (_diff(x.labels) > 0)
  r = _ranks(x.scores, x.mask)
  dr = jnp.maximum(jnp.abs(_diff(r)), 1.0)  # The diagonal is never a pair.
  w = jnp.abs(1.0 / jnp.log2(1.0 + dr) - 1.0 / jnp.log2(2.0 + dr))
  if variant == "ndcg_loss2pp":
    w = jnp.abs(_diff(1.0 / jnp.log2(1.0 + r))) + mu * w
  idcg = _safe_positive(_ideal_dcg(_gains(x.labels), x.mask))
  g = _gains(x.labels) / idcg[..., None]
  term = w * jnp.abs(_diff(g)) * jax.nn.softplus(-_diff(x.scores)) / _LN2
  per_list = jnp.sum(jnp.where(pairs, term, 0.0), axis=(-2, -1))
  return _reduce(per_list, jnp.any(pairs, axis=(-2, -1)), x.weights)


def approx_ndcg(
    scores: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    temperature: jax.typing.ArrayLike = 1.0,
) -> Float[Array, ""]:
  """ApproxNDCG (Qin et al. 2010): negative NDCG with smooth ranks.

  Per list: `-(1/IDCG) sum_i G(y_i) / log2(1 + rhat_i)` with the smooth rank
  `rhat_i = 1 + sum_{valid j != i} sigmoid((s_j - s_i) / temperature)`, as
  rax's `approx_t12n(ndcg_metric)` (TF-Ranking's ApproxNDCGLoss defaults to
  temperature 0.1). In [-1, 0); -1 is a perfect ranking.

  Args:
    scores: Scores `[..., list_size]`.
    labels: Relevance grades (>= 0), same shape.
    where: Optional boolean mask of valid items, same shape.
    weights: Optional per-list weights broadcastable to `scores.shape[:-1]`.
    temperature: Sigmoid temperature (smaller: closer to the true ranks).

  Returns:
    The mean over lists with at least one relevant item (label > 0).

  Raises:
    ValueError: If shapes or dtypes are inconsistent or temperature <= 0.
  """
  _check_positive("approx_ndcg", "temperature", temperature)
  x = _prepare("approx_ndcg", scores, labels, where, weights)
  beats = jax.nn.sigmoid(-_diff(x.scores) / temperature)  # [i, j]: s_j > s_i
  others = _pair_mask(x.mask) & ~_eye(beats.shape)
  rank = 1.0 + jnp.sum(jnp.where(others, beats, 0.0), axis=-1)
  gains = _gains(x.labels)
  dcg = jnp.sum(jnp.where(x.mask, gains / jnp.log2(1.0 + rank), 0.0), axis=-1)
  idcg = _ideal_dcg(gains, x.mask)
  return _reduce(-dcg / _safe_positive(idcg), idcg > 0, x.weights)


def softmax_ce(
    scores: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
) -> Float[Array, ""]:
  """Softmax cross-entropy with label-normalised targets.

  Per list: `-sum_i (y_i / sum_j y_j) log softmax(s)_i` over valid items
  (rax's `softmax_loss` with `label_fn=rax.utils.normalize_probabilities`).
  For one-hot labels it equals `optax.losses.ranking_softmax_loss`, which
  does not normalise the labels, and so the in-batch InfoNCE loss with
  `labels = jnp.eye(B)`.

  Args:
    scores: Scores `[..., list_size]`.
    labels: Non-negative relevance, same shape.
    where: Optional boolean mask of valid items, same shape.
    weights: Optional per-list weights broadcastable to `scores.shape[:-1]`.

  Returns:
    The mean over lists with positive label mass.

  Raises:
    ValueError: If shapes or dtypes are inconsistent.
  """
  x = _prepare("softmax_ce", scores, labels, where, weights)
  total = jnp.sum(x.labels, axis=-1)
  target = x.labels / _safe_positive(total)[..., None]
  per_list = -jnp.sum(target * _log_softmax(x.scores, x.mask), axis=-1)
  return _reduce(per_list, total > 0, x.weights)


def margin_mse(
    scores: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    anchor_first: bool = False,
) -> Float[Array, ""]:
  """Margin-MSE distillation (Hofstätter et al.); labels are teacher scores.

  Per list, the mean over pairs of valid items of
  `((s_i - s_j) - (t_i - t_j))**2`: over all unordered pairs (computed as
  `2/(n-1) sum_i (d_i - mean(d))**2` with `d = s - t`), or with
  `anchor_first` over the pairs `(0, j)` (item 0 is the positive, the rest
  negatives, as sentence-transformers' MarginMSELoss with several
  negatives). For a `[positive, negative]` list both are the original
  triple loss.

  Args:
    scores: Student scores `[..., list_size]`.
    labels: Teacher scores, same shape.
    where: Optional boolean mask of valid items, same shape.
    weights: Optional per-list weights broadcastable to `scores.shape[:-1]`.
    anchor_first: Only the margins against item 0.

  Returns:
    The mean over lists with at least one pair (with `anchor_first`: item 0
    valid and another valid item).

  Raises:
    ValueError: If shapes or dtypes are inconsistent.
  """
  x = _prepare("margin_mse", scores, labels, where, weights)
  d = x.scores - x.labels
  if anchor_first:
    others = x.mask & (jax.lax.broadcasted_iota(jnp.int32, d.shape,
                                                d.ndim - 1) > 0)
    per_list, n = _masked_mean(jnp.square(d[..., :1] - d), others)
    valid = x.mask[..., 0] & (n > 0)
  else:
    n = jnp.sum(x.mask, axis=-1)
    nf = n.astype(d.dtype)
    mean = jnp.sum(d, axis=-1, keepdims=True) / jnp.maximum(nf, 1.0)[..., None]
    ss = jnp.sum(jnp.where(x.mask, jnp.square(d - mean), 0.0), axis=-1)
    per_list = 2.0 * ss / jnp.maximum(nf - 1.0, 1.0)
    valid = n >= 2
  return _reduce(per_list, valid, x.weights)


def kl_distill(
    scores: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    temperature: jax.typing.ArrayLike = 1.0,
) -> Float[Array, ""]:
  """KL(teacher || student) over each list's valid items.

  Per list: `sum_i p_i (log p_i - log q_i)` with `p = softmax(t / T)` from
  the teacher scores `t = labels` and `q = softmax(s / T)`. No `T**2`
  factor (multiply by it to keep Hinton et al.'s gradient scale).

  Args:
    scores: Student scores `[..., list_size]`.
    labels: Teacher scores, same shape.
    where: Optional boolean mask of valid items, same shape.
    weights: Optional per-list weights broadcastable to `scores.shape[:-1]`.
    temperature: Softmax temperature `T` of both distributions.

  Returns:
    The mean over lists with at least one valid item.

  Raises:
    ValueError: If shapes or dtypes are inconsistent or temperature <= 0.
  """
  _check_positive("kl_distill", "temperature", temperature)
  x = _prepare("kl_distill", scores, labels, where, weights)
  log_p = _log_softmax(x.labels / temperature, x.mask)
  log_q = _log_softmax(x.scores / temperature, x.mask)
  p = jnp.where(x.mask, jnp.exp(log_p), 0.0)
  per_list = jnp.sum(p * (log_p - log_q), axis=-1)
  return _reduce(per_list, jnp.any(x.mask, axis=-1), x.weights)


def plackett_luce(
    scores: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    variant: str = "pl",
) -> Float[Array, ""]:
  """Listwise preference loss of LiPO (Liu et al. 2024).

  In LiPO the items are responses to one prompt, `labels` their preference
  grades (e.g. reward-model scores or ranks turned into grades) and `scores`
  the policy's implicit rewards `beta * (log pi(y|x) - log pi_ref(y|x))`;
  any scores work. Per list:

  * `variant="pl"` (Plackett-Luce, DPO's listwise form): with
    `W_i = {valid j : y_j < y_i}`,
    `sum_{valid i, W_i nonempty} [log(exp(s_i) + sum_{j in W_i} exp(s_j))
    - s_i]`. With distinct labels this is exactly the Plackett-Luce negative
    log-likelihood of the label order (= `list_mle`); tied items are not
    ordered against each other (each competes only with strictly worse
    items), so no tie-breaking rule is needed. With binary labels it is the
    multi-positive softmax loss, each positive against all negatives.
  * `variant="lipo_lambda"` (LiPO-λ): with ranks `r` by the current scores
    (no gradient), `sum_{valid i,j: y_i > y_j} Delta_ij log(1 + exp(-(s_i -
    s_j)))` with `Delta_ij = |G(y_i) - G(y_j)| |1/D(r_i) - 1/D(r_j)|`.
    LiPO writes `D(r) = log(1 + r)`; base 2 is used here, which scales the
    loss by the constant `ln 2`. No IDCG normalisation (unlike `rank_net`'s
    |ΔNDCG| and `lambda_loss`).

  Args:
    scores: Scores `[..., list_size]`.
    labels: Preference grades, same shape.
    where: Optional boolean mask of valid items, same shape.
    weights: Optional per-list weights broadcastable to `scores.shape[:-1]`.
    variant: "pl" or "lipo_lambda".

  Returns:
    The mean over lists having at least one pair of different labels.

  Raises:
    ValueError: If shapes or dtypes are inconsistent, or `variant` is unknown.
  """
  _check_choice("plackett_luce", "variant", variant, ("pl", "lipo_lambda"))
  x = _prepare("plackett_luce", scores, labels, where, weights)
  pairs = _pair_mask(x.mask) & (_diff(x.labels) > 0)  # [i, j]: i beats j.
  if variant == "pl":
    rivals = pairs | _eye(pairs.shape)
    lse = jax.nn.logsumexp(
        jnp.where(rivals, x.scores[..., None, :], -jnp.inf), axis=-1)
    stage = jnp.any(pairs, axis=-1)
    per_list = jnp.sum(jnp.where(stage, lse - x.scores, 0.0), axis=-1)
  else:
    term = _lambda_rank_weights(x) * jax.nn.softplus(-_diff(x.scores))
    per_list = jnp.sum(jnp.where(pairs, term, 0.0), axis=(-2, -1))
  return _reduce(per_list, jnp.any(pairs, axis=(-2, -1)), x.weights)


def first_rank_net(
    scores: jax.typing.ArrayLike,
    target_ranks: jax.typing.ArrayLike,
    *,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
) -> Float[Array, ""]:
  """FIRST's weighted RankNet: pairs weighted by `1 / (r_i + r_j)`.

  Over the valid ordered pairs with target ranks `r_i < r_j` (1 = best),
  per list: the mean of `softplus(-(s_i - s_j)) / (r_i + r_j)`, so errors
  near the top of the target ranking cost most. Lists are averaged as in
  the other losses here (lists without a pair are left out).

  Args:
    scores: Identifier logits `[..., W]`.
    target_ranks: 1-based target ranks, same shape (ties form no pair).
    where: Optional boolean mask of valid candidates, same shape.
    weights: Optional per-list weights broadcastable to `scores.shape[:-1]`.

  Returns:
    The scalar loss.

  Raises:
    ValueError: On mismatched shapes or non-floating scores.
  """
  x = _prepare("first_rank_net", scores, target_ranks, where, weights,
               labels_name="target_ranks")
  r = jnp.where(x.mask, x.labels, 1.0)  # Padding: no 1 / 0 in the weights.
  pairs = _pair_mask(x.mask) & (_diff(r) < 0)
  term = (jax.nn.softplus(-_diff(x.scores))
          / (r[..., :, None] + r[..., None, :]))
  per_list, n = _masked_mean(term, pairs, axis=(-2, -1))
  return _reduce(per_list, n > 0, x.weights)


# The one registry of ranking losses: name -> function (every function has
# the signature above). Trainers accept a subset of names (e.g.
# `cross_encoder.LOSSES`, `first.LTR_LOSSES`) and look them up with `get`.
LOSSES: Mapping[str, Callable[..., jax.Array]] = types.MappingProxyType({
    f.__name__: f for f in (
        approx_ndcg, first_rank_net, kl_distill, lambda_loss, list_mle,
        list_net, margin_mse, plackett_luce, pointwise_bce, rank_net,
        softmax_ce)
})


def get(
    name: str, options: Sequence[str] | None = None
) -> Callable[..., jax.Array]:
  """The loss called `name` in `LOSSES`.

  Args:
    name: A loss name, e.g. `"softmax_ce"`.
    options: The names the caller accepts (default: all of `LOSSES`).

  Returns:
    The loss function.

  Raises:
    ValueError: If `name` is not one of `options`; the message lists them.
  """
  options = tuple(LOSSES) if options is None else tuple(options)
  unknown = [o for o in options if o not in LOSSES]
  if unknown:
    raise ValueError(f"options {unknown} are not losses of "
                     f"lowrank.ranking.losses.LOSSES {tuple(LOSSES)}.")
  if not isinstance(name, str) or name not in options:
    raise ValueError(f"Unknown loss {name!r}; options: {options}.")
  return LOSSES[name]
