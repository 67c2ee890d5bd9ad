"""Token-level prompt helpers shared by the decoder rerankers (FIRST, ICR).

The decoder rerankers build their prompts segment by segment as token ids
(instruction, query, one segment per candidate, answer prefix) instead of
tokenizing one long string, so that

* an identifier such as `A` is guaranteed to be the single token the scorer
  reads, whatever surrounds it in the prompt (BPE merges across a boundary
  cannot change it);
* the rerankers know which prompt positions belong to which document (ICR
  sums attention over a document's tokens).

Any tokenizer with `encode(text) -> list[int]` works (a Hugging Face
`tokenizers.Tokenizer` too: its `Encoding.ids` are used and no special
tokens are added). `ByteTokenizer` is the byte-level vocabulary (256 ids,
the UTF-8 bytes) that `experiments/pretrain_lm.py` trains the LLaMA-style
decoder with.

`first.rerank` and `icr.rerank` select their candidates with
`lowrank.ranking.cascade.select_top_k`, the input contract of
`lowrank.ranking.rerank` (same validation, same trec_eval order).
"""

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np


Run = dict[str, dict[str, float]]


class ByteTokenizer:
  """UTF-8 bytes as token ids (vocabulary 256, no special tokens).

  Attributes:
    vocab_size: 256.
    pad_id: Id used for padding (0, the NUL byte; padded slots are masked).
  """

  vocab_size = 256
  pad_id = 0

  def encode(self, text: str) -> list[int]:
    """The UTF-8 bytes of `text`."""
    if not isinstance(text, str):
      raise ValueError(f"text must be a str; got {type(text).__name__}.")
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Bytes back to text (invalid UTF-8, e.g. a cut character, -> U+FFFD)."""
    return bytes(int(i) for i in np.asarray(ids).reshape(-1)).decode(
        "utf-8", errors="replace")


def tokenize(tokenizer: Any, text: str) -> list[int]:
  """`tokenizer`'s ids of `text`, without special tokens, as a list of ints.

  Args:
    tokenizer: An object with `encode(text)` returning a list of ints or an
      object with `.ids` (Hugging Face `tokenizers`).
    text: The text.

  Returns:
    The token ids.

  Raises:
    ValueError: If the tokenizer has no `encode` method.
  """
  fn = getattr(tokenizer, "encode", None)
  if not callable(fn):
    raise ValueError(
        f"tokenizer must have an encode(text) method; got "
        f"{type(tokenizer).__name__}.")
  try:
    out = fn(text, add_special_tokens=False)
  except TypeError:
    out = fn(text)
  ids = getattr(out, "ids", out)
  return [int(i) for i in ids]


def single_token_ids(
    tokenizer: Any, identifiers: Sequence[str]
) -> list[int]:
  """The one token id of each identifier string; validates uniqueness.

  Args:
    tokenizer: See `tokenize`.
    identifiers: Identifier strings, e.g. `("A", "B", ...)`.

  Returns:
    One token id per identifier.

  Raises:
    ValueError: If an identifier is not exactly one token, or two
      identifiers share a token.
  """
  ids = []
  for ident in identifiers:
    toks = tokenize(tokenizer, ident)
    if len(toks) != 1:
      raise ValueError(
          f"Identifier {ident!r} must be exactly one token of the tokenizer; "
          f"it encodes to {len(toks)} tokens {toks}. Use identifiers that "
          "are single tokens (e.g. capital letters for a byte-level or "
          "LLaMA vocabulary).")
    ids.append(toks[0])
  if len(set(ids)) != len(ids):
    dup = [ident for ident, i in zip(identifiers, ids) if ids.count(i) > 1]
    raise ValueError(f"Identifiers {dup} map to the same token id.")
  return ids


def bucket_length(n: int, multiple: int) -> int:
  """`n` rounded up to a multiple of `multiple` (at least `multiple`)."""
  if multiple < 1:
    raise ValueError(f"multiple must be >= 1; got {multiple}.")
  return max(multiple, -(-int(n) // multiple) * multiple)


def length_sorted_batches(
    seqs: Sequence[Sequence[Any]], batch_size: int, length_multiple: int
) -> Iterator[tuple[list[int], int]]:
  """`(indices, padded length)` of batches of sequences of similar lengths.

  Sequences are sorted by length (ties by index) and cut into `batch_size`
  rows; each batch's length is its longest sequence rounded up to a
  multiple of `length_multiple` (`bucket_length`), so a workload compiles
  once per padded length.
  """
  order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
  for s in range(0, len(order), batch_size):
    idx = order[s:s + batch_size]
    yield idx, bucket_length(max(len(seqs[i]) for i in idx), length_multiple)


def pad_right(
    seqs: Sequence[Sequence[int]], length: int, *, rows: int | None = None,
    pad_id: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists to `[rows, length]` int32 ids and a bool mask.

  Right padding suits a causal decoder scored without a cache: a real token
  never attends to a later pad, so it computes what it would alone.

  Args:
    seqs: Token id lists, each at most `length` long.
    length: Padded length.
    rows: Padded batch size (default `len(seqs)`); extra rows are empty.
    pad_id: Id written into padded slots.

  Returns:
    `(ids [rows, length] int32, mask [rows, length] bool)`.

  Raises:
    ValueError: If a sequence is longer than `length` or `rows` is too small.
  """
  rows = len(seqs) if rows is None else rows
  if rows < len(seqs):
    raise ValueError(f"rows ({rows}) < number of sequences ({len(seqs)}).")
  ids = np.full((rows, length), pad_id, np.int32)
  mask = np.zeros((rows, length), bool)
  for i, s in enumerate(seqs):
    if len(s) > length:
      raise ValueError(f"Sequence {i} has {len(s)} tokens > length {length}.")
    ids[i, :len(s)] = s
    mask[i, :len(s)] = True
  return ids, mask


