r"""Fine-tunes a retrieval model (LoRA, any adapter, or full) and evaluates it.

  python -m experiments.finetune_retriever --workdir=$WORKDIR \
      --config=experiments/configs/finetune_retriever.py

`--config.model` picks the model (`experiments/retrieval_models.py` holds
the per-model loss, encoders and evaluation): `biencoder` (default; MiniLM,
in-batch softmax), `matryoshka` (the bi-encoder with the Matryoshka loss,
evaluated at every embedding prefix size, plus a plot), `colbert` (late
interaction, exact MaxSim vs MUVERA) or `splade` (SPLADE-tiny with the FLOPS
regulariser, inverted-index retrieval). See the config file for data
options. Everything but flag parsing lives in `train_and_evaluate`, which
tests and notebooks call directly. The workdir holds orbax checkpoints
(rerunning resumes), `metrics.csv` / `metrics.jsonl` and TensorBoard event
files (`tensorboard/`), `results.json` and `results.md` (and
`prefix_curve.png` when prefix sizes are evaluated).
`--config.optimizer.name=galore --config.method=full` trains all weights
with GaLore's low-rank optimizer state instead of LoRA.

Multi-process (multi-host): start the same command once per process with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or
`--coordinator_address=auto` on a TPU pod slice / under SLURM, where JAX
reads the rest from the environment); see `lowrank.distributed`. The mesh
spans the devices of every process, each process builds the same host batch
and places only its own devices' slices, checkpoints are written
collectively into the shared workdir, every process evaluates the same
gathered weights (so all return the same metrics) and process 0 alone writes
files and prints. Losses equal a one-process run on as many devices.
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
import ml_collections
import numpy as np
import optax
import tqdm

from experiments import common_flags
from experiments import config_checks
from experiments import retrieval_models
from experiments.configs import finetune_retriever as config_lib
from lowrank import adapters
from lowrank import checkpoint
from lowrank import distributed
from lowrank import metric_writers
from lowrank import optim
from lowrank import sharding
from lowrank.data import beir
from lowrank.data import code_search
from lowrank.models import bert
from lowrank.optim import projection

_CONFIG, _WORKDIR = common_flags.config_and_workdir()
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-process runs: 'host:port' of process 0 (the same for every "
    "process), or 'auto' to let JAX detect a TPU pod slice / SLURM / Open "
    "MPI job. Default: $LOWRANK_COORDINATOR, else a single process.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None,
    "Multi-process runs: number of processes (default: "
    "$LOWRANK_NUM_PROCESSES, else 1).",
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None,
    "Multi-process runs: this process's index in [0, num_processes) "
    "(default: $LOWRANK_PROCESS_ID).",
)

P = jax.sharding.PartitionSpec
EVAL_METRICS = retrieval_models.EVAL_METRICS


def _subset(dataset: beir.Dataset, max_queries: int,
            max_docs: int) -> beir.Dataset:
  """The first `max_queries` judged queries (by id) and a corpus subset.

  The corpus keeps every document judged for a kept query, then the others
  in id order until `max_docs` (0: all documents).
  """
  qids = sorted(dataset.qrels)
  if max_queries:
    qids = qids[:max_queries]
  corpus = dataset.corpus
  if max_docs and max_docs < len(corpus):
    judged = {d for q in qids for d in dataset.qrels[q] if d in corpus}
    keep = set(judged)
    for d in sorted(corpus):
      if len(keep) >= max_docs:
        break
      keep.add(d)
    corpus = {d: t for d, t in corpus.items() if d in keep}
  if len(qids) == len(dataset.qrels) and corpus is dataset.corpus:
    return dataset
  return beir.Dataset(
      name=dataset.name,
      corpus=corpus,
      queries={q: dataset.queries[q] for q in qids},
      qrels={q: dataset.qrels[q] for q in qids},
  )


def load_data(spec: str, *, eval_max_queries: int = 0,
              eval_max_docs: int = 0):
  """`(train_pairs, test Dataset)` for `"code_search"` or `"beir:<dir>"`.

  Args:
    spec: `"code_search"` or `"beir:<directory>"`.
    eval_max_queries: Keep the first N judged test queries by id (0: all).
    eval_max_docs: Keep N test documents, the kept queries' judged ones
      first (0: the whole corpus; smaller corpora make metrics optimistic).

  Returns:
    `(pairs, test)`: `(query, positive document)` training texts and the
    test `Dataset`.

  Raises:
    ValueError: On an unknown spec, negative limits or an empty test set.
  """
  if eval_max_queries < 0 or eval_max_docs < 0:
    raise ValueError(
        f"eval_max_queries and eval_max_docs must be >= 0; got "
        f"{eval_max_queries}, {eval_max_docs}."
    )
  if spec == "code_search":
    train = code_search.load_code_search("train")
    test = code_search.load_code_search(
        "test", max_queries=eval_max_queries or None
    )
    pairs = list(train.train_pairs)
  elif spec.startswith("beir:"):
    directory = spec.split(":", 1)[1]
    test = beir.load_beir(directory, "test")
    train = beir.load_beir(directory, "train")
    pairs = [
        (train.queries[q], train.corpus[d])
        for q in sorted(train.qrels)
        for d, rel in sorted(train.qrels[q].items())
        if rel > 0
    ]
  else:
    raise ValueError(
        f"Unknown data spec {spec!r}; expected 'code_search' or 'beir:<dir>'."
    )
  test = _subset(test, eval_max_queries, eval_max_docs)
  if not test.qrels or not test.corpus:
    raise ValueError(
        f"{spec}: the test split has {len(test.qrels)} judged queries and "
        f"{len(test.corpus)} documents; evaluation needs at least one each."
    )
  return pairs, test


def evaluation_model(model):
  """`(model, mesh)` for `evaluate`: `(model, None)`, or a process-local copy.

  With several processes the parameters live on a mesh spanning all of
  them, and `bert.embed_texts` reads its results back to the host, which
  needs fully addressable arrays. So every process gathers the weights (a
  collective: all processes must call this) and evaluates on a mesh of its
  own devices, with the weights replicated there. Every process then
  computes the same metrics with no further communication.

  Args:
    model: The model, on any mesh.

  Returns:
    `(model, None)` with one process; otherwise a copy of the model with
    every variable replicated on this process's devices, and their mesh
    (pass it to `evaluate`).
  """
  if jax.process_count() == 1:
    return model, None
  graphdef, state = nnx.split(model)
  state = distributed.to_host(state)
  mesh = sharding.make_mesh(
      [("data", -1), ("fsdp", 1), ("tensor", 1)], devices=jax.local_devices()
  )
  replicated = jax.sharding.NamedSharding(mesh, P())
  state = jax.tree.map(
      lambda x: jax.device_put(x, replicated) if isinstance(x, np.ndarray)
      else x, state)
  return nnx.merge(graphdef, state), mesh


def evaluate_with_info(
    model, tokenizer, dataset, config, mesh=None
) -> tuple[dict[str, float], dict[str, Any]]:
  """`retrieval_models.evaluate` (metrics and timing info) under `mesh`.

  `mesh`, when given, is set as the context mesh (the process-local one of
  `evaluation_model`).
  """
  if mesh is not None:
    with jax.set_mesh(mesh):
      return retrieval_models.evaluate(model, tokenizer, dataset, config)
  return retrieval_models.evaluate(model, tokenizer, dataset, config)


def evaluate(model, tokenizer, dataset, config, mesh=None) -> dict[str, float]:
  """Encodes queries and corpus, searches, trec_eval metrics.

  For the default bi-encoder: exact top-k over mean-pooled embeddings,
  nDCG@10, Recall@10 and Recall@100; other models (`config.model`) and
  prefix sizes add keys (`experiments.retrieval_models`). `mesh`, when
  given, is set as the context mesh (see `evaluation_model`).
  """
  return evaluate_with_info(model, tokenizer, dataset, config, mesh)[0]


def _batches(pairs, tokenize, config, step):
  """The batch for `step` (1-based): a deterministic per-epoch permutation.

  `tokenize(queries, docs) -> (qs, ds)` (`retrieval_models.make_tokenize`).
  """
  b = config.batch_size
  per_epoch = len(pairs) // b
  epoch, i = divmod(step - 1, per_epoch)
  perm = np.random.default_rng([config.seed, epoch]).permutation(len(pairs))
  idx = perm[i * b:(i + 1) * b]
  return tokenize([pairs[j][0] for j in idx], [pairs[j][1] for j in idx])


OPTIMIZERS = ("adamw", "adamw8bit", "galore", "fira", "frugal", "q_galore")


def make_optimizer(
    config: ml_collections.ConfigDict,
) -> optax.GradientTransformation:
  """The optimizer named by `config.optimizer.name`, with a warmup-cosine LR.

  `adamw` / `adamw8bit` take `learning_rate, b1, b2, weight_decay`; the
  GaLore family (`galore`, `fira`, `frugal`, `q_galore`) additionally takes
  `config.optimizer.galore` (`rank`, `refresh_every`, `scale`, `projector`,
  `project`: a regex over parameter paths selecting the projected
  matrices; `lowrank.optim.galore_adamw`'s `project=`).

  Raises:
    ValueError: On an unknown optimizer name.
  """
  o = config.optimizer
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, o.learning_rate, config.warmup_steps,
      max(config.num_train_steps, config.warmup_steps + 1),
  )
  name = o.get("name", "adamw")
  common = dict(b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
  if name == "adamw":
    return optax.adamw(schedule, **common)
  if name == "adamw8bit":
    return optim.adamw8bit(schedule, **common)
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {name!r}; expected one of "
                     f"{OPTIMIZERS}.")
  g = dict(o.galore)
  kwargs = dict(rank=g["rank"], refresh_every=g["refresh_every"],
                scale=g["scale"], projector=g["projector"],
                project=g["project"] or None, weight_decay=o.weight_decay)
  factory = {"galore": optim.galore_adamw, "fira": optim.fira_adamw,
             "frugal": optim.frugal_adamw,
             "q_galore": optim.q_galore_adamw}[name]
  if name == "galore":
    kwargs.update(b1=o.b1, b2=o.b2)
  return factory(schedule, **kwargs)


GALORE_FAMILY = ("galore", "fira", "frugal", "q_galore")


def check_optimizer(config: ml_collections.ConfigDict, params: Any) -> None:
  """Rejects a GaLore-family optimizer that would project no parameter.

  GaLore keeps low-rank optimizer state only for the matrices selected by
  `config.optimizer.galore.project` whose sides both exceed its `rank`
  (`optim.projected_leaves`, the selection the optimizer makes); the rest
  get plain AdamW. With an adapter method the trained leaves are the
  adapter factors (rank `config.adapter.rank`), so GaLore would silently be
  AdamW: an error instead.

  Raises:
    ValueError: If the optimizer is GaLore-family and no trained leaf would
      be projected (or `project` matches none of them).
  """
  name = config.optimizer.get("name", "adamw")
  if name not in GALORE_FAMILY:
    return
  g = config.optimizer.galore
  projected = optim.projected_leaves(params, rank=g.rank,
                                     project=g.project or None)
  if not projected:
    raise ValueError(
        f"optimizer {name!r} would project no parameter: of the "
        f"{len(jax.tree.leaves(params))} leaves trained by method="
        f"{config.method!r} (model {config.model!r}), none is a matrix "
        f"matched by optimizer.galore.project={g.project!r} with both "
        f"sides > optimizer.galore.rank={g.rank}, so it would be plain "
        f"AdamW. Use method='full' (GaLore trains all weights with low-rank "
        f"state) or a smaller optimizer.galore.rank."
    )


def validate_config(
    config: ml_collections.ConfigDict,
    overrides: dict[str, Any] | None = None,
) -> None:
  """Checks `config` before any data or model is loaded.

  Args:
    config: The experiment config.
    overrides: The `--config.<key>` flags given on the command line
      (`config_checks.overrides`); each must be one this run reads.

  Raises:
    ValueError: On an unknown key or name (method, model, optimizer,
      pooling, ...), a non-positive size, a mesh that does not fit the
      devices or split the batch, or an override this run ignores.
    TypeError: On a value of the wrong type.
    FileNotFoundError: On a data or model directory that does not exist.
  """
  check = config_checks.Checker(config, config_lib.get_config())
  check.known_keys(open_keys=("adapter.options",))
  check.choice("method", ("full", *sorted(adapters.METHODS)))
  check.choice("model", retrieval_models.MODELS)
  check.choice("optimizer.name", OPTIMIZERS)
  check.positive_int("num_train_steps", "batch_size", "query_max_length",
                     "doc_max_length", "log_every_steps",
                     "checkpoint_every_steps", "eval_batch_size", "eval_k")
  check.non_negative_int("seed", "warmup_steps", "eval_max_queries",
                         "eval_max_docs")
  check.not_greater("warmup_steps", "num_train_steps")
  check.choice("pooling", bert.POOLINGS)
  check.positive_number("scale", "max_scale", "optimizer.learning_rate")
  check.non_negative_number("optimizer.weight_decay")
  check.in_range("optimizer.b1", 0.0, 1.0)
  check.in_range("optimizer.b2", 0.0, 1.0)
  check.boolean("symmetric", "same_side", "learn_scale")
  if config.method != "full":
    check.positive_int("adapter.rank")
    check.positive_number("adapter.alpha")
    check.in_range("adapter.dropout", 0.0, 1.0)
    check.regex("adapter.targets")
    check.boolean("adapter.use_rslora")
  if config.optimizer.name in GALORE_FAMILY:
    check.positive_int("optimizer.galore.rank",
                       "optimizer.galore.refresh_every")
    check.positive_number("optimizer.galore.scale")
    check.choice("optimizer.galore.projector", projection.PROJECTORS)
    check.regex("optimizer.galore.project")
  check.data_spec("data", splits=("train", "test"))
  check.model_dir("model_path")
  check.mesh("mesh", batch=("batch_size",))
  retrieval_models.validate_config(config)
  if overrides:
    config_checks.unused_overrides(config, overrides, unused_keys(config))


def unused_keys(config: ml_collections.ConfigDict) -> dict[str, str]:
  """Config keys (or blocks) this run does not read -> why not."""
  model, dense = config.model, config.model in retrieval_models.DENSE_MODELS
  unused = {"demo": "demo.* configures experiments/demo.py only"}
  for block in ("matryoshka", "colbert", "splade"):
    if model != block:
      unused[block] = f"{block}.* applies to model={block!r}, not {model!r}"
  if not dense:
    for key in ("scale", "max_scale", "pooling", "learn_scale", "same_side",
                "towers", "symmetric", "eval_dims"):
      unused[key] = (f"{key} applies to the bi-encoder models "
                     f"{retrieval_models.DENSE_MODELS}, not {model!r}")
  elif not config.learn_scale:
    unused["max_scale"] = "max_scale clips a learned scale (learn_scale=False)"
  if config.method == "full":
    unused["adapter"] = "method='full' trains every weight, with no adapter"
  if config.optimizer.name not in GALORE_FAMILY:
    unused["optimizer.galore"] = (
        f"optimizer.galore.* applies to {GALORE_FAMILY}, not "
        f"optimizer.name={config.optimizer.name!r}")
  return unused


def _write_json(path, obj):
  if distributed.is_main_process():
    metric_writers.write_json(path, obj)


def _read_json(path, default=None):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Runs (or resumes) training; returns zero-shot and final metrics.

  Raises:
    ValueError: On an unknown method, model or optimizer, an option that
      does not fit the model, a GaLore-family optimizer with nothing to
      project, or fewer training pairs than `batch_size`.
  """
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  t_start = time.perf_counter()
  if config.method != "full" and config.method not in adapters.METHODS:
    raise ValueError(
        f"method must be 'full' or an adapter method "
        f"{sorted(adapters.METHODS)}; got {config.method!r}."
    )
  retrieval_models.validate_config(config)
  mesh = sharding.make_mesh(tuple(config.mesh.items()))
  pairs, test = load_data(config.data, eval_max_queries=config.eval_max_queries,
                          eval_max_docs=config.eval_max_docs)
  if len(pairs) < config.batch_size:
    raise ValueError(
        f"{len(pairs)} training pairs < batch_size {config.batch_size}."
    )
  config_checks.retrieval_depth("config.eval_k", config.eval_k,
                                EVAL_METRICS, len(test.corpus))
  logging.info("%d training pairs; test: %d queries, %d docs.", len(pairs),
               len(test.qrels), len(test.corpus))
  with sharding.use_mesh(mesh):
    model, tokenizer = retrieval_models.load_model(config)
    zero_path = os.path.join(workdir, "zero_shot.json")
    zero_info_path = os.path.join(workdir, "zero_shot_info.json")
    # Multi-process: a collective, so every process makes it unconditionally.
    eval_model, eval_mesh = evaluation_model(model)
    if os.path.exists(zero_path):
      zero_shot = _read_json(zero_path)
      zero_info = _read_json(zero_info_path, {})
    else:
      zero_shot, zero_info = evaluate_with_info(
          eval_model, tokenizer, test, config, eval_mesh)
      _write_json(zero_info_path, zero_info)
      _write_json(zero_path, zero_shot)
    del eval_model  # A process-local copy of the weights, or `model`.
    logging.info("zero-shot: %s", zero_shot)
    if config.method != "full":
      kwargs = dict(config.adapter)
      options = dict(kwargs.pop("options", None) or {})
      adapters.inject(model, method=config.method, rngs=config.seed,
                      **kwargs, **options)
    wrt = retrieval_models.trainable_filter(config)
    model.eval()  # No dropout: deterministic, resumable runs.
    graphdef, params, rest = nnx.split(model, wrt, ...)
    param_shardings = sharding.state_shardings(params, mesh)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)

  check_optimizer(config, params)
  counts = adapters.count_parameters(model)
  counts["trainable"] = sum(x.size for x in jax.tree.leaves(params))
  tokenize = retrieval_models.make_tokenize(config, model, tokenizer)
  model_loss = retrieval_models.make_loss(
      config, tokenizer, [d for _, d in pairs])
  tx = make_optimizer(config)
  opt_shardings = sharding.shardings_like_params(
      jax.eval_shape(tx.init, params), params
  )
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  state_bytes = optim.state_bytes(opt_state)
  data_sharding = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))

  def loss_fn(params, rest, qs, ds, step):
    m = nnx.merge(graphdef, params, rest)
    return model_loss(m, qs, ds, step)

  @functools.partial(
      jax.jit,
      donate_argnums=(0, 1),
      out_shardings=(param_shardings, opt_shardings, None),
  )
  def train_step(params, opt_state, rest, qs, ds, step):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, rest, qs, ds, step)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {
        "loss": loss, "grad_norm": optax.tree.norm(grads), **aux}

  state = {"params": params, "opt_state": opt_state}
  ckpt = checkpoint.Checkpointer(
      os.path.join(workdir, "checkpoints"),
      max_to_keep=2,
      save_interval_steps=config.checkpoint_every_steps,
  )
  state, start = ckpt.restore_or_init(state)
  if start:
    logging.info("Resumed from step %d.", start)
  params, opt_state = state["params"], state["opt_state"]

  # Every process builds the same host batch and places its own slices.
  put = lambda x: distributed.host_to_global(dict(x), data_sharding)
  # The step (a replicated scalar) only for losses that read it, so the
  # other models' compiled step is exactly the step without it.
  put_step = lambda step: (
      distributed.host_to_global(np.int32(step), data_sharding)
      if retrieval_models.uses_step(config) else None)
  qs0, ds0 = _batches(pairs, tokenize, config, 1)
  with jax.set_mesh(mesh):
    compiled = train_step.lower(params, opt_state, rest, put(qs0),
                                put(ds0), put_step(1)).compile()
  memory = optim.compiled_memory(compiled)
  logging.info("compiled step memory: %s", memory)

  t_train = time.perf_counter()
  writer = metric_writers.MetricWriter(workdir, resume_step=start)
  label = (config.method if config.model == "biencoder"
           else f"{config.model} {config.method}")
  with jax.set_mesh(mesh), writer:
    bar = tqdm.tqdm(range(start + 1, config.num_train_steps + 1),
                    initial=start, total=config.num_train_steps,
                    desc=f"{label} fine-tune", unit="step",
                    disable=not distributed.is_main_process())
    for step in bar:
      qs, ds = _batches(pairs, tokenize, config, step)
      params, opt_state, metrics = compiled(
          params, opt_state, rest, put(qs), put(ds), put_step(step))
      ckpt.save(step, {"params": params, "opt_state": opt_state},
                force=step == config.num_train_steps)
      if step % config.log_every_steps == 0 or step == config.num_train_steps:
        metrics = {k: float(v)
                   for k, v in distributed.to_host(metrics).items()}
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        writer.write(step, metrics)
  ckpt.wait_until_finished()
  ckpt.close()
  train_seconds = time.perf_counter() - t_train

  model, eval_mesh = evaluation_model(nnx.merge(graphdef, params, rest))
  final, final_info = evaluate_with_info(model, tokenizer, test, config,
                                         eval_mesh)
  results = {
      "data": config.data,
      "model": config.model,
      "method": config.method,
      "optimizer": config.optimizer.get("name", "adamw"),
      "optimizer_state_bytes": int(state_bytes),
      "num_train_steps": config.num_train_steps,
      "train_pairs": len(pairs),
      "test_queries": len(test.qrels),
      "test_docs": len(test.corpus),
      "zero_shot": zero_shot,
      "final": final,
      "zero_shot_info": zero_info,
      "final_info": final_info,
      "trainable_params": int(counts["trainable"]),
      "total_params": int(counts["total"]),
      "compiled_step_memory": memory,
      "train_seconds": train_seconds,
      "wall_seconds": time.perf_counter() - t_start,
      "resumed_from_step": start,
  }
  _write_json(os.path.join(workdir, "results.json"), results)
  table = format_results(results)
  extra = retrieval_models.format_extra(results)
  if extra:
    table += "\n\n" + extra
  if distributed.is_main_process():
    if retrieval_models.prefix_curve(final):
      png = retrieval_models.plot_prefix_curves(
          [results], os.path.join(workdir, "prefix_curve.png"))
      table += f"\n\nplot: {png}"
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(table + "\n")
    print(table)
  # Nobody exits (tearing down the coordinator) while others still work.
  distributed.barrier("finetune_retriever:done")
  return results


