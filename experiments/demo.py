r"""The main job: MiniLM fine-tuned with LoRA and with GaLore, side by side.

  python -m experiments.demo --workdir=workdir/demo
  python -m experiments.demo --workdir=workdir/demo_scifact \
      --config=experiments/configs/finetune_retriever.py:demo \
      --config.data.spec=beir:../shared/data/beir/scifact

Runs `experiments.finetune_retriever.train_and_evaluate` once per entry of
`config.demo.runs` (default: `lora` — rank-8 LoRA with AdamW — and `galore` —
all weights trained with GaLore-AdamW, whose optimizer state is low-rank),
each in `workdir/<run>/` (rerunning resumes or skips finished runs), then
writes `workdir/results.md` (zero-shot vs each run: nDCG@10, Recall@10/100,
trainable parameters, optimizer-state bytes, compiled step memory, train
time) and `workdir/demo.png` (training-loss curves; nDCG@10 against
optimizer-state size). `--config.data.spec=beir:<dir>` runs it on any
BEIR-format directory instead of the embedded stdlib code-search task.
"""

import os
import shutil
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections

from experiments import config_checks
from experiments import finetune_retriever
from experiments.configs import finetune_retriever as config_lib
from lowrank import metric_writers

# The same --config / --workdir flags as experiments.finetune_retriever
# (defined there); without --config the `demo` preset is used.

RUNS = ("lora", "galore", "full")


def run_config(config: ml_collections.ConfigDict,
               run: str) -> ml_collections.ConfigDict:
  """`config` specialised to one demo run.

  Raises:
    ValueError: On an unknown run name.
  """
  c = ml_collections.ConfigDict(config.to_dict())
  with c.unlocked():
    if run not in RUNS:
      raise ValueError(f"Unknown demo run {run!r}; expected one of {RUNS}.")
    # lora: adapters + AdamW; galore: all weights, low-rank optimizer state
    # (config.demo.galore); full: all weights, full AdamW state.
    c.adapter.method = "lora" if run == "lora" else "full"
    if run == "galore":
      c.optimizer.update(config.demo.galore)
    c.optimizer.learning_rate.peak_value = config.demo[f"{run}_learning_rate"]
  return c


def validate_config(config: ml_collections.ConfigDict,
                    overrides: dict[str, Any] | None = None) -> list[str]:
  """Checks the config of every run before any of them starts.

  Args:
    config: The demo config (`experiments/configs/finetune_retriever.py`).
    overrides: The `--config.<key>` flags given on the command line; each
      must be read by at least one run (the demo sets `adapter.method`,
      the optimizer and its peak learning rate per run itself).

  Returns:
    The run names of `config.demo.runs`.

  Raises:
    ValueError: On an unknown, repeated or missing run name, or any error
      of `finetune_retriever.validate_config` for one of the runs.
  """
  runs = [r.strip() for r in config.demo.runs.split(",") if r.strip()]
  for r in runs:
    if r not in RUNS:
      raise ValueError(f"Unknown demo run {r!r}; expected some of {RUNS}.")
  if not runs or len(set(runs)) != len(runs):
    raise ValueError(
        f"config.demo.runs must name each run at most once and at least one "
        f"of {RUNS}; found {config.demo.runs!r}. Set e.g. "
        f"--config.demo.runs=lora,galore.")
  config_checks.Checker(config).positive_number(
      *(f"demo.{r}_learning_rate" for r in runs))
  run_configs = [run_config(config, r) for r in runs]
  for c in run_configs:
    finetune_retriever.validate_config(c)
  if overrides:
    per_run = "the demo sets it per run (demo.runs)"
    own = {"adapter.method": per_run, "optimizer.name": per_run,
           "optimizer.learning_rate.peak_value": (
               f"{per_run}; use --config.demo.<run>_learning_rate")}
    own.update({f"demo.{r}_learning_rate": f"{r!r} is not in demo.runs"
                for r in RUNS if r not in runs})
    unused = []
    for c in run_configs:
      u = finetune_retriever.unused_keys(c)
      del u["demo"]
      unused.append({**own, **u})
    config_checks.unused_overrides(config, overrides, *unused)
  return runs


def run_demo(config: ml_collections.ConfigDict,
             workdir: str) -> list[dict[str, Any]]:
  """Trains and evaluates every run; returns their results."""
  runs = validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  results, zero_shot = [], None
  dirs = [os.path.join(workdir, r) for r in runs]
  for r, wd in zip(runs, dirs):
    os.makedirs(wd, exist_ok=True)
    if zero_shot and not os.path.exists(os.path.join(wd, "zero_shot.json")):
      shutil.copy(zero_shot, os.path.join(wd, "zero_shot.json"))
    c = run_config(config, r)
    res = metric_writers.read_json(os.path.join(wd, "results.json"))
    if res is None or res["num_train_steps"] != c.train.num_steps:
      res = finetune_retriever.train_and_evaluate(c, wd)
    zero_shot = os.path.join(wd, "zero_shot.json")
    results.append(res)
  table = finetune_retriever.format_results(results)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(table + "\n")
    csvs = [os.path.join(wd, "metrics.csv") for wd in dirs]
    labels = [finetune_retriever.run_label(r) for r in results]
    png = metric_writers.plot_curves_and_points(
        {label: metric_writers.read_csv(p) if os.path.exists(p) else []
         for label, p in zip(labels, csvs)}, "loss",
        {label: (r["optimizer_state_bytes"] / 2**20, r["final"]["ndcg_cut_10"])
         for label, r in zip(labels, results)},
        os.path.join(workdir, "demo.png"),
        curve_label="training loss (in-batch softmax)",
        points_labels=("optimizer state (MiB)", "nDCG@10 (test)"),
        reference=("zero-shot", results[0]["zero_shot"]["ndcg_cut_10"]),
        title=f"all-MiniLM-L6-v2 on {results[0]['data']}")
    print("\n" + table + f"\n\nplot: {png}")
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config = flags.FLAGS["config"].value or config_lib.get_config("demo")
  validate_config(config, config_checks.overrides(flags.FLAGS["config"]))
  run_demo(config, flags.FLAGS["workdir"].value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  jax.config.config_with_absl()
  app.run(main)
