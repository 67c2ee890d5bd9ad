"""ColBERT late interaction: token-vector encoder, MaxSim, losses, search.

A query and a document are each encoded to a bag of L2-normalised token
vectors (a BERT encoder followed by a bias-free linear projection to `dim`,
128 by default), and scored by MaxSim: the sum over query tokens of the best
cosine against any document token,

  score(q, d) = Σ_{i ∈ q} max_{j ∈ d} <q_i, d_j>.

Tokenisation follows ColBERT (v1/v2):

* queries: `[CLS] [Q] tokens... [SEP]`, then `[MASK]` up to `query_maxlen`
  (32). The `[MASK]` tokens are query augmentation: their output vectors are
  real query vectors that take part in MaxSim. With
  `attend_to_mask_tokens=True` (default) the encoder also attends to them
  (ColBERT's `attend_to_mask_tokens` option; ColBERTv2's default is False,
  which keeps them out of the attention keys but still scores them).
* documents: `[CLS] [D] tokens... [SEP]`, padded with `[PAD]`, truncated at
  `doc_maxlen` (180, ColBERT v1's default; ColBERTv2's is 220). Output
  vectors of punctuation tokens (the vocabulary ids of `string.punctuation`,
  the skiplist) and of padding are masked out and zeroed.
* `[Q]` / `[D]` are the vocabulary's `[unused0]` / `[unused1]`, inserted
  right after `[CLS]` (the text is truncated so the total fits the maximum
  length).

Embedding texts (`ColBERT.embed_queries` / `embed_documents`) is jitted with
length bucketing (queries always have `query_maxlen` tokens; documents are
padded to the smallest of `bert.LENGTH_BUCKETS` that fits), so there is at
most one compilation per bucket, and returns padded arrays plus boolean
masks. `ColBERT.encode_queries` / `ColBERT.encode_documents` are the
differentiable versions on tokenised batches, for training.

Scoring and search (pure functions on arrays):

* `maxsim`: `[Q, N]` MaxSim scores by a masked einsum + max, in blocks of
  documents so memory stays `O(Q · doc_chunk · Tq · Td)`.
* `search_exact`: exact MaxSim top-k over a corpus, streaming over document
  blocks with a running top-k (no C++ PLAID: exact search only).
* `search_muvera`: MUVERA retrieval (`lowrank.retrieval.muvera`): single-
  vector dot products of query FDEs against document FDEs pick `rerank`
  candidates, which exact MaxSim reranks to the top `k`
  (`rerank_candidates`).

Training losses: `in_batch_loss` (each query against every document of the
batch, softmax cross-entropy over MaxSim scores) and `distillation_loss`
(KL divergence from teacher scores over each query's candidate list, with
an optional in-batch term, as ColBERTv2).

Example: LoRA on the encoder's query/value projections, ColBERT projection
trained fully, in-batch loss, with `lowrank.train` (the sharded version,
with `train.shardings`, is `tests/retrieval/colbert_test.py`)::

  with sharding.use_mesh(sharding.make_mesh()):
    model = colbert.ColBERT.from_pretrained(assets.minilm_path())
    adapters.inject(model, targets=r".*\\.(query|value)", rank=8)
  graphdef, params, rest = train.split(model,
                                       colbert.ADAPTERS_AND_PROJECTION)
  tx = optax.adamw(1e-3)
  opt_state = train.init_opt_state(tx, params)

  def loss_fn(m, batch):  # batch: (query ids, document ids)
    q, q_mask = m.encode_queries(batch[0])
    d, d_mask = m.encode_documents(batch[1])
    return colbert.in_batch_loss(q, q_mask, d, d_mask)

  step = train.make_train_step(graphdef, loss_fn, tx)
  qs = model.tokenize_queries(queries)
  ds = model.tokenize_documents(docs, length=128)
  params, opt_state, metrics = step(params, opt_state, rest, (qs, ds))

References: Khattab & Zaharia 2020, "ColBERT: Efficient and Effective Passage
Search via Contextualized Late Interaction over BERT",
https://arxiv.org/abs/2004.12832; Santhanam et al. 2022, "ColBERTv2:
Effective and Efficient Retrieval via Lightweight Late Interaction",
https://arxiv.org/abs/2112.01488; Dhulipala et al. 2024, "MUVERA",
https://arxiv.org/abs/2405.19504.
"""

from collections.abc import Sequence
import functools
import os
import string
from typing import Any
import warnings

from flax import nnx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Shaped
import numpy as np

from lowrank import sharding
from lowrank.models import bert
from lowrank.models import encoding
from lowrank.retrieval import muvera
from lowrank.retrieval import search

_AnyArray = jax.Array | np.ndarray
PathLike = str | os.PathLike

QUERY_MARKER = "[unused0]"
DOC_MARKER = "[unused1]"
PROJECTION_INITS = ("orthogonal", "normal")
# Trainable parameters for adapter training: every adapter parameter plus
# the ColBERT projection (`linear.kernel`), which has no pretrained value.
ADAPTERS_AND_PROJECTION = nnx.Any(nnx.LoRAParam, nnx.PathContains("linear"))
_HIGHEST = jax.lax.Precision.HIGHEST


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
  if not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}.")
  return int(value)


def _token_id(tokenizer: bert.Tokenizer, token: str, what: str) -> int:
  token_id = tokenizer.token_to_id(token)
  if token_id is None:
    raise ValueError(
        f"The {what} token {token!r} is not in the tokenizer's vocabulary."
    )
  return int(token_id)


def _encoder_mesh(encoder: nnx.Module) -> jax.sharding.Mesh | None:
  for leaf in jax.tree.leaves(nnx.state(encoder, nnx.Param)):
    sh = getattr(leaf, "sharding", None)
    if isinstance(sh, jax.sharding.NamedSharding):
      return sh.mesh
  return None


