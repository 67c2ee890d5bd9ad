"""Flax NNX LoRA layers that wrap an existing layer without copying it.

Each layer holds the original module as `base` (its `kernel` stays an
`nnx.Param`, frozen when training with `wrt=nnx.LoRAParam`) plus the adapter
factors `lora_a` / `lora_b` as `nnx.LoRAParam`, and calls the pure functions
in `lowrank.adapters.lora`. Wrapped kinds: `nnx.Linear`, `nnx.LinearGeneral`,
`nnx.Einsum` (attention projections) and `nnx.Embed`.

Sharding: the factors inherit the base kernel's logical axes (`out_sharding`
metadata) on the dimensions they share with it, and the rank axis is the
logical axis `lowrank` (replicated by `lowrank.sharding.LOGICAL_AXIS_RULES`).
Their values are placed with the base kernel's actual mesh sharding, so
injecting into a sharded model needs no mesh context.

A wrapper is a drop-in replacement: `wrapper(x)` equals `base(x)` at
initialisation (B = 0, or A = 0 for embeddings, as in PEFT).
"""

import math
import string
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from lowrank.adapters import lora

P = jax.sharding.PartitionSpec


def _kernel_var(base: nnx.Module) -> nnx.Variable:
  return base.embedding if isinstance(base, nnx.Embed) else base.kernel


def _make_factor(
    value: jax.Array,
    like: nnx.Variable,
    dims: tuple[int | None, ...],
) -> nnx.LoRAParam:
  """An `nnx.LoRAParam` sharded like `like` on the kernel dims in `dims`.

  `dims[i]` is the kernel dimension that factor dimension `i` shares, or
  `None` for the rank axis.
  """
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
    return nnx.LoRAParam(value, **kwargs)


