r"""Pretrains a LLaMA-style decoder with each low-rank method; compares them.

  python -m experiments.pretrain_lm --workdir=$WORKDIR \
      --config=experiments/configs/pretrain_lm.py

The small-scale analogue of Table 2 of the GaLore paper (Zhao et al. 2024,
https://arxiv.org/abs/2403.03507): every method trains the same decoder
(`lowrank.models.llama`, list layer layout so that adapters can wrap the
layers) from the same initialisation on the same batches (equal tokens),
and every low-rank method uses the same rank `config.rank`:

* `full`: AdamW on every parameter.
* `lora`: LoRA adapters (`lowrank.adapters.inject`) on the attention/MLP
  projections, whose random-init base weights stay frozen; embeddings,
  norms and the head train (as in the ReLoRA/GaLore baselines).
* `relora`: the same plus merge-and-restart every `relora.refresh_every`
  steps with magnitude-pruned moments and a jagged cosine schedule
  (Lialin et al. 2023, https://arxiv.org/abs/2307.05695).
* `galore`, `fira`, `frugal`, `q_galore`: full-rank weights with the
  optimizer state in a rank-r gradient subspace of every projection
  (`lowrank.optim`); embeddings and head get plain AdamW.
* `sst`: Sparse Spectral Training (`lowrank.spectral.sst`).
* `sltrain`: sparse plus low-rank projections (`lowrank.spectral.sltrain`).

Data: a byte-level tokenisation (vocabulary 256) of a real text corpus:
../shared/data/lm/tinyshakespeare when present, else gensim's embedded Lee
news corpus (read by path; gensim is never imported). The last
`val_fraction` of the bytes is the validation split; perplexity is
`exp(mean next-byte cross-entropy)` over fixed validation windows.

Per method the workdir gets `<method>/` with orbax checkpoints (a rerun
resumes; a finished method is skipped), `metrics.csv`/`metrics.jsonl` and
TensorBoard events. The workdir gets `results.json`, `results.md` (the
table), `loss_curves.png` and `ppl_vs_memory.png`.
"""

import functools
import importlib.util
import json
import math
import os
import pathlib
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
from experiments.configs import pretrain_lm as config_lib
from lowrank import adapters
from lowrank import checkpoint
from lowrank import metric_writers
from lowrank import optim
from lowrank import sharding
from lowrank.models import llama
from lowrank.optim import projection
from lowrank.optim import quantize
from lowrank.spectral import relora
from lowrank.spectral import sltrain
from lowrank.spectral import sst

_CONFIG, _WORKDIR = common_flags.config_and_workdir()

METHODS = ("full", "lora", "relora", "galore", "fira", "frugal", "q_galore",
           "sst", "sltrain")
LABELS = {"full": "Full-Adam", "lora": "LoRA", "relora": "ReLoRA",
          "galore": "GaLore", "fira": "Fira", "frugal": "FRUGAL",
          "q_galore": "Q-GaLore", "sst": "SST", "sltrain": "SLTrain"}
VOCAB_SIZE = 256  # Bytes.
_TINYSHAKESPEARE = pathlib.Path("data", "lm", "tinyshakespeare", "input.txt")


# ----------------------------------------------------------------------------
# Data.


def shared_dir() -> pathlib.Path:
  """`$LOWRANK_SHARED_DIR`, else `../shared` next to the repository."""
  env = os.environ.get("LOWRANK_SHARED_DIR")
  if env:
    return pathlib.Path(env)
  return pathlib.Path(__file__).resolve().parents[2] / "shared"


def _gensim_test_data() -> pathlib.Path:
  spec = importlib.util.find_spec("gensim")
  if spec is None or not spec.submodule_search_locations:
    raise ValueError(
        "The embedded corpus needs the gensim wheel's test data (installed "
        "by the Makefile as gensim==4.4.0 --no-deps); it is not installed."
    )
  return pathlib.Path(list(spec.submodule_search_locations)[0], "test",
                      "test_data")