LINEAR_WEIGHT = "linear.weight"  # The projection's name in checkpoints.


def _is_texts(batch: Any) -> bool:
  """Whether `batch` is texts (a str or a sequence of str), not a batch."""
  if isinstance(batch, str):
    return True
  return (isinstance(batch, Sequence) and bool(batch)
          and all(isinstance(t, str) for t in batch))


def _warn_texts(old: str, new: str) -> None:
  warnings.warn(
      f"ColBERT.{old}(texts) is deprecated: `{old}` now takes a tokenized "
      f"batch; call ColBERT.{new}(texts) for texts.",
      DeprecationWarning, stacklevel=3)


def _no_kwargs(name: str, kwargs: dict[str, Any]) -> None:
  if kwargs:
    raise TypeError(
        f"ColBERT.{name}(batch) takes no options (they belong to the "
        f"text embedders embed_queries/embed_documents); got "
        f"{sorted(kwargs)}.")


class ColBERT(nnx.Module):
  """BERT encoder + bias-free projection to `dim`, L2-normalised tokens.

  The attribute names follow the ColBERT checkpoints' state dict (`bert.*`,
  `linear.weight`), so adapter target regexes such as `r".*\\.(query|value)"`
  match `bert.encoder.layer.<i>.attention.self.query`. The tokenizer and the
  special-token ids are static attributes (part of the graph definition).

  Attributes:
    bert: The `bert.BertModel` encoder.
    linear: `nnx.Linear(hidden_size, dim, use_bias=False)`.
    tokenizer: The encoder's `bert.Tokenizer`.
    dim: Token-vector dimension.
    query_maxlen: Query length (`[MASK]`-padded to exactly this).
    doc_maxlen: Maximum document length (special tokens included).
    attend_to_mask_tokens: Whether the encoder attends to query `[MASK]`s.
    skiplist: Vocabulary ids masked out of document vectors.
  """

  def __init__(
      self,
      encoder: bert.BertModel,
      tokenizer: bert.Tokenizer,
      *,
      dim: int = 128,
      query_maxlen: int = 32,
      doc_maxlen: int = 180,
      attend_to_mask_tokens: bool = True,
      skiplist: str | Sequence[str] = string.punctuation,
      projection_init: str = "orthogonal",
      query_marker: str = QUERY_MARKER,
      doc_marker: str = DOC_MARKER,
      rngs: nnx.Rngs | int = 0,
  ):
    """Wraps an encoder and builds the projection.

    Args:
      encoder: A BERT encoder (e.g. from `bert.load_pretrained`).
      tokenizer: Its tokenizer (must have `[CLS]`, `[SEP]`, `[MASK]` and the
        marker tokens).
      dim: Output token-vector dimension.
      query_maxlen: Query length after `[MASK]` augmentation (>= 3).
      doc_maxlen: Document truncation length (>= 3, at most the encoder's
        `max_position_embeddings`).
      attend_to_mask_tokens: Let the encoder attend to the query `[MASK]`
        tokens (they are scored either way).
      skiplist: Strings whose single-token vocabulary ids are masked out of
        document vectors; a string is split into characters (default all of
        `string.punctuation`). Strings not in the vocabulary are ignored.
      projection_init: `"orthogonal"` (a random isometry onto a
        `dim`-dimensional subspace: an untrained model keeps the encoder's
        token geometry up to a Johnson-Lindenstrauss distortion) or
        `"normal"` (std `initializer_range`, as BERT's own init).
      query_marker: Token inserted after `[CLS]` in queries.
      doc_marker: Token inserted after `[CLS]` in documents.
      rngs: `nnx.Rngs` or an int seed for the projection.

    Raises:
      ValueError: On a bad size, an unknown `projection_init`, or a required
        token missing from the vocabulary.
    """
    config = encoder.config
    self.dim = _positive_int("dim", dim)
    self.query_maxlen = _positive_int("query_maxlen", query_maxlen, 3)
    self.doc_maxlen = _positive_int("doc_maxlen", doc_maxlen, 3)
    for name, value in (("query_maxlen", self.query_maxlen),
                        ("doc_maxlen", self.doc_maxlen)):
      if value > config.max_position_embeddings:
        raise ValueError(
            f"{name}={value} exceeds the encoder's max_position_embeddings "
            f"({config.max_position_embeddings})."
        )
    if projection_init not in PROJECTION_INITS:
      raise ValueError(
          f"projection_init must be one of {PROJECTION_INITS}; got "
          f"{projection_init!r}."
      )
    self.attend_to_mask_tokens = bool(attend_to_mask_tokens)
    self.tokenizer = tokenizer
    self.cls_id = _token_id(tokenizer, "[CLS]", "[CLS]")
    self.sep_id = _token_id(tokenizer, "[SEP]", "[SEP]")
    self.mask_id = _token_id(tokenizer, "[MASK]", "[MASK]")
    self.pad_id = int(tokenizer.pad_token_id)
    self.query_marker_id = _token_id(tokenizer, query_marker, "query marker")
    self.doc_marker_id = _token_id(tokenizer, doc_marker, "document marker")
    symbols = list(skiplist) if isinstance(skiplist, str) else list(skiplist)
    ids = {tokenizer.token_to_id(s) for s in symbols}
    self.skiplist = tuple(sorted(int(i) for i in ids if i is not None))

    rngs = nnx.Rngs(rngs) if isinstance(rngs, int) else rngs
    if projection_init == "orthogonal":
      init = nnx.initializers.orthogonal()
    else:
      init = nnx.initializers.normal(config.initializer_range)

    def build():
      return nnx.Linear(
          config.hidden_size,
          self.dim,
          use_bias=False,
          dtype=config.dtype,
          param_dtype=config.param_dtype,
          kernel_init=nnx.with_partitioning(init, ("embed", None)),
          rngs=rngs,
      )

    self.bert = encoder
    mesh = _encoder_mesh(encoder)
    if not jax.sharding.get_abstract_mesh().empty:
      self.linear = build()
    elif mesh is None:  # An encoder on no mesh: the head on none either.
      with nnx.use_eager_sharding(False):
        self.linear = build()
    else:
      with sharding.use_mesh(mesh):
        self.linear = build()

  @classmethod
  def from_pretrained(
      cls,
      path: PathLike,
      *,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      **kwargs,
  ) -> "ColBERT":
    """A ColBERT model from a checkpoint directory.

    Either a plain HF BERT checkpoint (e.g. `lowrank.assets.minilm_path()`),
    which gets a fresh projection (see `projection_init`), or a ColBERT
    checkpoint (BERT weights plus the projection `linear.weight`
    `[dim, hidden]`, as the ColBERT library saves it), whose projection is
    loaded and whose `dim` is read from it.

    Args:
      path: The checkpoint directory.
      dtype: Compute dtype of the encoder.
      param_dtype: Parameter dtype.
      **kwargs: `ColBERT` constructor options (`dim`, `query_maxlen`, ...).

    Returns:
      The model, in eval mode.

    Raises:
      ValueError: If a `dim` option contradicts the checkpoint's
        `linear.weight`, or that tensor has the wrong shape (and see
        `bert.load_pretrained`).
    """
    head = bert.read_tensor(path, LINEAR_WEIGHT)
    encoder = bert.load_pretrained(
        path, dtype=dtype, param_dtype=param_dtype, ignore=(LINEAR_WEIGHT,)
    )
    tokenizer = bert.load_tokenizer(path)
    if head is not None:
      hidden = encoder.config.hidden_size
      if head.ndim != 2 or head.shape[1] != hidden:
        raise ValueError(
            f"{LINEAR_WEIGHT}: expected shape [dim, {hidden}], found "
            f"{tuple(head.shape)}."
        )
      if kwargs.get("dim", head.shape[0]) != head.shape[0]:
        raise ValueError(
            f"dim={kwargs['dim']} contradicts the checkpoint's "
            f"{LINEAR_WEIGHT} of shape {tuple(head.shape)}."
        )
      kwargs["dim"] = int(head.shape[0])
    model = cls(encoder, tokenizer, **kwargs)
    if head is not None:
      kernel = model.linear.kernel
      value = jnp.asarray(head.T, param_dtype)
      sharding_ = getattr(kernel.get_value(), "sharding", None)
      if sharding_ is not None:
        value = jax.device_put(value, sharding_)
      kernel.set_value(value)
    model.eval()
    return model

  # --------------------------------------------------------------------------
  # Tokenisation (host side, numpy).

  def _with_marker(
      self, texts: Sequence[str], maxlen: int, marker: int
  ) -> list[list[int]]:
    if isinstance(texts, str):
      raise TypeError("texts must be a sequence of strings, not one string.")
    encoded = self.tokenizer.tokenize_unpadded(list(texts),
                                               max_length=maxlen - 1)
    out = []
    for i, (ids, _) in enumerate(encoded):
      if not ids or ids[0] != self.cls_id or ids[-1] != self.sep_id:
        raise ValueError(
            f"texts[{i}]: the tokenizer must produce [CLS] ... [SEP]; got "
            f"ids starting {ids[:3]} and ending {ids[-2:]}."
        )
      out.append([ids[0], marker] + list(ids[1:]))
    return out

  def tokenize_queries(
      self, texts: Sequence[str], *, batch: int | None = None
  ) -> dict[str, np.ndarray]:
    """`[CLS] [Q] text [SEP] [MASK]...` at exactly `query_maxlen` tokens.

    Args:
      texts: Query texts.
      batch: Pad the batch with all-`[PAD]` rows up to this many (for fixed
        shapes); such rows get an all-False vector mask.

    Returns:
      `{"input_ids", "attention_mask", "token_type_ids"}`, int32
      `[batch, query_maxlen]`. `attention_mask` is 1 on every token (on the
      text tokens only with `attend_to_mask_tokens=False`).
    """
    rows = self._with_marker(texts, self.query_maxlen, self.query_marker_id)
    return self._pad_queries(rows, len(rows) if batch is None else batch)

  def _pad_queries(self, rows, batch):
    length = self.query_maxlen
    ids = np.full((batch, length), self.pad_id, np.int32)
    mask = np.zeros((batch, length), np.int32)
    for i, row in enumerate(rows):
      ids[i, :] = self.mask_id
      ids[i, :len(row)] = row
      mask[i, :] = 1 if self.attend_to_mask_tokens else 0
      mask[i, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "token_type_ids": np.zeros_like(ids)}

  def tokenize_documents(
      self,
      texts: Sequence[str],
      *,
      length: int | None = None,
      batch: int | None = None,
  ) -> dict[str, np.ndarray]:
    """`[CLS] [D] text [SEP] [PAD]...`, truncated at `doc_maxlen`.

    Args:
      texts: Document texts.
      length: Pad to this length (default: the longest encoding).
      batch: Pad the batch with all-`[PAD]` rows up to this many.

    Returns:
      `{"input_ids", "attention_mask", "token_type_ids"}`, int32 `[B, L]`.

    Raises:
      ValueError: If `length` is shorter than an encoding.
    """
    rows = self._with_marker(texts, self.doc_maxlen, self.doc_marker_id)
    return self._pad_docs(rows, length, len(rows) if batch is None else batch)

  def _pad_docs(self, rows, length, batch):
    longest = max((len(r) for r in rows), default=0)
    length = longest if length is None else length
    if length < longest:
      raise ValueError(
          f"length={length} is shorter than the longest document encoding "
          f"({longest} tokens)."
      )
    ids = np.full((batch, length), self.pad_id, np.int32)
    mask = np.zeros((batch, length), np.int32)
    for i, row in enumerate(rows):
      ids[i, :len(row)] = row
      mask[i, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "token_type_ids": np.zeros_like(ids)}

  # --------------------------------------------------------------------------
  # Differentiable encoders on tokenised batches.

  def __call__(
      self,
      input_ids: Int[_AnyArray, "b l"],
      attention_mask: Shaped[_AnyArray, "b l"],
      token_type_ids: Int[_AnyArray, "b l"] | None = None,
  ) -> Float[Array, "b l dim"]:
    """Encoder + projection + L2 normalisation of every position (float32)."""
    hidden = self.bert(input_ids, attention_mask=attention_mask,
                       token_type_ids=token_type_ids)
    return bert.l2_normalize(self.linear(hidden).astype(jnp.float32))

  def encode_queries(
      self, batch: dict[str, _AnyArray] | Sequence[str], **kwargs
  ) -> tuple[Float[_AnyArray, "b l dim"], Bool[_AnyArray, "b l"]]:
    """Query token vectors and their mask from `tokenize_queries` output.

    Every non-`[PAD]` position is a query vector, `[MASK]`s included.

    Args:
      batch: `tokenize_queries` output.
      **kwargs: Only with the deprecated call on texts (see below).

    Returns:
      `(vectors [b, l, dim], mask [b, l] bool)`; masked positions are zero.

    A sequence of strings instead of a batch is the deprecated spelling of
    `embed_queries(texts, **kwargs)` (this method embedded texts before
    `encode_*` came to mean token-id batches); it warns and forwards.
    """
    if _is_texts(batch):
      _warn_texts("encode_queries", "embed_queries")
      return self.embed_queries(batch, **kwargs)
    _no_kwargs("encode_queries", kwargs)
    ids = jnp.asarray(batch["input_ids"])
    vecs = self(ids, batch["attention_mask"], batch.get("token_type_ids"))
    mask = ids != self.pad_id
    return vecs * mask[..., None].astype(vecs.dtype), mask

  def encode_documents(
      self, batch: dict[str, _AnyArray] | Sequence[str], **kwargs
  ) -> tuple[Float[_AnyArray, "b l dim"], Bool[_AnyArray, "b l"]]:
    """Document token vectors and mask from `tokenize_documents` output.

    Padding and skiplist (punctuation) positions are masked out and zeroed.

    Args:
      batch: `tokenize_documents` output.
      **kwargs: Only with the deprecated call on texts (see below).

    Returns:
      `(vectors [b, l, dim], mask [b, l] bool)`.

    A sequence of strings instead of a batch is the deprecated spelling of
    `embed_documents(texts, **kwargs)`; it warns and forwards.
    """
    if _is_texts(batch):
      _warn_texts("encode_documents", "embed_documents")
      return self.embed_documents(batch, **kwargs)
    _no_kwargs("encode_documents", kwargs)
    ids = jnp.asarray(batch["input_ids"])
    attn = jnp.asarray(batch["attention_mask"]) != 0
    vecs = self(ids, attn.astype(jnp.int32), batch.get("token_type_ids"))
    mask = attn & (ids != self.pad_id)
    if self.skiplist:
      skip = jnp.asarray(self.skiplist, jnp.int32)
      mask = mask & ~jnp.any(ids[..., None] == skip[None, None, :], axis=-1)
    return vecs * mask[..., None].astype(vecs.dtype), mask

  # --------------------------------------------------------------------------
  # Jitted, bucketed encoding of texts.

  def embed_queries(
      self,
      texts: Sequence[str],
      *,
      batch_size: int = 32,
      dtype: Any = np.float32,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Embeds query texts (jitted; one compilation per batch size).

    Args:
      texts: Query texts.
      batch_size: Rows per forward call (the last batch is padded).
      dtype: Output dtype of the vectors (e.g. `np.float16` to halve memory).

    Returns:
      `(vectors [N, query_maxlen, dim], mask [N, query_maxlen] bool)`.
    """
    return self._encode(texts, True, batch_size, dtype)

  def embed_documents(
      self,
      texts: Sequence[str],
      *,
      batch_size: int = 32,
      dtype: Any = np.float32,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Embeds document texts (jitted, length-bucketed).

    Texts are tokenized once, sorted by length, batched (the last batch
    padded with empty rows) and padded to the smallest `bert.LENGTH_BUCKETS`
    entry that fits (capped at `doc_maxlen`): at most one compilation per
    bucket.

    Args:
      texts: Document texts.
      batch_size: Rows per forward call.
      dtype: Output dtype of the vectors.

    Returns:
      `(vectors [N, L, dim], mask [N, L] bool)` in the order of `texts`, `L`
      the longest encoding; masked positions (padding, punctuation) are
      zero vectors.
    """
    return self._encode(texts, False, batch_size, dtype)

  def _encode(self, texts, is_query, batch_size, dtype):
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive; got {batch_size}.")
    if isinstance(texts, str):
      texts = [texts]
    maxlen = self.query_maxlen if is_query else self.doc_maxlen
    marker = self.query_marker_id if is_query else self.doc_marker_id
    rows = self._with_marker(texts, maxlen, marker)
    longest = self.query_maxlen if is_query else max(
        (len(r) for r in rows), default=0)
    vecs = np.zeros((len(rows), longest, self.dim), dtype)
    masks = np.zeros((len(rows), longest), bool)
    if not rows:
      return vecs, masks
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    graphdef, state = nnx.split(nnx.view(self, deterministic=True))
    for start in range(0, len(order), batch_size):
      idx = order[start:start + batch_size]
      chunk = [rows[i] for i in idx]
      if is_query:
        batch = self._pad_queries(chunk, batch_size)
      else:
        length = bert.bucket_length(max(len(r) for r in chunk), maxlen)
        batch = self._pad_docs(chunk, length, batch_size)
      batch_sharding = sharding.batch_sharding_like(
          state, batch["input_ids"].shape)
      if batch_sharding is not None:
        batch = jax.device_put(batch, batch_sharding)
      v, m = _encode_step(graphdef, state, batch=batch, is_query=is_query)
      n, width = len(idx), min(v.shape[1], longest)
      vecs[np.asarray(idx), :width] = np.asarray(v[:n, :width]).astype(dtype)
      masks[np.asarray(idx), :width] = np.asarray(m[:n, :width])
    return vecs, masks


def _encode_batch(model, batch, is_query):
  if is_query:
    return model.encode_queries(batch)
  return model.encode_documents(batch)


_encode_step = encoding.SplitJit(_encode_batch, ("is_query",))


def encode_trace_count() -> int:
  """How many times the jitted text encoder has been traced (compiled)."""
  return _encode_step.traces


def index(
    model: ColBERT,
    corpus_texts: Sequence[str],
    *,
    batch_size: int = 32,
    dtype: Any = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
  """Embeds a corpus: `model.embed_documents(corpus_texts)`.

  Args:
    model: The ColBERT model.
    corpus_texts: Document texts, in corpus order.
    batch_size: Rows per forward call.
    dtype: Output dtype of the vectors.

  Returns:
    `(doc vectors [N, L, dim], masks [N, L] bool)`.
  """
  return model.embed_documents(corpus_texts, batch_size=batch_size,
                               dtype=dtype)


# ----------------------------------------------------------------------------
# MaxSim scoring.


def _check_multi(name, x, mask, dim=None):
  if x.ndim != 3:
    raise ValueError(f"{name} must be [count, tokens, dim]; got {x.shape}.")
  if dim is not None and x.shape[-1] != dim:
    raise ValueError(
        f"{name} has dimension {x.shape[-1]}; the queries have {dim}."
    )
  if mask.shape != x.shape[:2]:
    raise ValueError(
        f"{name} mask must be {x.shape[:2]} (count, tokens); got "
        f"{mask.shape}."
    )


def _token_sets(q, q_mask, docs, doc_mask, docs_name="docs"):
  """Query and document token vectors as arrays, masks as bool; checked."""
  q, docs = jnp.asarray(q), jnp.asarray(docs)
  q_mask, doc_mask = jnp.asarray(q_mask) != 0, jnp.asarray(doc_mask) != 0
  _check_multi("q", q, q_mask)
  _check_multi(docs_name, docs, doc_mask, q.shape[-1])
  return q, q_mask, docs, doc_mask


def _topk_over_query_blocks(fn, k, query_chunk, *per_query):
  """`fn` mapped over blocks of `query_chunk` queries: top-`k` `[Q, k]` each.

  `per_query` are arrays with one row per query; each is zero-padded to a
  whole number of blocks and `fn` gets one block of each, returning that
  block's `(scores, indices)` `[block, k]` (the padding rows are dropped).
  """
  num_q = per_query[0].shape[0]
  if num_q == 0:
    return jnp.zeros((0, k), jnp.float32), jnp.zeros((0, k), jnp.int32)
  size = min(query_chunk, num_q)

  def blocks(x):
    x = jnp.pad(x, [(0, -num_q % size)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((-1, size) + x.shape[1:])

  scores, idx = jax.lax.map(lambda args: fn(*args),
                            tuple(blocks(x) for x in per_query))
  return scores.reshape(-1, k)[:num_q], idx.reshape(-1, k)[:num_q]


def _sum_of_max(sim, q_mask, d_mask):
  """MaxSim `[Q, N]` from token similarities `sim` `[Q, N, Tq, Td]`.

  `q_mask` is `[Q, Tq]`; `d_mask` is `[N, Td]` (documents shared by every
  query) or `[Q, N, Td]` (each query's own). A document with no valid token
  scores 0.
  """
  sim = jnp.where(d_mask[..., None, :], sim, -jnp.inf)
  best = jnp.max(sim, axis=-1)  # [Q, N, Tq]
  best = jnp.where(jnp.any(d_mask, axis=-1)[..., None], best, 0.0)
  return jnp.sum(jnp.where(q_mask[:, None, :], best, 0.0), axis=-1)


def _block_scores(q, q_mask, d, d_mask, precision):
  """MaxSim `[Q, N]` of a query block against a document block."""
  sim = jnp.einsum("qae,nbe->qnab", q, d, precision=precision,
                   preferred_element_type=jnp.float32)
  return _sum_of_max(sim, q_mask, d_mask)


@functools.partial(jax.jit, static_argnames=("doc_chunk", "precision"))
def maxsim(
    q: Float[_AnyArray, "nq tq dim"],
    q_mask: Shaped[_AnyArray, "nq tq"],
    d: Float[_AnyArray, "n td dim"],
    d_mask: Shaped[_AnyArray, "n td"],
    *,
    doc_chunk: int = 64,
    precision: jax.lax.Precision = _HIGHEST,
) -> Float[Array, "nq n"]:
  """MaxSim scores of every query against every document.

  `score[i, j] = Σ_{a: q_mask[i, a]} max_{b: d_mask[j, b]} <q[i, a], d[j, b]>`
  (a document with no valid token scores 0). Computed by a masked einsum +
  max over blocks of `doc_chunk` documents (the last block is clamped to end
  at `N`, so the corpus is never padded or copied).

  Args:
    q: Query token vectors.
    q_mask: Valid query tokens (nonzero / True).
    d: Document token vectors.
    d_mask: Valid document tokens.
    doc_chunk: Documents per block (static); memory is
      `O(nq · doc_chunk · tq · td)`.
    precision: Matmul precision (static).

  Returns:
    Float32 `[nq, n]`.

  Raises:
    ValueError: On inconsistent shapes or a non-positive `doc_chunk`.
  """
  q, q_mask, d, d_mask = _token_sets(q, q_mask, d, d_mask, "d")
  if doc_chunk < 1:
    raise ValueError(f"doc_chunk must be positive; got {doc_chunk}.")
  n = d.shape[0]
  chunk = min(doc_chunk, n)
  out = jnp.zeros((q.shape[0], n), jnp.float32)
  if n == 0:
    return out

  def body(i, out):
    start = jnp.minimum(i * chunk, n - chunk)
    dd = jax.lax.dynamic_slice_in_dim(d, start, chunk, axis=0)
    dm = jax.lax.dynamic_slice_in_dim(d_mask, start, chunk, axis=0)
    scores = _block_scores(q, q_mask, dd, dm, precision)
    # Overlapping rewrites of the clamped last block hold equal values.
    return jax.lax.dynamic_update_slice_in_dim(out, scores, start, axis=1)

  return jax.lax.fori_loop(0, -(-n // chunk), body, out)


# ----------------------------------------------------------------------------
# Losses.


def in_batch_loss(
    q: Float[_AnyArray, "b tq dim"],
    q_mask: Shaped[_AnyArray, "b tq"],
    d: Float[_AnyArray, "n td dim"],
    d_mask: Shaped[_AnyArray, "n td"],
    *,
    scale: jax.typing.ArrayLike = 1.0,
) -> Float[Array, ""]:
  """Softmax cross-entropy of each query over all documents of the batch.

  Query `i`'s positive is document `i`; the other documents (including any
  hard negatives appended after the first `b`) are negatives. Logits are
  `scale · MaxSim` (ColBERT uses the raw MaxSim, `scale=1`).

  Args:
    q: Query token vectors `[b, tq, dim]`.
    q_mask: Valid query tokens.
    d: Document token vectors `[n, td, dim]`, `n >= b`.
    d_mask: Valid document tokens.
    scale: Logit scale.

  Returns:
    The mean cross-entropy, a float32 scalar.

  Raises:
    ValueError: If there are fewer documents than queries.
  """
  b = q.shape[0]
  if d.shape[0] < b:
    raise ValueError(
        f"in_batch_loss needs at least one document per query ({b}); got "
        f"{d.shape[0]}."
    )
  scores = _block_scores(q, jnp.asarray(q_mask) != 0, d,
                         jnp.asarray(d_mask) != 0, _HIGHEST) * scale
  logp = jax.nn.log_softmax(scores, axis=-1)
  labels = jnp.arange(b)
  return -jnp.mean(logp[labels, labels])


def group_scores(
    q: Float[_AnyArray, "b tq dim"],
    q_mask: Shaped[_AnyArray, "b tq"],
    d: Float[_AnyArray, "b n td dim"],
    d_mask: Shaped[_AnyArray, "b n td"],
    *,
    precision: jax.lax.Precision = _HIGHEST,
) -> Float[Array, "b n"]:
  """MaxSim of query `i` against its own `n` documents `d[i]`: `[b, n]`."""
  q_mask, d_mask = jnp.asarray(q_mask) != 0, jnp.asarray(d_mask) != 0
  sim = jnp.einsum("bae,bnce->bnac", q, d, precision=precision,
                   preferred_element_type=jnp.float32)
  return _sum_of_max(sim, q_mask, d_mask)


def distillation_loss(
    q: Float[_AnyArray, "b tq dim"],
    q_mask: Shaped[_AnyArray, "b tq"],
    d: Float[_AnyArray, "b n td dim"],
    d_mask: Shaped[_AnyArray, "b n td"],
    teacher_scores: Float[_AnyArray, "tb tn"],
    *,
    temperature: jax.typing.ArrayLike = 1.0,
    in_batch_weight: jax.typing.ArrayLike = 0.0,
) -> Float[Array, ""]:
  """KL(teacher || student) over each query's candidates (+ in-batch CE).

  As ColBERTv2's distillation: query `i` has `n` candidates `d[i]` (the
  positive first) scored by a teacher (e.g. a cross-encoder); the student
  scores are MaxSim (`group_scores`), and the loss is
  `lowrank.ranking.losses.kl_distill(student, teacher, temperature=T)`,
  i.e. `Σ_j p_j (log p_j − log q_j)` with `p = softmax(teacher / T)` and
  `q = softmax(student / T)`, averaged over queries. With
  `in_batch_weight > 0` the in-batch cross-entropy over all `b · n`
  documents of the batch (query `i`'s positive is `d[i, 0]`) is added with
  that weight (ColBERTv2's `use_ib_negatives`).

  Args:
    q: Query token vectors `[b, tq, dim]`.
    q_mask: Valid query tokens.
    d: Candidate token vectors `[b, n, td, dim]`.
    d_mask: Valid candidate tokens `[b, n, td]`.
    teacher_scores: `[b, n]` teacher scores (logits, not probabilities).
    temperature: Softmax temperature of both distributions.
    in_batch_weight: Weight of the in-batch term (0: off).

  Returns:
    The loss, a float32 scalar.

  Raises:
    ValueError: If `teacher_scores` is not `[b, n]`, or `temperature` is
      not positive.
  """
  b, n = d.shape[:2]
  if tuple(teacher_scores.shape) != (b, n):
    raise ValueError(
        f"teacher_scores must be [b, n] = {(b, n)}; got "
        f"{tuple(teacher_scores.shape)}."
    )
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(
        f"distillation_loss: temperature must be > 0; got {temperature}.")
  student = group_scores(q, q_mask, d, d_mask)
  # Every candidate is valid, so this is `ranking.losses.kl_distill` without
  # its masking (retrieval sits below ranking and does not import it).
  log_p = jax.nn.log_softmax(
      jnp.asarray(teacher_scores, jnp.float32) / temperature, axis=-1)
  log_q = jax.nn.log_softmax(student / temperature, axis=-1)
  loss = jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))
  if isinstance(in_batch_weight, (int, float)) and in_batch_weight == 0:
    return loss
  flat = d.reshape((b * n,) + d.shape[2:])
  flat_mask = jnp.asarray(d_mask).reshape((b * n, d.shape[2]))
  scores = _block_scores(q, jnp.asarray(q_mask) != 0, flat, flat_mask != 0,
                         _HIGHEST)
  logp = jax.nn.log_softmax(scores, axis=-1)
  ib = -jnp.mean(logp[jnp.arange(b), jnp.arange(b) * n])
  return loss + in_batch_weight * ib


# ----------------------------------------------------------------------------
# Search.


@functools.partial(
    jax.jit, static_argnames=("k", "query_chunk", "doc_chunk", "precision")
)
def search_exact(
    q: Float[_AnyArray, "nq tq dim"],
    q_mask: Shaped[_AnyArray, "nq tq"],
    docs: Float[_AnyArray, "n td dim"],
    doc_mask: Shaped[_AnyArray, "n td"],
    k: int,
    *,
    query_chunk: int = 32,
    doc_chunk: int = 64,
    precision: jax.lax.Precision = _HIGHEST,
) -> tuple[Float[Array, "nq k"], Int[Array, "nq k"]]:
  """Exact MaxSim top-`k` over a corpus, streamed in document blocks.

  For each block of `query_chunk` queries the corpus is scanned in blocks of
  `doc_chunk` documents (the last one clamped to end at `N`; re-read
  documents are masked), keeping a running top-k merged by `lax.top_k`, so
  the `[Q, N]` score matrix never exists.

  Args:
    q: Query token vectors.
    q_mask: Valid query tokens.
    docs: Document token vectors.
    doc_mask: Valid document tokens.
    k: Results per query (static), `1 <= k <= N`.
    query_chunk: Queries per block (static; clipped to `Q`).
    doc_chunk: Documents per block (static; clipped to `N`).
    precision: Matmul precision (static).

  Returns:
    `(scores, indices)`, `[Q, k]` each: float32 MaxSim scores in descending
    order and int32 document indices (ties: lower index first, as
    `lowrank.retrieval.search.exact_search`).

  Raises:
    ValueError: On inconsistent shapes, `k` out of range or a non-positive
      chunk size.
  """
  q, q_mask, docs, doc_mask = _token_sets(q, q_mask, docs, doc_mask)
  num_docs = docs.shape[0]
  if not 1 <= k <= num_docs:
    raise ValueError(f"Need 1 <= k <= N = {num_docs}; got k = {k}.")
  if query_chunk < 1 or doc_chunk < 1:
    raise ValueError(
        f"Chunk sizes must be positive; got {query_chunk, doc_chunk}."
    )
  dc = min(doc_chunk, num_docs)
  num_dc = -(-num_docs // dc)

  def per_query_chunk(qq, qm):

    def body(i, carry):
      best_scores, best_idx = carry
      nominal = i * dc
      start = jnp.minimum(nominal, num_docs - dc)
      dd = jax.lax.dynamic_slice_in_dim(docs, start, dc, axis=0)
      dm = jax.lax.dynamic_slice_in_dim(doc_mask, start, dc, axis=0)
      scores = _block_scores(qq, qm, dd, dm, precision)
      idx = start + jnp.arange(dc, dtype=jnp.int32)
      scores = jnp.where((idx >= nominal)[None, :], scores, -jnp.inf)
      all_scores = jnp.concatenate([best_scores, scores], axis=1)
      all_idx = jnp.concatenate(
          [best_idx, jnp.broadcast_to(idx[None, :], scores.shape)], axis=1)
      top, pos = jax.lax.top_k(all_scores, k)
      return top, jnp.take_along_axis(all_idx, pos, axis=1)

    init = (jnp.full((qq.shape[0], k), -jnp.inf, jnp.float32),
            jnp.full((qq.shape[0], k), -1, jnp.int32))
    return jax.lax.fori_loop(0, num_dc, body, init)

  return _topk_over_query_blocks(per_query_chunk, k, query_chunk, q, q_mask)


def encode_fdes(
    docs: Float[_AnyArray, "n td dim"],
    doc_mask: Shaped[_AnyArray, "n td"],
    config: muvera.FDEConfig,
    *,
    batch_size: int = 256,
) -> Float[Array, "n out"]:
  """MUVERA document FDEs of a corpus, `batch_size` documents at a time.

  Args:
    docs: Document token vectors (masked positions are ignored).
    doc_mask: Valid document tokens.
    config: FDE parameters (`config.dimension` must equal `dim`).
    batch_size: Documents per call (fixed shape: one compilation).

  Returns:
    `[N, config.output_dim]` float32 document FDEs.

  Raises:
    ValueError: On inconsistent shapes or a non-positive `batch_size`.
  """
  docs = jnp.asarray(docs)
  doc_mask = jnp.asarray(doc_mask) != 0
  _check_multi("docs", docs, doc_mask, config.dimension)
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive; got {batch_size}.")
  n = docs.shape[0]
  b = min(batch_size, max(n, 1))
  parts = []
  for start in range(0, n, b):
    dd, dm = docs[start:start + b], doc_mask[start:start + b]
    m = dd.shape[0]
    if m < b:
      dd = jnp.pad(dd, ((0, b - m), (0, 0), (0, 0)))
      dm = jnp.pad(dm, ((0, b - m), (0, 0)))
    parts.append(muvera.encode_documents(dd, dm, config)[:m])
  if not parts:
    return jnp.zeros((0, config.output_dim), jnp.float32)
  return jnp.concatenate(parts, axis=0)


@functools.partial(
    jax.jit, static_argnames=("k", "query_chunk", "precision")
)
def rerank_candidates(
    q: Float[_AnyArray, "nq tq dim"],
    q_mask: Shaped[_AnyArray, "nq tq"],
    docs: Float[_AnyArray, "n td dim"],
    doc_mask: Shaped[_AnyArray, "n td"],
    candidates: Int[_AnyArray, "nq c"],
    k: int,
    *,
    query_chunk: int = 32,
    precision: jax.lax.Precision = _HIGHEST,
) -> tuple[Float[Array, "nq k"], Int[Array, "nq k"]]:
  """Exact MaxSim reranking of each query's candidate documents.

  Args:
    q: Query token vectors.
    q_mask: Valid query tokens.
    docs: Document token vectors of the corpus.
    doc_mask: Valid document tokens.
    candidates: `[Q, c]` distinct corpus indices per query.
    k: Results to keep (static), `1 <= k <= c`.
    query_chunk: Queries per block (static); memory
      `O(query_chunk · c · td · dim)` for the gathered candidates.
    precision: Matmul precision (static).

  Returns:
    `(scores, indices)` `[Q, k]`: MaxSim scores descending and corpus
    indices (ties: lower corpus index first).

  Raises:
    ValueError: On inconsistent shapes or `k` out of range.
  """
  q, q_mask, docs, doc_mask = _token_sets(q, q_mask, docs, doc_mask)
  candidates = jnp.asarray(candidates)
  num_q, c = candidates.shape
  if num_q != q.shape[0]:
    raise ValueError(
        f"candidates has {num_q} rows for {q.shape[0]} queries."
    )
  if not 1 <= k <= c:
    raise ValueError(f"Need 1 <= k <= {c} candidates; got k = {k}.")
  if query_chunk < 1:
    raise ValueError(f"query_chunk must be positive; got {query_chunk}.")
  # Ascending corpus order, so lax.top_k's tie-break is by corpus index.
  candidates = jnp.sort(candidates.astype(jnp.int32), axis=1)

  def per_chunk(qq, qm, cc):
    scores = group_scores(qq, qm, docs[cc], doc_mask[cc], precision=precision)
    top, pos = jax.lax.top_k(scores, k)
    return top, jnp.take_along_axis(cc, pos, axis=1)

  return _topk_over_query_blocks(per_chunk, k, query_chunk, q, q_mask,
                                 candidates)


def search_muvera(
    q: Float[_AnyArray, "nq tq dim"],
    q_mask: Shaped[_AnyArray, "nq tq"],
    docs: Float[_AnyArray, "n td dim"],
    doc_mask: Shaped[_AnyArray, "n td"],
    k: int,
    config: muvera.FDEConfig,
    rerank: int | None = None,
    *,
    doc_fdes: Float[_AnyArray, "n out"] | None = None,
    query_chunk: int = 32,
) -> tuple[Float[Array, "nq k"], Int[Array, "nq k"]]:
  """MUVERA retrieval of `rerank` candidates, exact MaxSim rerank to `k`.

  Query FDEs (`muvera.encode_queries`, per-partition sums) are matched by
  exact inner-product top-`rerank` (`search.exact_search`) against the
  document FDEs (`muvera.encode_documents`, per-partition averages; pass
  `doc_fdes` from `encode_fdes` to reuse them), and the candidates are
  reranked by exact MaxSim (`rerank_candidates`).

  Args:
    q: Query token vectors.
    q_mask: Valid query tokens (`[MASK]` augmentation tokens included).
    docs: Document token vectors.
    doc_mask: Valid document tokens.
    k: Results per query.
    config: FDE parameters (`config.dimension` must equal `dim`).
    rerank: Candidates retrieved by FDE and reranked (default `k`),
      `k <= rerank <= N`.
    doc_fdes: Precomputed `encode_fdes(docs, doc_mask, config)`.
    query_chunk: Queries per rerank block.

  Returns:
    `(scores, indices)` `[Q, k]`: MaxSim scores descending, corpus indices.

  Raises:
    ValueError: On inconsistent shapes or `k`, `rerank` out of range.
  """
  q, q_mask, docs, doc_mask = _token_sets(q, q_mask, docs, doc_mask)
  if config.dimension != q.shape[-1]:
    raise ValueError(
        f"config.dimension={config.dimension} but the token vectors have "
        f"dimension {q.shape[-1]}."
    )
  n = docs.shape[0]
  rerank = k if rerank is None else rerank
  if not 1 <= k <= rerank <= n:
    raise ValueError(
        f"Need 1 <= k <= rerank <= N = {n}; got k = {k}, rerank = {rerank}."
    )
  if doc_fdes is None:
    doc_fdes = encode_fdes(docs, doc_mask, config)
  doc_fdes = jnp.asarray(doc_fdes)
  if doc_fdes.shape != (n, config.output_dim):
    raise ValueError(
        f"doc_fdes must be [N, output_dim] = {(n, config.output_dim)}; got "
        f"{doc_fdes.shape}."
    )
  if q.shape[0] == 0:  # Nothing to encode or rerank.
    return jnp.zeros((0, k), jnp.float32), jnp.zeros((0, k), jnp.int32)
  q_fdes = muvera.encode_queries(q, q_mask, config)
  _, candidates = search.exact_search(q_fdes, doc_fdes, rerank)
  return rerank_candidates(q, q_mask, docs, doc_mask, candidates, k,
                           query_chunk=query_chunk)
