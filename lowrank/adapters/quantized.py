"""Quantized frozen base layers for QLoRA, merging into them, and LQ-LoRA.

QLoRA trains LoRA adapters on top of a base model whose weights are stored
in 4 bits and dequantised on the fly. Here:

* `quantize_base(model, targets, "nf4" | "int8")` replaces the targeted
  `nnx.Linear` / `nnx.LinearGeneral` / `nnx.Einsum` modules (or the base of
  an adapter wrapper) by `QuantizedLinear` / `QuantizedLinearGeneral` /
  `QuantizedEinsum`. These hold the packed codes and scales
  (`lowrank.adapters.nf4`) as `QuantState` variables, which are neither
  `nnx.Param` nor `nnx.LoRAParam`: no optimizer or gradient ever sees them,
  and `nnx.state(model, nnx.Param)` leaves them out.
* The quantized classes subclass the Flax classes they replace, so every
  adapter method's wrapper table (`layers.wrapper_for` follows the MRO)
  wraps them with no registration, and `inject(..., targets="all-linear")`
  finds them. Their `kernel` attribute is a read-only `DequantizedKernel`
  view: `kernel[...]` (what Flax's `__call__` reads) and `get_value()`
  (what `LoRAWrapper.kernel_2d()`, DoRA's norms, ... read) dequantise.
* The forward pass dequantises inside `jax.checkpoint`, so the backward pass
  dequantises again instead of keeping a full-precision copy of the kernel
  alive between forward and backward (what bitsandbytes' 4-bit matmul does
  too); only the packed codes are saved for the backward pass. When each
  dense kernel is materialised is up to XLA's scheduler: XLA:CPU
  dequantises every layer up front (measured), GPU/TPU are not measured.
* Merging an adapter into a quantized base is dequantise → merge in float32
  → requantise, and `merge_quantized(model)` returns the requantisation
  error per module. Writing a quantized kernel any other way
  (`adapters.merge`, an init that edits the base) raises, so precision is
  never lost silently.
* `init="lq_lora"` (`layers.register_init`) decomposes each full-precision
  base weight `W ≈ Q + L1 L2` (LQ-LoRA Algorithm 1, `nf4.lq_decompose`),
  stores `Q` in a quantized base and `L1 L2` in the LoRA factors, so that
  base + adapter starts closer to `W` than `Q(W)` alone (QLoRA's start).
* Where lowrank differs from the official code (bitsandbytes / QLoRA,
  LQ-LoRA), `quantize_base` and `lq_lora_init` say so and name the
  argument that restores it; `presets.paper("quantize_base")` and
  `presets.paper("lq_lora_init")` hold those arguments (`layout="torch"`
  blocks the `[out, in]` weight as bitsandbytes does).

References:
  Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs,
    https://arxiv.org/abs/2305.14314
  Guo et al. 2023, LQ-LoRA: Low-rank plus Quantized Matrix Decomposition for
    Efficient Language Model Finetuning, https://arxiv.org/abs/2311.12023
"""

from collections.abc import Iterator, Mapping, Sequence
import contextlib
import contextvars
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from lowrank.adapters import injection
from lowrank.adapters import layers
from lowrank.adapters import nf4
from lowrank.adapters import svd_init
from lowrank import presets
from lowrank import surgery

P = jax.sharding.PartitionSpec
SCHEMES = nf4.SCHEMES
# Fields of each scheme's quantized pytree, stored as `kernel_<field>`.
_FIELDS = {
    "nf4": ("codes", "absmax", "absmax_scale", "absmax_offset"),
    "int8": ("codes", "scale"),
}
# Fields whose leading axis is the block axis (sharded like the kernel dim
# flattened first).
_BLOCK_FIELDS = ("codes", "absmax", "scale")
# Orders in which a kernel is flattened into blocks (`layout=`).
LAYOUTS = ("kernel", "torch")


def check_layout(layout: Any) -> None:
  """Raises a `ValueError` unless `layout` is one of `LAYOUTS`."""
  if not isinstance(layout, str) or layout not in LAYOUTS:
    raise ValueError(
        f"layout must be one of {LAYOUTS}; got {layout!r}. 'kernel' blocks "
        "the kernel in its own dimension order (lowrank's default), 'torch' "
        "in the [out, in] order of bitsandbytes / QLoRA."
    )


def layout_perm(base: nnx.Module, layout: str) -> tuple[int, ...]:
  """The kernel dims in the order they are flattened into blocks.

  Args:
    base: An `nnx.Linear` / `LinearGeneral` / `Einsum` (or a quantized one).
    layout: `"kernel"`: the kernel's own dimension order (Flax: `[in, out]`,
      so a block is consecutive output features of one input feature).
      `"torch"`: output dims first, then input dims, i.e. the
      `[out_features, in_features]` weight bitsandbytes and LQ-LoRA flatten,
      so a block is consecutive input features of one output feature.

  Raises:
    ValueError: On an unknown layout, or `"torch"` for a layer whose input
      and output dims cannot be told apart (`LinearGeneral` with
      `batch_axis`).
  """
  check_layout(layout)
  ndim = (len(base.quant_shape) if isinstance(base, QuantizedMixin)
          else jnp.ndim(base.kernel.get_value()))
  if layout == "kernel":
    return tuple(range(ndim))
  try:
    in_dims, out_dims = layers.kernel_dims(base)
  except ValueError as e:
    raise ValueError(
        f"layout='torch' needs the kernel's input and output dims: {e} Use "
        "layout='kernel' for this layer."
    ) from None
  return tuple(out_dims) + tuple(in_dims)


