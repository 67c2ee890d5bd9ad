"""FIRST: listwise reranking from the first generated identifier's logits.

A decoder LM (`lowrank.models.llama.LlamaForCausalLM`) reads one prompt per
window of candidates,

    Rank the <n> passages by relevance to the query.
    Query: <query>
    [A] <passage 1>
    [B] <passage 2>
    ...
    Query: <query>
    Ranking:<space>

and would answer with a permutation such as `C > A > B`. FIRST does not
generate it: the candidates are ranked by the logits of their identifier
tokens (`A`, `B`, ...) at the first generated position, i.e. ONE forward
pass over the prompt and no decoding (`window_scores`). Identifiers must be
single tokens of the tokenizer (validated; with the byte-level vocabulary
of `decoder_text.ByteTokenizer` an identifier is its letter's byte). The
prompt is assembled from token segments, so the identifier token in the
prompt and the one read at the output are the same id.

Lists longer than the window are reranked with RankLLM's sliding window,
back to front: the last `window` candidates first, then the window moves up
by `stride` and the top of each window carries over into the next, so the
best candidates bubble up to the top window (`sliding_windows`).
`generate_permutations` decodes the full permutation string greedily
(`llama.generate`) for comparison.

Training (`loss_fn`, a `loss_fn(model, batch)` for
`lowrank.train.make_train_step`): the LM loss of the target
permutation string after the prompt, plus a weighted listwise
learning-to-rank loss on the identifier logits at the first position:
FIRST's RankNet with pairs weighted by `1 / (rank_i + rank_j)` of their
target ranks (`lowrank.ranking.losses.first_rank_net`), or another loss of
`lowrank.ranking.losses` on the relevance labels.

`rerank` has the input/output contract of `lowrank.ranking.rerank`;
`FirstReranker` also plugs into `lowrank.ranking.rerank` itself through
`score_pairs` (pairs of one query arrive consecutively and are ranked as
one list).

References:
  Reddy et al., "FIRST: Faster Improved Listwise Reranking with Single Token
    Decoding", 2024, https://arxiv.org/abs/2406.15657
  Pradeep et al., "RankZephyr" (sliding windows), 2023,
    https://arxiv.org/abs/2312.02724
  Sun et al., "Is ChatGPT Good at Search? (RankGPT)", 2023,
    https://arxiv.org/abs/2304.09542
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import string
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank.models import llama
from lowrank.ranking import cascade
from lowrank.ranking import decoder_text
from lowrank.ranking import losses as ltr_losses

IDENTIFIERS = tuple(string.ascii_uppercase)
# Names of `lowrank.ranking.losses.LOSSES` FIRST trains with:
# "first_rank_net" (FIRST's weighted RankNet) on target ranks, the others on
# relevance labels.
LTR_LOSSES = ("first_rank_net", "rank_net", "lambda_loss", "list_mle",
              "list_net", "softmax_ce", "approx_ndcg", "plackett_luce")


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """The text pieces of a FIRST prompt and of its answer.

  Attributes:
    instruction: First line; `{n}` is replaced by the number of candidates.
    query_prefix: Written before the query (at the top and again after the
      candidates).
    identifiers: Candidate labels, each a single token of the tokenizer.
      Their number caps the window size.
    label_open: Text before a candidate's identifier.
    label_close: Text after it, before the passage.
    answer_prefix: Ends the prompt; the next token is the first identifier.
    separator: Between identifiers in the target permutation string.
    answer_end: Ends the target permutation string.
    max_query_tokens: Queries are cut to this many tokens.
    max_doc_tokens: Passages are cut to this many tokens.
  """

  instruction: str = "Rank the {n} passages by relevance to the query.\n"
  query_prefix: str = "Query: "
  identifiers: tuple[str, ...] = IDENTIFIERS
  label_open: str = "["
  label_close: str = "] "
  answer_prefix: str = "Ranking: "
  separator: str = " > "
  answer_end: str = "\n"
  max_query_tokens: int = 64
  max_doc_tokens: int = 128

  def __post_init__(self):
    decoder_text.check_token_limits(self.max_query_tokens,
                                    self.max_doc_tokens)
    if not self.identifiers:
      raise ValueError("identifiers must not be empty.")


class _Pieces:
  """A `PromptFormat` tokenized once for one tokenizer."""

  def __init__(self, tokenizer: Any, fmt: PromptFormat):
    enc = functools.partial(decoder_text.tokenize, tokenizer)
    self.fmt = fmt
    self.tokenizer = tokenizer
    self.ident = decoder_text.single_token_ids(tokenizer, fmt.identifiers)
    self.query_prefix = enc(fmt.query_prefix)
    self.label_open = enc(fmt.label_open)
    self.label_close = enc(fmt.label_close)
    self.newline = enc("\n")
    self.answer_prefix = enc(fmt.answer_prefix)
    self.separator = enc(fmt.separator)
    self.answer_end = enc(fmt.answer_end)
    self._instruction: dict[int, list[int]] = {}

  def instruction(self, n: int) -> list[int]:
    if n not in self._instruction:
      self._instruction[n] = decoder_text.tokenize(
          self.tokenizer, self.fmt.instruction.format(n=n))
    return self._instruction[n]

  def query(self, text: str) -> list[int]:
    ids = decoder_text.tokenize(self.tokenizer, text)
    return ids[:self.fmt.max_query_tokens]

  def doc(self, text: str) -> list[int]:
    ids = decoder_text.tokenize(self.tokenizer, text)
    return ids[:self.fmt.max_doc_tokens]

  def prompt(self, query_ids: list[int], doc_ids: Sequence[list[int]]
             ) -> list[int]:
    n = len(doc_ids)
    if not 1 <= n <= len(self.ident):
      raise ValueError(
          f"A FIRST prompt holds 1 to {len(self.ident)} candidates (one per "
          f"identifier); got {n}.")
    q = self.query_prefix + query_ids + self.newline
    ids = self.instruction(n) + q
    for i, d in enumerate(doc_ids):
      ids += self.label_open + [self.ident[i]] + self.label_close + d
      ids += self.newline
    return ids + q + self.answer_prefix

  def list_prompt(self, query: str, docs: Sequence[str]) -> list[int]:
    """`prompt` from texts: the query and candidates cut to their limits."""
    return self.prompt(self.query(query), [self.doc(d) for d in docs])

  def target(self, order: Sequence[int] | np.ndarray) -> list[int]:
    ids = []
    for j, i in enumerate(order):
      ids += ([] if j == 0 else self.separator) + [self.ident[int(i)]]
    return ids + self.answer_end


def build_prompt(
    tokenizer: Any,
    query: str,
    docs: Sequence[str],
    prompt_format: PromptFormat | None = None,
) -> list[int]:
  """Token ids of the FIRST prompt for `query` and candidates `docs`.

  Args:
    tokenizer: See `decoder_text.tokenize`.
    query: The query text (cut to `max_query_tokens`).
    docs: Candidate texts (each cut to `max_doc_tokens`), labelled `A, B,
      ...` in this order.
    prompt_format: The prompt pieces (default `PromptFormat()`).

  Returns:
    The prompt's token ids, ending with the answer prefix.

  Raises:
    ValueError: If an identifier is not a single token, or `docs` is empty
      or has more entries than identifiers.
  """
  return _Pieces(tokenizer, prompt_format or PromptFormat()).list_prompt(
      query, docs)


def target_ids(
    tokenizer: Any,
    order: Sequence[int] | np.ndarray,
    prompt_format: PromptFormat | None = None,
) -> list[int]:
  """Token ids of the answer `A > C > B` for candidate indices `order`."""
  return _Pieces(tokenizer, prompt_format or PromptFormat()).target(order)


def parse_permutation(
    tokens: Sequence[int] | np.ndarray | jax.Array,
    identifier_ids: Sequence[int] | np.ndarray,
    n: int,
) -> list[int]:
  """Candidate order from generated tokens, RankLLM-style repaired.

  Identifier tokens of the first `n` candidates are read in order; repeats
  are dropped and candidates never named are appended in their input
  order, so the result is always a permutation of `range(n)`.
  """
  lookup = {int(t): i for i, t in enumerate(identifier_ids[:n])}
  order, seen = [], set()
  for t in np.asarray(tokens).reshape(-1).tolist():
    i = lookup.get(int(t))
    if i is not None and i not in seen:
      order.append(i)
      seen.add(i)
  return order + [i for i in range(n) if i not in seen]


def sliding_windows(n: int, window: int, stride: int) -> list[tuple[int, int]]:
  """RankLLM's `[start, end)` windows over a list of `n`, back to front.

  The first window covers the last `window` candidates; each next one ends
  `stride` earlier; the last one starts at 0. A list that fits one window
  gives `[(0, n)]`.

  Raises:
    ValueError: Unless `window >= 1` and `1 <= stride <= window` (stride 0
      never reaches the top; a stride above the window skips candidates).
  """
  if window < 1:
    raise ValueError(f"window must be >= 1; got {window}.")
  if not 1 <= stride <= window:
    raise ValueError(
        f"stride must be in [1, window={window}]; got {stride} (stride 0 "
        "never reaches the top of the list, a stride above the window "
        "skips candidates).")
  if n < 0:
    raise ValueError(f"n must be >= 0; got {n}.")
  if n == 0:
    return []
  out = []
  end = n
  while True:
    start = max(0, end - window)
    out.append((start, end))
    if start == 0:
      return out
    end -= stride


# ----------------------------------------------------------------------------
# Single-pass scoring.


def _list_prompts(
    tokenizer: Any,
    queries: Sequence[str],
    doc_lists: Sequence[Sequence[str]],
    prompt_format: PromptFormat | None,
    batch_size: int,
    length_multiple: int,
) -> tuple[_Pieces, list[list[int]]]:
  """Checks the arguments of a one-window-per-list scorer; one prompt a list."""
  decoder_text.check_lists(queries, doc_lists, batch_size, length_multiple)
  pieces = _Pieces(tokenizer, prompt_format or PromptFormat())
  return pieces, [pieces.list_prompt(q, docs)
                  for q, docs in zip(queries, doc_lists)]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _first_logits(graphdef, state, ids, lengths, ident):
  """`[B, W]` logits of the identifier tokens after the last real token."""
  model = nnx.merge(graphdef, state)
  t = ids.shape[1]
  mask = jnp.arange(t, dtype=jnp.int32)[None, :] < lengths[:, None]
  hidden, _ = model.model(ids, attention_mask=mask)
  last = hidden[jnp.arange(ids.shape[0]), jnp.maximum(lengths - 1, 0)]
  return model.logits(last[:, None, :])[:, 0][:, ident]


def _batched_first_logits(
    model: llama.LlamaForCausalLM,
    prompts: Sequence[list[int]],
    ident: Sequence[int],
    *,
    batch_size: int,
    length_multiple: int,
) -> np.ndarray:
  """`[len(prompts), len(ident)]` float32 identifier logits, jitted batches.

  Batches come from `decoder_text.length_sorted_batches` (a short last
  batch is padded with empty rows), right-padded.
  """
  out = np.zeros((len(prompts), len(ident)), np.float32)
  if not prompts:
    return out
  graphdef, state = nnx.split(model)
  ident = jnp.asarray(ident, jnp.int32)
  for idx, length in decoder_text.length_sorted_batches(
      prompts, batch_size, length_multiple):
    ids, mask = decoder_text.pad_right([prompts[i] for i in idx], length,
                                       rows=batch_size)
    logits = _first_logits(graphdef, state, jnp.asarray(ids),
                           jnp.asarray(mask.sum(1), jnp.int32), ident)
    out[idx] = np.asarray(logits[:len(idx)], np.float32)
  return out


def window_scores(
    model: llama.LlamaForCausalLM,
    tokenizer: Any,
    queries: Sequence[str],
    doc_lists: Sequence[Sequence[str]],
    *,
    prompt_format: PromptFormat | None = None,
    batch_size: int = 8,
    length_multiple: int = 64,
) -> list[np.ndarray]:
  """One forward pass per list: the identifier logits of its candidates.

  Each list must fit one window (at most `len(identifiers)` candidates).
  The FIRST ranking of list `i` is `argsort(-scores[i])`.

  Args:
    model: The decoder.
    tokenizer: Its tokenizer (see `decoder_text.tokenize`).
    queries: One query text per list.
    doc_lists: Candidate texts per query, in prompt order.
    prompt_format: The prompt pieces (default `PromptFormat()`).
    batch_size: Prompts per forward pass.
    length_multiple: Prompts are right-padded to a multiple of this.

  Returns:
    Per list, float32 `[n_i]` logits of identifiers `A, B, ...` at the
    first generated position.

  Raises:
    ValueError: On mismatched inputs, an empty or too long list, a
      non-single-token identifier, or bad batch settings.
  """
  pieces, prompts = _list_prompts(tokenizer, queries, doc_lists,
                                  prompt_format, batch_size, length_multiple)
  width = max(len(d) for d in doc_lists) if doc_lists else 0
  logits = _batched_first_logits(
      model, prompts, pieces.ident[:max(width, 1)], batch_size=batch_size,
      length_multiple=length_multiple)
  return [logits[i, :len(d)].copy() for i, d in enumerate(doc_lists)]


def rank_lists(
    model: llama.LlamaForCausalLM,
    tokenizer: Any,
    queries: Sequence[str],
    doc_lists: Sequence[Sequence[str]],
    *,
    window: int = 20,
    stride: int = 10,
    prompt_format: PromptFormat | None = None,
    batch_size: int = 8,
    length_multiple: int = 64,
) -> list[np.ndarray]:
  """Reranks candidate lists with FIRST and sliding windows.

  Windows of all lists at the same sliding step are scored together in
  jitted batches. Within a window, candidates are reordered by their
  identifier logits (descending; ties keep the current order).

  Args:
    model: The decoder.
    tokenizer: Its tokenizer (see `decoder_text.tokenize`).
    queries: One query text per list.
    doc_lists: Candidate texts per query, in first-stage order (best first).
    window: Candidates per prompt (at most the number of identifiers).
    stride: How far the window moves up each step (`1 <= stride <=
      window`).
    prompt_format: The prompt pieces (default `PromptFormat()`).
    batch_size: Prompts per forward pass.
    length_multiple: Prompts are padded to a multiple of this length.

  Returns:
    Per list, float32 scores `[n_i]` in the input order: `n_i - rank` of
    each candidate in the final order (higher is better).

  Raises:
    ValueError: On bad window/stride/batch settings or mismatched inputs.
  """
  decoder_text.check_lists(queries, doc_lists, batch_size, length_multiple)
  pieces = _Pieces(tokenizer, prompt_format or PromptFormat())
  if window > len(pieces.ident):
    raise ValueError(
        f"window ({window}) exceeds the number of identifiers "
        f"({len(pieces.ident)}).")
  query_ids = [pieces.query(q) for q in queries]
  doc_ids = [[pieces.doc(d) for d in docs] for docs in doc_lists]

  def score(jobs):
    prompts = [pieces.prompt(query_ids[i], [doc_ids[i][j] for j in members])
               for i, members in jobs]
    return _batched_first_logits(
        model, prompts, pieces.ident[:window], batch_size=batch_size,
        length_multiple=length_multiple)

  orders = sliding_window_orders([len(d) for d in doc_lists], window, stride,
                                 score)
  return [order_scores(order) for order in orders]


def sliding_window_orders(
    lengths: Sequence[int],
    window: int,
    stride: int,
    score_windows: Callable[[list[tuple[int, list[int]]]], Any],
) -> list[list[int]]:
  """Sliding-window reranking of several lists with any window scorer.

  At each step, every list that still has a window (`sliding_windows`)
  contributes one job `(list index, candidate indices in the window, in
  their current order)`; `score_windows(jobs)` returns one score row per
  job (`[len(jobs), >= window size]`, higher is better), and each window
  is reordered by it (stable: ties keep the current order).

  Args:
    lengths: Number of candidates of each list.
    window: Window size.
    stride: Window stride.
    score_windows: The scorer of one step's jobs.

  Returns:
    Per list, the candidate indices best first.

  Raises:
    ValueError: On invalid window settings (see `sliding_windows`).
  """
  plans = [sliding_windows(n, window, stride) for n in lengths]
  orders = [list(range(n)) for n in lengths]
  for step in range(max((len(p) for p in plans), default=0)):
    jobs = [(i, *plan[step]) for i, plan in enumerate(plans)
            if step < len(plan)]
    logits = np.asarray(score_windows(
        [(i, orders[i][start:end]) for i, start, end in jobs]))
    for row, (i, start, end) in enumerate(jobs):
      perm = np.argsort(-logits[row, :end - start], kind="stable")
      current = orders[i][start:end]
      orders[i][start:end] = [current[p] for p in perm]
  return orders


def order_scores(order: Sequence[int]) -> np.ndarray:
  """Float32 scores in input order: `n - rank` of each index of `order`."""
  scores = np.zeros(len(order), np.float32)
  scores[list(order)] = len(order) - np.arange(len(order), dtype=np.float32)
  return scores


def generate_permutations(
    model: llama.LlamaForCausalLM,
    tokenizer: Any,
    queries: Sequence[str],
    doc_lists: Sequence[Sequence[str]],
    *,
    prompt_format: PromptFormat | None = None,
    batch_size: int = 8,
    length_multiple: int = 64,
) -> list[list[int]]:
  """Greedy decoding of the full permutation string (one window per list).

  The slow path FIRST avoids: `llama.generate` writes `A > C > B ...`
  (`n + (n - 1) * len(separator)` tokens for `n` candidates) and the
  identifiers are read back with `parse_permutation`.

  Args:
    model: The decoder.
    tokenizer: Its tokenizer.
    queries: One query text per list.
    doc_lists: Candidate texts per query (each fits one window).
    prompt_format: The prompt pieces.
    batch_size: Prompts per `generate` call (a short last batch is padded
      with copies, so every call has the same shape).
    length_multiple: Prompts are left-padded to a multiple of this.

  Returns:
    Per list, the candidate indices best first (always a permutation).

  Raises:
    ValueError: As `window_scores`.
  """
  pieces, prompts = _list_prompts(tokenizer, queries, doc_lists,
                                  prompt_format, batch_size, length_multiple)
  out: list[list[int]] = [[] for _ in prompts]
  for idx, length in decoder_text.length_sorted_batches(
      prompts, batch_size, length_multiple):
    n = max(len(doc_lists[i]) for i in idx)
    new = n + (n - 1) * len(pieces.separator)
    rows = [prompts[i] for i in idx]
    rows += [rows[0]] * (batch_size - len(rows))  # Same shape every batch.
    ids, mask = decoder_text.pad_left(rows, length)
    tokens = np.asarray(llama.generate(model, ids, new, attention_mask=mask))
    for row, i in enumerate(idx):
      out[i] = parse_permutation(tokens[row], pieces.ident,
                                 len(doc_lists[i]))
  return out


def rerank(
    model: llama.LlamaForCausalLM,
    tokenizer: Any,
    queries: Mapping[str, str],
    corpus: Mapping[str, str],
    run: Mapping[str, Mapping[str, Any]],
    *,
    k: int | float = 100,
    window: int = 20,
    stride: int = 10,
    prompt_format: PromptFormat | None = None,
    batch_size: int = 8,
    length_multiple: int = 64,
) -> decoder_text.Run:
  """Reranks the top-`k` of each query of a first-stage run with FIRST.

  The contract of `lowrank.ranking.rerank`: each query's top `k` documents
  (trec_eval order) are kept and rescored; the score of a document is
  `k_q - rank` in FIRST's sliding-window order.

  Args:
    model: The decoder.
    tokenizer: Its tokenizer.
    queries: Query id -> text; must cover every query of `run`.
    corpus: Document id -> text; must cover every document of a top-`k`.
    run: `{query id: {doc id: first-stage score}}`.
    k: Documents per query to rerank (the rest are dropped).
    window: See `rank_lists`.
    stride: See `rank_lists`.
    prompt_format: See `rank_lists`.
    batch_size: See `rank_lists`.
    length_multiple: See `rank_lists`.

  Returns:
    `{query id: {doc id: float score}}` (queries with an empty ranking map
    to `{}`).

  Raises:
    ValueError: If `k` is not a positive int, an id is unknown, or the
      window settings are invalid.
  """
  top = cascade.top_k_lists(queries, corpus, run, k)
  return top.to_run(rank_lists(
      model, tokenizer, top.queries, top.documents, window=window,
      stride=stride, prompt_format=prompt_format, batch_size=batch_size,
      length_multiple=length_multiple))


class FirstReranker(decoder_text.ListwiseScorer):
  """A FIRST scorer for `lowrank.ranking.rerank` (`score_pairs`).

  Attributes:
    model: The decoder.
    window: Candidates per prompt.
    stride: Sliding-window stride.
    prompt_format: The prompt pieces.
    batch_size: Prompts per forward pass.
    length_multiple: Padding granularity of prompt lengths.
  """

  def __init__(
      self,
      model: llama.LlamaForCausalLM,
      *,
      window: int = 20,
      stride: int = 10,
      prompt_format: PromptFormat | None = None,
      batch_size: int = 8,
      length_multiple: int = 64,
  ):
    sliding_windows(1, window, stride)  # Validates early.
    self.model = model
    self.window = window
    self.stride = stride
    self.prompt_format = prompt_format or PromptFormat()
    self.batch_size = batch_size
    self.length_multiple = length_multiple

  def rank_lists(
      self,
      tokenizer: Any,
      queries: Sequence[str],
      doc_lists: Sequence[Sequence[str]],
  ) -> list[np.ndarray]:
    """`rank_lists` with this scorer's settings."""
    return rank_lists(
        self.model, tokenizer, queries, doc_lists, window=self.window,
        stride=self.stride, prompt_format=self.prompt_format,
        batch_size=self.batch_size, length_multiple=self.length_multiple)


