"""Flax NNX adapter layers that wrap an existing layer without copying it.

Each wrapper holds the original module as `base` (its `kernel` stays an
`nnx.Param`, frozen when training with `wrt=nnx.LoRAParam`) plus its adapter
parameters as `nnx.LoRAParam`. Wrapped kinds: `nnx.Linear`,
`nnx.LinearGeneral`, `nnx.Einsum` (attention projections) and, for plain
LoRA, `nnx.Embed`.

**Writing a variant.** Every adapter method (LoRA, DoRA, VeRA, ...) is a
subclass of `LoRAWrapper` registered with `register(name, cls)`. The base
class handles the kinds: it sees any wrapped kernel as a 2-D matrix
`W2: [d_in, d_out]` (the kernel's input dims flattened, then its output dims)
and any input as `x2: [..., d_in]`, so a variant implements three small
hooks on 2-D arrays and works on every kind:

  * `_create(key, dtype, **options)`: make the adapter's variables (use
    `self._param(value, dims)` for trainable ones so they are sharded like
    the kernel, and `Basis` for frozen non-parameter arrays).
  * `adapter_out(x2) -> [..., d_out]`: the scaled contribution `x2 ΔW2`,
    computed without forming `ΔW2` where the method allows.
  * `delta_weight() -> [d_in, d_out]` float32: `ΔW2`, for merging.

Variants whose output is not `base(x) + x ΔW` (DoRA) override `__call__`,
`_fold` and `_unfold` (the kernel arithmetic of `merge` and `unmerge`).
`options()` returns the constructor keywords that
`lowrank.adapters.save_adapters` records so the same adapter can be rebuilt.

Sharding: trainable factors inherit the base kernel's logical axes
(`out_sharding` metadata) on the dimensions they share with it, and a rank
axis is the logical axis `lowrank` (replicated by
`lowrank.sharding.LOGICAL_AXIS_RULES`). Values are placed with the base
kernel's actual mesh sharding, so injecting into a sharded model needs no
mesh context.

A fresh plain-LoRA wrapper is a drop-in replacement: `wrapper(x)` equals
`base(x)` at initialisation (B = 0, or A = 0 for embeddings, as in PEFT).
"""

import math
import numbers
from typing import Any
import warnings

from flax import nnx
import jax
import jax.numpy as jnp

from lowrank import presets
from lowrank.adapters import lora

P = jax.sharding.PartitionSpec


class Basis(nnx.Variable):
  """A frozen, non-trainable adapter array (e.g. a random or SVD basis).

  Neither `nnx.Param` nor `nnx.LoRAParam`: optimizers built with
  `wrt=nnx.LoRAParam` never see it and adapter files
  (`lowrank.adapters.save_adapters`) do not store it.
  """


class MergeRecord(nnx.Variable):
  """Copy of an adapter value at `merge` time (see `LoRAWrapper.merge`).

  Exists only while the adapter is merged; neither trained nor saved in
  adapter files.
  """


def _record_key(path: str) -> str:
  return path.replace("/", ".")


def _copy_variable(kind: type, var: nnx.Variable) -> nnx.Variable:
  """A `kind` variable holding a copy of `var`'s value (same sharding)."""
  value = var.get_value()
  if not isinstance(value, jax.core.Tracer):
    # A fresh buffer: a train step that donates the adapter parameters must
    # not free the record with them.
    value = jnp.array(value, copy=True)
  logical = var.get_metadata().get("out_sharding")
  kwargs = {} if logical is None else {"out_sharding": logical}
  with nnx.use_eager_sharding(False):
    return kind(value, **kwargs)


def _same_array(x, y) -> bool:
  """Whether two arrays are equal (`True` while tracing: cannot tell)."""
  if x is y:
    return True
  if isinstance(x, jax.core.Tracer) or isinstance(y, jax.core.Tracer):
    return True
  if getattr(x, "shape", None) != getattr(y, "shape", None):
    return False
  return bool(jnp.array_equal(x, y))