def load_corpus(spec: str) -> tuple[str, bytes]:
  """`(name, UTF-8 bytes)` of the corpus `spec`.

  Args:
    spec: `"auto"` (tinyshakespeare if present, else Lee), `"tinyshakespeare"`,
      `"lee"` (gensim's Lee background + Lee test corpus) or `"file:<path>"`.

  Returns:
    The corpus name and its bytes.

  Raises:
    ValueError: On an unknown spec or a missing file.
  """
  if spec == "auto":
    path = shared_dir() / _TINYSHAKESPEARE
    return load_corpus("tinyshakespeare" if path.exists() else "lee")
  if spec == "tinyshakespeare":
    path = shared_dir() / _TINYSHAKESPEARE
    if not path.exists():
      raise ValueError(f"{path} not found (needs ../shared/data).")
    return "tinyshakespeare", path.read_bytes()
  if spec == "lee":
    root = _gensim_test_data()
    parts = [(root / n).read_bytes() for n in ("lee_background.cor",
                                                "lee.cor")]
    return "gensim lee", b"".join(parts)
  if spec.startswith("file:"):
    path = pathlib.Path(spec.split(":", 1)[1])
    if not path.is_file():
      raise ValueError(f"Corpus file {path} not found.")
    return path.name, path.read_bytes()
  raise ValueError(
      f"Unknown data spec {spec!r}; expected 'auto', 'tinyshakespeare', "
      "'lee' or 'file:<path>'."
  )


