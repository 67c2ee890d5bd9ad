r"""Trains a BERT cross-encoder reranker, reranks a first stage and fuses.

  python -m experiments.train_reranker --workdir=$WORKDIR \
      --config=experiments/configs/train_reranker.py

The cross-encoder (MiniLM + LoRA by default) trains on groups of a judged
document and BM25-mined negatives (`lowrank.ranking.training_data`) of the
train queries minus a dev split, which gives a dev loss during training and
the weight `alpha` of `alpha * CE + (1 - alpha) * first stage`
(`lowrank.ranking.fusion`). The first stage (`lowrank.ranking.candidates`)
retrieves `eval.first_stage_depth` documents per dev / test query, the
cross-encoder rescores the top `eval.rerank_k`; nDCG@10, Recall@10, MRR@10
go to `results.md` / `results.json`. A rerun resumes from the checkpoints.

References: Nogueira & Cho 2019, https://arxiv.org/abs/1901.04085; Gao et
al. 2021 (LCE), https://arxiv.org/abs/2101.08751; Yang et al. 2019 (Birch,
score interpolation), https://arxiv.org/abs/1903.10972.
"""

import os
import time
from typing import Any

from absl import logging
from flax import nnx
import jax
import ml_collections
import numpy as np
import optax

from experiments import common_flags
from experiments import config_checks
from experiments.configs import train_reranker as config_lib
from lowrank import metric_writers
from lowrank import sharding
from lowrank import train as train_lib
from lowrank.data import specs
from lowrank.ranking import candidates
from lowrank.ranking import cascade
from lowrank.ranking import cross_encoder
from lowrank.ranking import fusion
from lowrank.ranking import losses as ltr_losses
from lowrank.ranking import training_data
from lowrank.retrieval import metrics as metrics_lib

common_flags.config_and_workdir()

EVAL_METRICS = ("ndcg_cut_10", "recall_10", "mrr_cut_10")


