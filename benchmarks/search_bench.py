r"""Exact top-k vs faiss, MUVERA vs exact MaxSim, metrics vs pytrec_eval, codes.

  /work/oracle-venv/bin/python benchmarks/search_bench.py
  /work/oracle-venv/bin/python benchmarks/search_bench.py --parts=topk \
      --sizes=100000

Needs `faiss-cpu` and `pytrec-eval-terrier` (the oracle venv has both).
Everything runs in this one process; each comparison is timed interleaved
(A, B, A, B, ...; the order alternates each round) and reported as a ratio of
medians. Parts (`--parts`):

* `topk`: `lowrank.retrieval.search.topk` (jit, float32, HIGHEST precision)
  vs `faiss.IndexFlatIP.search` on random Gaussian float32 corpora of
  `--sizes` rows x 384, `--queries` queries, k = `--k`. Throughput ratio =
  faiss time / our time (> 1: we are faster). The corpus sits on the one
  CPU device; `block_size` streams it (`--block_size`, 0 = whole corpus at
  once, used only where the `[Q, N]` scores fit in `--max_scores_gib`;
  `--block_sizes` lists the streamed variants).
* `muvera`: synthetic multi-vector data (token vectors drawn from topic
  vocabularies, see `_token_sets`). Exact MaxSim over all documents vs
  MUVERA FDE (R=20, k_sim=5, d_proj=16: 10240-d) top-`C` candidates by
  exact `topk` + exact MaxSim rerank. Recall@100 = overlap with the exact
  MaxSim top-100. Document FDEs are built once (index time, reported
  separately).
* `metrics`: `lowrank.retrieval.metrics.evaluate` vs pytrec_eval on
  `--metric_queries` queries x 1000 results (float32 scores, as a search
  returns them) with 1-5 graded judgements per query. pytrec_eval's time
  includes building its evaluator; both return the mean over queries.
* `codes`: all-MiniLM-L6-v2 embeddings of the stdlib code-search test split
  (queries and documents); index bytes and recall@10 vs exact float search
  for binary, int8 and PQ codes, and JPQ (centroids + a residual linear
  query head trained on 800 queries, evaluated on the other 300).
"""

import datetime
import statistics
import time

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

import _common  # pylint: disable=g-bad-import-order

from lowrank import assets
from lowrank import train
from lowrank.data import code_search
from lowrank.models import bert
from lowrank.retrieval import codes
from lowrank.retrieval import metrics
from lowrank.retrieval import muvera
from lowrank.retrieval import search

_PARTS = flags.DEFINE_list(
    "parts", ["metrics", "muvera", "codes", "topk"], "Parts to run."
)
_SIZES = flags.DEFINE_list(
    "sizes", ["100000", "1000000"], "Corpus sizes for the top-k part."
)
_QUERIES = flags.DEFINE_integer("queries", 1000, "Queries for top-k.")
_K = flags.DEFINE_integer("k", 100, "Results per query for top-k.")
_BLOCKS = flags.DEFINE_list(
    "block_sizes", ["32768", "131072"],
    "Streaming blocks to time (each one below the corpus size).",
)
_MAX_SCORES_GIB = flags.DEFINE_float(
    "max_scores_gib", 0.5, "Also time block_size=None when [Q, N] fits."
)
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds per comparison.")
_MUVERA_DOCS = flags.DEFINE_integer("muvera_docs", 5000, "Documents.")
_MUVERA_QUERIES = flags.DEFINE_integer("muvera_queries", 100, "Queries.")
_CANDIDATES = flags.DEFINE_list(
    "candidates", ["200", "500", "1000"], "MUVERA candidates to rerank."
)
_METRIC_QUERIES = flags.DEFINE_integer("metric_queries", 10000, "Queries.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")


_print = _common.print_flush
_load = _common.load
_interleaved = _common.interleaved
_fmt = _common.fmt
_LSCPU_FIELDS = _common.LSCPU_FIELDS + ("L3 cache", "Flags")


# ----------------------------------------------------------------------------


