"""GaLore-family gradient low-rank projection as optax transformations.

`scale_by_galore(inner, rank=...)` runs any gradient-only optax transform
`inner` (Adam, Lion, Adafactor, ...) on the projected gradient `R = Pᵀ G`
(or `G P`) of each selected weight and projects its output back, so the
inner optimizer's state is `r × n` instead of `m × n`. Options cover the
family:

* `side`: `"auto"` (smallest state), `"left"`, `"right"`, `"torch"`
  (galore-torch's `std` rule); resolved once from shapes, never re-inferred.
* `projector`: `"svd"`, `"rsvd"` (randomized subspace iteration; never
  gathers a sharded gradient), `"random"` (random orthonormal).
* `on_refresh`: the inner state of a leaf whose basis changed is kept
  (GaLore), reset (FRUGAL) or rotated into the new basis
  (`M ← P_newᵀ P_old M`; second moments with the element-wise square of that
  rotation, so they stay non-negative).
* `residual`: what the projection drops, `G − P Pᵀ G`, can be ignored
  (GaLore), added with Fira's norm-based scaling and norm-growth limiter, or
  added as state-free signSGD / SGD (FRUGAL).
* N-D leaves (`lowrank.optim.matrix_view`): each leaf is projected as a
  matrix view `[..., m, n]`. Axes that index stacked layers get one
  projector per index; they come only from `stacked_axes` (metadata the
  model declares: `stacked_axes_from(model)` reads the `layers` logical
  axis; or a regex / callable / pytree), never from `ndim`. The other axes
  are split into input (rows) and output (columns) axes by `input_axes`
  (`input_axes_from(model)` reads `nnx.LinearGeneral` / `MultiHeadAttention`
  / `Einsum` metadata) or, by default, all but the last non-stacked axis
  are inputs. Biases (any leaf named `bias`) and leaves with fewer than two
  non-stacked axes are not projected by default.
* `stagger=k`: leaf `i` refreshes at steps `≡ (i mod k)·gap/k (mod gap)`,
  which spreads the SVD cost over the period. With `stagger_layers=True`
  the groups are single matrices, i.e. `(leaf, layer)` pairs of stacked
  leaves: a refresh step recomputes only the layers whose turn it is
  (picked with a traced index; shapes stay static), so one `[L, m, n]`
  leaf no longer costs `L` decompositions in a single step.

Changed:
  * The projection selector is `project=` (a regex, callable or bool
    pytree); it used to be `mask=`. On the AdamW-style wrappers
    (`galore_adamw`, `q_galore_adamw`, `fira_adamw`, `frugal_adamw`) `mask`
    now has optax's meaning, the weight-decay mask passed to
    `optax.add_decayed_weights` (it was `weight_decay_mask=` on
    `galore_adamw`); `scale_by_galore` has no `mask`. `default_mask` is
    gone: `projected_leaves` reports what a configuration projects.
  * A 3-D leaf is no longer taken for `[L, m, n]` stacked layers: pass
    `stacked_axes=` (e.g. `stacked_axes_from(model)`). Without it an N-D
    leaf is one matrix (`input_axes`).
  * A selected leaf with `rank >= min(m, n)` falls back to full inner state
    with one warning per `init` listing such leaves (it used to be silent);
    a `project` / `stacked_axes` regex that matches no leaf raises.
  * On a refresh with `on_refresh="reset"`, per-matrix step counts kept by
    the inner transform (`scale_by_adam_per_matrix`, which `galore_adamw`
    and `frugal_adamw` use then) restart with the moments, as FRUGAL's
    `reset_statistics=True` does; the Adam count used to keep running, so
    bias correction shrank the first steps after every refresh.
  * `side="torch"` projects a square kernel on its input (row) axis, as
    galore-torch projects a square `[out, in]` weight (it took the output
    axis); non-square kernels are unchanged.
  * Fira's norm-growth limiter bounds the residual before Adam's bias
    correction, as Fira's code does (`fira_limiter="uncorrected"`; the old
    behaviour is `"corrected"`).
  * Q-GaLore's adaptive gap compares float32 first basis vectors (kept in
    `RefreshSchedule.first_vector`) by their normalised cosine instead of
    the dequantized ones, and refreshes on multiples of the current gap
    (it counted the gap from the last refresh), both as Q-GaLore's code.
  * `frugal_adamw`'s default projector is `"svd"`, FRUGAL's (was
    `"random"`).

References:
  Zhao et al. 2024, GaLore, https://arxiv.org/abs/2403.03507
  Chen et al. 2024, Fira, https://arxiv.org/abs/2410.01623
  Zmushko et al. 2024, FRUGAL, https://arxiv.org/abs/2411.07837
"""

from collections.abc import Callable
import math
import re
from typing import Any, NamedTuple
import warnings

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank import presets
from lowrank.optim import _adam as adam_lib
from lowrank.optim import _nnx as nnx_interop
from lowrank.optim import matrix_view
from lowrank.optim import projection
from lowrank.optim import quantize as quant

ON_REFRESH = ("keep", "reset", "rotate")
# How stored projectors are quantized (`projector_quantizer`).
QUANTIZERS = ("rank_groups", "q_galore")
# Where Adam's eps enters (`eps_placement`).
EPS_PLACEMENTS = ("optax", "torch")
# What Fira's norm-growth limiter bounds (`fira_limiter`).
FIRA_LIMITERS = ("uncorrected", "corrected")
# Arguments that fix shapes or Python-side schedules: pass them as
# `optax.inject_hyperparams(galore_adamw, static_args=STATIC_ARGS)`.
# The selectors are static too: `inject_hyperparams` would call a callable
# `project` as a schedule.
STATIC_ARGS = ("rank", "refresh_every", "stagger", "seed",
               "projector_bits", "projector_group_size", "cos_history",
               "project", "stacked_axes", "input_axes", "mask",
               "update_gap", "eps_placement", "projector_quantizer",
               "signed_cosine", "fira_limiter")
_DEFAULT_REFRESH_EVERY = 200
RESIDUALS = (None, "fira", "frugal_sign", "frugal_sgd")
_SECOND_MOMENT_NAMES = ("nu", "v", "exp_avg_sq", "sum_of_squares")


class GaLoreState(NamedTuple):
  """State for `scale_by_galore`.

  Attributes:
    count: Number of `update` calls so far; shape `()`, int32.
    key: Raw PRNG key data (uint32) for randomized projectors.
    projector: Per-leaf bases `[..., dim, rank]` (float32); leaves that are
      not projected hold a `[0]` placeholder, so the structure always
      matches `params`.
    residual_norm: Per-leaf `[...]` norm of last step's Fira residual
      (float32; `[0]` placeholders elsewhere).
    schedule: Per-leaf `RefreshSchedule` with `adaptive_gap=True`
      (placeholders otherwise).
    inner_state: State of `inner`, which sees `[..., r, n]` / `[..., m, r]`
      gradients for projected leaves and full gradients for the others.
  """

  count: jax.Array
  key: jax.Array
  projector: optax.Updates
  residual_norm: optax.Updates
  schedule: optax.Updates
  inner_state: optax.OptState


class RefreshSchedule(NamedTuple):
  """Per-leaf lazy refresh state (Q-GaLore), lead-shaped (one per layer).

  Attributes:
    next_refresh: Step at which the basis is next recomputed, int32.
    gap: Current refresh gap, int32 (doubles when the basis is stable).
    history: The last cosine similarities of consecutive first basis
      vectors, float32 `[..., H]`.
    num_history: How many entries of `history` are filled, int32.
    first_vector: The first basis vector of the last refresh, float32
      `[..., d]`, as computed (before `projector_bits` quantization), which
      the next refresh's cosine compares against (as Q-GaLore keeps
      `past_ortho_vector`).
  """

  next_refresh: jax.Array
  gap: jax.Array
  history: jax.Array
  num_history: jax.Array
  first_vector: jax.Array


ProjectFn = Callable[[str, Any], bool]


class _Leaf(NamedTuple):
  """Static per-leaf selection (from key paths, shapes and arguments).

  Attributes:
    path: The leaf's key path (`jax.tree_util.keystr`).
    view: Its matrix view, or None when it is not a matrix.
    selected: Whether `project` (or the default rule) selects it.
    projected: `selected` and `rank < min(m, n)`.
  """

  path: str
  view: matrix_view.MatrixView | None
  selected: bool
  projected: bool