def split_tokens(
    data: bytes, val_fraction: float, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
  """Byte tokens, split into (train, validation) by position.

  Raises:
    ValueError: If either split is shorter than one window.
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}.")
  tokens = np.frombuffer(data, np.uint8).astype(np.int32)
  cut = int(round(len(tokens) * (1.0 - val_fraction)))
  train, val = tokens[:cut], tokens[cut:]
  if min(len(train), len(val)) <= seq_len:
    raise ValueError(
        f"Corpus of {len(tokens)} bytes is too short for seq_len {seq_len}: "
        f"train {len(train)}, validation {len(val)} tokens."
    )
  return train, val


def train_batch(
    tokens: np.ndarray, step: int, config: ml_collections.ConfigDict
) -> np.ndarray:
  """The batch of `step` (1-based): random windows, a function of the step."""
  rng = np.random.default_rng([config.seed, step])
  starts = rng.integers(0, len(tokens) - config.seq_len,
                        size=config.batch_size)
  return np.stack([tokens[s:s + config.seq_len] for s in starts])


def val_batches(
    tokens: np.ndarray, config: ml_collections.ConfigDict
) -> list[np.ndarray]:
  """Non-overlapping validation windows, evenly spread, in full batches."""
  n_win = len(tokens) // config.seq_len
  n = min(n_win, config.eval_batches * config.batch_size)
  n -= n % config.batch_size
  if n == 0:
    raise ValueError(
        f"Validation split ({len(tokens)} tokens) holds fewer than "
        f"batch_size={config.batch_size} windows of {config.seq_len}."
    )
  idx = np.linspace(0, n_win - 1, n).astype(np.int64) * config.seq_len
  windows = np.stack([tokens[s:s + config.seq_len] for s in idx])
  return list(windows.reshape(-1, config.batch_size, config.seq_len))


# ----------------------------------------------------------------------------
# Models and optimizers.


def parse_methods(spec: str) -> list[str]:
  """`"all"` or a comma-separated list -> validated method names."""
  if spec == "all":
    return list(METHODS)
  names = [m.strip() for m in spec.split(",") if m.strip()]
  bad = [m for m in names if m not in METHODS]
  if bad or not names:
    raise ValueError(
        f"Unknown method(s) {bad or spec!r}; expected 'all' or a "
        f"comma-separated subset of {list(METHODS)}."
    )
  if len(set(names)) != len(names):
    raise ValueError(f"Duplicate methods in {spec!r}.")
  return names


def validate_config(config: ml_collections.ConfigDict,
                    overrides: dict[str, Any] | None = None) -> list[str]:
  """Checks the config; returns the methods to run.

  Args:
    config: The experiment config.
    overrides: The `--config.<key>` flags given on the command line
      (`config_checks.overrides`); each must be one the selected methods
      read.

  Raises:
    ValueError: On an unknown method, key or name, an inconsistent setting
      or an override no selected method reads.
    TypeError: On a value of the wrong type.
    FileNotFoundError: On a corpus file that does not exist.
  """
  methods = parse_methods(config.methods)
  for name in ("num_train_steps", "batch_size", "seq_len", "rank",
               "eval_every_steps", "log_every_steps", "eval_batches",
               "checkpoint_every_steps"):
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{name} must be a positive int; got {value!r}.")
  if not 0 <= config.warmup_steps < config.num_train_steps:
    raise ValueError(
        f"warmup_steps ({config.warmup_steps}) must be in "
        f"[0, num_train_steps={config.num_train_steps})."
    )
  d = config.model.hidden_size
  if config.rank >= min(d, config.model.intermediate_size):
    raise ValueError(
        f"rank ({config.rank}) must be < min(hidden_size, "
        f"intermediate_size) = {min(d, config.model.intermediate_size)}."
    )
  missing = [m for m in methods if m not in config.lr]
  if missing:
    raise ValueError(f"config.lr has no learning rate for {missing}.")
  _check_values(config, methods, overrides)
  return methods


_GALORE_FAMILY = ("galore", "fira", "frugal", "q_galore")
# Which methods read each block or key (the rest of the config is common).
_READ_BY = {
    "lora": ("lora", "relora"), "relora": ("relora",),
    "galore": _GALORE_FAMILY, "galore.scale": ("galore", "fira", "q_galore"),
    "galore.frugal_inactive_lr_scale": ("frugal",),
    "galore.q_bits": ("q_galore",), "sst": ("sst",), "sltrain": ("sltrain",),
    "targets": ("lora", "relora", "sst", "sltrain"),
}


def _check_values(config, methods, overrides) -> None:
  """The per-key checks of `validate_config` (after its own)."""
  check = config_checks.Checker(config, config_lib.get_config())
  check.known_keys()
  spec = check.get("data")
  if spec == "tinyshakespeare":
    check.file("data", shared_dir() / _TINYSHAKESPEARE)
  elif isinstance(spec, str) and spec.startswith("file:"):
    check.file("data", spec.split(":", 1)[1])
  elif spec not in ("auto", "lee"):
    raise ValueError(
        f"config.data must be 'auto', 'tinyshakespeare', 'lee' or "
        f"'file:<path>'; found {spec!r}. Fix --config.data.")
  check.positive_int("model.hidden_size", "model.intermediate_size",
                     "model.num_layers", "model.num_heads",
                     "model.num_kv_heads")
  m = config.model
  if m.hidden_size % m.num_heads or m.num_heads % m.num_kv_heads:
    raise ValueError(
        f"config.model.hidden_size ({m.hidden_size}) must be divisible by "
        f"model.num_heads ({m.num_heads}), and num_heads by "
        f"model.num_kv_heads ({m.num_kv_heads}). Fix --config.model.*.")
  check.non_negative_int("seed", "warmup_steps")
  check.in_range("val_fraction", 0.0, 1.0, low_closed=False)
  check.in_range("min_lr_ratio", 0.0, 1.0, high_closed=True)
  check.non_negative_number("weight_decay")
  check.positive_number(*(f"lr.{name}" for name in methods))

  def used(key):
    return set(_READ_BY[key]) & set(methods)

  if used("targets"):
    check.regex("targets")
  if used("lora"):
    check.positive_number("lora.alpha")
  if used("relora"):
    check.positive_int("relora.refresh_every")
    check.non_negative_int("relora.restart_warmup_steps")
    check.in_range("relora.prune_ratio", 0.0, 1.0)
  if used("galore"):
    check.positive_int("galore.refresh_every")
    check.choice("galore.projector", projection.PROJECTORS)
  if used("galore.scale"):
    check.positive_number("galore.scale")
  if used("galore.frugal_inactive_lr_scale"):
    check.non_negative_number("galore.frugal_inactive_lr_scale")
  if used("galore.q_bits"):
    check.choice("galore.q_bits", quantize.BITS)
  if used("sst"):
    check.positive_int("sst.refresh_every")
    check.non_negative_int("sst.round_length", "sst.rewarm_steps")
    check.not_greater("sst.rewarm_steps", "sst.refresh_every")
    if config.sst.round_length % config.sst.refresh_every:
      raise ValueError(
          f"config.sst.round_length ({config.sst.round_length}) must be a "
          f"multiple of sst.refresh_every ({config.sst.refresh_every}), "
          "or 0 for (m/r)·refresh_every. Fix --config.sst.round_length.")
  if used("sltrain"):
    check.in_range("sltrain.density", 0.0, 1.0, low_closed=False,
                   high_closed=True)
    check.positive_number("sltrain.alpha")
  if overrides:
    unused = {f"lr.{name}": f"method {name!r} is not in methods="
                            f"{config.methods!r}"
              for name in METHODS if name not in methods}
    for key, readers in _READ_BY.items():
      if not used(key):
        unused[key] = (f"it is read by {list(readers)}, none of which is in "
                       f"methods={config.methods!r}")
    config_checks.unused_overrides(config, overrides, unused)


def model_config(config: ml_collections.ConfigDict) -> llama.LlamaConfig:
  m = config.model
  return llama.LlamaConfig(
      vocab_size=VOCAB_SIZE, hidden_size=m.hidden_size,
      intermediate_size=m.intermediate_size, num_layers=m.num_layers,
      num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
      max_position=max(config.seq_len, 16), scan_layers=False)


def build_model(config: ml_collections.ConfigDict, method: str):
  """`(model, wrt filter)`: the same random init for every method."""
  model = llama.LLaMA(model_config(config), rngs=nnx.Rngs(config.seed))
  wrt = nnx.Param
  if method in ("lora", "relora"):
    adapters.inject(model, targets=config.targets, method="lora",
                    rank=config.rank, alpha=config.lora.alpha,
                    init="kaiming", rngs=config.seed + 1)
    wrt = relora.trainable()
  elif method == "sst":
    sst.to_sst(model, targets=config.targets, rank=config.rank)
  elif method == "sltrain":
    sltrain.to_sltrain(model, targets=config.targets, rank=config.rank,
                       density=config.sltrain.density,
                       alpha=config.sltrain.alpha, rngs=config.seed + 1)
  return model, wrt


def build_optimizer(
    config: ml_collections.ConfigDict, method: str, model: Any = None
) -> optax.GradientTransformation:
  """The method's optax transformation with its learning-rate schedule.

  `model` (the `nnx.Module` being trained) gives the GaLore family its
  stacked-layer axes (`optim.stacked_axes_from`: one projector per layer
  of scan-stacked `[L, m, n]` kernels).
  """
  peak = config.lr[method]
  total = config.num_train_steps
  if method == "relora":
    schedule = relora.jagged_cosine_schedule(
        peak, total_steps=total, warmup_steps=config.warmup_steps,
        refresh_every=config.relora.refresh_every,
        restart_warmup_steps=config.relora.restart_warmup_steps,
        min_ratio=config.min_lr_ratio)
  else:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, peak, config.warmup_steps, max(total, config.warmup_steps + 1),
        end_value=peak * config.min_lr_ratio)
  wd = config.weight_decay
  g = config.galore
  common = dict(rank=config.rank, refresh_every=g.refresh_every,
                projector=g.projector, weight_decay=wd, project=r"_proj",
                stacked_axes=None if model is None else
                optim.stacked_axes_from(model))
  if method in ("full", "lora", "relora", "sltrain"):
    return optax.adamw(schedule, weight_decay=wd)
  if method == "galore":
    return optim.galore_adamw(schedule, scale=g.scale, **common)
  if method == "fira":
    return optim.fira_adamw(schedule, scale=g.scale, **common)
  if method == "frugal":
    return optim.frugal_adamw(
        schedule, inactive_lr_scale=g.frugal_inactive_lr_scale, **common)
  if method == "q_galore":
    return optim.q_galore_adamw(schedule, scale=g.scale,
                                projector_bits=g.q_bits, **common)
  if method == "sst":
    return sst.sst_adamw(
        schedule, rank=config.rank, weight_decay=wd,
        refresh_every=config.sst.refresh_every,
        round_length=config.sst.round_length or None,
        rewarm_steps=config.sst.rewarm_steps, seed=config.seed)
  raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")


def _size(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------
# One method.


def train_method(
    config: ml_collections.ConfigDict,
    method: str,
    workdir: str,
    train_tokens: np.ndarray,
    val: list[np.ndarray],
) -> dict[str, Any]:
  """Trains (or resumes, or skips if finished) one method; returns results."""
  os.makedirs(workdir, exist_ok=True)
  results_path = os.path.join(workdir, "results.json")
  if os.path.exists(results_path):
    with open(results_path) as f:
      done = json.load(f)
    if done.get("num_train_steps") == config.num_train_steps:
      logging.info("%s: finished earlier; skipped.", method)
      return done
  t_start = time.perf_counter()
  model, wrt = build_model(config, method)
  graphdef, params, rest = nnx.split(model, wrt, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)
  total_params = _size(nnx.as_pure(nnx.state(model, nnx.Param)))
  trainable_params = _size(params)
  tx = build_optimizer(config, method, model)
  # Some states alias parameter buffers at init; copy so both can be donated.
  opt_state = jax.tree.map(lambda x: jnp.array(x, copy=True),
                           tx.init(params))

  def loss_fn(params, rest, tokens):
    m = nnx.merge(graphdef, params, rest)
    return llama.next_token_loss(m(tokens), tokens)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, rest, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, rest, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {
        "loss": loss, "grad_norm": optax.tree.norm(grads)}

  eval_loss = jax.jit(loss_fn)

  def evaluate(params, rest) -> float:
    losses = [float(eval_loss(params, rest, jnp.asarray(b))) for b in val]
    return float(np.mean(losses))

  ckpt = checkpoint.Checkpointer(
      os.path.join(workdir, "checkpoints"), max_to_keep=2,
      save_interval_steps=config.checkpoint_every_steps)
  state, start = ckpt.restore_or_init(
      {"params": params, "rest": rest, "opt_state": opt_state})
  params, rest, opt_state = state["params"], state["rest"], state["opt_state"]
  if start:
    logging.info("%s: resumed from step %d.", method, start)

  tokens0 = jnp.asarray(train_batch(train_tokens, 1, config))
  compiled = train_step.lower(params, opt_state, rest, tokens0).compile()
  memory = optim.compiled_memory(compiled)
  opt_bytes = optim.state_bytes(opt_state)

  writer = metric_writers.MetricWriter(workdir, resume_step=start)
  t_train = time.perf_counter()
  bar = tqdm.tqdm(range(start + 1, config.num_train_steps + 1),
                  initial=start, total=config.num_train_steps,
                  desc=f"{LABELS[method]:>9}", unit="step")
  val_loss = None
  for step in bar:
    if method == "relora" and (step - 1) % config.relora.refresh_every == 0 \
        and step > 1:
      # Restart after every `refresh_every` steps, done at the start of the
      # next step (so checkpoints hold the pre-restart state and a resumed
      # run restarts exactly where an uninterrupted one does): merge,
      # re-initialise, prune the moments. The key is a function of the step.
      m = nnx.merge(graphdef, params, rest)
      key = jax.random.fold_in(jax.random.key(config.seed), step - 1)
      opt_state = relora.restart(m, opt_state, key,
                                 prune_ratio=config.relora.prune_ratio)
      _, params, rest = nnx.split(m, wrt, ...)
      params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    tokens = jnp.asarray(train_batch(train_tokens, step, config))
    params, opt_state, metrics = compiled(params, opt_state, rest, tokens)
    scalars = {}
    if step % config.log_every_steps == 0 or step == config.num_train_steps:
      scalars.update({k: float(v) for k, v in metrics.items()})
      bar.set_postfix(loss=f"{scalars['loss']:.4f}")
    if step % config.eval_every_steps == 0 or step == config.num_train_steps:
      val_loss = evaluate(params, rest)
      scalars["val_loss"] = val_loss
      scalars["val_ppl"] = math.exp(val_loss)
    if scalars:
      writer.write(step, scalars)
    ckpt.save(step, {"params": params, "rest": rest, "opt_state": opt_state},
              force=step == config.num_train_steps)
  bar.close()
  ckpt.wait_until_finished()
  ckpt.close()
  writer.close()
  train_seconds = time.perf_counter() - t_train
  if val_loss is None:  # Nothing left to train: evaluate the restored state.
    val_loss = evaluate(params, rest)
  rows = metric_writers.read_csv(writer.csv_path)
  last = [r for r in rows if "loss" in r]
  results = {
      "method": method,
      "label": LABELS[method],
      "num_train_steps": config.num_train_steps,
      "tokens": config.num_train_steps * config.batch_size * config.seq_len,
      "rank": config.rank,
      "learning_rate": config.lr[method],
      "final_train_loss": last[-1]["loss"] if last else None,
      "val_loss": val_loss,
      "val_ppl": math.exp(val_loss),
      "trainable_params": trainable_params,
      "total_params": total_params,
      "optimizer_state_bytes": int(opt_bytes),
      "compiled_step_memory": memory,
      "train_seconds": train_seconds,
      "wall_seconds": time.perf_counter() - t_start,
      "resumed_from_step": start,
  }
  metric_writers.write_json(results_path, results)
  return results


# ----------------------------------------------------------------------------
# All methods.


def format_results(
    results: list[dict[str, Any]], info: dict[str, Any]
) -> str:
  """A Markdown table, one row per method."""
  full = next((r for r in results if r["method"] == "full"), None)
  rows = [
      f"corpus: {info['corpus']} ({info['train_tokens']:,} train / "
      f"{info['val_tokens']:,} validation byte tokens); decoder "
      f"d={info['hidden_size']}, {info['num_layers']} layers, seq "
      f"{info['seq_len']}, batch {info['batch_size']}, "
      f"{info['num_train_steps']} steps ({info['tokens']:,} tokens), "
      f"rank {info['rank']}.",
      "",
      "| method | val ppl | val loss | trainable params | optimizer state |"
      " step memory | wall time |",
      "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in results:
    opt = r["optimizer_state_bytes"] / 2**20
    mem = r["compiled_step_memory"]["total_bytes"] / 2**20
    opt_ratio = mem_ratio = ""
    if full is not None and r is not full:
      x = r["optimizer_state_bytes"] / full["optimizer_state_bytes"]
      opt_ratio = f" ({x:.2f}×)"
      x = (r["compiled_step_memory"]["total_bytes"]
           / full["compiled_step_memory"]["total_bytes"])
      mem_ratio = f" ({x:.2f}×)"
    rows.append(
        f"| {r['label']} | {r['val_ppl']:.3f} | {r['val_loss']:.4f} | "
        f"{r['trainable_params']:,} | {opt:.2f} MiB{opt_ratio} | "
        f"{mem:.1f} MiB{mem_ratio} | "
        f"{r['wall_seconds']:.0f} s |"
    )
  return "\n".join(rows)


def plot_ppl_vs_memory(results: list[dict[str, Any]], out_png: str) -> str:
  """Scatter of validation perplexity against optimizer-state and step
  memory, one point per method."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key, name in (
      (axes[0], "optimizer_state_bytes", "optimizer state (MiB)"),
      (axes[1], "total_bytes", "compiled step memory (MiB)")):
    for r in results:
      b = r[key] if key in r else r["compiled_step_memory"][key]
      ax.scatter(b / 2**20, r["val_ppl"])
      ax.annotate(r["label"], (b / 2**20, r["val_ppl"]), fontsize=8,
                  xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(name)
    ax.set_ylabel("validation perplexity (per byte)")
  fig.tight_layout()
  tmp = out_png + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, out_png)
  return out_png


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Runs (or resumes) every selected method; writes the table and plots.

  Args:
    config: See `experiments/configs/pretrain_lm.py`.
    workdir: Output directory; `<workdir>/<method>/` per method.

  Returns:
    `{"info": run description, "results": [per-method dicts]}`.

  Raises:
    ValueError: On a bad config or corpus.
  """
  methods = validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  corpus, data = load_corpus(config.data)
  train_tokens, val_tokens = split_tokens(data, config.val_fraction,
                                          config.seq_len)
  val = val_batches(val_tokens, config)
  logging.info("%s: %d train / %d val tokens.", corpus, len(train_tokens),
               len(val_tokens))
  # One device: the comparison is about per-method memory, not parallelism.
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  with sharding.use_mesh(mesh):
    results = [
        train_method(config, m, os.path.join(workdir, m), train_tokens, val)
        for m in methods
    ]
  info = {
      "corpus": corpus,
      "train_tokens": len(train_tokens),
      "val_tokens": len(val_tokens),
      "val_windows": len(val) * config.batch_size,
      "hidden_size": config.model.hidden_size,
      "intermediate_size": config.model.intermediate_size,
      "num_layers": config.model.num_layers,
      "seq_len": config.seq_len,
      "batch_size": config.batch_size,
      "num_train_steps": config.num_train_steps,
      "tokens": config.num_train_steps * config.batch_size * config.seq_len,
      "rank": config.rank,
      "tokenizer": "bytes (vocabulary 256)",
      "backend": jax.default_backend(),
  }
  out = {"info": info, "results": results}
  metric_writers.write_json(os.path.join(workdir, "results.json"), out)
  table = format_results(results, info)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  metric_writers.plot_metrics(
      {LABELS[m]: os.path.join(workdir, m, "metrics.csv") for m in methods},
      ["loss", "val_ppl"], os.path.join(workdir, "loss_curves.png"),
      title="byte-level LM pretraining")
  plot_ppl_vs_memory(results, os.path.join(workdir, "ppl_vs_memory.png"))
  print(table)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if not flags.FLAGS["verbosity"].present:
    # orbax logs every write at INFO; the progress bar and table suffice.
    logging.set_verbosity(logging.WARNING)
  validate_config(_CONFIG.value, config_checks.overrides(_CONFIG))
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  jax.config.config_with_absl()
  app.run(main)
