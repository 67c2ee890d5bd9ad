r"""LoRA vs full fine-tuning train step, and `embed` vs sentence-transformers.

  python benchmarks/lora_bench.py
  python benchmarks/lora_bench.py --models=minilm --steps=5 --skip_embed

Part 1 times the bi-encoder train step of `experiments/finetune_retriever.py`
as that binary builds it from its default config: the `BiEncoder`
(`retrieval_models.load_model`), the adapters (`train.inject_from_config`
of `config.adapter`), what is trained (`retrieval_models.trainable`), the
loss (`retrieval_models.make_loss`: in-batch softmax, pooling, scale), the
optimizer (`train.optimizer_from_config` of `config.optimizer`: AdamW with
its warmup-cosine schedule) and the step (`train.split`, `train.shardings`
on the config's mesh, `train.init_opt_state`, `train.make_train_step`: on
CPU gradient and update as two jits, one elsewhere). The batch is the
binary's first one (`retrieval_models.make_batch_fn`): 32 queries of 32
tokens and 32 code documents of 128 tokens, real (docstring, code) pairs of
`config.data.spec`, tokenized once. Two models: all-MiniLM-L6-v2
(`assets.minilm_path()`) and a randomly initialised BERT-base-sized stack.
Three configurations each: full fine-tuning (`adapter.method="full"`),
`config.adapter`'s LoRA (r=8) on every linear layer and the same on
query/value only. For each: the compiled memory of the fused step
(`TrainStep.memory`, the binary's `compiled_step_memory`), the matmuls in its
jaxpr and optimized HLO (is any frozen-kernel weight gradient computed?) and
the median step time, with the configurations interleaved round-robin in this
one process.
`--ablations` adds diagnostic rows: a floor that trains only the LayerNorms
(input gradients through every layer, no adapters, no kernel weight
gradients), all-linear LoRA traced with a candidate custom-VJP backward, and
full / all-linear LoRA with every `BertLayer` rematerialised. The candidates
are defined in this file and patched in only while tracing; the library is
not modified.

Part 2 compares `lowrank.models.bert.embed_texts` with sentence-transformers
on the same checkpoint, texts, max length, batch size and normalisation, both
interleaved in this process on the same cores; it is skipped (with the
reason printed) when torch or sentence-transformers cannot be imported.

Timings on a shared CPU are noisy: read the ratios, which compare runs that
alternate in one process, not the absolute numbers.
"""

import collections
from collections.abc import Callable, Iterator, Mapping, Sequence
import contextlib
import copy
import dataclasses
import datetime
import os
import platform
import re
import statistics
import time
from typing import Any

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import retrieval_models
from experiments.configs import finetune_retriever as ft_config
from lowrank import adapters
from lowrank import assets
from lowrank import distributed
from lowrank import optim
from lowrank import sharding
from lowrank import train
from lowrank.adapters import lora as lora_math
from lowrank.data import specs
from lowrank.models import bert
from lowrank.retrieval import biencoder

# Part 1: the train step.
_SKIP_TRAIN = flags.DEFINE_bool("skip_train", False, "Skip part 1.")
_MODELS = flags.DEFINE_list(
    "models", ["minilm", "bert_base"], "Models for part 1: minilm, bert_base."
)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per config (MiniLM).")
_WARMUP = flags.DEFINE_integer(
    "warmup", 2, "Untimed steps per configuration (MiniLM)."
)
_BERT_BASE_STEPS = flags.DEFINE_integer(
    "bert_base_steps", 3, "Timed steps per configuration (BERT-base)."
)
_BERT_BASE_WARMUP = flags.DEFINE_integer(
    "bert_base_warmup", 1, "Untimed steps per configuration (BERT-base)."
)
_ABLATIONS = flags.DEFINE_bool(
    "ablations",
    False,
    "Part 1 diagnostics: add a no-adapter input-gradient-only floor and a "
    "candidate custom-VJP LoRA backward (benchmark-local, library untouched).",
)

# Part 2: `embed_texts` vs sentence-transformers.
_SKIP_EMBED = flags.DEFINE_bool("skip_embed", False, "Skip part 2.")
_NUM_TEXTS = flags.DEFINE_integer("num_texts", 2000, "Documents to embed.")
_EMBED_MAX_LENGTH = flags.DEFINE_integer(
    "embed_max_length", 128, "Truncation length (tokens) in part 2."
)
_EMBED_BATCH_SIZE = flags.DEFINE_integer("embed_batch_size", 64, "Batch size.")
_EMBED_REPEATS = flags.DEFINE_integer(
    "embed_repeats", 3, "Timed runs per library in part 2 (after a warm-up)."
)

