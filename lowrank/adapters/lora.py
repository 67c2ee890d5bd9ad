"""LoRA as pure functions (no Flax): init, scaling, factored apply, merge.

Shapes follow the Flax kernel convention, `y = x @ W` with `W: [d_in, d_out]`:
the adapter is `A: [d_in, r]`, `B: [r, d_out]` and the update is
`ΔW = s · A @ B` with `s = alpha / r` (or `alpha / sqrt(r)` for rsLoRA).
Hugging Face PEFT stores the transposes (`lora_A.weight: [r, d_in]`,
`lora_B.weight: [d_out, r]`); `lowrank.adapters.peft_io` converts.

References:
  Hu et al. 2021, LoRA, https://arxiv.org/abs/2106.09685
  Kalajdzievski 2023, rsLoRA, https://arxiv.org/abs/2312.03732
"""

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

INITS = ("kaiming", "gaussian", "zeros")


def scaling(rank, alpha=None, *, rslora: bool = False) -> float:
  """The LoRA scale `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.

  Differences from the official code (Hugging Face PEFT,
  `huggingface/peft@5d602fdbff04`, `src/peft/tuners/lora/layer.py:278-281`,
  the same formulas): PEFT's default `lora_alpha` is 8, lowrank's `None`
  means `alpha = r`. For plain LoRA that is scale 1 at every rank; with
  `rslora=True` it is `sqrt(r)`, which grows with the rank, the opposite
  of what rsLoRA's `alpha / sqrt(r)` is for (a rank-independent `alpha`,
  so the scale falls as `1 / sqrt(r)`). With rsLoRA pass a fixed `alpha`
  (PEFT's default: `alpha=8`, scale `8 / sqrt(r)`).

  Args:
    rank: Adapter rank `r` (positive int).
    alpha: `lora_alpha`; `None` means `alpha = r` (scale 1 for plain LoRA,
      `sqrt(r)` with rsLoRA: pass a fixed `alpha` there).
    rslora: Use the rank-stabilised scale `alpha / sqrt(r)`.

  Returns:
    The scale as a Python float.

  Raises:
    TypeError: If `rank` is not an int or `alpha` not a real number.
    ValueError: If `rank` is not positive or `alpha` is not finite.
  """
  rank = check_rank(rank)
  alpha = check_alpha(alpha, rank)
  return alpha / (math.sqrt(rank) if rslora else rank)


def _type_name(value) -> str:
  return type(value).__name__


def check_rank(rank, name: str = "rank") -> int:
  """Validates an adapter rank and returns it as a Python `int`.

  Python ints and NumPy integer scalars are accepted; `bool`, floats (even
  whole ones such as `8.0`), strings and `None` are not, since truncating
  them would silently build an adapter of another rank.

  Args:
    rank: The value to check.
    name: How the value is called in error messages (e.g. `rank_pattern`).

  Returns:
    `int(rank)`.

  Raises:
    TypeError: If `rank` is not an int.
    ValueError: If `rank < 1`.
  """
  if isinstance(rank, (bool, np.bool_)) or not isinstance(
      rank, (int, np.integer)):
    raise TypeError(
        f"{name} must be a positive int (Python int or NumPy integer); got "
        f"{rank!r} of type {_type_name(rank)}. Pass a whole number, e.g. "
        f"{name}=8."
    )
  if rank <= 0:
    raise ValueError(
        f"{name} must be a positive int (>= 1); got {rank!r}."
    )
  return int(rank)


def check_alpha(alpha, rank: int, name: str = "alpha") -> float:
  """Validates `lora_alpha` (`None`: `rank`) and returns it as a float.

  Raises:
    TypeError: If `alpha` is not a real number (`bool` and strings are not).
    ValueError: If `alpha` is not finite.
  """
  if alpha is None:
    return float(rank)
  is_scalar_array = (
      isinstance(alpha, (np.ndarray, jax.Array)) and alpha.shape == ()
      and alpha.dtype.kind in "iuf")
  if isinstance(alpha, (bool, np.bool_)) or not (
      isinstance(alpha, numbers.Real) or is_scalar_array):
    raise TypeError(
        f"{name} must be a finite real number (int or float) or None "
        f"(meaning alpha = rank); got {alpha!r} of type {_type_name(alpha)}."
    )
  alpha = float(alpha)
  if not math.isfinite(alpha):
    raise ValueError(f"{name} must be finite; got {alpha}.")
  return alpha


