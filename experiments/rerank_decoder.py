r"""FIRST and ICR reranking end to end on a small byte-level LLaMA decoder.

  python -m experiments.rerank_decoder --workdir=$WORKDIR \
      --config=experiments/configs/rerank_decoder.py

Data: docstring-summary -> code search over the Python standard library
(`lowrank.data.code_search`), first stage BM25 (`lowrank.retrieval.bm25`).
Tokens are UTF-8 bytes (`decoder_text.ByteTokenizer`, vocabulary 256), as
in `experiments/pretrain_lm.py`.

1. Pretraining: the decoder (`lowrank.models.llama`, random init) learns
   next-byte prediction on the train split's `summary\ncode` texts.
2. FIRST fine-tuning (`lowrank.ranking.first`): from the pretrained
   weights, on lists of each train query's BM25 top `first.window`
   candidates (the judged document is put in at a random slot when BM25
   missed it; `first.shuffle_candidates` shows them in a random order),
   target permutation = the judged document first, then BM25 order; loss
   = LM loss of the permutation string + `ltr_weight` x a listwise loss on
   the first-position identifier logits.
3. Evaluation on the test split: BM25's top `rerank_k` of each test query
   reranked by FIRST (sliding windows, one forward pass per window) and by
   ICR (`lowrank.ranking.icr`: zero-shot attention mass, on the pretrained
   decoder and/or the FIRST decoder, see `rerankers`). ICR's two passes
   (`icr.attention_scores` of the query and of the content-free query) are
   kept apart so that the table shows ICR with and without calibration;
   calibrated = their difference, which is what `icr.score_lists` returns.
   nDCG@10 / Recall@10 before and after, with two reference rows: a random
   shuffle of the top-k and the best possible order of the top-k (judged
   documents first).

The workdir holds orbax checkpoints per phase (`pretrain/`, `first/`; a
rerun resumes, a finished phase is not retrained), their `metrics.csv` /
`metrics.jsonl` / TensorBoard logs, the BM25 run and the reranked runs, and
`results.json` / `results.md`. Everything but flag parsing lives in
`train_and_evaluate`.

References: FIRST, https://arxiv.org/abs/2406.15657; ICR,
https://arxiv.org/abs/2410.02642.
"""

import functools
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
from experiments.configs import rerank_decoder as config_lib
from lowrank import checkpoint
from lowrank import metric_writers
from lowrank import sharding
from lowrank.data import code_search
from lowrank.models import llama
from lowrank.ranking import decoder_text
from lowrank.ranking import first
from lowrank.ranking import icr
from lowrank.retrieval import bm25 as bm25_lib
from lowrank.retrieval import metrics as metrics_lib

_CONFIG, _WORKDIR = common_flags.config_and_workdir()

EVAL_METRICS = ("ndcg_cut_10", "recall_10")
TOKENIZER = decoder_text.ByteTokenizer()
_LENGTH_MULTIPLE = 64


# ----------------------------------------------------------------------------
# Data.


def pretrain_tokens(train) -> np.ndarray:
  """Bytes of the train split's `summary\\ncode\\n\\n` texts, int32."""
  text = "".join(f"{q}\n{d}\n\n" for q, d in train.train_pairs)
  return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def pretrain_batch(tokens: np.ndarray, step: int, config) -> np.ndarray:
  """Random windows `[B, seq_len]` for `step` (1-based), a function of it."""
  p = config.pretrain
  rng = np.random.default_rng([config.seed, 0, step])
  starts = rng.integers(0, len(tokens) - p.seq_len, size=p.batch_size)
  return np.stack([tokens[s:s + p.seq_len] for s in starts])


