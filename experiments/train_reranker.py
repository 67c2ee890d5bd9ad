r"""Trains a BERT cross-encoder reranker, reranks a first stage and fuses.

  python -m experiments.train_reranker --workdir=$WORKDIR \
      --config=experiments/configs/train_reranker.py

The cross-encoder (`lowrank.ranking.cross_encoder`, MiniLM + LoRA by
default) is trained on the train split's qrels minus a held-out dev split
(`dev_fraction` of the train queries that have a positive, drawn with
`seed`). Each training example is a group of one judged-relevant document
and `group_size - 1` negatives sampled from the query's BM25 top
`negatives_depth` (every judged document excluded), scored with a
listwise/pairwise loss of `lowrank.ranking.losses`. The dev queries are
never trained on: they give a held-out loss and top-1 accuracy during
training (fixed groups: the first positive and the hardest negatives) and,
at the end, the interpolation weight of score fusion.

Evaluation: the first stage (BM25 or the zero-shot MiniLM bi-encoder)
retrieves `first_stage_depth` documents per dev and test query and the
cross-encoder rescores the top `rerank_k` of them. `lowrank.ranking.fusion`
then interpolates the per-query-normalised cross-encoder and first-stage
scores of those documents, `alpha * CE + (1 - alpha) * first stage`, with
the `alpha` of `fusion.DEFAULT_GRID` that maximises dev nDCG@10 (test
queries are never used to choose anything). nDCG@10, Recall@10 and MRR@10
of the first stage, the cross-encoder alone and the fused run, with
training time and trainable parameters, go to `results.md` and
`results.json`.

The workdir also holds orbax checkpoints (rerunning resumes),
`metrics.csv` / `metrics.jsonl` / TensorBoard logs (train loss, dev loss,
dev top-1), the cached first-stage runs and the output runs
(`reranked_run.json`, `fused_run.json`, `dev_reranked_run.json`).
Everything but flag parsing lives in `train_and_evaluate`.

References: Nogueira & Cho 2019, https://arxiv.org/abs/1901.04085; Gao et
al. 2021 (LCE), https://arxiv.org/abs/2101.08751; Yang et al. 2019 (Birch,
score interpolation), https://arxiv.org/abs/1903.10972.
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
from experiments import config_checks
from experiments.configs import train_reranker as config_lib
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
from lowrank.ranking import fusion
from lowrank.retrieval import bm25 as bm25_lib
from lowrank.retrieval import metrics as metrics_lib
from lowrank.retrieval import search

_CONFIG, _WORKDIR = common_flags.config_and_workdir()

EVAL_METRICS = ("ndcg_cut_10", "recall_10", "mrr_cut_10")
FIRST_STAGES = ("bm25", "minilm")
OPTIMIZERS = ("adamw", "galore_adamw")

Run = dict[str, dict[str, float]]
Group = tuple[str, list[str], list[str]]


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


def split_queries(
    train: beir.Dataset, config: ml_collections.ConfigDict
) -> tuple[list[str], list[str]]:
  """`(training ids, dev ids)`: the train queries with a positive, split.

  At most `max_train_queries` of them (a seeded sample; 0 = all) are used;
  `dev_fraction` of those (at least one, seeded) are held out as dev.
  Both lists are sorted.

  Raises:
    ValueError: If fewer than two train queries have a positive.
  """
  qids = sorted(q for q, rel in train.qrels.items()
                if any(r > 0 for r in rel.values()))
  if config.max_train_queries:
    order = np.random.default_rng(config.seed).permutation(len(qids))
    qids = sorted(qids[i] for i in order[:config.max_train_queries])
  if len(qids) < 2:
    raise ValueError(f"Need at least 2 train queries with a positive (for "
                     f"a train and a dev split); got {len(qids)}.")
  n_dev = min(max(1, round(config.dev_fraction * len(qids))), len(qids) - 1)
  order = np.random.default_rng([config.seed, 1]).permutation(len(qids))
  dev = sorted(qids[i] for i in order[:n_dev])
  return sorted(qids[i] for i in order[n_dev:]), dev


def training_groups(
    train: beir.Dataset,
    qids: list[str],
    config: ml_collections.ConfigDict,
    index: bm25_lib.BM25,
) -> list[Group]:
  """`(query id, positives, negative pool)` per usable query of `qids`.

  Negatives are the query's BM25 top `negatives_depth` minus every document
  judged for it, best first, at most `negatives_pool` of them. Queries
  without `group_size - 1` negatives are dropped.
  """
  positives = {q: sorted(d for d, r in train.qrels[q].items() if r > 0)
               for q in qids}
  mined = bm25_lib.mine_hard_negatives(
      index, {q: train.queries[q] for q in qids},
      {q: set(train.qrels[q]) for q in qids},
      k=config.negatives_depth, n=config.negatives_pool)
  need = config.group_size - 1
  return [(q, positives[q], mined[q]) for q in qids
          if positives[q] and len(mined[q]) >= need]


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
  encoded = cross_encoder.tokenize_pairs(tokenizer, queries, docs,
                                         max_length=config.max_length)
  lengths = cross_encoder.bucket_lengths(config.max_length)
  length = next(b for b in lengths
                if b >= max(len(ids) for ids, _ in encoded))
  batch = tokenizer.pad(encoded, length=length)
  labels = np.zeros((qb, g), np.float32)
  labels[:, 0] = 1.0
  return batch, jnp.asarray(labels)


def evaluate_groups(
    model: cross_encoder.CrossEncoder,
    tokenizer: bert.Tokenizer,
    groups: list[Group],
    dataset: beir.Dataset,
    config: ml_collections.ConfigDict,
) -> dict[str, float]:
  """`{"dev_loss", "dev_top1"}` of fixed held-out groups.

  Each group is the query's first positive and its `group_size - 1`
  hardest mined negatives, scored exactly as at reranking time
  (`score_pairs`, same `max_length`); the loss is the training loss and
  `dev_top1` the fraction of groups whose positive scores highest (chance
  is `1 / group_size`).
  """
  g = config.group_size
  queries, docs = [], []
  for qid, pos, pool in groups:
    queries += [dataset.queries[qid]] * g
    docs += [dataset.corpus[d] for d in [pos[0]] + pool[:g - 1]]
  scores = model.score_pairs(
      tokenizer, queries, docs, batch_size=config.eval_batch_size,
      max_length=config.max_length).reshape(len(groups), g)
  labels = np.zeros_like(scores)
  labels[:, 0] = 1.0
  loss = cross_encoder.get_loss(config.loss)(scores, labels)
  return {"dev_loss": float(loss),
          "dev_top1": float(np.mean(np.argmax(scores, axis=1) == 0))}


class FirstStage:
  """Runs of the configured first stage; indexes built once per corpus.

  BM25 indexes and MiniLM document embeddings are kept per corpus (by
  content), so dev and test share them when their corpora are equal, and
  runs are cached as JSON in the workdir.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.name = config.first_stage
    self.depth = config.first_stage_depth
    self.workdir = workdir
    self._indexes: dict[Any, Any] = {}

  def _get(self, kind: str, corpus: dict[str, str], build):
    key = (kind, len(corpus), hash(frozenset(corpus.items())))
    if key not in self._indexes:
      self._indexes[key] = build(corpus)
    return self._indexes[key]

  def bm25(self, corpus: dict[str, str]) -> bm25_lib.BM25:
    """The BM25 index of `corpus` (built on first use)."""
    return self._get("bm25", corpus, bm25_lib.BM25)

  def _minilm(self, corpus: dict[str, str]):
    def build(corpus):
      model = bert.load_pretrained(assets.minilm_path())
      tokenizer = bert.load_tokenizer(assets.minilm_path())
      dids = sorted(corpus)
      return model, tokenizer, dids, bert.embed_texts(
          model, tokenizer, [corpus[i] for i in dids])
    return self._get("minilm", corpus, build)

  def run(self, dataset: beir.Dataset, qids: list[str], prefix: str) -> Run:
    """The top-`first_stage_depth` run of `qids` (cached per prefix)."""
    path = os.path.join(
        self.workdir, f"{prefix}first_stage_{self.name}_top{self.depth}.json")
    if os.path.exists(path):
      with open(path) as f:
        run = json.load(f)
      if sorted(run) == sorted(qids):
        return run
    k = min(self.depth, len(dataset.corpus))
    queries = {q: dataset.queries[q] for q in qids}
    if self.name == "bm25":
      run = self.bm25(dataset.corpus).search_run(queries, k)
    else:
      model, tokenizer, dids, d = self._minilm(dataset.corpus)
      q = bert.embed_texts(model, tokenizer, [queries[i] for i in qids])
      run = search.search_run(list(qids), q, dids, d, k)
    metric_writers.write_json(path, run)
    return run


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW or GaLore-AdamW with a warmup-cosine schedule.

  With `grad_clip_norm > 0` the gradients are first clipped to that global
  norm.
  """
  opt = dict(config.optimizer)
  name = opt.pop("name")
  options = dict(opt.pop("options", None) or {})
  opt["learning_rate"] = optax.warmup_cosine_decay_schedule(
      0.0, opt["learning_rate"], config.warmup_steps,
      max(config.num_train_steps, config.warmup_steps + 1))
  if name == "adamw":
    tx = optax.adamw(**opt, **options)
  elif name == "galore_adamw":
    tx = optim.galore_adamw(**opt, **options)
  else:
    raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}; got "
                     f"{name!r}.")
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx


def _validate(config) -> None:
  if config.first_stage not in FIRST_STAGES:
    raise ValueError(f"first_stage must be one of {FIRST_STAGES}; got "
                     f"{config.first_stage!r}.")
  cross_encoder.trainable_filter(config.method)
  cross_encoder.get_loss(config.loss)
  for name in ("num_train_steps", "queries_per_batch", "rerank_k",
               "negatives_pool", "eval_batch_size", "dev_every_steps"):
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
  if config.first_stage_depth < config.rerank_k:
    raise ValueError(
        f"first_stage_depth ({config.first_stage_depth}) must be >= "
        f"rerank_k ({config.rerank_k}).")
  if not 0.0 < config.dev_fraction < 1.0:
    raise ValueError(f"dev_fraction must be in (0, 1) (dev queries tune the "
                     f"fusion weight); got {config.dev_fraction}.")
  if config.fusion_normalization not in fusion.NORMALIZATIONS:
    raise ValueError(
        f"fusion_normalization must be one of {fusion.NORMALIZATIONS}; got "
        f"{config.fusion_normalization!r}.")
  if config.grad_clip_norm < 0:
    raise ValueError(f"grad_clip_norm must be >= 0 (0 = off); got "
                     f"{config.grad_clip_norm}.")


def validate_config(config: ml_collections.ConfigDict,
                    overrides: dict[str, Any] | None = None) -> None:
  """Checks `config` before any data or model is loaded.

  Args:
    config: The experiment config.
    overrides: The `--config.<key>` flags given on the command line
      (`config_checks.overrides`); each must be one this run reads.

  Raises:
    ValueError: On an unknown key or name, a non-positive size, an
      inconsistent pair of sizes, or an override this run ignores.
    TypeError: On a value of the wrong type.
    FileNotFoundError: On a data or model directory that does not exist.
  """
  _validate(config)
  check = config_checks.Checker(config, config_lib.get_config())
  check.known_keys(open_keys=("adapter.options", "optimizer.options"))
  check.choice("optimizer.name", OPTIMIZERS)
  check.choice("pooling", cross_encoder.POOLINGS)
  check.positive_int("num_train_steps", "queries_per_batch", "group_size",
                     "negatives_depth", "negatives_pool", "max_length",
                     "log_every_steps", "checkpoint_every_steps",
                     "dev_every_steps", "first_stage_depth", "rerank_k",
                     "eval_batch_size")
  check.non_negative_int("seed", "warmup_steps", "max_train_queries",
                         "eval_max_queries")
  check.not_greater("warmup_steps", "num_train_steps")
  check.not_greater("negatives_pool", "negatives_depth")
  check.positive_number("optimizer.learning_rate")
  check.non_negative_number("optimizer.weight_decay", "grad_clip_norm")
  check.in_range("optimizer.b1", 0.0, 1.0)
  check.in_range("optimizer.b2", 0.0, 1.0)
  if config.method != "full":
    check.positive_int("adapter.rank")
    check.positive_number("adapter.alpha")
    check.in_range("adapter.dropout", 0.0, 1.0)
    check.regex("adapter.targets")
  check.data_spec("data", splits=("train", "test"))
  check.model_dir("model_path")
  if overrides:
    unused = {}
    if config.method == "full":
      unused["adapter"] = "method='full' trains every weight, with no adapter"
    config_checks.unused_overrides(config, overrides, unused)


def _restrict(run: Run, like: Run) -> Run:
  """`run`'s scores of exactly the documents `like` holds per query."""
  return {q: {d: float(run[q][d]) for d in docs} for q, docs in like.items()}


