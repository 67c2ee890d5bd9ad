"""Bi-encoder retrievers: shared or separate towers, fixed or learned scale.

A `BiEncoder` embeds queries and documents with BERT towers and scores them
by inner product of the pooled (by default L2-normalised) embeddings:

* **towers**: one encoder for both sides (`shared`, the sentence-transformers
  default; `doc_encoder is None`) or a separate document encoder
  (`separate`, as DPR, Karpukhin et al. 2020,
  https://arxiv.org/abs/2004.04906), which doubles the parameters but lets
  the two sides specialise;
* **logit scale** (inverse temperature): fixed (`scale=20`, i.e.
  temperature 0.05, sentence-transformers' MultipleNegativesRankingLoss) or
  learned as `exp(log_scale)` clipped at `max_scale`, as CLIP (Radford et
  al. 2021, https://arxiv.org/abs/2103.00020) does;
* **loss**: `lowrank.retrieval.losses.in_batch_softmax` with optional
  symmetric and same-side (GTE) terms and appended hard negatives.

The learned scale is a `ScaleParam`, a subclass of `nnx.Param`: full
fine-tuning trains it with everything else, and with adapters
(`lowrank.adapters.inject`, whose factors are `nnx.LoRAParam`) train it too
by differentiating with respect to `trainable_filter(model)`.

Adapters reach both towers: the towers are attributes `query_encoder` and
`doc_encoder`, and BERT's linears keep their HF names below them, so a
target regex such as `r".*attention\\.self\\.(query|value)"` matches
`query_encoder.encoder.layer.0.attention.self.query` and its document
tower twin.
"""

from collections.abc import Mapping, Sequence
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float
import numpy as np

from lowrank.models import bert
from lowrank.retrieval import losses

TOWERS = ("shared", "separate")
_AnyArray = jax.Array | np.ndarray


class ScaleParam(nnx.Param):
  """The learned log logit scale of a `BiEncoder` (an `nnx.Param`)."""


