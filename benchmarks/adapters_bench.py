r"""Every adapter variant vs plain LoRA on the MiniLM bi-encoder.

  python benchmarks/adapters_bench.py                  # both parts
  python benchmarks/adapters_bench.py --skip_finetune  # step costs only
  python benchmarks/adapters_bench.py --variants=lora,dora --finetune_steps=60

Part 1, step cost: for each variant (all linear layers of all-MiniLM-L6-v2,
the step of `experiments/finetune_retriever.py`: in-batch softmax over 32
real (docstring, code) pairs, 32 + 128 tokens, AdamW), the trainable
parameter count, the compiled train step's memory (`memory_analysis()`) and
the median step time relative to plain LoRA, all variants interleaved
round-robin in this one process.

Part 2, quality: a short fine-tuning run per variant on the embedded
code-search task (`experiments.finetune_retriever.train_and_evaluate`, same
data order and schedule for every variant) reporting test nDCG@10 and
Recall@10 against zero-shot MiniLM.

Timings on a shared CPU are noisy: read the ratios, which compare runs that
alternate in one process, not the absolute numbers.
"""

from collections.abc import Sequence
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from absl import app
from absl import flags
from flax import nnx
import jax
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lora_bench  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import finetune_retriever  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.configs import finetune_retriever as ft_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from lowrank import adapters  # pylint: disable=g-import-not-at-top,wrong-import-position
from lowrank import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from lowrank.data import code_search  # pylint: disable=g-import-not-at-top,wrong-import-position
from lowrank.models import bert  # pylint: disable=g-import-not-at-top,wrong-import-position
from lowrank.retrieval import losses  # pylint: disable=g-import-not-at-top,wrong-import-position

_VARIANTS = flags.DEFINE_list(
    "variants", None, "Variant names to run (default: all in VARIANTS)."
)
# `--steps` / `--warmup` (timed / untimed steps per variant) are the flags
# that lora_bench (imported above) defines.
_STEPS = lora_bench._STEPS  # pylint: disable=protected-access
_WARMUP = lora_bench._WARMUP  # pylint: disable=protected-access
_SKIP_STEP = flags.DEFINE_bool("skip_step", False, "Skip part 1.")
_SKIP_FINETUNE = flags.DEFINE_bool("skip_finetune", False, "Skip part 2.")
_FINETUNE_STEPS = flags.DEFINE_integer(
    "finetune_steps", 100, "Training steps per variant in part 2."
)
_EVAL_QUERIES = flags.DEFINE_integer(
    "eval_queries", 0, "Test queries in part 2 (0 = all 1,100)."
)

TARGETS = r".*\.(query|key|value|dense)"
RANK = 8


@dataclasses.dataclass(frozen=True)
class Variant:
  """One adapter configuration: `inject(method=..., **kwargs)`."""

  name: str
  method: str
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  learning_rate: float = 1e-3


VARIANTS = (
    Variant("lora", "lora", dict(alpha=16.0)),
    Variant("rslora", "lora", dict(alpha=16.0, use_rslora=True)),
    Variant("dora", "dora", dict(alpha=16.0)),
    Variant("pissa", "lora", dict(alpha=8.0, init="pissa")),
    Variant("olora", "lora", dict(alpha=8.0, init="olora")),
    Variant("vera", "vera", dict(rank=256), learning_rate=1e-2),
    Variant("nola", "nola", dict(alpha=16.0), learning_rate=1e-2),
    Variant("randlora", "randlora", dict(rank=32), learning_rate=1e-2),
    Variant("lora_xs", "lora_xs", dict(rank=32), learning_rate=1e-3),
    Variant("loldu", "loldu", dict(rank=32), learning_rate=1e-2),
    Variant("dylora", "dylora", dict(alpha=16.0)),
    Variant("adalora", "adalora", dict(rank=12, alpha=16.0)),
    Variant("sora", "sora", dict(alpha=16.0)),
    Variant("increlora", "increlora", dict(alpha=16.0)),
)


def _inject_kwargs(v: Variant) -> dict[str, Any]:
  kwargs = dict(rank=RANK)
  kwargs.update(v.kwargs)
  return kwargs


@dataclasses.dataclass
class StepRun:
  name: str
  trainable: int
  memory: dict[str, int]
  step: Any
  params: Any
  opt_state: Any
  times: list[float] = dataclasses.field(default_factory=list)


def build_step(v: Variant, config, pairs) -> StepRun:
  """Model with the variant's adapters, AdamW, the compiled donated step."""
  with sharding.use_mesh():
    model, tokenizer = lora_bench._build_model("minilm")  # pylint: disable=protected-access
    adapters.inject(model, targets=TARGETS, method=v.method, rngs=0,
                    **_inject_kwargs(v))
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
  qs, ds = lora_bench._train_batch(tokenizer, config, pairs)  # pylint: disable=protected-access
  tx = optax.adamw(v.learning_rate)
  opt_state = jax.jit(tx.init)(params)

  def loss_fn(params, rest, qs, ds):
    m = nnx.merge(graphdef, params, rest)
    q = bert.encode(m, qs, pooling=config.pooling, normalize=True)
    d = bert.encode(m, ds, pooling=config.pooling, normalize=True)
    return losses.in_batch_softmax(q, d, config.scale)

  def train_step(params, opt_state, rest, qs, ds):
    loss, grads = jax.value_and_grad(loss_fn)(params, rest, qs, ds)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(
      params, opt_state, rest, qs, ds).compile()
  return StepRun(
      name=v.name,
      trainable=sum(x.size for x in jax.tree.leaves(params)),
      memory=lora_bench.compiled_memory(compiled),
      step=lambda p, o: compiled(p, o, rest, qs, ds),
      params=params,
      opt_state=opt_state,
  )