def training_lists(train, config) -> list[tuple[str, list[str], list[float]]]:
  """`(query id, candidate ids, labels)` per train query, BM25 order.

  Candidates: the query's BM25 top `first.window` over the train corpus;
  if the judged document is missing it replaces a random slot (seeded), so
  every list has one positive.
  """
  window = config.first.window
  qids = sorted(train.qrels)
  if config.first.max_train_queries:
    order = np.random.default_rng(config.seed).permutation(len(qids))
    qids = sorted(qids[i] for i in order[:config.first.max_train_queries])
  index = bm25_lib.BM25(train.corpus)
  rng = np.random.default_rng([config.seed, 1])
  out = []
  for qid in qids:
    positives = {d for d, r in train.qrels[qid].items() if r > 0}
    if not positives:
      continue
    docs = [d for d, _ in index.search(train.queries[qid], window)]
    while len(docs) < window:  # Too few matches: fill with random docs.
      d = index.doc_ids[int(rng.integers(index.num_docs))]
      if d not in docs:
        docs.append(d)
    if not positives & set(docs):
      docs[int(rng.integers(window))] = sorted(positives)[0]
    out.append((qid, docs, [1.0 if d in positives else 0.0 for d in docs]))
  return out


def prompt_formats(config) -> tuple[first.PromptFormat, icr.PromptFormat]:
  return (first.PromptFormat(max_query_tokens=config.max_query_bytes,
                             max_doc_tokens=config.max_doc_bytes),
          icr.PromptFormat(max_query_tokens=config.max_query_bytes,
                           max_doc_tokens=config.max_doc_bytes))


def first_batch(lists, train, config, step: int) -> dict[str, np.ndarray]:
  """The FIRST training batch of `step` (1-based), a function of it.

  Lists follow a per-epoch permutation. The target permutation is the
  judged document first, then BM25 order; with `first.shuffle_candidates`
  the candidates appear in the prompt in a random order (same target), so
  that the prompt position says nothing about relevance. Rows are
  right-padded to a multiple of 64 tokens (one compilation per length).
  """
  b = config.first.batch_size
  per_epoch = len(lists) // b
  epoch, i = divmod(step - 1, per_epoch)
  perm = np.random.default_rng([config.seed, 2, epoch]).permutation(
      len(lists))
  rng = np.random.default_rng([config.seed, 4, step])
  fmt, _ = prompt_formats(config)
  examples = []
  for j in perm[i * b:(i + 1) * b]:
    qid, docs, labels = lists[j]
    # Target: by label, then BM25 rank (indices into the BM25-ordered list).
    target = sorted(range(len(docs)), key=lambda k: (-labels[k], k))
    shown = (rng.permutation(len(docs)) if config.first.shuffle_candidates
             else np.arange(len(docs)))
    slot = {int(d): p for p, d in enumerate(shown)}
    examples.append(first.make_example(
        TOKENIZER, train.queries[qid], [train.corpus[docs[d]] for d in shown],
        [labels[d] for d in shown], order=[slot[d] for d in target],
        prompt_format=fmt))
  length = decoder_text.bucket_length(
      max(len(e.prompt) + len(e.target) for e in examples), _LENGTH_MULTIPLE)
  return first.collate(examples, window=config.first.window, length=length,
                       rows=b)


# ----------------------------------------------------------------------------
# Model and training loops.


def model_config(config) -> llama.LlamaConfig:
  m = config.model
  longest = 4096
  return llama.LlamaConfig(
      vocab_size=TOKENIZER.vocab_size, hidden_size=m.hidden_size,
      intermediate_size=m.intermediate_size, num_layers=m.num_layers,
      num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
      max_position=longest)


def build_model(config):
  """`(graphdef, params, rest)` of the decoder (pure states), seeded."""
  with sharding.use_mesh(sharding.make_mesh(devices=jax.devices()[:1])):
    model = llama.LlamaForCausalLM(model_config(config),
                                   rngs=nnx.Rngs(config.seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.as_pure(params), nnx.as_pure(rest)


def make_optimizer(config, phase: str) -> optax.GradientTransformation:
  """AdamW with a warmup-cosine schedule for `phase` ("pretrain"/"first")."""
  p = config[phase]
  total = p.num_train_steps
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, p.learning_rate, p.warmup_steps, max(total, p.warmup_steps + 1),
      end_value=0.1 * p.learning_rate)
  return optax.adamw(schedule, weight_decay=config.weight_decay)


def load_trained(
    config: ml_collections.ConfigDict, workdir: str, phase: str = "first"
) -> tuple[llama.LlamaForCausalLM, int]:
  """The decoder of `phase`'s latest checkpoint in `workdir`, and its step.

  Raises:
    FileNotFoundError: If the phase has no checkpoint.
  """
  graphdef, params, rest = build_model(config)
  tx = make_optimizer(config, phase)
  target = {"params": params, "opt_state": tx.init(params)}
  ckpt = checkpoint.Checkpointer(
      os.path.join(workdir, phase, "checkpoints"), read_only=True)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"No {phase} checkpoint under {workdir}.")
  state = ckpt.restore(step, target)
  ckpt.close()
  return nnx.merge(graphdef, state["params"], rest), step


