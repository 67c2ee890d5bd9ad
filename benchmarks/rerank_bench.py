r"""Reranking throughput: cross-encoder bucketing, FIRST single pass vs decode.

  .venv/bin/python benchmarks/rerank_bench.py
  .venv/bin/python benchmarks/rerank_bench.py --parts=first --windows=10

Everything runs in this one process; each comparison is timed interleaved
(A, B, A, B, ...; the order alternates each round) after one warm-up call
of each (compilation excluded) and reported as a ratio of medians.

* `cross_encoder`: `lowrank.ranking.CrossEncoder.from_pretrained()`
  (all-MiniLM-L6-v2 + a scoring head) scoring real pairs of varied length:
  `--ce_queries` code-search test queries x their BM25 top `--ce_depth`
  documents (Python functions; most are shorter than `--ce_max_length`
  tokens, some longer). `score_pairs` with length bucketing
  (`DEFAULT_BUCKETS`: 64/128/256, capped at the max length; and buckets
  every 32 tokens) vs `buckets=None` (every batch padded to the max
  length); same pairs, same batch size. Throughput in pairs per second.
* `first`: the decoder of `experiments/configs/rerank_decoder.py` (byte
  vocabulary; random init, or with `--first_workdir` the FIRST-tuned
  weights of an `experiments/rerank_decoder.py` run: timing does not
  depend on the weights, agreement does) and the same FIRST prompts (a
  code-search test query + its BM25 top `window` documents cut to 96
  bytes): `first.window_scores` (one forward pass, identifier logits at
  the first position) vs `first.generate_permutations` (greedy decoding of
  the whole permutation `A > B > ...`, `n + 3 (n - 1)` tokens with a KV
  cache, `llama.generate`). Agreement columns: the decoded first identifier
  vs the single pass's arg-max, the whole decoded permutation vs the
  single pass's logit order, and the Kendall τ between those two orders.
"""

import datetime
import statistics
import time

from absl import app
from absl import flags
from absl import logging
from flax import nnx
import jax
import numpy as np

import _common  # pylint: disable=g-bad-import-order

from experiments import rerank_decoder
from experiments.configs import rerank_decoder as rerank_config
from lowrank import sharding
from lowrank.data import code_search
from lowrank.models import llama
from lowrank.ranking import cross_encoder
from lowrank.ranking import decoder_text
from lowrank.ranking import first
from lowrank.retrieval import bm25 as bm25_lib

_PARTS = flags.DEFINE_list("parts", ["cross_encoder", "first"],
                           "Parts to run.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds per comparison.")
_CE_QUERIES = flags.DEFINE_integer("ce_queries", 24, "Queries.")
_CE_DEPTH = flags.DEFINE_integer("ce_depth", 8, "BM25 documents per query.")
_CE_MAX_LENGTH = flags.DEFINE_integer("ce_max_length", 256,
                                      "Pair truncation length.")
_CE_BATCH = flags.DEFINE_integer("ce_batch_size", 32, "Pairs per batch.")
_WINDOWS = flags.DEFINE_list("windows", ["10", "20"],
                             "FIRST candidates per prompt.")
_FIRST_PROMPTS = flags.DEFINE_integer("first_prompts", 8,
                                      "FIRST prompts per timed call.")
_FIRST_BATCH = flags.DEFINE_integer("first_batch_size", 8,
                                    "FIRST prompts per forward pass.")
_FIRST_WORKDIR = flags.DEFINE_string(
    "first_workdir", "",
    "A workdir of experiments/rerank_decoder.py (default config): use its "
    "FIRST-tuned decoder instead of a random init.")


_print = _common.print_flush
_load = _common.load
_interleaved = _common.interleaved
_fmt = _common.fmt


def _kendall(a: list[int], b: list[int]) -> float:
  """Kendall's tau between two orders of the same items."""
  pos = {x: i for i, x in enumerate(b)}
  n = len(a)
  c = sum(1 if pos[a[i]] < pos[a[j]] else -1
          for i in range(n) for j in range(i + 1, n))
  return c / max(n * (n - 1) / 2, 1)


def _bm25_lists(num_queries: int, depth: int):
  test = code_search.load_code_search("test")
  index = bm25_lib.BM25(test.corpus)
  qids = sorted(test.qrels)[:num_queries]
  queries, lists = [], []
  for q in qids:
    docs = [test.corpus[d] for d, _ in index.search(test.queries[q], depth)]
    if len(docs) == depth:
      queries.append(test.queries[q])
      lists.append(docs)
  return queries, lists


