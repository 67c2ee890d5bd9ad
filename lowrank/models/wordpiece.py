"""WordPiece tokenizer of a Hugging Face checkpoint, padded numpy batches.

`Tokenizer` wraps the `tokenizers` library's fast tokenizer read from a
checkpoint's `tokenizer.json` (a JSON description, no code), ignores the
file's own padding and truncation settings, and returns right-padded int32
numpy batches (`input_ids`, `attention_mask`, `token_type_ids`).
`Tokenizer.from_pretrained` picks the checkpoint's default length
(`sentence_bert_config.json`, then `tokenizer_config.json`).
`lowrank.models.bert.load_tokenizer(path)` is the usual entry point.
"""

from collections.abc import Iterable, Sequence
import os
import pathlib
from typing import Any

import numpy as np
import tokenizers

from lowrank.models import hf_io

PathLike = str | os.PathLike


class Tokenizer:
  """`tokenizers.Tokenizer` wrapper returning padded int32 numpy batches.

  The `tokenizer.json`'s own padding / truncation settings are ignored
  (all-MiniLM's pads every text to 128): truncation is at `max_length`
  (longest-first for pairs, special tokens included) and padding is done
  here, on the right, with `pad_token_id` and token type 0.
  """

  def __init__(
      self,
      tokenizer_file: PathLike,
      *,
      max_length: int = 512,
      pad_token: str = "[PAD]",
  ):
    """Loads `tokenizer.json`.

    Args:
      tokenizer_file: Path of `tokenizer.json`.
      max_length: Default truncation length (special tokens included).
      pad_token: The padding token.

    Raises:
      FileNotFoundError: If the file does not exist.
      ValueError: If `max_length < 2` or `pad_token` is not in the vocab.
    """
    path = pathlib.Path(tokenizer_file)
    if not path.is_file():
      raise FileNotFoundError(f"Tokenizer file not found: {path}")
    if max_length < 2:
      raise ValueError(f"max_length must be >= 2; got {max_length}.")
    self._tok = tokenizers.Tokenizer.from_file(str(path))
    self._tok.no_padding()
    self._tok.no_truncation()
    self.max_length = int(max_length)
    pad_id = self._tok.token_to_id(pad_token)
    if pad_id is None:
      raise ValueError(f"Pad token {pad_token!r} is not in the vocabulary.")
    self._pad_id = pad_id

  @classmethod
  def from_pretrained(
      cls,
      path: PathLike,
      *,
      max_length: int | None = None,
      max_position_embeddings: int | None = None,
  ) -> "Tokenizer":
    """Loads `path/tokenizer.json` with the checkpoint's default length.

    The default `max_length` is `sentence_bert_config.json`'s
    `max_seq_length` if present, else `tokenizer_config.json`'s
    `model_max_length`, else 512; capped at `max_position_embeddings`.

    Args:
      path: A HF-format checkpoint directory.
      max_length: Overrides the default truncation length.
      max_position_embeddings: Upper bound for the default (the model's).

    Returns:
      The tokenizer.
    """
    path = pathlib.Path(path)
    cap = max_position_embeddings or 512
    if max_length is None:
      st_config = _optional_json(path / "sentence_bert_config.json")
      tok_config = _optional_json(path / "tokenizer_config.json")
      if st_config.get("max_seq_length"):
        max_length = int(st_config["max_seq_length"])
      elif tok_config.get("model_max_length"):
        max_length = int(min(tok_config["model_max_length"], cap))
      else:
        max_length = cap
      max_length = min(max_length, cap)
    pad = _optional_json(path / "tokenizer_config.json").get("pad_token")
    pad_token = pad if isinstance(pad, str) else "[PAD]"
    return cls(path / "tokenizer.json", max_length=max_length,
               pad_token=pad_token)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def pad_token_id(self) -> int:
    return self._pad_id

  @property
  def cls_token_id(self) -> int | None:
    return self._tok.token_to_id("[CLS]")

  @property
  def sep_token_id(self) -> int | None:
    return self._tok.token_to_id("[SEP]")

  @property
  def mask_token_id(self) -> int | None:
    return self._tok.token_to_id("[MASK]")

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self._tok.id_to_token(int(token_id))

  def decode(
      self, ids: Iterable[int] | np.ndarray, *, skip_special_tokens: bool = True
  ) -> str:
    """Decodes ids (padding and special tokens skipped by default)."""
    return self._tok.decode(
        [int(i) for i in ids], skip_special_tokens=skip_special_tokens
    )

  def tokenize_unpadded(
      self,
      texts: Sequence[str],
      *,
      pairs: Sequence[str] | None = None,
      max_length: int | None = None,
  ) -> list[tuple[list[int], list[int]]]:
    """Token ids and type ids per text, truncated, not padded."""
    texts = as_text_list(texts, "texts")
    max_length = self.max_length if max_length is None else int(max_length)
    if max_length < 2:
      raise ValueError(f"max_length must be >= 2; got {max_length}.")
    if not texts:
      return []
    self._tok.enable_truncation(max_length, strategy="longest_first")
    try:
      if pairs is None:
        encs = self._tok.encode_batch(texts)
      else:
        pairs = as_text_list(pairs, "pairs")
        if len(pairs) != len(texts):
          raise ValueError(
              f"len(pairs)={len(pairs)} != len(texts)={len(texts)}."
          )
        encs = self._tok.encode_batch(list(zip(texts, pairs)))
    finally:
      self._tok.no_truncation()
    return [(e.ids, e.type_ids) for e in encs]

  def pad(
      self,
      encoded: Sequence[tuple[Sequence[int], Sequence[int]]],
      *,
      length: int,
      batch: int | None = None,
  ) -> dict[str, np.ndarray]:
    """Right-pads encodings to `[batch, length]` int32 arrays."""
    batch = len(encoded) if batch is None else batch
    ids = np.full((batch, length), self._pad_id, np.int32)
    mask = np.zeros((batch, length), np.int32)
    types = np.zeros((batch, length), np.int32)
    for i, (tok_ids, type_ids) in enumerate(encoded):
      n = len(tok_ids)
      ids[i, :n] = tok_ids
      mask[i, :n] = 1
      types[i, :n] = type_ids
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

  def __call__(
      self,
      texts: Sequence[str] | str,
      *,
      pairs: Sequence[str] | str | None = None,
      max_length: int | None = None,
      pad_to_multiple_of: int | None = None,
      pad_to: int | None = None,
  ) -> dict[str, np.ndarray]:
    """Tokenizes a batch.

    Args:
      texts: Texts (a single `str` is treated as a batch of one).
      pairs: Optional second segments (token type 1), one per text.
      max_length: Truncation length, special tokens included (default
        `self.max_length`); pairs are truncated longest-first.
      pad_to_multiple_of: Round the padded length up to a multiple of this.
      pad_to: Pad to exactly this length (fixed shapes for `jit`). Without
        `max_length`, texts are also truncated to `pad_to` tokens.

    Returns:
      `{"input_ids", "attention_mask", "token_type_ids"}`, each an int32
      `[N, L]` array. An empty `texts` gives `[0, 0]` arrays (`[0, pad_to]`
      if `pad_to` is set).

    Raises:
      ValueError: If `pad_to` is shorter than an encoding, or `pairs` has a
        different length from `texts`.
    """
    if isinstance(texts, str):
      texts = [texts]
      pairs = [pairs] if isinstance(pairs, str) else pairs
    if pad_to is not None and max_length is None:
      max_length = min(self.max_length, int(pad_to))
    encoded = self.tokenize_unpadded(texts, pairs=pairs, max_length=max_length)
    longest = max((len(ids) for ids, _ in encoded), default=0)
    if pad_to is not None:
      if pad_to < longest:
        raise ValueError(
            f"pad_to={pad_to} is shorter than the longest encoding "
            f"({longest} tokens); raise it or lower max_length."
        )
      length = pad_to
    else:
      length = longest
      if pad_to_multiple_of and length % pad_to_multiple_of:
        length += pad_to_multiple_of - length % pad_to_multiple_of
    return self.pad(encoded, length=length)


def _optional_json(path: pathlib.Path) -> dict[str, Any]:
  """The JSON object in `path`, or `{}` when there is no such file."""
  return hf_io.read_json(path) if path.is_file() else {}


def as_text_list(texts: Any, name: str) -> list[str]:
  """`texts` as a list, checking that every item is a `str`.

  Raises:
    TypeError: Naming the first item that is not a `str`.
  """
  texts = list(texts)
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise TypeError(f"{name}[{i}] must be a str; got {type(t).__name__}.")
  return texts