def _lm_step(graphdef, tx):
  """LM step as two jits (grad, update); see `first.make_train_step`."""

  @jax.jit
  def grads_fn(params, rest, tokens):
    def loss(p):
      model = nnx.merge(graphdef, p, rest)
      return llama.next_token_loss(model(tokens), tokens)
    value, grads = jax.value_and_grad(loss)(params)
    return grads, {"loss": value, "grad_norm": optax.tree.norm(grads)}

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def step(params, opt_state, rest, tokens):
    grads, m = grads_fn(params, rest, tokens)
    params, opt_state = update(params, opt_state, grads)
    return params, opt_state, m

  return step


def _train_phase(name, workdir, params, tx, step_fn, batch_fn, num_steps,
                 config) -> tuple[Any, dict[str, Any]]:
  """Runs (or resumes) one phase; returns final params and its summary."""
  opt_state = jax.tree.map(lambda x: jnp.array(x, copy=True),
                           tx.init(params))
  phase_dir = os.path.join(workdir, name)
  ckpt = checkpoint.Checkpointer(
      os.path.join(phase_dir, "checkpoints"), max_to_keep=2,
      save_interval_steps=config.checkpoint_every_steps)
  state, start = ckpt.restore_or_init(
      {"params": params, "opt_state": opt_state})
  if start:
    logging.info("%s: resumed from step %d.", name, start)
  params, opt_state = state["params"], state["opt_state"]
  writer = metric_writers.MetricWriter(phase_dir, resume_step=start)
  t0 = time.perf_counter()
  bar = tqdm.tqdm(range(start + 1, num_steps + 1), initial=start,
                  total=num_steps, desc=name, unit="step")
  for step in bar:
    batch = jax.tree.map(jnp.asarray, batch_fn(step))
    params, opt_state, m = step_fn(params, opt_state, batch)
    ckpt.save(step, {"params": params, "opt_state": opt_state},
              force=step == num_steps)
    if step % config.log_every_steps == 0 or step == num_steps:
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      bar.set_postfix(loss=f"{m['loss']:.4f}")
      writer.write(step, m)
  ckpt.close()
  writer.close()
  rows = metric_writers.read_csv(writer.csv_path)
  return params, {"resumed_from_step": start,
                  "train_seconds": time.perf_counter() - t0,
                  "final": rows[-1] if rows else {}}


def _validate(config) -> None:
  first.get_ltr_loss(config.first.ltr_loss)
  _parse_rerankers(config.rerankers)
  first.sliding_windows(1, config.window, config.stride)
  for name in ("rerank_k", "eval_batch_size", "icr_batch_size",
               "log_every_steps", "checkpoint_every_steps"):
    if config[name] < 1:
      raise ValueError(f"config.{name} must be positive; got "
                       f"{config[name]}.")
  for phase in ("pretrain", "first"):
    for name in ("num_train_steps", "batch_size"):
      if config[phase][name] < 1:
        raise ValueError(f"config.{phase}.{name} must be positive; got "
                         f"{config[phase][name]}.")
  if not 2 <= config.first.window <= len(first.IDENTIFIERS):
    raise ValueError(f"config.first.window must be in [2, "
                     f"{len(first.IDENTIFIERS)}]; got {config.first.window}.")
  if config.window > len(first.IDENTIFIERS):
    raise ValueError(f"config.window must be <= {len(first.IDENTIFIERS)}; "
                     f"got {config.window}.")