def _label(r: dict[str, Any]) -> str:
  opt = r.get("optimizer", "adamw")
  model = r.get("model", "biencoder")
  name = r["method"] if model == "biencoder" else f"{model} {r['method']}"
  return (f"{name} + {opt}" if opt != "adamw" else name) + (
      f" ({r['num_train_steps']} steps)")


def format_results(runs: dict[str, Any] | list[dict[str, Any]]) -> str:
  """A Markdown table: zero-shot, then one row per fine-tuned run."""
  runs = [runs] if isinstance(runs, dict) else list(runs)
  r0 = runs[0]
  rows = [
      f"data: {r0['data']} ({r0['train_pairs']} train pairs; "
      f"{r0['test_queries']} test queries, {r0['test_docs']} docs)",
      "",
      "| model | nDCG@10 | Recall@10 | Recall@100 | trainable params |"
      " optimizer state | step memory | train time |",
      "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  z = r0["zero_shot"]
  rows.append(
      f"| zero-shot | {z['ndcg_cut_10']:.4f} | {z['recall_10']:.4f} | "
      f"{z['recall_100']:.4f} | 0 | - | - | - |"
  )
  for r in runs:
    f = r["final"]
    mb = r["compiled_step_memory"]["total_bytes"] / 2**20
    state = r.get("optimizer_state_bytes")
    state = "-" if state is None else f"{state / 2**20:.1f} MiB"
    rows.append(
        f"| {_label(r)} | {f['ndcg_cut_10']:.4f} | {f['recall_10']:.4f} | "
        f"{f['recall_100']:.4f} | {r['trainable_params']:,} | {state} | "
        f"{mb:.0f} MiB | {r['train_seconds']:.0f} s |"
    )
  return "\n".join(rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if not flags.FLAGS["verbosity"].present:
    # orbax logs every write at INFO; the progress bar and table suffice.
    logging.set_verbosity(logging.WARNING)
  # Before anything touches devices: the mesh must see every process's.
  distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
  )
  validate_config(_CONFIG.value, config_checks.overrides(_CONFIG))
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  jax.config.config_with_absl()
  app.run(main)
