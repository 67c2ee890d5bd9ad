r"""Pretrains a LLaMA-style decoder with each low-rank method; compares them.

  python -m experiments.pretrain_lm --workdir=$WORKDIR \
      --config=experiments/configs/pretrain_lm.py

The small-scale analogue of the GaLore paper's Table 2 (arXiv:2403.03507):
every method of the config trains the same decoder from the same init on the
same batches of byte tokens through `lowrank.train` (ReLoRA's restarts are
the loop's `before_step` hook). The workdir gets `<method>/` (checkpoints: a
rerun resumes, a finished method is skipped; metrics; `results.json`),
`results.json`, `results.md` (perplexity vs memory) and `loss_curves.png`.
"""

import functools
import math
import os
import time
from typing import Any

from flax import nnx
import jax
import ml_collections
import numpy as np

from experiments import common_flags
from experiments import config_checks
from experiments.configs import pretrain_lm as config_lib
from lowrank import metric_writers
from lowrank import sharding
from lowrank import spectral
from lowrank import train
from lowrank.data import byte_corpus
from lowrank.models import llama

common_flags.config_and_workdir()

METHODS = config_lib.ALL_METHODS
LABELS = dict(zip(METHODS, ("Full-Adam", "LoRA", "ReLoRA", "GaLore", "Fira",
                            "FRUGAL", "Q-GaLore", "SST", "SLTrain")))
_JAGGED = "jagged_cosine_schedule"


def load_data(config: ml_collections.ConfigDict):
  """`(corpus name, train tokens, validation batches)` of `config.data`
  (`lowrank.data.byte_corpus.load`)."""
  d, check = config.data, config_checks.Checker(config)
  return check.call("data.spec", lambda: byte_corpus.load(
      d.spec, val_fraction=d.val_fraction, seq_len=d.seq_len,
      batch_size=config.train.batch_size, eval_batches=d.eval_batches))


def train_batch(tokens: np.ndarray, step: int,
                config: ml_collections.ConfigDict) -> np.ndarray:
  """The batch of `step` (1-based): random windows, a function of the step."""
  rng = np.random.default_rng([config.seed, step])
  n = config.data.seq_len
  starts = rng.integers(0, len(tokens) - n, size=config.train.batch_size)
  return np.stack([tokens[s:s + n] for s in starts])


def model_config(config: ml_collections.ConfigDict) -> llama.LlamaConfig:
  """The decoder: `config.model`'s dims, byte vocabulary, list layers."""
  return llama.LlamaConfig(
      vocab_size=256, max_position=max(config.data.seq_len, 16),
      scan_layers=False, **config.model.to_dict())


def validate_config(config: ml_collections.ConfigDict,
                    overrides: dict[str, Any] | None = None) -> list[str]:
  """Checks the config before anything is loaded; returns the methods.

  Raises ValueError, TypeError or FileNotFoundError on a bad config or an
  `overrides` key (`config_checks.overrides`) that no selected method reads.
  """
  methods = [m.strip() for m in (
      METHODS if config.methods == "all" else config.methods.split(","))]
  if len(set(methods)) < len(methods) or not set(methods) <= set(METHODS):
    raise ValueError(f"config.methods={config.methods!r} has unknown or "
                     "duplicate methods; expected 'all' or a comma-separated"
                     f" subset of {list(METHODS)}.")
  if missing := [m for m in methods if m not in config.optimizer]:
    raise ValueError(f"config.optimizer has no section for {missing}; add "
                     "one (the factory's arguments) or drop the method.")
  check = config_checks.validate_common(config, config_lib.get_config(),
                                        splits=None, first_devices=True)
  check.call("data.spec", byte_corpus.files, config.data.spec)
  check.positive_int("rank", "data.seq_len", "data.eval_batches")
  check.in_range("data.val_fraction", 0.0, 1.0, low_closed=False)
  try:
    model_config(config)
  except (ValueError, TypeError) as e:
    raise type(e)(f"config.model: {e} Fix --config.model.*.") from None
  lr = config.optimizer.get("relora", {}).get("learning_rate")
  if "relora" in methods and getattr(lr, "schedule", "") != _JAGGED:
    raise ValueError(
        "config.optimizer.relora.learning_rate must be a dict with schedule="
        f"{_JAGGED!r} (its refresh_every is the restart interval); found "
        f"{lr!r}.")
  if "relora" in methods:
    check.in_range("restart.prune_ratio", 0.0, 1.0)
  why = f"none of which is in methods={config.methods!r}"
  unused = {f"{s}.{n}": f"it is read by [{n!r}], {why}" for n in METHODS
            if n not in methods for s in ("optimizer", "adapter")}
  if "relora" not in methods:
    unused["restart"] = f"it is read by ['relora'], {why}"
  config_checks.unused_overrides(config, overrides or {}, unused)
  return methods