def validate_config(config: ml_collections.ConfigDict,
                    overrides: dict[str, Any] | None = None) -> None:
  """Checks `config` before any data or model is loaded.

  Args:
    config: The experiment config.
    overrides: The `--config.<key>` flags given on the command line
      (`config_checks.overrides`); each must be one this run reads.

  Raises:
    ValueError: On an unknown key or name, a non-positive size, head counts
      that do not divide, or an override this run ignores.
    TypeError: On a value of the wrong type.
  """
  _validate(config)
  check = config_checks.Checker(config, config_lib.get_config())
  check.known_keys()
  check.positive_int("model.hidden_size", "model.intermediate_size",
                     "model.num_layers", "model.num_heads",
                     "model.num_kv_heads", "max_query_bytes", "max_doc_bytes",
                     "pretrain.seq_len", "window", "stride")
  check.non_negative_int("seed", "pretrain.warmup_steps",
                         "first.warmup_steps", "first.max_train_queries",
                         "eval_max_queries")
  for phase in ("pretrain", "first"):
    check.not_greater(f"{phase}.warmup_steps", f"{phase}.num_train_steps")
    check.positive_number(f"{phase}.learning_rate")
  m = config.model
  if m.hidden_size % m.num_heads or m.num_heads % m.num_kv_heads:
    raise ValueError(
        f"config.model.hidden_size ({m.hidden_size}) must be divisible by "
        f"model.num_heads ({m.num_heads}), and num_heads by "
        f"model.num_kv_heads ({m.num_kv_heads}). Fix --config.model.*.")
  check.non_negative_number("first.lm_weight", "first.ltr_weight",
                            "weight_decay")
  if not config.first.lm_weight and not config.first.ltr_weight:
    raise ValueError(
        "config.first.lm_weight and config.first.ltr_weight are both 0, so "
        "FIRST fine-tuning would train nothing. Set --config.first.ltr_weight "
        "to e.g. 1.0.")
  check.boolean("first.shuffle_candidates")
  check.choice("icr_query_reduction", icr.QUERY_REDUCTIONS)
  if overrides:
    rerankers = _parse_rerankers(config.rerankers)
    unused = {}
    if not any(r.startswith("icr") for r in rerankers):
      for key in ("icr_batch_size", "icr_query_reduction"):
        unused[key] = f"no ICR reranker in rerankers={config.rerankers!r}"
    if not any(r.startswith("first") for r in rerankers):
      unused["eval_batch_size"] = (
          f"it batches FIRST reranking; no FIRST reranker in "
          f"rerankers={config.rerankers!r}")
    config_checks.unused_overrides(config, overrides, unused)


# ----------------------------------------------------------------------------
# Evaluation.


def _shuffled(run, seed: int):
  rng = np.random.default_rng([seed, 3])
  out = {}
  for qid, ranking in sorted(run.items()):
    docs = sorted(ranking)
    out[qid] = {d: float(s) for d, s in zip(docs,
                                             rng.permutation(len(docs)))}
  return out