def bench_cross_encoder() -> None:
  model, tokenizer = cross_encoder.CrossEncoder.from_pretrained()
  queries, lists = _bm25_lists(_CE_QUERIES.value, _CE_DEPTH.value)
  qs = [q for q, docs in zip(queries, lists) for _ in docs]
  ds = [d for docs in lists for d in docs]
  max_length = _CE_MAX_LENGTH.value
  lengths = np.array([len(ids) for ids, _ in cross_encoder.tokenize_pairs(
      tokenizer, qs, ds, max_length=max_length)])
  kw = dict(batch_size=_CE_BATCH.value, max_length=max_length)
  out = {}

  def run(buckets):
    def fn():
      out[buckets] = model.score_pairs(tokenizer, qs, ds, buckets=buckets,
                                       **kw)
    return fn

  fine = tuple(range(32, max_length + 1, 32))
  times = _interleaved({"bucketed": run(cross_encoder.DEFAULT_BUCKETS),
                        "fine": run(fine),
                        "unbucketed": run(None)}, _ROUNDS.value)
  diff = max(float(np.abs(out[b] - out[None]).max())
             for b in (cross_encoder.DEFAULT_BUCKETS, fine))
  n = len(qs)
  _print(f"### cross-encoder: {n} pairs ({len(queries)} queries x BM25 top "
         f"{_CE_DEPTH.value}), MiniLM-L6, batch {_CE_BATCH.value}, max "
         f"length {max_length}")
  _print(f"pair lengths (tokens): median {np.median(lengths):.0f}, p10 "
         f"{np.percentile(lengths, 10):.0f}, p90 "
         f"{np.percentile(lengths, 90):.0f}, "
         f"{np.mean(lengths >= max_length):.0%} truncated; max |score "
         f"difference| bucketed vs not: {diff:.2e}")
  _print()
  _print("| scoring | seconds, median (min–max) | pairs/s | speed-up |")
  _print("|---|---:|---:|---:|")
  base = statistics.median(times["unbucketed"])
  labels = {
      "unbucketed": "buckets=None (pad to max length)",
      "bucketed": f"DEFAULT_BUCKETS {cross_encoder.bucket_lengths(max_length)}",
      "fine": "buckets every 32 tokens",
  }
  for name, label in labels.items():
    med = statistics.median(times[name])
    _print(f"| {label} | {_fmt(times[name])} | {n / med:.0f} | "
           f"{base / med:.2f}× |")
  _print()


def bench_first() -> None:
  config = rerank_config.get_config()
  if _FIRST_WORKDIR.value:
    model, step = rerank_decoder.load_trained(config, _FIRST_WORKDIR.value)
    weights = f"FIRST-tuned, step {step} of {_FIRST_WORKDIR.value}"
  else:
    with sharding.use_mesh(sharding.make_mesh(devices=jax.devices()[:1])):
      model = llama.LlamaForCausalLM(rerank_decoder.model_config(config),
                                     rngs=nnx.Rngs(0))
    weights = "random init"
  fmt, _ = rerank_decoder.prompt_formats(config)
  tok = decoder_text.ByteTokenizer()
  m = config.model
  _print(f"### FIRST single pass vs full permutation decoding: decoder "
         f"d={m.hidden_size}, {m.num_layers} layers, {m.num_heads} heads "
         f"(the rerank_decoder config; {weights}), byte tokens, docs cut to "
         f"{fmt.max_doc_tokens} bytes; {_FIRST_PROMPTS.value} prompts per "
         f"call, batch {_FIRST_BATCH.value}")
  _print()
  _print("| window | prompt bytes (mean) | decoded tokens | single pass, s "
         "| generate, s | generate / single pass | same top-1 | same order "
         "| Kendall τ |")
  _print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for window in (int(w) for w in _WINDOWS.value):
    queries, lists = _bm25_lists(_FIRST_PROMPTS.value * 3, window)
    queries = queries[:_FIRST_PROMPTS.value]
    lists = lists[:_FIRST_PROMPTS.value]
    kw = dict(prompt_format=fmt, batch_size=_FIRST_BATCH.value)
    out = {}

    def single(queries=queries, lists=lists, kw=kw):
      out["single"] = first.window_scores(model, tok, queries, lists, **kw)

    def generate(queries=queries, lists=lists, kw=kw):
      out["generate"] = first.generate_permutations(model, tok, queries,
                                                    lists, **kw)

    times = _interleaved({"single": single, "generate": generate},
                         _ROUNDS.value)
    prompt_len = np.mean([len(first.build_prompt(tok, q, d, fmt))
                          for q, d in zip(queries, lists)])
    # The greedy first token is the arg-max over the whole vocabulary, so
    # it agrees with the single pass only when that is an identifier.
    same = np.mean([int(np.argmax(s)) == g[0] for s, g in
                    zip(out["single"], out["generate"])])
    # The whole decoded permutation vs the single pass's logit order.
    pairs = list(zip(out["single"], out["generate"]))
    order = np.mean([list(np.argsort(-s, kind="stable")) == g
                     for s, g in pairs])
    tau = np.mean([_kendall(list(np.argsort(-s, kind="stable")), g)
                   for s, g in pairs])
    s, g = (statistics.median(times[k]) for k in ("single", "generate"))
    _print(f"| {window} | {prompt_len:.0f} | {window + 3 * (window - 1)} | "
           f"{_fmt(times['single'])} | {_fmt(times['generate'])} | "
           f"{g / s:.1f}× | {same:.0%} | {order:.0%} | {tau:.2f} |")
  _print()


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore.
  started = datetime.datetime.now(datetime.timezone.utc)
  for line in _common.header("rerank_bench", started):
    _print(line)
  _print(f"- load average (1/5/15 min) at start: {_load()}")
  _print()
  parts = {"cross_encoder": bench_cross_encoder, "first": bench_first}
  for name in _PARTS.value:
    if name not in parts:
      raise ValueError(f"Unknown part {name!r}; options: {list(parts)}")
  for name in _PARTS.value:
    t0 = time.perf_counter()
    parts[name]()
    _print(f"({name}: {time.perf_counter() - t0:.0f} s; load average now "
           f"{_load()})")
    _print()


if __name__ == "__main__":
  app.run(main)
