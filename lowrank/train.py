"""One training loop: state, step, loop, and optimizers/adapters from configs.

Every experiment binary (and a researcher's own script) trains the same way:

    graphdef, params, rest = train.split(model, wrt)        # pure pytrees
    tx = train.optimizer_from_config(config.optimizer, model=model)
    opt_state = train.init_opt_state(tx, params)            # safe to donate
    step = train.make_train_step(graphdef, loss_fn, tx)     # loss_fn(m, b)
    out = train.train_loop(step, params, opt_state, rest,
                           batch_fn=lambda s: make_batch(s),
                           num_steps=1000, workdir=workdir)

`train_loop` resumes from the latest checkpoint under `workdir/checkpoints`
(the step number, the optimizer state and the data position all come back:
`batch_fn` is a function of the step), saves every `checkpoint_every` steps
and at the end, writes metrics through `metric_writers.MetricWriter` (CSV,
TensorBoard) every `log_every` steps, evaluates every `eval_every` steps,
shows a progress bar on the main process, and is multi-process aware (every
process runs it; only process 0 writes files and prints).

Two configuration helpers make a config section map one-to-one onto a
factory's arguments: `optimizer_from_config` (the keys of
`config.optimizer` are exactly the named factory's keyword arguments, the
learning rate optionally an optax schedule given by name) and
`inject_from_config` (the keys of `config.adapter` are exactly
`adapters.inject`'s arguments).

The train step is either one jit (gradient and update fused) or two jits
(gradient, then a donated update): on XLA:CPU the split step ran the LLaMA
decoder 2-2.5x faster than the fused one (the fused program's scheduling of
the optimizer update after the backward pass is poor there), while on
accelerators the fused step avoids one round trip. `split=None` picks by
backend; `TrainStep.memory` always reports the fused program's compiled
memory, which is what a device has to hold.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import os
import time
from typing import Any, Callable, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import optax
import tqdm

from lowrank import adapters
from lowrank import checkpoint
from lowrank import distributed
from lowrank import metric_writers
from lowrank import optim
from lowrank import presets
from lowrank import sharding
from lowrank import spectral

PyTree = Any
Batch = Any
LossFn = Callable[[nnx.Module, Batch], Any]


# ----------------------------------------------------------------------------
# State.


def split(model: nnx.Module, wrt: Any = nnx.Param) -> tuple[Any, Any, Any]:
  """`(graphdef, params, rest)`: the trainable leaves `wrt` and the others.

  `params` and `rest` are pure pytrees of arrays (`nnx.as_pure`), ready for
  `jax.jit`, optax and checkpoints; `nnx.merge(graphdef, params, rest)`
  rebuilds the model.
  """
  graphdef, params, rest = nnx.split(model, wrt, ...)
  return graphdef, nnx.as_pure(params), nnx.as_pure(rest)


def init_opt_state(
    tx: optax.GradientTransformation,
    params: PyTree,
    *,
    shardings: PyTree | None = None,
) -> PyTree:
  """`tx.init(params)` in fresh buffers, so params and state can be donated.

  Some transformations' states alias parameter buffers at init (a copy of
  the parameters, a zero-size leaf shared with them); donating both to one
  step would then donate one buffer twice. `shardings` (e.g. from
  `sharding.shardings_like_params`) places the state; without it the state
  follows jit's default placement.
  """
  init = jax.jit(tx.init, out_shardings=shardings)
  state = init(params)
  return jax.tree.map(lambda x: jnp.array(x, copy=True), state)


def shardings(
    model: nnx.Module,
    wrt: Any,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
) -> tuple[PyTree, PyTree]:
  """`(param_shardings, opt_shardings)` from the logical-axis rules.

  The parameters `wrt` of `model` get `sharding.state_shardings`; the
  optimizer state follows the parameter each leaf belongs to
  (`sharding.shardings_like_params`: an Adam moment is sharded like its
  parameter, a GaLore projector on the dimensions it shares with it).
  Pass them to `init_opt_state` and `make_train_step`.
  """
  state = nnx.state(model, wrt)
  param_shardings = sharding.state_shardings(state, mesh)
  params = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      nnx.as_pure(state), param_shardings)
  opt_shardings = sharding.shardings_like_params(
      jax.eval_shape(tx.init, params), params)
  return param_shardings, opt_shardings


def mesh_from_config(section: Any) -> jax.sharding.Mesh:
  """The mesh of a config's `mesh` section (axis name -> size; a dict or a
  `ConfigDict`).

  Without a -1 size the mesh takes the first `prod(sizes)` devices (a
  `data=1, fsdp=1, tensor=1` run uses one device of eight); with one -1 it
  takes them all (`sharding.make_mesh` infers the size).
  """
  axes = {str(k): int(v) for k, v in section.items()}
  devices = jax.devices()
  if -1 not in axes.values():
    devices = devices[:max(math.prod(axes.values()), 0)]
  return sharding.make_mesh(axes, devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Batches split along their first axis over the mesh's data x fsdp."""
  return jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(("data", "fsdp")))


