r"""Rank control for LoRA with static shapes: DyLoRA, AdaLoRA, SoRA, IncreLoRA.

Every method here keeps a fixed maximal rank `r` (the wrapper's `rank`) and
switches rank-1 components on and off with a mask, a gate or a singular-value
vector, so shapes never change and a jitted train step is traced once:

  * `"dylora"`: nested ranks. `sample_rank(model, key)` draws a rank `b` per
    step; only the first `b` components are used, scaled `alpha / b`. After
    training any prefix rank works: `set_rank(model, b)`.
  * `"adalora"`: `ΔW = P diag(λ) Q` (PEFT's `lora_B`, `lora_E`, `lora_A`) with
    a rank mask (`AdapterState`). `update_importance` keeps PEFT's
    sensitivity x uncertainty EMAs; `apply_budget` follows PEFT's cubic budget
    schedule and masks the least important triplets;
    `orth_regularizer` is the orthogonality penalty on `P` and `Q`.
  * `"sora"`: a gate vector `g` between `A` and `B`, made sparse by the
    proximal (soft-threshold) step `lowrank.optim.sora_proximal`.
  * `"increlora"`: the SVD form of AdaLoRA, but starting from a small active
    rank and adding components to the most important modules at intervals
    (`grow_ranks`), with "advance learning" of reserved components.

`prune(model, rank=... | threshold=...)` fixes the active components and
`export_pruned(model)` replaces every wrapper here by a plain `method="lora"`
wrapper at its active (per-module) rank with the same outputs.

    adapters.inject(model, targets=..., method="adalora", rank=12,
                    target_rank=8, total_step=1000, tinit=100, tfinal=200)
    state = rank_control.init_importance(model)
    # in the (jitted) train step, after the optimizer update:
    state = rank_control.update_importance(state, grads, model)
    rank_control.apply_budget(model, state, step)

References:
  Valipour et al. 2023, DyLoRA, https://arxiv.org/abs/2210.07558
  Zhang et al. 2023, AdaLoRA, https://arxiv.org/abs/2303.10512
  Ding et al. 2023, SoRA, https://arxiv.org/abs/2311.11696
  Zhang et al. 2023, IncreLoRA, https://arxiv.org/abs/2308.12043
"""

from collections.abc import Mapping
import functools
import math
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from lowrank import presets
from lowrank import surgery
from lowrank.adapters import injection
from lowrank.adapters import layers
from lowrank.adapters import lora

# PEFT divides by `ranknum + 1e-5` (AdaLoRA) and so does IncreLoRA's code.
_RANKNUM_EPS = 1e-5
# Standard deviation of PEFT's AdaLoRA (and IncreLoRA) `lora_A` / `lora_B`.
_SVD_INIT_STD = 0.02
# Value of a reserved IncreLoRA singular value during "advance learning".
_RESERVE_E = 1e-5


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
  ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
  if not ok or value < low or (high is not None and value > high):
    span = f"[{low}, {high}]" if high is not None else f">= {low}"
    raise ValueError(f"{name} must be an int in {span}; got {value!r}.")
  return int(value)


def _check_beta(name: str, value) -> None:
  if isinstance(value, (int, float)) and not 0.0 < value < 1.0:
    raise ValueError(f"{name} must be in (0, 1); got {value}.")


def _svd_factors(wrapper, key, dtype):
  """PEFT AdaLoRA init: `P, Q ~ N(0, 0.02²)`, `λ = 0` (so `ΔW = 0`)."""
  key_a, key_b = jax.random.split(key)
  r = wrapper.rank
  a = jax.random.normal(key_a, wrapper.in_shape + (r,)) * _SVD_INIT_STD
  b = jax.random.normal(key_b, (r,) + wrapper.out_shape) * _SVD_INIT_STD
  wrapper.lora_a = wrapper._param(  # pylint: disable=protected-access
      a.astype(dtype), wrapper.in_dims + (None,))
  wrapper.lora_e = wrapper._param(  # pylint: disable=protected-access
      jnp.zeros((r,), dtype), (None,))
  wrapper.lora_b = wrapper._param(  # pylint: disable=protected-access
      b.astype(dtype), (None,) + wrapper.out_dims)


class RankControlWrapper(layers.LoRAWrapper):
  """Base of the rank-controlled wrappers: `ΔW2 = A2 diag(c) B2`.

  A subclass defines `component_scales()`: the effective multiplier `c` of
  each of the `rank` components (the adapter scale included; 0 for an
  inactive component). The forward pass folds `c` into `A` (an `[d_in, r]`
  product) and calls `lora.lora_apply`, so `ΔW` is never formed.
  """

  def factors_2d(self) -> tuple[jax.Array, jax.Array]:
    """`(A2 [d_in, r], B2 [r, d_out])`, the raw factors."""
    r = self.rank
    return (self.lora_a[...].reshape(self.d_in, r),
            self.lora_b[...].reshape(r, self.d_out))

  def component_scales(self) -> jax.Array:
    """Effective multiplier of each component, `[r]` float32."""
    raise NotImplementedError

  def _forward_factors(self, a2, b2):
    """Factors used in the forward pass (may differ in their gradients)."""
    return a2 * self.component_scales()[None, :], b2

  def adapter_out(self, x2: jax.Array) -> jax.Array:
    a2, b2 = self._forward_factors(*self.factors_2d())
    return lora.lora_apply(x2, a2.astype(x2.dtype), b2, 1.0)

  def delta_weight(self) -> jax.Array:
    a2, b2 = self.factors_2d()
    return lora.lora_delta(
        a2.astype(jnp.float32) * self.component_scales()[None, :], b2, 1.0)

  def active_mask(self) -> jax.Array:
    """Which components are active (trained and kept), `[r]` bool."""
    raise NotImplementedError

  def component_norms(self) -> jax.Array:
    """`‖c_i a_i b_iᵀ‖_F` for each component, `[r]` float32."""
    a2, b2 = self.factors_2d()
    a_norm = jnp.linalg.norm(a2.astype(jnp.float32), axis=0)
    b_norm = jnp.linalg.norm(b2.astype(jnp.float32), axis=1)
    return jnp.abs(self.component_scales()) * a_norm * b_norm

  def _keep_components(self, keep: np.ndarray) -> None:
    """Deactivates the components where `keep` is False (eager)."""
    raise NotImplementedError

  def peft_factors(self):
    raise ValueError(
        f"Method {self.method!r} has no plain-LoRA PEFT factors; call "
        "rank_control.export_pruned(model) first."
    )


