"""Sentence embeddings from a BERT encoder: `pool`, `encode`, `embed_texts`.

* `encode(model, batch)` runs the encoder on a token-id batch, pools and
  L2-normalises; it is jittable and differentiable (training).
* `embed_texts(model, tokenizer, texts)` embeds strings with a jitted forward
  whose input shapes come from a small fixed set (batch padded to
  `batch_size`, length padded to one of `LENGTH_BUCKETS`), so embedding 10k
  texts compiles at most once per length bucket.
* `bucketed_batches` (its length-sorted, bucket-padded batches) and
  `SplitJit` (its jitted step on a split module, counting compilations)
  serve the other text embedders too (SPLADE, ColBERT).

The model is a `lowrank.models.bert.BertModel` (anything called as
`model(input_ids, attention_mask=, token_type_ids=)` with a `config` giving
`hidden_size` and `max_position_embeddings`). These names, `SplitJit`
excepted, are also `lowrank.models.bert.<name>`.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
import warnings

from flax import nnx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Shaped
import numpy as np

from lowrank import sharding
from lowrank.models import wordpiece

_AnyArray = jax.Array | np.ndarray

POOLINGS = ("mean", "cls", "last")
# Sequence-length buckets for `embed_texts` (capped at `max_length`).
LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512)


def pool(
    hidden: Float[_AnyArray, "b l h"],
    attention_mask: Shaped[_AnyArray, "b l"],
    pooling: str = "mean",
) -> Float[Array, "b h"]:
  """Pools hidden states `[B, L, H]` to `[B, H]` float32.

  Args:
    hidden: Last hidden states.
    attention_mask: `[B, L]`, nonzero for real tokens.
    pooling: `"mean"` (mask-weighted mean, as sentence-transformers), `"cls"`
      (position 0) or `"last"` (the last position whose mask is set; works
      for left or right padding).

  Returns:
    Float32 `[B, H]`. All-padding rows give finite values.

  Raises:
    ValueError: On an unknown `pooling`.
  """
  if pooling not in POOLINGS:
    raise ValueError(f"Unknown pooling {pooling!r}; options: {POOLINGS}.")
  hidden = jnp.asarray(hidden).astype(jnp.float32)
  mask = (jnp.asarray(attention_mask) != 0).astype(jnp.float32)
  if pooling == "mean":
    total = jnp.einsum("blh,bl->bh", hidden, mask)
    count = jnp.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
    return total / count
  if pooling == "cls":
    return hidden[:, 0]
  length = hidden.shape[1]
  last = length - 1 - jnp.argmax(mask[:, ::-1], axis=1)
  return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def l2_normalize(
    x: Float[_AnyArray, "*b h"], eps: float = 1e-12
) -> Float[Array, "*b h"]:
  """`x / max(||x||, eps)` along the last axis (as torch's F.normalize)."""
  x = jnp.asarray(x)
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)


def encode(
    model: nnx.Module,
    batch: Mapping[str, _AnyArray],
    pooling: str = "mean",
    normalize: bool = True,
) -> Float[Array, "b h"]:
  """Forward + `pool` (+ L2 norm) on a tokenized batch; jittable.

  Args:
    model: The encoder (its train / eval mode decides dropout).
    batch: `{"input_ids", "attention_mask"[, "token_type_ids"]}` `[B, L]`.
    pooling: See `pool`.
    normalize: L2-normalise the result.

  Returns:
    Float32 `[B, H]` embeddings.
  """
  if pooling not in POOLINGS:
    raise ValueError(f"Unknown pooling {pooling!r}; options: {POOLINGS}.")
  mask = batch["attention_mask"]
  hidden = model(
      batch["input_ids"],
      attention_mask=mask,
      token_type_ids=batch.get("token_type_ids"),
  )
  out = pool(hidden, mask, pooling)
  return l2_normalize(out) if normalize else out


class SplitJit:
  """`fn(module, **kwargs)` jitted on the module's `nnx.split` parts.

  The step of a jitted text-embedding loop: called with the
  `(graphdef, state)` of `nnx.split(module)`, it merges them and returns
  `fn(module, **kwargs)`. The graph definition and the keyword arguments
  named in `static_argnames` are static, the state and every other argument
  traced, so each new batch shape or static value compiles once. `traces`
  counts the traces (compilations), for tests of the bucketing.

  Attributes:
    traces: How many times the step has been traced.
  """

  def __init__(self, fn: Callable[..., Any],
               static_argnames: Sequence[str] = ()):
    """Jits `fn`.

    Args:
      fn: `fn(module, **kwargs)`, jittable; its arguments are passed by
        keyword.
      static_argnames: The keyword arguments of `fn` that are static.
    """
    self.traces = 0

    def step(graphdef, state, **kwargs):
      self.traces += 1  # Python side effect: runs once per trace.
      return fn(nnx.merge(graphdef, state), **kwargs)

    self._step = jax.jit(step,
                         static_argnames=("graphdef", *static_argnames))

  def __call__(self, graphdef: Any, state: Any, **kwargs) -> Any:
    """`fn(nnx.merge(graphdef, state), **kwargs)`, jitted."""
    return self._step(graphdef=graphdef, state=state, **kwargs)