ALL_LINEAR = r".*\.(query|key|value|dense)"
QUERY_VALUE = r".*\.(query|value)"


@dataclasses.dataclass(frozen=True)
class Method:
  """A train-step configuration.

  Attributes:
    name: Row label.
    adapter: Overrides of the config's `adapter` section (`{"method":
      "full"}`: no adapters, every weight trained).
    wrt: What the step differentiates: `None` means the binary's
      `retrieval_models.trainable` (the adapters' `nnx.LoRAParam`, or every
      `nnx.Param` for `"full"`).
    autodiff: Trace the LoRA layers with JAX's own backward instead of the
      library's custom one (see `_autodiff_lora_backward`).
    remat: Rematerialise each `BertLayer` in the backward pass (see
      `_remat_layers`), trading recomputation for activation memory.
  """

  name: str
  adapter: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  wrt: Any = None
  autodiff: bool = False
  remat: bool = False


FULL = {"method": "full"}
METHODS = (
    Method("full", FULL),
    Method("lora_all_linear", {"targets": ALL_LINEAR}),
    Method("lora_qv", {"targets": QUERY_VALUE}),
)
# Diagnostics (--ablations). The floor trains only the LayerNorms: no
# adapters and no kernel weight gradients, but input gradients through every
# layer; roughly the least work any LoRA on this model can do (it also needs
# layer 0's input gradient, which LoRA does not).
ABLATIONS = (
    Method(
        "dx_only_floor",
        FULL,
        wrt=nnx.All(nnx.Param, nnx.PathContains("LayerNorm")),
    ),
    Method("lora_all_linear_autodiff", {"targets": ALL_LINEAR},
           autodiff=True),
    Method("full_remat", FULL, remat=True),
    Method("lora_all_linear_remat", {"targets": ALL_LINEAR}, remat=True),
)
# Goals for LoRA on all linear layers, as fractions of full fine-tuning.
GOAL_TIME_RATIO = 0.8
GOAL_MEMORY_RATIO = 0.5
GOAL_EMBED_RATIO = 1.0
MIN_COSINE = 0.999

BERT_BASE = bert.BertConfig(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
)
_MIB = 2**20
_BIG = 2**18  # Elements; an activation-sized array (>= 1 MiB in float32).


# ----------------------------------------------------------------------------
# Machine and helpers.


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine_info() -> str:
  """One Markdown bullet list: date, platform, CPUs and library versions."""
  import flax  # pylint: disable=g-import-not-at-top

  versions = {
      "python": platform.python_version(),
      "jax": jax.__version__,
      "flax": flax.__version__,
      "optax": optax.__version__,
  }
  try:
    import torch  # pylint: disable=g-import-not-at-top

    versions["torch"] = torch.__version__
    versions["torch threads"] = str(torch.get_num_threads())
  except ImportError:
    versions["torch"] = "not installed"
  try:
    import sentence_transformers  # pylint: disable=g-import-not-at-top

    versions["sentence-transformers"] = sentence_transformers.__version__
  except ImportError:
    versions["sentence-transformers"] = "not installed"
  now = datetime.datetime.now(datetime.timezone.utc)
  lines = [
      f"- date: {now:%Y-%m-%d %H:%M} UTC",
      f"- platform: {platform.platform()}",
      (
          f"- cpu: {_cpu_model()}, os.cpu_count()={os.cpu_count()}, "
          f"usable={len(os.sched_getaffinity(0))}"
      ),
      f"- jax devices: {jax.devices()}",
      "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
  ]
  return "\n".join(lines)


def compiled_memory(compiled) -> dict[str, int]:
  """`lowrank.optim.compiled_memory` with short keys (`"total"`, ...)."""
  return {k.removesuffix("_bytes"): v
          for k, v in optim.compiled_memory(compiled).items()}


def _median_ms(xs: Sequence[float]) -> float:
  return 1e3 * statistics.median(xs)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  out = [
      "| " + " | ".join(header) + " |",
      "|"
      + "|".join("---" if i == 0 else "---:" for i in range(len(header)))
      + "|",
  ]
  out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(out)


# ----------------------------------------------------------------------------
# Matmul accounting.