_set = layers.assign


# ------------------------------------------------------------------ DyLoRA
class DyLoRAWrapper(RankControlWrapper):
  """DyLoRA: nested ranks, `ΔW_b = (alpha / b) A[:, :b] B[:b]`.

  Attributes (beyond `LoRAWrapper`'s):
    active_rank: `AdapterState` int32 scalar `b` (default `rank`), set by
      `sample_rank` during training and `set_rank` for evaluation.
    r_min: Smallest rank `sample_rank` draws.
    frozen: If True (default, the official training setting), only the
      `b`-th component gets gradients in a step (the paper's "frozen"
      update, which leaves the smaller ranks as they were); if False, all
      of the first `b` do.

  `merge` folds in `ΔW` at the current `b`; do not change `b` while merged.

  Differences from the official code (`huawei-noah/Efficient-NLP@
  bb44348bc897`, `DyLoRA/`): the scale `alpha / b`, the draw
  `b ~ U{1..r}` shared by the whole model and the frozen update match.
  (`frozen` defaulted to False before; the official training always sets
  `frozen=True`, `run_glue.py:552`, so that is the default now.) The
  official GLUE scripts use r = 8 with `lora_alpha` 16 (scale 16/b);
  lowrank's `alpha` defaults to `rank` (the library-wide convention): pass
  `alpha=16` or `preset="paper"`.
  """

  method = "dylora"
  option_names = ("r_min", "frozen")

  def _create(self, key, dtype, r_min=1, frozen=True):
    self.r_min = _check_int("r_min", r_min, 1, self.rank)
    if not isinstance(frozen, bool):
      raise ValueError(f"frozen must be a bool; got {frozen!r}.")
    self.frozen = frozen
    super()._create(key, dtype)
    self.active_rank = layers.AdapterState(jnp.asarray(self.rank, jnp.int32))

  def _rank_scale(self, b: jax.Array) -> jax.Array:
    b = b.astype(jnp.float32)
    return self.alpha / (jnp.sqrt(b) if self.rslora else b)

  def component_scales(self) -> jax.Array:
    b = self.active_rank[...]
    on = jnp.arange(self.rank) < b
    return on.astype(jnp.float32) * self._rank_scale(b)

  def active_mask(self) -> jax.Array:
    return jnp.arange(self.rank) < self.active_rank[...]

  def _forward_factors(self, a2, b2):
    col = self.component_scales()
    if self.frozen:
      last = jnp.arange(self.rank) == self.active_rank[...] - 1
      a2 = jnp.where(last[None, :], a2, jax.lax.stop_gradient(a2))
      b2 = jnp.where(last[:, None], b2, jax.lax.stop_gradient(b2))
    return a2 * col[None, :], b2

  def _keep_components(self, keep):
    b = int(np.argmin(np.append(keep, False)))  # Leading run of True.
    _set(self.active_rank, max(b, 1))


presets.register(
    "dylora",
    source="huawei-noah/Efficient-NLP@bb44348bc897 (DyLoRA/loralib/, "
    "DyLoRA/examples/NLU/)",
    kwargs={"alpha": 16},
    reasons={"alpha": (
        "every official GLUE script passes --lora_r 8 --lora_alpha 16 "
        "(roberta_base_*.sh), scale 16/b; lowrank's alpha defaults to rank "
        "(the library-wide convention).")},
)


# ----------------------------------------------------------------- AdaLoRA
class AdaLoRAWrapper(RankControlWrapper):
  """AdaLoRA: `ΔW2 = s · Q diag(λ ⊙ m) P` (kernel layout `[d_in, d_out]`).

  PEFT's `lora_A: [r, in]` is `lora_a.T` (our `[*in_shape, r]`), its
  `lora_E: [r, 1]` is `lora_e: [r]` and its `lora_B: [out, r]` is
  `lora_b.T` (our `[r, *out_shape]`). The scale is PEFT's
  `alpha / (r + 1e-5)` (`ranknum = r`, fixed) or `alpha / sqrt(r)` with
  rsLoRA. `rank_mask: [r]` is an `AdapterState`; `apply_budget` sets it and
  zeroes `λ` outside it as PEFT's `masked_fill_` does. By default
  (`mask_forward=True`) the forward pass multiplies by the mask too, with a
  straight-through gradient for `λ`: a masked `λ_i` still gets the
  gradient PEFT gives it (that of the loss at `λ_i = 0`), so a pruned
  triplet can come back at the next allocation, while the output never
  depends on masked entries. `init` is ignored (PEFT's initialisation:
  `P, Q ~ N(0, 0.02²)`, `λ = 0`).

  Options (used by `apply_budget`, PEFT's `AdaLoraConfig` names in brackets):
    target_rank: Average final rank per module [`target_r`].
    total_step: Total training steps [`total_step`].
    tinit: Warm-up steps at the initial budget [`tinit`].
    tfinal: Final steps at the target budget with a fixed mask [`tfinal`].
    delta_t: Steps between two allocations [`deltaT`].
    mask_forward: Whether the forward pass applies `rank_mask` (default
      True) or uses `λ` as it is (False, PEFT's).

  Differences from the official code (`huggingface/peft@5d602fdbff04`,
  `src/peft/tuners/adalora/`):

  * Between allocations (`delta_t > 1`) PEFT's forward uses `λ` as it is
    (`layer.py:195`): a masked `λ` that the optimizer regrows contributes
    until the next allocation zeroes it again. lowrank's default masks the
    forward (so the mask alone says which triplets are in the adapter);
    `mask_forward=False` gives PEFT's behaviour (`apply_budget` then zeroes
    `λ` at allocation steps and at every step of the final phase, as PEFT
    does). With `delta_t=1` both are the same.
  * Scale: PEFT's `lora_alpha` defaults to 8 (with `init_r` 12); lowrank's
    `alpha` to `rank` (the library-wide convention): `alpha=8`.
  * PEFT adds `orth_reg_weight · (mean of unsquared Frobenius norms)`
    (0.5) to the loss itself; here add
    `0.5 * orth_regularizer(model, reduction="peft")` to your loss.
  """

  method = "adalora"
  option_names = ("target_rank", "total_step", "tinit", "tfinal", "delta_t",
                  "mask_forward")

  def _create(self, key, dtype, target_rank=None, total_step=None, tinit=0,
              tfinal=0, delta_t=1, mask_forward=True):
    self.target_rank = (None if target_rank is None else
                        _check_int("target_rank", target_rank, 0))
    self.total_step = (None if total_step is None else
                       _check_int("total_step", total_step, 1))
    self.tinit = _check_int("tinit", tinit, 0)
    self.tfinal = _check_int("tfinal", tfinal, 0)
    self.delta_t = _check_int("delta_t", delta_t, 1)
    if not isinstance(mask_forward, bool):
      raise ValueError(
          f"mask_forward must be a bool (True: the forward applies the rank "
          f"mask; False: PEFT's, λ as it is); got {mask_forward!r}.")
    self.mask_forward = mask_forward
    if self.total_step is not None and (
        self.tinit >= self.total_step - self.tfinal):
      raise ValueError(
          f"AdaLoRA needs tinit < total_step - tfinal for a budgeting phase; "
          f"got tinit={tinit}, tfinal={tfinal}, total_step={total_step}."
      )
    _svd_factors(self, key, dtype)
    self.rank_mask = layers.AdapterState(jnp.ones((self.rank,), jnp.float32))
    if not self.rslora:
      self.scale = self.alpha / (self.rank + _RANKNUM_EPS)

  def component_scales(self) -> jax.Array:
    e = self.lora_e[...].astype(jnp.float32)
    if not self.mask_forward:
      return e * self.scale
    return e * self.rank_mask[...] * self.scale

  def _forward_factors(self, a2, b2):
    e = self.lora_e[...].astype(jnp.float32)
    if self.mask_forward:
      # Value `e * m`, gradient w.r.t. `e` unmasked (class docstring).
      e = e + jax.lax.stop_gradient(e * self.rank_mask[...] - e)
    return a2 * (e * self.scale)[None, :], b2

  def active_mask(self) -> jax.Array:
    return self.rank_mask[...] > 0

  def _keep_components(self, keep):
    m = jnp.asarray(keep, jnp.float32) * self.rank_mask[...]
    _set(self.rank_mask, m)
    _set(self.lora_e, self.lora_e[...] * m)