class AdapterState(nnx.Variable):
  """Non-trainable adapter state that belongs in adapter files.

  For example a rank mask or a pruning budget: not updated by the optimizer
  (not `nnx.LoRAParam`) but needed to reproduce the adapter's output, so
  `lowrank.adapters.save_adapters` stores it next to the trainable factors
  (in both formats).
  """


def _kernel_var(base: nnx.Module) -> nnx.Variable:
  return base.embedding if isinstance(base, nnx.Embed) else base.kernel


def parse_einsum(einsum_str: str) -> tuple[str, str, str]:
  """Splits `"lhs,kernel->out"` (spaces removed); validates two operands."""
  s = einsum_str.replace(" ", "")
  if "->" not in s or s.count(",") != 1:
    raise ValueError(
        f"Expected an explicit two-operand einsum 'lhs,kernel->out'; got "
        f"{einsum_str!r}."
    )
  ins, out = s.split("->")
  lhs, ker = ins.split(",")
  return lhs, ker, out


def _einsum_letters(einsum_str: str) -> tuple[str, str, str]:
  lhs, ker, out = parse_einsum(einsum_str)
  bad = [c for c in ker if (c in lhs) == (c in out)]
  if bad:
    raise ValueError(
        f"Cannot add an adapter to einsum {einsum_str!r}: kernel letters "
        f"{bad} are batch dims or summed out in the kernel alone."
    )
  lost = [c for c in lhs if c not in ker and c not in out]
  if lost:
    raise ValueError(
        f"Cannot add an adapter to einsum {einsum_str!r}: input letters "
        f"{lost} are summed out without the kernel."
    )
  return lhs, ker, out