class BiEncoder(nnx.Module):
  """Query and document towers plus the similarity's logit scale.

  Attributes:
    query_encoder: The query tower (`bert.BertModel`).
    doc_encoder: The document tower, or `None` when it is `query_encoder`.
    pooling: `"mean"`, `"cls"` or `"last"` (see `bert.pool`).
    normalize: L2-normalise embeddings (cosine similarity).
    log_scale: `ScaleParam` scalar `log(scale)` when learned, else `None`.
    fixed_scale: The scale when it is not learned.
    max_scale: Upper clip of the learned scale.
  """

  def __init__(
      self,
      query_encoder: bert.BertModel,
      doc_encoder: bert.BertModel | None = None,
      *,
      pooling: str = "mean",
      normalize: bool = True,
      scale: float | int = 20.0,
      learn_scale: bool = False,
      max_scale: float | int = 100.0,
  ):
    """Builds the bi-encoder.

    Args:
      query_encoder: Encoder of the queries (and of the documents when
        `doc_encoder` is `None`).
      doc_encoder: A separate document encoder, or `None` (shared tower).
        It must have the same hidden size as `query_encoder`.
      pooling: `"mean"`, `"cls"` or `"last"`.
      normalize: L2-normalise embeddings.
      scale: The logit scale (or the initial one when learned), > 0.
      learn_scale: Learn the scale (as `log_scale`).
      max_scale: Clip of the learned scale, >= `scale`.

    Raises:
      ValueError: On an unknown pooling, a non-positive scale, `scale >
        max_scale` or towers of different widths.
    """
    if pooling not in bert.POOLINGS:
      raise ValueError(
          f"pooling must be one of {bert.POOLINGS}; got {pooling!r}."
      )
    if not (isinstance(scale, (int, float)) and scale > 0
            and math.isfinite(scale)):
      raise ValueError(f"scale must be a positive number; got {scale!r}.")
    if learn_scale and not max_scale >= scale:
      raise ValueError(
          f"max_scale ({max_scale}) must be >= the initial scale ({scale})."
      )
    if doc_encoder is query_encoder:
      doc_encoder = None
    if doc_encoder is not None and (
        doc_encoder.config.hidden_size != query_encoder.config.hidden_size
    ):
      raise ValueError(
          "Query and document towers must have the same hidden size; got "
          f"{query_encoder.config.hidden_size} and "
          f"{doc_encoder.config.hidden_size}."
      )
    self.query_encoder = query_encoder
    self.doc_encoder = doc_encoder
    self.pooling = pooling
    self.normalize = bool(normalize)
    self.fixed_scale = float(scale)
    self.max_scale = float(max_scale)
    self.log_scale = (
        ScaleParam(jnp.asarray(math.log(scale), jnp.float32))
        if learn_scale else None
    )

  @property
  def towers(self) -> str:
    """`"shared"` or `"separate"`."""
    return "shared" if self.doc_encoder is None else "separate"

  @property
  def document_encoder(self) -> bert.BertModel:
    """The encoder that embeds documents (whichever tower that is)."""
    return self.query_encoder if self.doc_encoder is None else (
        self.doc_encoder)

  def scale(self) -> Float[Array, ""]:
    """The current logit scale (a float32 scalar)."""
    if self.log_scale is None:
      return jnp.asarray(self.fixed_scale, jnp.float32)
    log_max = math.log(self.max_scale)
    return jnp.exp(jnp.minimum(self.log_scale.get_value(), log_max))

  def encode_queries(
      self, batch: Mapping[str, _AnyArray]
  ) -> Float[Array, "b h"]:
    """Embeds a tokenized query batch (`bert.encode` on the query tower)."""
    return bert.encode(self.query_encoder, batch, self.pooling,
                       self.normalize)

  def encode_documents(
      self, batch: Mapping[str, _AnyArray]
  ) -> Float[Array, "n h"]:
    """Embeds a tokenized document batch with the document tower."""
    return bert.encode(self.document_encoder, batch, self.pooling,
                       self.normalize)

  def loss(
      self,
      queries: Mapping[str, _AnyArray],
      docs: Mapping[str, _AnyArray],
      *,
      symmetric: bool = False,
      same_side: bool = False,
  ) -> Float[Array, ""]:
    """In-batch softmax of a batch (`docs[:b]` positives, rest negatives).

    Args:
      queries: Tokenized queries `[b, Lq]`.
      docs: Tokenized documents `[n, Ld]`, `n >= b`: the `b` positives
        first, then any hard negatives.
      symmetric: Add the document-to-query term.
      same_side: Add query–query / document–document negatives.

    Returns:
      The scalar loss (see `losses.in_batch_softmax`).
    """
    return losses.in_batch_softmax(
        self.encode_queries(queries), self.encode_documents(docs),
        self.scale(), symmetric=symmetric, same_side=same_side)

  @classmethod
  def from_pretrained(
      cls,
      path: bert.PathLike,
      *,
      towers: str = "shared",
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      max_length: int | None = None,
      **kwargs,
  ) -> tuple["BiEncoder", bert.Tokenizer]:
    """A bi-encoder on a pretrained BERT directory (both towers from it).

    Args:
      path: HF-format BERT checkpoint directory (e.g.
        `lowrank.assets.minilm_path()`).
      towers: `"shared"` (one encoder) or `"separate"` (the checkpoint is
        loaded twice: two independent copies).
      dtype: Compute dtype.
      param_dtype: Parameter dtype.
      max_length: Tokenizer truncation length.
      **kwargs: `BiEncoder` options (`pooling`, `scale`, `learn_scale`...).

    Returns:
      `(model, tokenizer)`, the model in eval mode.

    Raises:
      ValueError: On an unknown `towers` (and see `__init__`).
    """
    if towers not in TOWERS:
      raise ValueError(f"towers must be one of {TOWERS}; got {towers!r}.")
    load = lambda: bert.load_pretrained(
        path, dtype=dtype, param_dtype=param_dtype)
    query_encoder = load()
    doc_encoder = load() if towers == "separate" else None
    tokenizer = bert.load_tokenizer(path, max_length=max_length)
    model = cls(query_encoder, doc_encoder, **kwargs)
    model.eval()
    return model, tokenizer


def trainable_filter(model: BiEncoder, adapted: bool) -> Any:
  """The `nnx` filter of what to train.

  Args:
    model: The bi-encoder.
    adapted: Whether adapters were injected (train their `nnx.LoRAParam`
      factors, plus the learned scale if any) rather than every `nnx.Param`.

  Returns:
    A filter for `nnx.split` / `nnx.state`.
  """
  if not adapted:
    return nnx.Param
  if model.log_scale is None:
    return nnx.LoRAParam
  return nnx.Any(nnx.LoRAParam, ScaleParam)


def embed_queries(
    model: BiEncoder,
    tokenizer: bert.Tokenizer,
    texts: Sequence[str],
    **kwargs,
) -> np.ndarray:
  """`bert.embed_texts` of queries with the query tower and pooling."""
  return bert.embed_texts(model.query_encoder, tokenizer, texts,
                          pooling=model.pooling, normalize=model.normalize,
                          **kwargs)


def embed_documents(
    model: BiEncoder,
    tokenizer: bert.Tokenizer,
    texts: Sequence[str],
    **kwargs,
) -> np.ndarray:
  """`bert.embed_texts` of documents with the document tower."""
  return bert.embed_texts(model.document_encoder, tokenizer, texts,
                          pooling=model.pooling, normalize=model.normalize,
                          **kwargs)