def build(config: ml_collections.ConfigDict, method: str, model: nnx.Module):
  """Applies `method` to `model` (in place); returns `(wrt, tx)`."""
  wrt, section = nnx.Param, config.adapter.get(method)
  if method in ("lora", "relora"):
    train.inject_from_config(model, section, rngs=config.seed + 1)
    wrt = spectral.relora_trainable()
  elif method == "sst":
    spectral.to_sst(model, **section.to_dict())
  elif method == "sltrain":
    spectral.to_sltrain(model, **section.to_dict(), rngs=config.seed + 1)
  return wrt, train.optimizer_from_config(config.optimizer[method],
                                          model=model)


def _loss(model, tokens):
  return llama.next_token_loss(model(tokens), tokens)


_eval_loss = nnx.jit(_loss)


def train_method(config, method, workdir, train_tokens, val, mesh):
  """Trains (or resumes, or skips if finished) one method; returns results."""
  path, t = os.path.join(workdir, "results.json"), config.train
  done = metric_writers.read_json(path) or {}
  if done.get("num_train_steps") == t.num_steps:
    return done
  t_start, lr = time.perf_counter(), config.optimizer[method].learning_rate
  model = llama.LLaMA(model_config(config), rngs=nnx.Rngs(config.seed))
  wrt, tx = build(config, method, model)
  total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

  def eval_fn(model):
    loss = float(np.mean([_eval_loss(model, b) for b in val]))
    return {"val_loss": loss, "val_ppl": math.exp(loss)}

  def restart(step, model, opt_state):  # ReLoRA's before_step.
    if step == 1 or (step - 1) % lr.refresh_every:
      return opt_state
    # At the start of the next step, so checkpoints hold the pre-restart
    # state and a resumed run restarts where an uninterrupted one does.
    key = jax.random.fold_in(jax.random.key(config.seed), step - 1)
    return spectral.relora_restart(model, opt_state, key,
                                   **config.restart.to_dict())

  fit = train.fit(
      model, wrt, _loss, tx, t, workdir=workdir, mesh=mesh, eval_fn=eval_fn,
      batch_fn=functools.partial(train_batch, train_tokens, config=config),
      before_step=restart if method == "relora" else None, save_rest=True,
      desc=f"{LABELS[method]:>9}")
  rows = metric_writers.read_csv(os.path.join(workdir, "metrics.csv"))
  results = {
      "method": method, "label": LABELS[method],
      "num_train_steps": t.num_steps, "learning_rate": lr.peak_value,
      "final_train_loss": [r["loss"] for r in rows if "loss" in r][-1],
      **fit.loop.last_eval, "trainable_params": fit.trainable_params,
      "total_params": int(total), "optimizer_state_bytes": fit.opt_state_bytes,
      "compiled_step_memory": fit.memory,
      "train_seconds": fit.loop.train_seconds,
      "wall_seconds": time.perf_counter() - t_start,
      "resumed_from_step": fit.loop.start_step}
  metric_writers.write_json(path, results)
  return results


_MEMORY = {"optimizer state": lambda r: r["optimizer_state_bytes"],
           "step memory": lambda r: r["compiled_step_memory"]["total_bytes"]}


def format_results(results: list[dict[str, Any]], info: dict[str, Any]) -> str:
  """A Markdown table, one row per method (ratios to Full-Adam)."""
  full = next((r for r in results if r["method"] == "full"), None)

  def mib(r, size):
    return f"{size(r) / 2**20:.2f} MiB" + (
        f" ({size(r) / size(full):.2f}×)" if full and r is not full else "")
  return "; ".join(f"{k} {v}" for k, v in info.items()) + "\n\n" + (
      metric_writers.markdown_table(
          ["method", "val ppl", "val loss", "trainable params", *_MEMORY,
           "wall time"],
          [[r["label"], f"{r['val_ppl']:.3f}", r["val_loss"],
            f"{r['trainable_params']:,}", *map(functools.partial(mib, r),
                                                _MEMORY.values()),
            f"{r['wall_seconds']:.0f} s"] for r in results]))


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Runs (or resumes) every selected method; writes the table and plots.

  Returns `{"info": ..., "results": [per method]}`; raises on a bad config.
  """
  methods = validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  corpus, train_tokens, val = load_data(config)
  mesh = train.mesh_from_config(config.mesh)
  with sharding.use_mesh(mesh):
    results = [train_method(config, m, os.path.join(workdir, m),
                            train_tokens, val, mesh) for m in methods]
  info = dict(corpus=corpus, train_tokens=len(train_tokens),
              val_windows=len(val) * config.train.batch_size,
              rank=config.rank, **config.model, **config.data, **config.train,
              backend=jax.default_backend())
  out = {"info": info, "results": results}
  table = metric_writers.write_results(workdir, out,
                                       format_results(results, info))
  metric_writers.plot_metrics(
      {LABELS[m]: os.path.join(workdir, m, "metrics.csv") for m in methods},
      ["loss", "val_ppl"], os.path.join(workdir, "loss_curves.png"),
      title="byte-level LM pretraining")
  print(table)
  return out


if __name__ == "__main__":
  common_flags.run_main(train_and_evaluate, validate_config)