def bench_topk(rng):
  import faiss  # pylint: disable=g-import-not-at-top

  dim, num_queries, k = 384, _QUERIES.value, _K.value
  _print("### Exact top-k vs faiss IndexFlatIP")
  _print(
      f"- {num_queries} queries x 384, k = {k}, float32, faiss "
      f"{faiss.__version__} with {faiss.omp_get_max_threads()} OpenMP "
      f"threads; load at start {_load()}"
  )
  _print()
  _print(
      "| corpus | ours: block_size | ours s, median (min–max) | faiss s | "
      "throughput ratio (faiss / ours) | ours queries/s | top-k id "
      "overlap | max abs score diff |"
  )
  _print("|---|---:|---:|---:|---:|---:|---:|---:|")
  queries = rng.standard_normal((num_queries, dim), dtype=np.float32)
  for size in [int(s) for s in _SIZES.value]:
    corpus = rng.standard_normal((size, dim), dtype=np.float32)
    index = faiss.IndexFlatIP(dim)
    index.add(corpus)
    corpus_j = jax.device_put(corpus)
    queries_j = jax.device_put(queries)
    blocks = [int(b) for b in _BLOCKS.value if int(b) < size]
    if num_queries * size * 4 <= _MAX_SCORES_GIB.value * 2**30:
      blocks.insert(0, None)
    fns = {"faiss": lambda: index.search(queries, k)}
    for b in blocks:
      fns[b] = _topk_fn(queries_j, corpus_j, k, b)
    times = _interleaved(fns, _ROUNDS.value)
    f_scores, f_ids = index.search(queries, k)
    for b in blocks:
      scores, ids = jax.block_until_ready(fns[b]())
      overlap = np.mean([
          len(set(a) & set(c)) / k
          for a, c in zip(np.asarray(ids).tolist(), f_ids.tolist())
      ])
      diff = float(np.max(np.abs(np.asarray(scores) - f_scores)))
      ratio = statistics.median(times["faiss"]) / statistics.median(times[b])
      _print(
          f"| {size:,} x 384 | {b} | {_fmt(times[b])} | "
          f"{_fmt(times['faiss'])} | **{ratio:.2f}** | "
          f"{num_queries / statistics.median(times[b]):.0f} | "
          f"{overlap:.4f} | {diff:.1e} |"
      )
    del index, corpus, corpus_j
  _print(f"- load at end {_load()}")
  _print()


def _topk_fn(queries, corpus, k, block_size):
  def run():
    return jax.block_until_ready(
        search.topk(queries, corpus, k, block_size=block_size)
    )

  return run


# ----------------------------------------------------------------------------


def _token_sets(rng, num, tokens, dim, vocab, topics, words_per_doc=None):
  """Token vectors: each set mixes 2 topics over a shared word vocabulary.

  Returns `[num, tokens, dim]` L2-normalised float32 vectors (word vector +
  0.15 noise) and the words used, so queries can reuse a document's words.
  """
  num_topics = topics.shape[0]
  pair = rng.integers(0, num_topics, size=(num, 2))
  choice = rng.integers(0, topics.shape[1], size=(num, tokens))
  which = rng.integers(0, 2, size=(num, tokens))
  words = topics[pair[np.arange(num)[:, None], which], choice]
  if words_per_doc is not None:
    words = words_per_doc
  x = vocab[words] + 0.15 * rng.standard_normal(
      (num, tokens, dim)
  ).astype(np.float32) / np.sqrt(dim)
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  return x.astype(np.float32), words