def _sub_jaxprs(value) -> list[Any]:
  """Jaxprs nested in an equation parameter (jit, custom_vjp, ...)."""
  if hasattr(value, "eqns"):
    return [value]
  if hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    return [value.jaxpr]
  if isinstance(value, (list, tuple)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def _dot_generals(jaxpr) -> list[Any]:
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append(eqn)
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        out += _dot_generals(sub)
  return out


@dataclasses.dataclass
class DotStats:
  """Matmuls of one train step.

  Attributes:
    jaxpr_dots: `dot_general`s in the step's jaxpr.
    jaxpr_gflop: Their total `2 * M * N * K`, in GFLOP.
    jaxpr_kernel_grads: Of those, how many produce a `[d_in, d_out]` base
      kernel shape: the weight gradients `dW = xᵀ g` (forward and
      input-gradient matmuls keep the batch / token axes, so they never do).
    jaxpr_kernel_grad_gflop: The FLOPs of those.
    hlo_dots: `dot` instructions in the optimized HLO.
    hlo_kernel_grads: Of those, how many produce a base kernel shape.
    hlo_big_transposes: `transpose` instructions in the optimized HLO with at
      least `_BIG` elements (transposed copies of activations / cotangents;
      XLA:CPU materialises them in memory).
    residual_bytes: Activations the forward pass saves for the backward
      pass (inputs excluded), `None` if JAX's helper is unavailable.
    top_residuals: The largest groups of saved activations, for the report.
  """

  jaxpr_dots: int
  jaxpr_gflop: float
  jaxpr_kernel_grads: int
  jaxpr_kernel_grad_gflop: float
  hlo_dots: int
  hlo_kernel_grads: int
  hlo_big_transposes: int
  residual_bytes: int | None = None
  top_residuals: str = ""


def _kernel_shapes(model: nnx.Module) -> set[tuple[int, ...]]:
  shapes = set()
  for path, node in nnx.iter_graph(model):
    if (
        isinstance(node, nnx.Param)
        and not isinstance(node, nnx.LoRAParam)
        and path
        and path[-1] == "kernel"
    ):
      shape = tuple(node.get_value().shape)
      shapes |= {shape, shape[::-1]}
  return shapes


def dot_stats(closed_jaxpr, hlo_text: str, kernel_shapes) -> DotStats:
  """Counts matmuls and the weight-gradient ones among them."""
  dots = _dot_generals(closed_jaxpr.jaxpr)
  total = grads = 0.0
  n_grads = 0
  for eqn in dots:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = tuple(eqn.outvars[0].aval.shape)
    flop = 2.0 * np.prod(out) * np.prod([lhs[d] for d in lhs_contract])
    total += flop
    if out in kernel_shapes:
      n_grads += 1
      grads += flop
  hlo_dots = re.findall(r"= f32\[([\d,]*)\]\S* dot\(", hlo_text)
  hlo_grads = sum(
      tuple(int(d) for d in s.split(",") if d) in kernel_shapes
      for s in hlo_dots
  )
  big_transposes = sum(
      np.prod([int(d) for d in s.split(",") if d]) >= _BIG
      for s in re.findall(r"= f32\[([\d,]*)\]\S* transpose\(", hlo_text)
  )
  return DotStats(
      jaxpr_dots=len(dots),
      jaxpr_gflop=total / 1e9,
      jaxpr_kernel_grads=n_grads,
      jaxpr_kernel_grad_gflop=grads / 1e9,
      hlo_dots=len(hlo_dots),
      hlo_kernel_grads=hlo_grads,
      hlo_big_transposes=int(big_transposes),
  )


def saved_residuals(fn, *args) -> tuple[int | None, str]:
  """Bytes of activations `fn`'s VJP keeps (arguments excluded) and a summary.

  Uses JAX's `saved_residuals` (what `jax.ad_checkpoint.print_saved_residuals`
  prints); it is not public API, so its absence only blanks the column.
  """
  try:
    from jax._src import ad_checkpoint  # pylint: disable=g-import-not-at-top

    residuals = ad_checkpoint.saved_residuals(fn, *args)
  except (ImportError, AttributeError, TypeError) as e:
    return None, f"n/a ({type(e).__name__})"
  groups = collections.Counter()
  total = 0
  for aval, source in residuals:
    if "argument" in source:  # Params / inputs: already counted as args.
      continue
    size = int(np.prod(aval.shape)) * aval.dtype.itemsize
    total += size
    what = source.split(" from ")[0].removeprefix("output of ")
    groups[(what, tuple(aval.shape))] += size
  top = ", ".join(
      f"{what} {list(shape)}: {size / _MIB:.0f} MiB"
      for (what, shape), size in groups.most_common(6)
  )
  return total, top


# ----------------------------------------------------------------------------
# Part 1: train step.


@dataclasses.dataclass
class TrainConfig:
  """One (model, method) train step, compiled, with its state."""

  model: str
  method: str
  trainable: int
  total_params: int
  step: Callable[..., Any]
  params: Any
  opt_state: Any
  rest: Any
  memory: dict[str, int]
  dots: DotStats | None
  times: list[float] = dataclasses.field(default_factory=list)
  cpu_times: list[float] = dataclasses.field(default_factory=list)
  loss: float = float("nan")


MODELS = ("minilm", "bert_base")


def build_model(name: str, config) -> tuple[biencoder.BiEncoder,
                                            bert.Tokenizer]:
  """The binary's bi-encoder of `name` and the MiniLM tokenizer.

  Call it inside the mesh. `"minilm"`: `retrieval_models.load_model(config)`;
  `"bert_base"`: the same `BiEncoder` over a randomly initialised
  BERT-base-sized stack (only speed and memory are measured).
  """
  if name == "minilm":
    return retrieval_models.load_model(config)
  if name != "bert_base":
    raise ValueError(
        f"Unknown model {name!r}; expected one of {MODELS} (--models).")
  # BERT-base-uncased shapes (same 30522-token uncased WordPiece vocab as
  # MiniLM's tokenizer), random init.
  m = config.model
  base = lambda seed: bert.BertModel(BERT_BASE, rngs=nnx.Rngs(seed))
  model = biencoder.BiEncoder(
      base(0), base(1) if m.towers == "separate" else None,
      pooling=m.pooling, scale=m.scale, learn_scale=m.learn_scale,
      max_scale=m.max_scale)
  model.eval()
  return model, bert.load_tokenizer(assets.minilm_path())


def method_config(config, method: Method):
  """A copy of `config` with `method.adapter` over its adapter section."""
  config = copy.deepcopy(config)  # Keeps decay_steps -> num_steps.
  config.adapter.update(dict(method.adapter))
  return config


@contextlib.contextmanager
def _autodiff_lora_backward() -> Iterator[None]:
  """While tracing, LoRA uses JAX's own transpose of `(x @ A) @ B`.

  This is the library's behaviour before its custom backward
  (`lowrank.adapters.lora._factored`): JAX transposes `h @ B` as
  `dB = (gᵀ h)ᵀ`, and XLA:CPU materialises `gᵀ`, a transposed copy of the
  `[tokens, d_out]` cotangent, for every adapter. Benchmark-only.
  """
  # pylint: disable=protected-access
  original = lora_math._factored
  lora_math._factored = lambda x, a, b: (x @ a) @ b
  try:
    yield
  finally:
    lora_math._factored = original
  # pylint: enable=protected-access


@contextlib.contextmanager
def _remat_layers() -> Iterator[None]:
  """While tracing, each `BertLayer` runs under `nnx.remat` (benchmark-only).

  Only the layer inputs are saved for the backward pass; each layer's
  forward is recomputed there.
  """
  cls = bert.BertLayer
  original = cls.__call__
  # A plain function (not the transform's return value) binds as a method.
  # pylint: disable-next=unnecessary-lambda
  cls.__call__ = lambda self, x, bias: nnx.remat(original)(self, x, bias)
  try:
    yield
  finally:
    cls.__call__ = original


def _compiled_step(step: train.TrainStep, params, opt_state, rest,
                   batch) -> tuple[train.TrainStep, Any]:
  """`step` with its jits compiled ahead of time, and the fused program.

  The returned step runs the same programs as `step` (split or fused, as
  `train.make_train_step` chose), compiled now, under whatever tracing
  patches are active; the fused one gives the memory and the HLO.
  """
  fused = step.fused.lower(params, opt_state, rest, batch).compile()
  if not step.split:
    return dataclasses.replace(step, fused=fused), fused
  grads = step.grads.lower(params, rest, batch).compile()
  grad_shapes = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(step.grads, params, rest, batch)[0],
      grads.output_shardings[0])
  update = step.update.lower(params, opt_state, grad_shapes).compile()
  return dataclasses.replace(step, fused=fused, grads=grads,
                             update=update), fused


