"""A BERT cross-encoder reranker in Flax NNX (monoBERT style).

The query and the document are encoded together as one sequence

    [CLS] query [SEP] document [SEP]

with token type 0 for `[CLS] query [SEP]` and 1 for `document [SEP]`, so
every layer attends across the two texts; a linear scoring head maps the
`[CLS]` state (or the HF pooler output, or the masked mean) to one relevance
logit. The encoder is any `lowrank.models.bert.BertModel`, normally a
pretrained one (`CrossEncoder.from_pretrained`, all-MiniLM-L6-v2 by
default), and the model can be trained fully, with adapters
(`lowrank.adapters.inject` on the `bert.*` linears; the head stays
trainable, see `trainable_filter`) or with any optax optimizer, e.g.
`lowrank.optim.galore_adamw` (`make_train_step`).

Scoring (`score_pairs`) is jitted and length-bucketed: pairs are tokenized
once, sorted by length, cut into fixed-size batches and each batch is padded
to the smallest of a few fixed lengths (`DEFAULT_BUCKETS`, capped at
`max_length`), so scoring any number of pairs compiles at most once per
bucket.

References:
  Nogueira & Cho, "Passage Re-ranking with BERT", 2019,
    https://arxiv.org/abs/1901.04085
  Gao et al., "Rethink Training of BERT Rerankers in Multi-Stage Retrieval
    Pipeline" (localized contrastive estimation), 2021,
    https://arxiv.org/abs/2101.08751
"""

from collections.abc import Callable, Sequence
from typing import Any
import warnings

from flax import nnx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Shaped
import numpy as np
import optax

from lowrank import adapters
from lowrank import assets
from lowrank import sharding
from lowrank import train
from lowrank.models import bert
from lowrank.models import encoding
from lowrank.ranking import losses as ltr_losses

_AnyArray = jax.Array | np.ndarray

POOLINGS = ("cls", "pooler", "mean")
# Padded sequence lengths of `score_pairs` (capped at `max_length`, which is
# always added as the last bucket).
DEFAULT_BUCKETS = (64, 128, 256, 512)
# The names of `lowrank.ranking.losses.LOSSES` a cross-encoder trains with
# (on relevance labels; `get` looks them up).
LOSSES = (
    "softmax_ce", "rank_net", "list_net", "list_mle", "lambda_loss",
    "approx_ndcg", "pointwise_bce", "plackett_luce",
)


