r"""Trains a BERT cross-encoder reranker and reranks a first-stage run.

  python -m experiments.train_reranker --workdir=$WORKDIR \
      --config=experiments/configs/train_reranker.py

The cross-encoder (`lowrank.ranking.cross_encoder`, MiniLM + LoRA by
default) is trained on the train split's qrels: each example is a group of
one judged-relevant document and `group_size - 1` negatives sampled from the
query's BM25 top `negatives_depth` (judged positives excluded), with a
listwise/pairwise loss of `lowrank.ranking.losses`. Then the first stage
(BM25 or the zero-shot MiniLM bi-encoder) retrieves the test queries' top
`rerank_k` and the cross-encoder rescores them; nDCG@10 / Recall@10 before
and after, training time and trainable parameters go to `results.md` and
`results.json`. The workdir also holds orbax checkpoints (rerunning resumes),
`metrics.csv` / `metrics.jsonl` / TensorBoard logs, the cached first-stage
run and the reranked run (`reranked_run.json`). Everything but flag
parsing lives in `train_and_evaluate`.

References: Nogueira & Cho 2019, https://arxiv.org/abs/1901.04085; Gao et
al. 2021 (LCE), https://arxiv.org/abs/2101.08751.
"""

import json
import os
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from experiments import common_flags
from lowrank import adapters
from lowrank import assets
from lowrank import checkpoint
from lowrank import metric_writers
from lowrank import optim
from lowrank import ranking
from lowrank.data import beir
from lowrank.data import code_search
from lowrank.models import bert
from lowrank.ranking import cross_encoder
from lowrank.retrieval import bm25 as bm25_lib
from lowrank.retrieval import metrics as metrics_lib
from lowrank.retrieval import search

_CONFIG, _WORKDIR = common_flags.config_and_workdir()

EVAL_METRICS = ("ndcg_cut_10", "recall_10", "recall_100")
FIRST_STAGES = ("bm25", "minilm")
OPTIMIZERS = ("adamw", "galore_adamw")


def _subset(dataset: beir.Dataset, max_queries: int) -> beir.Dataset:
  keep = sorted(dataset.qrels)[:max_queries]
  return beir.Dataset(
      name=dataset.name, corpus=dataset.corpus,
      queries={q: dataset.queries[q] for q in keep},
      qrels={q: dataset.qrels[q] for q in keep})


def load_data(spec: str, *, eval_max_queries: int = 0):
  """`(train Dataset, test Dataset)` for `"code_search"` or `"beir:<dir>"`."""
  if spec == "code_search":
    return (code_search.load_code_search("train"),
            code_search.load_code_search(
                "test", max_queries=eval_max_queries or None))
  if spec.startswith("beir:"):
    directory = spec.split(":", 1)[1]
    train = beir.load_beir(directory, "train")
    test = beir.load_beir(directory, "test")
    if eval_max_queries:
      test = _subset(test, eval_max_queries)
    return train, test
  raise ValueError(
      f"Unknown data spec {spec!r}; expected 'code_search' or 'beir:<dir>'."
  )


def training_groups(
    train: beir.Dataset, config: ml_collections.ConfigDict
) -> list[tuple[str, list[str], list[str]]]:
  """`(query id, positives, negative pool)` per usable train query.

  Negatives are the query's BM25 top `negatives_depth` minus its judged
  positives, best first, at most `negatives_pool` of them. Queries without
  a positive or without `group_size - 1` negatives are dropped.
  """
  positives = {q: sorted(d for d, r in rel.items() if r > 0)
               for q, rel in train.qrels.items()}
  qids = sorted(q for q, ds in positives.items() if ds)
  if config.max_train_queries:
    order = np.random.default_rng(config.seed).permutation(len(qids))
    qids = sorted(qids[i] for i in order[:config.max_train_queries])
  index = bm25_lib.BM25(train.corpus)
  mined = bm25_lib.mine_hard_negatives(
      index, {q: train.queries[q] for q in qids},
      {q: set(train.qrels[q]) for q in qids},
      k=config.negatives_depth, n=config.negatives_pool)
  need = config.group_size - 1
  return [(q, positives[q], mined[q]) for q in qids if len(mined[q]) >= need]