# ----------------------------------------------------------------------------
# Training.


class Example(NamedTuple):
  """One tokenized training list.

  Attributes:
    prompt: Prompt token ids.
    target: Answer token ids (the target permutation string).
    labels: Relevance label per candidate (prompt order).
    ranks: 1-based target rank per candidate (prompt order).
  """

  prompt: list[int]
  target: list[int]
  labels: list[float]
  ranks: list[int]


def make_example(
    tokenizer: Any,
    query: str,
    docs: Sequence[str],
    labels: Sequence[float | int] | np.ndarray,
    *,
    order: Sequence[int] | np.ndarray | None = None,
    prompt_format: PromptFormat | None = None,
) -> Example:
  """Tokenizes one training list.

  Args:
    tokenizer: The tokenizer.
    query: Query text.
    docs: Candidate texts in prompt order.
    labels: Relevance label of each candidate.
    order: Target permutation (candidate indices best first); default: by
      label, descending, ties in prompt order.
    prompt_format: The prompt pieces.

  Returns:
    The `Example`.

  Raises:
    ValueError: If `labels` or `order` do not match `docs`.
  """
  if len(labels) != len(docs):
    raise ValueError(f"Need one label per candidate; got {len(labels)} "
                     f"labels for {len(docs)} candidates.")
  if order is None:
    order = sorted(range(len(docs)), key=lambda i: (-float(labels[i]), i))
  if sorted(int(i) for i in order) != list(range(len(docs))):
    raise ValueError(f"order must be a permutation of range({len(docs)}); "
                     f"got {list(order)}.")
  pieces = _Pieces(tokenizer, prompt_format or PromptFormat())
  prompt = pieces.list_prompt(query, docs)
  ranks = [0] * len(docs)
  for r, i in enumerate(order):
    ranks[int(i)] = r + 1
  return Example(prompt, pieces.target(order), [float(x) for x in labels],
                 ranks)