def validate_config(config: ml_collections.ConfigDict,
                    overrides: dict[str, Any] | None = None) -> None:
  """Raises on a bad key or value, or an override this run ignores."""
  check = config_checks.validate_common(config, config_lib.get_config(),
                                        first_devices=True)
  check.choice("model.pooling", cross_encoder.POOLINGS)
  check.choice("eval.first_stage", candidates.NAMES)
  check.choice("eval.fusion_normalization", fusion.NORMALIZATIONS)
  ltr_losses.get(config.train.loss, cross_encoder.LOSSES)
  check.positive_int(
      "model.max_length", "data.negatives_depth", "data.negatives_pool",
      "eval.first_stage_depth", "eval.rerank_k", "eval.batch_size")
  check.non_negative_int("data.max_train_queries", "data.eval_max_queries")
  check.in_range("data.dev_fraction", 0.0, 1.0, low_closed=False)
  check.non_negative_number("train.grad_clip_norm")
  check.not_greater("data.negatives_pool", "data.negatives_depth")
  check.not_greater("eval.rerank_k", "eval.first_stage_depth")
  if not 2 <= config.train.group_size <= config.data.negatives_pool + 1:
    raise ValueError(
        f"config.train.group_size must be in [2, data.negatives_pool + 1 = "
        f"{config.data.negatives_pool + 1}] (a positive and at least one "
        f"negative from the pool); found {config.train.group_size}. Fix "
        f"--config.train.group_size or --config.data.negatives_pool.")
  if overrides and config.adapter.method == "full":
    config_checks.unused_overrides(config, overrides, {
        f"adapter.{k}": "method='full' trains every weight, with no adapter"
        for k in config.adapter if k != "method"})


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Runs (or resumes) training, then reranks and fuses; returns results."""
  validate_config(config)
  t_start = time.perf_counter()
  d, t, e = config.data, config.train, config.eval
  train = specs.load(d.spec, "train")
  test = specs.load(d.spec, "test", max_queries=d.eval_max_queries)
  first = candidates.FirstStage(e.first_stage, e.first_stage_depth)
  train_ids, dev_ids = training_data.split_queries(
      train.qrels, dev_fraction=d.dev_fraction, seed=config.seed,
      max_queries=d.max_train_queries)
  index = first.index(train.corpus, "bm25")
  groups, dev_groups = (training_data.negative_groups(
      train, ids, index, depth=d.negatives_depth, pool=d.negatives_pool,
      min_negatives=t.group_size - 1) for ids in (train_ids, dev_ids))
  logging.info("%d training queries, %d dev; test: %d queries, %d docs.",
               len(groups), len(dev_ids), len(test.qrels), len(test.corpus))

  mesh = train_lib.mesh_from_config(config.mesh)
  with sharding.use_mesh(mesh):
    model, tokenizer = cross_encoder.CrossEncoder.from_pretrained(
        config.model.path or None, pooling=config.model.pooling,
        seed=config.seed)
    train_lib.inject_from_config(model, config.adapter, rngs=config.seed)
  model.eval()  # No dropout: deterministic, resumable runs.
  counts = cross_encoder.count_parameters(model, config.adapter.method)
  wrt = cross_encoder.trainable_filter(config.adapter.method)
  tx = train_lib.optimizer_from_config(config.optimizer, model=model)
  if t.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), tx)
  eval_kw = dict(batch_size=e.batch_size, max_length=config.model.max_length)
  dev_seconds = [0.0]

  def dev_metrics(model):
    t0 = time.perf_counter()
    out = training_data.evaluate_groups(
        model, tokenizer, dev_groups, train, group_size=t.group_size,
        loss=t.loss, **eval_kw)
    dev_seconds[0] += time.perf_counter() - t0
    return out

  fit = train_lib.fit(
      model, wrt, lambda m, b: cross_encoder.group_loss(
          m, b, b["labels"], loss=t.loss), tx, t,
      batch_fn=lambda s: training_data.group_batch(
          groups, train, tokenizer, s, batch_size=t.batch_size,
          group_size=t.group_size, max_length=config.model.max_length,
          seed=config.seed),
      workdir=workdir, mesh=mesh, eval_fn=dev_metrics, memory=False,
      desc=f"{config.adapter.method} cross-encoder")
  model, out = fit.model, fit.loop

  def evaluate(qrels, run, *extra):
    return metrics_lib.evaluate(qrels, run, tuple(dict.fromkeys(
        EVAL_METRICS + (f"recall_{e.rerank_k}",) + extra)))

  runs, seconds = {}, {}  # split -> (first stage, CE, first stage's top-k)
  for split, data, ids, prefix in (("dev", train, dev_ids, "dev_"),
                                   ("test", test, sorted(test.qrels), "")):
    first_run = first.run(
        {q: data.queries[q] for q in ids}, data.corpus, path=os.path.join(
            workdir, f"{prefix}first_stage_{first.name}_top{first.depth}.json"))
    t0 = time.perf_counter()
    ce = cascade.rerank(model, tokenizer, data.queries, data.corpus,
                        first_run, k=e.rerank_k, **eval_kw)
    seconds[split] = time.perf_counter() - t0
    metric_writers.write_json(
        os.path.join(workdir, f"{prefix}reranked_run.json"), ce)
    runs[split] = (first_run, ce, {q: {doc: float(first_run[q][doc])
                                       for doc in docs}
                                   for q, docs in ce.items()})
  dev_qrels = {q: train.qrels[q] for q in dev_ids}
  qrels = {"dev": dev_qrels, "test": test.qrels}

  by_normalization = {}
  for norm in fusion.NORMALIZATIONS:
    alpha, grid = fusion.tune_weight(dev_qrels, *runs["dev"][1:],
                                     normalization=norm)
    fused = {split: fusion.fuse(runs[split][1:], (alpha, 1.0 - alpha),
                                normalization=norm) for split in runs}
    by_normalization[norm] = {
        "alpha": alpha,
        "dev_grid_ndcg_cut_10": {str(a): v for a, v in grid.items()},
        **{split: evaluate(qrels[split], fused[split]) for split in runs}}
    if norm == e.fusion_normalization:
      metric_writers.write_json(os.path.join(workdir, "fused_run.json"),
                                fused["test"])
  chosen = by_normalization[e.fusion_normalization]
  rng = np.random.default_rng(config.seed)
  shuffled = {q: {doc: float(rng.random()) for doc in sorted(docs)}
              for q, docs in runs["test"][1].items()}
  rows = metric_writers.read_csv(os.path.join(workdir, "metrics.csv"))
  losses = [r["loss"] for r in rows if "loss" in r]
  first_k = f"recall_{e.first_stage_depth}"
  results = {
      "data": d.spec, "method": config.adapter.method,
      "optimizer": config.optimizer.name, "loss": t.loss,
      "max_length": config.model.max_length, "first_stage": e.first_stage,
      "first_stage_depth": e.first_stage_depth, "rerank_k": e.rerank_k,
      "num_train_steps": t.num_steps, "train_queries": len(groups),
      "dev_queries": len(dev_ids),
      "train_pairs_seen": t.num_steps * t.batch_size * t.group_size,
      "test_queries": len(test.qrels), "test_docs": len(test.corpus),
      "before": evaluate(test.qrels, runs["test"][0], first_k),
      "after": evaluate(test.qrels, runs["test"][1]),
      "fused": chosen["test"],
      "random_order": evaluate(test.qrels, shuffled),
      "fusion_normalization": e.fusion_normalization,
      "fusion_alpha": chosen["alpha"],
      "fusion_by_normalization": by_normalization,
      "dev": {
          "before": evaluate(dev_qrels, runs["dev"][0], first_k),
          "after": evaluate(dev_qrels, runs["dev"][1]),
          "fused": chosen["dev"],
          "loss_curve": [{k: r[k] for k in ("step", "dev_loss", "dev_top1")}
                         for r in rows if "dev_loss" in r]},
      "trainable_params": int(counts["trainable"]),
      "total_params": int(counts["total"]),
      "train_seconds": out.train_seconds - dev_seconds[0],
      "dev_eval_seconds": dev_seconds[0],
      "dev_rerank_seconds": seconds["dev"], "rerank_seconds": seconds["test"],
      "rerank_pairs": sum(len(v) for v in runs["test"][1].values()),
      "wall_seconds": time.perf_counter() - t_start,
      "resumed_from_step": out.start_step,
      "final_loss": losses[-1] if losses else None,
  }
  print(metric_writers.write_results(workdir, results,
                                     format_results(results)))
  return results


def format_results(r: dict[str, Any]) -> str:
  """A Markdown table: first stage, cross-encoder alone, fused."""
  k, a, fs = r["rerank_k"], r["fusion_alpha"], r["first_stage"]
  def row(name, m, dev):
    return [name, *(m[x] for x in (*EVAL_METRICS, f"recall_{k}")),
            dev and dev["ndcg_cut_10"]]
  return "\n".join([
      f"data: {r['data']} ({r['train_queries']} train queries, "
      f"{r['dev_queries']} dev, {r['train_pairs_seen']} train pairs seen; "
      f"{r['test_queries']} test queries, {r['test_docs']} docs); "
      f"{fs} top-{r['first_stage_depth']}, rerank top-{k} at "
      f"{r['max_length']} tokens; fusion weight chosen on dev: "
      f"alpha={a:g} ({r['fusion_normalization']})", "",
      metric_writers.markdown_table(
          ["run", "nDCG@10", "Recall@10", "MRR@10", f"Recall@{k}",
           "dev nDCG@10"],
          [row(fs, r["before"], r["dev"]["before"]),
           row(f"random order of the top-{k}", r["random_order"], None),
           row(f"{r['method']} cross-encoder alone ({r['num_train_steps']} "
               f"steps, {r['loss']}, {r['optimizer']})", r["after"],
               r["dev"]["after"]),
           row(f"fused: {a:g}·CE + {1 - a:g}·{fs} "
               f"({r['fusion_normalization']})", r["fused"],
               r["dev"]["fused"])]),
      "", f"trainable params {r['trainable_params']:,} of "
      f"{r['total_params']:,}; train {r['train_seconds']:.0f} s (+ dev "
      f"loss {r['dev_eval_seconds']:.0f} s); rerank {r['rerank_seconds']:.0f}"
      f" s ({r['rerank_pairs']} test pairs), dev rerank "
      f"{r['dev_rerank_seconds']:.0f} s; wall {r['wall_seconds']:.0f} s"])


if __name__ == "__main__":
  common_flags.run_main(train_and_evaluate, validate_config)