def make_batch(groups, train, tokenizer, config, step: int):
  """Tokenized pairs `[Q*G, L]` and labels `[Q, G]` for `step` (1-based).

  Deterministic in `(seed, step)`: queries follow a per-epoch permutation;
  each gets one random positive (label 1) and `group_size - 1` negatives
  sampled without replacement from its pool (label 0). The length is the
  smallest bucket that fits the batch, so training compiles at most once
  per bucket.
  """
  qb, g = config.queries_per_batch, config.group_size
  per_epoch = len(groups) // qb
  epoch, i = divmod(step - 1, per_epoch)
  perm = np.random.default_rng([config.seed, epoch]).permutation(len(groups))
  rng = np.random.default_rng([config.seed, epoch, i, 1])
  queries, docs = [], []
  for j in perm[i * qb:(i + 1) * qb]:
    qid, pos, pool = groups[j]
    chosen = [pos[rng.integers(len(pos))]]
    chosen += [pool[k] for k in rng.choice(len(pool), g - 1, replace=False)]
    queries += [train.queries[qid]] * g
    docs += [train.corpus[d] for d in chosen]
  encoded = cross_encoder.encode_pairs(tokenizer, queries, docs,
                                       max_length=config.max_length)
  lengths = cross_encoder.bucket_lengths(config.max_length)
  length = next(b for b in lengths
                if b >= max(len(ids) for ids, _ in encoded))
  batch = tokenizer.pad(encoded, length=length)
  labels = np.zeros((qb, g), np.float32)
  labels[:, 0] = 1.0
  return batch, jnp.asarray(labels)