presets.register(
    "adalora",
    source="huggingface/peft@5d602fdbff04 (src/peft/tuners/adalora/)",
    kwargs={"alpha": 8, "mask_forward": False},
    reasons={
        "alpha": (
            "PEFT's lora_alpha default 8 (scale 8/(r + 1e-5)); lowrank's "
            "alpha defaults to rank (the library-wide convention)."),
        "mask_forward": (
            "PEFT's forward uses lambda as it is: pruned values the "
            "optimizer regrows count until the next allocation "
            "(delta_t > 1); lowrank masks the forward so the rank mask "
            "alone defines the adapter."),
    },
    unavailable=(
        "PEFT adds its orthogonality term to the loss itself; add "
        "0.5 * rank_control.orth_regularizer(model, reduction='peft') to "
        "the loss (not an inject argument).",),
)


# -------------------------------------------------------------------- SoRA
class SoRAWrapper(RankControlWrapper):
  """SoRA: `ΔW2 = s · A diag(g) B` with a trainable gate `g: [r]`.

  `A`, `B` are initialised as plain LoRA (`B = 0`), `g` as in the official
  code (`gate_init="normal"`: standard normal) or to ones. Train `g` with a
  proximal L1 step (`lowrank.optim.sora_proximal` / `sora_adamw`); components
  whose gate is exactly 0 are pruned by `export_pruned`.

  Differences from the official code (`TsinghuaC3I/SoRA@c275ac237b68`,
  `src/lora.py`): the gate between `A` and `B` and its `randn(1, r)` init
  match. The official `lora_alpha` is 16 (`config/lora_config.json`, any
  r), scale 16/r; lowrank's `alpha` defaults to `rank` (the library-wide
  convention): `alpha=16` or `preset="paper"`. The optimizer's differences
  (threshold, thresholding rule, L1 loss term) are in
  `lowrank.optim.sora.sora_adamw` (`presets.paper("sora_adamw")`).
  """

  method = "sora"
  option_names = ("gate_init",)

  def _create(self, key, dtype, gate_init="normal"):
    if gate_init not in ("normal", "ones"):
      raise ValueError(
          f"gate_init must be 'normal' or 'ones'; got {gate_init!r}.")
    self.gate_init = gate_init
    key_ab, key_g = jax.random.split(key)
    super()._create(key_ab, dtype)
    g = (jax.random.normal(key_g, (self.rank,)) if gate_init == "normal"
         else jnp.ones((self.rank,)))
    self.lora_g = self._param(g.astype(dtype), (None,))

  def component_scales(self) -> jax.Array:
    return self.lora_g[...].astype(jnp.float32) * self.scale

  def active_mask(self) -> jax.Array:
    return self.lora_g[...] != 0

  def _keep_components(self, keep):
    _set(self.lora_g, self.lora_g[...] * jnp.asarray(keep, jnp.float32))


presets.register(
    "sora",
    source="TsinghuaC3I/SoRA@c275ac237b68 (src/lora.py, "
    "config/lora_config.json, run_glue.py)",
    kwargs={"alpha": 16},
    reasons={"alpha": (
        "config/lora_config.json sets lora_alpha 16 for every r "
        "(run_glue.py:461-463 overrides only lora_r), scale 16/r; lowrank's "
        "alpha defaults to rank (the library-wide convention).")},
    unavailable=(
        "The optimizer's official settings are a separate preset: "
        "optim.sora_adamw(..., **presets.paper('sora_adamw')).",),
)