def make_train_config(
    model_name: str, method: Method, config, pairs, mesh, *,
    stats: bool = True,
) -> TrainConfig:
  """Builds the binary's model, optimizer and train step; compiles it.

  The step is the one of `experiments.finetune_retriever.train_and_evaluate`
  (`config` with `method.adapter` over its adapter section), on its first
  batch of `pairs`. `stats`: also count the matmuls and saved activations
  (`TrainConfig.dots`; None without).
  """
  config = method_config(config, method)
  with contextlib.ExitStack() as stack:  # Around all that traces the model.
    stack.enter_context(sharding.use_mesh(mesh))
    model, tokenizer = build_model(model_name, config)
    train.inject_from_config(model, config.adapter, rngs=config.seed)
    model.eval()
    wrt = method.wrt or retrieval_models.trainable(config, model)
    graphdef, params, rest = train.split(model, wrt)
    tx = train.optimizer_from_config(config.optimizer, model=model)
    param_shardings, opt_shardings = train.shardings(model, wrt, tx, mesh)
    opt_state = train.init_opt_state(tx, params, shardings=opt_shardings)
    loss_fn = retrieval_models.make_loss(config, tokenizer)
    step = train.make_train_step(
        graphdef, loss_fn, tx, param_shardings=param_shardings,
        opt_shardings=opt_shardings)
    batch = distributed.host_to_global(
        retrieval_models.make_batch_fn(config, model, tokenizer, pairs)(1),
        train.batch_sharding(mesh))
    args = (params, opt_state, rest, batch)
    if method.autodiff:
      stack.enter_context(_autodiff_lora_backward())
    if method.remat:
      stack.enter_context(_remat_layers())
    traced = step
    step, compiled = _compiled_step(traced, *args)
    dots = None
    if stats:
      closed_jaxpr = jax.make_jaxpr(traced.fused)(*args)
      dots = dot_stats(closed_jaxpr, compiled.as_text(), _kernel_shapes(model))
      dots.residual_bytes, dots.top_residuals = saved_residuals(
          lambda p, r, b: loss_fn(nnx.merge(graphdef, p, r), b)[0],
          params, rest, batch)
  return TrainConfig(
      model=model_name,
      method=method.name,
      trainable=int(sum(x.size for x in jax.tree.leaves(params))),
      total_params=int(adapters.count_parameters(model)["total"]),
      step=lambda p, o: step(p, o, rest, batch),
      params=params,
      opt_state=opt_state,
      rest=rest,
      memory=compiled_memory(compiled),
      dots=dots,
  )