def bench_muvera(rng):
  dim, doc_tokens, query_tokens, k = 128, 64, 32, 100
  n, nq = _MUVERA_DOCS.value, _MUVERA_QUERIES.value
  vocab = rng.standard_normal((8192, dim)).astype(np.float32)
  vocab /= np.linalg.norm(vocab, axis=1, keepdims=True)
  topics = rng.integers(0, 8192, size=(256, 300))
  docs, doc_words = _token_sets(rng, n, doc_tokens, dim, vocab, topics)
  # Queries: 20 words of a random document + 12 words of a random topic.
  src = rng.integers(0, n, size=nq)
  q_words = np.concatenate(
      [
          doc_words[src[:, None], rng.integers(0, doc_tokens, (nq, 20))],
          topics[rng.integers(0, 256, (nq, 1)),
                 rng.integers(0, 300, (nq, 12))],
      ],
      axis=1,
  )
  queries, _ = _token_sets(
      rng, nq, query_tokens, dim, vocab, topics, words_per_doc=q_words
  )
  q_mask = np.ones((nq, query_tokens), bool)
  d_mask = np.ones((n, doc_tokens), bool)
  config = muvera.FDEConfig(
      dimension=dim, num_repetitions=20, num_simhash_projections=5,
      projection_dim=16, seed=1,
  )
  docs_j, d_mask_j = jax.device_put(docs), jax.device_put(d_mask)
  queries_j, q_mask_j = jax.device_put(queries), jax.device_put(q_mask)

  t0 = time.perf_counter()
  doc_fde = jnp.concatenate([
      muvera.encode_documents(docs_j[i:i + 1000], d_mask_j[i:i + 1000],
                              config)
      for i in range(0, n, 1000)
  ])
  doc_fde = jax.block_until_ready(doc_fde)
  index_time = time.perf_counter() - t0

  @jax.jit
  def exact(qs, qm, dv, dm):
    def one(args):
      q, m = args
      return jax.lax.top_k(muvera.chamfer(q, m, dv, dm), k)

    return jax.lax.map(one, (qs, qm))

  @jax.jit
  def rerank(qs, qm, cands, dv, dm):
    def one(args):
      q, m, c = args
      s = muvera.chamfer(q, m, dv[c], dm[c])
      top, pos = jax.lax.top_k(s, k)
      return top, c[pos]

    return jax.lax.map(one, (qs, qm, cands))

  def muvera_search(num_candidates):
    def run():
      q_fde = muvera.encode_queries(queries_j, q_mask_j, config)
      _, cands = search.topk(q_fde, doc_fde, num_candidates)
      return jax.block_until_ready(
          rerank(queries_j, q_mask_j, cands, docs_j, d_mask_j)
      )

    return run

  fns = {
      "exact": lambda: jax.block_until_ready(
          exact(queries_j, q_mask_j, docs_j, d_mask_j)
      )
  }
  cands = [int(c) for c in _CANDIDATES.value]
  for c in cands:
    fns[c] = muvera_search(c)
  times = _interleaved(fns, _ROUNDS.value)
  _, exact_ids = fns["exact"]()
  exact_ids = np.asarray(exact_ids)
  src_rank = np.mean(np.any(exact_ids[:, :10] == src[:, None], axis=1))
  _print("### MUVERA + rerank vs exact MaxSim")
  _print(
      f"- synthetic: {n} documents x {doc_tokens} tokens, {nq} queries x "
      f"{query_tokens} tokens, dim {dim} (8192-word vocabulary, 256 "
      f"topics; query = 20 words of a source document + 12 topic words); "
      f"exact MaxSim puts the source document in its top-10 for "
      f"{src_rank:.2f} of the queries"
  )
  _print(
      f"- FDE: R=20, k_sim=5, d_proj=16 -> {config.output_dim} dims; "
      f"document FDEs built once in {index_time:.1f} s (not timed below); "
      f"load {_load()}"
  )
  _print()
  _print(
      "| method | candidates reranked | s, median (min–max) | time ratio "
      "(exact / method) | recall@100 vs exact MaxSim |"
  )
  _print("|---|---:|---:|---:|---:|")
  _print(f"| exact MaxSim (all docs) | {n} | {_fmt(times['exact'])} | 1.00 | "
         "1.000 |")
  for c in cands:
    _, ids = fns[c]()
    recall = np.mean([
        len(set(a) & set(b)) / k
        for a, b in zip(np.asarray(ids).tolist(), exact_ids.tolist())
    ])
    ratio = statistics.median(times["exact"]) / statistics.median(times[c])
    _print(
        f"| MUVERA FDE top-{c} + MaxSim rerank | {c} | {_fmt(times[c])} | "
        f"**{ratio:.2f}** | {recall:.3f} |"
    )
  _print()


# ----------------------------------------------------------------------------


