r"""ReLoRA: LoRA with periodic merge-and-restart, as a train-loop helper.

Every `refresh_every` steps the LoRA adapters (`lowrank.adapters.inject`,
plain `"lora"` method) are merged into their base weights, re-initialised
(`A` kaiming-uniform, `B = 0`, so the model's function is unchanged), and
the optimizer moments of the adapter parameters are pruned: by default
each entry is zeroed with probability `prune_ratio = 0.999` (random
pruning, the official `--reset_optimizer_on_relora` default);
`method="magnitude"` keeps the largest `1 - prune_ratio` fraction of each
moment tensor instead (`--optimizer_magnitude_pruning`, which the README
recommends at 0.9); `prune_ratio=1` is a full reset. The learning rate
follows a jagged cosine schedule: one cosine envelope over the run, with a
linear re-warm-up after each restart (`jagged_cosine_schedule`). Sums of
successive rank-`r` updates reach a high-rank total update.

    # The official script's adapters: r = 128, alpha = 32, dropout 0.1,
    # and A = 0 until the first merge.
    adapters.inject(model, targets=r".*_proj", rank=128, alpha=32,
                    dropout=0.1, init="zeros")
    schedule = relora.jagged_cosine_schedule(
        1e-3, total_steps=10_000, warmup_steps=500, refresh_every=2_000,
        restart_warmup_steps=50)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, weight_decay=0.0))
    optimizer = nnx.Optimizer(model, tx, wrt=relora.trainable())
    losses = relora.train(model, optimizer, loss_fn, batches,
                          refresh_every=2_000)

`restart(model, optimizer_or_state, key, prune_ratio=...)` is the restart
alone, for custom loops.

Differences from the official code (Guitaricet/relora@176f37633fe0,
`torchrun_main.py`, `peft_pretraining/relora.py`, `training_utils.py`):

* Optimizer reset: random pruning at 0.999 is the default here as there
  (it was magnitude pruning at 0.999 before, a pairing the official code
  never uses).
* Full-rank warm start: the paper starts ReLoRA from a full-rank
  warm-up (`--warmed_up_model`; README: 5 000 of 20 000 steps at 250M).
  Not available as an argument: train the dense model first (e.g. with
  `lowrank.train`), then `inject` and run `train` with a fresh optimizer
  and schedule (the official code restarts the scheduler there too).
* Adapter settings belong to `adapters.inject`, not to this module: the
  official script uses `α/r = 32/128 = 0.25` (`inject`'s default `alpha`
  is the rank, `α/r = 1`), dropout 0.1 on the adapter input, and `A = 0`
  until the first merge (`init="zeros"`; the adapters then get no
  gradient in the first cycle, as there), as in the example above.
* The base layer's bias trains in the official code and stays frozen
  under `trainable()`; `wrt=nnx.Any(relora.trainable(),
  nnx.All(nnx.Param, nnx.PathContains("bias")))` trains it (bias-free
  LLaMA is unaffected).
* Restart timing: the official loop merges one step later, after the
  zero-learning-rate step that ends each cycle; here the restart follows
  step `k · refresh_every` and the zero-rate step is the first after it.
  One step; not available otherwise. A separate optimizer-reset period
  (`--cycle_length` differing from `--relora`) is not available either.
* The official optimizer is AdamW without weight decay and with gradient
  clipping at norm 1.0 (the example's `tx`); `optax.adamw`'s own default
  weight decay is 1e-4.

References:
  Lialin, Shivagunde, Muckatira, Rumshisky 2023, ReLoRA: High-Rank Training
  Through Low-Rank Updates, https://arxiv.org/abs/2307.05695
  (code: github.com/Guitaricet/relora)
"""

from collections.abc import Callable, Iterable
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from lowrank import presets
from lowrank.adapters import injection
from lowrank.adapters import lora
from lowrank.spectral import sst

ADAPTER_NAMES = ("lora_a", "lora_b")
PRUNE_METHODS = ("magnitude", "random")
_INIT_TAG, _PRUNE_TAG = 0x52454C4F, 0x5052554E


