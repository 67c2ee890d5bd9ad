r"""Zero-shot retrieval evaluation on a BEIR-format directory.

  python -m experiments.eval_beir --data_dir=../shared/data/beir/scifact \
      --model=minilm --output_dir=/tmp/eval_scifact_minilm

`--model` is one of

- `minilm`: the bundled all-MiniLM-L6-v2 (mean pooling, cosine similarity,
  max 256 tokens: sentence-transformers' and MTEB's setup), exact search;
- `splade_tiny`: the bundled SPLADE-tiny (max-pooled `log(1 + relu)` MLM
  weights, dot product), searched through an inverted index;
- `bm25`: BM25 (k1 0.9, b 0.4, Lucene-like English analyzer);
- a local Hugging Face BERT directory: SPLADE if its `architectures` names
  `BertForMaskedLM`, otherwise a dense encoder (pooling from
  sentence-transformers' `1_Pooling/config.json` if present, else mean;
  cosine similarity).

The corpus text is `title + " " + text` (`lowrank.data.beir`). Metrics are
trec_eval's, averaged over all judged queries of the split (a query with no
result counts 0): nDCG@10, MRR@10, Recall@100 and MAP over the top `--k`
results (BEIR retrieves 1000). `results.json` and `results.md` in
`--output_dir` hold the metrics, sizes and wall-clock times.
"""

import json
import os
import pathlib
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging

from experiments import config_checks
from lowrank import assets
from lowrank import sharding
from lowrank.data import beir
from lowrank.models import bert
from lowrank.retrieval import bm25 as bm25_lib
from lowrank.retrieval import metrics as metrics_lib
from lowrank.retrieval import search
from lowrank.retrieval import sparse_index
from lowrank.retrieval import splade

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "BEIR-format directory (corpus.jsonl, queries.jsonl, "
    "qrels/<split>.tsv)."
)
_MODEL = flags.DEFINE_string(
    "model", "minilm", "minilm | splade_tiny | bm25 | <HF BERT directory>."
)
_SPLIT = flags.DEFINE_string("split", "test", "qrels split to evaluate.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "results.json and results.md go here."
)
_MAX_QUERIES = flags.DEFINE_integer(
    "max_queries", 0, "Evaluate only the first N judged queries (sorted by "
    "id); 0 = all. The whole corpus is still indexed."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Encoder batch size.")
_MAX_LENGTH = flags.DEFINE_integer(
    "max_length", 0, "Document truncation length in tokens; 0 = the model "
    "default (256 for MiniLM and SPLADE)."
)
_K = flags.DEFINE_integer("k", 1000, "Results retrieved per query.")

METRICS = ("ndcg_cut_10", "mrr_cut_10", "recall_100", "map")
_LABELS = {
    "ndcg_cut_10": "nDCG@10",
    "mrr_cut_10": "MRR@10",
    "recall_100": "Recall@100",
    "map": "MAP",
}
# SPLADE's usual training / evaluation length (naver/splade configs).
SPLADE_MAX_LENGTH = 256


def resolve_model(model: str) -> tuple[str, pathlib.Path | None]:
  """`(kind, checkpoint dir)`, kind in {"bm25", "dense", "splade"}.

  Raises:
    ValueError: If `model` is neither a known name nor a directory.
  """
  if model == "bm25":
    return "bm25", None
  if model == "minilm":
    return "dense", assets.minilm_path()
  if model == "splade_tiny":
    return "splade", assets.splade_tiny_path()
  path = pathlib.Path(model)
  if not (path / "config.json").is_file():
    raise ValueError(
        f"--model must be minilm, splade_tiny, bm25 or a directory holding "
        f"config.json; got {model!r}."
    )
  with (path / "config.json").open() as f:
    architectures = json.load(f).get("architectures") or ()
  return ("splade" if "BertForMaskedLM" in architectures else "dense"), path


def _pooling(path: pathlib.Path) -> str:
  """sentence-transformers' pooling mode of a checkpoint (default mean)."""
  config = path / "1_Pooling" / "config.json"
  if not config.is_file():
    return "mean"
  with config.open() as f:
    c = json.load(f)
  if c.get("pooling_mode_cls_token"):
    return "cls"
  if c.get("pooling_mode_lasttoken"):
    return "last"
  if c.get("pooling_mode_mean_tokens", True):
    return "mean"
  raise ValueError(f"{config}: unsupported pooling mode {c}.")


def _subset(dataset: beir.Dataset, max_queries: int) -> beir.Dataset:
  if not max_queries:
    return dataset
  keep = sorted(dataset.qrels)[:max_queries]
  return beir.Dataset(
      corpus=dataset.corpus,
      queries={q: dataset.queries[q] for q in keep},
      qrels={q: dataset.qrels[q] for q in keep},
      name=dataset.name,
  )


def _retrieve_bm25(dataset, qids, k, timing):
  t = time.perf_counter()
  index = bm25_lib.BM25(dataset.corpus)
  timing["index_s"] = time.perf_counter() - t
  t = time.perf_counter()
  run = index.search_run({q: dataset.queries[q] for q in qids}, k)
  timing["search_s"] = time.perf_counter() - t
  stats = {
      "vocab_size": len(index.vocab),
      "postings": index.index.nnz,
      "avg_doc_length": index.avgdl,
  }
  return run, stats


def _retrieve_dense(path, dataset, qids, dids, k, batch_size, max_length,
                    timing):
  t = time.perf_counter()
  model = bert.load_pretrained(path)
  tokenizer = bert.load_tokenizer(path)
  timing["load_model_s"] = time.perf_counter() - t
  pooling = _pooling(path)
  max_length = max_length or tokenizer.max_length
  t = time.perf_counter()
  d = bert.embed_texts(model, tokenizer,
                       [dataset.corpus[i] for i in dids],
                       pooling=pooling, batch_size=batch_size,
                       max_length=max_length)
  timing["index_s"] = time.perf_counter() - t
  t = time.perf_counter()
  q = bert.embed_texts(model, tokenizer,
                       [dataset.queries[i] for i in qids],
                       pooling=pooling, batch_size=batch_size)
  run = search.search_run(qids, q, dids, d, min(k, len(dids)))
  timing["search_s"] = time.perf_counter() - t
  stats = {"pooling": pooling, "dim": int(d.shape[1]),
           "doc_max_length": max_length,
           "query_max_length": tokenizer.max_length}
  return run, stats


def _retrieve_splade(path, dataset, qids, dids, k, batch_size, max_length,
                     timing):
  t = time.perf_counter()
  model = bert.load_pretrained(path)
  tokenizer = bert.load_tokenizer(path)
  timing["load_model_s"] = time.perf_counter() - t
  max_length = max_length or SPLADE_MAX_LENGTH
  t = time.perf_counter()
  docs = splade.embed_texts(model, tokenizer,
                            [dataset.corpus[i] for i in dids],
                            batch_size=batch_size, max_length=max_length)
  index = sparse_index.build(docs)
  timing["index_s"] = time.perf_counter() - t
  t = time.perf_counter()
  queries = splade.embed_texts(model, tokenizer,
                               [dataset.queries[i] for i in qids],
                               batch_size=batch_size,
                               max_length=max_length)
  run = sparse_index.search_run(index, qids, queries, dids, k)
  timing["search_s"] = time.perf_counter() - t
  stats = {
      "postings": index.nnz,
      "avg_doc_terms": docs.nnz / max(docs.num_rows, 1),
      "avg_query_terms": queries.nnz / max(queries.num_rows, 1),
      "expected_flops": splade.expected_flops(queries, docs),
      "max_length": max_length,
  }
  return run, stats


def validate_args(
    data_dir: str | os.PathLike | None,
    model: str,
    split: str = "test",
    *,
    max_queries: int = 0,
    batch_size: int = 32,
    max_length: int = 0,
    k: int = 1000,
) -> None:
  """Checks the arguments of `evaluate_beir` before anything is loaded.

  Raises:
    ValueError: On a non-positive size or an unknown model.
    TypeError: On a size that is not an integer.
    FileNotFoundError: If `data_dir`, its `corpus.jsonl` / `queries.jsonl`
      or `qrels/<split>.tsv` is missing (the message names the path and
      the available splits).
  """
  values = dict(data_dir=data_dir, max_queries=max_queries,
                batch_size=batch_size, max_length=max_length, k=k)
  defaults = dict(max_queries=_MAX_QUERIES.default,
                  batch_size=_BATCH_SIZE.default,
                  max_length=_MAX_LENGTH.default, k=_K.default)
  check = config_checks.Checker(values, defaults, label="--{}", flag="--{}")
  check.positive_int("batch_size", "k")
  check.non_negative_int("max_queries", "max_length")
  if data_dir is None:
    raise ValueError("--data_dir is required: a BEIR-format directory "
                     "(corpus.jsonl, queries.jsonl, qrels/<split>.tsv).")
  check.beir_directory("data_dir", data_dir, (split,))
  resolve_model(model)


def evaluate_beir(
    data_dir: str | os.PathLike,
    model: str,
    *,
    split: str = "test",
    output_dir: str | os.PathLike | None = None,
    max_queries: int = 0,
    batch_size: int = 32,
    max_length: int = 0,
    k: int = 1000,
) -> dict[str, Any]:
  """Evaluates one model on one BEIR directory; see the module docstring.

  Args:
    data_dir: The BEIR-format directory.
    model: `minilm`, `splade_tiny`, `bm25` or a HF BERT directory.
    split: The qrels split.
    output_dir: Where `results.json` / `results.md` go (None: not written).
    max_queries: Keep the first N judged queries by id (0: all).
    batch_size: Encoder batch size.
    max_length: Document truncation length (0: the model default).
    k: Results per query.

  Returns:
    The results dict (as written to `results.json`).

  Raises:
    ValueError: On an unknown model or invalid sizes.
  """
  if k < 1 or batch_size < 1 or max_queries < 0 or max_length < 0:
    raise ValueError(
        f"Need k >= 1, batch_size >= 1, max_queries >= 0, max_length >= 0; "
        f"got {k}, {batch_size}, {max_queries}, {max_length}."
    )
  validate_args(data_dir, model, split, max_queries=max_queries,
                batch_size=batch_size, max_length=max_length, k=k)
  kind, path = resolve_model(model)
  t_start = time.perf_counter()
  timing: dict[str, float] = {}
  dataset = _subset(beir.load_beir(data_dir, split), max_queries)
  timing["load_data_s"] = time.perf_counter() - t_start
  qids = sorted(dataset.qrels)
  dids = list(dataset.corpus)
  logging.info("%s/%s: %d queries, %d documents; model %s (%s).",
               dataset.name, split, len(qids), len(dids), model, kind)
  if kind == "bm25":
    run, stats = _retrieve_bm25(dataset, qids, k, timing)
  else:
    with sharding.use_mesh():
      if kind == "dense":
        run, stats = _retrieve_dense(path, dataset, qids, dids, k,
                                     batch_size, max_length, timing)
      else:
        run, stats = _retrieve_splade(path, dataset, qids, dids, k,
                                      batch_size, max_length, timing)
  scores = metrics_lib.evaluate(dataset.qrels, run, METRICS)
  timing["total_s"] = time.perf_counter() - t_start
  results = {
      "dataset": dataset.name,
      "data_dir": str(data_dir),
      "split": split,
      "model": model,
      "kind": kind,
      "checkpoint": str(path) if path else None,
      "num_queries": len(qids),
      "num_docs": len(dids),
      "k": k,
      "metrics": scores,
      "timing": timing,
      "stats": stats,
  }
  if output_dir is not None:
    os.makedirs(output_dir, exist_ok=True)
    tmp = os.path.join(output_dir, "results.json.tmp")
    with open(tmp, "w") as f:
      json.dump(results, f, indent=2, sort_keys=True, default=float)
    os.replace(tmp, os.path.join(output_dir, "results.json"))
    with open(os.path.join(output_dir, "results.md"), "w") as f:
      f.write(format_results(results) + "\n")
  return results


def format_results(r: dict[str, Any]) -> str:
  """A one-row Markdown table with the metrics and times."""
  t = r["timing"]
  header = ["model", *(_LABELS[m] for m in METRICS), "index time",
            "search time", "total time"]
  row = [
      f"{r['model']} ({r['kind']})",
      *(f"{r['metrics'][m]:.4f}" for m in METRICS),
      f"{t['index_s']:.1f} s",
      f"{t['search_s']:.1f} s",
      f"{t['total_s']:.1f} s",
  ]
  return "\n".join([
      f"{r['dataset']} ({r['split']}): {r['num_queries']} queries, "
      f"{r['num_docs']} documents, top {r['k']}",
      "",
      "| " + " | ".join(header) + " |",
      "|---|" + "---:|" * (len(header) - 1),
      "| " + " | ".join(row) + " |",
  ])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  results = evaluate_beir(
      _DATA_DIR.value,
      _MODEL.value,
      split=_SPLIT.value,
      output_dir=_OUTPUT_DIR.value,
      max_queries=_MAX_QUERIES.value,
      batch_size=_BATCH_SIZE.value,
      max_length=_MAX_LENGTH.value,
      k=_K.value,
  )
  print(format_results(results))
  print(json.dumps({k: round(v, 4) for k, v in results["metrics"].items()}))


if __name__ == "__main__":
  flags.mark_flags_as_required(["data_dir", "output_dir"])
  app.run(main)