# ----------------------------------------------------------------------------
# The step.


def _loss_and_aux(loss_fn: LossFn, model: nnx.Module, batch: Batch):
  out = loss_fn(model, batch)
  if isinstance(out, tuple):
    if len(out) != 2 or not isinstance(out[1], Mapping):
      raise TypeError(
          "loss_fn(model, batch) must return a scalar loss or (loss, aux) "
          f"with aux a dict of scalars; got a tuple of {len(out)} items "
          f"({', '.join(type(o).__name__ for o in out)}).")
    return out
  return out, {}


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """A compiled-on-first-use train step; call it like a function.

  `step(params, opt_state, rest, batch) -> (params, opt_state, metrics)`,
  `metrics` a dict with `loss`, `grad_norm` and the loss function's aux.
  `params` and `opt_state` are donated: do not use the arguments after the
  call.

  Attributes:
    fused: The one-jit step (gradient and update in one program).
    grads: With `split`, the gradient jit `(params, rest, batch) -> (grads,
      metrics)`; else None.
    update: With `split`, the donated update jit `(params, opt_state, grads)
      -> (params, opt_state)`; else None.
    split: Whether calls run `grads` then `update` (True) or `fused`.
  """

  fused: Any
  grads: Any
  update: Any
  split: bool

  def __call__(self, params, opt_state, rest, batch):
    if not self.split:
      return self.fused(params, opt_state, rest, batch)
    grads, metrics = self.grads(params, rest, batch)
    params, opt_state = self.update(params, opt_state, grads)
    return params, opt_state, metrics

  def memory(self, params, opt_state, rest, batch) -> dict[str, int]:
    """Compiled memory of the fused step (`optim.compiled_memory`).

    Arguments may be concrete or `jax.ShapeDtypeStruct`s (nothing is
    allocated); the numbers are exact, not sampled.
    """
    lowered = self.fused.lower(params, opt_state, rest, batch)
    # Where the fused program only serves this report (split, on CPU), only
    # its buffer assignment is needed, which LLVM's optimisation level does
    # not change: compiling without LLVM's expensive passes gives the same
    # bytes about 3x faster.
    cheap = self.split and jax.default_backend() == "cpu"
    compiled = lowered.compile(_MEMORY_ONLY_OPTIONS if cheap else None)
    return optim.compiled_memory(compiled)


# XLA:CPU options for a program compiled only to read its memory analysis.
_MEMORY_ONLY_OPTIONS = {"xla_backend_optimization_level": 0,
                        "xla_llvm_disable_expensive_passes": True}


