"""Layerwise sampled training (LISA, OwLore) as optax transformations.

`scale_by_layer_sampling(inner, num_layers=L, active_layers=k,
refresh_every=T)` runs any optax transform `inner` but lets only `k` of the
model's `L` layers train at a time: every `T` steps a PRNG held in the
state draws `k` distinct layers (without replacement), stored as a boolean
`[L]` mask.

* Which leaves belong to which layer is decided once, from key paths and
  shapes: a *stacked* leaf (`stacked=`, e.g. from `nnx.scan`) has a leading
  layer axis `[L, ...]` and is sliced along it; an unstacked leaf is mapped
  to a layer by `layer_of(path, leaf) -> int | None` (default: the number
  after `layers_` / `layer.` / `blocks/` ... in the key path). Leaves with
  no layer (embeddings, norms, head) always train, as in LISA.
* Inactive layers get exactly zero updates, and `inner` sees a zero
  gradient for them. Their slices of `inner`'s state are frozen: `inner`
  runs on the whole tree (shapes are static, so the moments exist), then
  the old state is selected back for inactive slices with `jnp.where`. So
  frozen moments are neither updated nor decayed. State shared by all
  leaves keeps counting: with `optax.scale_by_adam` as `inner`, a layer
  that has been active for `n` of the `t` steps so far gets the bias
  correction of step `t`, not `n`, so its steps are
  `(1 - b1^n) / (1 - b1^t) · sqrt((1 - b2^t) / (1 - b2^n))` times those of
  torch's per-parameter `step` (for a steady gradient): about 6x over a
  layer's first 10-20 active steps once `t` is in the thousands, with
  `b1 = 0.9`, `b2 = 0.999`. `scale_by_adam_per_slice` keeps one
  count per leading-axis slice (one per layer of a stacked leaf), which is
  frozen like the moments; `lisa_adamw` and `owlore_adamw` use it, so they
  follow torch LISA/OwLore. Likewise, schedules inside `inner` that run on
  its own step count (GaLore's basis refresh) see every step; see
  `owlore_adamw` for how that is kept consistent.
* Probabilities: `"uniform"` (LISA), `"owlore"` (proportional to each
  layer's outlier ratio, recomputed from `params` at every re-sampling; see
  `outlier_ratios`) or any `[L]` array of non-negative weights, such as the
  activation-aware ratios of `activation_outlier_ratios` (what the OwLore
  code loads from `metric_cache/`).

References:
  Pan et al. 2024, LISA, https://arxiv.org/abs/2403.17919
  Li et al. 2024, OwLore, https://arxiv.org/abs/2405.18380
  Yin et al. 2023, OWL (layerwise outlier ratio),
  https://arxiv.org/abs/2310.05175
"""

from collections.abc import Callable
import operator
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array
from jaxtyping import Bool
from jaxtyping import Float
import numpy as np
import optax

from lowrank import presets
from lowrank.optim import _adam as adam_lib
from lowrank.optim import galore

# Arguments that fix shapes or Python-side plans, or are callables that
# `inject_hyperparams` would mistake for schedules: pass them as
# `optax.inject_hyperparams(lisa_adamw, static_args=LISA_STATIC_ARGS)`, or
# `OWLORE_STATIC_ARGS` for `owlore_adamw`.
LISA_STATIC_ARGS = ("num_layers", "active_layers", "refresh_every", "seed",
                    "stacked", "layer_of", "mask")
OWLORE_STATIC_ARGS = LISA_STATIC_ARGS + ("rank", "galore_refresh_every",
                                         "project", "input_axes")
PROBABILITIES = ("uniform", "owlore")

_STACKED = "stacked"  # Plan entry of a leaf with a leading layer axis.
_LAYER_RX = re.compile(
    r"(?:^|[^A-Za-z0-9])(?:layers?|blocks?)(?:[_./]|'?\]\[|\[)'?(\d+)"
)

LayerOf = Callable[[str, Any], Any]
Stacked = str | Callable[[str, Any], bool] | None


class LayerSamplingState(NamedTuple):
  """State for `scale_by_layer_sampling`.

  Attributes:
    count: Number of `update` calls so far; shape `()`, int32. Layers are
      re-drawn when `count % refresh_every == 0`.
    key: Raw PRNG key data (`jax.random.key_data`, uint32) for the draws.
    active: `[num_layers]` bool mask of the layers trained by the last
      `update` (all False after `init`: nothing has been drawn yet).
    inner_state: State of `inner`; the slices of inactive layers are frozen.
  """

  count: jax.Array
  key: jax.Array
  active: jax.Array
  inner_state: optax.OptState