def trainable() -> Any:
  """What ReLoRA trains: adapters plus every parameter not under a `base`.

  The base weights of adapted layers stay frozen (they only change at
  merges); embeddings, norms and non-adapted layers train as usual. Use
  `wrt=nnx.LoRAParam` to train the adapters alone.
  """
  return nnx.Any(nnx.LoRAParam,
                 nnx.All(nnx.Param, nnx.Not(nnx.PathContains("base"))))


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _prune_leaf(x, ratio, method, key):
  if method == "magnitude":
    mag = jnp.abs(x)
    threshold = jnp.quantile(mag.reshape(-1).astype(jnp.float32), ratio)
    return jnp.where(mag > threshold, x, jnp.zeros_like(x))
  keep = jax.random.uniform(key, x.shape) >= ratio
  return jnp.where(keep, x, jnp.zeros_like(x))


def prune_moments(
    opt_state: Any,
    prune_ratio: float | int,
    *,
    method: str = "magnitude",
    key: jax.Array | None = None,
    names: tuple[str, ...] = ADAPTER_NAMES,
) -> Any:
  """Zeroes most of the optimizer state of the adapter parameters.

  Every floating-point leaf of `opt_state` whose key path contains one of
  `names` (the Adam moments `mu`/`nu` of `lora_a`/`lora_b`, which mirror the
  parameter tree) is pruned on its own; everything else (step counts,
  moments of other parameters) is returned unchanged.

  Args:
    opt_state: An optax state (plain arrays or NNX variables).
    prune_ratio: Fraction to zero, in `[0, 1]`. `"magnitude"` zeroes the
      entries at or below the `prune_ratio` quantile of `|x|` (so 0.99
      keeps the top 1%); 1 zeroes everything (a full reset), 0 nothing.
    method: `"magnitude"` or `"random"` (each entry kept with probability
      `1 - prune_ratio`, the default of `restart` and `train`).
    key: PRNG key, needed for `"random"`.
    names: Path components that mark adapter parameters.

  Returns:
    The pruned state (same structure).

  Raises:
    ValueError: On a bad ratio or method, or `"random"` without a key.
  """
  if not 0.0 <= prune_ratio <= 1.0:
    raise ValueError(f"prune_ratio must be in [0, 1]; got {prune_ratio!r}.")
  if method not in PRUNE_METHODS:
    raise ValueError(f"method must be one of {PRUNE_METHODS}; got {method!r}.")
  if method == "random" and key is None:
    raise ValueError("method='random' needs a key.")
  counter = [0]

  def prune(path, x):
    names_in_path = {_key_name(k) for k in path}
    if (not names_in_path & set(names) or not hasattr(x, "dtype")
        or not jnp.issubdtype(x.dtype, jnp.floating) or jnp.ndim(x) == 0):
      return x
    counter[0] += 1
    if prune_ratio == 0:
      return x
    if prune_ratio == 1:
      return jnp.zeros_like(x)
    leaf_key = None if key is None else jax.random.fold_in(key, counter[0])
    return _prune_leaf(x, prune_ratio, method, leaf_key)

  return jax.tree_util.tree_map_with_path(prune, opt_state)


def _adapters(model: nnx.Module):
  mods = injection.adapter_modules(model)
  if not mods:
    raise ValueError(
        "The model has no adapters; add LoRA with lowrank.adapters.inject "
        "first."
    )
  for name, m in mods.items():
    if m.method != "lora":
      raise ValueError(
          f"ReLoRA restarts plain LoRA adapters; {name!r} is "
          f"{m.method!r}."
      )
    if m.merged:
      raise ValueError(f"Adapter {name!r} is merged; unmerge it first.")
    if m.initialized_from_base:
      raise ValueError(
          f"Adapter {name!r} was initialised from its base ({m.init}); "
          "ReLoRA restarts need a zero-delta init such as 'kaiming'."
      )
  return mods


