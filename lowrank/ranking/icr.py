"""ICR: in-context reranking from a decoder's attention (zero-shot).

Chen, Jiménez Gutiérrez & Su, "Attention in Large Language Models Yields
Efficient Zero-Shot Re-Rankers", 2024, https://arxiv.org/abs/2410.02642

All `N` candidate documents go into ONE prompt, followed by the query:

    Here are some documents.
    [1] <document 1>
    ...
    [N] <document N>
    Find the documents relevant to the query.
    Query: <query>

Each document's raw score is the attention mass that the query's tokens put
on that document's tokens, summed over every layer and head (and averaged
over the query tokens, so that queries of different lengths are on one
scale). The same prompt with a content-free query (`"N/A"`) measures the
model's intrinsic bias towards each document (position, length, attention
sinks); the ICR score is

    score(d) = mass(query -> d) - mass("N/A" -> d),

two forward passes for `N` documents, no generation and no training. The
two passes share the document prefix (causal attention: the documents never
see the query) and run as one batch of two rows.

`lowrank.models.llama` does not return attention weights, so
`attention_forward` re-runs the decoder from its own modules (norms,
projections, MLP) and `llama`'s public rotary/mask helpers, keeping the
attention probabilities of each layer; its hidden states equal the model's
forward (tested to 1e-5). Adapters injected into the projections are used
as they are, since the projection modules themselves are called. Both layer
layouts (list and stacked `scan_layers`) are supported.

`rerank` has the contract of `lowrank.ranking.rerank`; `IcrReranker` plugs
into `lowrank.ranking.rerank` itself through `score_pairs`.
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

from lowrank.models import llama
from lowrank.ranking import cascade
from lowrank.ranking import decoder_text

_AnyArray = jax.Array | np.ndarray
QUERY_REDUCTIONS = ("mean", "sum")


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """The text pieces of an ICR prompt.

  Attributes:
    header: Opens the prompt.
    doc_label: Before each document; `{i}` is its 1-based number.
    doc_end: After each document.
    query_intro: Between the documents and the query.
    query_end: After the query (its tokens are not query tokens).
    content_free_query: The calibration query.
    max_query_tokens: Queries are cut to this many tokens.
    max_doc_tokens: Documents are cut to this many tokens.
  """

  header: str = "Here are some documents.\n"
  doc_label: str = "[{i}] "
  doc_end: str = "\n"
  query_intro: str = "Find the documents relevant to the query.\nQuery: "
  query_end: str = "\n"
  content_free_query: str = "N/A"
  max_query_tokens: int = 64
  max_doc_tokens: int = 128

  def __post_init__(self):
    decoder_text.check_token_limits(self.max_query_tokens,
                                    self.max_doc_tokens)


def build_prompt(
    tokenizer: Any,
    query: str,
    docs: Sequence[str],
    prompt_format: PromptFormat | None = None,
) -> tuple[list[int], list[int], list[bool]]:
  """Token ids of the ICR prompt with the document and query positions.

  Args:
    tokenizer: See `decoder_text.tokenize`.
    query: The query text (cut to `max_query_tokens`).
    docs: The documents (each cut to `max_doc_tokens`), in prompt order.
    prompt_format: The prompt pieces (default `PromptFormat()`).

  Returns:
    `(ids, segment, is_query)`: per token, the index of the document it
    belongs to (`-1` outside document text) and whether it is a query
    token.

  Raises:
    ValueError: If `docs` is empty or the query encodes to no token.
  """
  fmt = prompt_format or PromptFormat()
  if not docs:
    raise ValueError("An ICR prompt needs at least one document.")
  enc = functools.partial(decoder_text.tokenize, tokenizer)
  ids: list[int] = []
  segment: list[int] = []

  def add(tokens, seg):
    ids.extend(tokens)
    segment.extend([seg] * len(tokens))

  add(enc(fmt.header), -1)
  for i, doc in enumerate(docs):
    add(enc(fmt.doc_label.format(i=i + 1)), -1)
    add(enc(doc)[:fmt.max_doc_tokens], i)
    add(enc(fmt.doc_end), -1)
  add(enc(fmt.query_intro), -1)
  start = len(ids)
  query = enc(query)[:fmt.max_query_tokens]
  if not query:
    raise ValueError("The query encodes to no token; ICR needs query tokens.")
  add(query, -1)
  is_query = [start <= t < start + len(query) for t in range(len(ids))]
  add(enc(fmt.query_end), -1)
  is_query += [False] * (len(ids) - len(is_query))
  return ids, segment, is_query


# ----------------------------------------------------------------------------
# The decoder, re-run with its attention probabilities.


def _layer_modules(model: llama.LlamaForCausalLM) -> list[Any]:
  """The decoder layers as separate modules (slices of a stacked layout)."""
  layers = model.model.layers
  if not model.config.scan_layers:
    return list(layers)
  graphdef, state = nnx.split(layers)
  return [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state))
          for i in range(model.config.num_layers)]


def _attention(attn, x, cos, sin, bias):
  """`LlamaAttention` without a cache, also returning its probabilities.

  The same operations as `llama.grouped_attention` (float32 scores and
  softmax), with the probabilities `[B, KV, G, T, S]` kept.
  """
  b, t, _ = x.shape
  h, kv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
  q = attn.q_proj(x).reshape(b, t, h, d)
  k = attn.k_proj(x).reshape(b, t, kv, d)
  v = attn.v_proj(x).reshape(b, t, kv, d)
  q, k = llama.apply_rotary(q, cos, sin), llama.apply_rotary(k, cos, sin)
  qg = q.reshape(b, t, kv, h // kv, d)
  scores = jnp.einsum(
      "btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32
  ) / math.sqrt(d)
  probs = jax.nn.softmax(scores + bias, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
  return attn.o_proj(out.reshape(b, t, h * d)), probs


def attention_forward(
    model: llama.LlamaForCausalLM,
    input_ids: Int[_AnyArray, "b t"],
    attention_mask: Shaped[_AnyArray, "b t"],
    query_weights: Float[_AnyArray, "b t"],
) -> tuple[Float[Array, "b t d"], Float[Array, "b t"]]:
  """Final hidden states and the query-weighted attention mass per key.

  `mass[b, s] = sum_layers sum_heads sum_t query_weights[b, t] *
  attn[b, head, t, s]`, the attention probabilities of the model's causal
  self-attention (padding keys hidden, as in the model's forward).
  Positions are slot indices, so padding must be on the right.

  Args:
    model: The decoder.
    input_ids: `[B, T]` token ids.
    attention_mask: `[B, T]`, nonzero for real tokens.
    query_weights: `[B, T]` weight of each position as a query (0 for the
      positions whose attention is not read).

  Returns:
    `(hidden [B, T, D]` after the final norm, as `model.model` returns it,
    `mass [B, T]` float32).
  """
  input_ids = jnp.asarray(input_ids)
  mask = jnp.asarray(attention_mask) != 0
  b, t = input_ids.shape
  slots = jnp.arange(t, dtype=jnp.int32)
  positions = jnp.broadcast_to(slots[None, :], (b, t))
  cfg = model.config
  cos, sin = llama.rotary_angles(positions, cfg.head_dim, cfg.rope_theta)
  bias = llama.attention_bias(mask, slots)
  weights = jnp.asarray(query_weights, jnp.float32)
  x = model.model.embed_tokens(input_ids)
  mass = jnp.zeros((b, t), jnp.float32)
  for layer in _layer_modules(model):
    attn, probs = _attention(layer.self_attn, layer.input_layernorm(x), cos,
                             sin, bias)
    x = x + attn
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    mass = mass + jnp.einsum("bkgts,bt->bs", probs, weights)
  return model.model.norm(x), mass


def document_mass(
    mass: Float[_AnyArray, "b t"],
    segment: Int[_AnyArray, "b t"],
    num_docs: int,
) -> Float[Array, "b n"]:
  """`[B, N]`: the attention mass summed over each document's tokens."""
  onehot = (jnp.asarray(segment)[:, :, None]
            == jnp.arange(num_docs, dtype=jnp.int32)[None, None, :])
  return jnp.einsum("bt,btn->bn", jnp.asarray(mass, jnp.float32),
                    onehot.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("graphdef", "num_docs"))