def _run_step(c: TrainConfig) -> tuple[float, float]:
  """Runs one step; returns (wall seconds, this process's CPU seconds).

  CPU time (all threads) is less sensitive than wall time to other tenants
  of a shared machine: waiting for a core is not counted.
  """
  c0, t0 = time.process_time(), time.perf_counter()
  c.params, c.opt_state, metrics = c.step(c.params, c.opt_state)
  jax.block_until_ready((c.params, c.opt_state, metrics))
  dt, dc = time.perf_counter() - t0, time.process_time() - c0
  c.loss = float(metrics["loss"])
  return dt, dc


def bench_train(
    model_name: str,
    steps: int,
    warmup: int,
    config,
    pairs,
    mesh,
    methods: Sequence[Method] = METHODS,
):
  """Compiles the configurations, then times them round-robin."""
  configs = []
  for method in methods:
    t0 = time.perf_counter()
    configs.append(
        make_train_config(model_name, method, config, pairs, mesh))
    print(
        f"  built+compiled {model_name}/{method.name} in "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )
  for r in range(warmup + steps):
    # Rotate the order every round so no configuration always runs first.
    for k in range(len(configs)):
      c = configs[(r + k) % len(configs)]
      dt, dc = _run_step(c)
      if r >= warmup:
        c.times.append(dt)
        c.cpu_times.append(dc)
    print(
        f"  round {r + 1}/{warmup + steps}: "
        + ", ".join(
            f"{c.method}"
            f" {1e3 * c.times[-1] if c.times else float('nan'):.0f} ms"
            for c in configs
        ),
        flush=True,
    )
  return configs


def _paired_ratios(c: TrainConfig, full: TrainConfig) -> list[float]:
  """Per-round ratios; `c.times[i]` and `full.times[i]` ran back to back."""
  return [t / f for t, f in zip(c.times, full.times)]


def format_train(configs: Sequence[TrainConfig]) -> str:
  """Markdown table of one model's configurations, ratios vs full."""
  full = configs[0]
  t_full = statistics.median(full.times)
  cpu_full = statistics.median(full.cpu_times)
  rows = []
  for c in configs:
    m = c.memory
    t = statistics.median(c.times)
    paired = _paired_ratios(c, full)
    rows.append([
        f"{c.model} / {c.method}",
        f"{c.trainable:,} / {c.total_params:,}",
        (
            f"{_median_ms(c.times):.0f} (n={len(c.times)}, "
            f"{1e3 * min(c.times):.0f}-{1e3 * max(c.times):.0f})"
        ),
        f"{t / t_full:.2f}",
        (
            f"{statistics.median(paired):.2f} "
            f"({min(paired):.2f}-{max(paired):.2f})"
        ),
        f"{statistics.median(c.cpu_times) / cpu_full:.2f}",
        f"{m['argument'] / _MIB:.0f}",
        f"{m['temp'] / _MIB:.0f}",
        f"{m['output'] / _MIB:.0f}",
        f"{m['alias'] / _MIB:.0f}",
        f"{m['total'] / _MIB:.0f}",
        f"{m['total'] / full.memory['total']:.2f}",
        f"{c.loss:.3f}",
    ])
  return _table(
      [
          "model / config",
          "trainable / total params",
          "step ms median (range)",
          "time ratio (of medians)",
          "paired ratio median (range)",
          "CPU-time ratio",
          "arg MiB",
          "temp MiB",
          "out MiB",
          "alias MiB",
          "total MiB",
          "memory ratio",
          "last loss",
      ],
      rows,
  )