def default_layer_of(path: str, leaf: Any) -> int | None:
  """Layer index from a key path such as `['layers_3']['w']`, else None.

  Recognises `layer`/`layers`/`block`/`blocks` followed by `_`, `.`, `/`
  or an index bracket and a number: `layers_3`, `layer.3`, `blocks/3`,
  `['layers'][3]`, `.layers[3]`.
  """
  del leaf
  m = _LAYER_RX.search(path)
  return int(m.group(1)) if m else None


def _check_int(name: str, v: Any, low: int) -> None:
  if isinstance(v, bool) or not isinstance(v, int) or v < low:
    raise ValueError(f"{name} must be a Python int >= {low}; got {v!r}.")


def _make_plan(
    params: Any, num_layers: int, stacked: Stacked, layer_of: LayerOf | None
) -> list[Any]:
  """Static per-leaf plan: None (always trained), `_STACKED` or a layer."""
  if isinstance(stacked, str):
    rx = re.compile(stacked)
    is_stacked = lambda path, leaf: bool(rx.search(path))
  else:
    is_stacked = stacked
  plan = []
  for p, leaf in jax.tree_util.tree_leaves_with_path(params):
    path = jax.tree_util.keystr(p)
    index = layer_of(path, leaf) if layer_of is not None else None
    if is_stacked is not None and is_stacked(path, leaf):
      if index is not None:
        raise ValueError(
            f"Leaf {path} is stacked and also mapped to layer {index} by "
            "layer_of; make layer_of return None for stacked leaves."
        )
      if leaf.ndim == 0 or leaf.shape[0] != num_layers:
        raise ValueError(
            f"Stacked leaf {path} has shape {tuple(leaf.shape)}; its leading "
            f"(layer) dimension must equal num_layers={num_layers}."
        )
      plan.append(_STACKED)
    elif index is None:
      plan.append(None)
    else:
      if isinstance(index, bool):
        raise ValueError(f"layer_of returned a bool for {path}: {index!r}.")
      try:
        index = operator.index(index)
      except TypeError:
        raise ValueError(  # pylint: disable=raise-missing-from
            f"layer_of must return an int or None; got {index!r} for {path}."
        )
      if not 0 <= index < num_layers:
        raise ValueError(
            f"layer_of mapped {path} to layer {index}, outside "
            f"[0, num_layers={num_layers})."
        )
      plan.append(index)
  if plan and all(k is None for k in plan):
    raise ValueError(
        "No leaf belongs to a layer: pass `stacked=` (a regex over key paths "
        "or a predicate) for `[num_layers, ...]` leaves and/or `layer_of=`."
    )
  return plan


def _layer_mask(active: jax.Array, kind: Any, x: jax.Array) -> Any:
  """Mask broadcastable to `x`, or None when `x` is not per-layer."""
  if kind is None:
    return None
  if kind == _STACKED:
    if x.ndim == 0 or x.shape[0] != active.shape[0]:
      return None  # e.g. a `[0]` placeholder: not sliced by layer.
    return active.reshape((-1,) + (1,) * (x.ndim - 1))
  return active[kind]


def _outlier_ratios_from_plan(
    leaves: list[jax.Array], plan: list[Any], num_layers: int,
    alpha: jax.typing.ArrayLike,
) -> Float[Array, " L"]:
  """Per-layer outlier ratio of the matrices in `leaves` (see public fn)."""
  total = jnp.zeros((num_layers,), jnp.float32)
  count = np.zeros((num_layers,), np.float64)  # Static: from shapes only.
  used = []
  for x, kind in zip(leaves, plan):
    if kind is None or (x.ndim - (kind == _STACKED)) < 2:
      continue  # OWL counts weight matrices only (no biases, norm scales).
    a = jnp.abs(x.astype(jnp.float32))
    if kind == _STACKED:
      a = a.reshape(num_layers, -1)
      total = total + jnp.sum(a, axis=1)
      count += a.shape[1]
    else:
      total = total.at[kind].add(jnp.sum(a))
      count[kind] += a.size
    used.append((a, kind))
  count = np.maximum(count, 1.0)
  threshold = alpha * total / count.astype(np.float32)
  outliers = jnp.zeros((num_layers,), jnp.float32)
  for a, kind in used:
    if kind == _STACKED:
      n = jnp.sum(a > threshold[:, None], axis=1, dtype=jnp.int32)
      outliers = outliers + n.astype(jnp.float32)
    else:
      n = jnp.sum(a > threshold[kind], dtype=jnp.int32)
      outliers = outliers.at[kind].add(n.astype(jnp.float32))
  return outliers / count.astype(np.float32)