def _doc_mass_step(graphdef, state, ids, mask, weights, segment, num_docs):
  model = nnx.merge(graphdef, state)
  _, mass = attention_forward(model, ids, mask, weights)
  return document_mass(mass, segment, num_docs)


def _query_weights(is_query: Sequence[bool], reduction: str) -> list[float]:
  n = max(sum(is_query), 1)
  scale = 1.0 / n if reduction == "mean" else 1.0
  return [scale if q else 0.0 for q in is_query]


def _doc_masses(
    model: llama.LlamaForCausalLM,
    prompts: Sequence[tuple[list[int], list[int], list[float]]],
    num_docs: int,
    *,
    batch_size: int,
    length_multiple: int,
) -> np.ndarray:
  """`[len(prompts), num_docs]` document masses, in jitted padded batches."""
  out = np.zeros((len(prompts), num_docs), np.float32)
  if not prompts:
    return out
  graphdef, state = nnx.split(model)
  for idx, length in decoder_text.length_sorted_batches(
      [p[0] for p in prompts], batch_size, length_multiple):
    ids, mask = decoder_text.pad_right([prompts[i][0] for i in idx], length,
                                       rows=batch_size)
    segment = np.full((batch_size, length), -1, np.int32)
    weights = np.zeros((batch_size, length), np.float32)
    for row, i in enumerate(idx):
      _, seg, w = prompts[i]
      segment[row, :len(seg)] = seg
      weights[row, :len(w)] = w
    masses = _doc_mass_step(graphdef, state, jnp.asarray(ids),
                            jnp.asarray(mask), jnp.asarray(weights),
                            jnp.asarray(segment), num_docs)
    out[idx] = np.asarray(masses[:len(idx)], np.float32)
  return out


