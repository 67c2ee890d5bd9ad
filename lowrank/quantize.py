"""Block-wise 8-bit quantisation of arrays along their last axis (pure jnp).

The low-level quantiser shared by 8-bit Adam (`lowrank.optim.adam8bit`,
which stores its moments with it) and QLoRA's double quantisation of NF4
block scales (`lowrank.adapters.nf4`). It imports nothing from lowrank.

A last axis of size `n` gets `k = ceil(n / block_size)` blocks of equal
length `ceil(n / k)` (`block_layout`), zero-padded inside the computation
only; codes keep the array's shape `[..., n]` and there is one float32
absmax scale per block, `[..., k]`.

Codes (`scheme`):

* `"dynamic"` (default): bitsandbytes' dynamic (non-linear) 8-bit maps,
  256-entry tables whose step grows with magnitude; `x / absmax(x)` uses
  the signed map, `sqrt(v) / absmax(sqrt(v))` (a second moment) the
  unsigned one. The nearest entry is found in closed form from the map's
  layout (no table search).
* `"linear"`: int8 `round(x / absmax * 127)`, or uint8
  `round(sqrt(v) / absmax * 255)` for second moments.

A nonzero `sqrt(v)` is never rounded to zero (it takes the smallest
positive code instead). Rounding is to the nearest code, or unbiased
stochastic rounding when `noise` is given.

`bnb=True` (dynamic codes only) follows bitsandbytes' 8-bit optimizer
kernel instead: a second moment is stored as `v` itself (a nonzero `v` may
round to code 0), and a negative first moment that rounds to 0 takes the
smallest negative code (its sign is kept).

(`lowrank.optim.quantize` is a different quantiser: Q-GaLore's group-wise
asymmetric 4/8-bit integers for projectors.)

References:
  Dettmers et al. 2022, 8-bit Optimizers via Block-wise Quantization,
    https://arxiv.org/abs/2110.02861
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SCHEMES = ("dynamic", "linear")


class BlockQuantized(NamedTuple):
  """An array stored as 8-bit codes with one float32 scale per block.

  Attributes:
    codes: `[..., n]`, the array's shape. uint8 indices into the dynamic
      map, or (`"linear"` first moments) int8 levels in `[-127, 127]`.
    scale: float32 `[..., k]`, the absmax of each block (of `x`, or of
      `sqrt(v)` for second moments); 0 for an all-zero block.
  """

  codes: jax.Array
  scale: jax.Array


def _dynamic_map(signed: bool) -> np.ndarray:
  """bitsandbytes' `create_dynamic_map(signed, 7, 8)`, sorted, float32.

  Decade `i = 0..6` holds `10^(i - 6)` times the `2^i` (signed; mirrored
  for negatives) or `2^(i + 1)` (unsigned) midpoints of an even grid on
  `[0.1, 1]`; plus 0 and 1.
  """
  data = []
  for i in range(7):
    items = 2**i + 1 if signed else 2 ** (i + 1) + 1
    bounds = np.linspace(0.1, 1.0, items)
    means = (bounds[:-1] + bounds[1:]) / 2.0
    data += (10.0 ** (i - 6) * means).tolist()
    if signed:
      data += (-(10.0 ** (i - 6)) * means).tolist()
  data += [0.0, 1.0]
  assert len(data) == 256, len(data)
  return np.sort(np.asarray(data, np.float32))


# Static code tables (sorted). The non-negative half of the signed map
# (0, its 127 positive entries, 1) and the unsigned map share one layout:
# entry 0 is 0, decade `i = 0..6` holds `N_i = 2^(i + u)` entries
# (`u = 1` unsigned, 0 signed) starting at index `N_i - u`, then 1.
_TABLES = {signed: _dynamic_map(signed) for signed in (True, False)}
_HALF = {True: _TABLES[True][127:], False: _TABLES[False]}


def code_table(second_moment: bool, scheme: str = "dynamic") -> np.ndarray:
  """Values (relative to the block's absmax) that the codes stand for.

  Indexed by code for `"dynamic"` and `"linear"` second moments; for
  `"linear"` first moments index with `code + 127`.
  """
  if scheme == "dynamic":
    return _TABLES[not second_moment]
  if second_moment:
    return np.arange(256, dtype=np.float32) / 255.0
  return np.arange(-127, 128, dtype=np.float32) / 127.0


def block_layout(n: int, block_size: int) -> tuple[int, int]:
  """`(num_blocks, block_len)` for a last axis of size `n` (static)."""
  k = -(-n // block_size)
  return k, -(-n // k)


def _to_blocks(x: jax.Array, k: int, length: int) -> jax.Array:
  """`[..., n]` -> `[..., k, length]`, zero-padding the tail if needed."""
  pad = k * length - x.shape[-1]
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return x.reshape(x.shape[:-1] + (k, length))


def _from_blocks(x: jax.Array, n: int) -> jax.Array:
  """Inverse of `_to_blocks`."""
  return x.reshape(x.shape[:-2] + (-1,))[..., :n]


def _round(x: jax.Array, lo: jax.Array, hi: jax.Array,
           noise: jax.Array | None) -> jax.Array:
  """Per element, True to pick `hi` over `lo` (`lo <= x <= hi`)."""
  if noise is None:
    return x - lo > hi - x  # Nearest; ties go down.
  gap = hi - lo
  return noise * gap < x - lo  # P(hi) = (x - lo) / gap: unbiased.


def _dynamic_lo(a: jax.Array, signed: bool) -> jax.Array:
  """Index into `_HALF[signed]` of the largest entry `<= a` (`0 <= a <= 1`).

  Closed form from the map's layout (decade by comparison, then the linear
  fraction), then one correction step each way for float rounding at
  decade edges: ~5x faster on CPU than `jnp.searchsorted` on the table.
  Clipped to `[0, len - 2]`, so `lo + 1` is always an entry.
  """
  half = jnp.asarray(_HALF[signed])
  u = 0 if signed else 1
  last = half.shape[0] - 2
  # Decade `i` holds [10^(i - 7), 10^(i - 6)); below 1e-7 counts as 0.
  decade = sum((a >= 10.0**e).astype(jnp.int32) for e in range(-6, 0))
  n = jnp.left_shift(1, decade + u)
  top = jnp.asarray(10.0 ** np.arange(-6, 1), jnp.float32)[decade]
  frac = a / top  # In [0.1, 1) inside the range.
  j = jnp.floor((frac - 0.1) * (n / 0.9) - 0.5).astype(jnp.int32)
  lo = jnp.clip(n - u + jnp.clip(j, -1, n - 1), 0, last)
  lo = jnp.clip(lo - (half[lo] > a), 0, last)
  return jnp.clip(lo + (half[lo + 1] <= a), 0, last)


def _encode(x: jax.Array, second_moment: bool, scheme: str,
            noise: jax.Array | None, bnb: bool = False) -> jax.Array:
  """Codes for `x` already divided by its block's absmax (in [-1, 1])."""
  if scheme == "linear":
    levels = 255.0 if second_moment else 127.0
    y = x * levels
    lo = jnp.floor(y)
    q = lo + _round(y, lo, lo + 1.0, noise)
    if second_moment:  # Never round a nonzero sqrt(v) to zero.
      q = jnp.where(x > 0, jnp.maximum(q, 1.0), q)
      return q.astype(jnp.uint8)
    return q.astype(jnp.int8)
  # Dynamic: round the magnitude on the non-negative half of the table (so
  # rounding is symmetric), then map to the index in the full sorted table.
  signed = not second_moment
  half = jnp.asarray(_HALF[signed])
  a = jnp.abs(x)
  lo = _dynamic_lo(a, signed)
  h = lo + _round(a, half[lo], half[lo + 1], noise).astype(jnp.int32)
  if signed:  # Full index: 127 is 0; the map has +1 but no -1.
    if bnb:  # bitsandbytes keeps the sign: -0 becomes the smallest negative.
      h = jnp.where(x < 0, jnp.maximum(h, 1), h)
    return jnp.where(x < 0, 127 - jnp.minimum(h, 127), 127 + h).astype(
        jnp.uint8)
  if bnb:
    return h.astype(jnp.uint8)
  return jnp.where(a > 0, jnp.maximum(h, 1), h).astype(jnp.uint8)