def bench_steps(variants: Sequence[Variant], config, pairs) -> list[StepRun]:
  runs = []
  for v in variants:
    t0 = time.perf_counter()
    runs.append(build_step(v, config, pairs))
    print(f"  compiled {v.name} in {time.perf_counter() - t0:.1f} s",
          flush=True)
  for r in range(_WARMUP.value + _STEPS.value):
    for k in range(len(runs)):  # Rotate the order every round.
      c = runs[(r + k) % len(runs)]
      t0 = time.perf_counter()
      c.params, c.opt_state, loss = c.step(c.params, c.opt_state)
      jax.block_until_ready((c.params, loss))
      if r >= _WARMUP.value:
        c.times.append(time.perf_counter() - t0)
    print(f"  round {r + 1}/{_WARMUP.value + _STEPS.value}", flush=True)
  return runs


def format_steps(runs: Sequence[StepRun]) -> str:
  base = next(c for c in runs if c.name == "lora")
  t0 = statistics.median(base.times)
  m0 = base.memory["total"]
  rows = []
  for c in runs:
    t = statistics.median(c.times)
    rows.append([
        c.name, f"{c.trainable:,}", f"{c.trainable / base.trainable:.2f}",
        f"{c.memory['total'] / 2**20:.0f}", f"{c.memory['total'] / m0:.2f}",
        f"{1e3 * t:.0f}", f"**{t / t0:.2f}**",
    ])
  return lora_bench._table(  # pylint: disable=protected-access
      ["variant", "trainable", "vs LoRA", "step MiB", "memory vs LoRA",
       "step ms (median)", "time vs LoRA"], rows)


def finetune(variants: Sequence[Variant]) -> str:
  rows, zero = [], None
  for v in variants:
    config = ft_config.get_config()
    config.num_train_steps = _FINETUNE_STEPS.value
    config.warmup_steps = max(1, _FINETUNE_STEPS.value // 10)
    config.checkpoint_every_steps = 10**9
    config.log_every_steps = max(1, _FINETUNE_STEPS.value // 5)
    config.eval_max_queries = _EVAL_QUERIES.value
    config.method = v.method
    config.optimizer.learning_rate = v.learning_rate
    kwargs = _inject_kwargs(v)
    config.adapter.rank = kwargs.pop("rank")
    config.adapter.alpha = float(kwargs.pop("alpha", config.adapter.rank))
    config.adapter.use_rslora = kwargs.pop("use_rslora", False)
    config.adapter.init = kwargs.pop("init", "kaiming")
    config.adapter.options = kwargs
    with tempfile.TemporaryDirectory() as workdir:
      r = finetune_retriever.train_and_evaluate(config, workdir)
    zero = r["zero_shot"]
    f = r["final"]
    rows.append([
        v.name, f"{r['trainable_params']:,}", f"{f['ndcg_cut_10']:.4f}",
        f"{f['recall_10']:.4f}", f"{r['train_seconds']:.0f}",
    ])
  rows.insert(0, ["zero-shot MiniLM", "0", f"{zero['ndcg_cut_10']:.4f}",
                  f"{zero['recall_10']:.4f}", "-"])
  return lora_bench._table(  # pylint: disable=protected-access
      ["variant", "trainable", "nDCG@10", "Recall@10", "train s"], rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  names = _VARIANTS.value or [v.name for v in VARIANTS]
  by_name = {v.name: v for v in VARIANTS}
  unknown = sorted(set(names) - set(by_name))
  if unknown:
    raise app.UsageError(f"Unknown variants {unknown}; known {sorted(by_name)}")
  if "lora" not in names:
    names = ["lora"] + names
  variants = [by_name[n] for n in names]
  print("## Machine\n")
  print(lora_bench.machine_info(), flush=True)
  print(f"- load average: {os.getloadavg()}")
  config = ft_config.get_config()
  pairs = list(code_search.load_code_search("train").train_pairs)[
      : config.batch_size]
  if not _SKIP_STEP.value:
    runs = bench_steps(variants, config, pairs)
    print(f"\n## Part 1: train step, {_STEPS.value} timed steps each "
          f"(rank {RANK} unless noted, all linear layers)\n")
    print(format_steps(runs), flush=True)
  if not _SKIP_FINETUNE.value:
    print(f"\n## Part 2: {_FINETUNE_STEPS.value}-step fine-tune on code "
          "search\n", flush=True)
    print(finetune(variants))
  print(f"- load average at end: {os.getloadavg()}")


if __name__ == "__main__":
  app.run(main)