class CrossEncoder(nnx.Module):
  """BERT over `[CLS] q [SEP] d [SEP]` plus a linear scoring head.

  Attributes:
    bert: The `BertModel` encoder (adapter paths read `bert.encoder...`).
    head: `nnx.Linear(hidden_size, 1)`, the scoring head.
    pooling: `"cls"` (the `[CLS]` hidden state), `"pooler"` (HF's
      `tanh(dense(h_cls))`, as `BertForSequenceClassification`) or `"mean"`
      (masked mean over all tokens).
  """

  def __init__(
      self,
      encoder: bert.BertModel,
      *,
      pooling: str = "cls",
      rngs: nnx.Rngs,
  ):
    """Wraps `encoder` and adds a freshly initialised head.

    Args:
      encoder: The BERT encoder (used, not copied).
      pooling: One of `POOLINGS`. With `"cls"` or `"mean"` the encoder's
        pooler is dropped (it would be dead weight for adapters).
      rngs: Initialises the head (`normal(0.02)` kernel, zero bias).

    Raises:
      ValueError: On an unknown pooling, or `"pooler"` without a pooler.
    """
    if pooling not in POOLINGS:
      raise ValueError(f"Unknown pooling {pooling!r}; options: {POOLINGS}.")
    if pooling == "pooler" and encoder.pooler is None:
      raise ValueError("pooling='pooler' needs an encoder with a pooler "
                       "(the checkpoint has no pooler.dense).")
    if pooling != "pooler":
      encoder.pooler = None
    self.bert = encoder
    self.pooling = pooling
    h = encoder.config.hidden_size
    self.head = nnx.Linear(
        h, 1,
        kernel_init=nnx.initializers.normal(
            encoder.config.initializer_range),
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )
    self._replicate_head_like_encoder()

  def _replicate_head_like_encoder(self) -> None:
    """Puts the head on the encoder's mesh (replicated), if it has one.

    The head carries no logical axes, so it is created on the default
    device; a jitted step that mixes it with mesh-placed encoder (or
    adapter) weights would see incompatible devices.
    """
    for leaf in jax.tree.leaves(nnx.state(self.bert, nnx.Param)):
      sh = getattr(leaf, "sharding", None)
      if isinstance(sh, jax.sharding.NamedSharding):
        replicated = jax.sharding.NamedSharding(
            sh.mesh, jax.sharding.PartitionSpec())
        for var in (self.head.kernel, self.head.bias):
          var.set_value(jax.device_put(var.get_value(), replicated))
        return

  def __call__(
      self,
      input_ids: Int[_AnyArray, "b l"],
      attention_mask: Shaped[_AnyArray, "b l"],
      token_type_ids: Int[_AnyArray, "b l"],
  ) -> Float[Array, "b"]:
    """Relevance logits `[B]` (float32) of tokenized pairs."""
    hidden = self.bert(input_ids, attention_mask=attention_mask,
                       token_type_ids=token_type_ids)
    if self.pooling == "cls":
      pooled = hidden[:, 0]
    elif self.pooling == "pooler":
      pooled = self.bert.pool(hidden)
    else:
      pooled = bert.pool(hidden, attention_mask, "mean")
    return self.head(pooled.astype(jnp.float32))[:, 0].astype(jnp.float32)

  @classmethod
  def from_pretrained(
      cls,
      path: bert.PathLike | None = None,
      *,
      pooling: str = "cls",
      seed: int = 0,
      max_length: int | None = None,
      dtype: Any = None,
  ) -> tuple["CrossEncoder", bert.Tokenizer]:
    """A cross-encoder on a pretrained BERT checkpoint (default: MiniLM).

    Args:
      path: HF-format BERT directory (`None`: `assets.minilm_path()`).
      pooling: See `CrossEncoder`.
      seed: Seeds the head initialisation and dropout.
      max_length: Tokenizer truncation length for the pair (default: the
        checkpoint's).
      dtype: Compute dtype of the encoder (`None`: float32).

    Returns:
      `(model, tokenizer)`, the model in eval mode.
    """
    path = assets.minilm_path() if path is None else path
    encoder = bert.load_pretrained(path, dtype=dtype, seed=seed)
    tokenizer = bert.load_tokenizer(path, max_length=max_length)
    model = cls(encoder, pooling=pooling,
                rngs=nnx.Rngs(params=seed, dropout=seed))
    model.eval()
    return model, tokenizer

  def score_pairs(
      self,
      tokenizer: bert.Tokenizer,
      queries: Sequence[str],
      docs: Sequence[str],
      **kwargs,
  ) -> np.ndarray:
    """`score_pairs(self, tokenizer, queries, docs, **kwargs)`."""
    return score_pairs(self, tokenizer, queries, docs, **kwargs)


def trainable_filter(method: str) -> Any:
  """The `nnx` filter of the trainable variables for a training `method`.

  Args:
    method: `"full"` (every `nnx.Param`) or an adapter method of
      `lowrank.adapters.METHODS` (the adapters' `nnx.LoRAParam`s plus the
      scoring head, which is new and must be learned).

  Returns:
    A filter for `nnx.split(model, filter, ...)`.

  Raises:
    ValueError: On an unknown method.
  """
  if method == "full":
    return nnx.Param
  if method not in adapters.METHODS:
    raise ValueError(f"method must be 'full' or one of "
                     f"{sorted(adapters.METHODS)}; got {method!r}.")
  return nnx.Any(nnx.LoRAParam, nnx.PathContains("head"))


def count_parameters(model: CrossEncoder, method: str) -> dict[str, int]:
  """`{"trainable", "total"}` element counts for a training `method`."""
  def count(filter_):
    return sum(x.size for x in jax.tree.leaves(
        nnx.to_pure_dict(nnx.state(model, filter_))))
  return {"trainable": count(trainable_filter(method)),
          "total": count(nnx.Param)}


# ----------------------------------------------------------------------------
# Tokenization and bucketing.


