r"""Zero-shot retrieval evaluation on a BEIR-format directory.

  python -m experiments.eval_beir --data_dir=../shared/data/beir/scifact \
      --model=minilm --output_dir=/tmp/eval_scifact_minilm

`--model` is `minilm` (the bundled all-MiniLM-L6-v2: mean pooling, cosine
similarity, 256 tokens, as sentence-transformers and MTEB; exact search),
`splade_tiny` (the bundled SPLADE-tiny: max-pooled `log(1 + relu)` MLM
weights, dot product, an inverted index), `bm25` (k1 0.9, b 0.4, a
Lucene-like English analyzer) or a local Hugging Face BERT directory
(SPLADE if its `architectures` names `BertForMaskedLM`, else dense, pooled
as its sentence-transformers `1_Pooling/config.json` says, default mean).

Documents are `title + " " + text` (`lowrank.data.beir`); retrieval is
`lowrank.retrieval.evaluate`'s. Metrics are trec_eval's over all judged
queries of the split (no result counts 0): nDCG@10, MRR@10, Recall@100 and
MAP of the top `--k` (BEIR retrieves 1000). `results.json` / `results.md`
in `--output_dir` hold them, the sizes and wall-clock times (`index_s`: the
BM25 index, the SPLADE document index or the dense embeddings).
"""

import json
import os
import pathlib
import time
from typing import Any

from absl import app
from absl import flags

from experiments import config_checks
from lowrank import assets
from lowrank import metric_writers
from lowrank import sharding
from lowrank.data import specs
from lowrank.models import bert
from lowrank.retrieval import biencoder
from lowrank.retrieval import evaluate as evaluate_lib

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "BEIR-format directory (corpus.jsonl, queries.jsonl, "
    "qrels/<split>.tsv).")
_MODEL = flags.DEFINE_string(
    "model", "minilm", "minilm | splade_tiny | bm25 | <HF BERT directory>.")
