"""Retrieval evaluation of a model on a test set: embed, search, trec_eval.

One function per kind of retriever, each returning `(metrics, info)`:
`metrics` a flat dict of floats (trec_eval measures averaged over the
judged queries, `METRICS` by default), `info` the timings (seconds, wall
clock, compilation included) and sizes.

- `dense`: a `biencoder.BiEncoder`; exact inner-product top-k over
  L2-normalised embeddings (`search.search_run`). With `prefix_dims`, also
  `PREFIX_METRICS` of every embedding prefix of those sizes (truncate and
  renormalise, as Matryoshka embeddings are used), keys `"ndcg_cut_10@64"`.
- `late_interaction`: a `colbert.ColBERT`; exact MaxSim top-k
  (`colbert.search_exact`), MUVERA (FDE top-`rerank` candidates reranked by
  exact MaxSim, `colbert.search_muvera`; keys `"muvera_<measure>"`) and the
  FDE ranking alone (`"fde_<measure>"`).
- `bm25`: `bm25.BM25` over the corpus, no model.
- `sparse`: a SPLADE masked-LM `bert.BertModel`; inverted-index retrieval
  (`sparse_index`); the info holds the average number of non-zero terms per
  query and document and the expected FLOPS.

The dataset is anything with `corpus`, `queries` and `qrels` dicts (e.g.
`lowrank.data.beir.Dataset`); every judged query is searched. With several
processes, evaluate a `local_copy` of the model (every process then
computes the same metrics with no further communication).
`prefix_curve` reads one measure per prefix size back from the metrics,
`plot_prefix_curves` draws them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import contextlib
import json
import os
import pathlib
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from lowrank import distributed
from lowrank import metric_writers
from lowrank import sharding
from lowrank.models import bert
from lowrank.retrieval import biencoder
from lowrank.retrieval import bm25 as bm25_lib
from lowrank.retrieval import colbert as colbert_lib
from lowrank.retrieval import metrics as metrics_lib
from lowrank.retrieval import muvera
from lowrank.retrieval import search
from lowrank.retrieval import sparse_index
from lowrank.retrieval import splade

METRICS = ("ndcg_cut_10", "recall_10", "recall_100")
# Measures reported at every embedding prefix size.
PREFIX_METRICS = ("ndcg_cut_10", "recall_100")
_PREFIX_LABELS = {"ndcg_cut_10": "nDCG@10", "recall_100": "Recall@100"}

Result = tuple[dict[str, float], dict[str, Any]]


def _ids(dataset: Any) -> tuple[list[Any], list[Any]]:
  qids, dids = sorted(dataset.qrels), sorted(dataset.corpus)
  if not qids or not dids:
    raise ValueError(
        f"Evaluation needs at least one judged query and one document; got "
        f"{len(qids)} judged queries and {len(dids)} documents. Check the "
        f"test split (or the limits that cut it).")
  missing = [q for q in qids if q not in dataset.queries]
  if missing:
    raise ValueError(f"{len(missing)} judged queries have no text (e.g. "
                     f"{missing[0]!r}); the queries must cover the qrels.")
  return qids, dids


def _timed(fn, *args, **kwargs):
  t = time.perf_counter()
  out = jax.block_until_ready(fn(*args, **kwargs))
  return out, time.perf_counter() - t


def _normalize(x: Any, dims: int | None = None) -> np.ndarray:
  """The first `dims` columns (all: None) of each row, L2-renormalised."""
  p = np.asarray(x, np.float32)[:, :dims]
  return p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)


def _evaluate(qrels, run, names, prefix: str = "") -> dict[str, float]:
  return {prefix + k: float(v)
          for k, v in metrics_lib.evaluate(qrels, run, names).items()}


def dense(
    model: biencoder.BiEncoder,
    tokenizer: bert.Tokenizer,
    dataset: Any,
    *,
    k: int = 100,
    batch_size: int = 64,
    query_max_length: int | None = None,
    doc_max_length: int | None = None,
    prefix_dims: Sequence[int] = (),
    metrics: Sequence[str] = METRICS,
) -> Result:
  """Bi-encoder retrieval: embed, exact top-`k`, trec_eval `metrics`.

  Args:
    model: The bi-encoder (its pooling; embeddings are L2-normalised).
    tokenizer: Its tokenizer.
    dataset: `corpus`, `queries`, `qrels`.
    k: Results per query (capped at the corpus size).
    batch_size: Texts per encoder call.
    query_max_length / doc_max_length: Token limits (None: the tokenizer's).
    prefix_dims: Also evaluate these embedding prefix sizes (truncate +
      renormalise): `PREFIX_METRICS` under `"<measure>@<dims>"`.
    metrics: trec_eval measures of the full embeddings.

  Returns:
    `(metrics, info)`; info: `encode_s`, `search_s`, `dim`.

  Raises:
    ValueError: On an empty test set or a prefix larger than the embedding.
  """
  qids, dids = _ids(dataset)
  full = model.query_encoder.config.hidden_size
  too_big = sorted(m for m in prefix_dims if m > full)
  if too_big:
    raise ValueError(f"Prefix sizes {too_big} exceed the embedding size "
                     f"{full}; use prefix sizes <= {full}.")
  model.eval()
  t = time.perf_counter()
  q = biencoder.embed_queries(model, tokenizer,
                              [dataset.queries[i] for i in qids],
                              batch_size=batch_size,
                              max_length=query_max_length)
  d = biencoder.embed_documents(model, tokenizer,
                                [dataset.corpus[i] for i in dids],
                                batch_size=batch_size,
                                max_length=doc_max_length)
  info: dict[str, Any] = {"encode_s": time.perf_counter() - t, "dim": full}
  q, d, k = _normalize(q), _normalize(d), min(k, len(dids))
  t = time.perf_counter()
  run = search.search_run(qids, q, dids, d, k)
  info["search_s"] = time.perf_counter() - t
  out = _evaluate(dataset.qrels, run, metrics)
  for m in sorted(set(prefix_dims), reverse=True):
    run_m = run if m == full else search.search_run(
        qids, _normalize(q, m), dids, _normalize(d, m), k)
    for name, value in _evaluate(dataset.qrels, run_m,
                                 PREFIX_METRICS).items():
      out[f"{name}@{m}"] = value
  return out, info


def late_interaction(
    model: colbert_lib.ColBERT,
    dataset: Any,
    *,
    k: int = 100,
    batch_size: int = 32,
    fde: muvera.FDEConfig | None = None,
    rerank: int = 200,
    metrics: Sequence[str] = METRICS,
) -> Result:
  """ColBERT retrieval: exact MaxSim, MUVERA FDE + rerank, FDE alone.

  Args:
    model: The ColBERT model (its query / document lengths).
    dataset: `corpus`, `queries`, `qrels`.
    k: Results per query (capped at the corpus size).
    batch_size: Texts per encoder call.
    fde: MUVERA's encoding (default: `FDEConfig(model.dim)`).
    rerank: FDE candidates reranked by exact MaxSim (at least `k`, at most
      the corpus).
    metrics: trec_eval measures.

  Returns:
    `(metrics, info)`: metrics of the exact search, `"muvera_<measure>"`
    and `"fde_<measure>"`; info: the encode / index / search times, the FDE
    size, the token vectors' and FDE index's bytes and how much of the
    exact top-k MUVERA recovers (`muvera_overlap_with_exact`).

  Raises:
    ValueError: On an empty test set.
  """
  qids, dids = _ids(dataset)
  fde = fde or muvera.FDEConfig(dimension=model.dim)
  model.eval()
  t = time.perf_counter()
  qv, qm = model.embed_queries([dataset.queries[i] for i in qids],
                               batch_size=batch_size)
  dv, dm = model.embed_documents([dataset.corpus[i] for i in dids],
                                 batch_size=batch_size)
  k = min(k, len(dids))
  rerank = min(max(int(rerank), k), len(dids))
  info: dict[str, Any] = {
      "encode_s": time.perf_counter() - t, "doc_vectors": int(dm.sum()),
      "doc_vector_bytes": int(dm.sum()) * int(dv.shape[-1]) * 4,
      "muvera_rerank": rerank, "fde_dim": fde.output_dim}

  def as_run(found):
    return metrics_lib.run_from_scores(qids, dids, np.asarray(found[0]),
                                       np.asarray(found[1]))

  exact, info["exact_search_s"] = _timed(colbert_lib.search_exact,
                                         qv, qm, dv, dm, k)
  run = as_run(exact)
  out = _evaluate(dataset.qrels, run, metrics)
  doc_fdes, info["fde_index_s"] = _timed(colbert_lib.encode_fdes, dv, dm,
                                         fde)
  info["fde_index_bytes"] = int(doc_fdes.size) * 4
  found, info["muvera_search_s"] = _timed(
      colbert_lib.search_muvera, qv, qm, dv, dm, k, fde, rerank,
      doc_fdes=doc_fdes)
  run_m = as_run(found)
  out.update(_evaluate(dataset.qrels, run_m, metrics, "muvera_"))
  # The FDE candidates alone (the call inside `search_muvera`: compiled
  # once); the metrics read their top 10 / 100.
  q_fdes = muvera.encode_queries(qv, jnp.asarray(qm) != 0, fde)
  out.update(_evaluate(dataset.qrels, as_run(search.exact_search(
      q_fdes, doc_fdes, rerank)), metrics, "fde_"))
  info["muvera_overlap_with_exact"] = float(np.mean(
      [len(set(run[q]) & set(run_m[q])) / max(len(run[q]), 1)
       for q in qids]))
  return out, info


def sparse(
    model: bert.BertModel,
    tokenizer: bert.Tokenizer,
    dataset: Any,
    *,
    k: int = 100,
    batch_size: int = 64,
    query_max_length: int | None = None,
    doc_max_length: int | None = None,
    metrics: Sequence[str] = METRICS,
) -> Result:
  """SPLADE retrieval through an inverted index.

  `splade.embed_texts` does not shard its batches, so with several local
  devices the model runs on one (`local_copy`): a mesh would make every
  device compute the whole batch.

  Args:
    model: A masked-LM BERT (`config.add_mlm_head`), e.g. SPLADE-tiny.
    tokenizer: Its tokenizer.
    dataset: `corpus`, `queries`, `qrels`.
    k: Results per query (capped at the corpus size).
    batch_size: Texts per encoder call.
    query_max_length / doc_max_length: Token limits (None: the tokenizer's).
    metrics: trec_eval measures.

  Returns:
    `(metrics, info)`; info: `index_s`, `encode_queries_s`, `search_s`,
    `avg_query_terms`, `avg_doc_terms`, `expected_flops`, `postings`.

  Raises:
    ValueError: On an empty test set or a model without an MLM head.
  """
  qids, dids = _ids(dataset)
  if not model.config.add_mlm_head:
    raise ValueError("sparse retrieval needs a masked-LM BERT (e.g. "
                     "SPLADE-tiny); this model has no MLM head.")
  model.eval()
  mesh = None
  if len(jax.local_devices()) > 1:
    model, mesh = local_copy(model, jax.local_devices()[:1])
  with jax.set_mesh(mesh) if mesh else contextlib.nullcontext():
    t = time.perf_counter()
    docs = splade.embed_texts(model, tokenizer,
                              [dataset.corpus[i] for i in dids],
                              batch_size=batch_size,
                              max_length=doc_max_length)
    index = sparse_index.build(docs)
    info: dict[str, Any] = {"index_s": time.perf_counter() - t}
    queries, info["encode_queries_s"] = _timed(
        splade.embed_texts, model, tokenizer,
        [dataset.queries[i] for i in qids], batch_size=batch_size,
        max_length=query_max_length)
  run, info["search_s"] = _timed(sparse_index.search_run, index, qids,
                                 queries, dids, min(k, len(dids)))
  info.update(avg_query_terms=queries.nnz / queries.num_rows,
              avg_doc_terms=docs.nnz / docs.num_rows,
              expected_flops=splade.expected_flops(queries, docs),
              postings=index.nnz)
  return _evaluate(dataset.qrels, run, metrics), info


def bm25(dataset: Any, *, k: int = 100,
         metrics: Sequence[str] = METRICS) -> Result:
  """BM25 retrieval (`bm25.BM25`'s defaults) of every judged query.

  Returns:
    `(metrics, info)`; info: `index_s`, `search_s`, `vocab_size`,
    `postings`, `avg_doc_length`.

  Raises:
    ValueError: On an empty test set or a judged query without text.
  """
  qids, _ = _ids(dataset)
  index, index_s = _timed(bm25_lib.BM25, dataset.corpus)
  run, search_s = _timed(index.search_run,
                         {q: dataset.queries[q] for q in qids}, k)
  return _evaluate(dataset.qrels, run, metrics), {
      "index_s": index_s, "search_s": search_s,
      "vocab_size": len(index.vocab), "postings": index.index.nnz,
      "avg_doc_length": index.avgdl}

def checkpoint_kind(path: str | os.PathLike) -> tuple[str, str | None]:
  """How a Hugging Face BERT directory retrieves: `(kind, pooling)`.

  `("splade", None)` when config.json's `architectures` names
  `BertForMaskedLM`, else `("dense", pooling)`: the pooling mode of its
  sentence-transformers `1_Pooling/config.json` (mean without one).

  Raises:
    FileNotFoundError: If `path` holds no config.json.
    ValueError: On a pooling mode that `bert.POOLINGS` does not have.
  """
  path = pathlib.Path(path)
  if not (path / "config.json").is_file():
    raise FileNotFoundError(f"{str(path)!r} holds no config.json; expected "
                            "a Hugging Face BERT directory.")
  config = json.loads((path / "config.json").read_text())
  if "BertForMaskedLM" in (config.get("architectures") or ()):
    return "splade", None
  pooling_file = path / "1_Pooling" / "config.json"
  c = json.loads(pooling_file.read_text()) if pooling_file.is_file() else {}
  for key, mode in (("pooling_mode_cls_token", "cls"),
                    ("pooling_mode_lasttoken", "last")):
    if c.get(key):
      return "dense", mode
  if c.get("pooling_mode_mean_tokens", True):
    return "dense", "mean"
  raise ValueError(f"{pooling_file}: unsupported pooling mode {c}; lowrank "
                   f"pools by {bert.POOLINGS}.")

def local_copy(
    model: nnx.Module, devices: Sequence[Any] | None = None
) -> tuple[nnx.Module, jax.sharding.Mesh]:
  """`(copy, mesh)`: `model` replicated on `devices`, and their mesh.

  With several processes a model's weights live on a mesh spanning all of
  them, and the `embed_*` functions read results back to the host, which
  needs fully addressable arrays: every process gathers the weights (a
  collective: all processes must call this) and evaluates its copy under
  `jax.set_mesh(mesh)`.

  Args:
    model: The model, on any mesh.
    devices: This process's devices to replicate on (default: all of
      `jax.local_devices()`).
  """
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)],
                            devices=list(devices or jax.local_devices()))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  graphdef, state = nnx.split(model)
  state = jax.tree.map(
      lambda x: jax.device_put(x, replicated)
      if isinstance(x, (np.ndarray, jax.Array)) else x,
      distributed.to_host(state))
  return nnx.merge(graphdef, state), mesh


def prefix_curve(metrics: Mapping[str, float],
                 measure: str = "ndcg_cut_10") -> dict[int, float]:
  """`{prefix size: value}` of `measure` from `dense`'s `"measure@dims"`."""
  out = {}
  for key, value in metrics.items():
    name, sep, dims = key.partition("@")
    if sep and name == measure:
      out[int(dims)] = float(value)
  return dict(sorted(out.items()))


def check_depth(k: int, measures: Sequence[str], num_docs: int, *,
                name: str = "k") -> None:
  """Rejects `k < min(deepest measure cutoff, num_docs)` (`recall_100`: 100).

  Recall@100 over a top-20 list is Recall@20 under a wrong name; a corpus no
  larger than `k` is retrieved whole. `name` spells `k` in the message.

  Raises:
    ValueError: If `k` is too small.
  """
  depth = max((int(m.rsplit("_", 1)[1]) for m in measures
               if m.rsplit("_", 1)[-1].isdigit()), default=0)
  if k < min(depth, num_docs):
    raise ValueError(
        f"{name}={k} retrieves fewer results than the metrics read "
        f"({sorted(measures)}: depth {depth}, {num_docs} documents), so they "
        f"would be computed on a top-{k} list under a deeper name. Set "
        f"{name} to at least {min(depth, num_docs)}.")

def plot_prefix_curves(curves: Sequence[tuple[str, Mapping[str, float], str]],
                       path: str, *, title: str = "") -> str:
  """Plots `PREFIX_METRICS` against embedding prefix size; returns `path`.

  Args:
    curves: `(label, metrics, matplotlib line style)` per line; `metrics`
      holds `dense`'s `"measure@dims"` keys (`prefix_curve`).
    path: The PNG written (atomically).
    title: The figure's title.

  Raises:
    ValueError: If no curve has prefix metrics.
  """
  if not any(prefix_curve(m) for _, m, _ in curves):
    raise ValueError("No curve has prefix metrics (ndcg_cut_10@<dim> keys); "
                     "evaluate with dense(..., prefix_dims=...).")
  fig, axes = metric_writers.pyplot().subplots(1, len(PREFIX_METRICS),
                                               figsize=(10, 3.8))
  dims = sorted({d for _, m, _ in curves for d in prefix_curve(m)})
  for ax, measure in zip(axes, PREFIX_METRICS):
    for label, metrics, style in curves:
      c = prefix_curve(metrics, measure)
      ax.plot(list(c), list(c.values()), style, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.set(xlabel="embedding prefix size",
           ylabel=f"{_PREFIX_LABELS[measure]} (test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  return metric_writers.save_figure(fig, path, title=title)
