r"""Fine-tunes a retrieval model (LoRA, any adapter, or full) and evaluates it.

  python -m experiments.finetune_retriever --workdir=$WORKDIR \
      --config=experiments/configs/finetune_retriever.py

`--config.model.name`: `biencoder`, `matryoshka`, `colbert` or `splade`
(`experiments/retrieval_models.py`); the config file documents every key.
`train_and_evaluate(config, workdir)` is a thin layer over `lowrank.train.fit`
and `lowrank.data.specs`. The workdir gets orbax checkpoints (reruns
resume), metrics (CSV, JSONL, TensorBoard), `zero_shot.json`,
`results.json`, `results.md` and, with prefix sizes, `prefix_curve.png`.

Multi-process: the same command once per process with `--coordinator_address
=HOST:PORT --num_processes=N --process_id=I` (`auto` on TPU pods / SLURM;
`lowrank.distributed`). Each places its slices of the same batches, saves
checkpoints collectively, evaluates a local copy of the weights; process 0
writes files and prints. Losses equal one process on as many devices.
"""

import os
import time
from typing import Any

import jax
import ml_collections

from experiments import common_flags
from experiments import config_checks
from experiments import retrieval_models
from experiments.configs import finetune_retriever as config_lib
from lowrank import adapters
from lowrank import distributed
from lowrank import metric_writers
from lowrank import sharding
from lowrank import train
from lowrank.data import specs
from lowrank.models import bert
from lowrank.retrieval import biencoder
from lowrank.retrieval import evaluate as evaluate_lib

common_flags.config_and_workdir()

Config = ml_collections.ConfigDict
MODELS, DENSE = retrieval_models.MODELS, retrieval_models.DENSE_MODELS


def validate_config(config: Config,
                    overrides: dict[str, Any] | None = None) -> None:
  """Checks `config` before any data or model is loaded.

  `overrides`: the `--config.<key>` flags given (`config_checks.overrides`);
  each must be one this run reads.

  Raises:
    ValueError: On an unknown key or name, a bad size, an option of another
      model, optimizer arguments its factory does not take, a mesh that does
      not fit, or an override this run ignores.
    TypeError: On a value of the wrong type.
    FileNotFoundError: On a data or model directory that does not exist.
  """
  check = config_checks.validate_common(config, config_lib.get_config(),
                                        first_devices=True)
  m = config.model
  check.choice("model.name", MODELS)
  check.positive_int("data.query_max_length", "data.doc_max_length",
                     "eval.batch_size", "eval.k")
  check.non_negative_int("data.eval_max_queries", "data.eval_max_docs")
  check.choice("model.pooling", bert.POOLINGS)
  check.choice("model.towers", biencoder.TOWERS)
  check.positive_number("model.scale", "model.max_scale")
  check.boolean("model.symmetric", "model.same_side", "model.learn_scale")
  if m.learn_scale:
    check.not_greater("model.scale", "model.max_scale")
  used = [k for k, v in (("model.learn_scale", m.learn_scale),
                         ("model.same_side", m.same_side),
                         ("model.symmetric", m.symmetric),
                         ("model.towers", m.towers != "shared"),
                         ("eval.dims", tuple(config.eval.dims))) if v]
  if m.name not in DENSE and used:
    raise ValueError(f"{used} apply to the bi-encoder models {DENSE}; found "
                     f"model.name={m.name!r}. Unset them.")
  dims, weights = tuple(m.matryoshka.dims), tuple(m.matryoshka.weights)
  for key, value in (("eval.dims", tuple(config.eval.dims)),
                     ("model.matryoshka.dims", dims)):
    if not all(isinstance(d, int) and d >= 1 for d in value):
      raise ValueError(f"config.{key} must hold positive ints; found {value}.")
  if m.name == "matryoshka" and (not dims or weights and len(weights) != len(
      dims)):
    raise ValueError(
        f"config.model.matryoshka.dims must name at least one prefix size and"
        f" weights one per dim or () for all 1; found {dims}, {weights}.")
  if m.name == "colbert":
    check.positive_int("model.colbert.dim", "eval.muvera.rerank")
    retrieval_models.fde_config(config)  # Raises on bad FDE sizes.
  if m.name == "splade":
    check.choice("model.splade.regularizer",
                 retrieval_models.SPLADE_REGULARIZERS)
    check.non_negative_number("model.splade.lambda_q",
                              "model.splade.lambda_d")
    check.non_negative_int("model.splade.reg_warmup_steps")
  if overrides:
    config_checks.unused_overrides(config, overrides, unused_keys(config))


