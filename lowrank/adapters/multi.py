r"""Many named LoRA adapters on one model: switching and mixed batches.

    from lowrank.adapters import multi
    multi.add_adapter(model, "code", targets="all-linear", rank=8, alpha=16)
    multi.add_adapter(model, "legal", targets=r".*\.(query|value)", rank=4)
    multi.set_active(model, "legal")        # no retrace under nnx.jit
    with multi.adapter_ids(model, jnp.array([0, 1, -1, 0])):
      out = model(x)                        # row b uses adapter ids[b]

PEFT's named-adapter semantics (`add_adapter` / `set_adapter` /
`delete_adapter` / `disable_adapter`, and mixed-adapter batches with
`adapter_names=[...]`), with shapes that stay static under `jit`.

**Design.** Every adapted layer is replaced by one `MultiLoRA` wrapper that
holds *all* adapters stacked: `lora_a: [N, *in_shape, r_max]` and
`lora_b: [N, r_max, *out_shape]` (`nnx.LoRAParam`; an adapter of rank
`r < r_max` is zero-padded, and since both padded factors are zero their
gradients are zero too, so padding stays zero in training), and a scale
vector `scales: [N]` (`AdapterState`). Every wrapper knows the same ordered
adapter names, so index `i` means the same adapter everywhere; a layer that
adapter `i` does not target has a zero slot of rank 0. Which adapter runs is
*data*, not structure: `adapter_index` (scalar int32, `-1` = base only),
`adapter_on` (bool) and `row_ids` (`[batch]` int32, empty when not in a mixed
batch) are `Routing` variables, so `set_active`, `enable`/`disable` and
`adapter_ids` change array values only and a jitted function does not
retrace. Adding or deleting an adapter changes shapes (and retraces): it is
a set-up operation, like PEFT's.

**Mixed batches.** Layers are called by their parents without extra
arguments, so the per-row adapter index is passed through the model's
state: inside `with adapter_ids(model, ids):` every wrapper reads `row_ids`
and computes its update with gathered factors, `A[ids]: [batch, d_in, r]`,
`h = einsum('b...i,bir->b...r', x, A[ids])`, then the same with `B[ids]`:
one batched matmul pair for the whole batch, not a loop over adapters (as
S-LoRA / punica do on GPU). Row `b` is axis 0 of each adapted layer's
input. The context can be entered inside or outside `nnx.jit`.

Training one adapter at a time works as usual
(`nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` sees the whole stack; the
inactive slots get zero gradients). Decoupled weight decay (AdamW) still
shrinks the inactive slots, so use `weight_decay=0` or mask them.

References:
  Hu et al. 2021, LoRA, https://arxiv.org/abs/2106.09685
  Sheng et al. 2023, S-LoRA: Serving Thousands of Concurrent LoRA Adapters,
    https://arxiv.org/abs/2311.03285
  Hugging Face PEFT, mixed adapter batches,
    https://huggingface.co/docs/peft/developer_guides/lora
"""

from collections.abc import Iterator, Mapping, Sequence
import contextlib
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from lowrank import surgery
from lowrank.adapters import injection
from lowrank.adapters import layers
from lowrank.adapters import lora


class Routing(nnx.Variable):
  """Which adapter(s) run: not trained and not stored in adapter files."""


def _check_names(names: Any) -> tuple[str, ...]:
  if isinstance(names, str) or not isinstance(names, Sequence):
    raise ValueError(f"names must be a sequence of strings; got {names!r}.")
  names = tuple(names)
  for n in names:
    if not isinstance(n, str) or not n:
      raise ValueError(f"Adapter names must be non-empty strings; got {n!r}.")
  if len(set(names)) != len(names):
    raise ValueError(f"Adapter names must be unique; got {names}.")
  return names


def _slot_scale(rank: int, alpha: float, rslora: bool) -> float:
  return lora.scaling(rank, alpha, rslora=rslora) if rank else 0.0