def format_dots(results: Sequence[Sequence[TrainConfig]]) -> str:
  """Markdown table of the matmuls each step computes (ratios vs full)."""
  rows = []
  for configs in results:
    full_gflop = configs[0].dots.jaxpr_gflop
    for c in configs:
      d = c.dots
      rows.append([
          f"{c.model} / {c.method}",
          d.jaxpr_dots,
          f"{d.jaxpr_gflop:.1f}",
          f"{d.jaxpr_gflop / full_gflop:.2f}",
          d.jaxpr_kernel_grads,
          f"{d.jaxpr_kernel_grad_gflop:.1f}",
          d.hlo_dots,
          d.hlo_kernel_grads,
          d.hlo_big_transposes,
          "n/a"
          if d.residual_bytes is None
          else f"{d.residual_bytes / _MIB:.0f}",
      ])
  return _table(
      [
          "model / config",
          "jaxpr dot_generals",
          "matmul GFLOP",
          "GFLOP ratio",
          "kernel-shaped dW dots",
          "dW GFLOP",
          "HLO dots",
          "HLO kernel-shaped dW dots",
          "HLO transposes >= 1 MiB",
          "saved activations MiB",
      ],
      rows,
  )


def train_goals(configs: Sequence[TrainConfig]) -> str:
  """One line per model: the two goals, met or not."""
  full, lora = configs[0], configs[1]
  t = statistics.median(lora.times) / statistics.median(full.times)
  paired = statistics.median(_paired_ratios(lora, full))
  cpu = statistics.median(lora.cpu_times) / statistics.median(full.cpu_times)
  mem = lora.memory["total"] / full.memory["total"]
  verdict = lambda ok: "met" if ok else "NOT met"
  agree = (t <= GOAL_TIME_RATIO) == (paired <= GOAL_TIME_RATIO)
  return (
      f"- {full.model}: all-linear LoRA step time = {t:.2f}x full, ratio of "
      f"medians (paired per-round median {paired:.2f}x, CPU-time "
      f"{cpu:.2f}x; goal <= "
      f"{GOAL_TIME_RATIO}x): {verdict(t <= GOAL_TIME_RATIO)}"
      f"{'' if agree else ' (the paired estimate disagrees: borderline)'}; "
      f"compiled memory = {mem:.2f}x full (goal <= {GOAL_MEMORY_RATIO}x): "
      f"{verdict(mem <= GOAL_MEMORY_RATIO)}."
      + _remat_note(configs)
  )


def _remat_note(configs: Sequence[TrainConfig]) -> str:
  """The memory ratio with both sides rematerialised, if --ablations ran."""
  by_name = {c.method: c for c in configs}
  full, lora = by_name.get("full_remat"), by_name.get("lora_all_linear_remat")
  if full is None or lora is None:
    return ""
  mem = lora.memory["total"] / full.memory["total"]
  t = statistics.median(lora.times) / statistics.median(by_name["full"].times)
  return (
      " Ablation, every BertLayer rematerialised on both sides: memory "
      f"{mem:.2f}x ({lora.memory['total'] / _MIB:.0f} vs "
      f"{full.memory['total'] / _MIB:.0f} MiB); that LoRA step takes "
      f"{t:.2f}x the time of the plain full step."
  )


# ----------------------------------------------------------------------------
# Part 2: embed throughput vs sentence-transformers.


def _padded_tokens(texts, lengths, max_length, batch_size) -> dict[str, int]:
  """Token positions each library computes, padding included.

  `embed` sorts by token count, pads every batch to `batch_size` rows and to a
  `LENGTH_BUCKETS` length; sentence-transformers sorts by character count
  and pads each batch to its longest text.
  """
  n = len(texts)
  by_tokens = sorted(range(n), key=lambda i: lengths[i])
  by_chars = np.argsort([-len(t) for t in texts], kind="stable")
  jax_total = st_total = 0
  for start in range(0, n, batch_size):
    chunk = [lengths[i] for i in by_tokens[start : start + batch_size]]
    jax_total += batch_size * bert.bucket_length(max(chunk), max_length)
    chunk = [lengths[i] for i in by_chars[start : start + batch_size]]
    st_total += len(chunk) * max(chunk)
  return {"real": int(sum(lengths)), "jax": jax_total, "st": st_total}