def pad_left(
    seqs: Sequence[Sequence[int]], length: int, *, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists (what `llama.generate` needs); see `pad_right`."""
  ids = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    if len(s) > length:
      raise ValueError(f"Sequence {i} has {len(s)} tokens > length {length}.")
    if s:
      ids[i, length - len(s):] = s
      mask[i, length - len(s):] = 1
  return ids, mask


def group_consecutive(queries: Sequence[str]) -> list[tuple[int, int]]:
  """`[start, end)` spans of equal consecutive query texts.

  `lowrank.ranking.rerank` sends all pairs of one query consecutively; the
  listwise scorers' `score_pairs` rebuild the lists from these spans.
  """
  spans = []
  start = 0
  for i in range(1, len(queries) + 1):
    if i == len(queries) or queries[i] != queries[start]:
      spans.append((start, i))
      start = i
  return spans if queries else []


def check_token_limits(max_query_tokens: int, max_doc_tokens: int) -> None:
  """A prompt format's token caps must be >= 1 (`ValueError` otherwise)."""
  if max_query_tokens < 1 or max_doc_tokens < 1:
    raise ValueError(
        "max_query_tokens and max_doc_tokens must be >= 1; got "
        f"{max_query_tokens}, {max_doc_tokens}.")


def check_lists(
    queries: Sequence[str],
    doc_lists: Sequence[Sequence[str]],
    batch_size: int,
    length_multiple: int,
) -> None:
  """The shared argument checks of the listwise scorers (`ValueError`)."""
  if isinstance(queries, str):
    raise ValueError("queries must be a sequence of str, not a str.")
  if len(queries) != len(doc_lists):
    raise ValueError(f"Need one candidate list per query; got "
                     f"{len(queries)} queries and {len(doc_lists)} lists.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive; got {batch_size}.")
  if length_multiple < 1:
    raise ValueError(
        f"length_multiple must be positive; got {length_multiple}.")


class ListwiseScorer:
  """`score_pairs` for a listwise scorer with a `rank_lists` method.

  Subclasses (`first.FirstReranker`, `icr.IcrReranker`) define
  `rank_lists(tokenizer, queries, doc_lists) -> list of [n_i] scores`;
  this class turns it into the pairwise `score_pairs` contract of
  `lowrank.ranking.rerank`.
  """

  # `(tokenizer, queries, doc_lists) -> per list, float32 [n_i] scores`.
  rank_lists: Callable[[Any, Sequence[str], Sequence[Sequence[str]]],
                       list[np.ndarray]]

  def score_pairs(
      self,
      tokenizer: Any,
      queries: Sequence[str],
      docs: Sequence[str],
  ) -> np.ndarray:
    """Scores `(queries[i], docs[i])` pairs listwise.

    Consecutive pairs with the same query text form one candidate list, in
    the given order (`lowrank.ranking.rerank` passes each query's top-k
    consecutively, best first; `group_consecutive`). Two different queries
    with identical text that are adjacent are ranked as one list.

    Returns:
      Float32 `[N]` scores in pair order.

    Raises:
      ValueError: If `queries` or `docs` is a str or their lengths differ.
    """
    if isinstance(queries, str) or isinstance(docs, str):
      raise ValueError("queries and docs must be sequences of str, not a "
                       "str.")
    if len(queries) != len(docs):
      raise ValueError(f"Need one document per query; got {len(queries)} "
                       f"queries and {len(docs)} documents.")
    spans = group_consecutive(list(queries))
    scores = self.rank_lists(tokenizer, [queries[s] for s, _ in spans],
                             [list(docs[s:e]) for s, e in spans])
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)
