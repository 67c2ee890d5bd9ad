"""Training data for rerankers: query splits, candidate groups and batches.

Cross-encoders and listwise decoders (FIRST) learn to put a query's judged
document above first-stage candidates. This module builds those examples
from a dataset with `queries`, `corpus` and `qrels` (a `beir.Dataset`),
deterministically in a seed and the step, so that a resumed run sees
exactly the batches an uninterrupted one does:

- `sample_ids` / `split_queries`: the queries with a positive, optionally a
  seeded sample, split into training and held-out dev ids;
- `negative_groups`: per query its positives and a pool of BM25-mined
  negatives (every judged document excluded), for groups of one positive
  and `G - 1` negatives; `group_batch` samples and tokenizes step `s`'s
  groups for a cross-encoder, `evaluate_groups` scores fixed held-out ones;
- `candidate_lists`: a query's BM25 top-`window`, the judged document put
  in when BM25 missed it (FIRST's training lists); `first_batch` collates
  step `s`'s lists with the target "judged first, then BM25 order";
- `byte_windows`: LM pretraining batches of a byte-level decoder;
- `step_indices`: which examples make step `s` (a per-epoch permutation);
- `random_order` / `random_window_order` / `oracle_order`: the reference
  rows of a reranking table (a shuffle of the top-k, random scores through
  FIRST's sliding windows, the judged documents first).
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lowrank.ranking import cascade
from lowrank.ranking import cross_encoder
from lowrank.ranking import decoder_text
from lowrank.ranking import first
from lowrank.ranking import losses as ltr_losses
from lowrank.retrieval import bm25 as bm25_lib

Group = tuple[str, list[str], list[str]]
"""`(query id, positive ids, negative pool ids best first)`."""
CandidateList = tuple[str, list[str], list[float]]
"""`(query id, candidate ids in BM25 order, label per candidate)`."""
Run = dict[str, dict[str, float]]


def sample_ids(ids: Iterable[str], n: int, seed: int) -> list[str]:
  """A sorted seeded sample of `n` of `ids` (all of them, sorted, if 0)."""
  ids = sorted(ids)
  if not n:
    return ids
  order = np.random.default_rng(seed).permutation(len(ids))
  return sorted(ids[i] for i in order[:n])


def split_queries(
    qrels: Mapping[str, Mapping[str, int]],
    *,
    dev_fraction: float,
    seed: int,
    max_queries: int = 0,
) -> tuple[list[str], list[str]]:
  """`(training ids, dev ids)` of the queries with a positive, both sorted.

  At most `max_queries` of them (`sample_ids`; 0 = all) are used;
  `dev_fraction` of those (at least one, seeded) are held out as dev.

  Raises:
    ValueError: If `dev_fraction` is not in (0, 1) or fewer than two
      queries have a positive.
  """
  if not 0.0 < dev_fraction < 1.0:
    raise ValueError(f"dev_fraction must be in (0, 1) (the dev split must "
                     f"hold queries and leave some); got {dev_fraction}.")
  qids = sample_ids([q for q, rel in qrels.items()
                     if any(r > 0 for r in rel.values())], max_queries, seed)
  if len(qids) < 2:
    raise ValueError(f"Need at least 2 queries with a positive (for a train "
                     f"and a dev split); got {len(qids)}. Use a dataset "
                     f"with more judged queries, or raise max_queries.")
  n_dev = min(max(1, round(dev_fraction * len(qids))), len(qids) - 1)
  order = np.random.default_rng([seed, 1]).permutation(len(qids))
  dev = sorted(qids[i] for i in order[:n_dev])
  return sorted(qids[i] for i in order[n_dev:]), dev


def negative_groups(
    dataset: Any,
    qids: Sequence[str],
    index: bm25_lib.BM25,
    *,
    depth: int,
    pool: int,
    min_negatives: int,
) -> list[Group]:
  """Positives and a negative pool per query of `qids` that has enough.

  Negatives are the query's BM25 top `depth` minus every document judged
  for it, best first, at most `pool` of them; queries without a positive
  or with fewer than `min_negatives` negatives are dropped.
  """
  positives = {q: sorted(d for d, r in dataset.qrels[q].items() if r > 0)
               for q in qids}
  mined = bm25_lib.mine_hard_negatives(
      index, {q: dataset.queries[q] for q in qids},
      {q: set(dataset.qrels[q]) for q in qids}, k=depth, n=pool)
  return [(q, positives[q], mined[q]) for q in qids
          if positives[q] and len(mined[q]) >= min_negatives]


def step_indices(
    n: int, batch_size: int, step: int, seed: Sequence[int]
) -> tuple[np.ndarray, int, int]:
  """`(indices, epoch, i)`: the examples of `step` (1-based), a batch `i`.

  Epoch `e` visits the `n` examples in the permutation seeded by
  `(*seed, e)`, `n // batch_size` batches per epoch (the rest is skipped).

  Raises:
    ValueError: If there are fewer examples than one batch.
  """
  if n < batch_size:
    raise ValueError(f"{n} training examples are fewer than one batch of "
                     f"{batch_size}; lower the batch size or use more "
                     f"training queries.")
  epoch, i = divmod(step - 1, n // batch_size)
  perm = np.random.default_rng([*seed, epoch]).permutation(n)
  return perm[i * batch_size:(i + 1) * batch_size], epoch, i


def group_batch(
    groups: Sequence[Group],
    dataset: Any,
    tokenizer: Any,
    step: int,
    *,
    batch_size: int,
    group_size: int,
    max_length: int,
    seed: int,
) -> dict[str, np.ndarray]:
  """Tokenized pairs `[Q*G, L]` and `labels` `[Q, G]` of `step`'s groups.

  Each of the `batch_size` queries gets one random positive (label 1,
  first) and `group_size - 1` negatives drawn without replacement from its
  pool (label 0). `L` is the smallest `cross_encoder.bucket_lengths` length
  that fits, so a jitted step compiles at most once per bucket.
  """
  idx, epoch, i = step_indices(len(groups), batch_size, step, [seed])
  rng = np.random.default_rng([seed, epoch, i, 1])
  queries, docs = [], []
  for j in idx:
    qid, pos, pool = groups[j]
    chosen = [pos[rng.integers(len(pos))]] + [
        pool[k] for k in rng.choice(len(pool), group_size - 1, replace=False)]
    queries += [dataset.queries[qid]] * group_size
    docs += [dataset.corpus[d] for d in chosen]
  encoded = cross_encoder.tokenize_pairs(tokenizer, queries, docs,
                                         max_length=max_length)
  longest = max(len(ids) for ids, _ in encoded)
  length = next(b for b in cross_encoder.bucket_lengths(max_length)
                if b >= longest)
  labels = np.zeros((batch_size, group_size), np.float32)
  labels[:, 0] = 1.0
  return {**tokenizer.pad(encoded, length=length), "labels": labels}


def evaluate_groups(
    model: Any,
    tokenizer: Any,
    groups: Sequence[Group],
    dataset: Any,
    *,
    group_size: int,
    loss: str,
    batch_size: int,
    max_length: int,
) -> dict[str, float]:
  """`{"dev_loss", "dev_top1"}` of fixed groups (held out from training).

  Each group is the query's first positive and its `group_size - 1`
  hardest negatives, scored as at reranking time (`score_pairs`); the loss
  is `losses.get(loss)` and `dev_top1` the fraction of groups
  whose positive scores highest (chance: `1 / group_size`). `{}` for no
  groups.
  """
  if not groups:
    return {}
  queries, docs = [], []
  for qid, pos, pool in groups:
    queries += [dataset.queries[qid]] * group_size
    docs += [dataset.corpus[d] for d in [pos[0]] + pool[:group_size - 1]]
  scores = np.asarray(model.score_pairs(
      tokenizer, queries, docs, batch_size=batch_size,
      max_length=max_length)).reshape(len(groups), group_size)
  labels = np.zeros_like(scores)
  labels[:, 0] = 1.0
  value = ltr_losses.get(loss, cross_encoder.LOSSES)(scores, labels)
  return {"dev_loss": float(value),
          "dev_top1": float(np.mean(np.argmax(scores, axis=1) == 0))}


def candidate_lists(
    dataset: Any,
    qids: Sequence[str],
    index: bm25_lib.BM25,
    *,
    window: int,
    seed: int,
) -> list[CandidateList]:
  """Each query's BM25 top `window`, holding one judged document.

  If BM25 missed every judged document, the first one replaces a random
  slot (seeded); fewer than `window` matches are topped up with random
  documents. Queries without a positive are skipped.
  """
  rng = np.random.default_rng([seed, 1])
  out = []
  for qid in qids:
    positives = {d for d, r in dataset.qrels[qid].items() if r > 0}
    if not positives:
      continue
    docs = [d for d, _ in index.search(dataset.queries[qid], window)]
    while len(docs) < window:
      d = index.doc_ids[int(rng.integers(index.num_docs))]
      if d not in docs:
        docs.append(d)
    if not positives & set(docs):
      docs[int(rng.integers(window))] = sorted(positives)[0]
    out.append((qid, docs, [1.0 if d in positives else 0.0 for d in docs]))
  return out


def first_batch(
    lists: Sequence[CandidateList],
    dataset: Any,
    tokenizer: Any,
    step: int,
    *,
    batch_size: int,
    window: int,
    seed: int,
    shuffle: bool = False,
    prompt_format: first.PromptFormat | None = None,
    length_multiple: int = 64,
) -> dict[str, np.ndarray]:
  """FIRST's training batch of `step` (`first.collate` of its lists).

  The target permutation is the judged documents first, then BM25 order;
  with `shuffle` the candidates appear in the prompt in a random order
  (same target), so that position says nothing about relevance. Rows are
  right-padded to a multiple of `length_multiple` tokens.
  """
  idx, _, _ = step_indices(len(lists), batch_size, step, [seed, 2])
  rng = np.random.default_rng([seed, 4, step])
  examples = []
  for j in idx:
    qid, docs, labels = lists[j]
    target = sorted(range(len(docs)), key=lambda k: (-labels[k], k))
    shown = (rng.permutation(len(docs)) if shuffle
             else np.arange(len(docs)))
    slot = {int(d): p for p, d in enumerate(shown)}
    examples.append(first.make_example(
        tokenizer, dataset.queries[qid],
        [dataset.corpus[docs[d]] for d in shown], [labels[d] for d in shown],
        order=[slot[d] for d in target], prompt_format=prompt_format))
  length = decoder_text.bucket_length(
      max(len(e.prompt) + len(e.target) for e in examples), length_multiple)
  return first.collate(examples, window=window, length=length,
                       rows=batch_size)


def byte_windows(text: str, seq_len: int, batch_size: int,
                 seed: int) -> Callable[[int], np.ndarray]:
  """`step -> int32 [batch_size, seq_len]`: random windows of `text`'s bytes.

  The LM pretraining batches of a byte-level decoder, a function of the
  step (seeded by `[seed, 0, step]`), so a resumed run sees the same ones.

  Raises:
    ValueError: If the text is not longer than `seq_len` bytes.
  """
  tokens = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
  if len(tokens) <= seq_len:
    raise ValueError(f"The text has {len(tokens)} bytes; windows of "
                     f"seq_len={seq_len} need more. Lower seq_len or use "
                     f"more text.")

  def batch(step: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 0, step])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    return np.stack([tokens[s:s + seq_len] for s in starts])
  return batch


def random_order(run: Mapping[str, Mapping[str, Any]], seed: Any) -> Run:
  """`run` with each query's documents in a seeded random order."""
  rng = np.random.default_rng(seed)
  return {q: {d: float(s) for d, s in zip(sorted(run[q]),
                                          rng.permutation(len(run[q])))}
          for q in sorted(run)}


def random_window_order(run: Mapping[str, Mapping[str, Any]], k: int,
                        window: int, stride: int, seed: Any) -> Run:
  """`run`'s top `k` through FIRST's sliding windows, random window scores.

  The reference that tells what the windows alone do to an order: each
  window is ranked by seeded normal scores (`first.sliding_window_orders`);
  queries in sorted order draw in turn.
  """
  selected = {q: cascade.top_k(run[q], k) for q in run}
  qids = [q for q in sorted(selected) if selected[q]]
  rng = np.random.default_rng(seed)
  orders = first.sliding_window_orders(
      [len(selected[q]) for q in qids], window, stride,
      lambda jobs: rng.normal(size=(len(jobs), window)))
  out: Run = {q: {} for q in run}
  for q, order in zip(qids, orders):
    out[q] = {d: float(v)
              for d, v in zip(selected[q], first.order_scores(order))}
  return out


def oracle_order(run: Mapping[str, Mapping[str, Any]],
                 qrels: Mapping[str, Mapping[str, int]]) -> Run:
  """`run` reordered by judged relevance first (ties: the run's order)."""
  return {q: {d: float(qrels.get(q, {}).get(d, 0)) + float(s) * 1e-9
              for d, s in docs.items()} for q, docs in run.items()}