def _oracle(run, qrels):
  return {qid: {d: float(qrels.get(qid, {}).get(d, 0)) + s * 1e-9
                for d, s in ranking.items()} for qid, ranking in run.items()}


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Runs (or resumes) both phases, then reranks; returns the results."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  t_start = time.perf_counter()
  train = code_search.load_code_search("train")
  test = code_search.load_code_search(
      "test", max_queries=config.eval_max_queries or None)
  first_fmt, icr_fmt = prompt_formats(config)

  graphdef, params, rest = build_model(config)
  num_params = int(sum(x.size for x in jax.tree.leaves(params)))

  # Phase 1: LM pretraining.
  p = config.pretrain
  tokens = pretrain_tokens(train)
  tx = make_optimizer(config, "pretrain")
  lm_step = _lm_step(graphdef, tx)
  params, pre = _train_phase(
      "pretrain", workdir, params, tx,
      lambda prm, o, b: lm_step(prm, o, rest, b),
      lambda s: pretrain_batch(tokens, s, config), p.num_train_steps, config)
  pretrained = nnx.merge(graphdef, jax.tree.map(jnp.copy, params), rest)

  # Phase 2: FIRST fine-tuning.
  f = config.first
  lists = training_lists(train, config)
  if len(lists) < f.batch_size:
    raise ValueError(f"{len(lists)} training lists < first.batch_size "
                     f"{f.batch_size}.")
  ident = decoder_text.single_token_ids(TOKENIZER,
                                        first_fmt.identifiers[:f.window])
  tx = make_optimizer(config, "first")
  first_step = first.make_train_step(
      graphdef, tx, ident, ltr_loss=f.ltr_loss, lm_weight=f.lm_weight,
      ltr_weight=f.ltr_weight)
  params, fin = _train_phase(
      "first", workdir, params, tx,
      lambda prm, o, b: first_step(prm, o, rest, b),
      lambda s: first_batch(lists, train, config, s), f.num_train_steps,
      config)
  first_model = nnx.merge(graphdef, params, rest)

  # Evaluation.
  queries = {q: test.queries[q] for q in sorted(test.qrels)}
  run_path = os.path.join(workdir, "first_stage_bm25.json")
  if os.path.exists(run_path):
    with open(run_path) as fh:
      run = json.load(fh)
  else:
    run = bm25_lib.BM25(test.corpus).search_run(queries, config.rerank_k)
    metric_writers.write_json(run_path, run)
  rows = {"bm25": metrics_lib.evaluate(test.qrels, run, EVAL_METRICS),
          "shuffled": metrics_lib.evaluate(
              test.qrels, _shuffled(run, config.seed), EVAL_METRICS),
          "oracle": metrics_lib.evaluate(
              test.qrels, _oracle(run, test.qrels), EVAL_METRICS)}
  seconds = {}
  selected = decoder_text.select_top_k(queries, test.corpus, run,
                                       config.rerank_k)
  qids = [q for q in sorted(selected) if selected[q]]
  q_texts = [queries[q] for q in qids]
  doc_lists = [[test.corpus[d] for d in selected[q]] for q in qids]

  def to_run(scores):
    out = {q: {} for q in run}
    for q, s in zip(qids, scores):
      out[q] = {d: float(v) for d, v in zip(selected[q], s)}
    return out

  def icr_rows(name, model):
    # The two passes of calibrated ICR, kept apart to report both.
    kw = dict(prompt_format=icr_fmt,
              query_reduction=config.icr_query_reduction,
              batch_size=config.icr_batch_size)
    t0 = time.perf_counter()
    raw = icr.attention_scores(model, TOKENIZER, q_texts, doc_lists, **kw)
    free = icr.attention_scores(
        model, TOKENIZER, [icr_fmt.content_free_query] * len(qids),
        doc_lists, **kw)
    seconds[name] = time.perf_counter() - t0
    seconds[name + "_uncalibrated"] = None
    return {name: to_run([r - f for r, f in zip(raw, free)]),
            name + "_uncalibrated": to_run(raw)}

  # What the sliding windows alone do to the first stage's order.
  rng = np.random.default_rng([config.seed, 5])
  orders = first.sliding_window_orders(
      [len(d) for d in doc_lists], config.window, config.stride,
      lambda jobs: rng.normal(size=(len(jobs), config.window)))
  rows["windows_random"] = metrics_lib.evaluate(
      test.qrels, to_run([first.order_scores(o) for o in orders]),
      EVAL_METRICS)

  for name in _parse_rerankers(config.rerankers):
    t0 = time.perf_counter()
    if name in ("first", "first_shuffled"):
      # "first_shuffled" feeds the top-k in a random order: what is left
      # is the model's own (content) signal, not the first stage's order.
      source = run if name == "first" else _shuffled(run, config.seed)
      runs = {name: first.rerank(
          first_model, TOKENIZER, queries, test.corpus, source,
          k=config.rerank_k, window=config.window, stride=config.stride,
          prompt_format=first_fmt, batch_size=config.eval_batch_size)}
      seconds[name] = time.perf_counter() - t0
    else:
      runs = icr_rows(name, pretrained if name == "icr_pretrained"
                      else first_model)
    for key, reranked in runs.items():
      metric_writers.write_json(
          os.path.join(workdir, f"reranked_{key}.json"), reranked)
      rows[key] = metrics_lib.evaluate(test.qrels, reranked, EVAL_METRICS)

  results = {
      "test_queries": len(queries),
      "test_docs": len(test.corpus),
      "train_lists": len(lists),
      "rerank_k": config.rerank_k,
      "window": config.window,
      "stride": config.stride,
      "train_window": f.window,
      "ltr_loss": f.ltr_loss,
      "max_doc_bytes": config.max_doc_bytes,
      "max_query_bytes": config.max_query_bytes,
      "model": dict(config.model),
      "num_params": num_params,
      "pretrain": pre,
      "first": fin,
      "metrics": rows,
      "rerank_seconds": seconds,
      "wall_seconds": time.perf_counter() - t_start,
  }
  metric_writers.write_json(os.path.join(workdir, "results.json"), results)
  table = format_results(results)
  with open(os.path.join(workdir, "results.md"), "w") as fh:
    fh.write(table + "\n")
  print(table)
  return results