class QuantState(nnx.Variable):
  """Frozen storage of a quantized base weight (codes and scales).

  Not `nnx.Param`: optimizers (`wrt=nnx.Param` or `nnx.LoRAParam`) and
  `nnx.state(model, nnx.Param)` never see it; full-model checkpoints
  (`nnx.state(model)`) do store it.
  """


# (module id, dequantised kernel) while a quantized module's forward runs
# inside `jax.checkpoint`; `DequantizedKernel.__getitem__` returns it.
_OVERRIDE: contextvars.ContextVar[tuple[int, jax.Array] | None] = (
    contextvars.ContextVar("lowrank_quantized_override", default=None)
)
# A list collecting (module, error) while requantising writes are allowed.
_REQUANT_LOG: contextvars.ContextVar[list[tuple[Any, float]] | None] = (
    contextvars.ContextVar("lowrank_requantize_log", default=None)
)


@contextlib.contextmanager
def requantizing() -> Iterator[list[tuple[Any, float]]]:
  """Allows writes to quantized kernels (they requantise) inside the block.

  Yields:
    A list that receives `(quantized module, relative error)` for every
    requantising write (see `QuantizedMixin.requantize`).

  Example: `with requantizing() as log: wrapper.merge()` merges into a
  quantized base; `merge_quantized` does this for a whole model.
  """
  log: list[tuple[Any, float]] = []
  token = _REQUANT_LOG.set(log)
  try:
    yield log
  finally:
    _REQUANT_LOG.reset(token)


class DequantizedKernel(nnx.Variable):
  """The `kernel` of a quantized module: a read-only dequantising view.

  An `nnx.Variable` subclass (so code typed against `nnx.Variable`, like
  `LoRAWrapper`, accepts it) that is created on each `module.kernel` access
  and never stored in the graph. It holds no array: `[...]` (what Flax's
  `__call__` reads), `get_value()` and `value` dequantise; `shape`, `dtype`
  and `get_metadata()` (the original kernel's logical axes) need no
  dequantisation; `set_value` requantises inside `requantizing()` and
  raises otherwise.
  """

  __slots__ = ("_module",)

  def __init__(self, module: "QuantizedMixin"):
    logical = module.quant_logical_axes
    meta = {} if logical is None else {"out_sharding": logical}
    super().__init__(
        jax.ShapeDtypeStruct(module.quant_shape, module.quant_dtype),
        hijax=False, ref=False, eager_sharding=False, **meta,
    )
    object.__setattr__(self, "_module", module)

  @property
  def shape(self) -> tuple[int, ...]:
    return self._module.quant_shape

  @property
  def dtype(self):
    return jnp.dtype(self._module.quant_dtype)

  @property
  def ndim(self) -> int:
    return len(self._module.quant_shape)

  def get_value(self, *, index: Any = Ellipsis) -> jax.Array:
    """The dequantised kernel in its original dtype (and sharding, eagerly)."""
    w = self._module.dense_kernel()
    sharding = self._module.quant_sharding
    if sharding is not None and not isinstance(w, jax.core.Tracer):
      w = jax.device_put(w, sharding)
    return w if index is Ellipsis else w[index]

  @property
  def value(self) -> jax.Array:
    return self.get_value()

  def __getitem__(self, index) -> jax.Array:
    override = _OVERRIDE.get()
    if override is not None and override[0] == id(self._module):
      w = override[1]
    else:
      w = self._module.dense_kernel(self._module.compute_dtype())
    return w if index is Ellipsis else w[index]

  def set_value(self, value: Any, *, index: Any = Ellipsis) -> None:
    log = _REQUANT_LOG.get()
    if log is None:
      raise ValueError(
          f"The kernel of {type(self._module).__name__} is quantized "
          f"({self._module.quant_scheme}); writing it would requantise and "
          "lose precision. Merge with "
          "`lowrank.adapters.quantized.merge_quantized(model)` (returns the "
          "requantisation error), or write inside "
          "`quantized.requantizing()`, or apply the change before "
          "`quantize_base`."
      )
    if index is not Ellipsis:
      raise ValueError("A quantized kernel can only be replaced whole.")
    log.append((self._module, self._module.requantize(value)))

  def __setitem__(self, index, value) -> None:
    self.set_value(value, index=index)