_SPLIT = flags.DEFINE_string("split", "test", "qrels split to evaluate.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "results.json and results.md go here.")
_MAX_QUERIES = flags.DEFINE_integer(
    "max_queries", 0, "Evaluate only the first N judged queries (sorted by "
    "id); 0 = all. The whole corpus is still indexed.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Encoder batch size.")
_MAX_LENGTH = flags.DEFINE_integer(
    "max_length", 0, "Document truncation length in tokens; 0 = the model "
    "default (256 for MiniLM and SPLADE).")
_K = flags.DEFINE_integer("k", 1000, "Results retrieved per query.")

METRICS = ("ndcg_cut_10", "mrr_cut_10", "recall_100", "map")
_LABELS = dict(zip(METRICS, ("nDCG@10", "MRR@10", "Recall@100", "MAP")))
# SPLADE's usual training / evaluation length (naver/splade configs).
SPLADE_MAX_LENGTH = 256


def resolve_model(model: str) -> tuple[str, pathlib.Path | None]:
  """`(kind in {"bm25", "dense", "splade"}, checkpoint dir)`; ValueError if
  `model` is neither a known name nor a directory with config.json."""
  named = {"bm25": ("bm25", None), "minilm": ("dense", assets.minilm_path),
           "splade_tiny": ("splade", assets.splade_tiny_path)}
  if model in named:
    kind, path = named[model]
    return kind, path and path()
  path = pathlib.Path(model)
  if not (path / "config.json").is_file():
    raise ValueError(
        f"--model must be minilm, splade_tiny, bm25 or a directory holding "
        f"config.json; got {model!r}.")
  return evaluate_lib.checkpoint_kind(path)[0], path


def _retrieve(kind, path, dataset, k, batch_size, max_length, timing):
  """`(metrics, stats)` of one model; fills `timing`."""
  if kind == "bm25":
    scores, info = evaluate_lib.bm25(dataset, k=k, metrics=METRICS)
    timing.update(index_s=info.pop("index_s"), search_s=info.pop("search_s"))
    return scores, info
  t = time.perf_counter()
  model, tokenizer = bert.load_pretrained(path), bert.load_tokenizer(path)
  timing["load_model_s"] = time.perf_counter() - t
  if kind == "dense":
    pooling = evaluate_lib.checkpoint_kind(path)[1]
    scores, info = evaluate_lib.dense(
        biencoder.BiEncoder(model, pooling=pooling), tokenizer, dataset, k=k,
        batch_size=batch_size, doc_max_length=max_length or None,
        metrics=METRICS)
    timing.update(index_s=info["encode_s"], search_s=info["search_s"])
    return scores, {"pooling": pooling, "dim": info["dim"],
                    "doc_max_length": max_length or tokenizer.max_length,
                    "query_max_length": tokenizer.max_length}
  max_length = max_length or SPLADE_MAX_LENGTH
  scores, info = evaluate_lib.sparse(
      model, tokenizer, dataset, k=k, batch_size=batch_size,
      query_max_length=max_length, doc_max_length=max_length, metrics=METRICS)
  timing.update(index_s=info["index_s"],
                search_s=info["encode_queries_s"] + info["search_s"])
  return scores, {key: info[key] for key in (
      "postings", "avg_doc_terms", "avg_query_terms", "expected_flops")} | {
          "max_length": max_length}


def validate_args(data_dir: str | os.PathLike | None, model: str,
                  split: str = "test", *, max_queries: int = 0,
                  batch_size: int = 32, max_length: int = 0,
                  k: int = 1000) -> None:
  """Checks `evaluate_beir`'s arguments before anything is loaded.

  Raises ValueError (a bad size or model), TypeError (a size that is not an
  int) or FileNotFoundError (`data_dir`, one of its files or the split's
  qrels is missing: the message names the path and the splits found).
  """
  values = dict(data_dir=data_dir, max_queries=max_queries,
                batch_size=batch_size, max_length=max_length, k=k)
  defaults = {f.name: f.default for f in (_MAX_QUERIES, _BATCH_SIZE,
                                          _MAX_LENGTH, _K)}
  check = config_checks.Checker(values, defaults, label="--{}", flag="--{}")
  check.positive_int("batch_size", "k")
  check.non_negative_int("max_queries", "max_length")
  if data_dir is None:
    raise ValueError("--data_dir is required: a BEIR-format directory "
                     "(corpus.jsonl, queries.jsonl, qrels/<split>.tsv).")
  check.beir_directory("data_dir", data_dir, (split,))
  resolve_model(model)


def evaluate_beir(data_dir: str | os.PathLike, model: str, *,
                  split: str = "test",
                  output_dir: str | os.PathLike | None = None,
                  max_queries: int = 0, batch_size: int = 32,
                  max_length: int = 0, k: int = 1000) -> dict[str, Any]:
  """The results dict (`results.json`) of one model on one BEIR directory.

  The arguments are the flags of the same names (`output_dir` None: nothing
  is written); bad ones raise as `validate_args`.
  """
  validate_args(data_dir, model, split, max_queries=max_queries,
                batch_size=batch_size, max_length=max_length, k=k)
  kind, path = resolve_model(model)
  t_start = time.perf_counter()
  dataset = specs.load(f"beir:{data_dir}", split, max_queries=max_queries)
  timing = {"load_data_s": time.perf_counter() - t_start}
  with sharding.use_mesh():
    scores, stats = _retrieve(kind, path, dataset, k, batch_size, max_length,
                              timing)
  timing["total_s"] = time.perf_counter() - t_start
  results = {
      "dataset": dataset.name, "data_dir": str(data_dir), "split": split,
      "model": model, "kind": kind,
      "checkpoint": str(path) if path else None,
      "num_queries": len(dataset.qrels), "num_docs": len(dataset.corpus),
      "k": k, "metrics": scores, "timing": timing, "stats": stats}
  if output_dir is not None:
    os.makedirs(output_dir, exist_ok=True)
    metric_writers.write_results(output_dir, results, format_results(results))
  return results


def format_results(r: dict[str, Any]) -> str:
  """A one-row Markdown table with the metrics and times."""
  return (f"{r['dataset']} ({r['split']}): {r['num_queries']} queries, "
          f"{r['num_docs']} documents, top {r['k']}\n\n"
          + metric_writers.markdown_table(
              ["model", *_LABELS.values(), "index time", "search time",
               "total time"],
              [[f"{r['model']} ({r['kind']})",
                *(float(r["metrics"][m]) for m in METRICS),
                *(f"{r['timing'][key]:.1f} s"
                  for key in ("index_s", "search_s", "total_s"))]]))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  results = evaluate_beir(
      _DATA_DIR.value, _MODEL.value, split=_SPLIT.value,
      output_dir=_OUTPUT_DIR.value, max_queries=_MAX_QUERIES.value,
      batch_size=_BATCH_SIZE.value, max_length=_MAX_LENGTH.value, k=_K.value)
  print(format_results(results))
  print(json.dumps({k: round(v, 4) for k, v in results["metrics"].items()}))


if __name__ == "__main__":
  flags.mark_flags_as_required(["data_dir", "output_dir"])
  app.run(main)