def first_stage_run(test, config, workdir) -> dict[str, dict[str, float]]:
  """The first stage's top-`rerank_k` run of the test queries (cached)."""
  path = os.path.join(workdir, f"first_stage_{config.first_stage}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  k = min(config.rerank_k, len(test.corpus))
  queries = {q: test.queries[q] for q in sorted(test.qrels)}
  if config.first_stage == "bm25":
    run = bm25_lib.BM25(test.corpus).search_run(queries, k)
  else:
    model, tokenizer = bert.load_pretrained(assets.minilm_path())
    qids, dids = list(queries), sorted(test.corpus)
    q = bert.embed(model, tokenizer, [queries[i] for i in qids])
    d = bert.embed(model, tokenizer, [test.corpus[i] for i in dids])
    run = search.search_run(qids, q, dids, d, k)
  _write_json(path, run)
  return run


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW or GaLore-AdamW with a warmup-cosine schedule."""
  opt = dict(config.optimizer)
  name = opt.pop("name")
  options = dict(opt.pop("options", None) or {})
  opt["learning_rate"] = optax.warmup_cosine_decay_schedule(
      0.0, opt["learning_rate"], config.warmup_steps,
      max(config.num_train_steps, config.warmup_steps + 1))
  if name == "adamw":
    return optax.adamw(**opt, **options)
  if name == "galore_adamw":
    return optim.galore_adamw(**opt, **options)
  raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}; got "
                   f"{name!r}.")


def _write_json(path, obj):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=float)
  os.replace(tmp, path)


def _validate(config) -> None:
  if config.first_stage not in FIRST_STAGES:
    raise ValueError(f"first_stage must be one of {FIRST_STAGES}; got "
                     f"{config.first_stage!r}.")
  cross_encoder.trainable_filter(config.method)
  cross_encoder.get_loss(config.loss)
  for name in ("num_train_steps", "queries_per_batch", "rerank_k",
               "negatives_pool", "eval_batch_size"):
    if config[name] <= 0:
      raise ValueError(f"config.{name} must be positive; got "
                       f"{config[name]}.")
  if config.group_size < 2:
    raise ValueError(f"group_size must be >= 2 (a positive and a negative); "
                     f"got {config.group_size}.")
  if config.negatives_pool < config.group_size - 1:
    raise ValueError(
        f"negatives_pool ({config.negatives_pool}) must be >= group_size - 1 "
        f"({config.group_size - 1}).")


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Runs (or resumes) training, then reranks; returns the results dict."""
  _validate(config)
  os.makedirs(workdir, exist_ok=True)
  t_start = time.perf_counter()
  train, test = load_data(config.data,
                          eval_max_queries=config.eval_max_queries)
  groups = training_groups(train, config)
  if len(groups) < config.queries_per_batch:
    raise ValueError(f"{len(groups)} usable training queries < "
                     f"queries_per_batch {config.queries_per_batch}.")
  logging.info("%d training queries; test: %d queries, %d docs.",
               len(groups), len(test.qrels), len(test.corpus))

  model, tokenizer = cross_encoder.from_pretrained(
      config.model_path or None, pooling=config.pooling, seed=config.seed)
  if config.method != "full":
    kwargs = dict(config.adapter)
    options = dict(kwargs.pop("options", None) or {})
    adapters.inject(model, method=config.method, rngs=config.seed,
                    **kwargs, **options)
  model.eval()  # No dropout: deterministic, resumable runs.
  counts = cross_encoder.count_parameters(model, config.method)
  graphdef, params, rest = nnx.split(
      model, cross_encoder.trainable_filter(config.method), ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)

  tx = make_optimizer(config)
  opt_state = cross_encoder.init_optimizer(tx, params)
  step_fn = cross_encoder.make_train_step(graphdef, tx, loss=config.loss)

  ckpt = checkpoint.Checkpointer(
      os.path.join(workdir, "checkpoints"), max_to_keep=2,
      save_interval_steps=config.checkpoint_every_steps)
  state, start = ckpt.restore_or_init(
      {"params": params, "opt_state": opt_state})
  if start:
    logging.info("Resumed from step %d.", start)
  params, opt_state = state["params"], state["opt_state"]

  writer = metric_writers.MetricWriter(workdir, resume_step=start)
  t_train = time.perf_counter()
  bar = tqdm.tqdm(range(start + 1, config.num_train_steps + 1),
                  initial=start, total=config.num_train_steps,
                  desc=f"{config.method} cross-encoder", unit="step")
  for step in bar:
    batch, labels = make_batch(groups, train, tokenizer, config, step)
    batch = cross_encoder.place_batch(params, batch)
    params, opt_state, metrics = step_fn(params, opt_state, rest, batch,
                                         labels)
    ckpt.save(step, {"params": params, "opt_state": opt_state},
              force=step == config.num_train_steps)
    if step % config.log_every_steps == 0 or step == config.num_train_steps:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      bar.set_postfix(loss=f"{metrics['loss']:.4f}")
      writer.write(step, metrics)
  ckpt.close()
  writer.close()
  train_seconds = time.perf_counter() - t_train

  model = nnx.merge(graphdef, params, rest)
  run = first_stage_run(test, config, workdir)
  before = metrics_lib.evaluate(test.qrels, run, EVAL_METRICS)
  t_rerank = time.perf_counter()
  reranked = ranking.rerank(
      model, tokenizer, test.queries, test.corpus, run, k=config.rerank_k,
      batch_size=config.eval_batch_size, max_length=config.max_length)
  rerank_seconds = time.perf_counter() - t_rerank
  # Kept so that fusion with the first stage can be studied without rescoring.
  _write_json(os.path.join(workdir, "reranked_run.json"), reranked)
  after = metrics_lib.evaluate(test.qrels, reranked, EVAL_METRICS)
  num_pairs = sum(len(v) for v in reranked.values())
  results = {
      "data": config.data,
      "method": config.method,
      "optimizer": config.optimizer.name,
      "loss": config.loss,
      "first_stage": config.first_stage,
      "rerank_k": config.rerank_k,
      "num_train_steps": config.num_train_steps,
      "train_queries": len(groups),
      "train_pairs_seen": (config.num_train_steps * config.queries_per_batch
                           * config.group_size),
      "test_queries": len(test.qrels),
      "test_docs": len(test.corpus),
      "before": before,
      "after": after,
      "trainable_params": int(counts["trainable"]),
      "total_params": int(counts["total"]),
      "train_seconds": train_seconds,
      "rerank_seconds": rerank_seconds,
      "rerank_pairs": num_pairs,
      "wall_seconds": time.perf_counter() - t_start,
      "resumed_from_step": start,
      "final_loss": (writer.rows[-1]["loss"] if writer.rows else None),
  }
  _write_json(os.path.join(workdir, "results.json"), results)
  table = format_results(results)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  print(table)
  return results


def format_results(r: dict[str, Any]) -> str:
  """A Markdown table: first stage vs reranked."""
  rows = [
      f"data: {r['data']} ({r['train_queries']} train queries, "
      f"{r['train_pairs_seen']} train pairs seen; {r['test_queries']} test "
      f"queries, {r['test_docs']} docs); rerank top-{r['rerank_k']}",
      "",
      "| run | nDCG@10 | Recall@10 | trainable params | train time |"
      " rerank time |",
      "|---|---:|---:|---:|---:|---:|",
  ]
  b, a = r["before"], r["after"]
  rows.append(f"| {r['first_stage']} | {b['ndcg_cut_10']:.4f} | "
              f"{b['recall_10']:.4f} | - | - | - |")
  rows.append(
      f"| + {r['method']} cross-encoder ({r['num_train_steps']} steps, "
      f"{r['loss']}, {r['optimizer']}) | {a['ndcg_cut_10']:.4f} | "
      f"{a['recall_10']:.4f} | {r['trainable_params']:,} of "
      f"{r['total_params']:,} | {r['train_seconds']:.0f} s | "
      f"{r['rerank_seconds']:.0f} s ({r['rerank_pairs']} pairs) |")
  return "\n".join(rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  jax.config.config_with_absl()
  app.run(main)