def _check(queries, doc_lists, batch_size, length_multiple, reduction):
  decoder_text.check_lists(queries, doc_lists, batch_size, length_multiple)
  if reduction not in QUERY_REDUCTIONS:
    raise ValueError(f"query_reduction must be one of {QUERY_REDUCTIONS}; "
                     f"got {reduction!r}.")
  empty = [i for i, d in enumerate(doc_lists) if not d]
  if empty:
    raise ValueError(f"Candidate lists {empty[:10]} are empty.")


def attention_scores(
    model: llama.LlamaForCausalLM,
    tokenizer: Any,
    queries: Sequence[str],
    doc_lists: Sequence[Sequence[str]],
    *,
    prompt_format: PromptFormat | None = None,
    query_reduction: str = "mean",
    batch_size: int = 4,
    length_multiple: int = 64,
) -> list[np.ndarray]:
  """Uncalibrated ICR scores: attention mass from the query to each doc.

  Args:
    model: The decoder.
    tokenizer: Its tokenizer (see `decoder_text.tokenize`).
    queries: One query per list (pass the content-free query to get the
      calibration term).
    doc_lists: The documents of each list (all go into one prompt).
    prompt_format: The prompt pieces.
    query_reduction: `"mean"` (average over query tokens) or `"sum"`.
    batch_size: Prompts per forward pass.
    length_multiple: Prompts are right-padded to a multiple of this.

  Returns:
    Per list, float32 `[n_i]` masses, summed over layers and heads.

  Raises:
    ValueError: On mismatched inputs, an empty list, or bad settings.
  """
  _check(queries, doc_lists, batch_size, length_multiple, query_reduction)
  prompts = []
  for q, docs in zip(queries, doc_lists):
    ids, seg, is_q = build_prompt(tokenizer, q, docs, prompt_format)
    prompts.append((ids, seg, _query_weights(is_q, query_reduction)))
  width = max((len(d) for d in doc_lists), default=0)
  masses = _doc_masses(model, prompts, max(width, 1), batch_size=batch_size,
                       length_multiple=length_multiple)
  return [masses[i, :len(d)].copy() for i, d in enumerate(doc_lists)]


def score_lists(
    model: llama.LlamaForCausalLM,
    tokenizer: Any,
    queries: Sequence[str],
    doc_lists: Sequence[Sequence[str]],
    *,
    calibrate: bool = True,
    prompt_format: PromptFormat | None = None,
    query_reduction: str = "mean",
    batch_size: int = 4,
    length_multiple: int = 64,
) -> list[np.ndarray]:
  """ICR scores of candidate lists (higher is more relevant).

  With `calibrate`, each list costs two prompts in the same batch: the
  query's and the content-free query's, and the score is their difference
  (`attention_scores(queries) - attention_scores(content_free)`).

  Args:
    model: The decoder.
    tokenizer: Its tokenizer.
    queries: One query per list.
    doc_lists: The documents of each list, in first-stage order.
    calibrate: Subtract the content-free query's attention mass.
    prompt_format: The prompt pieces.
    query_reduction: See `attention_scores`.
    batch_size: Prompts per forward pass (two per list when calibrating).
    length_multiple: See `attention_scores`.

  Returns:
    Per list, float32 `[n_i]` scores in the input order.

  Raises:
    ValueError: As `attention_scores`.
  """
  fmt = prompt_format or PromptFormat()
  kw = dict(prompt_format=fmt, query_reduction=query_reduction,
            batch_size=batch_size, length_multiple=length_multiple)
  if not calibrate:
    return attention_scores(model, tokenizer, queries, doc_lists, **kw)
  _check(queries, doc_lists, batch_size, length_multiple, query_reduction)
  both = [x for q in queries for x in (q, fmt.content_free_query)]
  lists = [d for d in doc_lists for _ in range(2)]
  raw = attention_scores(model, tokenizer, both, lists, **kw)
  return [raw[2 * i] - raw[2 * i + 1] for i in range(len(queries))]