def collate(
    examples: Sequence[Example],
    *,
    window: int,
    length: int,
    rows: int | None = None,
) -> dict[str, np.ndarray]:
  """Right-padded training batch of `rows` lists of at most `window`.

  Returns:
    `ids`/`mask`/`target_mask` `[R, T]` (prompt + answer; the answer's
    tokens), `first_pos` `[R]` (last prompt token, whose logits are read),
    `labels`/`ranks`/`where` `[R, window]`. Padded rows are all masked.

  Raises:
    ValueError: If an example does not fit `length` or `window`.
  """
  rows = len(examples) if rows is None else rows
  seqs = [e.prompt + e.target for e in examples]
  ids, mask = decoder_text.pad_right(seqs, length, rows=rows)
  target_mask = np.zeros_like(mask)
  first_pos = np.zeros(rows, np.int32)
  labels = np.zeros((rows, window), np.float32)
  ranks = np.zeros((rows, window), np.int32)
  where = np.zeros((rows, window), bool)
  for i, e in enumerate(examples):
    n = len(e.labels)
    if n > window:
      raise ValueError(f"Example {i} has {n} candidates > window {window}.")
    p = len(e.prompt)
    target_mask[i, p:p + len(e.target)] = True
    first_pos[i] = p - 1
    labels[i, :n] = e.labels
    ranks[i, :n] = e.ranks
    where[i, :n] = True
  return {"ids": ids, "mask": mask, "target_mask": target_mask,
          "first_pos": first_pos, "labels": labels, "ranks": ranks,
          "where": where}