def unused_keys(config: Config) -> dict[str, str]:
  """Config keys (or blocks) this run does not read -> why not."""
  name = config.model.name
  unused = {"demo": "demo.* configures experiments/demo.py only"}
  for block in ("matryoshka", "colbert", "splade"):
    if name != block:
      unused[f"model.{block}"] = (f"model.{block}.* applies to "
                                  f"model.name={block!r}, not {name!r}")
  if name != "colbert":
    unused["eval.muvera"] = f"eval.muvera applies to ColBERT, not {name!r}"
  if name not in DENSE:
    for key in ("model.scale", "model.max_scale", "model.pooling",
                "model.learn_scale", "model.same_side", "model.towers",
                "model.symmetric", "eval.dims"):
      unused[key] = f"{key} applies to the bi-encoder models {DENSE}, not " \
                    f"{name!r}"
  elif not config.model.learn_scale:
    unused["model.max_scale"] = (
        "model.max_scale clips a learned scale (model.learn_scale=False)")
  if config.adapter.method == "full":
    for key in config.adapter:
      if key != "method":
        unused[f"adapter.{key}"] = (
            "adapter.method='full' trains every weight, with no adapter")
  return unused


def check_optimizer(config: Config, params: Any) -> None:
  """`train.check_optimizer`, with this binary's way out."""
  try:
    train.check_optimizer(config.optimizer, params)
  except ValueError as e:
    raise ValueError(f"{e} Here: adapter.method='full' (the ':galore' "
                     f"preset) or a smaller optimizer.rank.") from None


def load_data(config: Config) -> tuple[list[tuple[str, str]], Any]:
  """`(train pairs, test dataset)` of `config.data` (`lowrank.data.specs`);
  a ValueError on too little data."""
  d = config.data
  pairs = specs.positive_pairs(specs.load(d.spec, "train"))
  test = specs.load(d.spec, "test", max_queries=d.eval_max_queries,
                    max_docs=d.eval_max_docs)
  if len(pairs) < config.train.batch_size or not test.qrels:
    raise ValueError(
        f"{d.spec}: {len(pairs)} training pairs (train.batch_size is "
        f"{config.train.batch_size}) and {len(test.qrels)} judged test "
        f"queries; training needs a batch and evaluation a query.")
  evaluate_lib.check_depth(config.eval.k, evaluate_lib.METRICS,
                           len(test.corpus), name="config.eval.k")
  return pairs, test


def _evaluate(model, tokenizer, test, config):
  """`retrieval_models.evaluate` of a local copy (several processes)."""
  if jax.process_count() == 1:
    return retrieval_models.evaluate(model, tokenizer, test, config)
  model, mesh = evaluate_lib.local_copy(model)  # A collective.
  with jax.set_mesh(mesh):
    return retrieval_models.evaluate(model, tokenizer, test, config)


def _cached(path: str, fn):
  """`fn()`'s JSON-able result, computed once per workdir."""
  if (out := metric_writers.read_json(path)) is not None:
    return out
  if (out := fn()) and distributed.is_main_process():
    metric_writers.write_json(path, out)
  return out


