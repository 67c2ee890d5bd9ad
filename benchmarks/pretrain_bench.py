r"""Pretraining methods on the GaLore paper's 60M LLaMA: memory and step time.

  python benchmarks/pretrain_bench.py            # 60M config, batch 4 x 128
  python benchmarks/pretrain_bench.py --smoke    # tiny model, seconds

For Full-Adam, LoRA, ReLoRA, GaLore, SST and SLTrain (rank 128 = d/4 on
every attention/MLP projection, as in the paper's 60M row), built exactly as
`experiments/pretrain_lm.py` builds them (`pretrain_lm.build`, the same
targets and optimizer sections), prints in one process, as ratios to
Full-Adam:

* optimizer-state bytes (`lowrank.optim.state_bytes`);
* trainable parameters;
* compiled train-step memory (`memory_analysis()`: argument + output +
  temp − alias; exact);
* median train-step wall time, the methods interleaved round by round.

ReLoRA's step is LoRA's step (its merge-and-restart runs every few thousand
steps outside the jitted step), so its time row is measured the same way.
Perplexity at equal tokens is `experiments/pretrain_lm.py`'s job.
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from experiments import pretrain_lm
from experiments.configs import pretrain_lm as config_lib
from lowrank import optim
from lowrank import sharding
from lowrank import train
from lowrank.models import llama

METHODS = ("full", "lora", "relora", "galore", "sst", "sltrain")


def build(config, method, model_cfg):
  """`(graphdef, params, rest, tx)` for one method on `model_cfg`."""
  model = llama.LLaMA(model_cfg, rngs=nnx.Rngs(0))
  wrt, tx = pretrain_lm.build(config, method, model)
  return (*train.split(model, wrt), tx)


def _loss(model, tokens):
  return llama.next_token_loss(model(tokens), tokens)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=128)
  args = ap.parse_args()
  config = config_lib.get_config("smoke" if args.smoke else None)
  if args.smoke:
    model_cfg = llama.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2,
        num_heads=4, max_position=args.seq, scan_layers=False)
    rank = 16
  else:
    model_cfg = llama.LlamaConfig.galore_60m(scan_layers=False,
                                             max_position=args.seq)
    rank = 128
  with config.unlocked():
    config.rank = rank
    config.train.num_steps = 10000
  tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0,
                              model_cfg.vocab_size)
  rows, runners = {}, {}
  mesh = sharding.make_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)])
  with sharding.use_mesh(mesh):
    for method in METHODS:
      graphdef, params, rest, tx = build(config, method, model_cfg)
      state = train.init_opt_state(tx, params)
      # The fused one-jit step: what a device holds and runs.
      step = train.make_train_step(graphdef, _loss, tx, split=False).fused
      compiled = step.lower(params, state, rest, tokens).compile()
      mem = optim.compiled_memory(compiled)
      rows[method] = {
          "state": optim.state_bytes(state),
          "trainable": sum(x.size for x in jax.tree.leaves(params)),
          "step_mem": mem["total_bytes"], "times": []}
      params, state, _ = compiled(params, state, rest, tokens)  # Warm-up.
      runners[method] = [compiled, params, state, rest]
      print(f"compiled {method}", file=sys.stderr, flush=True)
    start = time.time()
    load0 = os.getloadavg()
    for _ in range(args.rounds):
      for method, run in runners.items():
        compiled, params, state, rest = run
        t0 = time.perf_counter()
        params, state, loss = compiled(params, state, rest, tokens)
        jax.block_until_ready((params, state, loss))
        rows[method]["times"].append(time.perf_counter() - t0)
        run[1], run[2] = params, state
  now = datetime.datetime.now(datetime.timezone.utc)
  print(f"# pretrain_bench {now:%Y-%m-%d %H:%M} UTC; "
        f"{platform.platform()} {os.cpu_count()} cpus; jax {jax.__version__}; "
        f"model {'smoke' if args.smoke else '60m'} rank {rank}, batch "
        f"{args.batch} x {args.seq}, {args.rounds} rounds "
        f"({time.time() - start:.0f} s); load {load0[0]:.1f} -> "
        f"{os.getloadavg()[0]:.1f}\n")
  base = rows["full"]
  med = lambda r: statistics.median(r["times"])
  print("| method | optimizer state MiB | vs Full | trainable params | vs Full "
        "| step memory MiB | vs Full | step ms (min–max) | vs Full |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for method, r in rows.items():
    print(f"| {method} | {r['state'] / 2**20:.1f} | "
          f"{r['state'] / base['state']:.3f} | {r['trainable']:,} | "
          f"{r['trainable'] / base['trainable']:.3f} | "
          f"{r['step_mem'] / 2**20:.0f} | "
          f"{r['step_mem'] / base['step_mem']:.3f} | "
          f"{1e3 * med(r):.0f} ({1e3 * min(r['times']):.0f}–"
          f"{1e3 * max(r['times']):.0f}) | {med(r) / med(base):.3f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
