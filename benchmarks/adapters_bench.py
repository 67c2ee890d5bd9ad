r"""Every adapter variant vs plain LoRA on the MiniLM bi-encoder.

  python benchmarks/adapters_bench.py                  # both parts
  python benchmarks/adapters_bench.py --skip_finetune  # step costs only
  python benchmarks/adapters_bench.py --variants=lora,dora --finetune_steps=60

Each variant is `experiments/finetune_retriever.py`'s default config with
its `config.adapter` (all linear layers of all-MiniLM-L6-v2, rank 8 unless
noted, `variant_config`) and its peak learning rate in `config.optimizer`.

Part 1, step cost: for each variant, the binary's train step as
`lora_bench.make_train_config` builds it (`lowrank.train`: the
`BiEncoder`, `inject_from_config`, `optimizer_from_config`'s AdamW with its
warmup-cosine schedule, `make_train_step`; in-batch softmax over the
binary's first batch: 32 real (docstring, code) pairs, 32 + 128 tokens),
the trainable parameter count, the compiled memory of the fused step
(`memory_analysis()`) and the median step time relative to plain LoRA, all
variants interleaved round-robin in this one process.

Part 2, quality: a short fine-tuning run per variant on the embedded
code-search task (`experiments.finetune_retriever.train_and_evaluate` of
`variant_config`, same data order and schedule for every variant) reporting
test nDCG@10 and Recall@10 against zero-shot MiniLM.

Timings on a shared CPU are noisy: read the ratios, which compare runs that
alternate in one process, not the absolute numbers.
"""

from collections.abc import Sequence
import copy
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lora_bench  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import finetune_retriever  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.configs import finetune_retriever as ft_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from lowrank import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from lowrank.data import specs  # pylint: disable=g-import-not-at-top,wrong-import-position

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
  """One adapter configuration: `inject(method=..., **kwargs)` and its peak
  learning rate."""

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


def variant_config(
    v: Variant, config: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
  """`config` (default: the binary's) with `v`'s adapter and learning rate.

  `config.adapter` becomes `inject(method=v.method, targets=TARGETS,
  rank=RANK, alpha=rank, use_rslora=False, init="kaiming", **v.kwargs)`
  (`alpha=rank`: scale 1 unless the variant sets it); the schedule's peak is
  `v.learning_rate`.
  """
  config = copy.deepcopy(config or ft_config.get_config())
  adapter = dict(method=v.method, targets=TARGETS, rank=RANK,
                 use_rslora=False, init="kaiming")
  adapter.update(v.kwargs)
  adapter.setdefault("alpha", float(adapter["rank"]))
  config.adapter.update(adapter)
  config.optimizer.learning_rate.peak_value = v.learning_rate
  return config


def bench_steps(variants: Sequence[Variant], config,
                pairs) -> list[lora_bench.TrainConfig]:
  """Compiles each variant's step of the binary; times them round-robin."""
  mesh = sharding.make_mesh(tuple(config.mesh.items()))  # The binary's.
  runs = []
  for v in variants:
    t0 = time.perf_counter()
    runs.append(lora_bench.make_train_config(
        "minilm", lora_bench.Method(v.name), variant_config(v, config), pairs,
        mesh, stats=False))
    print(f"  compiled {v.name} in {time.perf_counter() - t0:.1f} s",
          flush=True)
  for r in range(_WARMUP.value + _STEPS.value):
    for k in range(len(runs)):  # Rotate the order every round.
      c = runs[(r + k) % len(runs)]
      dt, _ = lora_bench._run_step(c)  # pylint: disable=protected-access
      if r >= _WARMUP.value:
        c.times.append(dt)
    print(f"  round {r + 1}/{_WARMUP.value + _STEPS.value}", flush=True)
  return runs


def format_steps(runs: Sequence[lora_bench.TrainConfig]) -> str:
  base = next(c for c in runs if c.method == "lora")
  t0 = statistics.median(base.times)
  m0 = base.memory["total"]
  rows = []
  for c in runs:
    t = statistics.median(c.times)
    rows.append([
        c.method, f"{c.trainable:,}", f"{c.trainable / base.trainable:.2f}",
        f"{c.memory['total'] / 2**20:.0f}", f"{c.memory['total'] / m0:.2f}",
        f"{1e3 * t:.0f}", f"**{t / t0:.2f}**",
    ])
  return lora_bench._table(  # pylint: disable=protected-access
      ["variant", "trainable", "vs LoRA", "step MiB", "memory vs LoRA",
       "step ms (median)", "time vs LoRA"], rows)


def finetune(variants: Sequence[Variant]) -> str:
  rows, zero = [], None
  for v in variants:
    config = variant_config(v)
    steps = _FINETUNE_STEPS.value
    config.train.update(num_steps=steps, checkpoint_every=10**9,
                        log_every=max(1, steps // 5))
    # decay_steps follows train.num_steps.
    config.optimizer.learning_rate.warmup_steps = max(1, steps // 10)
    config.data.eval_max_queries = _EVAL_QUERIES.value
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
  if not flags.FLAGS["verbosity"].present:
    # orbax logs every checkpoint write at INFO; the tables suffice.
    logging.set_verbosity(logging.WARNING)
  if "lora" not in names:
    names = ["lora"] + names
  variants = [by_name[n] for n in names]
  print("## Machine\n")
  print(lora_bench.machine_info(), flush=True)
  print(f"- load average: {os.getloadavg()}")
  config = ft_config.get_config()
  pairs = specs.positive_pairs(specs.load(config.data.spec, "train"))
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