def outlier_ratios(
    params: Any,
    *,
    num_layers: int,
    stacked: Stacked = None,
    layer_of: LayerOf | None = default_layer_of,
    alpha: jax.typing.ArrayLike = 13.0,
) -> Float[Array, " L"]:
  """Per-layer outlier ratio `D_l` of the weights (OWL / OwLore), `[L]`.

  `D_l = #{(i, j) : |W_ij| > alpha · mean_l |W|} / #entries_l`, where the
  count and the mean run over all weight matrices (leaves with >= 2 dims
  per layer) of layer `l` together. This is the layerwise outlier
  distribution of OWL (Yin et al. 2023, Sec. 3), which OwLore uses as its
  sampling weight, with the score `A_ij = |W_ij|` only: OWL's score is
  `‖X_j‖₂ · |W_ij|` with input-activation norms from calibration data,
  which an optimizer does not see. `activation_outlier_ratios` computes
  that variant from given norms; pass its ratios as `probabilities=`.

  Args:
    params: Parameter tree (arrays).
    num_layers: Number of layers `L`.
    stacked: Which leaves carry a leading `[L, ...]` layer axis: a regex
      searched in the key path, a predicate `(path, leaf) -> bool`, or None.
    layer_of: `(path, leaf) -> int | None` for unstacked leaves.
    alpha: Outlier threshold multiple `M` (13 in the OwLore code's cached
      ratios, `metric_cache/llama2_7b_ratio_13.txt`).

  Returns:
    `[L]` float32 ratios in `[0, 1]` (0 for a layer without matrices).
  """
  _check_int("num_layers", num_layers, 1)
  plan = _make_plan(params, num_layers, stacked, layer_of)
  return _outlier_ratios_from_plan(
      [jnp.asarray(x) for x in jax.tree.leaves(params)], plan, num_layers,
      alpha)


def activation_outlier_ratios(
    params: Any,
    input_norms: Any,
    *,
    num_layers: int,
    stacked: Stacked = None,
    layer_of: LayerOf | None = default_layer_of,
    alpha: jax.typing.ArrayLike = 13.0,
) -> Float[Array, " L"]:
  """OWL's activation-aware layer outlier ratios (OwLore's scores), `[L]`.

  As `outlier_ratios` with OWL's score `A_ij = ‖X_i‖₂ · |W_ij|`, where
  `‖X_i‖₂` is the norm of input feature `i` of the matrix over calibration
  tokens (luuyin/OWL `lib/prune_all.py`: `|W| · sqrt(scaler_row)`, all of a
  layer's matrices flattened together, outliers above `alpha` times their
  mean). Computed once, before training, and passed as
  `owlore_adamw(probabilities=...)`, this reproduces the official OwLore
  sampling, which reads such precomputed ratios from a file and keeps them
  fixed (the official ratios are percentages; the scale does not matter).

  Args:
    params: Parameter tree (arrays); kernels are `[..., in, out]` (flax
      layout: a torch `[out, in]` weight must be transposed).
    input_norms: Mapping from a matrix leaf's key path
      (`jax.tree_util.keystr`, e.g. `"['stack']['w']"`) to its input
      feature norms, shaped like the leaf without its last axis (`[in]`, or
      `[L, in]` for a stacked leaf), e.g.
      `jnp.linalg.norm(x.reshape(-1, d_in), axis=0)` of the activations `x`
      that enter the matrix. Every matrix (>= 2 dims per layer) of every
      layer needs an entry.
    num_layers: Number of layers `L`.
    stacked: As in `outlier_ratios`.
    layer_of: As in `outlier_ratios`.
    alpha: Outlier threshold multiple `M` (13 for OwLore's cached ratios).

  Returns:
    `[L]` float32 ratios in `[0, 1]`.

  Raises:
    ValueError: If a matrix of a layer has no entry in `input_norms`, an
      entry's shape is not the leaf's shape without its last axis, or an
      entry names no matrix of a layer.
  """
  _check_int("num_layers", num_layers, 1)
  plan = _make_plan(params, num_layers, stacked, layer_of)
  norms = dict(input_norms)
  matrices = [
      jax.tree_util.keystr(q)
      for (q, y), k in zip(jax.tree_util.tree_leaves_with_path(params), plan)
      if k is not None and y.ndim - (k == _STACKED) >= 2]
  scored, used = [], set()
  for (path, x), kind in zip(jax.tree_util.tree_leaves_with_path(params),
                             plan):
    key = jax.tree_util.keystr(path)
    if kind is None or (x.ndim - (kind == _STACKED)) < 2:
      scored.append(jnp.asarray(x))
      continue
    if key not in norms:
      raise ValueError(
          f"input_norms has no entry for the matrix {key} {tuple(x.shape)}; "
          f"expected the norms of its {x.shape[-2]} input features over "
          "calibration tokens, shaped like the leaf without its last axis "
          f"{tuple(x.shape[:-1])}. Matrices of layers: {matrices}.")
    n = jnp.asarray(norms[key], jnp.float32)
    if n.shape != x.shape[:-1]:
      raise ValueError(
          f"input_norms[{key!r}] has shape {n.shape}; expected "
          f"{tuple(x.shape[:-1])} (the leaf {tuple(x.shape)} without its "
          "last, output axis; transpose torch-layout [out, in] weights).")
    used.add(key)
    scored.append(jnp.abs(x.astype(jnp.float32)) * n[..., None])
  unused = sorted(set(norms) - used)
  if unused:
    raise ValueError(
        f"input_norms names no matrix of a layer: {unused}; keys are "
        "jax.tree_util.keystr paths of the parameter leaves.")
  return _outlier_ratios_from_plan(scored, plan, num_layers, alpha)