def bench_metrics(rng):
  import pytrec_eval  # pylint: disable=g-import-not-at-top

  nq, depth = _METRIC_QUERIES.value, 1000
  doc_ids = [f"doc{i}" for i in range(100 * depth)]
  qids = [f"q{i}" for i in range(nq)]
  # Distinct documents per row: one per stride of 100 ids, shuffled.
  idx = np.arange(depth)[None, :] * 100 + rng.integers(0, 100, (nq, depth))
  idx = rng.permuted(idx, axis=1)
  scores = -np.sort(-rng.random((nq, depth), dtype=np.float32), axis=1)
  run = metrics.run_from_scores(qids, doc_ids, scores, idx)
  qrels = {}
  for i, q in enumerate(qids):
    num = int(rng.integers(1, 6))
    ranks = np.minimum(rng.geometric(0.05, size=num), depth - 1)
    judged = {doc_ids[j]: int(rng.integers(0, 4)) for j in idx[i, ranks]}
    judged[doc_ids[int(rng.integers(0, 100 * depth))]] = 1  # Maybe unseen.
    qrels[q] = judged
  names = ["ndcg_cut_10", "recall_100", "map", "recip_rank", "P_10"]
  pytrec_names = {"ndcg_cut.10", "recall.100", "map", "recip_rank", "P.10"}

  def ours():
    return metrics.evaluate(qrels, run, names)

  def theirs():
    per_query = pytrec_eval.RelevanceEvaluator(
        qrels, pytrec_names
    ).evaluate(run)
    return {n: float(np.mean([v[n] for v in per_query.values()]))
            for n in names}

  times = _interleaved({"ours": ours, "pytrec_eval": theirs}, _ROUNDS.value)
  per_q = metrics.evaluate_per_query(qrels, run, names)
  ref_q = pytrec_eval.RelevanceEvaluator(qrels, pytrec_names).evaluate(run)
  diffs = [abs(per_q[q][n] - ref_q[q][n]) for q in qids for n in names]
  equal = np.mean([d == 0 for d in diffs])
  ratio = statistics.median(times["pytrec_eval"]) / statistics.median(
      times["ours"]
  )
  means_ours, means_ref = ours(), theirs()
  _print("### Metrics vs pytrec_eval")
  _print(
      f"- {nq} queries x {depth} results (float32 scores), 1-5 graded "
      f"judgements + 1 random judged document per query; measures "
      f"{names}; load {_load()}"
  )
  _print()
  _print("| evaluator | s, median (min–max) | speed-up vs pytrec_eval |")
  _print("|---|---:|---:|")
  _print(f"| pytrec_eval (evaluator + evaluate + mean) | "
         f"{_fmt(times['pytrec_eval'])} | 1.00 |")
  _print(f"| `metrics.evaluate` | {_fmt(times['ours'])} | **{ratio:.1f}** |")
  _print()
  _print(
      f"- per-query values: {equal:.4%} bit-identical, max |diff| "
      f"{max(diffs):.1e} over {len(diffs):,} values"
  )
  _print("- means: " + ", ".join(
      f"{n} {means_ours[n]:.6f} / {means_ref[n]:.6f}" for n in names))
  _print()


# ----------------------------------------------------------------------------