def train_and_evaluate(config: Config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) training; returns zero-shot and final metrics."""
  validate_config(config)
  t_start = time.perf_counter()
  mesh = train.mesh_from_config(config.mesh)
  pairs, test = load_data(config)
  os.makedirs(workdir, exist_ok=True)
  with sharding.use_mesh(mesh):
    model, tokenizer = retrieval_models.load_model(config)
    zero_shot, zero_info = _cached(  # Before any adapter is injected.
        os.path.join(workdir, "zero_shot.json"),
        lambda: _evaluate(model, tokenizer, test, config))
    train.inject_from_config(model, config.adapter, rngs=config.seed)
    model.eval()  # No dropout: deterministic, resumable runs.
    wrt = retrieval_models.trainable(config, model)
    check_optimizer(config, train.split(model, wrt)[1])
    total_params = int(adapters.count_parameters(model)["total"])
    final_info = {}

    def eval_fn(trained):
      metrics, info = _evaluate(trained, tokenizer, test, config)
      final_info.update(info)
      return metrics

    fit = train.fit(
        model, wrt, retrieval_models.make_loss(
            config, tokenizer, [d for _, d in pairs]),
        train.optimizer_from_config(config.optimizer, model=model),
        config.train, batch_fn=retrieval_models.make_batch_fn(
            config, model, tokenizer, pairs), workdir=workdir, mesh=mesh,
        eval_fn=eval_fn,
        desc=f"{config.model.name} {config.adapter.method} fine-tune")
  out = fit.loop
  results = dict(
      data=config.data.spec, model=config.model.name,
      method=config.adapter.method, optimizer=config.optimizer.name,
      optimizer_state_bytes=fit.opt_state_bytes,
      num_train_steps=config.train.num_steps, train_pairs=len(pairs),
      test_queries=len(test.qrels), test_docs=len(test.corpus),
      zero_shot=zero_shot, final=out.last_eval, zero_shot_info=zero_info,
      final_info=final_info, trainable_params=fit.trainable_params,
      total_params=total_params, compiled_step_memory=fit.memory,
      train_seconds=out.train_seconds, resumed_from_step=out.start_step,
      wall_seconds=time.perf_counter() - t_start)
  if distributed.is_main_process():
    table = "\n\n".join(
        x for x in (format_results(results),
                    retrieval_models.format_extra(results)) if x)
    if evaluate_lib.prefix_curve(out.last_eval):
      table += "\n\nplot: " + evaluate_lib.plot_prefix_curves(
          [("zero-shot (truncated)", zero_shot, "k--"),
           (f"{config.model.name} {config.adapter.method} "
            f"({config.train.num_steps} steps)", out.last_eval, "-")],
          os.path.join(workdir, "prefix_curve.png"),
          title=f"Matryoshka curve on {results['data']}")
    print(metric_writers.write_results(workdir, results, table))
  # Nobody exits (tearing down the coordinator) while others still work.
  distributed.barrier("finetune_retriever:done")
  return results


def run_label(r: dict[str, Any]) -> str:
  """A run's row label: model, method, optimizer and steps."""
  opt, model = r.get("optimizer", "adamw"), r.get("model", "biencoder")
  name = r["method"] if model == "biencoder" else f"{model} {r['method']}"
  return (f"{name} + {opt}" if opt != "adamw" else name) + (
      f" ({r['num_train_steps']} steps)")


def format_results(runs: dict[str, Any] | list[dict[str, Any]]) -> str:
  """A Markdown table: zero-shot, then one row per fine-tuned run."""
  runs = [runs] if isinstance(runs, dict) else list(runs)
  r0, measures = runs[0], ("ndcg_cut_10", "recall_10", "recall_100")
  rows = [["zero-shot", *(r0["zero_shot"][m] for m in measures), 0, None,
           None, None]]
  for r in runs:
    state = r.get("optimizer_state_bytes")
    rows.append([
        run_label(r), *(r["final"][m] for m in measures),
        f"{r['trainable_params']:,}",
        None if state is None else f"{state / 2**20:.1f} MiB",
        f"{r['compiled_step_memory']['total_bytes'] / 2**20:.0f} MiB",
        f"{r['train_seconds']:.0f} s"])
  return (f"data: {r0['data']} ({r0['train_pairs']} train pairs; "
          f"{r0['test_queries']} test queries, {r0['test_docs']} docs)\n\n"
          + metric_writers.markdown_table(
              ["model", "nDCG@10", "Recall@10", "Recall@100",
               "trainable params", "optimizer state", "step memory",
               "train time"], rows))


if __name__ == "__main__":
  common_flags.run_main(train_and_evaluate, validate_config,
                        setup=common_flags.multi_process_setup())