class LoRAWrapper(nnx.Module):
  """Common state and behaviour of the LoRA wrappers.

  Attributes:
    base: The wrapped module (unchanged, its variables still `nnx.Param`).
    lora_a: `nnx.LoRAParam`, `[*in_shape, r]`.
    lora_b: `nnx.LoRAParam`, `[r, *out_shape]`.
    rank, alpha, rslora, scale: Adapter hyperparameters (static).
    merged: Whether `ΔW` is currently folded into the base kernel.
    enabled: Whether the adapter contributes (see `adapters.disabled`).
  """

  method = "lora"

  def __init__(
      self,
      base: nnx.Module,
      *,
      rank: int,
      alpha: float | int | None = None,
      rslora: bool = False,
      dropout: float | int = 0.0,
      init: str = "kaiming",
      rngs: nnx.Rngs,
  ):
    lora.check_rank(rank)
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1); got {dropout}.")
    self.base = base
    self.rank = rank
    self.alpha = float(rank if alpha is None else alpha)
    self.rslora = bool(rslora)
    self.scale = lora.scaling(rank, self.alpha, rslora=rslora)
    self.init = init
    self.merged = False
    self.enabled = True
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None
    kernel = _kernel_var(base)
    in_dims, out_dims = self._split_kernel_dims()
    shape = kernel.get_value().shape
    in_shape = tuple(shape[d] for d in in_dims)
    out_shape = tuple(shape[d] for d in out_dims)
    dtype = kernel.get_value().dtype
    key_a, key_b = jax.random.split(rngs.params())
    a, b = self._init_factors(key_a, key_b, in_shape, out_shape, dtype)
    self.lora_a = _make_factor(a, kernel, tuple(in_dims) + (None,))
    self.lora_b = _make_factor(b, kernel, (None,) + tuple(out_dims))

  # Subclasses define these three.
  def _split_kernel_dims(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Kernel dims contracted with the input, and kernel dims of the output."""
    raise NotImplementedError

  def _delta_apply(self, x: jax.Array, a: jax.Array, b: jax.Array):
    """The adapter's contribution for input `x` (unscaled)."""
    raise NotImplementedError

  def _delta_kernel(self) -> jax.Array:
    """`ΔW` in float32 with the base kernel's shape."""
    a = self.lora_a[...].astype(jnp.float32)
    b = self.lora_b[...].astype(jnp.float32)
    r = self.rank
    kshape = _kernel_var(self.base).get_value().shape
    in_dims, out_dims = self._split_kernel_dims()
    delta = lora.lora_delta(a.reshape(-1, r), b.reshape(r, -1), self.scale)
    delta = delta.reshape(
        tuple(kshape[d] for d in in_dims) + tuple(kshape[d] for d in out_dims)
    )
    # Back to the kernel's own dim order.
    perm = [0] * len(kshape)
    for i, d in enumerate(tuple(in_dims) + tuple(out_dims)):
      perm[d] = i
    return jnp.transpose(delta, perm)

  def _init_factors(self, key_a, key_b, in_shape, out_shape, dtype):
    r = self.rank
    a = lora.init_a(
        key_a, in_shape + (r,), math.prod(in_shape), init=self.init,
        dtype=dtype,
    )
    b = jnp.zeros((r,) + out_shape, dtype)
    del key_b
    return a, b

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
    dtype = self._compute_dtype(x)
    a = self.lora_a[...].astype(dtype)
    b = self.lora_b[...].astype(dtype)
    delta = self._delta_apply(x.astype(dtype), a, b)
    return y + (delta * jnp.asarray(self.scale, dtype)).astype(y.dtype)

  def merge(self) -> None:
    """Folds `ΔW` into the base kernel (fp32 accumulate, cast back)."""
    if self.merged:
      return
    var = _kernel_var(self.base)
    w = var.get_value()
    var.set_value((w.astype(jnp.float32) + self._delta_kernel()).astype(w.dtype))
    self.merged = True

  def unmerge(self) -> None:
    """Inverse of `merge`."""
    if not self.merged:
      return
    var = _kernel_var(self.base)
    w = var.get_value()
    var.set_value((w.astype(jnp.float32) - self._delta_kernel()).astype(w.dtype))
    self.merged = False

  def num_trainable(self) -> int:
    return self.lora_a.get_value().size + self.lora_b.get_value().size

  def peft_factors(self) -> tuple[jax.Array, jax.Array]:
    """`(A, B)` as 2-D `[d_in, r]`, `[r, d_out]` (flattened in/out dims)."""
    r = self.rank
    return (
        self.lora_a[...].reshape(-1, r),
        self.lora_b[...].reshape(r, -1),
    )

  def set_peft_factors(self, a2: Any, b2: Any) -> None:
    """Inverse of `peft_factors`: sets `A`, `B` from 2-D arrays."""
    a_old, b_old = self.lora_a.get_value(), self.lora_b.get_value()
    a = jnp.asarray(a2, a_old.dtype).reshape(a_old.shape)
    b = jnp.asarray(b2, b_old.dtype).reshape(b_old.shape)
    for var, new, old in ((self.lora_a, a, a_old), (self.lora_b, b, b_old)):
      sh = getattr(old, "sharding", None)
      var.set_value(jax.device_put(new, sh) if sh is not None else new)


class LoRALinear(LoRAWrapper):
  """LoRA around `nnx.Linear`: `y = base(x) + s · (drop(x) A) B`."""

  def _split_kernel_dims(self):
    return (0,), (1,)

  def _delta_apply(self, x, a, b):
    return lora.lora_apply(x, a, b, 1.0)


class LoRALinearGeneral(LoRAWrapper):
  """LoRA around `nnx.LinearGeneral` (no `batch_axis`).

  `A: [*in_features, r]` is contracted with the input's `axis` dims, then
  `B: [r, *out_features]`; the output dims come last, as in the base layer.
  """

  def _split_kernel_dims(self):
    if self.base.batch_axis:
      raise ValueError(
          "LoRA on nnx.LinearGeneral with batch_axis is not supported."
      )
    n_in = len(self.base.in_features)
    n_out = len(self.base.out_features)
    return tuple(range(n_in)), tuple(range(n_in, n_in + n_out))

  def _delta_apply(self, x, a, b):
    axis = tuple(ax % x.ndim for ax in self.base.axis)
    h = jax.lax.dot_general(
        x, a, ((axis, tuple(range(len(axis)))), ((), ()))
    )
    return jnp.tensordot(h, b, axes=1)


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


class LoRAEinsum(LoRAWrapper):
  """LoRA around `nnx.Einsum` (e.g. attention `BTD,DNH->BTNH`).

  Kernel letters that appear in the input (and not the output) are the
  contracted input dims; letters in the output are the output dims. A letter
  in all three (a batch dim of the kernel) cannot be adapted.
  """

  def _letters(self):
    lhs, ker, out = parse_einsum(self.base.einsum_str)
    bad = [c for c in ker if (c in lhs) == (c in out)]
    if bad:
      raise ValueError(
          f"Cannot add LoRA to einsum {self.base.einsum_str!r}: kernel "
          f"letters {bad} are batch dims or summed out in the kernel alone."
      )
    used = set(lhs + ker + out)
    rank_letter = next(c for c in string.ascii_letters if c not in used)
    return lhs, ker, out, rank_letter

  def _split_kernel_dims(self):
    lhs, ker, _, _ = self._letters()
    return (
        tuple(i for i, c in enumerate(ker) if c in lhs),
        tuple(i for i, c in enumerate(ker) if c not in lhs),
    )

  def _delta_apply(self, x, a, b):
    lhs, ker, out, r = self._letters()
    k_in = "".join(c for c in ker if c in lhs)
    k_out = "".join(c for c in ker if c not in lhs)
    mid = "".join(c for c in lhs if c not in k_in) + r
    h = jnp.einsum(f"{lhs},{k_in}{r}->{mid}", x, a)
    return jnp.einsum(f"{mid},{r}{k_out}->{out}", h, b)

  def __call__(self, x, einsum_str=None, **kwargs):
    if einsum_str is not None and einsum_str != self.base.einsum_str:
      raise ValueError("A LoRA-wrapped Einsum uses its constructor einsum_str.")
    return super().__call__(x, **kwargs)


class LoRAEmbed(LoRAWrapper):
  """LoRA around `nnx.Embed`: `base(ids) + s · A[ids] B`.

  As in PEFT, `A: [num_embeddings, r]` starts at zero and `B: [r, features]`
  is standard normal; no dropout on token ids.
  """

  def _split_kernel_dims(self):
    return (0,), (1,)

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


def wrapper_for(module: nnx.Module) -> type | None:
  """The LoRA wrapper class for `module`'s type (exact or subclass)."""
  for cls in type(module).__mro__:
    if cls in WRAPPERS:
      return WRAPPERS[cls]
  return None
