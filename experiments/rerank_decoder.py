r"""FIRST and ICR reranking end to end on a small byte-level LLaMA decoder.

  python -m experiments.rerank_decoder --workdir=$WORKDIR \
      --config=experiments/configs/rerank_decoder.py

Bytes are the tokens. 1. The decoder (`lowrank.models.llama`) learns
next-byte prediction on the train split's `query\ndocument` texts. 2. FIRST
fine-tuning (`lowrank.ranking.first`) on BM25 candidate lists of the train
queries (`lowrank.ranking.training_data`): LM loss of the target order +
`ltr_weight` x a listwise loss on the first identifier's logits. 3. BM25's
top `eval.rerank_k` of each test query reranked by FIRST and ICR
(`lowrank.ranking.icr`, with and without calibration), with reference
orders; nDCG@10 / Recall@10 go to `results.md` / `results.json`. Each phase
checkpoints under `pretrain/` and `first/` (a rerun resumes).

References: FIRST, https://arxiv.org/abs/2406.15657; ICR,
https://arxiv.org/abs/2410.02642.
"""

import os
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from experiments import common_flags
from experiments import config_checks
from experiments.configs import rerank_decoder as config_lib
from lowrank import checkpoint
from lowrank import metric_writers
from lowrank import sharding
from lowrank import train as train_lib
from lowrank.data import specs
from lowrank.models import llama
from lowrank.ranking import candidates
from lowrank.ranking import decoder_text
from lowrank.ranking import first
from lowrank.ranking import icr
from lowrank.ranking import training_data
from lowrank.retrieval import metrics as metrics_lib

common_flags.config_and_workdir()

EVAL_METRICS = ("ndcg_cut_10", "recall_10")
TOKENIZER = decoder_text.ByteTokenizer()
RERANKERS = ("first", "first_shuffled", "icr_pretrained", "icr_first")


def parse_rerankers(spec: str) -> list[str]:
  """The comma-separated names of `eval.rerankers`."""
  names = [n.strip() for n in spec.split(",") if n.strip()]
  bad = [n for n in names if n not in RERANKERS]
  if bad:
    raise ValueError(f"Unknown rerankers {bad} in config.eval.rerankers; "
                     f"options: {RERANKERS}.")
  return names


def validate_config(config: ml_collections.ConfigDict,
                    overrides: dict[str, Any] | None = None) -> None:
  """Raises on a bad key or value, or an override this run ignores."""
  check = config_checks.validate_common(config, config_lib.get_config(),
                                        first_devices=True)
  check.positive_int(
      *(f"model.{k}" for k in config.model.keys()), "data.max_query_bytes",
      "data.max_doc_bytes", "pretrain.seq_len", "eval.rerank_k",
      "eval.window", "eval.stride", "eval.batch_size", "eval.icr_batch_size")
  check.non_negative_int("first.max_train_queries", "data.eval_max_queries")
  m = config.model
  if m.hidden_size % m.num_heads or m.num_heads % m.num_kv_heads:
    raise ValueError(
        f"config.model.hidden_size ({m.hidden_size}) must be divisible by "
        f"model.num_heads ({m.num_heads}), and num_heads by "
        f"model.num_kv_heads ({m.num_kv_heads}). Fix --config.model.*.")
  check.non_negative_number("first.lm_weight", "first.ltr_weight")
  if not config.first.lm_weight and not config.first.ltr_weight:
    raise ValueError(
        "config.first.lm_weight and config.first.ltr_weight are both 0, so "
        "FIRST fine-tuning would train nothing. Set --config.first.ltr_weight "
        "to e.g. 1.0.")
  check.boolean("first.shuffle_candidates")
  check.choice("first.ltr_loss", first.LTR_LOSSES)
  check.choice("eval.icr_query_reduction", icr.QUERY_REDUCTIONS)
  for key in ("first.window", "eval.window"):
    check.in_range(key, 2, len(first.IDENTIFIERS), high_closed=True)
  first.sliding_windows(1, config.eval.window, config.eval.stride)
  rerankers = parse_rerankers(config.eval.rerankers)
  if overrides:
    unused = {}
    if not any(r.startswith("icr") for r in rerankers):
      for key in ("eval.icr_batch_size", "eval.icr_query_reduction"):
        unused[key] = f"no ICR reranker in rerankers={config.eval.rerankers!r}"
    if not any(r.startswith("first") for r in rerankers):
      unused["eval.batch_size"] = (
          f"it batches FIRST reranking; no FIRST reranker in "
          f"rerankers={config.eval.rerankers!r}")
    config_checks.unused_overrides(config, overrides, unused)