def merge_and_reinit(model: nnx.Module, key: jax.Array) -> nnx.Module:
  """Merges every LoRA adapter into its base, then re-initialises it.

  `A` is drawn kaiming-uniform (`U(±1/√d_in)`, PEFT's and ReLoRA's init)
  and `B` is zero, so the model computes the same function afterwards.

  Args:
    model: A model with plain LoRA adapters (modified in place).
    key: PRNG key for the new `A`s.

  Returns:
    `model`.

  Raises:
    ValueError: If there are no adapters, or some are not plain,
      unmerged, zero-delta-initialised LoRA.
  """
  mods = _adapters(model)
  for i, m in enumerate(mods.values()):
    m.merge()
    dtype = m.lora_a.get_value().dtype
    a = lora.init_a(jax.random.fold_in(key, i), (m.d_in, m.rank), m.d_in,
                    init="kaiming", dtype=dtype)
    b = jnp.zeros((m.rank, m.d_out), m.lora_b.get_value().dtype)
    m.set_peft_factors(a, b)
    m.merged = False
  return model


def restart(
    model: nnx.Module,
    opt_state: Any,
    key: jax.Array,
    *,
    prune_ratio: float | int = 0.999,
    method: str = "random",
) -> Any:
  """One ReLoRA restart: merge, re-initialise, prune the adapter moments.

  Args:
    model: A model with plain LoRA adapters (modified in place).
    opt_state: An `nnx.Optimizer` (updated in place and returned) or an
      optax state over a tree that contains the adapter parameters (a new,
      pruned state is returned).
    key: PRNG key (new `A`s; random pruning).
    prune_ratio: See `prune_moments` (the official default 0.999; 1 =
      reset).
    method: `"random"` (the official default) or `"magnitude"`.

  Returns:
    The optimizer (or the pruned state).

  Raises:
    ValueError: See `merge_and_reinit` and `prune_moments`.
  """
  # Tagged so that a key shared with `nnx.Rngs` streams (which fold in
  # small counters) does not reproduce the adapters' initial draws.
  key_init = jax.random.fold_in(key, _INIT_TAG)
  key_prune = jax.random.fold_in(key, _PRUNE_TAG)
  # Validate the pruning options before the model is touched.
  prune_moments({}, prune_ratio, method=method, key=key_prune)
  merge_and_reinit(model, key_init)
  if isinstance(opt_state, nnx.Optimizer):
    pure = nnx.as_pure(opt_state.opt_state)
    pruned = prune_moments(pure, prune_ratio, method=method, key=key_prune)
    nnx.update(opt_state.opt_state, nnx.state(pruned))
    return opt_state
  return prune_moments(opt_state, prune_ratio, method=method, key=key_prune)


_SOURCE = ("Guitaricet/relora@176f37633fe0 (torchrun_main.py, "
           "peft_pretraining/relora.py, peft_pretraining/training_utils.py)")
_UNAVAILABLE = (
    "the full-rank warm start: train the dense model first, then inject "
    "and train with a fresh optimizer and schedule",
    "the adapter settings are adapters.inject's arguments, not this "
    "preset's: inject(rank=r, alpha=r/4, dropout=0.1, init='zeros')",
    "the merge one step later (after the zero-learning-rate step) and a "
    "separate optimizer-reset period (--cycle_length)")
presets.register("relora_restart", source=_SOURCE, unavailable=_UNAVAILABLE)