def bench_codes(rng):
  del rng
  data = code_search.load_code_search("test")
  qids = list(data.queries)
  doc_ids = list(data.corpus)
  pos = np.array([doc_ids.index(next(iter(data.qrels[q]))) for q in qids])
  model = bert.load_pretrained(assets.minilm_path())
  tok = bert.load_tokenizer(assets.minilm_path())
  t0 = time.perf_counter()
  q = bert.embed_texts(model, tok, [data.queries[i] for i in qids],
                       max_length=64)
  d = bert.embed_texts(model, tok, [data.corpus[i] for i in doc_ids],
                       max_length=128)
  embed_time = time.perf_counter() - t0
  n, dim = d.shape
  k = 10
  _, exact = search.topk(q, d, k)
  exact = np.asarray(exact)

  def row(name, ids, nbytes, code_bytes, note=""):
    ids = np.asarray(ids)
    overlap = np.mean([
        len(set(a) & set(b)) / k for a, b in zip(ids.tolist(), exact.tolist())
    ])
    rel = np.mean(np.any(ids == pos[:, None], axis=1))
    _print(
        f"| {name} | {code_bytes} | {nbytes / 1024:.1f} | "
        f"{dim * 4 / code_bytes:.0f}x | {overlap:.3f} | {rel:.3f} | {note} |"
    )

  _print("### Compressed codes on real embeddings")
  _print(
      f"- all-MiniLM-L6-v2 (mean pooling, L2-normalised), stdlib code-search "
      f"test split: {len(qids)} queries (max 64 tokens) and {n} documents "
      f"(max 128 tokens), embedded in {embed_time:.0f} s; one relevant "
      f"document per query; load {_load()}"
  )
  _print(
      "- recall@10 vs exact = overlap with the exact float32 top-10; "
      "R@10 (qrels) = fraction of queries whose relevant document is in the "
      "top-10. Index KiB include scales / codebooks (PQ codebooks are a "
      "fixed 384 KiB, large next to this small corpus); compression is "
      "that of the per-document codes."
  )
  _print()
  _print(
      "| index | code bytes / doc | index KiB | compression | recall@10 vs "
      "exact | R@10 (qrels) | note |"
  )
  _print("|---|---:|---:|---:|---:|---:|---|")
  row("float32 exact", exact, d.nbytes, dim * 4)
  bits = codes.pack_bits(d)
  nb = codes.index_nbytes(bits)
  row("binary, Hamming only",
      codes.hamming_search(codes.pack_bits(q), bits, k)[1], nb, dim // 8)
  row("binary + sign rescoring", codes.binary_search(
      q, bits, k, num_candidates=100)[1], nb, dim // 8,
      "100 Hamming candidates, "
      "float query x ±1 doc")
  row("binary + float rerank", codes.binary_search(
      q, bits, k, num_candidates=100, doc_vectors=d)[1], nb, dim // 8,
      "100 candidates; float vectors read from host/disk for them only")
  for per_dim in (True, False):
    index = codes.int8_quantize(d, per_dimension=per_dim)
    row(f"int8 ({'per-dimension' if per_dim else 'global'} scale)",
        codes.int8_search(q, index, k)[1], codes.index_nbytes(index), dim,
        "int8 x int8 -> int32 dot products")
  pq_indexes = {}
  for m in (24, 48, 96):
    index = codes.train_pq(d, m, num_centroids=256, num_iters=25)
    pq_indexes[m] = index
    row(f"PQ M={m}, K=256", codes.pq_search(q, index, k)[1],
        codes.index_nbytes(index), m,
        f"codebooks {codes.index_nbytes(index.codebooks) / 1024:.0f} KiB "
        "of it; ADC")
  _print()
  _jpq(q, pos, pq_indexes[24])


class _JPQHead(nnx.Module):
  """PQ centroids and a residual linear head on the frozen query embedding."""

  def __init__(self, codebooks: jax.Array):
    dim = codebooks.shape[0] * codebooks.shape[2]
    self.codebooks = nnx.Param(jnp.array(codebooks, copy=True))
    self.query = nnx.Param(jnp.zeros((dim, dim)))

  def __call__(self, x):
    return x + x @ self.query[...]


def _jpq(q, pos, index):
  """JPQ on PQ M=24: train on 800 queries, evaluate held-out ones."""
  import optax  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  order = rng.permutation(len(q))
  train_ids, held = order[:800], order[800:]
  graphdef, params, rest = train.split(_JPQHead(index.codebooks))

  def pq_index(head):
    return codes.PQIndex(head.codebooks[...], index.codes)

  def recall(params, which):
    head = nnx.merge(graphdef, params, rest)
    _, top = codes.pq_search(head(jnp.asarray(q[which])), pq_index(head), 10)
    return float(np.mean(np.any(np.asarray(top) == pos[which][:, None], 1)))

  def loss_fn(head, batch):
    x, p, neg = batch
    return codes.jpq_loss(head(x), head.codebooks[...], index.codes[p],
                          index.codes[neg])

  tx = optax.multi_transform(
      {"codebooks": optax.adam(3e-4), "query": optax.adam(3e-5)},
      lambda params: jax.tree.map_with_path(lambda p, _: p[0].key, params),
  )
  state = train.init_opt_state(tx, params)
  step = train.make_train_step(graphdef, loss_fn, tx)

  before = (recall(params, train_ids), recall(params, held))
  t0 = time.perf_counter()
  steps = 200
  for _ in range(steps):
    batch = rng.choice(train_ids, size=32, replace=False)
    x = jnp.asarray(q[batch])
    head = nnx.merge(graphdef, params, rest)
    neg = codes.jpq_negatives(head(x), pq_index(head), pos[batch], 8)
    params, state, _ = step(params, state, rest, (x, pos[batch], neg))
  train_time = time.perf_counter() - t0
  after = (recall(params, train_ids), recall(params, held))
  _print(
      f"JPQ on PQ M=24 (codes fixed; centroids + residual linear query head "
      f"on the frozen MiniLM query embedding; softmax loss over positive, 8 "
      f"PQ-mined negatives and in-batch positives; {steps} steps of 32, "
      f"{train_time:.0f} s):"
  )
  _print()
  _print("| queries | R@10 (qrels), k-means codebooks | R@10 after JPQ |")
  _print("|---|---:|---:|")
  _print(f"| 800 training queries | {before[0]:.3f} | {after[0]:.3f} |")
  _print(f"| 300 held-out queries | {before[1]:.3f} | {after[1]:.3f} |")
  _print()


def main(argv):
  del argv
  rng = np.random.default_rng(_SEED.value)
  started = datetime.datetime.now(datetime.timezone.utc)
  for line in _common.header("search_bench", started, _LSCPU_FIELDS):
    _print(line)
  _print(f"- load average (1/5/15 min) at start: {_load()}")
  _print()
  parts = {
      "metrics": bench_metrics,
      "muvera": bench_muvera,
      "codes": bench_codes,
      "topk": bench_topk,
  }
  for name in _PARTS.value:
    if name not in parts:
      raise ValueError(f"Unknown part {name!r}; options: {list(parts)}")
  for name in _PARTS.value:
    t0 = time.perf_counter()
    parts[name](rng)
    _print(f"({name}: {time.perf_counter() - t0:.0f} s)")
    _print()
  _print(f"- load average at end: {_load()}")


if __name__ == "__main__":
  app.run(main)