def _floored(
    weights: Float[Array, " L"], floor: jax.typing.ArrayLike
) -> Float[Array, " L"]:
  """`(1 - floor) · w / Σw + floor / L`; uniform when `Σw == 0`."""
  total = jnp.sum(weights)
  n = weights.shape[0]
  p = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 1 / n)
  return (1 - floor) * p + floor / n


def _static_probabilities(probabilities: Any, num_layers: int,
                          active_layers: int) -> Any:
  """Validates a user `[L]` weight array; returns it as float32."""
  p = jnp.asarray(probabilities, jnp.float32)
  if p.shape != (num_layers,):
    raise ValueError(
        f"probabilities must have shape ({num_layers},); got {p.shape}."
    )
  try:
    values = np.asarray(p)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return p  # Traced (e.g. by `inject_hyperparams` under jit): unchecked.
  if not np.all(np.isfinite(values)) or np.any(values < 0):
    raise ValueError("probabilities must be finite and non-negative.")
  if np.count_nonzero(values) < active_layers:
    raise ValueError(
        f"probabilities has {np.count_nonzero(values)} non-zero entries; "
        f"need at least active_layers={active_layers}."
    )
  return p


def _draw(
    key: jax.Array, probs: Float[Array, " L"] | None, num_layers: int,
    active_layers: int,
) -> Bool[Array, " L"]:
  """`active_layers` distinct layers as a `[num_layers]` bool mask."""
  idx = jax.random.choice(
      key, num_layers, (active_layers,), replace=False, p=probs
  )
  return jnp.zeros((num_layers,), jnp.bool_).at[idx].set(True)


class ScaleByAdamPerSliceState(NamedTuple):
  """State for `scale_by_adam_per_slice`.

  Attributes:
    count: Per-leaf int32 step counts of shape `leaf.shape[:1]` (one per
      layer of a stacked `[L, ...]` leaf; `[]` for scalars).
    mu: First moments, like `params`.
    nu: Second moments, like `params`.
  """

  count: optax.Updates
  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam_per_slice(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
) -> optax.GradientTransformation:
  """`optax.scale_by_adam` with one bias-correction count per leading slice.

  Equal to `optax.scale_by_adam` on its own. Inside
  `scale_by_layer_sampling`, the counts of frozen layers are restored with
  their moments, so each layer's bias correction counts only its own
  active steps (torch's per-parameter `step`). A non-stacked leaf keeps
  `shape[0]` identical counts (a few bytes per row). `b1`, `b2`, `eps` and
  `eps_root` are `optax.scale_by_adam`'s.
  """

  return adam_lib.scale_by_adam_counted(
      b1, b2, eps, eps_root, count_shape=lambda shape: shape[:1],
      state=ScaleByAdamPerSliceState)


class _Entry:
  """Plan entry wrapped as an opaque pytree leaf."""

  def __init__(self, kind):
    self.kind = kind


def _state_plan(inner, inner_state, plan: list[Any], treedef) -> list[Any]:
  """Plan entry of each leaf of `inner_state` (None: not per-parameter).

  Uses `optax.tree_map_params`, which finds the copies of the parameter tree
  inside a state (moments, projectors, factored rows...) by initialising
  `inner` on a placeholder; falls back to matching sub-trees that have the
  parameters' tree structure.
  """
  state_leaves = jax.tree.leaves(inner_state)
  plan_tree = treedef.unflatten([_Entry(k) for k in plan])
  try:
    mapped = optax.tree_map_params(
        inner, lambda _, e: e, inner_state, plan_tree,
        transform_non_params=lambda v: jax.tree.map(lambda _: _Entry(None), v),
    )
    kinds = [e.kind for e in jax.tree.leaves(mapped)]
    if len(kinds) == len(state_leaves):
      return kinds
  except Exception:  # pylint: disable=broad-exception-caught
    pass  # `inner.init` rejected the placeholder; use the structural rule.
  single = treedef.num_nodes == 1  # Bare-array params: any leaf matches.
  nodes = jax.tree.leaves(
      inner_state, is_leaf=lambda v: jax.tree.structure(v) == treedef
  )
  kinds = []
  for node in nodes:
    leaves = jax.tree.leaves(node)
    if jax.tree.structure(node) != treedef:
      kinds.extend([None] * len(leaves))
    elif single:  # Guard against counters and PRNG keys.
      x = leaves[0]
      kinds.append(plan[0] if jnp.issubdtype(x.dtype, jnp.inexact) else None)
    else:
      kinds.extend(plan)
  return kinds