def tokenize_pairs(
    tokenizer: bert.Tokenizer,
    queries: Sequence[str],
    docs: Sequence[str],
    *,
    max_length: int | None = None,
) -> list[tuple[list[int], list[int]]]:
  """Token and type ids of `[CLS] q [SEP] d [SEP]`, truncated, unpadded.

  Truncation is longest-first over the two texts (special tokens included
  in `max_length`), as HF's `truncation=True` for pairs.

  Raises:
    ValueError: If `queries` and `docs` differ in length.
  """
  if isinstance(queries, str) or isinstance(docs, str):
    raise ValueError("queries and docs must be sequences of str, not a str.")
  if len(queries) != len(docs):
    raise ValueError(f"Need one document per query; got {len(queries)} "
                     f"queries and {len(docs)} documents.")
  return tokenizer.tokenize_unpadded(list(queries), pairs=list(docs),
                                     max_length=max_length)


def encode_pairs(*args, **kwargs) -> list[tuple[list[int], list[int]]]:
  """Deprecated alias of `tokenize_pairs` (same arguments)."""
  warnings.warn(
      "lowrank.ranking.cross_encoder.encode_pairs is deprecated: it "
      "tokenizes, so it is now tokenize_pairs (same arguments).",
      DeprecationWarning, stacklevel=2)
  return tokenize_pairs(*args, **kwargs)


def bucket_lengths(
    max_length: int, buckets: Sequence[int] | None = DEFAULT_BUCKETS
) -> tuple[int, ...]:
  """The padded lengths in use: `buckets` below `max_length`, then it.

  `buckets=None` disables bucketing (everything padded to `max_length`).
  """
  if buckets is None:
    return (int(max_length),)
  if any(int(b) < 2 for b in buckets):
    raise ValueError(f"Bucket lengths must be >= 2; got {tuple(buckets)}.")
  return tuple(sorted({int(b) for b in buckets if b < max_length})) + (
      int(max_length),)


def _bucket(n: int, lengths: Sequence[int]) -> int:
  for b in lengths:
    if b >= n:
      return b
  return lengths[-1]


def bucketed_batches(
    encoded: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int,
    lengths: Sequence[int],
) -> list[tuple[np.ndarray, int]]:
  """Groups encodings into `(indices, padded length)` batches.

  Indices are sorted by (bucket, length, position), so the grouping is
  deterministic; each batch holds at most `batch_size` indices of one
  bucket.
  """
  by_bucket: dict[int, list[int]] = {}
  order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]), i))
  for i in order:
    by_bucket.setdefault(_bucket(len(encoded[i][0]), lengths), []).append(i)
  out = []
  for length in sorted(by_bucket):
    idx = by_bucket[length]
    for start in range(0, len(idx), batch_size):
      out.append((np.asarray(idx[start:start + batch_size]), length))
  return out


def place_batch(state: Any, batch: dict[str, Any]) -> dict[str, jax.Array]:
  """Puts a `[B, L]` batch on the params' mesh, batch axis sharded.

  The batch axis follows the `batch` logical rule where it divides `B`
  (else it is replicated); without mesh-placed params, arrays are returned
  as `jnp` arrays on the default device.
  """
  shape = next(iter(batch.values())).shape
  shard = sharding.batch_sharding_like(state, shape)
  if shard is None:
    return {k: jnp.asarray(v) for k, v in batch.items()}
  return jax.device_put(dict(batch), shard)


# ----------------------------------------------------------------------------
# Jitted scoring.

_score_step = encoding.SplitJit(
    lambda model, batch: model(batch["input_ids"], batch["attention_mask"],
                               batch["token_type_ids"]))


def score_trace_count() -> int:
  """How many times `score_pairs`' jitted forward has been traced."""
  return _score_step.traces