def bench_embed(
    texts: list[str], max_length: int, batch_size: int, repeats: int
) -> str:
  """Interleaved `bert.embed_texts` vs `SentenceTransformer.encode`."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  try:
    import sentence_transformers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return f"Part 2 skipped: {e} (install the `bench` extra)."
  path = assets.minilm_path()
  with sharding.use_mesh():
    model = bert.load_pretrained(path)
    tokenizer = bert.load_tokenizer(path)
  st = sentence_transformers.SentenceTransformer(str(path), device="cpu")
  st.max_seq_length = max_length
  hf_model = st[0].auto_model

  def run_jax(texts=texts):
    return bert.embed_texts(
        model,
        tokenizer,
        texts,
        pooling="mean",
        normalize=True,
        batch_size=batch_size,
        max_length=max_length,
    )

  def run_st(texts=texts):
    return st.encode(
        texts,
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )

  # Same-shape forward: one [batch_size, max_length] batch, no padding
  # differences, no tokenization; isolates the encoder's kernels.
  batch = tokenizer(
      texts[:batch_size], max_length=max_length, pad_to=max_length
  )
  graphdef, state = nnx.split(nnx.view(model, deterministic=True))
  forward = jax.jit(lambda s, b: bert.encode(nnx.merge(graphdef, s), b))
  jax_batch = {k: jnp.asarray(v) for k, v in batch.items()}
  torch_batch = {
      k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()
  }

  def fwd_jax():
    return np.asarray(forward(state, jax_batch))

  def fwd_torch():
    with torch.inference_mode():
      hidden = hf_model(**torch_batch).last_hidden_state
      mask = torch_batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
      pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
      return torch.nn.functional.normalize(pooled, dim=-1).numpy()

  pairs = {
      "end-to-end": (
          ("lowrank embed (JAX)", run_jax),
          ("sentence-transformers", run_st),
      ),
      "forward": (
          ("JAX jit(encode)", fwd_jax),
          ("torch HF BertModel", fwd_torch),
      ),
  }
  reps = {"end-to-end": repeats, "forward": 3 * repeats}
  times = collections.defaultdict(list)
  outputs = {}
  # Warm-up (untimed): `embed` compiles once per length bucket, so it gets a
  # full pass; torch needs no compilation, so two batches suffice.
  warmups = {
      "lowrank embed (JAX)": run_jax,
      "sentence-transformers": lambda: run_st(texts[: 2 * batch_size]),
      "JAX jit(encode)": fwd_jax,
      "torch HF BertModel": fwd_torch,
  }
  for name, fn in warmups.items():
    t0 = time.perf_counter()
    fn()
    print(f"  warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
  for kind, runners in pairs.items():
    for r in range(reps[kind]):
      order = runners if r % 2 == 0 else runners[::-1]  # Alternate first.
      for name, fn in order:
        t0 = time.perf_counter()
        out = fn()
        times[name].append(time.perf_counter() - t0)
        outputs.setdefault(name, np.asarray(out, np.float32))
      print(
          f"  {kind} round {r + 1}/{reps[kind]}: "
          + ", ".join(f"{n} {times[n][-1]:.2f} s" for n, _ in runners),
          flush=True,
      )

  def cosines(a, b):
    a, b = outputs[a], outputs[b]
    return np.sum(a * b, axis=1) / (
        np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    )

  (jax_name, _), (st_name, _) = pairs["end-to-end"]
  (fj_name, _), (ft_name, _) = pairs["forward"]
  cos = cosines(jax_name, st_name)
  fwd_cos = cosines(fj_name, ft_name)
  lengths = [
      len(ids)
      for ids, _ in tokenizer.tokenize_unpadded(texts, max_length=max_length)
  ]
  tokens = _padded_tokens(texts, lengths, max_length, batch_size)
  rate = {
      n: len(texts) / statistics.median(times[n]) for n in (jax_name, st_name)
  }
  ratio = rate[jax_name] / rate[st_name]
  fwd_ratio = statistics.median(times[ft_name]) / statistics.median(
      times[fj_name]
  )
  rows = [
      [
          n,
          (
              f"{statistics.median(times[n]):.2f} "
              f"({min(times[n]):.2f}-{max(times[n]):.2f})"
          ),
          f"{rate[n]:.0f}",
          f"{rate[n] / rate[st_name]:.2f}",
      ]
      for n in (jax_name, st_name)
  ]
  t_torch = statistics.median(times[ft_name])
  fwd_rows = [
      [
          n,
          (
              f"{1e3 * statistics.median(times[n]):.0f} "
              f"({1e3 * min(times[n]):.0f}-{1e3 * max(times[n]):.0f})"
          ),
          f"{t_torch / statistics.median(times[n]):.2f}",
      ]
      for n in (fj_name, ft_name)
  ]
  n_bad = int(np.sum(cos < MIN_COSINE))
  attn = getattr(hf_model.config, "_attn_implementation", "unknown")
  return "\n".join([
      (
          f"{len(texts)} code-search documents, max_length={max_length} (tokens"
          f" per text after truncation: mean {np.mean(lengths):.0f};"
          f" {np.mean(np.asarray(lengths) == max_length):.0%} truncated),"
          f" batch_size={batch_size}, mean pooling, L2-normalised."
          f" torch.get_num_threads()={torch.get_num_threads()}, torch"
          f" attention: {attn}. {repeats} timed runs each after a warm-up,"
          " alternating."
      ),
      "",
      _table(
          [
              "library",
              "seconds median (range)",
              "texts/s",
              "throughput ratio vs sentence-transformers",
          ],
          rows,
      ),
      "",
      (
          f"Same-shape forward ([{batch_size}, {max_length}] batch, "
          f"{reps['forward']} runs each, alternating):"
      ),
      "",
      _table(
          ["forward", "ms median (range)", "speed ratio vs torch"], fwd_rows
      ),
      "",
      (
          f"- embeddings agree: min cosine {cos.min():.6f}, mean "
          f"{cos.mean():.6f}; {n_bad} of {len(texts)} below {MIN_COSINE} "
          f"({'OK' if n_bad == 0 else 'MISMATCH'}); same-shape forward min "
          f"cosine {fwd_cos.min():.6f}."
      ),
      (
          "- token positions computed (padding included): embed "
          f"{tokens['jax']:,} ({tokens['jax'] / tokens['real']:.2f}x the "
          f"{tokens['real']:,} real tokens), sentence-transformers "
          f"{tokens['st']:,} ({tokens['st'] / tokens['real']:.2f}x)."
      ),
      (
          f"- goal: embed texts/s >= {GOAL_EMBED_RATIO}x sentence-transformers:"
          f" {'met' if ratio >= GOAL_EMBED_RATIO else 'NOT met'} ({ratio:.2f}x;"
          f" same-shape forward {fwd_ratio:.2f}x)."
      ),
  ])


# ----------------------------------------------------------------------------


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  t_start = time.perf_counter()
  print("## Machine\n")
  print(machine_info(), flush=True)
  config = ft_config.get_config()
  unknown = sorted(set(_MODELS.value) - set(MODELS))
  if unknown:
    raise app.UsageError(
        f"Unknown --models {unknown}; expected some of {list(MODELS)}.")
  train_data = specs.load(config.data.spec, "train")

  if not _SKIP_TRAIN.value:
    pairs = specs.positive_pairs(train_data)
    mesh = sharding.make_mesh(tuple(config.mesh.items()))  # The binary's.
    results = []
    for name in _MODELS.value:
      steps, warmup = (
          (_STEPS.value, _WARMUP.value)
          if name == "minilm"
          else (_BERT_BASE_STEPS.value, _BERT_BASE_WARMUP.value)
      )
      print(
          f"\nPart 1: {name}, {warmup} warm-up + {steps} timed steps per "
          "configuration, round-robin.",
          flush=True,
      )
      methods = METHODS + (ABLATIONS if _ABLATIONS.value else ())
      results.append(
          bench_train(name, steps, warmup, config, pairs, mesh, methods))
    t, d, a = config.train, config.data, config.adapter
    print(
        "\n## Part 1: train step (batch: "
        f"{t.batch_size} queries x {d.query_max_length} tokens + "
        f"{t.batch_size} documents x {d.doc_max_length} tokens; "
        f"{config.optimizer.name}; LoRA r={a.rank}, alpha={a.alpha})\n"
    )
    for configs in results:
      print(format_train(configs) + "\n")
    print("Matmuls per step (jaxpr before XLA; HLO after optimization):\n")
    print(format_dots(results) + "\n")
    print("Largest saved activations (full fine-tuning):\n")
    for configs in results:
      print(f"- {configs[0].model}: {configs[0].dots.top_residuals}")
    print()
    print("Goals (LoRA on all linear layers vs full fine-tuning):\n")
    for configs in results:
      print(train_goals(configs))

  if not _SKIP_EMBED.value:
    print("\nPart 2: embed vs sentence-transformers.", flush=True)
    corpus = list(train_data.corpus.values())[: _NUM_TEXTS.value]
    report = bench_embed(
        corpus,
        _EMBED_MAX_LENGTH.value,
        _EMBED_BATCH_SIZE.value,
        _EMBED_REPEATS.value,
    )
    print("\n## Part 2: embed throughput\n")
    print(report)
  print(f"\nTotal wall time: {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
  app.run(main)