def _decode(codes: jax.Array, second_moment: bool, scheme: str) -> jax.Array:
  """Values in [-1, 1] that `codes` stand for (float32)."""
  if scheme == "linear":
    return codes.astype(jnp.float32) / (255.0 if second_moment else 127.0)
  return jnp.asarray(code_table(second_moment, scheme))[codes]


# Jitted as a unit (inlined under an outer jit): run eagerly, the update
# then compiles one program per leaf shape instead of dozens of small ops.
@functools.partial(
    jax.jit, static_argnames=("second_moment", "scheme", "block_size", "bnb"),
    inline=True)
def quantize(
    x: jax.Array,
    *,
    second_moment: bool,
    scheme: str = "dynamic",
    block_size: int = 256,
    noise: jax.Array | None = None,
    bnb: bool = False,
) -> BlockQuantized:
  """Block-wise quantizes a moment along its last axis.

  Args:
    x: A first moment `m`, or a second moment `v` (`second_moment=True`,
      non-negative; `sqrt(v)` is what gets stored).
    second_moment: Which of the two code tables to use (see module doc).
    scheme: `"dynamic"` or `"linear"`.
    block_size: Maximum block length along the last axis.
    noise: Optional uniform [0, 1) noise of `x`'s shape, for stochastic
      rounding; None rounds to the nearest code.
    bnb: bitsandbytes' codes (module docstring): `v` rather than `sqrt(v)`,
      no nonzero floor, the first moment's sign kept. Dynamic scheme only.

  Returns:
    A `BlockQuantized` with `codes` of `x`'s shape.

  Raises:
    ValueError: On `bnb=True` with `scheme="linear"`.
  """
  if bnb and scheme != "dynamic":
    raise ValueError(
        f"bnb=True follows bitsandbytes' dynamic maps; got scheme={scheme!r}."
        " Pass scheme='dynamic' or bnb=False.")
  n = x.shape[-1]
  k, length = block_layout(n, block_size)
  x = x.astype(jnp.float32)
  if second_moment and not bnb:
    x = jnp.sqrt(x)
  blocks = _to_blocks(x, k, length)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  safe = jnp.where(absmax > 0, absmax, 1.0)
  # The clip only guards float rounding of the block's max (+-1).
  y = jnp.clip(blocks / safe[..., None], -1.0, 1.0)
  if noise is not None:
    noise = _to_blocks(noise, k, length)
  codes = _encode(y, second_moment, scheme, noise, bnb)
  return BlockQuantized(codes=_from_blocks(codes, n), scale=absmax)


@functools.partial(
    jax.jit, static_argnames=("second_moment", "scheme", "bnb"), inline=True)
def dequantize(
    q: BlockQuantized, *, second_moment: bool, scheme: str = "dynamic",
    bnb: bool = False,
) -> jax.Array:
  """Inverse of `quantize` (float32; `v`, not `sqrt(v)`, for second moments).

  The block layout is recovered from the shapes of `codes` and `scale`;
  `bnb` must be what `quantize` was given.
  """
  n, k = q.codes.shape[-1], q.scale.shape[-1]
  length = -(-n // k)
  values = _decode(_to_blocks(q.codes, k, length), second_moment, scheme)
  x = _from_blocks(values * q.scale[..., None], n)
  return x * x if second_moment and not bnb else x