# --------------------------------------------------------------- IncreLoRA
class IncreLoRAWrapper(RankControlWrapper):
  """IncreLoRA: AdaLoRA's SVD form with a growing active rank.

  `rank_mask: [r]` (`AdapterState`) starts with `init_rank` ones and grows
  by `add_rank` components when `grow_ranks` selects the module. With
  `advance_learn` (the paper's default) the next `add_rank` inactive
  components are "reserved": they enter the forward pass with a fixed
  `λ = 1e-5`, so their `P`, `Q` train ahead of time; when activated their
  `λ` starts at `1e-5` and trains. `growing` (`AdapterState`, 1 or 0) turns
  the reserve off once the total target is reached. The scale is
  `alpha / (ranknum + 1e-5)` with `ranknum = Σ rank_mask`, as in the
  official code (`alpha / sqrt(ranknum)` with rsLoRA). `init` is ignored.

  Options (used by `grow_ranks`): `init_rank`, `add_rank`
  (`incre_rank_num`; default `None`: the official rule
  `{2: 1, 4: 2, 6: 3, 8: 4}[target]`, i.e. `max(1, target // 2)` with
  `target` the average target rank), `advance_learn`, `target_rank`
  (average final rank per module; `None`: `rank`), `warmup`
  (`init_warmup`), `interval` (`incre_interval`), `top_h` (modules grown
  per allocation).

  Differences from the official code (`FeiyuZhang98/IncreLoRA@
  51a2d734af78`, `loralib/loralib/increlora.py`, `NLU/`):

  * `add_rank` defaulted to 1 before; it now follows the official
    `incre_rank_num` rule above (`increlora.py:202-206`).
  * The official scripts set `init_warmup`/`incre_interval` 100 (CoLA,
    MRPC, RTE, STS-B; 500 or 1000 for the larger tasks), `lora_alpha` 32
    (16 for MNLI, QQP, SST-2), `top_h` 2 to 18 and dropout per task;
    lowrank's defaults (`warmup=0`, `interval=1`, `top_h=1`, `alpha=rank`)
    are generic. `preset="paper"` gives `alpha=32, warmup=100,
    interval=100`; pass `top_h` and `dropout` for your task.
  * Not available: the module score. The official one is
    `Σ|ΔW ⊙ ∇ΔW| / √numel` from a backward hook on the dense `ΔW`; here its
    factored counterpart (see `update_importance`), without forming `ΔW`.
  * Not available: the official `multi_lr` (every script): each group of
    new components gets its own warm-up/decay schedule and fresh Adam
    state. Here one optimizer and schedule cover all; with a shared Adam
    count a newly active `λ`'s first steps are up to
    `(1 - β1) / √(1 - β2)` (≈ 3.2 at the defaults) times fresh Adam's.
  * The official trainer adds `reg_orth_coef · (mean of unsquared
    Frobenius norms)` to the loss itself (0.1; 0.3 for RTE and STS-B);
    here add `0.1 * orth_regularizer(model, reduction="peft")` to your
    loss.
  * A module stops growing at `rank` (static shapes); the official code
    has no cap. Choose `rank` at least the largest final rank you expect.
  """

  method = "increlora"
  option_names = ("init_rank", "add_rank", "advance_learn", "target_rank",
                  "warmup", "interval", "top_h")

  def _create(self, key, dtype, init_rank=1, add_rank=None,
              advance_learn=True, target_rank=None, warmup=0, interval=1,
              top_h=1):
    self.init_rank = _check_int("init_rank", init_rank, 1, self.rank)
    if add_rank is None:
      # The official `incre_rank_num` rule, `{2: 1, 4: 2, 6: 3, 8: 4}`.
      target = self.rank if target_rank is None else target_rank
      add_rank = min(max(1, int(target) // 2), self.rank)
    self.add_rank = _check_int("add_rank", add_rank, 1, self.rank)
    if not isinstance(advance_learn, bool):
      raise ValueError(f"advance_learn must be a bool; got {advance_learn!r}.")
    self.advance_learn = advance_learn
    self.target_rank = (None if target_rank is None else _check_int(
        "target_rank", target_rank, init_rank))
    self.warmup = _check_int("warmup", warmup, 0)
    self.interval = _check_int("interval", interval, 1)
    self.top_h = _check_int("top_h", top_h, 1)
    _svd_factors(self, key, dtype)
    m = (jnp.arange(self.rank) < self.init_rank).astype(jnp.float32)
    self.rank_mask = layers.AdapterState(m)
    self.growing = layers.AdapterState(jnp.ones((), jnp.float32))

  def active_mask(self) -> jax.Array:
    return self.rank_mask[...] > 0

  def ranknum(self) -> jax.Array:
    return jnp.sum(self.rank_mask[...])

  def _scale_now(self) -> jax.Array:
    n = self.ranknum()
    if self.rslora:
      return self.alpha / jnp.sqrt(jnp.maximum(n, 1.0))
    return self.alpha / (n + _RANKNUM_EPS)

  def next_components(self) -> jax.Array:
    """The `add_rank` lowest-index inactive components, `[r]` float 0/1."""
    free = 1.0 - self.rank_mask[...]
    return free * (jnp.cumsum(free) <= self.add_rank)

  def reserve(self) -> jax.Array:
    """Reserved components in the forward pass (advance learning)."""
    if not self.advance_learn:
      return jnp.zeros((self.rank,), jnp.float32)
    return self.next_components() * self.growing[...]

  def _e_eff(self):
    e = self.lora_e[...].astype(jnp.float32)
    on = self.rank_mask[...] > 0
    return jnp.where(on, e, jnp.where(self.reserve() > 0, _RESERVE_E, 0.0))

  def component_scales(self) -> jax.Array:
    return self._e_eff() * self._scale_now()

  def _forward_factors(self, a2, b2):
    return a2 * self.component_scales()[None, :], b2

  def _orth_mask(self) -> jax.Array:
    """Components that exist in the official code: active and reserved."""
    return jnp.maximum(self.rank_mask[...], self.reserve())

  def _keep_components(self, keep):
    old_scale = self._scale_now()
    m = jnp.asarray(keep, jnp.float32) * self.rank_mask[...]
    _set(self.rank_mask, m)
    _set(self.growing, 0.0)
    # Fewer active components raise `alpha / ranknum`; rescale λ so that the
    # kept components contribute exactly as before.
    e = self.lora_e[...].astype(jnp.float32) * m
    _set(self.lora_e, e * (old_scale / self._scale_now()))


presets.register(
    "increlora",
    source="FeiyuZhang98/IncreLoRA@51a2d734af78 (loralib/loralib/"
    "increlora.py, NLU/scripts/)",
    kwargs={"alpha": 32, "warmup": 100, "interval": 100},
    reasons={
        "alpha": (
            "--lora_alpha 32 in the CoLA, MRPC, RTE, STS-B and QNLI scripts "
            "(16 for MNLI, QQP, SST-2); lowrank's alpha defaults to rank."),
        "warmup": (
            "--init_warmup 100 in the CoLA, MRPC, RTE and STS-B scripts "
            "(500 QNLI, 1000 MNLI, QQP, SST-2); lowrank's generic 0."),
        "interval": (
            "--incre_interval equals init_warmup in every script; "
            "lowrank's generic 1."),
    },
    unavailable=(
        "top_h (2 to 18) and lora_dropout (0 to 0.3) differ per task: pass "
        "them.",
        "The module score is the factored sum |theta * grad| over A, "
        "lambda, B, not |dW * grad dW| from a hook on the dense dW.",
        "multi_lr: per-group warm-up/decay schedules and fresh Adam state "
        "for new components.",
        "The orthogonality term is not added to the loss: add "
        "0.1 * rank_control.orth_regularizer(model, reduction='peft') "
        "(0.3 in the RTE and STS-B scripts).",
        "No rank cap in the official code: a module stops at rank here.",
    ),
)


layers.register("dylora", DyLoRAWrapper)
layers.register("adalora", AdaLoRAWrapper)
layers.register("sora", SoRAWrapper)
layers.register("increlora", IncreLoRAWrapper)


# ----------------------------------------------------------------- helpers
def _modules(model: nnx.Module, cls) -> dict[str, Any]:
  """Dotted path -> wrapper of class `cls`, sorted by path."""
  mods = {p: m for p, m in injection.adapter_modules(model).items()
          if isinstance(m, cls)}
  return dict(sorted(mods.items()))


def _require(model: nnx.Module, cls, what: str) -> dict[str, Any]:
  mods = _modules(model, cls)
  if not mods:
    raise ValueError(
        f"{what} needs {cls.method!r} adapters; the model has none (inject "
        f"with method={cls.method!r})."
    )
  return mods


def _same_option(mods: Mapping[str, Any], name: str):
  values = {getattr(m, name) for m in mods.values()}
  if len(values) != 1:
    raise ValueError(
        f"All adapters must share option {name!r}; found "
        f"{ {p: getattr(m, name) for p, m in mods.items()} }."
    )
  return values.pop()


def active_ranks(model: nnx.Module) -> dict[str, int]:
  """Number of active components of every rank-controlled adapter.

  DyLoRA: its rank `b`; AdaLoRA / IncreLoRA: the rank mask (reserved
  IncreLoRA components not counted); SoRA: the non-zero gates.
  """
  return {p: int(jnp.sum(m.active_mask()))
          for p, m in _modules(model, RankControlWrapper).items()}


# ------------------------------------------------------------- DyLoRA API
def set_rank(model: nnx.Module, rank: int | Mapping[str, int]) -> None:
  """Uses the first `rank` components of every DyLoRA adapter.

  Args:
    model: A model with `method="dylora"` adapters.
    rank: One rank for all of them, or `{path: rank}`; each must lie in
      `[1, r]` for an adapter of rank `r`.

  Raises:
    ValueError: Without DyLoRA adapters, for an unknown path or a rank out of
      range.
  """
  mods = _require(model, DyLoRAWrapper, "set_rank")
  if isinstance(rank, Mapping):
    unknown = sorted(set(rank) - set(mods))
    if unknown:
      raise ValueError(
          f"set_rank: no DyLoRA adapter at {unknown}; adapters: {list(mods)}.")
    wanted = dict(rank)
  else:
    wanted = {p: rank for p in mods}
  for p, b in wanted.items():
    m = mods[p]
    _set(m.active_rank, _check_int(f"rank of {p}", b, 1, m.rank))


def sample_rank(model: nnx.Module, key: jax.Array, *,
                per_module: bool = False) -> dict[str, jax.Array]:
  """Draws the DyLoRA training rank `b ~ U{r_min, ..., r}` (jit-friendly).

  One uniform draw is shared by all adapters unless `per_module`; an adapter
  with range `[r_min, r]` maps it to `r_min + floor(u (r - r_min + 1))`, so
  adapters with the same range get the same `b`.

  Args:
    model: A model with `method="dylora"` adapters.
    key: PRNG key (a fresh one per step).
    per_module: Independent draws per adapter.

  Returns:
    `{path: b}` (int32 scalars, possibly traced).

  Raises:
    ValueError: Without DyLoRA adapters.
  """
  mods = _require(model, DyLoRAWrapper, "sample_rank")
  keys = (jax.random.split(key, len(mods)) if per_module
          else [key] * len(mods))
  out = {}
  for (p, m), k in zip(mods.items(), keys):
    u = jax.random.uniform(k, ())
    span = m.rank - m.r_min + 1
    b = m.r_min + jnp.minimum(jnp.floor(u * span).astype(jnp.int32), span - 1)
    m.active_rank.set_value(b.astype(jnp.int32))
    out[p] = b
  return out


# ----------------------------------------------------- AdaLoRA / IncreLoRA
class ImportanceState(NamedTuple):
  """Importance scores of AdaLoRA / IncreLoRA adapters (PEFT's RankAllocator).

  Attributes:
    count: Number of `update_importance` calls; shape `()`, int32.
    sensitivity: `{path: {name: EMA of |θ ∇θ|}}` (PEFT's `exp_avg_ipt`): for
      AdaLoRA per element of `lora_a`, `lora_e`, `lora_b`; for IncreLoRA one
      scalar per module under `"module"`.
    uncertainty: Same structure: EMA of `|ipt - sensitivity|`
      (PEFT's `exp_avg_unc`).
  """

  count: jax.Array
  sensitivity: dict[str, dict[str, jax.Array]]
  uncertainty: dict[str, dict[str, jax.Array]]


_SVD_NAMES = ("lora_a", "lora_e", "lora_b")


def init_importance(model: nnx.Module) -> ImportanceState:
  """Zero importance state for every AdaLoRA and IncreLoRA adapter.

  Raises:
    ValueError: If the model has neither.
  """
  zeros = {}
  for p, m in _modules(model, RankControlWrapper).items():
    if isinstance(m, AdaLoRAWrapper):
      zeros[p] = {n: jnp.zeros(getattr(m, n).get_value().shape, jnp.float32)
                  for n in _SVD_NAMES}
    elif isinstance(m, IncreLoRAWrapper):
      zeros[p] = {"module": jnp.zeros((), jnp.float32)}
  if not zeros:
    raise ValueError(
        "init_importance needs 'adalora' or 'increlora' adapters; the model "
        "has none.")
  return ImportanceState(
      count=jnp.zeros([], jnp.int32),
      sensitivity=zeros,
      uncertainty=jax.tree.map(jnp.zeros_like, zeros),
  )


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _flat_arrays(tree) -> dict[str, jax.Array]:
  """`{dotted path: array}` for an nnx.State / nested dict / module."""
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, nnx.LoRAParam)
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and (
        path[-1].name == "value"):
      path = path[:-1]  # An nnx.Variable's value.
    out[".".join(_key_name(k) for k in path)] = leaf
  return out


def update_importance(
    state: ImportanceState,
    grads: Any,
    params: Any,
    *,
    beta1: jax.typing.ArrayLike = 0.85,
    beta2: jax.typing.ArrayLike = 0.85,
) -> ImportanceState:
  """One EMA step of the importance scores (PEFT's `update_ipt`).

  Element sensitivity is `ipt = |θ ⊙ ∇θ|`; `sensitivity ← β1 s + (1-β1) ipt`
  and `uncertainty ← β2 u + (1-β2) |ipt - sensitivity|` (with the updated
  sensitivity), as PEFT does. PEFT calls it after the optimizer step, with
  the gradient of that step and the updated parameters; do the same.
  IncreLoRA modules get one scalar per module:
  `Σ |θ ⊙ ∇θ| / sqrt(d_in d_out)` over their `A`, `λ`, `B` (the official
  code scores `|ΔW ⊙ ∇ΔW|`, which needs the dense `ΔW`; this is its
  factored counterpart).

  Args:
    state: From `init_importance` (or a previous call).
    grads: Gradients w.r.t. the `nnx.LoRAParam`s (the `nnx.State` from
      `nnx.grad(..., argnums=nnx.DiffState(0, nnx.LoRAParam))`, or a pure
      dict of it).
    params: The model, its `nnx.State`, or a pure dict of it.
    beta1: EMA factor of the sensitivity (PEFT's `beta1`).
    beta2: EMA factor of the uncertainty (PEFT's `beta2`).

  Returns:
    The new state.

  Raises:
    ValueError: On betas outside (0, 1) or gradients / parameters missing
      for an adapter in `state`.
  """
  _check_beta("beta1", beta1)
  _check_beta("beta2", beta2)
  g_flat, p_flat = _flat_arrays(grads), _flat_arrays(params)
  sens, unc = {}, {}
  for path, names in state.sensitivity.items():
    want = _SVD_NAMES if "module" in names else tuple(names)
    keys = [f"{path}.{n}" for n in want]
    missing = [k for k in keys if k not in g_flat or k not in p_flat]
    if missing:
      raise ValueError(
          f"update_importance: no gradient or parameter for {missing}; the "
          f"gradients have {sorted(g_flat)[:20]}."
      )
    ipt = {n: jnp.abs(p_flat[k].astype(jnp.float32)
                      * g_flat[k].astype(jnp.float32))
           for n, k in zip(want, keys)}
    if "module" in names:
      d = p_flat[keys[0]].size // p_flat[keys[1]].size  # d_in
      d_out = p_flat[keys[2]].size // p_flat[keys[1]].size
      ipt = {"module": sum(jnp.sum(v) for v in ipt.values())
                       / math.sqrt(d * d_out)}
    sens[path], unc[path] = {}, {}
    for n, v in ipt.items():
      s = beta1 * state.sensitivity[path][n] + (1 - beta1) * v
      sens[path][n] = s
      unc[path][n] = (beta2 * state.uncertainty[path][n]
                      + (1 - beta2) * jnp.abs(v - s))
  return ImportanceState(
      count=state.count + 1, sensitivity=sens, uncertainty=unc)


def adalora_budget(
    step: int,
    *,
    init_budget: int,
    target_budget: int,
    tinit: int,
    tfinal: int,
    total_step: int,
    delta_t: int = 1,
) -> tuple[int, bool]:
  """PEFT's AdaLoRA budget schedule (`RankAllocator.budget_schedule`).

  Initial budget up to `tinit`, then a cubic decrease
  `b(t) = ⌊(b0 - bT) (1 - (t - tinit) / (T - tfinal - tinit))³ + bT⌋`
  (computed in float64, as PEFT does), then the target budget after
  `T - tfinal`.

  Args:
    step: Global step (Python int).
    init_budget: Total initial rank (`Σ r`).
    target_budget: Total target rank (`target_r x number of modules`).
    tinit: Warm-up steps.
    tfinal: Final fine-tuning steps.
    total_step: Total steps `T`.
    delta_t: Steps between allocations.

  Returns:
    `(budget, mask_now)`: the budget and whether PEFT re-masks at `step`.
  """
  if step <= tinit:
    return init_budget, False
  if step > total_step - tfinal:
    return target_budget, True
  mul = 1 - (step - tinit) / (total_step - tfinal - tinit)
  budget = int((init_budget - target_budget) * (mul**3) + target_budget)
  return budget, step % delta_t == 0


@functools.lru_cache(maxsize=16)
def _budget_table(init_budget, target_budget, tinit, tfinal, total_step,
                  delta_t) -> np.ndarray:
  return np.asarray([
      adalora_budget(s, init_budget=init_budget, target_budget=target_budget,
                     tinit=tinit, tfinal=tfinal, total_step=total_step,
                     delta_t=delta_t)[0]
      for s in range(total_step + 1)
  ], np.int32)


def _schedule(mods) -> dict[str, int]:
  sched = {n: _same_option(mods, n) for n in AdaLoRAWrapper.option_names}
  if sched["total_step"] is None or sched["target_rank"] is None:
    raise ValueError(
        "apply_budget needs the AdaLoRA options total_step and target_rank "
        "(inject(..., method='adalora', total_step=..., target_rank=...)).")
  return sched


def budget_schedule(model: nnx.Module, step: int | jax.Array) -> jax.Array:
  """The AdaLoRA total budget at `step` for `model` (int32, jit-friendly)."""
  mods = _require(model, AdaLoRAWrapper, "budget_schedule")
  s = _schedule(mods)
  table = _budget_table(
      sum(m.rank for m in mods.values()), s["target_rank"] * len(mods),
      s["tinit"], s["tfinal"], s["total_step"], s["delta_t"])
  return jnp.asarray(table)[jnp.clip(step, 0, s["total_step"])]


def apply_budget(model: nnx.Module, state: ImportanceState,
                 step: int | jax.Array) -> jax.Array:
  """Re-allocates the AdaLoRA rank budget at `step` (PEFT's masking).

  Follows `AdaLoraModel.update_and_allocate`: before `T - tfinal`, every
  `delta_t` steps after `tinit`, the triplets `(P_i, λ_i, Q_i)` whose score
  `S(λ_i) + mean_j S(Q_ji) + mean_k S(P_ik)` (with `S = sensitivity x
  uncertainty`) is among the `Σ r - budget` smallest over all modules are
  masked; at `T - tfinal` the mask is set for the target budget and then
  kept. At every masking step and in the final phase `λ` is zeroed outside
  the mask. Works with a traced `step` under jit (shapes never change).

  Args:
    model: A model with `method="adalora"` adapters (modified in place).
    state: Importance state from `update_importance`.
    step: Global step.

  Returns:
    The total budget at `step` (int32).

  Raises:
    ValueError: Without AdaLoRA adapters, if their schedules differ or lack
      `total_step` / `target_rank`, or if `state` misses one of them.
  """
  mods = _require(model, AdaLoRAWrapper, "apply_budget")
  s = _schedule(mods)
  missing = sorted(set(mods) - set(state.sensitivity))
  if missing:
    raise ValueError(f"apply_budget: no importance state for {missing}.")
  budget = budget_schedule(model, step)
  init_budget = sum(m.rank for m in mods.values())
  t_end = s["total_step"] - s["tfinal"]
  step = jnp.asarray(step)
  recompute = ((step > s["tinit"]) & (step < t_end)
               & (step % s["delta_t"] == 0)) | (step == t_end)
  zero_e = recompute | (step > t_end)

  scores = []
  for p, m in mods.items():
    sc = {n: state.sensitivity[p][n] * state.uncertainty[p][n]
          for n in _SVD_NAMES}
    r = m.rank
    sa = sc["lora_a"].reshape(m.d_in, r).mean(axis=0)
    sb = sc["lora_b"].reshape(r, m.d_out).mean(axis=1)
    scores.append(sc["lora_e"] + sa + sb)
  flat = jnp.concatenate(scores)
  k = init_budget - budget
  # PEFT: torch.kthvalue(scores, k) and mask scores <= it; k = 0 keeps all.
  kth = jnp.sort(flat)[jnp.clip(k - 1, 0, flat.size - 1)]
  threshold = jnp.where(k > 0, kth, -jnp.inf)
  for (p, m), sc in zip(mods.items(), scores):
    new = jnp.where(recompute, (sc > threshold).astype(jnp.float32),
                    m.rank_mask[...])
    m.rank_mask.set_value(new)
    e = m.lora_e[...]
    m.lora_e.set_value(jnp.where(zero_e, e * new.astype(e.dtype), e))
  return budget


def orth_regularizer(model: nnx.Module, *, reduction: str = "sum"
                     ) -> jax.Array:
  """Orthogonality penalty of AdaLoRA / IncreLoRA `P` and `Q`.

  `R = Σ_modules ‖PᵀP - I‖²_F + ‖QQᵀ - I‖²_F` (the paper's Eq. 4; with our
  layout `Q = lora_a: [d_in, r]` gives `QᵀQ` and `P = lora_b: [r, d_out]`
  gives `PPᵀ`, both `[r, r]`). `reduction="peft"` is what PEFT adds to the
  loss before `orth_reg_weight`: the mean over all those matrices of the
  *unsquared* Frobenius norm. IncreLoRA counts only active and reserved
  components (the ones its official code has). Differentiable.

  Args:
    model: A model with AdaLoRA and/or IncreLoRA adapters.
    reduction: `"sum"` (paper) or `"peft"`.

  Returns:
    A float32 scalar.

  Raises:
    ValueError: On an unknown reduction or without such adapters.
  """
  if reduction not in ("sum", "peft"):
    raise ValueError(f"reduction must be 'sum' or 'peft'; got {reduction!r}.")
  mods = {p: m for p, m in _modules(model, RankControlWrapper).items()
          if isinstance(m, (AdaLoRAWrapper, IncreLoRAWrapper))}
  if not mods:
    raise ValueError(
        "orth_regularizer needs 'adalora' or 'increlora' adapters.")
  terms = []
  for m in mods.values():
    a2, b2 = m.factors_2d()
    a2, b2 = a2.astype(jnp.float32), b2.astype(jnp.float32)
    eye = jnp.eye(m.rank, dtype=jnp.float32)
    if isinstance(m, IncreLoRAWrapper):
      on = m._orth_mask()  # pylint: disable=protected-access
      outer = on[:, None] * on[None, :]
      a2, b2, eye = a2 * on[None, :], b2 * on[:, None], eye * outer
    for cov in (a2.T @ a2, b2 @ b2.T):
      sq = jnp.sum((cov - eye) ** 2)
      terms.append(sq if reduction == "sum" else jnp.sqrt(sq))
  total = sum(terms)
  return total / len(terms) if reduction == "peft" else total


adalora_orth_regularizer = orth_regularizer


def grow_ranks(model: nnx.Module, state: ImportanceState,
               step: int | jax.Array) -> jax.Array:
  """IncreLoRA's allocation step (`RankAllocator.update_and_increase`).

  While the total active rank is below `target_rank x modules`, at every
  `interval`-th step after `warmup` the `min(top_h, target - total)` modules
  with the largest score `sensitivity x uncertainty` (ties included, as in
  the official code) gain `add_rank` components (their reserved ones),
  whose `λ` starts at `1e-5` (0 without advance learning). A module already
  at its maximal rank `r` cannot grow (the official code has no cap; static
  shapes need one). Once the target is reached the reserve is switched
  off. Works with a traced `step` under jit.

  Args:
    model: A model with `method="increlora"` adapters (modified in place).
    state: Importance state from `update_importance`.
    step: Global step.

  Returns:
    The total active rank after this step (int32).

  Raises:
    ValueError: Without IncreLoRA adapters, if their schedules differ, or
      if `state` misses one of them.
  """
  mods = _require(model, IncreLoRAWrapper, "grow_ranks")
  missing = sorted(set(mods) - set(state.sensitivity))
  if missing:
    raise ValueError(f"grow_ranks: no importance state for {missing}.")
  warmup = _same_option(mods, "warmup")
  interval = _same_option(mods, "interval")
  top_h = _same_option(mods, "top_h")
  target = sum(m.rank if m.target_rank is None else m.target_rank
               for m in mods.values())
  ranks = jnp.stack([m.ranknum() for m in mods.values()])
  total = jnp.sum(ranks)
  step = jnp.asarray(step)
  grow = (step > warmup) & (step % interval == 0) & (total < target)
  caps = jnp.asarray([m.rank for m in mods.values()], jnp.float32)
  eligible = ranks < caps
  score = jnp.stack([state.sensitivity[p]["module"]
                     * state.uncertainty[p]["module"] for p in mods])
  score = jnp.where(eligible, score, -jnp.inf)
  k = jnp.clip(jnp.minimum(top_h, target - total), 1, len(mods))
  kth = jnp.sort(score)[::-1][(k - 1).astype(jnp.int32)]
  chosen = grow & eligible & (score >= kth)
  for i, m in enumerate(mods.values()):
    new = m.next_components() * chosen[i]
    m.rank_mask.set_value(m.rank_mask[...] + new)
    e = m.lora_e[...]
    start = _RESERVE_E if m.advance_learn else 0.0
    m.lora_e.set_value(jnp.where(new > 0, jnp.asarray(start, e.dtype), e))
  total = sum(jnp.sum(m.rank_mask[...]) for m in mods.values())
  still = (total < target).astype(jnp.float32)
  for m in mods.values():
    m.growing.set_value(jnp.minimum(m.growing[...], still))
  return total.astype(jnp.int32)


# ------------------------------------------------------------------ export
def prune(
    model: nnx.Module,
    *,
    rank: int | Mapping[str, int] | None = None,
    threshold: float | int | None = None,
) -> dict[str, int]:
  """Fixes which components of every rank-controlled adapter stay active.

  Components are ranked by their norm `‖c_i a_i b_iᵀ‖_F`. With `rank`, each
  adapter keeps its `rank` largest active components (DyLoRA: its first
  `rank`); with `threshold`, the components whose norm exceeds it (DyLoRA:
  the leading run of them, at least one). With neither, only inactive
  components are dropped and IncreLoRA stops growing. Pruned SoRA gates and
  AdaLoRA / IncreLoRA `λ` are set to 0; outputs of the kept components are
  unchanged (IncreLoRA's `λ` is rescaled for its smaller `ranknum`). Eager
  only.

  Args:
    model: A model with rank-controlled adapters (modified in place).
    rank: Rank to keep (one for all or `{path: rank}`), >= 1.
    threshold: Minimal component norm to keep, >= 0.

  Returns:
    `{path: active rank}` after pruning.

  Raises:
    ValueError: If both `rank` and `threshold` are given, on bad values, or
      without rank-controlled adapters.
  """
  if rank is not None and threshold is not None:
    raise ValueError("Give prune either rank or threshold, not both.")
  if threshold is not None and not threshold >= 0:
    raise ValueError(f"threshold must be >= 0; got {threshold}.")
  mods = _require(model, RankControlWrapper, "prune")
  if isinstance(rank, Mapping):
    unknown = sorted(set(rank) - set(mods))
    if unknown:
      raise ValueError(f"prune: no rank-controlled adapter at {unknown}.")
  for p, m in mods.items():
    norms = np.asarray(m.component_norms())
    active = np.asarray(m.active_mask())
    if isinstance(m, DyLoRAWrapper):
      # Nested: only prefixes are valid.
      b = int(m.active_rank[...])
      if rank is not None:
        want = rank.get(p, b) if isinstance(rank, Mapping) else rank
        b = _check_int(f"rank of {p}", want, 1, m.rank)
      elif threshold is not None:
        above = np.append(norms[:b] > threshold, False)
        b = max(int(np.argmin(above)), 1)
      keep = np.arange(m.rank) < b
    elif rank is not None:
      want = rank.get(p) if isinstance(rank, Mapping) else rank
      if want is None:
        keep = active
      else:
        want = _check_int(f"rank of {p}", want, 1, m.rank)
        order = np.argsort(-np.where(active, norms, -np.inf), kind="stable")
        keep = np.zeros(m.rank, bool)
        keep[order[:want]] = True
        keep &= active
    elif threshold is not None:
      keep = active & (norms > threshold)
    else:
      keep = active
    m._keep_components(keep)  # pylint: disable=protected-access
  return active_ranks(model)


def export_pruned(model: nnx.Module, *, seed: int = 0) -> nnx.Module:
  """Replaces every rank-controlled adapter by plain LoRA at its active rank.

  The new `method="lora"` wrapper has `rank = ` the number of active
  components, `alpha = rank` (scale 1) and factors `A' = A[:, k] ⊙ c[k]`,
  `B' = B[k]` over the active components `k`, so its output equals the
  masked adapter's. An adapter with no active component is replaced by its
  base module. Dropout and the enabled flag carry over. Call `prune` first
  to choose the ranks (for IncreLoRA it also drops the reserved components,
  whose tiny `λ = 1e-5` contribution is otherwise exported too). Eager
  only; the adapter must not be merged.

  Args:
    model: A model with rank-controlled adapters (modified in place).
    seed: Seed for the (immediately overwritten) LoRA initialisation.

  Returns:
    `model`.

  Raises:
    ValueError: Without rank-controlled adapters, or for a merged one.
  """
  mods = _require(model, RankControlWrapper, "export_pruned")
  merged = [p for p, m in mods.items() if m.merged]
  if merged:
    raise ValueError(f"export_pruned: unmerge these adapters first: {merged}.")
  for p, m in mods.items():
    col = np.asarray(m.component_scales())
    keep = np.flatnonzero(col != 0)
    if keep.size == 0:
      surgery.set_submodule(model, p, m.base)
      continue
    a2, b2 = m.factors_2d()
    a_new = (a2.astype(jnp.float32)[:, keep] * jnp.asarray(col[keep])[None, :])
    cls = layers.wrapper_for(m.base, "lora")
    r = int(keep.size)
    new = cls(
        m.base, rank=r, alpha=r, rslora=False,
        dropout=m.dropout.rate if m.dropout is not None else 0.0,
        init="kaiming", rngs=nnx.Rngs(seed),
    )
    new.set_peft_factors(a_new, b2[keep, :])
    new.enabled = m.enabled
    surgery.set_submodule(model, p, new)
  return model