def _leaf_name(path) -> str:
  if not path:
    return ""
  k = path[-1]
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _select(params, rank: int, project, stacked_axes,
            input_axes) -> list[_Leaf]:
  """Which leaves are projected, and as which matrix view.

  The default rule selects every leaf with at least two non-stacked axes
  that is not named `bias`. A regex `project` narrows the default rule to
  leaves whose key path it matches; a callable or a bool pytree selects
  explicitly (an explicitly selected leaf must be a matrix).

  Raises:
    ValueError: On a regex that selects nothing, a bool pytree of the
      wrong size, an explicitly selected non-matrix leaf, or bad axes.
  """
  with_path = jax.tree_util.tree_leaves_with_path(params)
  paths = [jax.tree_util.keystr(p) for p, _ in with_path]
  leaves = [x for _, x in with_path]
  stacked = matrix_view.stacked_per_leaf(stacked_axes, paths, leaves)
  inputs = matrix_view.inputs_per_leaf(input_axes, paths, leaves, stacked)
  views = [matrix_view.make_view(np.shape(x), s, i)
           for x, s, i in zip(leaves, stacked, inputs)]
  default = [v is not None and _leaf_name(p) != "bias"
             for (p, _), v in zip(with_path, views)]
  if project is None:
    flags = default
  elif isinstance(project, re.Pattern):
    hits = [bool(project.search(p)) for p in paths]
    flags = [h and d for h, d in zip(hits, default)]
    if not any(flags):
      eligible = [p for p, d in zip(paths, default) if d]
      matched = [p for p, h in zip(paths, hits) if h]
      found = (f"it matches only leaves that are not projected (biases or "
               f"fewer than 2 non-stacked axes): "
               f"{matrix_view.candidates(matched, 5)}" if matched
               else "it matches no leaf")
      raise ValueError(
          f"project={project.pattern!r} selects no leaf to project: "
          f"{found}. Candidate paths: {matrix_view.candidates(eligible)}.")
  else:
    if callable(project):
      flags = [bool(project(p, x)) for p, x in zip(paths, leaves)]
    else:
      flat = jax.tree.leaves(project)
      if len(flat) != len(leaves):
        raise ValueError(
            f"project has {len(flat)} leaves; params have {len(leaves)}. "
            "Expected a bool pytree with the structure of params, a regex "
            "or a callable (path, leaf) -> bool.")
      flags = [bool(f) for f in flat]
    bad = [f"{p} {tuple(np.shape(x))}"
           for p, x, f, v in zip(paths, leaves, flags, views)
           if f and v is None]
    if bad:
      raise ValueError(
          f"project selects leaves with fewer than 2 non-stacked axes, which "
          f"cannot be projected: {matrix_view.candidates(bad, 5)}. Leave "
          "them out of project (stacked axes come from stacked_axes).")
  return [
      _Leaf(path=p, view=v, selected=f,
            projected=f and rank < min(v.m, v.n))
      for p, v, f in zip(paths, views, flags)
  ]


def _compile_arguments(project, stacked_axes, input_axes):
  """Validates regexes and reads nnx metadata once, at construction."""
  if isinstance(stacked_axes, nnx.Module) or (
      stacked_axes is not None and not isinstance(stacked_axes, str)
      and not callable(stacked_axes)
      and matrix_view.has_variables(stacked_axes)):
    stacked_axes = matrix_view.stacked_axes_from(stacked_axes)
  if isinstance(input_axes, nnx.Module):
    input_axes = matrix_view.input_axes_from(input_axes)
  if isinstance(input_axes, str):
    raise TypeError(
        f"input_axes takes a callable (path, leaf) -> axes, a pytree of axes "
        f"(optim.input_axes_from(model)) or an nnx.Module; got the string "
        f"{input_axes!r}.")
  return (matrix_view.compile_selector(project, "project"),
          matrix_view.compile_selector(stacked_axes, "stacked_axes"),
          input_axes)


def projected_leaves(
    params: Any,
    *,
    rank: int,
    project: str | ProjectFn | Any | None = None,
    stacked_axes: Any = None,
    input_axes: Any = None,
) -> dict[str, tuple[int, ...]]:
  """The leaves `scale_by_galore` projects, with their matrix-view shapes.

  The same selection the transform makes at `init` (see `scale_by_galore`
  for the arguments), without building it: use it to check a configuration
  (e.g. that a regex selects the intended matrices).

  Examples:
    >>> import jax.numpy as jnp
    >>> from lowrank import optim
    >>> params = {"attn": {"kernel": jnp.zeros((64, 4, 16)),
    ...                    "bias": jnp.zeros((4, 16))},
    ...           "norm": jnp.zeros(64)}
    >>> optim.projected_leaves(params, rank=8,
    ...                        input_axes={"attn": {"kernel": 0, "bias": None},
    ...                                    "norm": None})
    {"['attn']['kernel']": (64, 64)}

  Returns:
    `{key path: lead + (m, n)}` for each leaf whose gradient is projected
    (selected and `rank < min(m, n)`), in leaf order.

  Raises:
    ValueError: As `scale_by_galore` / its `init` do on bad selectors.
  """
  project, stacked_axes, input_axes = _compile_arguments(
      project, stacked_axes, input_axes)
  params = nnx_interop.unbox(params)
  return {leaf.path: leaf.view.matrix_shape
          for leaf in _select(params, rank, project, stacked_axes, input_axes)
          if leaf.projected}


def _warn_about(plan: list[_Leaf], rank: int) -> None:
  """One warning per kind of silent surprise in a plan (at `init`)."""
  full = [f"{x.path} {x.view.lead + (x.view.m, x.view.n)}"
          for x in plan if x.selected and not x.projected]
  if full:
    warnings.warn(
        f"GaLore: {len(full)} selected leaves have rank={rank} >= min(m, n) "
        "of their matrix view and get full (unprojected) optimizer state: "
        f"{matrix_view.candidates(full)}. Lower rank, or leave them out "
        "with project=.", UserWarning, stacklevel=3)
  split = [f"{x.path} {x.view.shape} -> {x.view.matrix_shape}"
           for x in plan if x.projected and x.view.default_split]
  if split:
    warnings.warn(
        f"GaLore: {len(split)} projected leaves have more than 2 non-stacked "
        "axes and no input_axes, so the default rule views them as [all but "
        f"the last axis] x [last axis]: {matrix_view.candidates(split)}. "
        "Pass input_axes= (optim.input_axes_from(model) for nnx "
        "LinearGeneral / MultiHeadAttention / Einsum kernels) and, for "
        "scan-stacked layers, stacked_axes= (optim.stacked_axes_from(model)).",
        UserWarning, stacklevel=3)


def _refresh_flag(count, offset: int | np.ndarray, gap: int):
  """True at step 0 (there is no basis yet) and every `gap` after `offset`.

  `offset` may be an array of per-layer offsets (`stagger_layers`); the
  result then has its shape.
  """
  periodic = (count >= offset) & ((count - offset) % gap == 0)
  return (count == 0) | periodic


def _after(previous) -> jax.Array:
  """A scalar True that cannot be computed before `previous` exists.

  Refresh branches run one leaf after another: XLA:CPU runs independent
  conditionals concurrently on its intra-op thread pool, and jaxlib's
  batched LAPACK kernels (SVD, QR) block that pool's thread while waiting
  for batch tasks queued to the same pool, so two decompositions at once
  on a 2-thread pool deadlock (observed on jax 0.10.2 in
  `benchmarks/galore_bench.py`: both pool threads parked in
  `lapack_sgesdd_ffi` → `ParallelBatchMap`). Feeding one element of the
  previous leaf's bases into the next predicate is a data dependency XLA
  keeps (an optimization barrier is dropped before execution);
  `(x == x) | (x != x)` is True for every float, NaN included.

  Args:
    previous: The previous projected leaf's stored bases (a pytree), or
      None for the first projected leaf.

  Returns:
    A scalar bool array equal to True.
  """
  if previous is None:
    return jnp.asarray(True)
  x = next(leaf for leaf in jax.tree.leaves(previous)
           if jnp.issubdtype(leaf.dtype, jnp.floating))
  x = x.reshape(-1)[0]
  return (x == x) | (x != x)


def _rotate(x, c, side: str, squared: bool):
  """Re-express a low-rank moment in the new basis; `c = P_newᵀ P_old`."""
  c = c * c if squared else c
  c = c.astype(x.dtype)
  if side == "left":  # x: [..., r, n]
    return jnp.einsum("...ij,...jn->...in", c, x)
  return jnp.einsum("...mj,...ij->...mi", x, c)  # x: [..., m, r]


class _Options(NamedTuple):
  """`scale_by_galore`'s arguments after validation (see its docstring).

  `group` is the resolved `projector_group_size`; the selectors are
  compiled (`_compile_arguments`). `scale`, `residual_scale`, `fira_gamma`,
  `cos_threshold` and `gap_growth` may be traced (`inject_hyperparams`).
  """

  rank: int
  refresh_every: int
  scale: Any
  side: str
  projector: str
  rsvd_method: str
  on_refresh: str
  residual: str | None
  residual_scale: Any
  fira_gamma: Any
  fira_leak: bool
  stagger: int
  stagger_layers: bool
  project: Any
  stacked_axes: Any
  input_axes: Any
  seed: int
  projector_bits: int | None
  group: int
  quantizer: str
  adaptive_gap: bool
  cos_threshold: Any
  gap_growth: Any
  cos_history: int
  signed_cosine: bool
  fira_bias_correction: Any


class _LeafPlan(NamedTuple):
  """Static per-leaf plan of `scale_by_galore`.

  Attributes:
    projected: Whether the leaf's gradient is projected.
    side: Resolved side (`"left"` / `"right"`), None when not projected.
    offset: The leaf's refresh offset, or with `stagger_layers` a tuple
      with one offset per layer of the leaf.
    view: The leaf's matrix view (None when it is not a matrix).
  """

  projected: bool
  side: str | None
  offset: int | tuple[int, ...]
  view: matrix_view.MatrixView | None


# Refreshing the bases: pure functions of the gradient, the stored bases and
# the step count.


def _store(p, s: str, opts: _Options):
  """Bases as stored in the state (quantized with `projector_bits`).

  With `projector_quantizer="q_galore"` a left basis is flattened as `Pᵀ`
  (`[r, d]`, galore-torch's `Vh[:r]` of the transposed `[out, in]` weight)
  and a right one as `P` (`[d, r]`, its `U[:, :r]`).
  """
  if not opts.projector_bits:
    return p
  if opts.quantizer == "q_galore":
    return quant.quantize_flat(p, opts.projector_bits, opts.group,
                               transpose=s == "left")
  return quant.quantize(p, opts.projector_bits, opts.group)