class MultiLoRA(layers.LoRAWrapper):
  """N named LoRA adapters on one layer, stacked, one (or one per row) used.

  Rebuildable as `MultiLoRA(base, rank=r_max, names=..., ranks=...,
  alphas=..., rsloras=..., rngs=...)` followed by loading `lora_a`,
  `lora_b` (`nnx.LoRAParam`) and `scales` (`AdapterState`).

  Attributes:
    rank: `r_max`, the padded rank of the stacks (static).
    names: Adapter names, in slot order (static).
    ranks: Each adapter's own rank here; 0 where it does not target this
      layer (static).
    alphas, rsloras: Each adapter's `lora_alpha` and rsLoRA flag (static).
    lora_a: `[N, *in_shape, r_max]` `nnx.LoRAParam`.
    lora_b: `[N, r_max, *out_shape]` `nnx.LoRAParam`.
    scales: `[N]` float32 `AdapterState`, `ΔW_i = scales[i] A_i B_i`.
    adapter_index: Scalar int32 `Routing`, the active slot or -1 (base).
    adapter_on: Scalar bool `Routing` (`enable` / `disable`).
    row_ids: `[batch]` int32 `Routing`, per-row slots (-1 = base) inside
      `adapter_ids`; shape `[0]` outside it.
  """

  method = "multi_lora"
  option_names = ("names", "ranks", "alphas", "rsloras")

  def _create(
      self,
      key: jax.Array,
      dtype,
      names: Sequence[str] = ("default",),
      ranks: Sequence[int] | None = None,
      alphas: Sequence[float | int] | None = None,
      rsloras: Sequence[bool] | None = None,
  ) -> None:
    names = _check_names(names)
    n = len(names)
    ranks = (self.rank,) * n if ranks is None else tuple(ranks)
    alphas = (self.alpha,) * n if alphas is None else tuple(alphas)
    rsloras = (self.rslora,) * n if rsloras is None else tuple(rsloras)
    for what, vals in (("ranks", ranks), ("alphas", alphas),
                       ("rsloras", rsloras)):
      if len(vals) != n:
        raise ValueError(
            f"{what} must have one entry per adapter name ({n}); got "
            f"{len(vals)}: {vals!r}."
        )
    for r in ranks:
      if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not (
          0 <= r <= self.rank
      ):
        raise ValueError(
            f"Each adapter rank must be an int in [0, rank={self.rank}] "
            f"(0: the adapter does not target this layer); got {ranks}."
        )
    self.names = names
    self.ranks = tuple(int(r) for r in ranks)
    self.alphas = tuple(float(a) for a in alphas)
    self.rsloras = tuple(bool(s) for s in rsloras)
    keys = jax.random.split(key, max(n, 1))
    a = [self._init_a(keys[i], r, dtype) for i, r in enumerate(self.ranks)]
    a = jnp.stack(a) if a else jnp.zeros(
        (0,) + self.in_shape + (self.rank,), dtype
    )
    b = jnp.zeros((n, self.rank) + self.out_shape, dtype)
    self._set_stacks(a, b)
    self.scales = layers.AdapterState(
        jnp.asarray(
            [_slot_scale(r, al, rs) for r, al, rs in
             zip(self.ranks, self.alphas, self.rsloras)],
            jnp.float32,
        ).reshape(n)
    )
    self.adapter_index = Routing(jnp.asarray(0 if n else -1, jnp.int32))
    self.adapter_on = Routing(jnp.asarray(True))
    self.row_ids = Routing(jnp.zeros((0,), jnp.int32))

  # ------------------------------------------------------------- slots
  def _init_a(self, key: jax.Array, rank: int, dtype) -> jax.Array:
    """`[*in_shape, r_max]`: `init` on the first `rank` columns, zeros after."""
    a = jnp.zeros(self.in_shape + (self.rank,), dtype)
    if rank:
      init = self.init if self.init in lora.INITS else "kaiming"
      a0 = lora.init_a(key, self.in_shape + (rank,), self.d_in, init=init,
                       dtype=dtype)
      a = a.at[..., :rank].set(a0)
    return a

  def _set_stacks(self, a: jax.Array, b: jax.Array) -> None:
    self.lora_a = self._param(a, (None,) + self.in_dims + (None,))
    self.lora_b = self._param(b, (None, None) + self.out_dims)

  def _grow_rank(self, rank: int) -> None:
    """Zero-pads the stacks' rank axis up to `rank` (a shape change)."""
    if rank <= self.rank:
      return
    a, b = self.lora_a.get_value(), self.lora_b.get_value()
    pad = rank - self.rank
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
    b = jnp.pad(b, [(0, 0), (0, pad)] + [(0, 0)] * (b.ndim - 2))
    self.rank = rank
    self._set_stacks(a, b)

  def append_slot(
      self,
      name: str,
      rank: int,
      alpha: float,
      rslora: bool,
      key: jax.Array,
      factors: tuple[Any, Any, Any] | None = None,
  ) -> None:
    """Adds adapter `name` as the last slot (random A / zero B, or factors).

    Low level: `add_adapter` calls it on every wrapper so that all of them
    keep the same names; calling it on one layer alone breaks that.
    `factors = (A2 [d_in, r], B2 [r, d_out], scale)` sets the slot to
    exactly `ΔW = scale · A2 B2`.
    """
    self._grow_rank(rank)
    old_a, old_b = self.lora_a.get_value(), self.lora_b.get_value()
    dtype = old_a.dtype
    scale = _slot_scale(rank, alpha, rslora)
    a = self._init_a(key, rank, dtype)
    b = jnp.zeros((self.rank,) + self.out_shape, dtype)
    if factors is not None:
      a2, b2, scale = factors
      a2 = jnp.asarray(a2, dtype).reshape(self.in_shape + (rank,))
      b2 = jnp.asarray(b2, dtype).reshape((rank,) + self.out_shape)
      a = jnp.zeros_like(a).at[..., :rank].set(a2)
      b = b.at[:rank].set(b2)
    self._set_stacks(
        jnp.concatenate([old_a, a[None]]), jnp.concatenate([old_b, b[None]])
    )
    self.scales.set_value(
        jnp.concatenate([self.scales.get_value(),
                         jnp.asarray(scale, jnp.float32).reshape(1)])
    )
    self.names += (name,)
    self.ranks += (int(rank),)
    self.alphas += (float(alpha),)
    self.rsloras += (bool(rslora),)

  def remove_slot(self, i: int) -> None:
    """Removes slot `i` (low level: `delete_adapter` does every layer)."""
    keep = lambda t: t[:i] + t[i + 1:]
    a, b = self.lora_a.get_value(), self.lora_b.get_value()
    self._set_stacks(
        jnp.concatenate([a[:i], a[i + 1:]]), jnp.concatenate([b[:i], b[i + 1:]])
    )
    s = self.scales.get_value()
    self.scales.set_value(jnp.concatenate([s[:i], s[i + 1:]]))
    self.names, self.ranks = keep(self.names), keep(self.ranks)
    self.alphas, self.rsloras = keep(self.alphas), keep(self.rsloras)

  def factors(self, name: str) -> tuple[jax.Array, jax.Array, jax.Array] | None:
    """`(A2 [d_in, r], B2 [r, d_out], scale)` of adapter `name` on this layer.

    Returns:
      The factors at the adapter's own rank, or `None` if the adapter does
      not target this layer (rank 0).

    Raises:
      ValueError: If there is no adapter `name`.
    """
    if name not in self.names:
      raise ValueError(f"No adapter {name!r}; adapters: {self.names}.")
    i = self.names.index(name)
    r = self.ranks[i]
    if not r:
      return None
    a = self.lora_a.get_value()[i].reshape(self.d_in, self.rank)[:, :r]
    b = self.lora_b.get_value()[i].reshape(self.rank, self.d_out)[:r]
    return a, b, self.scales.get_value()[i]

  # --------------------------------------------------------- computation
  def _stacks_2d(self) -> tuple[jax.Array, jax.Array]:
    n = len(self.names)
    return (
        self.lora_a[...].reshape(n, self.d_in, self.rank),
        self.lora_b[...].reshape(n, self.rank, self.d_out),
    )

  def _selected(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Active slot's 2-D factors and its gated scale (0 when off / -1)."""
    n = len(self.names)
    idx = self.adapter_index[...]
    i = jnp.clip(idx, 0, n - 1)
    a, b = self._stacks_2d()
    gate = (idx >= 0) & self.adapter_on[...]
    coef = jnp.where(gate, self.scales[...][i], 0.0)
    return a[i], b[i], coef

  def adapter_out(self, x2: jax.Array) -> jax.Array:
    """`x2 ΔW_active` (zero when disabled or when the index is -1)."""
    a, b, coef = self._selected()
    return lora.lora_apply(x2, a, b, 1.0) * coef.astype(x2.dtype)

  def mixed_out(self, x2: jax.Array, ids: jax.Array) -> jax.Array:
    """Per-row update: row `i` of `x2: [batch, ..., d_in]` uses slot `ids[i]`.

    Gathers `A[ids]: [batch, d_in, r_max]` and `B[ids]` and contracts them
    per row; rows with id -1 (or all rows when disabled) get zero.

    Raises:
      ValueError: If `x2`'s leading dim is not `ids`'s length.
    """
    if x2.ndim < 2 or x2.shape[0] != ids.shape[0]:
      raise ValueError(
          f"adapter_ids has {ids.shape[0]} rows but this layer's input has "
          f"leading dims {x2.shape[:-1]}: the ids index axis 0 of every "
          "adapted layer's input."
      )
    n = len(self.names)
    safe = jnp.clip(ids, 0, n - 1)
    a, b = self._stacks_2d()
    a_rows = jnp.take(a, safe, axis=0).astype(x2.dtype)  # [batch, d_in, r]
    b_rows = jnp.take(b, safe, axis=0).astype(x2.dtype)  # [batch, r, d_out]
    h = jnp.einsum("b...i,bir->b...r", x2, a_rows)
    y = jnp.einsum("b...r,bro->b...o", h, b_rows)
    coef = jnp.where(
        (ids >= 0) & self.adapter_on[...], self.scales[...][safe], 0.0
    ).astype(y.dtype)
    return y * coef.reshape((-1,) + (1,) * (y.ndim - 1))

  def delta_weight(self) -> jax.Array:
    """`ΔW2` of the active adapter (zeros when disabled / index -1)."""
    if not self.names:
      return jnp.zeros((self.d_in, self.d_out), jnp.float32)
    a, b, coef = self._selected()
    return lora.lora_delta(a, b, 1.0) * coef

  def _check_row_axis(self) -> None:
    base = self.base
    if isinstance(base, nnx.Einsum):
      lhs, ker, _ = layers.parse_einsum(base.einsum_str)
      if lhs[0] in ker:
        raise ValueError(
            f"Mixed-adapter batches need a batch axis first in the input of "
            f"einsum {base.einsum_str!r}."
        )
    elif isinstance(base, nnx.LinearGeneral):
      if any(ax == 0 for ax in base.axis):
        raise ValueError(
            "Mixed-adapter batches need axis 0 of a LinearGeneral input to "
            "be a batch axis, not a contracted one."
        )

  def __call__(self, x, *args, **kwargs):
    if isinstance(self.base, nnx.Einsum):
      einsum_str = kwargs.pop("einsum_str", args[0] if args else None)
      args = ()
      if einsum_str is not None and einsum_str != self.base.einsum_str:
        raise ValueError(
            "An adapter-wrapped Einsum uses its constructor einsum_str."
        )
    y = self.base(x, *args, **kwargs)
    ids = self.row_ids[...]
    mixed = ids.shape[0] > 0  # Static: decided from the shape.
    if mixed and self.merged:
      raise ValueError(
          "Per-row adapter ids cannot be used while an adapter is merged into "
          "the base weights; unmerge first."
      )
    if not self.active or not self.names:
      return y
    if self.dropout is not None:
      x = self.dropout(x)
    x2, batch = self._to_2d(x.astype(self._compute_dtype(x)))
    if mixed:
      self._check_row_axis()
      out = self.mixed_out(x2, ids)
    else:
      out = self.adapter_out(x2)
    return y + self._from_2d(out, batch).astype(y.dtype)

  def peft_factors(self):
    raise ValueError(
        "A MultiLoRA layer holds several adapters; use .factors(name) or "
        "lowrank.adapters.merging.lora_factors(model, adapter=name)."
    )

  def set_peft_factors(self, a2, b2):
    raise ValueError(
        "A MultiLoRA layer holds several adapters; add one from factors with "
        "multi.add_adapter(model, name, factors=...)."
    )


layers.register("multi_lora", MultiLoRA)


# ---------------------------------------------------------------------------
# Model-level API.


def multi_modules(model: nnx.Module) -> dict[str, MultiLoRA]:
  """Dotted path -> `MultiLoRA` wrapper, for every one in `model`."""
  return {
      p: m
      for p, m in injection.adapter_modules(model).items()
      if isinstance(m, MultiLoRA)
  }


def _require(model: nnx.Module) -> dict[str, MultiLoRA]:
  mods = multi_modules(model)
  if not mods:
    raise ValueError(
        "The model has no named adapters; add one with multi.add_adapter or "
        "convert a LoRA model with multi.from_lora."
    )
  return mods


def adapter_names(model: nnx.Module) -> tuple[str, ...]:
  """Names of the model's adapters in slot order (`()` if none)."""
  mods = multi_modules(model)
  return next(iter(mods.values())).names if mods else ()


def _index(model: nnx.Module, name: str | None) -> int:
  names = adapter_names(model)
  if name is None:
    return -1
  if name not in names:
    raise ValueError(f"No adapter named {name!r}; adapters: {names}.")
  return names.index(name)


def active_adapter(model: nnx.Module) -> str | None:
  """Name of the active adapter, or `None` when the base model runs."""
  mods = _require(model)
  i = int(next(iter(mods.values())).adapter_index.get_value())
  return None if i < 0 else adapter_names(model)[i]


def _check_not_merged(mods: Mapping[str, MultiLoRA], what: str) -> None:
  merged = [p for p, m in mods.items() if m.merged]
  if merged:
    raise ValueError(
        f"Cannot {what} while adapters are merged into the base weights "
        f"({', '.join(merged[:5])}...); call adapters.unmerge(model) first."
    )


def _unmerged(model: nnx.Module, what: str) -> dict[str, MultiLoRA]:
  """`_require`, then `_check_not_merged` (`what` names the action)."""
  mods = _require(model)
  _check_not_merged(mods, what)
  return mods


def _routing_value(var: nnx.Variable, value: Any) -> None:
  old = var.get_value()
  var.set_value(jnp.asarray(value, old.dtype).reshape(old.shape))


def set_active(model: nnx.Module, name: str | None) -> nnx.Module:
  """Makes `name` the adapter every layer uses (`None`: base model only).

  Only `adapter_index` values change, so jitted functions do not retrace.

  Raises:
    ValueError: For an unknown name, a model without named adapters, or
      while an adapter is merged.
  """
  mods = _unmerged(model, "switch adapters")
  i = _index(model, name)
  for m in mods.values():
    _routing_value(m.adapter_index, i)
  return model


def _switch(model: nnx.Module, on: bool) -> nnx.Module:
  what = "enable adapters" if on else "disable adapters"
  for m in _unmerged(model, what).values():
    _routing_value(m.adapter_on, on)
  return model


def enable(model: nnx.Module) -> nnx.Module:
  """Turns the adapters back on (after `disable`); no retrace."""
  return _switch(model, True)


def disable(model: nnx.Module) -> nnx.Module:
  """Bypasses every adapter (the base model runs); no retrace."""
  return _switch(model, False)


@contextlib.contextmanager
def disabled(model: nnx.Module) -> Iterator[nnx.Module]:
  """PEFT's `disable_adapter()` context: the base model runs inside it."""
  mods = _require(model)
  previous = {p: m.adapter_on.get_value() for p, m in mods.items()}
  disable(model)
  try:
    yield model
  finally:
    for p, m in mods.items():
      m.adapter_on.set_value(previous[p])


def ids_for(
    model: nnx.Module, rows: Sequence[str | int | None]
) -> jax.Array:
  """Per-row adapter names (`None`: base) -> the `[batch]` int32 id array.

  Raises:
    ValueError: On an unknown name.
  """
  return jnp.asarray(
      [r if isinstance(r, (int, np.integer)) else _index(model, r)
       for r in rows],
      jnp.int32,
  )


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


@contextlib.contextmanager
def adapter_ids(model: nnx.Module, ids: Any) -> Iterator[nnx.Module]:
  """Context in which row `b` of the batch uses adapter `ids[b]`.

  Works inside `nnx.jit` (with traced `ids`) and outside it (the ids are
  then part of the model state passed to the jitted function). Every adapted
  layer must see the batch on axis 0 of its input.

  Args:
    model: A model with named adapters.
    ids: `[batch]` integer adapter indices (`-1`: base model for that row),
      or a sequence of names / `None` (see `ids_for`).

  Yields:
    `model`.

  Raises:
    ValueError: For ids that are not a non-empty 1-D integer array or are
      out of range, or while an adapter is merged.
  """
  mods = _unmerged(model, "run a mixed-adapter batch")
  if isinstance(ids, (list, tuple)):
    ids = ids_for(model, ids)
  ids = jnp.asarray(ids) if _is_concrete(ids) else ids
  if ids.ndim != 1 or ids.shape[0] == 0 or not jnp.issubdtype(
      ids.dtype, jnp.integer
  ):
    raise ValueError(
        f"adapter ids must be a non-empty 1-D integer array [batch]; got "
        f"shape {ids.shape} dtype {ids.dtype}."
    )
  n = len(adapter_names(model))
  if _is_concrete(ids):
    lo, hi = int(jnp.min(ids)), int(jnp.max(ids))
    if lo < -1 or hi >= n:
      raise ValueError(
          f"adapter ids must be in [-1, {n - 1}] ({n} adapters); got values "
          f"in [{lo}, {hi}]."
      )
  ids = ids.astype(jnp.int32)
  previous = {p: m.row_ids.get_value() for p, m in mods.items()}
  for m in mods.values():
    m.row_ids.set_value(ids)
  try:
    yield model
  finally:
    for p, m in mods.items():
      m.row_ids.set_value(previous[p])


# ---------------------------------------------------------------------------
# Adding and removing adapters.


def _modules_by_path(model: nnx.Module) -> dict[str, nnx.Module]:
  """Every submodule by dotted path, not descending into adapter wrappers."""
  return {surgery.path_str(p): m for p, m in surgery.iter_modules(
      model, opaque=(layers.LoRAWrapper,), graph_order=True)}


def _check_factors(
    factors: Mapping[str, Any], modules: Mapping[str, nnx.Module]
) -> dict[str, tuple[jax.Array, jax.Array, Any]]:
  if not isinstance(factors, Mapping) or not factors:
    raise ValueError(
        "factors must be a non-empty {path: (A [d_in, r], B [r, d_out], "
        f"scale)}} mapping; got {type(factors).__name__}."
    )
  out = {}
  for path, value in factors.items():
    if path not in modules:
      raise ValueError(
          f"factors has an entry for {path!r}, which is not a module of "
          f"the model. Modules: {sorted(modules)[:40]}."
      )
    if not isinstance(value, (tuple, list)) or len(value) != 3:
      raise ValueError(
          f"factors[{path!r}] must be (A, B, scale); got {type(value)}."
      )
    a, b, s = value
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
      raise ValueError(
          f"factors[{path!r}] must be A [d_in, r], B [r, d_out]; got "
          f"{a.shape} and {b.shape}."
      )
    out[path] = (a, b, s)
  return out


def add_adapter(
    model: nnx.Module,
    name: str,
    *,
    targets: str | Sequence[str] | None = None,
    rank: int | None = None,
    alpha: float | int | None = None,
    use_rslora: bool = False,
    init: str = "kaiming",
    factors: Mapping[str, Any] | None = None,
    rngs: nnx.Rngs | int = 0,
) -> nnx.Module:
  """Adds a named LoRA adapter (PEFT `add_adapter`), in place.

  The first adapter of a model becomes active; later ones do not change the
  active adapter. Layers the new adapter targets get a slot initialised like
  plain LoRA (`B = 0`, so the model's output with it active is the base
  output) or set from `factors`; every other adapted layer gets a zero slot.
  Adding changes array shapes, so jitted functions retrace once.

  Args:
    model: An NNX model (its linear layers may already hold named adapters).
    name: New adapter name.
    targets: Which layers, with `adapters.inject` semantics (regex
      fullmatch, list of names, or `"all-linear"`). Not with `factors`.
    rank: Adapter rank. Not with `factors`.
    alpha: `lora_alpha` (default `rank`).
    use_rslora: Scale `alpha / sqrt(rank)`.
    init: `"kaiming"` (PEFT default), `"gaussian"` or `"zeros"` for `A`.
    factors: `{path: (A [d_in, r], B [r, d_out], scale)}` (e.g. from
      `lowrank.adapters.merging.lora_factors` of another model with the same
      base, or a merged adapter): import these exact updates `scale·A B`.
    rngs: `nnx.Rngs` or an int seed for `A`.

  Returns:
    `model`.

  Raises:
    ValueError: On a duplicate name, bad targets / rank / init, targets that
      match nothing or layers that hold another kind of adapter, or while
      an adapter is merged.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"name must be a non-empty string; got {name!r}.")
  names = adapter_names(model)
  if name in names:
    raise ValueError(f"An adapter named {name!r} already exists: {names}.")
  mods = multi_modules(model)
  _check_not_merged(mods, "add an adapter")
  modules = _modules_by_path(model)
  if factors is not None:
    if targets is not None or rank is not None:
      raise ValueError("Pass either factors, or targets and rank, not both.")
    factors = _check_factors(factors, modules)
    chosen = list(factors)
  else:
    if targets is None or rank is None:
      raise ValueError("add_adapter needs targets and rank (or factors).")
    lora.check_rank(rank)
    if init not in lora.INITS:
      raise ValueError(f"Unknown init {init!r}; expected one of {lora.INITS}.")
    match = surgery.match(targets, "targets",
                          wrappers=(layers.LoRAWrapper,))
    chosen = [p for p, m in modules.items() if match(p, m)]
  adaptable = [
      p for p, m in modules.items()
      if isinstance(m, MultiLoRA)
      or (layers.wrapper_for(m, "multi_lora") is not None
          and not isinstance(m, layers.LoRAWrapper))
  ]
  if not chosen:
    raise ValueError(
        f"targets={targets!r} matched no module. Adaptable modules: "
        f"{adaptable[:40]}."
    )
  bad = [p for p in chosen if p not in adaptable]
  if bad:
    details = [
        f"{p} ({type(modules[p]).__name__}"
        + (", holds another adapter; see multi.from_lora"
           if isinstance(modules[p], layers.LoRAWrapper) else "")
        + ")"
        for p in bad
    ]
    raise ValueError(
        f"Cannot add named adapters to: {details[:40]}. Adaptable modules: "
        f"{adaptable[:40]}."
    )
  rngs = nnx.Rngs(rngs) if isinstance(rngs, int) else rngs
  if mods:
    first = next(iter(mods.values()))
    index, on = first.adapter_index.get_value(), first.adapter_on.get_value()
  else:
    index, on = jnp.asarray(0, jnp.int32), jnp.asarray(True)

  def slot(path):
    if factors is None:
      return rank, float(rank if alpha is None else alpha), use_rslora, None
    a, b, s = factors[path]
    r = int(a.shape[1])
    # Stored so that `lora.scaling(r, alpha) == scale` (rebuilds from options
    # give the same scale; the scale itself is the saved `scales` entry).
    alpha_eq = float(np.asarray(s)) * r if _is_concrete(s) else float(r)
    return r, alpha_eq, False, (a, b, s)

  chosen_set = set(chosen)
  for path, m in mods.items():
    if path in chosen_set:
      r, al, rs, fac = slot(path)
      m.append_slot(name, r, al, rs, rngs.params(), fac)
    else:
      m.append_slot(name, 0, 0.0, False, rngs.params())
  for path in chosen:
    if path in mods:
      continue
    r, al, rs, fac = slot(path)
    k = len(names)
    new = MultiLoRA(
        modules[path],
        rank=r,
        alpha=al,
        rslora=rs,
        init=init,
        rngs=rngs,
        names=names,
        ranks=(0,) * k,
        alphas=(0.0,) * k,
        rsloras=(False,) * k,
    )
    new.append_slot(name, r, al, rs, rngs.params(), fac)
    _routing_value(new.adapter_index, index)
    _routing_value(new.adapter_on, on)
    surgery.set_submodule(model, path, new)
  return model


def delete_adapter(model: nnx.Module, name: str) -> nnx.Module:
  """Removes adapter `name` everywhere (PEFT `delete_adapter`), in place.

  Layers left with no adapter get their base module back. Deleting the
  active adapter makes the base model active (`active_adapter` is `None`).

  Raises:
    ValueError: For an unknown name or while an adapter is merged.
  """
  mods = _unmerged(model, "delete an adapter")
  i = _index(model, name)
  cur = int(next(iter(mods.values())).adapter_index.get_value())
  new = -1 if cur == i else (cur - 1 if cur > i else cur)
  for path, m in mods.items():
    m.remove_slot(i)
    if not any(m.ranks):
      surgery.set_submodule(model, path, m.base)
    else:
      _routing_value(m.adapter_index, new)
  return model


def from_lora(model: nnx.Module, name: str = "default") -> nnx.Module:
  """Turns a plain-LoRA model's adapters into the named adapter `name`.

  Every plain `"lora"` wrapper on a linear layer is replaced by its base
  layer and its exact update `s·A B` is added with `add_adapter(model, name,
  factors=...)` (so a model that already has named adapters gains one more).

  Raises:
    ValueError: If the model has no plain LoRA wrapper, one is merged, or
      one wraps an embedding (named adapters support linear layers only).
  """
  plain = {
      p: m for p, m in injection.adapter_modules(model).items()
      if m.method == "lora"
  }
  if not plain:
    raise ValueError("The model has no plain LoRA adapters to import.")
  for p, m in plain.items():
    if m.merged:
      raise ValueError(f"LoRA at {p!r} is merged; unmerge it first.")
    if not isinstance(m.base, layers.LINEAR_KINDS):
      raise ValueError(
          f"LoRA at {p!r} wraps a {type(m.base).__name__}; named adapters "
          "support Linear, LinearGeneral and Einsum layers."
      )
  factors = {}
  for p, m in plain.items():
    a2, b2 = m.peft_factors()
    factors[p] = (a2, b2, m.scale)
  for p, m in plain.items():
    surgery.set_submodule(model, p, m.base)
  return add_adapter(model, name, factors=factors)