def init_a(
    key: jax.Array,
    shape: tuple[int, ...],
    fan_in: int,
    *,
    init: str = "kaiming",
    dtype=jnp.float32,
) -> jax.Array:
  """Initial `A` of shape `[*in_shape, r]`.

  `"kaiming"` is PEFT's default, `kaiming_uniform_(a=sqrt(5))` on the
  `[r, d_in]` torch weight: `U(-1/sqrt(d_in), 1/sqrt(d_in))`. `"gaussian"` is
  PEFT's `init_lora_weights="gaussian"`: `N(0, 1/r)` (std `1/r`). `"zeros"`
  is used for embedding adapters, whose `B` is random instead.

  Raises:
    ValueError: On an unknown `init`.
  """
  rank = shape[-1]
  if init == "kaiming":
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  if init == "gaussian":
    return jax.random.normal(key, shape, dtype) / rank
  if init == "zeros":
    return jnp.zeros(shape, dtype)
  raise ValueError(f"Unknown LoRA init {init!r}; expected one of {INITS}.")


def lora_apply(
    x: Float[Array, "*batch d_in"],
    a: Float[Array, "d_in r"],
    b: Float[Array, "r d_out"],
    scale: float | int,
) -> Float[Array, "*batch d_out"]:
  """`scale · (x @ A) @ B`, never forming `A @ B` (forward or backward).

  The gradient w.r.t. `A` is `xᵀ (g Bᵀ)` and w.r.t. `B` is `(x A)ᵀ g`: every
  intermediate is `[..., r]` or `[d, r]`, so memory stays O(r (d_in + d_out))
  beyond the activations.
  """
  return _factored(x, a.astype(x.dtype), b.astype(x.dtype)) * jnp.asarray(
      scale, x.dtype
  )


@jax.custom_vjp
def _factored(x, a, b):
  """`(x @ A) @ B` with a backward that only transposes `[tokens, r]` arrays.

  JAX's own transpose of `h @ B` computes `dB = (gᵀ h)ᵀ`, and XLA:CPU then
  writes a transposed copy of the full `[tokens, d_out]` cotangent for every
  adapter; on all-linear LoRA that copy alone made the step as slow as full
  fine-tuning (benchmarks/lora_bench.py). Reverse-mode only.
  """
  return (x @ a) @ b


def _factored_fwd(x, a, b):
  h = x @ a
  return h @ b, (x, h, a, b)


def _factored_bwd(residuals, g):
  x, h, a, b = residuals
  gh = g @ b.T  # [..., r]
  flat = lambda t: t.reshape(-1, t.shape[-1])
  da = (flat(gh).T @ flat(x)).T  # [d_in, r]; transposes only [r, d_in].
  db = flat(h).T @ flat(g)  # [r, d_out]
  return gh @ a.T, da.astype(a.dtype), db.astype(b.dtype)


_factored.defvjp(_factored_fwd, _factored_bwd)


def lora_delta(
    a: Float[Array, "d_in r"], b: Float[Array, "r d_out"], scale: float | int
) -> Float[Array, "d_in d_out"]:
  """The dense update `scale · A @ B` in float32 (for merging only)."""
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  return (a32 @ b32) * scale


def merge(
    kernel: Float[Array, "d_in d_out"],
    a: Float[Array, "d_in r"],
    b: Float[Array, "r d_out"],
    scale: float | int,
) -> Float[Array, "d_in d_out"]:
  """`W + s·A B`, accumulated in float32 and cast back to `W`'s dtype."""
  return (kernel.astype(jnp.float32) + lora_delta(a, b, scale)).astype(
      kernel.dtype
  )


def unmerge(
    kernel: Float[Array, "d_in d_out"],
    a: Float[Array, "d_in r"],
    b: Float[Array, "r d_out"],
    scale: float | int,
) -> Float[Array, "d_in d_out"]:
  """Inverse of `merge` (exact up to float32 rounding and `W`'s dtype)."""
  return (kernel.astype(jnp.float32) - lora_delta(a, b, scale)).astype(
      kernel.dtype
  )


def trainable_parameters(d_in: int, d_out: int, rank: int) -> int:
  """Number of trainable adapter parameters for one `[d_in, d_out]` weight."""
  return rank * (d_in + d_out)