class QuantizedMixin:
  """Quantized-kernel storage and behaviour shared by the quantized layers.

  Built from an existing layer: every attribute but `kernel` is kept (the
  bias stays an `nnx.Param`), and the kernel is replaced by `kernel_<field>`
  `QuantState` variables of the chosen scheme.

  Attributes:
    kernel: `DequantizedKernel`, a dequantising read-only view.
    quant_scheme: `"nf4"` or `"int8"`.
    quant_options: The quantisation keywords (block sizes, double quant).
    quant_shape, quant_dtype: The original kernel's shape and dtype name.
    quant_logical_axes: The original kernel's logical axes (or None).
    quant_sharding: The original kernel's `NamedSharding` (or None).
  """

  def __init__(
      self,
      base: nnx.Module,
      *,
      scheme: str = "nf4",
      block_size: int = 64,
      double_quant: bool = True,
      dq_block_size: int = 256,
      kernel: jax.typing.ArrayLike | None = None,
      layout: str = "kernel",
  ):
    """Quantizes `base`'s kernel (or `kernel`, which replaces it).

    Args:
      base: The layer to quantize (its exact Flax class).
      scheme: `"nf4"` or `"int8"`.
      block_size: Elements per absmax block.
      double_quant: NF4 only: 8-bit absmaxes (QLoRA double quantisation).
      dq_block_size: NF4 only: absmaxes per double-quantisation scale.
      kernel: Optional kernel-shaped array to quantize instead of the
        base's (LQ-LoRA's residual `W − L1 L2`).
      layout: Which elements share a block (`layout_perm`): `"kernel"` or
        `"torch"` (bitsandbytes' `[out, in]` order).

    Raises:
      ValueError: On an unknown scheme or layout, bad block sizes, or a
        `kernel` of the wrong shape.
    """
    options = nf4.scheme_options(scheme, block_size=block_size,
                                 double_quant=double_quant,
                                 dq_block_size=dq_block_size)
    flax_cls = next(c for c in QUANTIZED if isinstance(self, c))
    if type(base) is not flax_cls:
      raise ValueError(
          f"{type(self).__name__} quantizes an exact {flax_cls.__name__}; "
          f"got {type(base).__name__}."
      )
    perm = layout_perm(base, layout)
    var = base.kernel
    old = var.get_value()
    w = old if kernel is None else jnp.asarray(kernel)
    if w.shape != old.shape:
      raise ValueError(
          f"kernel must have the base kernel's shape {old.shape}; got "
          f"{w.shape}."
      )
    nodes = base._pytree__nodes  # pylint: disable=protected-access
    for name, value in vars(base).items():
      if name == "kernel" or name.startswith("_pytree__"):
        continue
      setattr(self, name, nnx.data(value) if nodes.get(name) else value)
    self.quant_scheme = scheme
    # `layout` is kept with the block options so that saved adapter configs
    # (`native_io`) rebuild the same blocks.
    self.quant_options = tuple(sorted({**options, "layout": layout}.items()))
    self.quant_perm = perm
    self.quant_shape = tuple(old.shape)
    self.quant_dtype = jnp.dtype(old.dtype).name
    logical = var.get_metadata().get("out_sharding")
    self.quant_logical_axes = None if logical is None else tuple(logical)
    sharding = getattr(old, "sharding", None)
    self.quant_sharding = (
        sharding if isinstance(sharding, jax.sharding.NamedSharding) else None
    )
    q = self._quantize(w)
    placements = self._placements(q)
    with nnx.use_eager_sharding(False):
      for field in _FIELDS[scheme]:
        value = getattr(q, field)
        if value is None:
          continue
        sharding, meta = placements[field]
        if sharding is not None and not isinstance(value, jax.core.Tracer):
          value = jax.device_put(value, sharding)
        kwargs = {} if meta is None else {"out_sharding": meta}
        setattr(self, "kernel_" + field, QuantState(value, **kwargs))

  # ------------------------------------------------------------ storage
  @property
  def quant_layout(self) -> str:
    """`"kernel"` or `"torch"`: the order the kernel is blocked in."""
    return dict(self.quant_options).get("layout", "kernel")

  def _block_options(self) -> dict[str, Any]:
    options = dict(self.quant_options)
    options.pop("layout", None)
    return options

  def _unpermute(self, x: jax.Array) -> jax.Array:
    """A dequantised array in block order back to the kernel's order."""
    perm = getattr(self, "quant_perm", None)
    if perm is None or perm == tuple(range(len(perm))):
      return x
    return jnp.transpose(x, tuple(int(i) for i in np.argsort(perm)))

  def _quantize(self, w: jax.Array) -> nf4.NF4Tensor | nf4.Int8Tensor:
    # No cast to the kernel dtype first: a float32 merged kernel is
    # quantized directly (the codes and absmaxes do not need it rounded).
    perm = self.quant_perm
    if perm != tuple(range(len(perm))):
      w = jnp.transpose(w, perm)
    return nf4.quantize(w, self.quant_scheme, **self._block_options())

  def _placements(self, q) -> dict[str, tuple[Any, Any]]:
    """`{field: (NamedSharding | None, logical axes | None)}`.

    Blocks follow the sharding of the kernel dim flattened first (dim 0 for
    `layout="kernel"`, the first output dim for `"torch"`) when a shard is a
    whole number of blocks (FSDP-sharded kernels stay sharded); everything
    else is replicated on the kernel's mesh.
    """
    shape, sharding = self.quant_shape, self.quant_sharding
    logical = self.quant_logical_axes
    block = dict(self.quant_options)["block_size"]
    d0 = self.quant_perm[0]
    out = {}
    lead = None
    if sharding is not None:
      spec = tuple(sharding.spec) + (None,) * len(shape)
      lead = spec[d0]
      axes = () if lead is None else (lead,) if isinstance(lead, str) else (
          tuple(lead))
      shards = math.prod(sharding.mesh.shape[a] for a in axes)
      per_shard = (shape[d0] // shards) * (math.prod(shape) // shape[d0])
      n_blocks = q.codes.shape[0]
      if (not axes or shape[d0] % shards or per_shard % block
          or n_blocks % shards):
        lead = None
    for field in _FIELDS[self.quant_scheme]:
      value = getattr(q, field)
      if value is None:
        continue
      blocked = field in _BLOCK_FIELDS and value.ndim >= 1
      spec = (lead,) + (None,) * (value.ndim - 1) if blocked else ()
      named = (
          None if sharding is None
          else jax.sharding.NamedSharding(sharding.mesh, P(*spec))
      )
      meta = None
      if logical is not None and blocked:
        meta = (logical[d0],) + (None,) * (value.ndim - 1)
      out[field] = (named, meta)
    return out

  def quantized_kernel(self) -> nf4.NF4Tensor | nf4.Int8Tensor:
    """The stored kernel as an `nf4.NF4Tensor` / `nf4.Int8Tensor` pytree.

    Its `shape` is the kernel's shape in block order (`quant_perm`): the
    kernel's own for `layout="kernel"`, `[out..., in...]` for `"torch"`.
    """
    return self._assemble(
        {f: getattr(self, "kernel_" + f, None) for f in _FIELDS[
            self.quant_scheme]}
    )

  def _assemble(self, variables: Mapping[str, Any]):
    # Fields absent from `variables` are None (the forward pass passes only
    # the stored ones: no absmax scale and offset without double quant).
    values = {f: None for f in _FIELDS[self.quant_scheme]}
    values.update({
        f: None if v is None else (v[...] if isinstance(v, nnx.Variable)
                                   else v)
        for f, v in variables.items()
    })
    meta = {
        "shape": tuple(self.quant_shape[d] for d in self.quant_perm),
        "dtype": self.quant_dtype,
        "block_size": dict(self.quant_options)["block_size"],
    }
    if self.quant_scheme == "nf4":
      return nf4.NF4Tensor(**values, **meta)
    return nf4.Int8Tensor(**values, **meta)

  def compute_dtype(self):
    """The dtype the forward pass dequantises to (`dtype` or the kernel's)."""
    dtype = getattr(self, "dtype", None)
    return jnp.dtype(self.quant_dtype if dtype is None else dtype)

  def dense_kernel(self, dtype: Any = None) -> jax.Array:
    """The dequantised kernel (default: the original kernel dtype)."""
    return self._unpermute(
        nf4.dequantize(self.quantized_kernel(), dtype or self.quant_dtype))

  def quantized_nbytes(self) -> int:
    """Bytes of the stored codes and scales (the bias not included)."""
    return nf4.nbytes(self.quantized_kernel())

  def requantize(self, w: jax.typing.ArrayLike) -> float:
    """Replaces the stored kernel by `quantize(w)`; returns the error.

    Args:
      w: The new full-precision kernel (the kernel's shape).

    Returns:
      The relative requantisation error `‖deq(quant(w)) − w‖_F / ‖w‖_F`
      (0 for an all-zero `w`), as a Python float.

    Raises:
      ValueError: If `w` has the wrong shape.
    """
    w = jnp.asarray(w)
    if tuple(w.shape) != self.quant_shape:
      raise ValueError(
          f"requantize expects a kernel of shape {self.quant_shape}; got "
          f"{w.shape}."
      )
    w32 = w.astype(jnp.float32)
    q = self._quantize(w32)
    for field in _FIELDS[self.quant_scheme]:
      new = getattr(q, field)
      if new is None:
        continue
      var = getattr(self, "kernel_" + field)
      sh = getattr(var.get_value(), "sharding", None)
      var.set_value(jax.device_put(new, sh) if sh is not None else new)
    err = jnp.linalg.norm(self._unpermute(nf4.dequantize(q, jnp.float32))
                          - w32)
    norm = jnp.linalg.norm(w32)
    return float(jnp.where(norm > 0, err / jnp.where(norm > 0, norm, 1), 0))

  @property
  def kernel(self) -> DequantizedKernel:
    return DequantizedKernel(self)

  # ---------------------------------------------------------- behaviour
  def __call__(self, inputs, *args, **kwargs):
    """The wrapped Flax layer's forward with a dequantised kernel.

    The dequantisation runs inside `jax.checkpoint`: the backward pass
    recomputes it from the codes instead of saving the dense kernel as a
    residual (tested: the VJP keeps the uint8 codes, no dense kernel).
    """
    names = [f for f in _FIELDS[self.quant_scheme]
             if getattr(self, "kernel_" + f, None) is not None]
    leaves = tuple(getattr(self, "kernel_" + f)[...] for f in names)
    dtype = self.compute_dtype()
    parent = super(QuantizedMixin, self)

    def run(inputs, leaves):
      # Asks XLA to dequantise only once this layer's input exists, rather
      # than hoisting every layer's dequantisation to the program start
      # (all dense kernels live at once). XLA:CPU drops the barrier before
      # scheduling (measured: forward temp memory = n_layers dense
      # kernels); GPU/TPU scheduling is not measured here.
      inputs, leaves = jax.lax.optimization_barrier((inputs, leaves))
      q = self._assemble(dict(zip(names, leaves)))
      token = _OVERRIDE.set((id(self),
                             self._unpermute(nf4.dequantize(q, dtype))))
      try:
        return parent.__call__(inputs, *args, **kwargs)
      finally:
        _OVERRIDE.reset(token)

    return jax.checkpoint(run)(inputs, leaves)


class QuantizedLinear(QuantizedMixin, nnx.Linear):
  """`nnx.Linear` whose kernel is stored quantized (see `QuantizedMixin`)."""


class QuantizedLinearGeneral(QuantizedMixin, nnx.LinearGeneral):
  """`nnx.LinearGeneral` whose kernel is stored quantized."""


class QuantizedEinsum(QuantizedMixin, nnx.Einsum):
  """`nnx.Einsum` whose kernel is stored quantized."""


# Exact Flax class -> its quantized subclass. (A user subclass of
# nnx.Linear may override `__call__`, so only exact classes are converted.)
QUANTIZED = {
    nnx.Linear: QuantizedLinear,
    nnx.LinearGeneral: QuantizedLinearGeneral,
    nnx.Einsum: QuantizedEinsum,
}


def is_quantized(module: Any) -> bool:
  """Whether `module` is a quantized layer (`QuantizedMixin`)."""
  return isinstance(module, QuantizedMixin)


def _quantize_module(module: nnx.Module, scheme: str, options, kernel=None,
                     layout: str = "kernel"):
  return QUANTIZED[type(module)](module, scheme=scheme, kernel=kernel,
                                 layout=layout, **options)


def quantize_base(
    model: nnx.Module,
    targets: str | Sequence[str] = "all-linear",
    scheme: str = "nf4",
    *,
    exclude: str | Sequence[str] | None = None,
    block_size: int = 64,
    double_quant: bool = True,
    dq_block_size: int = 256,
    layout: str = "kernel",
) -> nnx.Module:
  """Replaces the targeted layers' kernels by quantized storage, in place.

  A matched `nnx.Linear`, `nnx.LinearGeneral` or `nnx.Einsum` is replaced
  by its quantized subclass; a matched adapter wrapper keeps its adapter
  and gets a quantized `base` (so an init that edits the base, e.g. PiSSA,
  can run on the full-precision weight before quantisation).

  Differences from the official code (bitsandbytes' `quantize_4bit` as
  QLoRA's `qlora.py` calls it; `presets.paper("quantize_base")`):

  * Which elements share an absmax block. bitsandbytes flattens the torch
    weight `[out_features, in_features]`, so a block of 64 is 64
    consecutive input features of one output feature; by default lowrank
    flattens the Flax kernel `[in, out]` as it is stored (a block is
    consecutive output features of one input feature). The two give
    different absmax groups and so a different `Q(W)` (the codes are not
    interchangeable with bitsandbytes checkpoints). The default stays
    because quantized states saved by earlier versions hold codes of the
    same shape in kernel order, which a changed default would load as wrong
    weights without an error; `layout="torch"` gives bitsandbytes' blocks.
    Everything else matches: the NF4 table, nearest-code encoding (ties to
    the lower code), first element in the high nibble, block size 64, and
    double quantisation (mean offset, 8-bit signed dynamic map on blocks of
    256 absmaxes), QLoRA's default.
  * QLoRA's 8-bit path (LLM.int8 `Linear8bitLt`, with outlier
    decomposition) is not available: `scheme="int8"` is plain blockwise
    absmax.
  * QLoRA's adapter settings (r 64, α 16, every linear layer, `qlora.py`)
    are `inject`'s arguments, not this function's:
    `inject(model, targets="all-linear", rank=64, alpha=16,
    quantize_base="nf4", layout="torch")`.

  Args:
    model: An NNX model.
    targets: Which modules, with `inject`'s semantics (a regex matching the
      whole dotted path, a list of names / path suffixes, or
      `"all-linear"`).
    scheme: `"nf4"` (QLoRA) or `"int8"` (blockwise absmax).
    exclude: Modules to leave alone even if they match `targets`.
    block_size: Elements per absmax block (QLoRA: 64).
    double_quant: NF4: quantize the absmaxes to 8 bits (QLoRA: True).
    dq_block_size: NF4: absmaxes per double-quantisation scale (256).
    layout: Which elements share a block (`layout_perm`): `"kernel"` (the
      kernel's own order, default) or `"torch"` (bitsandbytes' `[out, in]`
      order, QLoRA's).

  Returns:
    `model`, with quantized layers.

  Raises:
    ValueError: On an unknown scheme or layout, bad block sizes, a target
      that matches nothing, a matched module that cannot be quantized
      (another kind, or already quantized), or a matched wrapper that is
      merged.
  """
  options = nf4.scheme_options(scheme, block_size=block_size,
                               double_quant=double_quant,
                               dq_block_size=dq_block_size)
  check_layout(layout)
  wrappers = (layers.LoRAWrapper,)
  match = surgery.match(targets, "targets", wrappers=wrappers)
  skip = (lambda p, m: False) if exclude is None else surgery.match(
      exclude, "exclude", wrappers=wrappers)
  modules = list(surgery.iter_modules(model, opaque=wrappers,
                                      graph_order=True))
  chosen, bad, quantizable = [], [], []
  for p, m in modules:
    name = surgery.path_str(p)
    inner = m.base if isinstance(m, layers.LoRAWrapper) else m
    if type(inner) in QUANTIZED:
      quantizable.append(name)
    if not match(name, inner) or skip(name, inner):
      continue
    if is_quantized(inner):
      bad.append(f"{name} (already quantized: {inner.quant_scheme})")
    elif type(inner) not in QUANTIZED:
      bad.append(f"{name} ({type(inner).__name__})")
    elif isinstance(m, layers.LoRAWrapper) and m.merged:
      bad.append(f"{name} (adapter merged into it; unmerge first)")
    else:
      chosen.append((p, m))
  listing = surgery.listing
  if bad:
    raise ValueError(
        f"targets={targets!r} matched modules that cannot be quantized: "
        f"{listing(bad)}. Quantizable (nnx.Linear, LinearGeneral, Einsum): "
        f"{listing(quantizable)}."
    )
  if not chosen:
    raise ValueError(
        f"targets={targets!r} matched no module. Quantizable modules: "
        f"{listing(quantizable)}."
    )
  for p, m in chosen:
    if isinstance(m, layers.LoRAWrapper):
      m.base = _quantize_module(m.base, scheme, options, layout=layout)
    else:
      surgery.set_submodule(
          model, p, _quantize_module(m, scheme, options, layout=layout))
  return model


presets.register(
    "quantize_base",
    source=("bitsandbytes-foundation/bitsandbytes@95f9af309d4d "
            "(bitsandbytes/functional.py, backends/default/ops.py); "
            "artidoro/qlora@7f4e95a68dc0 (qlora.py)"),
    kwargs={"layout": "torch"},
    reasons={"layout": (
        "bitsandbytes blocks the torch weight [out, in] (64 consecutive "
        "input features); lowrank's default blocks the Flax kernel in its "
        "own [in, out] order, kept so that quantized states saved earlier "
        "load as the same weights")},
    unavailable=(
        "QLoRA's 8-bit base (LLM.int8 Linear8bitLt with outlier "
        "decomposition); scheme='int8' is blockwise absmax",
    ),
)


def _quantized_adapters(model: nnx.Module) -> dict[str, layers.LoRAWrapper]:
  found = {
      path: m for path, m in injection.adapter_modules(model).items()
      if is_quantized(m.base)
  }
  if not found:
    raise ValueError(
        "The model has no adapter on a quantized base; use "
        "lowrank.adapters.merge for full-precision bases."
    )
  return found


def merge_quantized(model: nnx.Module) -> dict[str, float]:
  """Merges every adapter on a quantized base: dequantise, merge, requantise.

  The merge itself is the wrapper's own `merge()` in float32 (so DoRA and
  other non-additive methods merge correctly), and the merged kernel is
  requantised with the base's scheme and block sizes. Adapters that are
  already merged, or whose base is full precision, are left alone.

  Args:
    model: A model with adapters on quantized bases.

  Returns:
    `{module path: relative requantisation error}` with
    `‖deq(quant(W')) − W'‖_F / ‖W'‖_F` for the float32 merged kernel `W'`.
    The merged model computes with `deq(quant(W'))`, so this is how far it
    is from the exact merge.

  Raises:
    ValueError: If no adapter sits on a quantized base.
  """
  out = {}
  for path, m in _quantized_adapters(model).items():
    if m.merged:
      continue
    with requantizing() as log:
      m.merge()
    out[path] = log[-1][1] if log else 0.0  # No write: nothing requantised.
  return out


def unmerge_quantized(model: nnx.Module) -> dict[str, float]:
  """Inverse of `merge_quantized` (requantises `W' − ΔW`); returns errors.

  Raises:
    ValueError: If no adapter sits on a quantized base.
  """
  out = {}
  for path, m in _quantized_adapters(model).items():
    if not m.merged:
      continue
    with requantizing() as log:
      m.unmerge()
    out[path] = log[-1][1] if log else 0.0
  return out


# ------------------------------------------------------------------ LQ-LoRA
def _to_2d(w: jax.Array, wrapper: layers.LoRAWrapper) -> jax.Array:
  order = tuple(wrapper.in_dims) + tuple(wrapper.out_dims)
  return jnp.transpose(w, order).reshape(wrapper.d_in, wrapper.d_out)


def _from_2d(w2: jax.Array, wrapper: layers.LoRAWrapper,
             shape: tuple[int, ...]) -> jax.Array:
  order = tuple(wrapper.in_dims) + tuple(wrapper.out_dims)
  w = w2.reshape(tuple(shape[d] for d in order))
  return jnp.transpose(w, tuple(order.index(d) for d in range(len(shape))))


LQ_OPTIONS = ("scheme", "iters", "block_size", "double_quant",
              "dq_block_size", "layout", "early_stop", "oversample")


def _check_oversample(oversample: Any) -> None:
  if oversample is not None and (
      isinstance(oversample, bool) or not isinstance(oversample, int)
      or oversample < 0):
    raise ValueError(
        f"oversample must be None (exact SVD) or a non-negative int (the "
        f"randomized SVD's extra columns; the official code: 10); got "
        f"{oversample!r}."
    )


def lq_lora_init(
    wrapper: layers.LoRAWrapper,
    *,
    scheme: str = "nf4",
    iters: int = 10,
    block_size: int = 64,
    double_quant: bool = True,
    dq_block_size: int = 256,
    layout: str = "kernel",
    early_stop: bool = False,
    oversample: int | None = None,
    key: jax.Array | None = None,
) -> list[float]:
  """LQ-LoRA initialisation of a LoRA wrapper around a full-precision base.

  Decomposes the base kernel `W ≈ Q + L1 L2` (`nf4.lq_decompose`, `iters`
  alternations; quantisation with `quantize_base`'s blocks), sets the
  adapter to `s · A B = L1 L2` (`A = L1 / √s`, `B = L2 / √s`) and replaces
  `wrapper.base` by a quantized layer storing `Q`.

  Differences from the official code (`HanGuo97/lq-lora`,
  `models/lq_utils.py`, `lora_utils.py`; `presets.paper("lq_lora_init")`):

  * Stopping: the official code runs up to 100 iterations, stops at the
    first whose error exceeds the previous one and returns that (worse)
    iterate. lowrank runs `iters=10` and keeps the best iterate, which is
    never worse and bounds the cost (one SVD per iteration per layer);
    `iters=100, early_stop=True` gives the official rule.
  * SVD: the official code uses `torch.svd_lowrank(W − Q, r + 10)` (a
    randomized SVD, 2 power iterations, fresh draws every iteration).
    lowrank's default is the exact SVD (deterministic, the best rank-r
    approximation); `oversample=10` runs the same randomized algorithm
    (`svd_init.randomized_svd` on the `[in, out]` matrix, which is
    `torch.svd_lowrank`'s sketch of the `[out, in]` weight's row space)
    with draws from `key`, not torch's; the sketch width is capped at
    `min(d_in, d_out)`.
  * Blocks: the official quantiser blocks the torch weight `[out, in]`;
    lowrank's default blocks the kernel in its own order (see
    `quantize_base`); `layout="torch"` gives the official blocks.
  * Not available: the official quantiser itself (`blockwise-nf`: its own
    NF table, absmaxes offset by their minimum and quantised to unsigned
    ints with a float scale per block of block-absmaxes; lowrank reuses
    QLoRA's NF4 with bitsandbytes' double quantisation), the per-layer bit
    allocation (an ILP over quantisation configs), and the Fisher-weighted
    decomposition (weighted SVD with a sensitivity estimate).

  Args:
    wrapper: A plain-LoRA wrapper (`method == "lora"`) around an unmerged,
      full-precision `nnx.Linear` / `LinearGeneral` / `Einsum`.
    scheme: Quantisation of `Q` (`"nf4"` or `"int8"`).
    iters: Alternations `T` (the official code: 100).
    block_size, double_quant, dq_block_size, layout: As in `quantize_base`.
    early_stop: The official stopping rule (above) instead of the best of
      `iters`.
    oversample: None: exact SVD. An int: randomized SVD with
      `rank + oversample` columns and 2 power iterations (official: 10).
    key: PRNG key of the randomized SVD (default `jax.random.key(0)`).

  Returns:
    The relative error `‖W − Q − L1 L2‖_F / ‖W‖_F` of every iteration run
    (the best one is kept, or the last with `early_stop`).

  Raises:
    ValueError: If the wrapper is not plain LoRA, is merged, or its base is
      already quantized (LQ-LoRA needs the full-precision weight) or of a
      kind that cannot be quantized; or on bad options.
  """
  if not isinstance(wrapper, layers.LoRAWrapper) or wrapper.method != "lora":
    raise ValueError(
        "init='lq_lora' sets LoRA's A and B factors and needs method='lora'; "
        f"got {getattr(wrapper, 'method', type(wrapper).__name__)!r}."
    )
  base = wrapper.base
  if is_quantized(base):
    raise ValueError(
        "init='lq_lora' needs the full-precision base weight, but this "
        "base is already quantized. Run the init on the unquantized model: "
        "it quantizes the base itself (quantized.inject_quantized(..., "
        "init='lq_lora') does both)."
    )
  if type(base) not in QUANTIZED:
    raise ValueError(
        f"init='lq_lora' supports nnx.Linear, LinearGeneral and Einsum "
        f"bases; got {type(base).__name__}."
    )
  if wrapper.merged:
    raise ValueError("init='lq_lora' on a merged adapter; unmerge first.")
  options = nf4.scheme_options(scheme, block_size=block_size,
                               double_quant=double_quant,
                               dq_block_size=dq_block_size)
  perm = layout_perm(base, layout)
  inverse = tuple(int(i) for i in np.argsort(perm))
  _check_oversample(oversample)
  w = base.kernel.get_value()
  shape = tuple(w.shape)

  def roundtrip(x2):
    x = jnp.transpose(_from_2d(x2, wrapper, shape), perm)
    x = nf4.dequantize(nf4.quantize(x, scheme, **options), jnp.float32)
    return _to_2d(jnp.transpose(x, inverse), wrapper)

  svd = None
  if oversample is not None:
    width = min(wrapper.rank + oversample, wrapper.d_in, wrapper.d_out)
    svd = lambda x, k: svd_init.randomized_svd(x, width, 2, k)
  residual, l1, l2, errors = nf4.lq_decompose(
      _to_2d(w, wrapper).astype(jnp.float32), wrapper.rank, roundtrip, iters,
      early_stop=early_stop, svd=svd, key=key)
  root = math.sqrt(wrapper.scale)
  wrapper.set_peft_factors(l1 / root, l2 / root)
  wrapper.base = _quantize_module(
      base, scheme, options, kernel=_from_2d(residual, wrapper, shape),
      layout=layout)
  return errors


presets.register(
    "lq_lora_init",
    source=("HanGuo97/lq-lora@c2424b3adc27 (models/lq_utils.py, "
            "models/lora_utils.py, models/factorizations_utils.py)"),
    kwargs={"iters": 100, "early_stop": True, "oversample": 10,
            "layout": "torch"},
    reasons={
        "iters": "transform_lora_layers' num_iterations=100; lowrank runs "
                 "10 (one SVD per iteration per layer)",
        "early_stop": "the official loop breaks at the first rise of the "
                      "error and returns that iterate; lowrank keeps the "
                      "best, never worse",
        "oversample": "torch.svd_lowrank(W - Q, r + 10) (randomized); "
                      "lowrank's default is the exact SVD, deterministic",
        "layout": "the official quantiser blocks the torch [out, in] "
                  "weight; lowrank's default blocks the kernel as stored",
    },
    unavailable=(
        "the official blockwise-nf quantiser (its NF table; block absmaxes "
        "offset by their minimum, unsigned-int quantised with a float "
        "scale per group); lowrank uses QLoRA's NF4 with bitsandbytes' "
        "double quantisation",
        "per-layer bit allocation (ILP over quantisation configs)",
        "the Fisher-weighted decomposition (weighted SVD, two-sided "
        "heuristic)",
    ),
)


def _lq_lora_registered(wrapper, data, key) -> None:
  """`layers.register_init` hook: `data` is None or a dict of options."""
  data = {} if data is None else data
  if not isinstance(data, Mapping):
    raise ValueError(
        "init_data for init='lq_lora' must be None or a dict of options "
        f"{LQ_OPTIONS}; got {type(data).__name__}."
    )
  unknown = sorted(set(data) - set(LQ_OPTIONS))
  if unknown:
    raise ValueError(
        f"Unknown init_data option(s) {unknown} for init='lq_lora'; known: "
        f"{LQ_OPTIONS}."
    )
  lq_lora_init(wrapper, key=key, **data)


layers.register_init("lq_lora", _lq_lora_registered)


def inject_quantized(
    model: nnx.Module,
    *,
    targets: str | Sequence[str],
    scheme: str = "nf4",
    init: str = "kaiming",
    exclude: str | Sequence[str] | None = None,
    block_size: int = 64,
    double_quant: bool = True,
    dq_block_size: int = 256,
    layout: str = "kernel",
    lq_iters: int = 10,
    lq_early_stop: bool = False,
    lq_oversample: int | None = None,
    **inject_kwargs,
) -> nnx.Module:
  """QLoRA / LQ-LoRA in one call: quantize the targeted bases, add adapters.

  With `init="lq_lora"` the adapters are built first on the full-precision
  weights and `lq_lora_init` quantizes each base; with any other init the
  targeted layers are quantized first (`quantize_base`) and the adapters
  are then injected on top (QLoRA: the adapter starts at zero on `Q(W)`).

  Args:
    model: An NNX model.
    targets: As in `lowrank.adapters.inject`.
    scheme: `"nf4"` or `"int8"`.
    init: Adapter init (`"lq_lora"` or any init `inject` accepts).
    exclude: As in `inject`.
    block_size, double_quant, dq_block_size, layout: As in `quantize_base`.
    lq_iters, lq_early_stop, lq_oversample: `lq_lora_init`'s `iters`,
      `early_stop` and `oversample` (LQ-LoRA's official settings:
      `lq_iters=100, lq_early_stop=True, lq_oversample=10,
      layout="torch"`). The randomized SVD of the i-th new adapter draws
      from `fold_in(jax.random.key(0), i)`.
    **inject_kwargs: Passed to `inject` (`rank`, `alpha`, `method`, ...).

  Returns:
    `model`, with quantized bases and adapters.

  Raises:
    ValueError: As `quantize_base`, `inject` and `lq_lora_init`.
  """
  options = nf4.scheme_options(scheme, block_size=block_size,
                               double_quant=double_quant,
                               dq_block_size=dq_block_size)
  check_layout(layout)
  if init != "lq_lora":
    quantize_base(model, targets, scheme, exclude=exclude, layout=layout,
                  **options)
    return injection.inject(model, targets=targets, init=init,
                            exclude=exclude, **inject_kwargs)
  if inject_kwargs.get("init_data") is not None:
    raise ValueError(
        "inject_quantized(init='lq_lora') takes its options as keywords "
        "(scheme, lq_iters, block sizes), not init_data."
    )
  _check_oversample(lq_oversample)
  before = set(injection.adapter_modules(model))
  injection.inject(model, targets=targets, init="kaiming", exclude=exclude,
                   **inject_kwargs)
  key = jax.random.key(0)
  for i, (path, m) in enumerate(injection.adapter_modules(model).items()):
    if path not in before:
      lq_lora_init(m, scheme=scheme, iters=lq_iters, layout=layout,
                   early_stop=lq_early_stop, oversample=lq_oversample,
                   key=jax.random.fold_in(key, i), **options)
      m.init = "lq_lora"
  return model


# `inject(..., quantize_base=scheme)` runs `inject_quantized`.
injection.register_base_quantizer(inject_quantized)