_embed_step = SplitJit(encode, ("pooling", "normalize"))


def embed_trace_count() -> int:
  """How many times `embed_texts`' jitted forward has been traced."""
  return _embed_step.traces


def bucket_length(n: int, max_length: int) -> int:
  """Smallest `LENGTH_BUCKETS` entry >= `n`, capped at `max_length`."""
  for b in LENGTH_BUCKETS:
    if b >= n:
      return min(b, max_length)
  return max_length


def bucketed_batches(
    tokenizer: wordpiece.Tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int,
    max_length: int,
) -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
  """Length-sorted, bucket-padded batches of `texts` for a jitted forward.

  Texts are tokenized once (truncated at `max_length`), sorted by length and
  cut into batches of `batch_size` rows (the last one padded with empty
  rows); each batch is padded to `bucket_length` of its longest text, so a
  jitted forward sees at most one shape per length bucket.

  Args:
    tokenizer: The tokenizer.
    texts: The texts (already checked to be strings).
    batch_size: Rows per batch.
    max_length: Truncation length, special tokens included.

  Yields:
    `(indices, batch)`: the positions in `texts` of the batch's first
    `len(indices)` rows, and the padded `[batch_size, L]` int32 arrays.
  """
  encoded = tokenizer.tokenize_unpadded(texts, max_length=max_length)
  order = sorted(range(len(texts)), key=lambda i: len(encoded[i][0]))
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    chunk = [encoded[i] for i in idx]
    length = bucket_length(max(len(ids) for ids, _ in chunk), max_length)
    yield idx, tokenizer.pad(chunk, length=length, batch=batch_size)


def embed_texts(
    model: nnx.Module,
    tokenizer: wordpiece.Tokenizer,
    texts: Sequence[str],
    *,
    pooling: str = "mean",
    normalize: bool = True,
    batch_size: int = 64,
    max_length: int | None = None,
) -> np.ndarray:
  """Embeds texts with a jitted, shape-bucketed forward (eval mode).

  Texts are tokenized once, sorted by length, cut into batches of
  `batch_size` (the last one padded with empty rows) and each batch is
  padded to the smallest of `LENGTH_BUCKETS` that fits, capped at
  `max_length`; so there is at most one compilation per bucket. When the
  parameters live on a mesh, the batch axis is sharded by the `batch`
  logical rule. The model itself is not modified (a dropout-off view is
  used).

  Args:
    model: The encoder.
    tokenizer: Its tokenizer.
    texts: The texts.
    pooling: `"mean"`, `"cls"` or `"last"` (see `pool`).
    normalize: L2-normalise the embeddings.
    batch_size: Rows per forward call.
    max_length: Truncation length (default `tokenizer.max_length`, capped
      at `max_position_embeddings`).

  Returns:
    Float32 `[N, H]` embeddings in the order of `texts`.

  Raises:
    ValueError: On an unknown pooling or a non-positive `batch_size`.
  """
  if pooling not in POOLINGS:
    raise ValueError(f"Unknown pooling {pooling!r}; options: {POOLINGS}.")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive; got {batch_size}.")
  texts = wordpiece.as_text_list(
      [texts] if isinstance(texts, str) else texts, "texts")
  max_length = tokenizer.max_length if max_length is None else max_length
  max_length = min(max_length, model.config.max_position_embeddings)
  out = np.zeros((len(texts), model.config.hidden_size), np.float32)
  if not texts:
    return out
  graphdef, state = nnx.split(nnx.view(model, deterministic=True))
  for idx, batch in bucketed_batches(tokenizer, texts, batch_size=batch_size,
                                     max_length=max_length):
    batch_sharding = sharding.batch_sharding_like(
        state, batch["input_ids"].shape)
    if batch_sharding is not None:
      batch = jax.device_put(batch, batch_sharding)
    result = _embed_step(graphdef, state, batch=batch, pooling=pooling,
                         normalize=normalize)
    out[np.asarray(idx)] = np.asarray(result[: len(idx)], np.float32)
  return out


def embed(*args, **kwargs) -> np.ndarray:
  """Deprecated alias of `embed_texts` (same arguments)."""
  warnings.warn(
      "lowrank.models.bert.embed is deprecated; use "
      "lowrank.models.bert.embed_texts (same arguments).",
      DeprecationWarning,
      stacklevel=2,
  )
  return embed_texts(*args, **kwargs)