def make_train_step(
    graphdef: Any,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    split: bool | None = None,
    param_shardings: PyTree | None = None,
    opt_shardings: PyTree | None = None,
) -> TrainStep:
  """The train step for `loss_fn(model, batch) -> loss | (loss, aux)`.

  Args:
    graphdef: From `split(model, wrt)`; the step merges it with the params
      and the rest for every call of `loss_fn`.
    loss_fn: The model's loss on one batch: a scalar, or `(scalar, aux)`
      with `aux` a dict of scalars reported in the metrics.
    tx: The optax transformation.
    split: Two jits (gradient, then donated update) instead of one. `None`:
      two on CPU, one elsewhere (see the module docstring).
    param_shardings / opt_shardings: Output shardings of the updated params
      and optimizer state (so the next call reuses the compilation and the
      state stays where `init_opt_state` put it); None lets jit choose.

  Returns:
    A `TrainStep`.
  """
  if split is None:
    split = jax.default_backend() == "cpu"

  def grads_and_metrics(params, rest, batch):
    def loss(p):
      return _loss_and_aux(loss_fn, nnx.merge(graphdef, p, rest), batch)
    (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return grads, {"loss": value, "grad_norm": optax.tree.norm(grads), **aux}

  def apply(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  out = (param_shardings, opt_shardings)

  @functools.partial(jax.jit, donate_argnums=(0, 1),
                     out_shardings=(*out, None))
  def fused(params, opt_state, rest, batch):
    grads, metrics = grads_and_metrics(params, rest, batch)
    return (*apply(params, opt_state, grads), metrics)

  if not split:
    return TrainStep(fused=fused, grads=None, update=None, split=False)
  grads = jax.jit(grads_and_metrics)
  update = jax.jit(apply, donate_argnums=(0, 1), out_shardings=out)
  return TrainStep(fused=fused, grads=grads, update=update, split=True)


# ----------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class LoopResult:
  """What `train_loop` returns.

  Attributes:
    params, opt_state, rest: The final state.
    start_step: The step the run resumed from (0: a fresh start).
    train_seconds: Wall time of the steps this call ran.
    last_metrics: The last logged metrics (host floats): of this call's last
      logged step, or read back from the metrics of a finished run; {} if
      none.
    last_eval: The last `eval_fn` result; {} if none.
  """

  params: PyTree
  opt_state: PyTree
  rest: PyTree
  start_step: int
  train_seconds: float
  last_metrics: dict[str, float]
  last_eval: dict[str, float]


def _check_cadence(name: str, value: Any, *, zero_ok: bool) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or (
      value < 0 or (value == 0 and not zero_ok)):
    low = "an int >= 0 (0: never)" if zero_ok else "an int >= 1"
    raise ValueError(f"train_loop: {name} must be {low}; got {value!r}.")


def _place(batch: Batch, data_sharding: Any) -> Batch:
  if data_sharding is None:
    return jax.tree.map(jnp.asarray, batch)
  return distributed.host_to_global(batch, data_sharding)


def train_loop(
    step_fn: Callable[..., Any],
    params: PyTree,
    opt_state: PyTree,
    rest: PyTree,
    *,
    batch_fn: Callable[[int], Batch],
    num_steps: int,
    workdir: str,
    checkpoint_every: int = 100,
    log_every: int = 10,
    eval_every: int = 0,
    eval_fn: Callable[[PyTree, PyTree], Mapping[str, float]] | None = None,
    before_step: Callable[[int, PyTree, PyTree, PyTree],
                          tuple[PyTree, PyTree, PyTree]] | None = None,
    data_sharding: Any = None,
    save_rest: bool = False,
    max_to_keep: int = 2,
    desc: str = "train",
) -> LoopResult:
  """Runs (or resumes) `num_steps` steps of `step_fn`; checkpoints and logs.

  Args:
    step_fn: `(params, opt_state, rest, batch) -> (params, opt_state,
      metrics)`, e.g. `make_train_step(...)` (params and state donated).
    params, opt_state, rest: The initial state; replaced by the latest
      checkpoint under `workdir/checkpoints` when there is one (the arrays
      given set the restored layout and shardings).
    batch_fn: `step -> host batch` for steps 1..num_steps; a function of the
      step, so a resumed run sees exactly the batches an uninterrupted one
      does.
    num_steps: The total number of steps (a resumed run does the rest).
    workdir: Checkpoints go to `workdir/checkpoints`, metrics to
      `workdir/metrics.csv` and TensorBoard files (`MetricWriter`).
    checkpoint_every: Save every N steps (and always at the last step).
    log_every: Write the step's metrics every N steps (and at the last).
    eval_every: Call `eval_fn(params, rest)` every N steps and at the last
      step (0: only at the last step); its scalars are logged too.
    eval_fn: Optional evaluation returning a dict of scalars.
    before_step: Optional hook `(step, params, opt_state, rest) -> (params,
      opt_state, rest)` run before each step (e.g. ReLoRA's restarts); it
      must be a function of the step and state only, so that resuming
      replays it exactly.
    data_sharding: Places each host batch as global arrays
      (`distributed.host_to_global`; every process builds the same batch);
      None: `jnp.asarray` on the default device.
    save_rest: Also checkpoint `rest` (non-trainable state that changes
      during training, e.g. ReLoRA's merged base weights).
    max_to_keep: Checkpoints kept.
    desc: Progress bar label.

  Returns:
    A `LoopResult`. With nothing left to run (a finished run resumed),
    `eval_fn` is called once on the restored state.

  Raises:
    ValueError: On a non-positive `num_steps` or a bad cadence.
  """
  _check_cadence("num_steps", num_steps, zero_ok=False)
  _check_cadence("checkpoint_every", checkpoint_every, zero_ok=False)
  _check_cadence("log_every", log_every, zero_ok=False)
  _check_cadence("eval_every", eval_every, zero_ok=True)
  os.makedirs(workdir, exist_ok=True)

  def state_of(params, opt_state, rest):
    state = {"params": params, "opt_state": opt_state}
    if save_rest:
      state["rest"] = rest
    return state

  ckpt = checkpoint.Checkpointer(
      os.path.join(workdir, "checkpoints"), max_to_keep=max_to_keep,
      save_interval_steps=checkpoint_every)
  state, start = ckpt.restore_or_init(state_of(params, opt_state, rest))
  params, opt_state = state["params"], state["opt_state"]
  rest = state.get("rest", rest)
  if start:
    logging.info("%s: resumed from step %d.", desc, start)

  last_metrics: dict[str, float] = {}
  last_eval: dict[str, float] = {}
  t0 = time.perf_counter()
  with metric_writers.MetricWriter(workdir, resume_step=start) as writer:
    bar = tqdm.tqdm(range(start + 1, num_steps + 1), initial=start,
                    total=num_steps, desc=desc, unit="step",
                    disable=not distributed.is_main_process())
    for step in bar:
      if before_step is not None:
        params, opt_state, rest = before_step(step, params, opt_state, rest)
      batch = _place(batch_fn(step), data_sharding)
      params, opt_state, metrics = step_fn(params, opt_state, rest, batch)
      last = step == num_steps
      scalars: dict[str, float] = {}
      if step % log_every == 0 or last:
        last_metrics = {k: float(v) for k, v in
                        distributed.to_host(dict(metrics)).items()}
        scalars.update(last_metrics)
        if "loss" in last_metrics:
          bar.set_postfix(loss=f"{last_metrics['loss']:.4f}")
      if eval_fn is not None and (
          last or (eval_every and step % eval_every == 0)):
        last_eval = {k: float(v) for k, v in eval_fn(params, rest).items()}
        scalars.update(last_eval)
      if scalars:
        writer.write(step, scalars)
      ckpt.save(step, state_of(params, opt_state, rest), force=last)
    bar.close()
    logged = [r for r in writer.rows if "loss" in r]
  ckpt.wait_until_finished()
  ckpt.close()
  if eval_fn is not None and not last_eval:
    last_eval = {k: float(v) for k, v in eval_fn(params, rest).items()}
  if not last_metrics and logged:  # Nothing left to run: the last logged.
    last_metrics = {k: float(v) for k, v in logged[-1].items()
                    if k != "step" and v is not None and k not in last_eval}
  return LoopResult(params=params, opt_state=opt_state, rest=rest,
                    start_step=start,
                    train_seconds=time.perf_counter() - t0,
                    last_metrics=last_metrics, last_eval=last_eval)


@dataclasses.dataclass
class FitResult:
  """What `fit` returns: the loop's result plus what a results table needs.

  Attributes:
    model: The trained model (`nnx.merge` of the final state).
    loop: The `LoopResult` (final pure state, start step, timings, metrics).
    memory: Compiled memory of the fused step (`TrainStep.memory`).
    opt_state_bytes: Bytes of the optimizer state (`optim.state_bytes`).
    trainable_params: Number of trainable parameters (`wrt`).
  """

  model: nnx.Module
  loop: LoopResult
  memory: dict[str, int]
  opt_state_bytes: int
  trainable_params: int


def fit(
    model: nnx.Module,
    wrt: Any,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    section: Any,
    *,
    batch_fn: Callable[[int], Batch],
    workdir: str,
    mesh: jax.sharding.Mesh | None = None,
    eval_fn: Callable[[nnx.Module], Mapping[str, float]] | None = None,
    before_step: Callable[[int, nnx.Module, PyTree], PyTree] | None = None,
    save_rest: bool = False,
    split_step: bool | None = None,
    memory: bool = True,
    desc: str = "train",
) -> FitResult:
  """Trains `model`'s `wrt` leaves on `loss_fn` with `tx`: the whole recipe.

  `split`, `shardings` (with a mesh), `init_opt_state`, `make_train_step`,
  the step's compiled memory, then `train_loop` (resuming from
  `workdir/checkpoints`). Use the pieces directly for anything else.

  Args:
    model: The model (not modified; the result holds the trained one).
    wrt: The trainable leaves (an `nnx` filter).
    loss_fn: `(model, batch) -> loss | (loss, aux)`.
    tx: The optax transformation.
    section: The loop's cadences: a config section (or dict) with
      `num_steps`, `log_every`, `checkpoint_every`, `eval_every` (other keys,
      e.g. `batch_size`, are ignored).
    batch_fn: `step -> host batch` (see `train_loop`).
    workdir: Checkpoints and metrics go here.
    mesh: Shards params and optimizer state by the logical-axis rules and
      batches over data x fsdp; None: the default device.
    eval_fn: `model -> dict of scalars`, run every `eval_every` steps and at
      the end.
    before_step: `(step, model, opt_state) -> opt_state` run before each
      step; it may change the model in place (e.g. ReLoRA's merge and
      restart), which is split again afterwards.
    save_rest: Also checkpoint the non-trainable state (see `train_loop`).
    split_step: `make_train_step`'s `split`.
    memory: Report the fused step's compiled memory (one extra compile where
      the step runs split, e.g. on CPU); False: `FitResult.memory` is {}.
    desc: Progress bar label.

  Returns:
    A `FitResult`.
  """
  cadence = _plain(section)
  graphdef, params, rest = split(model, wrt)
  param_shardings = opt_shardings = data_sharding = None
  if mesh is not None:
    param_shardings, opt_shardings = shardings(model, wrt, tx, mesh)
    data_sharding = batch_sharding(mesh)
  opt_state = init_opt_state(tx, params, shardings=opt_shardings)
  step = make_train_step(graphdef, loss_fn, tx, split=split_step,
                         param_shardings=param_shardings,
                         opt_shardings=opt_shardings)
  compiled_memory = step.memory(
      params, opt_state, rest,
      _place(batch_fn(1), data_sharding)) if memory else {}
  opt_bytes = int(optim.state_bytes(opt_state))
  count = int(sum(x.size for x in jax.tree.leaves(params)))

  loop_eval = None
  if eval_fn is not None:
    loop_eval = lambda p, r: eval_fn(nnx.merge(graphdef, p, r))
  hook = None
  if before_step is not None:
    def hook(step_num, p, o, r):
      m = nnx.merge(graphdef, p, r)
      o = before_step(step_num, m, o)
      _, p, r = split(m, wrt)
      return p, o, r
  loop = train_loop(
      step, params, opt_state, rest, batch_fn=batch_fn,
      num_steps=cadence["num_steps"], workdir=workdir,
      checkpoint_every=cadence.get("checkpoint_every", 100),
      log_every=cadence.get("log_every", 10),
      eval_every=cadence.get("eval_every", 0), eval_fn=loop_eval,
      before_step=hook, data_sharding=data_sharding, save_rest=save_rest,
      desc=desc)
  return FitResult(model=nnx.merge(graphdef, loop.params, loop.rest),
                   loop=loop, memory=compiled_memory,
                   opt_state_bytes=opt_bytes,
                   trainable_params=count)


# ----------------------------------------------------------------------------
# From configs.


def _factories() -> dict[str, Callable[..., optax.GradientTransformation]]:
  """Optimizer factories by name: lowrank's first, then optax's."""
  names = {}
  for module in (optax, optim, spectral):
    for name in dir(module):
      fn = getattr(module, name)
      if (not name.startswith("_") and callable(fn)
          and not inspect.isclass(fn)):
        names[name] = fn
  return names


OPTIMIZERS = (
    "adamw", "adam", "sgd", "adafactor", "lion", "galore_adamw",
    "fira_adamw", "frugal_adamw", "q_galore_adamw", "adamw8bit",
    "owlore_adamw", "lisa_adamw", "sst_adamw",
)
"""The names `optimizer_from_config` is documented and tested with (any
public optax / `lowrank.optim` / `lowrank.spectral` factory works)."""


def _plain(section: Any) -> dict[str, Any]:
  if hasattr(section, "to_dict"):
    return section.to_dict()
  if isinstance(section, Mapping):
    return dict(section)
  raise TypeError(f"Expected a config section (ConfigDict or dict); got "
                  f"{type(section).__name__}.")


def schedule_from_config(value: Any) -> Any:
  """A learning rate: a number, or an optax schedule named with its args.

  `{"schedule": "warmup_cosine_decay_schedule", "init_value": 0.0,
  "peak_value": 1e-3, "warmup_steps": 100, "decay_steps": 1000}` calls
  `optax.warmup_cosine_decay_schedule(...)` with exactly those arguments;
  `"schedule"` may also name `lowrank.spectral.jagged_cosine_schedule`
  (ReLoRA's restarts) or any public schedule in `optax.schedules`.

  Raises:
    ValueError: On an unknown schedule name or arguments it does not take.
  """
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  kwargs = _plain(value)
  name = kwargs.pop("schedule", None)
  if not isinstance(name, str):
    raise ValueError(
        f"learning_rate must be a number or a dict with a 'schedule' name "
        f"(e.g. 'warmup_cosine_decay_schedule') and its arguments; got "
        f"{value!r}.")
  fn = getattr(spectral, name, None) or getattr(optax.schedules, name, None)
  if fn is None or not callable(fn):
    raise ValueError(
        f"Unknown learning-rate schedule {name!r}: expected a function of "
        f"optax.schedules (e.g. 'warmup_cosine_decay_schedule', "
        f"'constant_schedule') or 'jagged_cosine_schedule'.")
  _check_kwargs(f"schedule {name!r}", fn, kwargs)
  return fn(**kwargs)


def _check_kwargs(what: str, fn: Callable[..., Any],
                  kwargs: Mapping[str, Any]) -> None:
  params = inspect.signature(fn).parameters
  if any(p.kind == p.VAR_KEYWORD for p in params.values()):
    return
  unknown = sorted(set(kwargs) - set(params))
  if unknown:
    raise ValueError(
        f"{what} takes no argument {', '.join(map(repr, unknown))}; its "
        f"arguments are: {', '.join(params)}. The config keys are exactly "
        f"the factory's keyword arguments.")


def _with_preset(what: str, method: Any,
                 kwargs: dict[str, Any]) -> dict[str, Any]:
  """`kwargs` over `presets.paper(method)` when it holds `preset="paper"`."""
  preset = kwargs.pop("preset", None)
  if preset is None:
    return kwargs
  if preset != "paper":
    raise ValueError(
        f"{what}: preset must be 'paper' (the method's official settings, "
        f"lowrank.presets) or absent; got {preset!r}.")
  try:
    base = presets.paper(method)
  except KeyError as e:
    raise ValueError(f"{what}: preset='paper': {e.args[0]}") from None
  return {**base, **kwargs}


def optimizer_from_config(
    section: Any, *, model: nnx.Module | None = None
) -> optax.GradientTransformation:
  """The optax transformation named by a config section.

  The section's `name` picks the factory (a public function of
  `lowrank.optim`, `lowrank.spectral` or optax, in that order; e.g.
  `"adamw"`, `"galore_adamw"`, `"sst_adamw"`); every other key is passed
  as that factory's keyword argument of the same name, except
  `learning_rate`, which may be a schedule (`schedule_from_config`), and
  `preset="paper"`, which starts from the factory's paper settings
  (`lowrank.presets.paper`; the section's other keys override them).
  With `model` given, GaLore-family factories that take `stacked_axes` and
  were not given one get `optim.stacked_axes_from(model)` (one projector
  per layer of scan-stacked kernels).

  Example (ml_collections):

      config.optimizer = dict(name="galore_adamw", rank=128,
                              refresh_every=200, scale=0.25,
                              weight_decay=0.0, learning_rate=dict(
                                  schedule="warmup_cosine_decay_schedule",
                                  init_value=0.0, peak_value=1e-2,
                                  warmup_steps=100, decay_steps=10_000))

  Raises:
    ValueError: On an unknown name or a key the factory does not take.
  """
  kwargs = _plain(section)
  name = kwargs.pop("name", None)
  factories = _factories()
  if not isinstance(name, str) or name not in factories:
    raise ValueError(
        f"optimizer name must be one of lowrank.optim's, lowrank.spectral's "
        f"or optax's factories (e.g. {', '.join(OPTIMIZERS)}); got "
        f"{name!r}.")
  fn = factories[name]
  kwargs = _with_preset(f"optimizer {name!r}", fn, kwargs)
  _check_kwargs(f"optimizer {name!r}", fn, kwargs)
  if "learning_rate" in kwargs:
    kwargs["learning_rate"] = schedule_from_config(kwargs["learning_rate"])
  params = inspect.signature(fn).parameters
  if (model is not None and "stacked_axes" in params
      and kwargs.get("stacked_axes") is None):
    kwargs["stacked_axes"] = optim.stacked_axes_from(model)
  return fn(**kwargs)


def check_optimizer(section: Any, params: PyTree) -> None:
  """Raises if a GaLore-family section would project none of `params`.

  GaLore keeps low-rank state only for the matrices `optim.projected_leaves`
  selects (both sides larger than `rank`, matched by `project`); trained on
  adapter factors of rank <= `rank` it would silently be plain AdamW. Other
  optimizers pass.

  Raises:
    ValueError: Naming the leaves, `project` and `rank`, and the way out.
  """
  kwargs = _plain(section)
  fn = _factories().get(kwargs.get("name"))
  if fn is None or "project" not in inspect.signature(fn).parameters:
    return
  kwargs = _with_preset(f"optimizer {kwargs['name']!r}", fn, kwargs)
  defaults = inspect.signature(fn).parameters
  rank = kwargs.get("rank", defaults["rank"].default)
  project = kwargs.get("project", defaults["project"].default)
  if not optim.projected_leaves(params, rank=rank, project=project):
    raise ValueError(
        f"optimizer {kwargs['name']!r} would project no parameter: of the "
        f"{len(jax.tree.leaves(params))} trained leaves, none is a matrix "
        f"matched by project={project!r} with both sides > rank={rank}, so "
        f"it would be plain AdamW. Train full weights or lower the rank.")


def inject_from_config(
    model: nnx.Module, section: Any, *, rngs: Any = 0
) -> nnx.Module:
  """`adapters.inject(model, **section, rngs=rngs)`; a no-op for "full".

  The section's keys are exactly `adapters.inject`'s arguments (`method`,
  `targets`, `rank`, `alpha`, ... and the method's own options), plus
  `preset="paper"` (the method's paper settings, `lowrank.presets.paper`,
  under the section's other keys; with `quantize_base` set, the quantizer's
  too, e.g. QLoRA's bitsandbytes block layout). A section
  whose `method` is `"full"` or None leaves the model as it is (full
  fine-tuning).

  Raises:
    ValueError: On a method that is not an adapter method, or options the
      method does not take (from `adapters.inject`).
  """
  kwargs = _plain(section)
  method = kwargs.get("method", "lora")
  if method in (None, "full"):
    return model
  if method not in adapters.METHODS:
    raise ValueError(
        f"adapter method must be 'full' or one of {sorted(adapters.METHODS)}"
        f"; got {method!r}.")
  if kwargs.get("preset") == "paper" and kwargs.get("quantize_base"):
    # The quantized base's paper settings (QLoRA's bitsandbytes blocks)
    # under the method's and the section's own keys.
    kwargs = {**presets.paper("quantize_base"), **kwargs}
  kwargs = _with_preset(f"adapter method {method!r}", method, kwargs)
  return adapters.inject(model, rngs=rngs, **kwargs)