def prompt_formats(config) -> tuple[first.PromptFormat, icr.PromptFormat]:
  """FIRST's and ICR's prompt formats (the byte limits of `config.data`)."""
  kw = dict(max_query_tokens=config.data.max_query_bytes,
            max_doc_tokens=config.data.max_doc_bytes)
  return first.PromptFormat(**kw), icr.PromptFormat(**kw)


def model_config(config) -> llama.LlamaConfig:
  return llama.LlamaConfig(vocab_size=TOKENIZER.vocab_size,
                           max_position=4096, **config.model.to_dict())


def build_model(config, mesh) -> llama.LlamaForCausalLM:
  """The decoder of `config.model`, seeded, on `mesh`."""
  with sharding.use_mesh(mesh):
    return llama.LlamaForCausalLM(model_config(config),
                                  rngs=nnx.Rngs(config.seed))


def adapt(config, model, mesh) -> Any:
  """Injects `config.adapter` (FIRST phase); returns the trainable filter."""
  with sharding.use_mesh(mesh):  # A no-op for method "full".
    train_lib.inject_from_config(model, config.adapter, rngs=config.seed)
  full = config.adapter.method in (None, "full")
  return nnx.Param if full else nnx.LoRAParam


def load_trained(config: ml_collections.ConfigDict, workdir: str,
                 phase: str = "first") -> tuple[llama.LlamaForCausalLM, int]:
  """The decoder of `phase`'s latest checkpoint in `workdir`, and its step.

  Raises:
    FileNotFoundError: If the phase has no checkpoint.
  """
  mesh = train_lib.mesh_from_config(config.mesh)
  model = build_model(config, mesh)
  wrt = adapt(config, model, mesh) if phase == "first" else nnx.Param
  tx = train_lib.optimizer_from_config(config[phase].optimizer, model=model)
  graphdef, params, rest = train_lib.split(model, wrt)
  with checkpoint.Checkpointer(os.path.join(workdir, phase, "checkpoints"),
                              read_only=True) as ckpt:
    if (step := ckpt.latest_step()) is None:
      raise FileNotFoundError(f"No {phase} checkpoint under {workdir}; run "
                              f"experiments.rerank_decoder there first.")
    state = ckpt.restore(step, {"params": params,
                                "opt_state": tx.init(params)})
  return nnx.merge(graphdef, state["params"], rest), step