def loss_fn(
    model: llama.LlamaForCausalLM,
    batch: Mapping[str, Any],
    identifier_ids: Sequence[int] | np.ndarray | jax.Array,
    *,
    ltr_loss: str = "first_rank_net",
    lm_weight: float | int = 1.0,
    ltr_weight: float | int = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """FIRST's objective: LM loss of the answer + weighted LTR loss.

  Args:
    model: The decoder.
    batch: From `collate` (`window = len(identifier_ids)`).
    identifier_ids: Token ids of the identifiers `A, B, ...` (`[W]`).
    ltr_loss: A name of `LTR_LOSSES`.
    lm_weight: Weight of the answer's mean next-token cross-entropy.
    ltr_weight: Weight of the LTR loss on the first-position identifier
      logits.

  Returns:
    `(loss, {"lm_loss", "ltr_loss"})`.
  """
  ltr = ltr_losses.get(ltr_loss, LTR_LOSSES)
  ids = jnp.asarray(batch["ids"])
  logits = model(ids, attention_mask=jnp.asarray(batch["mask"]))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1],
                                                       ids[:, 1:])
  w = jnp.asarray(batch["target_mask"])[:, 1:].astype(jnp.float32)
  lm = jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)
  rows = jnp.arange(ids.shape[0])
  first = logits[rows, jnp.asarray(batch["first_pos"])]
  scores = first[:, jnp.asarray(identifier_ids, jnp.int32)]
  where = jnp.asarray(batch["where"])
  if ltr_loss == "first_rank_net":
    rank_loss = ltr(scores, jnp.asarray(batch["ranks"]), where=where)
  else:
    rank_loss = ltr(scores, jnp.asarray(batch["labels"]), where=where)
  loss = lm_weight * lm + ltr_weight * rank_loss
  return loss, {"lm_loss": lm, "ltr_loss": rank_loss}