def _load(p, s: str, opts: _Options):
  """Float32 bases from their stored form."""
  if not opts.projector_bits:
    return p
  if opts.quantizer == "q_galore":
    return quant.dequantize_flat(p, opts.projector_bits, opts.group,
                                 opts.rank, transpose=s == "left")
  return quant.dequantize(p, opts.projector_bits, opts.group)


def _plan(params, opts: _Options, warn: bool = False) -> list[_LeafPlan]:
  """The static per-leaf plan (selection, side and refresh offsets)."""
  leaves_plan = _select(params, opts.rank, opts.project, opts.stacked_axes,
                        opts.input_axes)
  if warn:
    _warn_about(leaves_plan, opts.rank)
  plan, k = [], 0
  spacing = opts.refresh_every // opts.stagger
  for leaf in leaves_plan:
    flag, view = leaf.projected, leaf.view
    s = projection.resolve_side(view.matrix_shape, opts.side) if flag else None
    if flag and opts.stagger_layers:
      num = math.prod(view.lead)
      offset = tuple(((k + j) % opts.stagger) * spacing for j in range(num))
      k += num
    else:
      offset = (k % opts.stagger) * spacing if flag else 0
      k += bool(flag)
    plan.append(_LeafPlan(flag, s, offset, view))
  return plan


def _low_shape(view: matrix_view.MatrixView, s: str, rank: int):
  """Shape of a projected gradient: `[..., r, n]` or `[..., m, r]`."""
  return view.lead + ((rank, view.n) if s == "left" else (view.m, rank))


def _init_leaf(leaf, lp: _LeafPlan, opts: _Options):
  """`(projector, residual norm, schedule, inner-state template)` of a leaf."""
  placeholder = jnp.zeros((0,), jnp.float32)
  if not lp.projected:
    return (placeholder, placeholder, placeholder,
            jnp.zeros(leaf.shape, leaf.dtype))
  lead = lp.view.lead
  shape = lead + (projection.basis_dim(lp.view.matrix_shape, lp.side),
                  opts.rank)
  if not opts.projector_bits:
    proj = jnp.zeros(shape, jnp.float32)
  elif opts.quantizer == "q_galore":
    try:
      proj = quant.zeros_flat(shape, opts.projector_bits, opts.group)
    except ValueError as e:
      raise ValueError(f"{lp.view.matrix_shape} leaf: {e}") from None
  else:
    proj = quant.zeros(shape, opts.projector_bits, opts.group)
  sched = RefreshSchedule(
      next_refresh=jnp.zeros(lead, jnp.int32),
      gap=jnp.full(lead, opts.refresh_every, jnp.int32),
      history=jnp.zeros(lead + (opts.cos_history,), jnp.float32),
      num_history=jnp.zeros(lead, jnp.int32),
      first_vector=jnp.zeros(shape[:-1], jnp.float32),
  ) if opts.adaptive_gap else placeholder
  return (proj, jnp.zeros(lead, jnp.float32), sched,
          jnp.zeros(_low_shape(lp.view, lp.side, opts.rank), leaf.dtype))


def _refresh_leaf(g, p_stored, s, refresh, key, after, opts: _Options,
                  first=None):
  """Stored bases with the layers flagged in `refresh` recomputed.

  One `lax.cond` per leaf: the decomposition, the masked select and the
  requantization run only on steps where some layer refreshes. `after`
  (always True) orders this leaf's branch after the previous leaf's.
  `first` (`[..., d]`, adaptive gap only) is the last refresh's first
  basis vector; the refreshed layers' entries are replaced by the new
  float32 ones and it is returned with the stored bases.
  """
  mask = jnp.expand_dims(refresh, (-2, -1))  # Broadcasts over [d, r].

  def _recompute():
    basis = projection.compute_projector(
        g, opts.rank, s, opts.projector, key, rsvd_method=opts.rsvd_method)
    new = _store(basis, s, opts)
    stored = jax.tree.map(lambda a, b: jnp.where(mask, a, b), new, p_stored)
    if first is None:
      return stored, None
    return stored, jnp.where(refresh[..., None], basis[..., :, 0], first)

  return jax.lax.cond(jnp.any(refresh) & after, _recompute,
                      lambda: (p_stored, first))


def _refresh_layers(g, p_stored, s, offsets, key, count, after,
                    opts: _Options):
  """`stagger_layers`: recomputes only the layers whose turn it is.

  Args:
    g: Gradient `[..., m, n]`.
    p_stored: Stored bases `[..., d, r]` (or their `Quantized` form).
    s: Resolved side.
    offsets: Static refresh offset of each layer (flattened lead dims).
    key: This leaf's key at this step; layer `j` uses `fold_in(key, j)`.
    count: Step count (traced).
    after: Always True; orders this leaf's branch after the previous one.
    opts: The transform's options.

  Returns:
    The new stored bases and the per-layer refresh flags `[...]`.
  """
  gap = opts.refresh_every
  lead, num = g.shape[:-2], len(offsets)
  flat = lambda x: x.reshape((num,) + x.shape[len(lead):])
  gf, pf = flat(g), jax.tree.map(flat, p_stored)
  refresh = _refresh_flag(count, np.asarray(offsets, np.int32), gap)
  # Static: the layers sharing each distinct offset form a row of `table`,
  # padded to the widest row by repeating its first layer (recomputing a
  # layer twice writes the same basis twice, since keys depend on the
  # layer only). Distinct offsets are distinct mod `refresh_every`, so at
  # most one row is due per step.
  starts = sorted(set(offsets))
  rows = [[j for j, o in enumerate(offsets) if o == u] for u in starts]
  width = max(len(r) for r in rows)
  table = np.array([r + r[:1] * (width - len(r)) for r in rows], np.int32)
  starts = np.asarray(starts, np.int32)
  hits = (count >= starts) & ((count - starts) % gap == 0)
  row = jnp.argmax(hits)
  due = jnp.any(hits)

  def _basis(gj, j):
    return projection.compute_projector(
        gj, opts.rank, s, opts.projector, jax.random.fold_in(key, j),
        rsvd_method=opts.rsvd_method)

  def _all():  # Step 0 (no basis yet) or a row that spans every layer.
    # One key per layer, as `_some` uses; passed as a batch rather than
    # vmapping `_basis`, whose rSVD fallback `lax.cond` would then
    # compute both branches.
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(num))
    return _store(projection.compute_projector(
        gf, opts.rank, s, opts.projector, keys,
        rsvd_method=opts.rsvd_method), s, opts)

  def _some():  # Static shapes: one [m, n] slice per slot of the row.
    out, idx = pf, jnp.asarray(table)[row]
    for slot in range(width):
      j = idx[slot]
      gj = jax.lax.dynamic_index_in_dim(gf, j, keepdims=False)
      new = jax.tree.map(lambda x: x[None], _store(_basis(gj, j), s, opts))
      out = jax.tree.map(
          lambda a, b, j=j: jax.lax.dynamic_update_index_in_dim(a, b, j, 0),
          out, new)
    return out

  if len(rows) == 1:  # Every layer shares one offset: no slicing needed.
    stored = jax.lax.cond(((count == 0) | due) & after, _all, lambda: pf)
  else:
    whole = jnp.asarray(np.array([len(r) == num for r in rows]))
    branch = jnp.where((count == 0) | (due & whole[row]), 2,
                       jnp.where(due, 1, 0))
    branch = jnp.where(after, branch, 0)
    stored = jax.lax.switch(branch, [lambda: pf, _some, _all])
  unflat = lambda x: x.reshape(lead + x.shape[1:])
  return jax.tree.map(unflat, stored), refresh.reshape(lead)