RERANKERS = ("first", "first_shuffled", "icr_pretrained", "icr_first")


def _parse_rerankers(spec: str) -> list[str]:
  names = [n.strip() for n in spec.split(",") if n.strip()]
  bad = [n for n in names if n not in RERANKERS]
  if bad:
    raise ValueError(f"Unknown rerankers {bad}; options: {RERANKERS}.")
  return names


_LABELS = {
    "bm25": "BM25 (first stage)",
    "shuffled": "BM25 top-k, random order (reference)",
    "oracle": "BM25 top-k, judged documents first (upper bound)",
    "windows_random": "BM25 top-k through the sliding windows, random "
                      "window scores (reference)",
    "first": "FIRST (fine-tuned decoder, single pass per window)",
    "first_shuffled": "FIRST on the top-k in random order (content signal "
                      "only)",
    "icr_pretrained": "ICR (pretrained decoder, zero-shot)",
    "icr_pretrained_uncalibrated": "ICR without calibration (pretrained "
                                   "decoder)",
    "icr_first": "ICR (FIRST-tuned decoder)",
    "icr_first_uncalibrated": "ICR without calibration (FIRST-tuned "
                              "decoder)",
}


def format_results(r: dict[str, Any]) -> str:
  """A Markdown table of nDCG@10 / Recall@10 per ranking."""
  m = r["model"]
  lines = [
      f"code_search test: {r['test_queries']} queries, {r['test_docs']} "
      f"docs; BM25 top-{r['rerank_k']} reranked. Decoder d="
      f"{m['hidden_size']}, {m['num_layers']} layers, {m['num_heads']} "
      f"heads, {r['num_params']:,} params, bytes as tokens; docs cut to "
      f"{r['max_doc_bytes']} bytes, queries to {r['max_query_bytes']}. "
      f"Pretraining {r['pretrain']['train_seconds']:.0f} s (final loss "
      f"{r['pretrain']['final'].get('loss', float('nan')):.3f}); FIRST "
      f"{r['train_lists']} train lists of {r['train_window']}, "
      f"{r['first']['train_seconds']:.0f} s (final lm "
      f"{r['first']['final'].get('lm_loss', float('nan')):.3f}, "
      f"{r['ltr_loss']} {r['first']['final'].get('ltr_loss', float('nan')):.3f}"
      f"); test window {r['window']}, stride {r['stride']}.",
      "",
      "| ranking | nDCG@10 | Recall@10 | rerank time |",
      "|---|---:|---:|---:|",
  ]
  for name, vals in r["metrics"].items():
    t = r["rerank_seconds"].get(name)
    lines.append(
        f"| {_LABELS.get(name, name)} | {vals['ndcg_cut_10']:.4f} | "
        f"{vals['recall_10']:.4f} | {'-' if t is None else f'{t:.0f} s'} |")
  return "\n".join(lines)


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