def jagged_cosine_schedule(
    peak_value: float | int,
    *,
    total_steps: int,
    warmup_steps: int,
    refresh_every: int,
    restart_warmup_steps: int,
    min_ratio: float | int = 0.1,
) -> optax.Schedule:
  """ReLoRA's cosine schedule with a linear warm-up after every restart.

  The envelope is `peak · (min_ratio + (1 - min_ratio) · ½(1 + cos(π t')))`
  with `t' = (t - warmup_steps) / (total_steps - warmup_steps)` clipped to
  `[0, 1]`. Steps `t < warmup_steps` warm up linearly from 0 to `peak`.
  After each restart (`t = k · refresh_every`, `k >= 1`) the rate restarts
  at 0 and rises linearly over `restart_warmup_steps` to the envelope's
  value at the end of that warm-up, then follows the envelope.

  Args:
    peak_value: Peak learning rate.
    total_steps: Steps in the run (the cosine reaches `min_ratio` there).
    warmup_steps: Initial warm-up steps.
    refresh_every: Steps between restarts (ReLoRA's `relora`/reset
      interval; the restart happens after steps `k · refresh_every`).
    restart_warmup_steps: Warm-up steps after each restart,
      `<= refresh_every`.
    min_ratio: Final rate as a fraction of the peak.

  Returns:
    An `optax.Schedule` (traceable in the step count).

  Raises:
    ValueError: On inconsistent lengths or ratios.
  """
  for name, value, low in (("total_steps", total_steps, 1),
                           ("warmup_steps", warmup_steps, 0),
                           ("refresh_every", refresh_every, 1),
                           ("restart_warmup_steps", restart_warmup_steps, 0)):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")
  if warmup_steps >= total_steps:
    raise ValueError(
        f"warmup_steps ({warmup_steps}) must be < total_steps "
        f"({total_steps})."
    )
  if restart_warmup_steps > refresh_every:
    raise ValueError(
        f"restart_warmup_steps ({restart_warmup_steps}) must be <= "
        f"refresh_every ({refresh_every})."
    )
  if not 0.0 <= min_ratio <= 1.0:
    raise ValueError(f"min_ratio must be in [0, 1]; got {min_ratio!r}.")
  if not math.isfinite(peak_value):
    raise ValueError(f"peak_value must be finite; got {peak_value!r}.")
  decay_steps = total_steps - warmup_steps

  def envelope(t):
    progress = jnp.clip((t - warmup_steps) / decay_steps, 0.0, 1.0)
    cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return min_ratio + (1.0 - min_ratio) * cosine

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    cycle = jnp.floor(t / refresh_every)
    offset = t - cycle * refresh_every
    first = t / max(warmup_steps, 1)
    rewarm = (offset / max(restart_warmup_steps, 1)) * envelope(
        cycle * refresh_every + restart_warmup_steps)
    in_rewarm = (cycle >= 1) & (offset < restart_warmup_steps)
    factor = jnp.where(t < warmup_steps, first,
                       jnp.where(in_rewarm, rewarm, envelope(t)))
    return peak_value * factor

  return schedule


def train(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    loss_fn: Callable[..., jax.Array],
    batches: Iterable[Any],
    *,
    refresh_every: int,
    prune_ratio: float | int = 0.999,
    method: str = "random",
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
) -> list[float]:
  """Trains with ReLoRA restarts; returns the per-step losses.

  Args:
    model: A model with plain LoRA adapters (updated in place).
    optimizer: `nnx.Optimizer(model, tx, wrt=...)` (`trainable()` or
      `nnx.LoRAParam`); give `tx` a `jagged_cosine_schedule` with the
      same `refresh_every`.
    loss_fn: `(model, *batch) -> scalar` (a static jit argument: pass the
      same function object every time).
    batches: Iterable of batches; a tuple/list is unpacked into `loss_fn`.
    refresh_every: Restart after every `refresh_every` steps.
    prune_ratio: See `restart`.
    method: See `restart`.
    seed: Seed of the restart keys.
    callback: Called as `callback(step, loss)` after each step (1-based).

  Returns:
    The loss of every step, before its update.

  Raises:
    ValueError: On a bad `refresh_every` (and see `restart`).
  """
  if (isinstance(refresh_every, bool) or not isinstance(refresh_every, int)
      or refresh_every <= 0):
    raise ValueError(
        f"refresh_every must be a positive int; got {refresh_every!r}.")
  _adapters(model)
  key = jax.random.key(seed)
  losses = []
  for step, batch in enumerate(batches, start=1):
    args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    loss = float(sst.train_step(model, optimizer, loss_fn, *args))
    losses.append(loss)
    if callback is not None:
      callback(step, loss)
    if step % refresh_every == 0:
      restart(model, optimizer, jax.random.fold_in(key, step),
              prune_ratio=prune_ratio, method=method)
  return losses


presets.register("relora_train", source=_SOURCE, unavailable=_UNAVAILABLE)
