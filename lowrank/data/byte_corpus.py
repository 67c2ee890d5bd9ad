"""Byte-level language-modelling corpora named by one string.

A corpus spec names UTF-8 text read as bytes (a 256-token vocabulary, no
tokenizer to download):

- `"tinyshakespeare"`: `data/lm/tinyshakespeare/input.txt` under
  $LOWRANK_SHARED_DIR (default: the `shared` folder beside the checkout);
- `"lee"`: gensim's Lee corpus (`lee_background.cor` + `lee.cor`) from the
  gensim wheel's test data, read by path (`pip install --no-deps
  gensim==4.4.0`; its code is never imported);
- `"auto"`: tinyshakespeare when present, else lee;
- `"file:<path>"`: any text file.

`load` splits the bytes nanoGPT's way (the last `val_fraction` validates)
and cuts the validation part into evenly spread, non-overlapping windows.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from lowrank import assets

SPECS = ("auto", "tinyshakespeare", "lee", "file:<path>")


def shakespeare_path() -> pathlib.Path:
  """Where tinyshakespeare is looked for ($LOWRANK_SHARED_DIR first)."""
  shared = os.environ.get("LOWRANK_SHARED_DIR") or (
      pathlib.Path(__file__).resolve().parents[3] / "shared")
  return pathlib.Path(shared, "data", "lm", "tinyshakespeare", "input.txt")


def files(spec: str) -> tuple[str, list[pathlib.Path]]:
  """`(name, text files)` of `spec`.

  Raises:
    ValueError: On an unknown spec.
    FileNotFoundError: If a file of the corpus is missing (with where it
      comes from).
  """
  if spec == "auto":
    spec = "tinyshakespeare" if shakespeare_path().exists() else "lee"
  if spec == "lee":
    try:
      root = assets.gensim_test_data_path()
    except FileNotFoundError:
      root = pathlib.Path("<gensim>/test/test_data")
    name, paths = "gensim lee", [root / n for n in ("lee_background.cor",
                                                    "lee.cor")]
  elif spec == "tinyshakespeare":
    name, paths = spec, [shakespeare_path()]
  elif spec.startswith("file:") and spec[5:]:
    name, paths = pathlib.Path(spec[5:]).name, [pathlib.Path(spec[5:])]
  else:
    raise ValueError(f"must be 'auto', 'tinyshakespeare', 'lee' or "
                     f"'file:<path>'; found {spec!r}.")
  for path in paths:
    if not path.is_file():
      raise FileNotFoundError(
          f"{spec!r}: file {str(path)!r} does not exist (tinyshakespeare: "
          f"$LOWRANK_SHARED_DIR/data/lm; lee: {assets.GENSIM_PIP}).")
  return name, paths


def load(spec: str, *, val_fraction: float, seq_len: int, batch_size: int,
         eval_batches: int) -> tuple[str, np.ndarray, list[np.ndarray]]:
  """`(name, train tokens, validation batches)` of a corpus spec.

  Args:
    spec: See the module docstring.
    val_fraction: The last fraction of the bytes validates.
    seq_len, batch_size: Validation windows and batches.
    eval_batches: At most this many validation batches of `batch_size`
      non-overlapping windows, evenly spread over the validation bytes.

  Returns:
    The corpus name, the training bytes as int32 tokens, and the validation
    batches (`[batch_size, seq_len]` int32 each).

  Raises:
    ValueError: On an unknown spec, or a corpus too short for one training
      window and one validation batch.
    FileNotFoundError: See `files`.
  """
  name, paths = files(spec)
  tokens = np.frombuffer(b"".join(p.read_bytes() for p in paths),
                         np.uint8).astype(np.int32)
  cut = int(round(len(tokens) * (1.0 - val_fraction)))
  train, val = tokens[:cut], tokens[cut:]
  b, n = batch_size, seq_len
  count = min(len(val) // n, eval_batches * b) // b * b
  if len(train) <= n or count == 0:
    raise ValueError(
        f"Corpus {name!r} ({len(tokens)} bytes) is too short: train "
        f"{len(train)} tokens, validation {len(val)} (fewer than "
        f"batch_size={b} windows of {n}). Use a longer corpus or a smaller "
        f"seq_len / batch_size.")
  starts = np.linspace(0, len(val) // n - 1, count).astype(np.int64) * n
  windows = np.stack([val[s:s + n] for s in starts])
  return name, train, list(windows.reshape(-1, b, n))