def _qrels(dataset: beir.Dataset, qids: list[str]):
  return {q: dataset.qrels[q] for q in qids}


def _evaluate(qrels, run, metrics) -> dict[str, float]:
  return metrics_lib.evaluate(qrels, run, tuple(dict.fromkeys(metrics)))


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Runs (or resumes) training, then reranks and fuses; returns results."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  t_start = time.perf_counter()
  train, test = load_data(config.data,
                          eval_max_queries=config.eval_max_queries)
  first = FirstStage(config, workdir)
  train_ids, dev_ids = split_queries(train, config)
  index = first.bm25(train.corpus)
  groups = training_groups(train, train_ids, config, index)
  dev_groups = training_groups(train, dev_ids, config, index)
  if len(groups) < config.queries_per_batch:
    raise ValueError(f"{len(groups)} usable training queries < "
                     f"queries_per_batch {config.queries_per_batch}.")
  logging.info("%d training queries, %d dev; test: %d queries, %d docs.",
               len(groups), len(dev_ids), len(test.qrels), len(test.corpus))

  model, tokenizer = cross_encoder.CrossEncoder.from_pretrained(
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

  def dev_metrics(params):
    if not dev_groups:
      return {}
    return evaluate_groups(nnx.merge(graphdef, params, rest), tokenizer,
                           dev_groups, train, config)

  writer = metric_writers.MetricWriter(workdir, resume_step=start)
  t_train = time.perf_counter()
  dev_seconds = 0.0
  if start == 0 and dev_groups:
    writer.write(0, dev_metrics(params))  # The untrained head: ~chance.
    dev_seconds += time.perf_counter() - t_train
  bar = tqdm.tqdm(range(start + 1, config.num_train_steps + 1),
                  initial=start, total=config.num_train_steps,
                  desc=f"{config.method} cross-encoder", unit="step")
  for step in bar:
    batch, labels = make_batch(groups, train, tokenizer, config, step)
    batch = cross_encoder.place_batch(params, batch)
    params, opt_state, metrics = step_fn(params, opt_state, rest, batch,
                                         labels)
    last = step == config.num_train_steps
    row = {}
    if step % config.log_every_steps == 0 or last:
      row.update({k: float(v) for k, v in jax.device_get(metrics).items()})
      bar.set_postfix(loss=f"{row['loss']:.4f}")
    if step % config.dev_every_steps == 0 or last:
      t_dev = time.perf_counter()
      row.update(dev_metrics(params))
      dev_seconds += time.perf_counter() - t_dev
    if row:
      writer.write(step, row)
    ckpt.save(step, {"params": params, "opt_state": opt_state}, force=last)
  ckpt.close()
  writer.close()
  train_seconds = time.perf_counter() - t_train - dev_seconds

  model = nnx.merge(graphdef, params, rest)
  score_kwargs = dict(k=config.rerank_k, batch_size=config.eval_batch_size,
                      max_length=config.max_length)
  metrics = EVAL_METRICS + (f"recall_{config.rerank_k}",)

  # Dev: rerank, then choose the fusion weight (per normalisation).
  dev_qrels = _qrels(train, dev_ids)
  dev_first = first.run(train, dev_ids, "dev_")
  t_dev = time.perf_counter()
  dev_ce = ranking.rerank(model, tokenizer, train.queries, train.corpus,
                          dev_first, **score_kwargs)
  dev_rerank_seconds = time.perf_counter() - t_dev
  metric_writers.write_json(os.path.join(workdir, "dev_reranked_run.json"), dev_ce)
  dev_first_k = _restrict(dev_first, dev_ce)

  # Test: rerank, fuse with the dev-chosen weights.
  test_ids = sorted(test.qrels)
  test_first = first.run(test, test_ids, "")
  t_rerank = time.perf_counter()
  test_ce = ranking.rerank(model, tokenizer, test.queries, test.corpus,
                           test_first, **score_kwargs)
  rerank_seconds = time.perf_counter() - t_rerank
  # Kept so that other fusions can be studied without rescoring.
  metric_writers.write_json(os.path.join(workdir, "reranked_run.json"), test_ce)
  test_first_k = _restrict(test_first, test_ce)

  by_normalization = {}
  for norm in fusion.NORMALIZATIONS:
    alpha, grid = fusion.tune_weight(dev_qrels, dev_ce, dev_first_k,
                                     normalization=norm)
    fused = fusion.fuse((test_ce, test_first_k), (alpha, 1.0 - alpha),
                        normalization=norm)
    dev_fused = fusion.fuse((dev_ce, dev_first_k), (alpha, 1.0 - alpha),
                            normalization=norm)
    by_normalization[norm] = {
        "alpha": alpha,
        "dev_grid_ndcg_cut_10": {str(a): v for a, v in grid.items()},
        "dev": _evaluate(dev_qrels, dev_fused, metrics),
        "test": _evaluate(test.qrels, fused, metrics),
        "run": fused,
    }
  chosen = by_normalization[config.fusion_normalization]
  metric_writers.write_json(os.path.join(workdir, "fused_run.json"), chosen["run"])

  rng = np.random.default_rng(config.seed)
  shuffled = {q: {d: float(rng.random()) for d in sorted(ds)}
              for q, ds in test_ce.items()}
  first_metrics = metrics + (f"recall_{config.first_stage_depth}",)
  num_pairs = sum(len(v) for v in test_ce.values())
  final = [r for r in writer.rows if "loss" in r]
  dev_rows = [r for r in writer.rows if "dev_loss" in r]
  results = {
      "data": config.data,
      "method": config.method,
      "optimizer": config.optimizer.name,
      "loss": config.loss,
      "max_length": config.max_length,
      "first_stage": config.first_stage,
      "first_stage_depth": config.first_stage_depth,
      "rerank_k": config.rerank_k,
      "num_train_steps": config.num_train_steps,
      "train_queries": len(groups),
      "dev_queries": len(dev_ids),
      "train_pairs_seen": (config.num_train_steps * config.queries_per_batch
                           * config.group_size),
      "test_queries": len(test.qrels),
      "test_docs": len(test.corpus),
      "before": _evaluate(test.qrels, test_first, first_metrics),
      "after": _evaluate(test.qrels, test_ce, metrics),
      "fused": chosen["test"],
      "random_order": _evaluate(test.qrels, shuffled, metrics),
      "fusion_normalization": config.fusion_normalization,
      "fusion_alpha": chosen["alpha"],
      "fusion_by_normalization": {
          n: {k: v for k, v in r.items() if k != "run"}
          for n, r in by_normalization.items()},
      "dev": {
          "before": _evaluate(dev_qrels, dev_first, first_metrics),
          "after": _evaluate(dev_qrels, dev_ce, metrics),
          "fused": chosen["dev"],
          "loss_curve": [{k: r[k] for k in ("step", "dev_loss", "dev_top1")}
                         for r in dev_rows],
      },
      "trainable_params": int(counts["trainable"]),
      "total_params": int(counts["total"]),
      "train_seconds": train_seconds,
      "dev_eval_seconds": dev_seconds,
      "dev_rerank_seconds": dev_rerank_seconds,
      "rerank_seconds": rerank_seconds,
      "rerank_pairs": num_pairs,
      "wall_seconds": time.perf_counter() - t_start,
      "resumed_from_step": start,
      "final_loss": final[-1]["loss"] if final else None,
  }
  metric_writers.write_json(os.path.join(workdir, "results.json"), results)
  table = format_results(results)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  print(table)
  return results


def format_results(r: dict[str, Any]) -> str:
  """A Markdown table: first stage, cross-encoder alone, fused."""
  k = r["rerank_k"]
  a = r["fusion_alpha"]
  rows = [
      f"data: {r['data']} ({r['train_queries']} train queries, "
      f"{r['dev_queries']} dev, {r['train_pairs_seen']} train pairs seen; "
      f"{r['test_queries']} test queries, {r['test_docs']} docs); "
      f"{r['first_stage']} top-{r['first_stage_depth']}, rerank top-{k} at "
      f"{r['max_length']} tokens; fusion weight chosen on dev: "
      f"alpha={a:g} ({r['fusion_normalization']})",
      "",
      f"| run | nDCG@10 | Recall@10 | MRR@10 | Recall@{k} | dev nDCG@10 |",
      "|---|---:|---:|---:|---:|---:|",
  ]
  def row(name, m, dev):
    return (f"| {name} | {m['ndcg_cut_10']:.4f} | {m['recall_10']:.4f} | "
            f"{m['mrr_cut_10']:.4f} | {m[f'recall_{k}']:.4f} | "
            + (f"{dev['ndcg_cut_10']:.4f} |" if dev else "- |"))
  rows.append(row(r["first_stage"], r["before"], r["dev"]["before"]))
  rows.append(row(f"random order of the top-{k}", r["random_order"], None))
  rows.append(row(
      f"{r['method']} cross-encoder alone ({r['num_train_steps']} steps, "
      f"{r['loss']}, {r['optimizer']})", r["after"], r["dev"]["after"]))
  rows.append(row(
      f"fused: {a:g}·CE + {1 - a:g}·{r['first_stage']} "
      f"({r['fusion_normalization']})", r["fused"], r["dev"]["fused"]))
  rows += [
      "",
      f"trainable params {r['trainable_params']:,} of "
      f"{r['total_params']:,}; train {r['train_seconds']:.0f} s (+ dev "
      f"loss {r['dev_eval_seconds']:.0f} s); rerank {r['rerank_seconds']:.0f}"
      f" s ({r['rerank_pairs']} test pairs), dev rerank "
      f"{r['dev_rerank_seconds']:.0f} s; wall {r['wall_seconds']:.0f} s",
  ]
  return "\n".join(rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  validate_config(_CONFIG.value, config_checks.overrides(_CONFIG))
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  jax.config.config_with_absl()
  app.run(main)