def train_phase(config, phase, model, wrt, mesh, loss_fn, batch_fn, workdir):
  """Runs (or resumes) one phase in `workdir/phase`: `(model, summary)`."""
  workdir = os.path.join(workdir, phase)
  fit = train_lib.fit(
      model, wrt, loss_fn, train_lib.optimizer_from_config(
          config[phase].optimizer, model=model), config[phase].train,
      batch_fn=batch_fn, workdir=workdir, mesh=mesh, memory=False,
      desc=phase)
  rows = metric_writers.read_csv(os.path.join(workdir, "metrics.csv"))
  return fit.model, {"resumed_from_step": fit.loop.start_step,
                     "train_seconds": fit.loop.train_seconds,
                     "final": rows[-1] if rows else {}}


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Runs (or resumes) both phases, then reranks; returns the results."""
  validate_config(config)
  t_start = time.perf_counter()
  d, f, e = config.data, config.first, config.eval
  train = specs.load(d.spec, "train")
  test = specs.load(d.spec, "test", max_queries=d.eval_max_queries)
  first_fmt, icr_fmt = prompt_formats(config)
  mesh = train_lib.mesh_from_config(config.mesh)

  # Phase 1: LM pretraining on random windows of the training text.
  model = build_model(config, mesh)
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
  model, pre = train_phase(
      config, "pretrain", model, nnx.Param, mesh,
      lambda m, b: llama.next_token_loss(m(b), b), training_data.byte_windows(
          "".join(f"{q}\n{d}\n\n" for q, d in specs.positive_pairs(train)),
          config.pretrain.seq_len, config.pretrain.train.batch_size,
          config.seed), workdir)
  graphdef, state = nnx.split(model)  # A copy: training donates buffers.
  pretrained = nnx.merge(graphdef, jax.tree.map(jnp.copy, nnx.as_pure(state)))

  # Phase 2: FIRST fine-tuning.
  wrt = adapt(config, model, mesh)
  bm25 = candidates.FirstStage("bm25", e.rerank_k)
  lists = training_data.candidate_lists(
      train, training_data.sample_ids(list(train.qrels), f.max_train_queries,
                                      config.seed),
      bm25.index(train.corpus), window=f.window, seed=config.seed)
  ident = decoder_text.single_token_ids(TOKENIZER,
                                        first_fmt.identifiers[:f.window])
  model, fin = train_phase(
      config, "first", model, wrt, mesh,
      lambda m, b: first.loss_fn(m, b, ident, ltr_loss=f.ltr_loss,
                                 lm_weight=f.lm_weight,
                                 ltr_weight=f.ltr_weight),
      lambda s: training_data.first_batch(
          lists, train, TOKENIZER, s, batch_size=f.train.batch_size,
          window=f.window, seed=config.seed, shuffle=f.shuffle_candidates,
          prompt_format=first_fmt), workdir)

  # Evaluation: BM25's top-k, reference orders, then each reranker.
  queries = {q: test.queries[q] for q in sorted(test.qrels)}
  run = bm25.run(queries, test.corpus,
                 path=os.path.join(workdir, "first_stage_bm25.json"))
  shuffled = training_data.random_order(run, [config.seed, 3])
  runs = {"bm25": run, "shuffled": shuffled,
          "oracle": training_data.oracle_order(run, test.qrels),
          "windows_random": training_data.random_window_order(
              run, e.rerank_k, e.window, e.stride, [config.seed, 5])}
  seconds = {}
  for name in parse_rerankers(e.rerankers):
    t0 = time.perf_counter()
    if name.startswith("first"):
      new = {name: first.rerank(
          model, TOKENIZER, queries, test.corpus,
          run if name == "first" else shuffled, k=e.rerank_k,
          window=e.window, stride=e.stride, prompt_format=first_fmt,
          batch_size=e.batch_size)}
    else:
      new = dict(zip((name, name + "_uncalibrated"),
                     icr.rerank_with_and_without_calibration(
                         pretrained if name == "icr_pretrained" else model,
                         TOKENIZER, queries, test.corpus, run, k=e.rerank_k,
                         prompt_format=icr_fmt, batch_size=e.icr_batch_size,
                         query_reduction=e.icr_query_reduction)))
      seconds[name + "_uncalibrated"] = None
    seconds[name] = time.perf_counter() - t0
    for key, reranked in new.items():
      metric_writers.write_json(
          os.path.join(workdir, f"reranked_{key}.json"), reranked)
    runs.update(new)

  results = {
      "test_queries": len(queries), "test_docs": len(test.corpus),
      "train_lists": len(lists), "rerank_k": e.rerank_k, "window": e.window,
      "stride": e.stride, "train_window": f.window, "ltr_loss": f.ltr_loss,
      "max_doc_bytes": d.max_doc_bytes, "max_query_bytes": d.max_query_bytes,
      "model": dict(config.model), "num_params": int(num_params),
      "pretrain": pre, "first": fin, "rerank_seconds": seconds,
      "metrics": {name: metrics_lib.evaluate(test.qrels, r, EVAL_METRICS)
                  for name, r in runs.items()},
      "wall_seconds": time.perf_counter() - t_start,
  }
  print(metric_writers.write_results(workdir, results,
                                     format_results(results)))
  return results


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
    "icr_first": "ICR (FIRST-tuned decoder)",
}


def format_results(r: dict[str, Any]) -> str:
  """A Markdown table of nDCG@10 / Recall@10 per ranking."""
  m, pre, fin = r["model"], r["pretrain"]["final"], r["first"]["final"]
  nan = float("nan")
  rows = []
  for name, vals in r["metrics"].items():
    t = r["rerank_seconds"].get(name)
    label = _LABELS.get(name.removesuffix("_uncalibrated"), name)
    rows.append([label + ", without calibration" * name.endswith(
        "_uncalibrated"), vals["ndcg_cut_10"], vals["recall_10"],
                 None if t is None else f"{t:.0f} s"])
  return "\n".join([
      f"code_search test: {r['test_queries']} queries, {r['test_docs']} "
      f"docs; BM25 top-{r['rerank_k']} reranked. Decoder d="
      f"{m['hidden_size']}, {m['num_layers']} layers, {m['num_heads']} "
      f"heads, {r['num_params']:,} params, bytes as tokens; docs cut to "
      f"{r['max_doc_bytes']} bytes, queries to {r['max_query_bytes']}. "
      f"Pretraining {r['pretrain']['train_seconds']:.0f} s (final loss "
      f"{pre.get('loss', nan):.3f}); FIRST {r['train_lists']} train lists of "
      f"{r['train_window']}, {r['first']['train_seconds']:.0f} s (final lm "
      f"{fin.get('lm_loss', nan):.3f}, {r['ltr_loss']} "
      f"{fin.get('ltr_loss', nan):.3f}); test window {r['window']}, stride "
      f"{r['stride']}.", "", metric_writers.markdown_table(
          ["ranking", "nDCG@10", "Recall@10", "rerank time"], rows)])


if __name__ == "__main__":
  common_flags.run_main(train_and_evaluate, validate_config)