def scale_by_layer_sampling(
    inner: optax.GradientTransformation,
    *,
    num_layers: int,
    active_layers: int,
    refresh_every: int,
    stacked: Stacked = None,
    layer_of: LayerOf | None = default_layer_of,
    probabilities: str | jax.typing.ArrayLike = "uniform",
    owlore_alpha: jax.typing.ArrayLike = 13.0,
    owlore_floor: jax.typing.ArrayLike = 0.01,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """Trains `active_layers` of `num_layers` layers, re-drawn periodically.

  Args:
    inner: Any optax transform (it receives `params` and `**extra_args`);
      it sees zero gradients for inactive layers, and its state slices for
      them are restored after each step (module docstring).
    num_layers: Number of layers `L` (Python int; static).
    active_layers: Layers trained at a time, `1 <= k <= L` (static).
    refresh_every: Steps between draws (static); draws happen at
      `count % refresh_every == 0`, including the first step.
    stacked: Leaves with a leading `[L, ...]` layer axis: a regex searched in
      the key path (`jax.tree_util.keystr`), a predicate `(path, leaf) ->
      bool`, or None. Their leading dimension must equal `num_layers`.
    layer_of: `(path, leaf) -> int | None` for unstacked leaves; None maps
      nothing. Leaves with no layer always train.
    probabilities: `"uniform"` (LISA), `"owlore"` (outlier-weighted, needs
      `params` in `update`) or an `[L]` array of non-negative weights.
    owlore_alpha: Outlier threshold `M` of `outlier_ratios`.
    owlore_floor: OwLore probabilities are `(1 - floor) · D_l / Σ D +
      floor / L`, so every layer can be drawn (uniform if all `D_l` are 0).
    seed: PRNG seed for the draws.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: On `active_layers > num_layers`, a non-positive count or
      refresh_every, an unknown `probabilities`, a stacked leaf whose leading
      dimension is not `num_layers`, a `layer_of` index out of range, or
      parameters with no layer at all.

  References:
    Pan et al. 2024, LISA, https://arxiv.org/abs/2403.17919
    Li et al. 2024, OwLore, https://arxiv.org/abs/2405.18380
  """
  return _scale_by_layer_sampling(
      inner, num_layers=num_layers, active_layers=active_layers,
      refresh_every=refresh_every, stacked=stacked, layer_of=layer_of,
      probabilities=probabilities, owlore_alpha=owlore_alpha,
      owlore_floor=owlore_floor, seed=seed, pass_active=False)


def _scale_by_layer_sampling(
    inner: optax.GradientTransformation, *, num_layers: int,
    active_layers: int, refresh_every: int, stacked: Stacked,
    layer_of: LayerOf | None, probabilities: str | jax.typing.ArrayLike,
    owlore_alpha: jax.typing.ArrayLike, owlore_floor: jax.typing.ArrayLike,
    seed: int, pass_active: bool,
) -> optax.GradientTransformationExtraArgs:
  """`scale_by_layer_sampling`; `pass_active` also hands `inner` the `[L]`
  mask of this step's layers as the extra argument `layer_active`."""
  _check_int("num_layers", num_layers, 1)
  _check_int("active_layers", active_layers, 1)
  _check_int("refresh_every", refresh_every, 1)
  _check_int("seed", seed, 0)
  if active_layers > num_layers:
    raise ValueError(
        f"active_layers={active_layers} exceeds num_layers={num_layers}."
    )
  if isinstance(owlore_floor, (int, float)) and not 0 <= owlore_floor <= 1:
    raise ValueError(f"owlore_floor must be in [0, 1]; got {owlore_floor}.")
  if isinstance(probabilities, str):
    if probabilities not in PROBABILITIES:
      raise ValueError(
          f"Unknown probabilities {probabilities!r}; expected one of "
          f"{PROBABILITIES} or an array of shape ({num_layers},)."
      )
    fixed_probs = None
  else:
    fixed_probs = _static_probabilities(
        probabilities, num_layers, active_layers
    )
  inner = optax.with_extra_args_support(inner)

  def _plan(tree):
    return _make_plan(tree, num_layers, stacked, layer_of)

  def init_fn(params):
    _plan(params)  # Validates the layer assignment eagerly.
    return LayerSamplingState(
        count=jnp.zeros([], jnp.int32),
        key=jax.random.key_data(jax.random.key(seed)),
        active=jnp.zeros((num_layers,), jnp.bool_),
        inner_state=inner.init(params),
    )

  def _probs(params, plan):
    if fixed_probs is not None:
      return fixed_probs / jnp.sum(fixed_probs)
    if probabilities == "uniform":
      return None
    if params is None:
      raise ValueError("probabilities='owlore' needs `params` in update().")
    leaves = jax.tree.leaves(params)
    if len(leaves) != len(plan):
      raise ValueError("params and updates have different tree structures.")
    ratios = _outlier_ratios_from_plan(leaves, plan, num_layers, owlore_alpha)
    return _floored(ratios, owlore_floor)

  def update_fn(updates, state, params=None, **extra_args):
    leaves, treedef = jax.tree.flatten(updates)
    plan = _plan(updates)

    def _redraw():
      key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
      probs = _probs(params, plan)
      active = _draw(sub, probs, num_layers, active_layers)
      return jax.random.key_data(key), active

    key, active = jax.lax.cond(
        state.count % refresh_every == 0, _redraw,
        lambda: (state.key, state.active)
    )

    def _zero_inactive(x, kind):
      m = _layer_mask(active, kind, x)
      return x if m is None else jnp.where(m, x, jnp.zeros([], x.dtype))

    # Inactive layers have no gradient (as with `requires_grad=False`), so
    # they do not enter global quantities such as a clipping norm.
    grads = treedef.unflatten(
        [_zero_inactive(g, k) for g, k in zip(leaves, plan)]
    )
    if pass_active:
      extra_args = dict(extra_args, layer_active=active)
    new_updates, new_inner = inner.update(
        grads, state.inner_state, params, **extra_args
    )
    new_updates = treedef.unflatten([
        _zero_inactive(u, k)
        for u, k in zip(treedef.flatten_up_to(new_updates), plan)
    ])

    # Freeze inactive slices of every per-parameter state leaf.
    new_leaves, state_def = jax.tree.flatten(new_inner)
    old_leaves = state_def.flatten_up_to(state.inner_state)
    kinds = _state_plan(inner, new_inner, plan, treedef)
    restored = []
    for new, old, kind in zip(new_leaves, old_leaves, kinds):
      m = _layer_mask(active, kind, new)
      restored.append(new if m is None else jnp.where(m, new, old))
    new_inner = state_def.unflatten(restored)
    return new_updates, LayerSamplingState(
        count=optax.safe_int32_increment(state.count),
        key=key,
        active=active,
        inner_state=new_inner,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


sample_layers = scale_by_layer_sampling


def lisa_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    num_layers: int,
    active_layers: int,
    refresh_every: int,
    stacked: Stacked = None,
    layer_of: LayerOf | None = default_layer_of,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 0.0,
    mask: Any = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """LISA: AdamW on `active_layers` uniformly sampled layers at a time.

  Leaves without a layer (embeddings, head, final norm) always train.
  Frozen layers get no update and no weight decay, and their Adam moments
  are kept unchanged until they are drawn again. Layers are re-drawn every
  `refresh_every` steps; `mask` is the weight-decay mask (optax's meaning).
  This is `owlore_adamw` with `probabilities="uniform"` and no GaLore.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lowrank.optim import layer_sampling
    >>> tx = layer_sampling.lisa_adamw(
    ...     1e-2, num_layers=4, active_layers=2, refresh_every=5,
    ...     stacked="layers")
    >>> params = {"layers": jnp.ones((4, 3, 3)), "head": jnp.ones(3)}
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> int(state[0].active.sum())
    2

  References:
    Pan et al. 2024, LISA, https://arxiv.org/abs/2403.17919
  """
  return owlore_adamw(
      learning_rate, num_layers=num_layers, active_layers=active_layers,
      refresh_every=refresh_every, stacked=stacked, layer_of=layer_of,
      probabilities="uniform", b1=b1, b2=b2, eps=eps,
      weight_decay=weight_decay, mask=mask, seed=seed,
  )


presets.register(
    "lisa_adamw",
    source="OptimalScale/LMFlow@f3597dba134e "
           "(src/lmflow/pipeline/utils/lisa_trainer.py)",
    kwargs={})


class _LayerClockState(NamedTuple):
  """State of `_galore_on_layer_clock`.

  Attributes:
    steps: Per leaf, int32 active steps so far of each matrix (shaped like
      its GaLore refresh schedule: `[L]` for a stacked leaf, `[]` for an
      unstacked one; `[0]` for unprojected leaves).
    galore_state: The `GaLoreState`.
  """

  steps: optax.Updates
  galore_state: optax.OptState


def _galore_on_layer_clock(galore_tx, gap: int, plan_of):
  """Refreshes each layer's GaLore basis on its own active steps.

  galore-torch keeps `state["step"]` per parameter and counts only steps
  with a gradient, so under layer sampling a layer's basis is recomputed on
  its first active step and then every `gap` of its own active steps; a
  redrawn layer keeps its basis otherwise. `galore_tx` is a
  `scale_by_galore(adaptive_gap=True, cos_threshold=inf)`, whose per-layer
  `next_refresh` this sets before every step (to the current count where
  due, else never); it needs the extra argument `layer_active` (`[L]`).
  """
  never = np.iinfo(np.int32).max

  def init_fn(params):
    state = galore_tx.init(params)
    treedef = jax.tree.structure(params)
    steps = [
        jnp.zeros(s.next_refresh.shape, jnp.int32)
        if isinstance(s, galore.RefreshSchedule)
        else jnp.zeros((0,), jnp.int32)
        for s in treedef.flatten_up_to(state.schedule)]
    return _LayerClockState(treedef.unflatten(steps), state)

  def update_fn(updates, state, params=None, *, layer_active,
                **extra_args):
    treedef = jax.tree.structure(updates)
    gs = state.galore_state
    schedules, steps = [], []
    for sched, n, kind in zip(treedef.flatten_up_to(gs.schedule),
                              treedef.flatten_up_to(state.steps),
                              plan_of(updates)):
      if not isinstance(sched, galore.RefreshSchedule):
        schedules.append(sched)
        steps.append(n)
        continue
      m = _layer_mask(layer_active, kind, n)
      act = jnp.ones(n.shape, jnp.bool_) if m is None else (
          jnp.broadcast_to(m, n.shape))
      due = act & (n % gap == 0)
      schedules.append(sched._replace(
          next_refresh=jnp.where(due, gs.count, never).astype(jnp.int32)))
      steps.append(n + act.astype(jnp.int32))
    gs = gs._replace(schedule=treedef.unflatten(schedules))
    out, gs = galore_tx.update(updates, gs, params, **extra_args)
    return out, _LayerClockState(treedef.unflatten(steps), gs)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def owlore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    num_layers: int,
    active_layers: int,
    refresh_every: int,
    stacked: Stacked = None,
    layer_of: LayerOf | None = default_layer_of,
    probabilities: str | jax.typing.ArrayLike = "owlore",
    owlore_alpha: jax.typing.ArrayLike = 13.0,
    owlore_floor: jax.typing.ArrayLike = 0.01,
    rank: int | None = None,
    galore_refresh_every: int | None = None,
    scale: jax.typing.ArrayLike = 1.0,
    side: str = "auto",
    projector: str = "svd",
    rsvd_method: str = "cholesky",
    project: Any = None,
    input_axes: Any = None,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 0.0,
    mask: Any = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """OwLore: outlier-weighted layer sampling, optionally with GaLore.

  Layers are drawn every `refresh_every` steps with probabilities
  proportional to their outlier ratio (`outlier_ratios`, recomputed from
  `params` at each draw), or to fixed weights passed as `probabilities`.
  With `rank` set, the sampled layers' Adam runs in a GaLore subspace
  (`galore.scale_by_galore(rank=rank, refresh_every=galore_refresh_every,
  scale=scale, side=side, projector=projector, rsvd_method=rsvd_method,
  project=project, input_axes=input_axes)`, as in `galore_adamw`, with one
  projector per layer of each `stacked` leaf), as in the paper (the OwLore
  code uses rank 256, `update_proj_gap=100`, scale 1). Frozen layers'
  projectors and moments are kept unchanged until the layer is drawn
  again. `mask` is the weight-decay mask (optax's meaning).

  Each layer's GaLore basis runs on the layer's own clock, as galore-torch's
  per-parameter `step` does: it is computed on the layer's first active
  step and again every `galore_refresh_every` (default: `refresh_every`)
  of its own active steps, so a redrawn layer keeps its basis until then.
  When `galore_refresh_every` divides `refresh_every` this is a refresh at
  every draw and at every `galore_refresh_every` steps within it; with the
  official 100 and interval 50 a layer's basis is recomputed on every
  other stint of the layer.

  Differences from the official code (`pixeli99/OwLore`, GaLore mode), with
  the argument that gives the official behaviour
  (`presets.paper("owlore_adamw")` collects them):

  * Layer scores: the official code reads fixed OWL ratios computed once
    from calibration activations (`‖X_j‖·|W_ij|`). `probabilities="owlore"`
    (default) scores `|W_ij|` alone, recomputed from `params` at every draw,
    since an optimizer sees no activations. Official: compute the ratios
    with `activation_outlier_ratios` and pass them as `probabilities=`
    (fixed arrays are normalised as is, with no floor).
  * Probability floor: the default `owlore_floor=0.01` keeps every layer
    reachable when the `|W|` ratios of some layers are 0; the official code
    has none: `owlore_floor=0.0` (it applies to `"owlore"` only).
  * Adam eps: galore-torch's `GaLoreAdamW` uses 1e-6, added to `sqrt(v)`
    before bias correction; lowrank uses 1e-8 (torch AdamW's and optax's,
    as LISA) added to `sqrt(v_hat)`: `eps=1e-6`; the placement is not
    available (it differs by `1/sqrt(1 - b2^t)` in the first steps).
  * Projected weights and side: the official code projects only the
    `nn.Linear` weights of attention and MLP blocks (embeddings, norms and
    head get plain AdamW) with galore-torch's `std` side (the smaller
    dimension); lowrank by default projects every matrix with
    `side="auto"`: `side="torch"` and `project=` a regex for your model's
    attention/MLP kernels.
  * Default mode: the OwLore script trains with GaLore (`rank` 256,
    `update_proj_gap` 100); lowrank's `rank=None` is full-rank sampling
    (the paper's "OwLore (Full-Rank)"): `rank=256,
    galore_refresh_every=100`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lowrank.optim import layer_sampling
    >>> tx = layer_sampling.owlore_adamw(
    ...     1e-2, num_layers=4, active_layers=1, refresh_every=5,
    ...     stacked="layers")
    >>> params = {"layers": jnp.ones((4, 3, 3)), "head": jnp.ones(3)}
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> updates["layers"].shape
    (4, 3, 3)

  References:
    Li et al. 2024, OwLore, https://arxiv.org/abs/2405.18380
  """
  inner = scale_by_adam_per_slice(b1, b2, eps)
  if rank is not None:
    gap = (refresh_every if galore_refresh_every is None
           else galore_refresh_every)
    _check_int("galore_refresh_every", gap, 1)
    # GaLore's per-layer projectors: the layer axis of stacked leaves.
    if stacked is None or isinstance(stacked, str):
      stacked_axes = stacked
    else:
      stacked_axes = lambda path, leaf: (0,) if stacked(path, leaf) else ()
    # The adaptive schedule gives one `next_refresh` per layer, which the
    # layer clock sets at every step; its gap never grows (threshold inf).
    inner = _galore_on_layer_clock(
        galore.scale_by_galore(
            inner, rank=rank, refresh_every=gap, scale=scale, side=side,
            projector=projector, rsvd_method=rsvd_method, project=project,
            stacked_axes=stacked_axes, input_axes=input_axes,
            adaptive_gap=True, cos_threshold=float("inf")),
        gap, lambda tree: _make_plan(tree, num_layers, stacked, layer_of))
  # Decay inside the sampled part: a frozen layer gets no update at all,
  # as torch's AdamW skips parameters without a gradient.
  inner = optax.chain(inner, optax.add_decayed_weights(weight_decay, mask))
  return optax.chain(
      _scale_by_layer_sampling(
          inner, num_layers=num_layers, active_layers=active_layers,
          refresh_every=refresh_every, stacked=stacked, layer_of=layer_of,
          probabilities=probabilities, owlore_alpha=owlore_alpha,
          owlore_floor=owlore_floor, seed=seed, pass_active=rank is not None,
      ),
      optax.scale_by_learning_rate(learning_rate),
  )


presets.register(
    "owlore_adamw",
    source="pixeli99/OwLore@e4159735f510 (src/lmflow/pipeline/finetuner.py, "
           "owlore_scripts/run_owlore_low_rank.sh); galore-torch at "
           "jiaweizzhao/GaLore@2cc66f88cce1 (galore_torch/adamw.py)",
    kwargs={"rank": 256, "galore_refresh_every": 100, "eps": 1e-6,
            "side": "torch", "owlore_floor": 0.0},
    reasons={
        "rank": "lowrank's default is full-rank sampling (rank=None); the "
                "OwLore script trains with GaLore at rank 256",
        "galore_refresh_every": "the OwLore code's update_proj_gap is 100 "
                                "(lowrank's default: refresh_every)",
        "eps": "galore-torch's GaLoreAdamW default; lowrank keeps torch "
               "AdamW's / optax's 1e-8, as LISA",
        "side": "galore-torch's 'std' projects the smaller dimension",
        "owlore_floor": "the official probabilities have no floor; "
                        "lowrank's keeps layers with zero |W| ratio "
                        "reachable"},
    unavailable=(
        "the official layer scores are OWL ratios from calibration "
        "activations, fixed for the run: data, not a setting; compute them "
        "with activation_outlier_ratios and pass probabilities=",
        "only attention/MLP kernels are projected officially: pass project= "
        "a regex of your model's attention/MLP paths",
        "galore-torch adds eps to sqrt(v) before bias correction"))