def kernel_dims(base: nnx.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Kernel dims contracted with the input, and kernel dims of the output.

  Raises:
    ValueError: For a module kind or configuration adapters cannot wrap.
  """
  if isinstance(base, (nnx.Linear, nnx.Embed)):
    return (0,), (1,)
  if isinstance(base, nnx.LinearGeneral):
    if base.batch_axis:
      raise ValueError(
          "Adapters on nnx.LinearGeneral with batch_axis are not supported."
      )
    n_in, n_out = len(base.in_features), len(base.out_features)
    return tuple(range(n_in)), tuple(range(n_in, n_in + n_out))
  if isinstance(base, nnx.Einsum):
    lhs, ker, _ = _einsum_letters(base.einsum_str)
    return (
        tuple(i for i, c in enumerate(ker) if c in lhs),
        tuple(i for i, c in enumerate(ker) if c not in lhs),
    )
  raise ValueError(f"Cannot wrap a {type(base).__name__} with an adapter.")


def kernel_to_2d(w: jax.Array, in_dims, out_dims) -> jax.Array:
  """A kernel as the `[prod(in_dims), prod(out_dims)]` matrix it applies."""
  d_in = math.prod(w.shape[d] for d in in_dims)
  return jnp.transpose(w, tuple(in_dims) + tuple(out_dims)).reshape(d_in, -1)


def _kernel_from_2d(w2: jax.Array, shape, in_dims, out_dims) -> jax.Array:
  order = tuple(in_dims) + tuple(out_dims)
  w = w2.reshape(tuple(shape[d] for d in order))
  perm = [0] * len(shape)
  for i, d in enumerate(order):
    perm[d] = i
  return jnp.transpose(w, perm)


class LoRAWrapper(nnx.Module):
  """Common state and behaviour of all adapter wrappers (plain LoRA here).

  Attributes:
    base: The wrapped module (unchanged, its variables still `nnx.Param`).
    lora_a: `nnx.LoRAParam`, `[*in_shape, r]` (plain LoRA).
    lora_b: `nnx.LoRAParam`, `[r, *out_shape]` (plain LoRA).
    rank, alpha, rslora, scale: Adapter hyperparameters (static).
    in_shape, out_shape, d_in, d_out: The kernel's input / output dims and
      their products (the 2-D view is `[d_in, d_out]`).
    merged: Whether `ΔW` is currently folded into the base kernel.
    enabled: Whether the adapter contributes (see `adapters.disabled`).

  Differences from the official code (Hugging Face PEFT's LoRA,
  `huggingface/peft@5d602fdbff04`, `src/peft/tuners/lora/`):

    * Default `alpha`. `alpha=None` means `alpha = r`, so the scale
      `alpha / r` is 1 at every rank: lowrank's convention for every
      adapter method (and for adapter files and the multi-adapter layers).
      PEFT's `LoraConfig` defaults to `lora_alpha=8` (scale `8 / r`).
      Official: `alpha=8`, or `preset="paper"` (`lowrank.presets`). Papers
      choose `alpha` per experiment; what matters is the scale `alpha / r`.
    * rsLoRA with the default `alpha`. `rslora=True` with `alpha=None` gives
      `r / sqrt(r) = sqrt(r)`, a scale that grows with the rank, whereas
      rsLoRA's `alpha / sqrt(r)` is meant for an `alpha` that does not
      depend on the rank (PEFT's default: `8 / sqrt(r)`). Pass a fixed
      `alpha` with rsLoRA (e.g. `alpha=8`, PEFT's default).
    * Adapter dtype. The adapter's parameters take the base kernel's dtype;
      PEFT upcasts bf16 / fp16 adapter weights to float32
      (`autocast_adapter_dtype=True`). Not available as an argument: keep
      the kernels in float32 (the default of lowrank's models) to train
      the adapter in float32.
  """

  method = "lora"
  # Keyword options the constructor accepts beyond the common ones.
  option_names: tuple[str, ...] = ()

  def __init__(
      self,
      base: nnx.Module,
      *,
      rank,  # Checked by hand (see `lora.check_rank`), as are the next.
      alpha=None,
      rslora: bool = False,
      dropout=0.0,
      init: str = "kaiming",
      rngs: nnx.Rngs,
      **options,
  ):
    rank = lora.check_rank(rank)
    alpha = lora.check_alpha(alpha, rank)
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
      raise TypeError(
          f"dropout must be a float in [0, 1); got {dropout!r} of type "
          f"{type(dropout).__name__}."
      )
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1); got {dropout}.")
    unknown = sorted(set(options) - set(self.option_names))
    if unknown:
      raise ValueError(
          f"Unknown option(s) {unknown} for method {self.method!r}; it "
          f"accepts {sorted(self.option_names) or 'none'}."
      )
    self.base = base
    self.rank = rank
    self.alpha = alpha
    self.rslora = bool(rslora)
    self.scale = lora.scaling(rank, self.alpha, rslora=rslora)
    self.init = init
    self._merged = False
    self.enabled = True
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None
    kernel = _kernel_var(base)
    self.in_dims, self.out_dims = kernel_dims(base)
    shape = kernel.get_value().shape
    self.in_shape = tuple(shape[d] for d in self.in_dims)
    self.out_shape = tuple(shape[d] for d in self.out_dims)
    self.d_in, self.d_out = math.prod(self.in_shape), math.prod(self.out_shape)
    self._create(rngs.params(), kernel.get_value().dtype, **options)

  # ---------------------------------------------------------------- hooks
  def _create(self, key: jax.Array, dtype, **options) -> None:
    """Creates the adapter variables (plain LoRA: `lora_a`, `lora_b`)."""
    del options
    key_a, key_b = jax.random.split(key)
    a, b = self._init_factors(key_a, key_b, self.in_shape, self.out_shape,
                              dtype)
    self.lora_a = self._param(a, self.in_dims + (None,))
    self.lora_b = self._param(b, (None,) + self.out_dims)

  def _init_factors(self, key_a, key_b, in_shape, out_shape, dtype):
    r = self.rank
    a = lora.init_a(
        key_a, in_shape + (r,), math.prod(in_shape), init=self.init,
        dtype=dtype,
    )
    b = jnp.zeros((r,) + out_shape, dtype)
    del key_b
    return a, b

  def adapter_out(self, x2: jax.Array) -> jax.Array:
    """Scaled adapter contribution `x2 ΔW2` for `x2: [..., d_in]`."""
    a = self.lora_a[...].reshape(self.d_in, self.rank)
    b = self.lora_b[...].reshape(self.rank, self.d_out)
    return lora.lora_apply(x2, a, b, self.scale)

  def delta_weight(self) -> jax.Array:
    """`ΔW2: [d_in, d_out]` in float32 (the scaled dense update)."""
    a = self.lora_a[...].reshape(self.d_in, self.rank)
    b = self.lora_b[...].reshape(self.rank, self.d_out)
    return lora.lora_delta(a, b, self.scale)

  def options(self) -> dict[str, Any]:
    """Constructor keywords beyond rank/alpha/rslora/dropout/init."""
    return {k: getattr(self, k) for k in self.option_names}

  # ------------------------------------------ inits that rewrite the base
  def snapshot_initial(self) -> None:
    """Keeps the current trainable values as `initial_<name>` AdapterState.

    Data initialisations such as PiSSA, OLoRA and CorDA move part of `W`
    into the adapter (`base ← W − ΔW₀`). `inject` calls this right after such
    an init, so adapter files can rebuild the residual base from the
    original weights (`load_adapters`) and PEFT export can express the
    adapter against the original base
    (`save_adapters(..., format="peft", convert_initialized=True)`).
    """
    for name, var in list(vars(self).items()):
      if isinstance(var, nnx.LoRAParam) and not name.startswith("initial_"):
        # A copy: sharing the buffer with the trainable leaf would break
        # donation of the parameters in a train step.
        setattr(self, f"initial_{name}", make_variable(
            AdapterState, jnp.array(var.get_value(), copy=True),
            _kernel_var(self.base), _dims_like(var, self)))

  @property
  def initialized_from_base(self) -> bool:
    """Whether the init moved part of `W` into the adapter (see above)."""
    return any(n.startswith("initial_") for n in vars(self))

  def _plain_delta(self) -> jax.Array:
    """The `ΔW2` an init subtracts from the base (default `delta_weight`)."""
    return self.delta_weight()

  def initial_offset(self) -> jax.Array:
    """`ΔW₀: [d_in, d_out]` float32 that the init subtracted from the base.

    Raises:
      ValueError: If the adapter was not initialised from its base.
    """
    if not self.initialized_from_base:
      raise ValueError("This adapter's init did not change its base weight.")
    saved = {}
    for name, var in list(vars(self).items()):
      if name.startswith("initial_"):
        target = getattr(self, name[len("initial_"):])
        saved[name] = target.get_value()
        target.set_value(var.get_value())
    try:
      return self._plain_delta()
    finally:
      for name, value in saved.items():
        getattr(self, name[len("initial_"):]).set_value(value)

  # -------------------------------------------------------------- helpers
  def _param(self, value: jax.Array, dims: tuple[int | None, ...]):
    """A trainable `nnx.LoRAParam` sharded like the kernel on `dims`.

    `dims[i]` is the kernel dimension that dimension `i` of `value` shares,
    or `None` for an adapter-only axis (logical axis `lowrank`).
    """
    return make_variable(nnx.LoRAParam, value, _kernel_var(self.base), dims)

  def _basis(self, value: jax.Array, dims: tuple[int | None, ...]):
    """A frozen `Basis` variable, sharded like `_param`."""
    return make_variable(Basis, value, _kernel_var(self.base), dims)

  def _to_2d(self, x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    """Input in the base layer's layout -> (`[..., d_in]`, batch shape)."""
    base = self.base
    if isinstance(base, nnx.Einsum):
      lhs, ker, _ = _einsum_letters(base.einsum_str)
      k_in = "".join(c for c in ker if c in lhs)
      rest = "".join(c for c in lhs if c not in k_in)
      x = jnp.einsum(f"{lhs}->{rest}{k_in}", x)
    elif isinstance(base, nnx.LinearGeneral):
      axis = tuple(ax % x.ndim for ax in base.axis)
      x = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
    n_in = len(self.in_shape)
    batch = x.shape[: x.ndim - n_in]
    return x.reshape(batch + (self.d_in,)), batch

  def _from_2d(self, y2: jax.Array, batch: tuple[int, ...]) -> jax.Array:
    """`[..., d_out]` -> the base layer's output layout."""
    y = y2.reshape(batch + self.out_shape)
    base = self.base
    if isinstance(base, nnx.Einsum):
      lhs, ker, out = _einsum_letters(base.einsum_str)
      k_out = "".join(c for c in ker if c not in lhs)
      rest = "".join(c for c in lhs if c in out)
      if rest + k_out != out:
        y = jnp.einsum(f"{rest}{k_out}->{out}", y)
    return y

  def kernel_2d(self) -> jax.Array:
    """The base kernel as `[d_in, d_out]` (its own dtype)."""
    return kernel_to_2d(
        _kernel_var(self.base).get_value(), self.in_dims, self.out_dims
    )

  def _delta_kernel(self) -> jax.Array:
    """`ΔW` in float32 with the base kernel's shape and dim order."""
    shape = _kernel_var(self.base).get_value().shape
    return _kernel_from_2d(
        self.delta_weight(), shape, self.in_dims, self.out_dims
    )

  def _set_kernel(self, w: jax.Array) -> None:
    assign(_kernel_var(self.base), w)

  def set_kernel_2d(self, w2: jax.Array) -> None:
    """Writes `w2: [d_in, d_out]` into the base kernel (its dtype/sharding)."""
    shape = _kernel_var(self.base).get_value().shape
    self._set_kernel(_kernel_from_2d(w2, shape, self.in_dims, self.out_dims))

  # ------------------------------------------------------------- behaviour
  @property
  def active(self) -> bool:
    return self.enabled and not self.merged

  def _compute_dtype(self, x):
    return getattr(self.base, "dtype", None) or x.dtype

  def __call__(self, x, *args, **kwargs):
    y = self.base(x, *args, **kwargs)
    if not self.active:
      return y
    if self.dropout is not None:
      x = self.dropout(x)
    x2, batch = self._to_2d(x.astype(self._compute_dtype(x)))
    return y + self._from_2d(self.adapter_out(x2), batch).astype(y.dtype)

  @property
  def merged(self) -> bool:
    """Whether the adapter is folded into the base kernel (`merge`)."""
    return self._merged

  @merged.setter
  def merged(self, value: bool) -> None:
    # Code that folds the adapter in and then starts a fresh one (ReLoRA
    # restarts) sets `merged = False` itself: the record of the merge-time
    # values is then stale and is dropped.
    self._merged = bool(value)
    if not value and "merge_record" in vars(self):
      del self.merge_record

  def _fold(self) -> None:
    """Adds `ΔW` to the base kernel (fp32 accumulate, cast back)."""
    w = _kernel_var(self.base).get_value()
    self._set_kernel(w.astype(jnp.float32) + self._delta_kernel())

  def _unfold(self) -> None:
    """Inverse of `_fold` for the adapter's current values."""
    w = _kernel_var(self.base).get_value()
    self._set_kernel(w.astype(jnp.float32) - self._delta_kernel())

  def _recorded_variables(self) -> dict[str, nnx.Variable]:
    """`{path: variable}` of what `ΔW` depends on (see `merge`).

    Every variable of the wrapper outside `base`, except frozen `Basis`
    arrays (never trained, possibly shared and large), RNG state and the
    merge record itself.
    """
    out = {}
    for path, var in nnx.iter_graph(self):
      if not path or path[0] in ("base", "merge_record"):
        continue
      if isinstance(var, nnx.Variable) and not isinstance(
          var, (Basis, nnx.RngState)):
        out["/".join(str(p) for p in path)] = var
    return out

  def merge(self) -> None:
    """Folds `ΔW` into the base kernel (fp32 accumulate, cast back).

    Also records copies of the adapter values `ΔW` was computed from
    (`merge_record`, a `MergeRecord` dict; small: the size of the factors),
    so that `unmerge` subtracts exactly what was added even if an optimizer
    changed the factors while merged (while merged they get no gradient,
    but momentum and weight decay still move them).
    """
    if self.merged:
      return
    self._fold()
    self.merge_record = nnx.Dict({
        _record_key(k): _copy_variable(MergeRecord, v)
        for k, v in self._recorded_variables().items()
    })
    self.merged = True

  def unmerge(self) -> None:
    """Inverse of `merge`: restores the base kernel `merge` started from.

    The update subtracted is the one `merge` added, computed from the values
    recorded at merge time, so the base weights come back (up to float32
    rounding) even if the adapter was trained while merged. The adapter
    then keeps its current values; if they differ from the merged ones a
    `UserWarning` says which (the model's outputs change accordingly).
    """
    changed = self.unmerge_exact()
    if changed:
      warn_changed_while_merged({type(self).__name__: changed}, stacklevel=3)

  def unmerge_exact(self) -> list[str]:
    """`unmerge` without the warning; returns the values changed since merge.

    For callers that unmerge many adapters and report once
    (`lowrank.adapters.unmerge`).
    """
    if not self.merged:
      return []
    record = vars(self).get("merge_record")
    if record is None:  # `merged` set by hand: undo the current values.
      self._unfold()
      self.merged = False
      return []
    swapped, changed = [], []
    for key, var in self._recorded_variables().items():
      saved = record[_record_key(key)].get_value()
      current = var.get_value()
      if not _same_array(current, saved):
        changed.append(key)
      var.set_value(saved)
      swapped.append((var, current, saved))
    try:
      self._unfold()
    finally:
      for var, current, saved in swapped:
        if var.get_value() is saved:  # Not rewritten by `_unfold`.
          var.set_value(current)
    self.merged = False
    return changed

  def num_trainable(self) -> int:
    """Number of trainable (`nnx.LoRAParam`) elements of this adapter."""
    state = nnx.state(self, nnx.LoRAParam)
    return sum(x.size for x in jax.tree.leaves(nnx.to_pure_dict(state)))

  def peft_factors(self) -> tuple[jax.Array, jax.Array]:
    """`(A, B)` as 2-D `[d_in, r]`, `[r, d_out]` (flattened in/out dims)."""
    r = self.rank
    return (
        self.lora_a[...].reshape(-1, r),
        self.lora_b[...].reshape(r, -1),
    )

  def set_peft_factors(self, a2: Any, b2: Any) -> None:
    """Inverse of `peft_factors`: sets `A`, `B` from 2-D arrays."""
    assign(self.lora_a, a2)
    assign(self.lora_b, b2)


def warn_changed_while_merged(
    changed: dict[str, list[str]], stacklevel: int = 2
) -> None:
  """Warns that adapters were changed while merged (see `unmerge`).

  Args:
    changed: `{adapter (path or class): names of the changed values}`.
    stacklevel: Passed to `warnings.warn`.
  """
  listing = "; ".join(f"{k}: {v}" for k, v in list(changed.items())[:10])
  more = f" (+{len(changed) - 10} more)" if len(changed) > 10 else ""
  warnings.warn(
      f"unmerge(): adapter values changed while the adapter was merged "
      f"({listing}{more}). A merged adapter gets no gradient, but optimizer "
      "momentum or weight decay still move it. The base weights were "
      "restored exactly by subtracting the update that merge() added; the "
      "adapter keeps its changed values, so the model's outputs now differ "
      "from the merged model's. Train only unmerged adapters, or call "
      "adapters.unload(model) to keep the merged weights.",
      UserWarning,
      stacklevel=stacklevel + 1,
  )


def assign(var: nnx.Variable, value: Any) -> jax.Array:
  """Sets `var` to `value` reshaped and cast like it, keeping its sharding.

  The one way adapter code writes a variable in place: the stored array keeps
  the old shape, dtype and (outside `jit`) mesh placement.

  Returns:
    The stored value (after the cast), e.g. for computing exact residuals.
  """
  old = var.get_value()
  new = jnp.asarray(value).reshape(old.shape).astype(old.dtype)
  sh = getattr(old, "sharding", None)
  if isinstance(sh, jax.sharding.Sharding) and not isinstance(
      new, jax.core.Tracer):
    new = jax.device_put(new, sh)
  var.set_value(new)
  return new


def _dims_like(var: nnx.Variable, wrapper: "LoRAWrapper"):
  """Kernel dims of a wrapper variable, from its logical axes if known."""
  ndim = var.get_value().ndim
  logical = var.get_metadata().get("out_sharding")
  kernel_logical = _kernel_var(wrapper.base).get_metadata().get("out_sharding")
  if logical is None or kernel_logical is None:
    return (None,) * ndim
  return tuple(
      kernel_logical.index(ax) if ax in kernel_logical and ax != "lowrank"
      else None for ax in logical)


def make_variable(
    kind: type,
    value: jax.Array,
    like: nnx.Variable,
    dims: tuple[int | None, ...],
) -> nnx.Variable:
  """A `kind` variable sharded like `like` on the kernel dims in `dims`.

  The value is always copied into a fresh buffer: two adapter variables
  built from one array (e.g. a trainable diagonal and its frozen initial
  copy) must not share it, or donating the parameters in a train step fails.
  """
  value = jnp.array(value, copy=True)
  meta = like.get_metadata()
  logical = meta.get("out_sharding")
  kwargs = {}
  if logical is not None:
    kwargs["out_sharding"] = tuple(
        "lowrank" if d is None else logical[d] for d in dims
    )
  sharding = getattr(like.get_value(), "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (like.get_value().ndim)
    value = jax.device_put(
        value,
        jax.sharding.NamedSharding(
            sharding.mesh, P(*(None if d is None else spec[d] for d in dims))
        ),
    )
  # Placement is done above from the kernel's real sharding; eager sharding
  # would demand a mesh context even though none is needed.
  with nnx.use_eager_sharding(False):
    return kind(value, **kwargs)


presets.register(
    "lora",
    source="huggingface/peft@5d602fdbff04 (src/peft/tuners/lora/config.py)",
    kwargs={"alpha": 8},
    reasons={"alpha": (
        "PEFT's LoraConfig default lora_alpha=8 (scale 8/r); lowrank's "
        "alpha=None means alpha=r, scale 1 at every rank (the library-wide "
        "convention).")},
    unavailable=(
        "PEFT upcasts bf16/fp16 adapter weights to float32; lowrank creates "
        "them in the base kernel's dtype (keep kernels in float32).",),
)


class LoRALinear(LoRAWrapper):
  """LoRA around `nnx.Linear`: `y = base(x) + s · (drop(x) A) B`."""


class LoRALinearGeneral(LoRAWrapper):
  """LoRA around `nnx.LinearGeneral` (no `batch_axis`).

  `A: [*in_features, r]` is contracted with the input's `axis` dims, then
  `B: [r, *out_features]`; the output dims come last, as in the base layer.
  """


class LoRAEinsum(LoRAWrapper):
  """LoRA around `nnx.Einsum` (e.g. attention `BTD,DNH->BTNH`).

  Kernel letters that appear in the input (and not the output) are the
  contracted input dims; letters in the output are the output dims. A letter
  in all three (a batch dim of the kernel) cannot be adapted.
  """

  def __call__(self, x, einsum_str=None, **kwargs):
    if einsum_str is not None and einsum_str != self.base.einsum_str:
      raise ValueError(
          "An adapter-wrapped Einsum uses its constructor einsum_str."
      )
    return super().__call__(x, **kwargs)


class LoRAEmbed(LoRAWrapper):
  """LoRA around `nnx.Embed`: `base(ids) + s · A[ids] B`.

  As in PEFT, `A: [num_embeddings, r]` starts at zero and `B: [r, features]`
  is standard normal; no dropout on token ids.
  """

  def _init_factors(self, key_a, key_b, in_shape, out_shape, dtype):
    r = self.rank
    a = jnp.zeros(in_shape + (r,), dtype)
    b = jax.random.normal(key_b, (r,) + out_shape, dtype)
    del key_a
    return a, b

  def __call__(self, inputs):
    y = self.base(inputs)
    if not self.active:
      return y
    a = self.lora_a[...].astype(y.dtype)
    b = self.lora_b[...].astype(y.dtype)
    h = jnp.take(a, inputs, axis=0)
    return y + (h @ b) * jnp.asarray(self.scale, y.dtype)

  def attend(self, query):
    """Tied-decoder logits against the effective (adapted) embedding."""
    if not self.active:
      return self.base.attend(query)
    emb = self.base.embedding[...]
    eff = (emb.astype(jnp.float32) + self._delta_kernel()).astype(emb.dtype)
    return query @ eff.T


WRAPPERS: dict[type, type] = {
    nnx.Linear: LoRALinear,
    nnx.LinearGeneral: LoRALinearGeneral,
    nnx.Einsum: LoRAEinsum,
    nnx.Embed: LoRAEmbed,
}

LINEAR_KINDS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)

# method name -> {module type -> wrapper class}. Variants call `register`.
METHODS: dict[str, dict[type, type]] = {"lora": WRAPPERS}


def register(
    name: str, cls: type, kinds: tuple[type, ...] = LINEAR_KINDS
) -> type:
  """Registers adapter method `name` (used by `inject(method=name)`).

  Args:
    name: Method name; must be new.
    cls: A `LoRAWrapper` subclass with `method == name`.
    kinds: Module types it can wrap (default: the linear kinds).

  Returns:
    `cls` (so it can be used as a decorator helper).

  Raises:
    ValueError: If `name` is taken or `cls` is not a `LoRAWrapper`.
  """
  if name in METHODS:
    raise ValueError(f"Adapter method {name!r} is already registered.")
  if not (isinstance(cls, type) and issubclass(cls, LoRAWrapper)):
    raise ValueError(f"{cls!r} is not a LoRAWrapper subclass.")
  if cls.method != name:
    raise ValueError(f"{cls.__name__}.method is {cls.method!r}, not {name!r}.")
  METHODS[name] = {k: cls for k in kinds}
  return cls


# init name -> fn(wrapper, data) that re-initialises a freshly built adapter
# from its base weights and optional per-module data (PiSSA, OLoRA, CorDA,
# LoRA-SB). Register with `register_init`.
INITIALIZERS: dict[str, Any] = {}


def register_init(name: str, fn) -> Any:
  """Registers a data/SVD initialisation usable as `inject(init=name)`.

  `fn(wrapper, data, key)` runs right after the wrapper is built with the
  default (kaiming) factors; `data` is `init_data[path]` from `inject` or
  `None`, `key` a PRNG key. It may rewrite the adapter variables and the
  base kernel (e.g. PiSSA moves the principal part out of the base).

  Raises:
    ValueError: If `name` is taken or is a plain random init.
  """
  if name in INITIALIZERS or name in lora.INITS:
    raise ValueError(f"Adapter init {name!r} is already defined.")
  INITIALIZERS[name] = fn
  return fn


def wrapper_for(module: nnx.Module, method: str = "lora") -> type | None:
  """The wrapper class of `method` for `module`'s type (exact or subclass)."""
  table = METHODS.get(method, {})
  for cls in type(module).__mro__:
    if cls in table:
      return table[cls]
  return None