def _next_schedule(sched: RefreshSchedule, first, refresh, count,
                   opts: _Options) -> RefreshSchedule:
  """Q-GaLore's lazy refresh: grow the gap of layers with a stable basis.

  As `q_galore_torch/q_galore_projector.py` (VITA-Group/Q-GaLore): at each
  refresh after the first, the cosine similarity of the new and the last
  first basis vectors (float32, before quantization) joins a queue of the
  last `cos_history`; when the queue is full and its mean is at least
  `cos_threshold` the gap becomes `int(gap·gap_growth)`, and the next
  refresh is at the next multiple of the (new) gap, as the official
  `iter % update_proj_gap == 0` test schedules it.

  Args:
    sched: The leaf's schedule before this step.
    first: The first basis vectors after this step's refresh, `[..., d]`
      (float32; the old ones for layers that did not refresh).
    refresh: Lead-shaped flags of the layers refreshed at this step.
    count: Step count (traced).
    opts: The transform's options.

  Returns:
    The schedule after this step.
  """
  old = sched.first_vector
  cos = jnp.sum(first * old, axis=-1) / jnp.maximum(
      jnp.linalg.norm(first, axis=-1) * jnp.linalg.norm(old, axis=-1), 1e-8)
  if not opts.signed_cosine:
    cos = jnp.abs(cos)
  valid = refresh & (count > 0)
  hist = jnp.where(
      valid[..., None],
      jnp.concatenate([sched.history[..., 1:], cos[..., None]], -1),
      sched.history,
  )
  num = jnp.where(valid, jnp.minimum(sched.num_history + 1,
                                     opts.cos_history), sched.num_history)
  grow = valid & (num >= opts.cos_history) & (
      hist.mean(axis=-1) >= opts.cos_threshold)
  gap = jnp.where(
      grow, (sched.gap * opts.gap_growth).astype(jnp.int32), sched.gap)
  return RefreshSchedule(
      next_refresh=jnp.where(refresh, (count // gap + 1) * gap,
                             sched.next_refresh),
      gap=gap, history=hist, num_history=num, first_vector=first,
  )


class _Refreshed(NamedTuple):
  """One leaf's refresh step (`_refresh_and_project`); None if unprojected.

  Attributes:
    stored: The bases to store in the state.
    schedule: The leaf's `RefreshSchedule` (or its placeholder).
    refresh: Lead-shaped flags of the layers refreshed at this step.
    basis: The new bases, float32 `[..., d, r]`.
    rotation: `P_newᵀ P_old` with `on_refresh="rotate"`, else None.
  """

  stored: Any
  schedule: Any
  refresh: jax.Array
  basis: jax.Array
  rotation: jax.Array | None


def _refresh_and_project(g, p_stored, sched, lp: _LeafPlan, key, count,
                         after, opts: _Options) -> _Refreshed:
  """Refreshes a projected leaf's bases when due (`g` is its matrix view)."""
  if isinstance(lp.offset, tuple):  # stagger_layers
    stored, refresh = _refresh_layers(g, p_stored, lp.side, lp.offset, key,
                                      count, after, opts)
  else:
    if opts.adaptive_gap:  # One flag per layer of a stacked leaf.
      refresh = (count == 0) | (count >= sched.next_refresh)
    else:
      refresh = _refresh_flag(count, lp.offset, opts.refresh_every)
    refresh = jnp.broadcast_to(refresh, g.shape[:-2])
    stored, first = _refresh_leaf(
        g, p_stored, lp.side, refresh, key, after, opts,
        first=sched.first_vector if opts.adaptive_gap else None)
  q = _load(stored, lp.side, opts)
  # The previous basis is only read by rotation.
  rotate = opts.on_refresh == "rotate"
  p = _load(p_stored, lp.side, opts) if rotate else None
  if opts.adaptive_gap:
    sched = _next_schedule(sched, first, refresh, count, opts)
  return _Refreshed(
      stored=stored, schedule=sched, refresh=refresh, basis=q,
      rotation=jnp.einsum("...dr,...ds->...rs", q, p) if rotate else None)


# The inner state on a refresh (`on_refresh`).


def _on_refresh_inner_state(inner_state, params_like, plan: list[_LeafPlan],
                            refreshed, rot, on_refresh: str):
  """Applies `on_refresh` to the inner-state leaves of refreshed leaves.

  `refreshed[i]` is the leaf's lead-shaped refresh flag (one per matrix)
  and `rot[i]` its rotation `P_newᵀ P_old` (None unless rotating).
  """
  if on_refresh == "keep":
    return inner_state
  by_path = sorted(
      (
          (jax.tree_util.keystr(p), i)
          for i, (p, _) in enumerate(
              jax.tree_util.tree_leaves_with_path(params_like)
          )
      ),
      key=lambda kv: -len(kv[0]),
  )
  low_shapes = [x.shape for x in jax.tree.leaves(params_like)]

  def _fix(path, x):
    path = list(path)
    fields = []  # Trailing NamedTuple fields, e.g. `.codes` / `.scale`.
    while path and isinstance(path[-1], jax.tree_util.GetAttrKey):
      fields.insert(0, path.pop().name)
    name = jax.tree_util.keystr(tuple(path))
    for param_path, i in by_path:
      if not name.endswith(param_path):
        continue
      lp = plan[i]
      if not lp.projected:
        return x
      if (not fields and jnp.issubdtype(x.dtype, jnp.integer)
          and x.shape == lp.view.lead):
        # A per-matrix step count (`scale_by_adam_per_matrix`): restarts
        # with the moments, so bias correction counts from the reset.
        if on_refresh == "reset":
          return jnp.where(refreshed[i], jnp.zeros_like(x), x)
        return x
      mask = jnp.expand_dims(refreshed[i], (-2, -1))  # Over [d, r].
      if fields:  # A quantized moment (e.g. 8-bit Adam's BlockQuantized).
        if on_refresh == "rotate":
          raise ValueError(
              "on_refresh='rotate' cannot rotate quantized inner moments "
              f"({name}.{'.'.join(fields)}); use 'keep' or 'reset', or a "
              "float inner optimizer."
          )
        if fields[-1] != "scale":
          return x
        # A zero block scale decodes every code of the block to zero.
        return jnp.where(mask, jnp.zeros_like(x), x)
      if x.shape != low_shapes[i]:
        return x
      if on_refresh == "reset":
        new = jnp.zeros_like(x)
      else:
        squared = any(
            getattr(k, "name", None) in _SECOND_MOMENT_NAMES for k in path
        )
        new = _rotate(x, rot[i], lp.side, squared)
      return jnp.where(mask, new, x)
    return x

  return jax.tree_util.tree_map_with_path(_fix, inner_state)


# Back to the full space: the scaled update plus the Fira / FRUGAL residual.


def _fira_bias_correction(count, opts: _Options):
  """Adam's `√(1−β2ᵗ)/(1−β1ᵗ)` at this step (`t = count + 1`), float32."""
  b1, b2 = opts.fira_bias_correction
  t = (count + 1).astype(jnp.float32)
  b1 = jnp.asarray(b1, jnp.float32)
  b2 = jnp.asarray(b2, jnp.float32)
  return jnp.sqrt(1 - b2**t) / (1 - b1**t)


def _residual(g32, r, u, q, s, nrm, a, count, opts: _Options):
  """The Fira / FRUGAL residual term and the leaf's new residual norm.

  Args:
    g32: The gradient's matrix view, float32.
    r: The projected gradient `Pᵀ G` / `G P`, float32.
    u: The inner transform's output for this leaf.
    q: The bases, float32.
    s: Resolved side.
    nrm: Last step's Fira residual norm `[...]`.
    a: GaLore's α (`scale`), float32.
    count: Step count (traced).
    opts: The transform's options (`residual` is not None).

  Returns:
    `(residual, new norm)`; the residual is not yet multiplied by
    `residual_scale`.
  """
  back_r = projection.project_back(r, q, s)
  res = g32 - (a * back_r if opts.fira_leak else back_r)
  if opts.residual == "fira":
    # φ: ratio of column norms of the inner update and the projected
    # gradient along the rank axis (Fira, Eq. 6).
    axis = -2 if s == "left" else -1
    phi = jnp.linalg.norm(u.astype(jnp.float32), axis=axis) / (
        jnp.linalg.norm(r, axis=axis) + 1e-8
    )
    res = res * jnp.expand_dims(phi, axis)
    snorm = jnp.linalg.norm(res, axis=(-2, -1))
    if opts.fira_bias_correction is not None:
      # Fira's code: the limiter bounds `φ·res` with φ from Adam's output
      # before bias correction (`exp_avg / denom`), i.e. this residual over
      # √(1−β2ᵗ)/(1−β1ᵗ); the stored norm is of that quantity, and no
      # limit applies at the first step (`fira_adamw.py:137-147`).
      snorm = snorm / _fira_bias_correction(count, opts)
      ratio = snorm / (nrm + 1e-8)
      shrink = jnp.where((count > 0) & (ratio > opts.fira_gamma),
                         opts.fira_gamma / ratio, 1.0)
      return res * shrink[..., None, None], snorm * shrink
    limit = opts.fira_gamma * nrm
    shrink = jnp.where(
        (nrm > 0) & (snorm > limit), limit / (snorm + 1e-12), 1.0
    )
    return res * shrink[..., None, None], snorm * shrink
  if opts.residual == "frugal_sign":
    res = jnp.sign(res)
  return res, nrm


def _back_project_leaf(g, low, u, q, nrm, count, lp: _LeafPlan,
                       opts: _Options):
  """A projected leaf's full-space update and its new residual norm.

  `g` is the gradient's matrix view, `low` its projection and `u` the
  inner transform's output for it.
  """
  a = jnp.asarray(opts.scale, jnp.float32)
  full = a * projection.project_back(u.astype(jnp.float32), q, lp.side)
  if opts.residual is None:
    return matrix_view.from_matrix(full.astype(g.dtype), lp.view), nrm
  res, nrm = _residual(g.astype(jnp.float32), low.astype(jnp.float32), u, q,
                       lp.side, nrm, a, count, opts)
  full = full + jnp.asarray(opts.residual_scale, jnp.float32) * res
  return matrix_view.from_matrix(full.astype(g.dtype), lp.view), nrm


def _galore_init(params, inner, opts: _Options) -> GaLoreState:
  """`scale_by_galore`'s `init`."""
  params = nnx_interop.unbox(params)  # See `lowrank.optim._nnx`.
  plan = _plan(params, opts, warn=True)
  leaves, treedef = jax.tree.flatten(params)
  proj, norms, sched, low = [], [], [], []
  for leaf, lp in zip(leaves, plan):
    p, n, s, lo = _init_leaf(leaf, lp, opts)
    proj.append(p)
    norms.append(n)
    sched.append(s)
    low.append(lo)
  return GaLoreState(
      count=jnp.zeros([], jnp.int32),
      key=jax.random.key_data(jax.random.key(opts.seed)),
      projector=treedef.unflatten(proj),
      residual_norm=treedef.unflatten(norms),
      schedule=treedef.unflatten(sched),
      inner_state=inner.init(treedef.unflatten(low)),
  )


def _galore_update(updates, state: GaLoreState, inner, opts: _Options,
                   **extra_args):
  """`scale_by_galore`'s `update`: refresh, project, `inner`, project back."""
  plan = _plan(updates, opts)
  leaves, treedef = jax.tree.flatten(updates)
  proj_leaves = treedef.flatten_up_to(state.projector)
  sched_leaves = treedef.flatten_up_to(state.schedule)
  key = jax.random.wrap_key_data(state.key)
  count = state.count
  mats, steps, low = [], [], []
  previous = None  # The last projected leaf's new bases.
  for i, (g, p_stored, sched, lp) in enumerate(
      zip(leaves, proj_leaves, sched_leaves, plan)
  ):
    if not lp.projected:
      mats.append(None)
      steps.append(None)
      low.append(g)
      continue
    g = matrix_view.to_matrix(g, lp.view)
    leaf_key = jax.random.fold_in(jax.random.fold_in(key, i), count)
    step = _refresh_and_project(g, p_stored, sched, lp, leaf_key, count,
                                _after(previous), opts)
    previous = step.stored
    mats.append(g)
    steps.append(step)
    low.append(projection.project(g, step.basis, lp.side))
  low_tree = treedef.unflatten(low)
  inner_state = _on_refresh_inner_state(
      state.inner_state, low_tree, plan,
      [None if x is None else x.refresh for x in steps],
      [None if x is None else x.rotation for x in steps], opts.on_refresh)
  low_updates, inner_state = inner.update(
      low_tree, inner_state, None, **extra_args
  )
  out, new_norms = [], []
  for g, lo, u, step, nrm, lp in zip(
      mats, low, treedef.flatten_up_to(low_updates), steps,
      treedef.flatten_up_to(state.residual_norm), plan):
    if not lp.projected:
      out.append(u)
      new_norms.append(nrm)
      continue
    full, nrm = _back_project_leaf(g, lo, u, step.basis, nrm, count, lp,
                                   opts)
    out.append(full)
    new_norms.append(nrm)
  return treedef.unflatten(out), GaLoreState(
      count=optax.safe_int32_increment(count),
      key=state.key,
      projector=treedef.unflatten([
          p if x is None else x.stored for p, x in zip(proj_leaves, steps)]),
      residual_norm=treedef.unflatten(new_norms),
      schedule=treedef.unflatten([
          s if x is None else x.schedule
          for s, x in zip(sched_leaves, steps)]),
      inner_state=inner_state,
  )


def scale_by_galore(
    inner: optax.GradientTransformation,
    *,
    rank: int,
    refresh_every: int = _DEFAULT_REFRESH_EVERY,
    scale: jax.typing.ArrayLike = 1.0,
    side: str = "auto",
    projector: str = "svd",
    rsvd_method: str = "cholesky",
    on_refresh: str = "keep",
    residual: str | None = None,
    residual_scale: jax.typing.ArrayLike = 1.0,
    fira_gamma: jax.typing.ArrayLike = 1.01,
    fira_leak: bool = False,
    stagger: int = 1,
    stagger_layers: bool = False,
    project: str | ProjectFn | Any | None = None,
    stacked_axes: Any = None,
    input_axes: Any = None,
    seed: int = 0,
    projector_bits: int | None = None,
    projector_group_size: int | None = None,
    projector_quantizer: str = "rank_groups",
    adaptive_gap: bool = False,
    cos_threshold: jax.typing.ArrayLike = 0.4,
    gap_growth: jax.typing.ArrayLike = 2,
    cos_history: int = 5,
    signed_cosine: bool = False,
    fira_bias_correction: tuple[Any, Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Runs `inner` in a rank-`rank` subspace of each selected gradient.

  Args:
    inner: Gradient-only transformation (e.g. `optax.scale_by_adam()`); it
      must not read `params` (it only sees projected shapes).
    rank: Subspace dimension (Python int; static).
    refresh_every: Steps between basis refreshes (Python int; static).
    scale: GaLore's α, applied to the projected-back update.
    side: `"auto"`, `"left"`, `"right"` or `"torch"` (module docstring).
    projector: `"svd"`, `"rsvd"` or `"random"`.
    rsvd_method: How `"rsvd"` orthonormalises its sketches: `"cholesky"`
      (shifted CholeskyQR3 + `eigh` of a small Gram matrix; matmul-based,
      18× faster than Householder on an H200 and 2.5× on CPU for the 60M
      config's stacked MLP leaf) or `"householder"` (QR + small SVD). Same
      basis up to rounding (see `lowrank.optim.projection`).
    on_refresh: `"keep"`, `"reset"` or `"rotate"` the inner state of a leaf
      whose basis changed. `"reset"` zeroes the inner state leaves shaped
      like the projected gradient and, with them, integer step counts the
      inner transform keeps per matrix (shaped like the leaf's stacked
      axes, under the parameter's key path, as `scale_by_adam_per_matrix`
      does), so bias correction restarts with the moments (FRUGAL's
      `reset_statistics=True`). A count shared by all leaves (as in
      `optax.scale_by_adam`) cannot be reset per leaf and keeps running.
    residual: `None`, `"fira"`, `"frugal_sign"` or `"frugal_sgd"`.
    residual_scale: Multiplier of the residual branch (FRUGAL's
      `inactive_lr_scale`; 1.0 for Fira).
    fira_gamma: Fira's norm-growth limit γ.
    fira_bias_correction: The inner Adam's `(b1, b2)`, or None. Given, the
      limiter bounds the growth of the residual divided by Adam's bias
      correction `√(1−β2ᵗ)/(1−β1ᵗ)` (`t` counts `update` calls), i.e. of
      `φ·res` with φ from Adam's output before bias correction, as Fira's
      code does (`exp_avg / denom`), and limits nothing at the first step.
      None bounds the residual as the inner output gives it (for an inner
      transform that is not Adam).
    fira_leak: Reproduce Fira's reference code, whose residual is
      `G − α P Pᵀ G` (part of the in-subspace gradient leaks into the scaled
      branch when α < 1); the paper's text uses the true complement, which is
      the default.
    stagger: Spread refreshes over `stagger` groups of leaves (or of
      layers, see `stagger_layers`): group `j` refreshes at steps
      `≡ (j mod stagger)·(refresh_every // stagger) (mod refresh_every)`,
      and every basis is computed at step 0.
    stagger_layers: Number the refresh groups by matrix, counting each
      layer of a stacked `[L, m, n]` leaf (leaf order, then layer order),
      instead of by leaf. On a refresh step only the layers whose turn it
      is are decomposed (selected with a traced index; a stacked leaf with
      `L` layers in one group still refreshes them together). Random
      projectors then draw one key per layer, so a layer's basis does not
      depend on which layers refresh with it. Not combinable with
      `adaptive_gap`, which keeps its own per-layer schedule.
    project: Which leaves to project (formerly `mask`). None: every leaf
      with at least two non-stacked axes that is not named `bias`. A regex
      searched in each leaf's key path narrows that rule (ValueError if it
      then selects nothing, listing candidate paths); a callable
      `(path, leaf) -> bool` or a bool pytree like `params` selects
      explicitly. A selected leaf with `rank >= min(m, n)` gets full inner
      state, with one warning per `init` listing such leaves.
      `projected_leaves` shows the selection.
    stacked_axes: Axes that index independent matrices (scan-stacked
      layers), each with its own projector: an `nnx.Module` or `nnx.State`
      (read with `stacked_axes_from`: the `layers` logical axis), a pytree
      like `params` of ints / int tuples / None (matched by key path), a
      callable `(path, leaf) -> axes`, or a regex (matching leaves have
      their leading axis stacked). None: no stacked axes.
    input_axes: Which non-stacked axes are the matrix's input (row) axes,
      numbered among the non-stacked axes: an `nnx.Module` (read with
      `input_axes_from`), a pytree like `params` or a callable
      `(path, leaf) -> axes`; None (or a None entry) uses the default rule,
      all but the last non-stacked axis (see `lowrank.optim.matrix_view`).
    seed: Seed for randomized projectors.
    projector_bits: Store projectors as 8- or 4-bit codes with per-group
      scales (Q-GaLore); dequantized on use. None keeps float32.
    projector_group_size: Quantization group size. With
      `projector_quantizer="rank_groups"` the group runs along the rank axis
      (default `min(rank, 256)`; must divide `rank`); with `"q_galore"` it
      is a run of consecutive elements of the flattened basis (default 256;
      must divide `d·rank` of every projected leaf, checked at `init`).
    projector_quantizer: How `projector_bits` quantizes: `"rank_groups"`
      (default: groups along the rank axis of `[..., d, r]`, unclamped zero
      point, so a `d`-sharded projector stays sharded) or `"q_galore"`
      (Q-GaLore's `_quantize`: the basis as galore-torch stores it for
      lowrank's `[in, out]` kernels, `Pᵀ` for a left basis and `P` for a
      right one, flattened into groups of consecutive elements, with
      `max − min` floored at 1e-5 and the zero point clamped; see
      `lowrank.optim.quantize`).
    adaptive_gap: Q-GaLore's lazy, layer-adaptive refresh: at each refresh
      a layer records the cosine similarity of its new and last first basis
      vectors (float32, before quantization); when the last `cos_history`
      are recorded and their mean is `>= cos_threshold`, the layer's gap is
      multiplied by `gap_growth` (and can grow again at the next refresh).
      Refreshes fall on multiples of the current gap, as in Q-GaLore's
      code (`step % gap == 0`).
    cos_threshold: See `adaptive_gap` (Q-GaLore default 0.4).
    gap_growth: See `adaptive_gap` (Q-GaLore default 2).
    cos_history: See `adaptive_gap` (Q-GaLore default 5).
    signed_cosine: Compare first basis vectors by their signed cosine, as
      Q-GaLore's code does (`F.cosine_similarity`), so a vector whose sign
      flipped counts as unstable. Default False: `|cos|`, since an SVD's
      signs are arbitrary (a flipped vector spans the same subspace).

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: On a non-positive `rank` / `refresh_every` / `stagger`, or an
      unknown `side`, `projector`, `on_refresh` or `residual`, or an invalid
      quantization layout, or `stagger_layers` with `adaptive_gap`, or an
      invalid `project` / `stacked_axes` regex; at `init`, on a selector
      that selects nothing or does not fit `params`.
  """
  for name, v in (("rank", rank), ("refresh_every", refresh_every),
                  ("stagger", stagger)):
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
      raise ValueError(f"{name} must be a positive Python int; got {v!r}.")
  if side not in projection.SIDES:
    raise ValueError(f"Unknown side {side!r}; expected {projection.SIDES}.")
  if projector not in projection.PROJECTORS:
    raise ValueError(
        f"Unknown projector {projector!r}; expected {projection.PROJECTORS}."
    )
  if rsvd_method not in projection.RSVD_METHODS:
    raise ValueError(f"Unknown rsvd_method {rsvd_method!r}; expected "
                     f"{projection.RSVD_METHODS}.")
  if on_refresh not in ON_REFRESH:
    raise ValueError(
        f"Unknown on_refresh {on_refresh!r}; expected {ON_REFRESH}."
    )
  if residual not in RESIDUALS:
    raise ValueError(f"Unknown residual {residual!r}; expected {RESIDUALS}.")
  if projector_quantizer not in QUANTIZERS:
    raise ValueError(f"Unknown projector_quantizer {projector_quantizer!r}; "
                     f"expected {QUANTIZERS}.")
  if projector_quantizer == "q_galore":
    group = projector_group_size or 256
    if projector_bits is not None and projector_bits not in quant.BITS:
      raise ValueError(
          f"bits must be one of {quant.BITS}; got {projector_bits!r}.")
  else:
    group = projector_group_size or min(rank, 256)
    if projector_bits is not None:
      quant.check(rank, projector_bits, group)
  if adaptive_gap and (not isinstance(cos_history, int) or cos_history < 1):
    raise ValueError(f"cos_history must be a positive int; got {cos_history}")
  if stagger_layers and adaptive_gap:
    raise ValueError(
        "stagger_layers=True needs the fixed refresh schedule; got "
        "adaptive_gap=True, whose layers refresh on their own schedules."
    )
  project, stacked_axes, input_axes = _compile_arguments(
      project, stacked_axes, input_axes)
  inner = optax.with_extra_args_support(inner)
  opts = _Options(
      rank=rank, refresh_every=refresh_every, scale=scale, side=side,
      projector=projector, rsvd_method=rsvd_method, on_refresh=on_refresh,
      residual=residual, residual_scale=residual_scale,
      fira_gamma=fira_gamma, fira_leak=fira_leak, stagger=stagger,
      stagger_layers=stagger_layers, project=project,
      stacked_axes=stacked_axes, input_axes=input_axes, seed=seed,
      projector_bits=projector_bits, group=group,
      quantizer=projector_quantizer, adaptive_gap=adaptive_gap,
      cos_threshold=cos_threshold, gap_growth=gap_growth,
      cos_history=cos_history, signed_cosine=signed_cosine,
      fira_bias_correction=fira_bias_correction)

  def init_fn(params):
    return _galore_init(params, inner, opts)

  def update_fn(updates, state, params=None, **extra_args):
    del params  # `inner` works on projected shapes; see docstring.
    return _galore_update(updates, state, inner, opts, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ScaleByAdamPerMatrixState(NamedTuple):
  """State for `scale_by_adam_per_matrix`.

  Attributes:
    count: Per leaf, int32 steps since the moments were last reset, one per
      matrix: shape `leaf.shape[:-2]` (`()` for a leaf with fewer than three
      axes).
    mu: First moments, like the updates.
    nu: Second moments, like the updates.
  """

  count: optax.Updates
  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam_per_matrix(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
) -> optax.GradientTransformation:
  """`optax.scale_by_adam` with one bias-correction count per matrix.

  Equal to `optax.scale_by_adam` on its own. As the `inner` of
  `scale_by_galore(on_refresh="reset")`, each matrix's count restarts with
  its moments at a refresh (torch's per-parameter `state["step"] = 0` in
  FRUGAL's `reset_statistics`), so the first step after a refresh has the
  bias correction of a first step: on a constant gradient every step,
  refresh or not, moves each low-rank coordinate by exactly the learning
  rate. Matrices are the last two axes of each (projected) leaf; the
  leading axes are stacked layers with counts of their own. `b1`, `b2`,
  `eps` and `eps_root` are `optax.scale_by_adam`'s.
  """

  return adam_lib.scale_by_adam_counted(
      b1, b2, eps, eps_root, count_shape=lambda shape: shape[:-2],
      state=ScaleByAdamPerMatrixState)


def _scale_by_adam_torch_eps(
    b1: jax.typing.ArrayLike, b2: jax.typing.ArrayLike,
    eps: jax.typing.ArrayLike) -> optax.GradientTransformation:
  """Adam with torch-style eps placement and one count per matrix.

  `m / (√v + eps) · √(1−β2ᵗ)/(1−β1ᵗ)`: eps is added to the uncorrected
  `√v` and the bias correction multiplies afterwards, as the AdamW of
  galore-torch (`galore_torch/adamw.py`) and Fira
  (`optimizer_torch/fira_adamw.py`) compute it; optax's
  `m̂ / (√v̂ + eps)` is this with eps divided by `√(1−β2ᵗ)`. Counts are kept
  per matrix as in `scale_by_adam_per_matrix` (same state), so
  `on_refresh="reset"` restarts them.
  """
  return adam_lib.scale_by_adam_counted(
      b1, b2, eps, 0.0, count_shape=lambda shape: shape[:-2],
      state=ScaleByAdamPerMatrixState, torch_eps=True)


def _adamw(core, learning_rate, weight_decay, mask):
  if isinstance(mask, str):
    raise ValueError(
        f"mask={mask!r}: mask is the weight-decay mask (optax's meaning: a "
        "bool pytree or a callable params -> bool pytree), not a regex. The "
        "projection selector is project= (formerly mask=): pass "
        f"project={mask!r}.")
  return optax.chain(
      core,
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


# The keyword arguments every GaLore-family AdamW alias (`galore_adamw`,
# `q_galore_adamw`, `fira_adamw`, `frugal_adamw`) takes, with the same
# meaning and defaults (except `projector_bits`, 4 in Q-GaLore); each alias
# adds its own extras. The aliases other than `galore_adamw` forward exactly
# these (`_family_alias`).
FAMILY_ARGS = ("rank", "refresh_every", "scale", "side", "projector",
               "rsvd_method", "b1", "b2", "eps", "eps_placement",
               "weight_decay", "mask", "project", "stacked_axes",
               "input_axes", "seed", "projector_bits",
               "projector_group_size", "projector_quantizer", "update_gap")


def _renamed_refresh_every(refresh_every: int, update_gap: int | None,
                           caller: str, stacklevel: int = 3) -> int:
  """`refresh_every`, or the deprecated `update_gap` if that was passed.

  The warning points `stacklevel` frames up: 3 is the caller's caller.
  """
  if update_gap is None:
    return refresh_every
  warnings.warn(
      f"{caller}(update_gap=...) is deprecated; pass refresh_every= (the "
      "steps between basis refreshes) instead.", DeprecationWarning,
      stacklevel=stacklevel)
  if refresh_every != _DEFAULT_REFRESH_EVERY and refresh_every != update_gap:
    raise TypeError(
        f"{caller} got refresh_every={refresh_every} and its deprecated "
        f"alias update_gap={update_gap}; pass only refresh_every.")
  return update_gap


def _family_alias(caller: str, args: dict[str, Any],
                  **extras: Any) -> optax.GradientTransformationExtraArgs:
  """`galore_adamw` configured as the family alias `caller`.

  Args:
    caller: The alias's name, for the `update_gap` deprecation warning.
    args: The alias's arguments (its `locals()` on entry): `learning_rate`
      and the `FAMILY_ARGS` are forwarded unchanged, except the deprecated
      `update_gap`, which is resolved into `refresh_every` here.
    **extras: The `galore_adamw` arguments the alias sets itself.

  Returns:
    `galore_adamw(learning_rate, **family_args, **extras)`.
  """
  shared = {name: args[name] for name in FAMILY_ARGS}
  shared["refresh_every"] = _renamed_refresh_every(
      shared["refresh_every"], shared.pop("update_gap"), caller, stacklevel=4)
  return galore_adamw(args["learning_rate"], **shared, **extras)


def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int,
    refresh_every: int = _DEFAULT_REFRESH_EVERY,
    scale: jax.typing.ArrayLike = 1.0,
    side: str = "auto",
    projector: str = "svd",
    rsvd_method: str = "cholesky",
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_placement: str = "optax",
    weight_decay: jax.typing.ArrayLike = 0.0,
    mask: Any = None,
    project: str | ProjectFn | Any | None = None,
    stacked_axes: Any = None,
    input_axes: Any = None,
    on_refresh: str = "keep",
    residual: str | None = None,
    residual_scale: jax.typing.ArrayLike = 1.0,
    fira_gamma: jax.typing.ArrayLike = 1.01,
    fira_leak: bool = False,
    fira_limiter: str = "uncorrected",
    stagger: int = 1,
    stagger_layers: bool = False,
    seed: int = 0,
    projector_bits: int | None = None,
    projector_group_size: int | None = None,
    projector_quantizer: str = "rank_groups",
    adaptive_gap: bool = False,
    cos_threshold: jax.typing.ArrayLike = 0.4,
    gap_growth: jax.typing.ArrayLike = 2,
    cos_history: int = 5,
    signed_cosine: bool = False,
    update_gap: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """AdamW whose moments live in a low-rank gradient subspace (GaLore).

  Weight decay is decoupled and applied in full parameter space to the
  leaves selected by `mask`, which has optax's meaning (as in
  `optax.adamw` and `optax.contrib.galore`): a bool pytree or a callable
  `params -> bool pytree`; None decays every leaf. Which gradients are
  projected is `project` (formerly `mask`); see `scale_by_galore` for it,
  `stacked_axes`, `input_axes` and the arguments after them. `b1`, `b2`
  and `eps` are Adam's. With `on_refresh="reset"` the inner Adam is
  `scale_by_adam_per_matrix`, whose step counts restart with the moments.
  `eps_placement="torch"` adds `eps` to the uncorrected `√v` and applies the
  bias correction afterwards, `m / (√v + eps) · √(1−β2ᵗ)/(1−β1ᵗ)`, as the
  torch AdamWs of GaLore and Fira do (default `"optax"`: `m̂ / (√v̂ + eps)`;
  the per-matrix counts are kept then too). `fira_limiter` (with
  `residual="fira"`) is `fira_adamw`'s `limiter`. `update_gap` is the
  deprecated name of `refresh_every` (it warns).

  When `rank` is at least a gradient's rank, the projection keeps the whole
  gradient and the trajectory is driven by rounding noise of the SVD (seen
  at rank > gradient rank): the basis vectors beyond the gradient's rank
  span directions where it is zero up to rounding, and Adam normalises
  those rounding-sized coordinates to steps of the learning rate's size.

  Differences from the official code (jiaweizzhao/GaLore@2cc66f88cce1,
  `galore_torch/adamw.py`, `galore_projector.py`, `torchrun_main.py`);
  `presets.paper("galore_adamw")` gives the official behaviour where an
  argument can:
    * Side: `side="auto"` projects the larger dimension (state
      `r × min(m, n)`, as `optax.contrib.galore`); galore-torch's `std`
      projects the smaller one: `side="torch"`.
    * Adam's eps: 1e-8 with optax's placement (the library's convention);
      galore-torch uses 1e-6 added before the bias correction:
      `eps=1e-6, eps_placement="torch"`.
    * Projected leaves: every matrix, embedding and output head included;
      the official scripts project only the attention and MLP linear
      weights: pass `project=` a regex for them (e.g. `r"_proj"` for
      `lowrank.models.llama`).
    * Not available: galore-torch casts the basis to the gradient's dtype
      (bf16 in its bf16 runs; lowrank keeps it in float32), and applies
      weight decay after the step to the updated weight (here before, to
      the old one: a difference of order lr²·wd).

  Examples:
    >>> import jax.numpy as jnp
    >>> from lowrank import optim
    >>> tx = optim.galore_adamw(1e-2, rank=2, refresh_every=10)
    >>> params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
    >>> state = tx.init(params)
    >>> state[0].inner_state.mu["w"].shape  # r x min(m, n)
    (2, 4)

  Raises:
    ValueError: As `scale_by_galore`, or on a string `mask` (a projection
      regex belongs in `project`), or an unknown `eps_placement` or
      `fira_limiter`.
    TypeError: On both `refresh_every` and `update_gap` (different values).
  """
  refresh_every = _renamed_refresh_every(refresh_every, update_gap,
                                         "galore_adamw")
  if eps_placement not in EPS_PLACEMENTS:
    raise ValueError(f"Unknown eps_placement {eps_placement!r}; expected "
                     f"{EPS_PLACEMENTS} ('torch': galore-torch's and Fira's "
                     "m / (sqrt(v) + eps) before the bias correction).")
  if fira_limiter not in FIRA_LIMITERS:
    raise ValueError(f"Unknown fira_limiter {fira_limiter!r}; expected "
                     f"{FIRA_LIMITERS}.")
  if eps_placement == "torch":
    adam = _scale_by_adam_torch_eps(b1, b2, eps)
  elif on_refresh == "reset":
    adam = scale_by_adam_per_matrix(b1, b2, eps)
  else:
    adam = optax.scale_by_adam(b1, b2, eps)
  core = scale_by_galore(
      adam,
      rank=rank, refresh_every=refresh_every, scale=scale, side=side,
      projector=projector, rsvd_method=rsvd_method, on_refresh=on_refresh,
      residual=residual, residual_scale=residual_scale, fira_gamma=fira_gamma,
      fira_leak=fira_leak,
      fira_bias_correction=(b1, b2) if fira_limiter == "uncorrected" else None,
      stagger=stagger, stagger_layers=stagger_layers,
      project=project, stacked_axes=stacked_axes, input_axes=input_axes,
      seed=seed, projector_bits=projector_bits,
      projector_group_size=projector_group_size,
      projector_quantizer=projector_quantizer, adaptive_gap=adaptive_gap,
      cos_threshold=cos_threshold, gap_growth=gap_growth,
      cos_history=cos_history, signed_cosine=signed_cosine,
  )
  return _adamw(core, learning_rate, weight_decay, mask)


_ATTN_MLP_ONLY = (
    "projecting only the attention and MLP linear weights (the official "
    "scripts; embeddings, norms and the output head get full AdamW): no "
    "model-independent value, pass project= a regex for them (r'_proj' for "
    "lowrank.models.llama)")
_GALORE_SOURCE = ("jiaweizzhao/GaLore@2cc66f88cce1 (galore_torch/adamw.py, "
                  "galore_torch/galore_projector.py)")
_SIDE_REASON = (
    "lowrank's 'auto' projects the larger dimension (state r x min(m, n), "
    "as optax.contrib.galore); the official 'std' rule projects the smaller "
    "one, which 'torch' is for lowrank's [in, out] kernels")
_EPS_REASON = ("optax's default, the library-wide one; the official AdamW "
               "uses 1e-6")
_EPS_PLACEMENT_REASON = (
    "optax's m_hat / (sqrt(v_hat) + eps); the official AdamW adds eps to the "
    "uncorrected sqrt(v) and bias-corrects the step size")

presets.register(
    "galore_adamw", source=_GALORE_SOURCE,
    kwargs=dict(side="torch", eps=1e-6, eps_placement="torch"),
    reasons=dict(side=_SIDE_REASON, eps=_EPS_REASON,
                 eps_placement=_EPS_PLACEMENT_REASON),
    unavailable=(
        _ATTN_MLP_ONLY,
        "the basis cast to the gradient's dtype (bf16 in bf16 runs); lowrank "
        "keeps it in float32",
        "weight decay after the step, on the updated weight (lowrank decays "
        "the old weight; a difference of order lr^2 * wd)"))


def q_galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int,
    refresh_every: int = _DEFAULT_REFRESH_EVERY,
    scale: jax.typing.ArrayLike = 1.0,
    side: str = "auto",
    projector: str = "svd",
    rsvd_method: str = "cholesky",
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_placement: str = "optax",
    weight_decay: jax.typing.ArrayLike = 0.0,
    mask: Any = None,
    project: str | ProjectFn | Any | None = None,
    stacked_axes: Any = None,
    input_axes: Any = None,
    seed: int = 0,
    projector_bits: int = 4,
    projector_group_size: int | None = None,
    projector_quantizer: str = "rank_groups",
    cos_threshold: jax.typing.ArrayLike = 0.4,
    gap_growth: jax.typing.ArrayLike = 2,
    cos_history: int = 5,
    signed_cosine: bool = False,
    update_gap: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Q-GaLore: low-bit projectors and lazy, layer-adaptive refresh.

  Projectors are stored as `projector_bits`-bit codes with per-group scales
  (Q-GaLore's default: 4 bits) and each layer's refresh gap, starting at
  `refresh_every`, doubles once its basis is stable (mean cosine similarity
  of consecutive float32 first basis vectors over the last `cos_history`
  refreshes `>= cos_threshold`; refreshes fall on multiples of the current
  gap). The other arguments are `galore_adamw`'s and `scale_by_galore`'s
  (`mask` is the weight-decay mask and `project` the projection selector);
  `update_gap` is the deprecated name of `refresh_every` (it warns).

  Differences from the official code (VITA-Group/Q-GaLore@5bd2f1c5a1ad,
  `q_galore_torch/q_galore_projector.py`, `q_galore_adamw8bit.py`,
  `run_pretrain.py`); `presets.paper("q_galore_adamw")` gives the official
  behaviour where an argument can:
    * Cosine: `|cos|` of consecutive first vectors, since an SVD's signs
      are arbitrary; the official code uses the signed cosine (a flipped
      vector counts as unstable): `signed_cosine=True`.
    * Projector quantization: groups along the rank axis with an unclamped
      zero point (a `d`-sharded projector stays sharded); the official
      `_quantize` flattens the stored basis into groups of 256 elements
      with a clamped zero point and a scale floor:
      `projector_quantizer="q_galore"` (group 256 by default then).
    * β2: 0.999; the official scripts run 0.95 (`--beta2`): `b2=0.95`.
    * Side and projected leaves as `galore_adamw`: `side="torch"`,
      `project=`.
    * Not available as an argument: the inner optimizer is float32 Adam;
      the official one is bitsandbytes' blockwise 8-bit AdamW. Compose it:
      `optax.chain(scale_by_galore(optim.scale_by_adam8bit(b2=0.95),
      rank=..., adaptive_gap=True, projector_bits=4, ...),
      optax.add_decayed_weights(wd), optax.scale_by_learning_rate(lr))`
      (bitsandbytes' eps placement was not checked).
    * Not available: INT8 weights with stochastic rounding (a model-side
      choice), weight decay after the step (as `galore_adamw`).

  References:
    Zhang et al. 2024, Q-GaLore, https://arxiv.org/abs/2407.08296
  """
  return _family_alias(
      "q_galore_adamw", locals(), adaptive_gap=True,
      cos_threshold=cos_threshold, gap_growth=gap_growth,
      cos_history=cos_history, signed_cosine=signed_cosine)


presets.register(
    "q_galore_adamw",
    source=("VITA-Group/Q-GaLore@5bd2f1c5a1ad "
            "(q_galore_torch/q_galore_projector.py, run_pretrain.py)"),
    kwargs=dict(side="torch", b2=0.95, signed_cosine=True,
                projector_quantizer="q_galore"),
    reasons=dict(
        side=_SIDE_REASON,
        b2="optax's default 0.999; the official scripts run --beta2 0.95",
        signed_cosine=(
            "an SVD's signs are arbitrary, so lowrank compares |cos|; the "
            "official code's signed cosine counts a flipped vector as "
            "unstable"),
        projector_quantizer=(
            "lowrank groups along the rank axis so a d-sharded projector "
            "stays sharded; the official quantizer flattens the basis into "
            "groups of 256 with a clamped zero point")),
    unavailable=(
        "bitsandbytes' blockwise 8-bit AdamW as the inner optimizer: "
        "compose scale_by_galore(optim.scale_by_adam8bit(b2=0.95), "
        "adaptive_gap=True, projector_bits=4, ...) with weight decay and "
        "the learning rate",
        "INT8 weights with stochastic rounding (--weight_quant "
        "--stochastic_round; model-side)",
        _ATTN_MLP_ONLY,
        "weight decay after the step, on the updated weight"))


def fira_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int,
    refresh_every: int = _DEFAULT_REFRESH_EVERY,
    scale: jax.typing.ArrayLike = 1.0,
    side: str = "auto",
    projector: str = "svd",
    rsvd_method: str = "cholesky",
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_placement: str = "optax",
    weight_decay: jax.typing.ArrayLike = 0.0,
    mask: Any = None,
    project: str | ProjectFn | Any | None = None,
    stacked_axes: Any = None,
    input_axes: Any = None,
    seed: int = 0,
    projector_bits: int | None = None,
    projector_group_size: int | None = None,
    projector_quantizer: str = "rank_groups",
    stagger: int = 1,
    stagger_layers: bool = False,
    gamma: jax.typing.ArrayLike = 1.01,
    leak: bool = False,
    limiter: str = "uncorrected",
    update_gap: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Fira: GaLore-AdamW plus the norm-scaled residual with a growth limiter.

  `gamma` is Fira's norm-growth limit γ. `limiter="uncorrected"` (default,
  as Fira's code: `exp_avg / denom` is limited before the bias correction
  scales the step) bounds the growth of the residual divided by Adam's bias
  correction `√(1−β2ᵗ)/(1−β1ᵗ)` and stores that norm; `"corrected"` bounds
  the bias-corrected residual (lowrank's behaviour before; with the limiter
  binding from the start it made the residual up to 2.1× the official one
  around step 12). `leak=True` reproduces Fira's reference code (residual
  `G − α P Pᵀ G`); the default is the paper's true orthogonal complement.
  The other arguments are `galore_adamw`'s (`mask` is the weight-decay mask
  and `project` the projection selector); `update_gap` is the deprecated
  name of `refresh_every` (it warns).

  Differences from the official code (xichen-fy/Fira@5c28b1340828,
  `optimizer_torch/fira_adamw.py`, `gradient_projection.py`);
  `presets.paper("fira_adamw")` gives the official behaviour where an
  argument can:
    * Residual: the true complement `G − P Pᵀ G` (the paper's text); the
      code subtracts the α-scaled projection, `G − α P Pᵀ G`: `leak=True`
      (the same when `scale=1`).
    * Adam's eps: 1e-8 with optax's placement; Fira uses 1e-6 added before
      the bias correction: `eps=1e-6, eps_placement="torch"`.
    * Side and projected leaves as `galore_adamw`: `side="torch"`,
      `project=`.
    * Not available: the basis in the gradient's dtype and weight decay
      after the step (as `galore_adamw`).
  """
  return _family_alias(
      "fira_adamw", locals(), stagger=stagger, stagger_layers=stagger_layers,
      residual="fira", fira_gamma=gamma, fira_leak=leak,
      fira_limiter=limiter)


presets.register(
    "fira_adamw",
    source=("xichen-fy/Fira@5c28b1340828 (optimizer_torch/fira_adamw.py, "
            "optimizer_torch/gradient_projection.py)"),
    kwargs=dict(side="torch", eps=1e-6, eps_placement="torch", leak=True),
    reasons=dict(
        side=_SIDE_REASON, eps=_EPS_REASON,
        eps_placement=_EPS_PLACEMENT_REASON,
        leak=("the paper's text uses the true complement G - P P^T G; the "
              "code's residual is G - alpha P P^T G")),
    unavailable=(
        _ATTN_MLP_ONLY,
        "the basis cast to the gradient's dtype (bf16 in bf16 runs)",
        "weight decay after the step, on the updated weight"))


def frugal_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int,
    refresh_every: int = _DEFAULT_REFRESH_EVERY,
    scale: jax.typing.ArrayLike = 1.0,
    side: str = "auto",
    projector: str = "svd",
    rsvd_method: str = "cholesky",
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_placement: str = "optax",
    weight_decay: jax.typing.ArrayLike = 0.0,
    mask: Any = None,
    project: str | ProjectFn | Any | None = None,
    stacked_axes: Any = None,
    input_axes: Any = None,
    seed: int = 0,
    projector_bits: int | None = None,
    projector_group_size: int | None = None,
    projector_quantizer: str = "rank_groups",
    stagger: int = 1,
    stagger_layers: bool = False,
    residual_rule: str = "sign",
    inactive_lr_scale: jax.typing.ArrayLike = 1.0,
    update_gap: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """FRUGAL: state-full AdamW in the subspace, state-free rule outside.

  At each refresh the subspace's Adam state is re-initialised, moments and
  step count alike (FRUGAL's `reset_statistics=True`, whose `_init_state`
  sets `step = 0`): the count is kept per matrix
  (`scale_by_adam_per_matrix`), so the first step after a refresh is
  bias-corrected as a first step. The residual gets signSGD (`"sign"`,
  default) or SGD (`"sgd"`) scaled by `inactive_lr_scale` (FRUGAL's
  pretraining scripts use 1.0, the default, its fine-tuning ones 0.1). The
  other arguments are `galore_adamw`'s (`mask` is the weight-decay mask and
  `project` the projection selector); the default projector is `"svd"`,
  FRUGAL's (`proj_type='svd'`; it was `"random"` here). `update_gap` is the
  deprecated name of `refresh_every` (it warns).

  Differences from the official code (philip-zmushko/FRUGAL, read at the
  fork hungquangbui02022003/FRUGAL@c7ebe4c242f7, upstream's "Init":
  `frugal/proj_optimizer_templates.py`, `adamw.py`, `galore_projector.py`);
  `presets.paper("frugal_adamw")` gives the official behaviour where an
  argument can. Adam (eps 1e-8, optax's placement), the reset of moments
  and count, the refresh period and the sign rule match.
    * Side: `side="torch"` for FRUGAL's `proj_side='std'` (as
      `galore_adamw`).
    * Rank: FRUGAL sets each matrix's rank to `round(density · d)` of its
      projected dimension (`density=0.25`); lowrank has one `rank`:
      `rank=round(0.25 · d)` gives it when every projected dimension is `d`,
      otherwise not available.
    * Projected leaves: attention and MLP linear weights only: `project=`.
    * Not available: the block variant the pretraining scripts run
      (`--optimizer frugal` is BlockAdamW: whole tensors state-full, the
      others signSGD, rotated every `update_gap` steps).

  References:
    Zmushko et al. 2024, FRUGAL, https://arxiv.org/abs/2411.07837
  """
  if residual_rule not in ("sign", "sgd"):
    raise ValueError(
        f"residual_rule must be 'sign' or 'sgd'; got {residual_rule!r}."
    )
  return _family_alias(
      "frugal_adamw", locals(), stagger=stagger,
      stagger_layers=stagger_layers, on_refresh="reset",
      residual=f"frugal_{residual_rule}", residual_scale=inactive_lr_scale)


presets.register(
    "frugal_adamw",
    source=("hungquangbui02022003/FRUGAL@c7ebe4c242f7, a fork of "
            "philip-zmushko/FRUGAL (frugal/proj_optimizer_templates.py, "
            "frugal/adamw.py, frugal/galore_projector.py)"),
    kwargs=dict(side="torch"),
    reasons=dict(side=_SIDE_REASON),
    unavailable=(
        "a per-matrix rank round(density * d) (density 0.25): pass "
        "rank=round(0.25 * d) when every projected dimension is d",
        _ATTN_MLP_ONLY,
        "the block variant (BlockAdamW) that the official pretraining "
        "scripts run under --optimizer frugal"))