def score_pairs(
    model: CrossEncoder,
    tokenizer: bert.Tokenizer,
    queries: Sequence[str],
    docs: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    buckets: Sequence[int] | None = DEFAULT_BUCKETS,
) -> np.ndarray:
  """Scores `(queries[i], docs[i])` pairs in jitted, bucketed batches.

  Pairs are tokenized once, grouped by padded length (`bucket_lengths`),
  and run `batch_size` at a time; a short last batch of a bucket is padded
  with empty rows, so each bucket compiles once. Dropout is off (an eval
  view is used; `model` is not modified).

  Args:
    model: The cross-encoder.
    tokenizer: Its tokenizer.
    queries: Query texts.
    docs: Document texts, one per query.
    batch_size: Pairs per forward call.
    max_length: Pair truncation length (default `tokenizer.max_length`;
      capped at `max_position_embeddings`).
    buckets: Padded lengths to choose from (`None`: pad all to
      `max_length`).

  Returns:
    Float32 `[N]` logits in the input order.

  Raises:
    ValueError: On a non-positive `batch_size`, `max_length < 2`, bad
      buckets or mismatched inputs.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive; got {batch_size}.")
  max_length = tokenizer.max_length if max_length is None else int(max_length)
  max_length = min(max_length, model.bert.config.max_position_embeddings)
  if max_length < 2:
    raise ValueError(f"max_length must be >= 2; got {max_length}.")
  lengths = bucket_lengths(max_length, buckets)
  encoded = tokenize_pairs(tokenizer, queries, docs, max_length=max_length)
  out = np.zeros(len(encoded), np.float32)
  if not encoded:
    return out
  graphdef, state = nnx.split(nnx.view(model, deterministic=True))
  for idx, length in bucketed_batches(encoded, batch_size=batch_size,
                                      lengths=lengths):
    batch = tokenizer.pad([encoded[i] for i in idx], length=length,
                          batch=batch_size)
    batch = place_batch(state, batch)
    scores = _score_step(graphdef=graphdef, state=state, batch=batch)
    out[idx] = np.asarray(scores[: len(idx)], np.float32)
  return out


# ----------------------------------------------------------------------------
# Training.


def group_loss(
    model: CrossEncoder,
    batch: dict[str, jax.Array],
    labels: Float[_AnyArray, "q g"],
    *,
    loss: str = "softmax_ce",
    where: Shaped[_AnyArray, "q g"] | None = None,
) -> Float[Array, ""]:
  """LTR loss of groups of pairs: `Q` queries x `G` candidates each.

  Args:
    model: The cross-encoder (its train/eval mode decides dropout).
    batch: Tokenized pairs `[Q * G, L]`, group-major (query `q`'s
      candidates are rows `q*G ... q*G+G-1`).
    labels: `[Q, G]` relevance labels.
    loss: A name of `LOSSES`.
    where: Optional boolean `[Q, G]` validity mask.

  Returns:
    The scalar loss.
  """
  labels = jnp.asarray(labels)
  scores = model(batch["input_ids"], batch["attention_mask"],
                 batch["token_type_ids"])
  scores = scores.reshape(labels.shape)
  if loss == "pointwise_bce":
    labels = (labels > 0).astype(jnp.float32)
  return ltr_losses.get(loss, LOSSES)(scores, labels, where=where)


def init_optimizer(
    tx: optax.GradientTransformation, params: Any
) -> Any:
  """`lowrank.train.init_opt_state(tx, params)`, sharded like `params`.

  `make_train_step` donates the optimizer state; some transformations
  (e.g. GaLore) return states whose leaves share buffers with each other or
  with `params`, which XLA refuses to donate twice, so the state gets fresh
  buffers. When `params` live on a mesh, the state is sharded like them
  (`lowrank.sharding.shardings_like_params`).
  """
  on_mesh = any(
      isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding)
      for leaf in jax.tree.leaves(params))
  # Each state leaf follows its parameter's sharding (counters are
  # replicated on the same mesh) instead of landing on one device.
  shardings = (sharding.shardings_like_params(
      jax.eval_shape(tx.init, params), params) if on_mesh else None)
  return train.init_opt_state(tx, params, shardings=shardings)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    loss: str = "softmax_ce",
) -> Callable[..., tuple[Any, Any, dict[str, jax.Array]]]:
  """`lowrank.train.make_train_step` on `group_loss`, labels apart.

  `graphdef, params, rest = nnx.split(model, trainable_filter(m), ...)`
  (pure states, `nnx.as_pure`); `tx` is any optax transformation (AdamW,
  `lowrank.optim.galore_adamw`, ...). Params and optimizer state are
  donated: build the state with `init_optimizer`.

  Returns:
    `step(params, opt_state, rest, batch, labels) -> (params, opt_state,
    {"loss", "grad_norm"})`.
  """
  ltr_losses.get(loss, LOSSES)  # Validates the name early.
  step = train.make_train_step(
      graphdef,
      lambda model, pair: group_loss(model, *pair, loss=loss), tx)

  def run(params, opt_state, rest, batch, labels):
    return step(params, opt_state, rest, (batch, labels))

  return run