def rerank(
    model: llama.LlamaForCausalLM,
    tokenizer: Any,
    queries: Mapping[str, str],
    corpus: Mapping[str, str],
    run: Mapping[str, Mapping[str, Any]],
    *,
    k: int | float = 100,
    calibrate: bool = True,
    prompt_format: PromptFormat | None = None,
    query_reduction: str = "mean",
    batch_size: int = 4,
    length_multiple: int = 64,
) -> decoder_text.Run:
  """Reranks the top-`k` of each query of a first-stage run with ICR.

  The contract of `lowrank.ranking.rerank`: each query's top `k` documents
  (trec_eval order) go into one prompt, in that order, and get their ICR
  scores; documents below the top `k` are dropped.

  Args:
    model: The decoder.
    tokenizer: Its tokenizer.
    queries: Query id -> text; must cover every query of `run`.
    corpus: Document id -> text; must cover every document of a top-`k`.
    run: `{query id: {doc id: first-stage score}}`.
    k: Documents per query.
    calibrate: See `score_lists`.
    prompt_format: See `score_lists`.
    query_reduction: See `score_lists`.
    batch_size: See `score_lists`.
    length_multiple: See `score_lists`.

  Returns:
    `{query id: {doc id: float score}}`.

  Raises:
    ValueError: If `k` is not a positive int or an id is unknown.
  """
  top = cascade.top_k_lists(queries, corpus, run, k)
  return top.to_run(score_lists(
      model, tokenizer, top.queries, top.documents, calibrate=calibrate,
      prompt_format=prompt_format, query_reduction=query_reduction,
      batch_size=batch_size, length_multiple=length_multiple))


def rerank_with_and_without_calibration(
    model: llama.LlamaForCausalLM,
    tokenizer: Any,
    queries: Mapping[str, str],
    corpus: Mapping[str, str],
    run: Mapping[str, Mapping[str, Any]],
    *,
    k: int | float = 100,
    prompt_format: PromptFormat | None = None,
    query_reduction: str = "mean",
    batch_size: int = 4,
    length_multiple: int = 64,
) -> tuple[decoder_text.Run, decoder_text.Run]:
  """`(calibrated, uncalibrated)` ICR reranking of `run`'s top-`k`.

  Two passes, kept apart: the queries' (the uncalibrated scores) and the
  content-free query's; the calibrated scores are their difference. The
  uncalibrated run (an ablation row) thus costs nothing extra. Arguments
  and errors as `rerank`.
  """
  fmt = prompt_format or PromptFormat()
  top = cascade.top_k_lists(queries, corpus, run, k)
  kw = dict(prompt_format=fmt, query_reduction=query_reduction,
            batch_size=batch_size, length_multiple=length_multiple)
  raw = attention_scores(model, tokenizer, top.queries, top.documents, **kw)
  free = attention_scores(model, tokenizer,
                          [fmt.content_free_query] * len(top.qids),
                          top.documents, **kw)
  return (top.to_run([r - c for r, c in zip(raw, free)]), top.to_run(raw))


class IcrReranker(decoder_text.ListwiseScorer):
  """An ICR scorer for `lowrank.ranking.rerank` (`score_pairs`).

  Attributes:
    model: The decoder.
    calibrate: Subtract the content-free query's mass.
    prompt_format: The prompt pieces.
    query_reduction: `"mean"` or `"sum"` over query tokens.
    batch_size: Prompts per forward pass.
    length_multiple: Padding granularity of prompt lengths.
  """

  def __init__(
      self,
      model: llama.LlamaForCausalLM,
      *,
      calibrate: bool = True,
      prompt_format: PromptFormat | None = None,
      query_reduction: str = "mean",
      batch_size: int = 4,
      length_multiple: int = 64,
  ):
    _check([], [], batch_size, length_multiple, query_reduction)
    self.model = model
    self.calibrate = calibrate
    self.prompt_format = prompt_format or PromptFormat()
    self.query_reduction = query_reduction
    self.batch_size = batch_size
    self.length_multiple = length_multiple

  def rank_lists(
      self,
      tokenizer: Any,
      queries: Sequence[str],
      doc_lists: Sequence[Sequence[str]],
  ) -> list[np.ndarray]:
    """`score_lists` with this scorer's settings."""
    return score_lists(
        self.model, tokenizer, queries, doc_lists, calibrate=self.calibrate,
        prompt_format=self.prompt_format,
        query_reduction=self.query_reduction, batch_size=self.batch_size,
        length_multiple=self.length_multiple)
